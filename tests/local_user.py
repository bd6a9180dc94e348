#!/usr/bin/env python3
"""A local user of a node attacking the report forwards, as the tests run it: an unprivileged
user (no secret, no root) on the node's loopback. Every mode stops by itself and prints one
JSON object saying what it managed, so a test can tell an attack that failed from one that
never happened.

  relay LISTEN_PORT MASTER_PORT SECONDS
      Takes 127.0.0.1:LISTEN_PORT (a master's report port while nothing holds it), waits for
      the agent to connect, lets the port go, connects to MASTER_PORT (another master's
      forward, or the same port once its master's forward is up), passes the master's lines to
      the agent and the agent's to the master, and on that channel writes frames claiming
      99 % busy: copies of the agent's own frames with the value changed, or made up.
  drip PORT CONNECTIONS SECONDS
      Holds CONNECTIONS channels open on PORT, each sending one byte every 5 s and never a
      hello; a closed one is opened again after half a second.
  probe-unix SOCKET
      Tries to connect to a master's socket in the agent's directory, and to put a socket of
      its own next to it.
"""
import json
import socket
import sys
import threading
import time


def line_of(sock, deadline):
    """One line from sock (without the newline), or None at the deadline or on close."""
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.time()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            b = sock.recv(1)
        except (socket.timeout, OSError):
            return None
        if not b:
            return None
        buf += b
    return buf[:-1]


def forged(template, seq, version):
    """A frame claiming 99 % busy, shaped like the agent's own (same fields, its MAC kept),
    in the protocol version the master's challenge spoke."""
    try:
        frame = json.loads(template)
    except ValueError:
        frame = {"v": version, "type": "cpu", "ts_ms": 1, "cores": 2}
    frame["type"] = "cpu"
    frame["seq"] = seq
    frame["busy_pct"] = 99.0
    frame.setdefault("ts_ms", 1)
    frame.setdefault("cores", 2)
    return (json.dumps(frame, separators=(",", ":")) + "\n").encode()


def relay(listen_port, master_port, seconds):
    said = {"agent_connected": False, "master_connected": False, "hello_relayed": False,
            "agent_frames": 0, "injected": 0, "master_closed": False}
    end = time.time() + seconds
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", listen_port))
    lst.listen(1)
    lst.settimeout(max(0.1, end - time.time()))
    try:
        agent, _ = lst.accept()
    except socket.timeout:
        print(json.dumps(said))
        return
    lst.close()
    said["agent_connected"] = True
    print("agent connected", file=sys.stderr, flush=True)
    master = None
    while master is None and time.time() < end:
        try:
            master = socket.create_connection(("127.0.0.1", master_port), timeout=1)
        except OSError:
            time.sleep(0.05)
    if master is None:
        print(json.dumps(said))
        return
    said["master_connected"] = True
    # The master's challenge to the agent, the agent's hello to the master.
    challenge = line_of(master, end)
    if challenge is None:
        print(json.dumps(said))
        return
    agent.sendall(challenge + b"\n")
    try:
        version = json.loads(challenge).get("v", 2)
    except ValueError:
        version = 2
    hello = line_of(agent, end)
    if hello is None:
        print(json.dumps(said))
        return
    # The first forged frame right behind the hello, in the same write: on the master's
    # side it is the next line of the channel, whatever happens after.
    master.sendall(hello + b"\n" + forged("", 0, version))
    said["hello_relayed"] = True
    said["injected"] += 1
    seq = 1

    # Whatever the master says next (a welcome) goes to the agent.
    def to_agent():
        while time.time() < end:
            l = line_of(master, end)
            if l is None:
                said["master_closed"] = True
                return
            try:
                agent.sendall(l + b"\n")
            except OSError:
                return
    threading.Thread(target=to_agent, daemon=True).start()
    template = ""
    next_forgery = time.time() + 0.2
    while time.time() < end and not said["master_closed"]:
        l = line_of(agent, min(end, time.time() + 0.2))
        try:
            if l is not None:
                frame = json.loads(l)
                if frame.get("type") == "cpu":
                    said["agent_frames"] += 1
                    template, seq = l, max(seq, frame.get("seq", 0) + 1)
                master.sendall(l + b"\n")
            if time.time() >= next_forgery:
                master.sendall(forged(template, seq, version))
                said["injected"] += 1
                seq += 1
                next_forgery = time.time() + 0.2
        except (OSError, ValueError):
            said["master_closed"] = True
    print(json.dumps(said))


def drip(port, connections, seconds):
    said = {"opened": 0, "closed_by_master": 0}
    end = time.time() + seconds
    lock = threading.Lock()

    def one():
        while time.time() < end:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=1)
            except OSError:
                time.sleep(0.5)
                continue
            with lock:
                said["opened"] += 1
            s.settimeout(0.2)
            last = 0.0
            while time.time() < end:
                try:
                    if time.time() - last >= 5:
                        s.sendall(b"{")
                        last = time.time()
                    if s.recv(4096) == b"":
                        with lock:
                            said["closed_by_master"] += 1
                        break
                except socket.timeout:
                    continue
                except OSError:
                    with lock:
                        said["closed_by_master"] += 1
                    break
            s.close()
            time.sleep(0.5)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, end - time.time()) + 2)
    print(json.dumps(said))


def probe_unix(path):
    said = {}
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        said["connect"] = "connected"
    except OSError as e:
        said["connect"] = type(e).__name__
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(path.rsplit("/", 1)[0] + "/squat.sock")
        said["bind"] = "bound"
    except OSError as e:
        said["bind"] = type(e).__name__
    print(json.dumps(said))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "relay":
        relay(int(args[0]), int(args[1]), float(args[2]))
    elif mode == "drip":
        drip(int(args[0]), int(args[1]), float(args[2]))
    elif mode == "probe-unix":
        probe_unix(args[0])
    else:
        sys.exit(f"unknown mode {mode}")
