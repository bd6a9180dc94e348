#!/usr/bin/env bash
# Master fan-in: N concurrent tunnels against one loopback sshd, each carrying RATE reports a
# second for DURATION seconds from a load generator standing in for N node agents. Prints the
# master's CPU time per report (utime+stime over the load window) and its peak RSS, and the
# extrapolation to 10,000 nodes at 1 Hz. Every channel is authenticated as an agent's is
# (the master's challenge answered with an HMAC keyed by report.key).
# FANIN_ETCD=1: the master runs with [cluster] on a one-member etcd started here on loopback
# (the host list imported into it), as one master of several does.
# FANIN_PERF=FILE: perf record of the master during the run (perf report -i FILE).
# Usage: benches/master-fanin.sh [N=200] [RATE=5] [DURATION=20]   (root: sshd needs it)
set -euo pipefail
n=${1:-200} rate=${2:-5} dur=${3:-20}
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=common.sh
. "$root/benches/common.sh"
# shellcheck source=../scripts/loopback-sshd.sh
. "$root/scripts/loopback-sshd.sh"

# sshd on 127.0.0.1 with throwaway keys.
ssh_port=$(free_port)
"$bin" -q init --dir "$tmp/m"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/m/id_ed25519"
start_loopback_sshd "$tmp/sshd" 127.0.0.1 "$ssh_port" "$tmp/m/id_ed25519.pub" $'MaxStartups 2000\nMaxSessions 10'
pids+=("$SSHD_PID")
echo "[127.0.0.1]:$ssh_port $(cut -d' ' -f1,2 "$tmp/sshd/host.pub")" >"$tmp/m/known_hosts"
sed -i "s/^user = .*/user = $(id -un)/" "$tmp/m/autoscaler.ini"
# TCP forwards, one report port per host (each host file names its own); a build from before
# report_socket has no such key.
sed -i "s/^report_socket = .*/report_socket = /" "$tmp/m/autoscaler.ini"
# This master must not touch the machine's HAProxy.
sed -i "s/^reload_command = .*/reload_command = true/" "$tmp/m/autoscaler.ini"

# N hosts: all 127.0.0.1, each with its own application and report port. Report ports stay
# below the ephemeral range: a port there may already be the local end of some connection
# (the master's own SSH sessions among them), and sshd then refuses that forward.
low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
base=$((low - 20000 - n))
[ "$base" -gt 1024 ] || { echo "N=$n too large for the ports below $low" >&2; exit 1; }
for ((i = 0; i < n; i++)); do
  printf 'host = 127.0.0.1\nport = %d\nssh_port = %d\nreport_port = %d\n' $((base + i)) "$ssh_port" $((base + 20000 + i)) \
    >"$tmp/m/hosts.d/127.0.0.1_$((base + i)).host"
done
if [ -n "${FANIN_ETCD:-}" ]; then
  cp=$(free_port) pp=$(free_port)
  etcd --name b --data-dir "$tmp/etcd" --listen-client-urls "http://127.0.0.1:$cp" \
    --advertise-client-urls "http://127.0.0.1:$cp" --listen-peer-urls "http://127.0.0.1:$pp" \
    --initial-advertise-peer-urls "http://127.0.0.1:$pp" --initial-cluster "b=http://127.0.0.1:$pp" \
    --log-level error >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    python3 -c "import urllib.request,sys; sys.exit('true' not in urllib.request.urlopen('http://127.0.0.1:$cp/health').read().decode())" 2>/dev/null && break
    sleep 0.1
  done
  sed -i "s|^etcd_endpoints = .*|etcd_endpoints = http://127.0.0.1:$cp|" "$tmp/m/autoscaler.ini"
  AUTOSCALER_CONFIG="$tmp/m/autoscaler.ini" "$bin" -q import-hosts
  echo "master on etcd (127.0.0.1:$cp), $n hosts imported"
fi
AUTOSCALER_CONFIG="$tmp/m/autoscaler.ini" "$bin" ${FANIN_LOG_ARGS:--q} master 2>"$tmp/master.log" &
master=$!; pids+=($master)

python3 - "$n" "$rate" "$dur" "$base" "$master" "$tmp/m/report.key" <<'PY' || { echo "load generator failed: no figure" >&2; exit 1; }
import asyncio, hashlib, hmac, json, os, struct, sys, time
n, rate, dur, base, master = map(int, sys.argv[1:6])
secret = open(sys.argv[6]).read().strip().encode()
def mac(key, parts):
    m = hmac.new(key, digestmod=hashlib.sha256)
    for f in parts:
        m.update(struct.pack(">Q", len(f))); m.update(f)
    return m.digest()
