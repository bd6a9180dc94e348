# Sourced by scripts/demo.sh and benches/master-fanin.sh: a throwaway OpenSSH server on a
# loopback address, trusting one public key, for the master to tunnel through.
#
#   start_loopback_sshd DIR ADDR PORT AUTHORIZED_PUB [EXTRA_CONFIG_LINES]
#
# Writes DIR/host (host key), DIR/config, DIR/log; starts sshd in the foreground in the
# background and sets SSHD_PID. Run as root (sshd needs /run/sshd).
start_loopback_sshd() {
  local dir=$1 addr=$2 port=$3 pub=$4 extra=${5:-}
  mkdir -p /run/sshd "$dir"
  ssh-keygen -q -t ed25519 -N '' -f "$dir/host"
  cp "$pub" "$dir/authorized_keys"
  cat >"$dir/config" <<CFG
Port $port
ListenAddress $addr
HostKey $dir/host
PidFile $dir/pid
AuthorizedKeysFile $dir/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AllowTcpForwarding yes
GatewayPorts no
StrictModes no
$extra
CFG
  /usr/sbin/sshd -D -f "$dir/config" -E "$dir/log" &
  SSHD_PID=$!
}
