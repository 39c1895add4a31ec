#!/usr/bin/env bash
# Time from a fresh clone to "Redis >= 90% huge", following only the README's Set up:
# a venv under /opt, `hugepaged install`, the daemon as the unit starts it (systemctl replaced
# by the unit's ExecStart run by hand where systemd is not PID 1), a redis-server with 1 GiB
# (DEBUG POPULATE), `hugepaged suggest` pasted into /etc/hugepaged/hugepaged.toml, SIGHUP (what
# `systemctl reload` sends). Then `hugepaged uninstall`. It changes the machine (/opt,
# /etc, /usr/local) and runs a daemon over every process: a scratch machine, and under the
# tests' lock:  flock /run/lock/hugepaged-tests.lock bench/newcomer.sh [REPO]
set -euo pipefail
REPO=${1:-$(cd "$(dirname "$0")/.." && pwd)}
export -n PYTHONPATH; unset PYTHONPATH VIRTUAL_ENV
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
T0=$(date +%s.%N)
stamp() { printf '%6.1f s  %s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$1"; }
rm -rf /tmp/nc && git clone -q "$REPO" /tmp/nc && cd /tmp/nc
stamp "cloned"
apt-get install -y -qq python3-venv >/dev/null
python3 -m venv /opt/hugepaged
/opt/hugepaged/bin/pip install -q . 2>&1 | grep -v "is ignored" || true
stamp "pip install . done"
/opt/hugepaged/bin/hugepaged install
stamp "hugepaged install done"
# systemctl daemon-reload && systemctl enable --now hugepaged: the unit's ExecStart by hand
EXEC=$(sed -n 's/^ExecStart=//p' /etc/systemd/system/hugepaged.service)
$EXEC 2>/tmp/nc-daemon.log &
DAEMON=$!
stamp "daemon started: $EXEC"
apt-get install -y -qq redis-server >/dev/null
redis-server --port 16399 --save '' --appendonly no --enable-debug-command yes --daemonize yes --dir /tmp --pidfile /tmp/nc-redis.pid
sleep 0.5
redis-cli -p 16399 DEBUG POPULATE 1000000 key 1000 >/dev/null
stamp "redis populated: $(redis-cli -p 16399 info memory | grep used_memory_human)"
sleep 2
cat /tmp/nc-daemon.log
hugepaged suggest | tee /tmp/nc-suggest.toml
mkdir -p /etc/hugepaged && cat /tmp/nc-suggest.toml >> /etc/hugepaged/hugepaged.toml
kill -HUP $DAEMON   # systemctl reload hugepaged
stamp "target pasted, reloaded"
RPID=$(cat /tmp/nc-redis.pid)
while :; do
  huge=$(grep AnonHugePages /proc/$RPID/smaps_rollup | awk '{print $2}')
  anon=$(grep '^Anonymous' /proc/$RPID/smaps_rollup | awk '{print $2}')
  pct=$(( 100 * huge / anon ))
  if [ $pct -ge 90 ]; then stamp "redis ${pct}% huge ($huge of $anon kB)"; break; fi
  sleep 1
done
hugepaged status
kill $DAEMON; wait $DAEMON || true
redis-cli -p 16399 shutdown nosave || true
/opt/hugepaged/bin/hugepaged uninstall
rm -rf /opt/hugepaged /etc/hugepaged/hugepaged.toml; rmdir /etc/hugepaged 2>/dev/null || true
stamp "uninstalled"
tail -5 /tmp/nc-daemon.log