tck = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tck
def switches(pid):
    """Context switches of all the process's threads (each wake-up of a parked thread is one)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        for l in open(f"/proc/{pid}/task/{t}/status"):
            if l.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(l.split()[1])
    return total
def hwm(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmHWM"): return int(l.split()[1])
async def connect(i):
    for _ in range(600):
        try:
            return await asyncio.open_connection("127.0.0.1", base + 20000 + i)
        except OSError:
            await asyncio.sleep(0.1)
    raise SystemExit(f"forward {i} never came up")
class Channel:
    """One agent's channel, in the protocol the master speaks (v1: a MAC'd hello, plain
    frames; v2: the hello bound to the forward, a welcome, a MAC on every frame)."""
    def __init__(self, i, port, r, w):
        self.i, self.via, self.r, self.w, self.session = i, f"tcp:{port}", r, w, None
    async def handshake(self):
        challenge = json.loads(await self.r.readline())
        self.v = challenge["v"]
        node, nonce = f"n{self.i}", challenge["nonce"]
        if self.v == 1:
            tag = mac(secret, [nonce.encode(), node.encode(), struct.pack(">Q", 1)]).hex()
            self.w.write((json.dumps({"v": 1, "type": "hello", "node": node, "boot": 1, "mac": tag}) + "\n").encode())
            return
        hello = {"v": 2, "type": "hello", "node": node, "boot": 1, "interval_ms": 200, "buffer": 0,
                 "nonce": os.urandom(32).hex()}
        covered = json.dumps(hello, separators=(",", ":"))[:-1].encode()
        parts = lambda what: [what, nonce.encode(), self.via.encode(), covered]
        self.w.write(covered + b',"mac":"' + mac(secret, parts(b"hello")).hex().encode() + b'"}\n')
        welcome = json.loads(await self.r.readline())
        assert welcome["mac"] == mac(secret, parts(b"welcome")).hex(), "no welcome"
        self.session = hmac.new(mac(secret, parts(b"session")), digestmod=hashlib.sha256)
    def frame(self, seq, ts):
        body = {"v": self.v, "type": "cpu", "seq": seq, "ts_ms": ts, "busy_pct": 42.0, "cores": 2}
        if self.v == 1:
            return (json.dumps(body) + "\n").encode()
        covered = json.dumps(body, separators=(",", ":"))[:-1].encode()
        m = self.session.copy(); m.update(covered)
        return covered + b',"mac":"' + m.digest()[:16].hex().encode() + b'"}\n'
async def main():
    t0 = time.time()
    conns = await asyncio.gather(*(connect(i) for i in range(n)))
    print(f"{n} forwards up after {time.time() - t0:.1f}s")
    chans = [Channel(i, base + 20000 + i, r, w) for i, (r, w) in enumerate(conns)]
    await asyncio.gather(*(c.handshake() for c in chans))
    print(f"report protocol v{chans[0].v}")
    await asyncio.sleep(2)
    # FANIN_PERF: where the master's CPU goes during the load (perf record, software clock).
    perf = None
    if os.environ.get("FANIN_PERF"):
        import subprocess
        perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", os.environ.get("FANIN_PERF_HZ", "499"), "-g", "-p", str(master),
                                 "-o", os.environ["FANIN_PERF"], "--", "sleep", str(dur)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c0, s0, start, sent, seq = cpu(master), switches(master), time.time(), 0, 0
    while time.time() - start < dur:
        tick = time.time()
        for c in chans:
            c.w.write(c.frame(seq, int(tick * 1000)))
        sent += n; seq += 1
        await asyncio.gather(*(c.w.drain() for c in chans))
        await asyncio.sleep(max(0, 1 / rate - (time.time() - tick)))
    await asyncio.sleep(1)
    used, switched = cpu(master) - c0, switches(master) - s0
    if perf:
        perf.wait()
    per = used / sent * 1e6
    print(f"reports: {sent} over {dur}s ({sent / dur:.0f}/s) through {n} tunnels")
    print(f"master CPU: {used:.2f} s = {per:.1f} us per report; peak RSS {hwm(master)} KiB")
    print(f"master context switches: {switched / sent:.2f} per report")
    print(f"10,000 nodes at 1 Hz: {per * 10000 / 1e6:.2f} cores of master CPU")
asyncio.run(main())
PY
if [ -n "${FANIN_LOG_ARGS:-}" ]; then
  echo "master log: $(grep -c '"msg":"CPU"' "$tmp/master.log") CPU records, $(grep -c '"msg":"NodeUp"' "$tmp/master.log") NodeUp, $(grep -c 'Tunnel up' "$tmp/master.log") tunnels up"
  echo "session errors:"; grep -o '"error":"[^"]*' "$tmp/master.log" | sort | uniq -c | sort -rn | head -5
fi
