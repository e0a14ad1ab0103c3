#!/usr/bin/env bash
# What open dashboards cost the server (docs/benchmarks.md, "The
# dashboard's own cost"): the relay workload with 0 and then 5 dashboards
# open in headless Chromium, alternating, ROUNDS times each; the server's
# deliveries per CPU-second from `switchboard-bench relay --server-pid`;
# and the server's CPU with 5 dashboards open and no load.
#
#   crates/switchboard-bench/scripts/dashboard-cost.sh [ROUNDS] [SECONDS]
#
# Server pinned to CPU 0; load generator and Chromium to CPU 1. Loopback
# only; every process it starts is ended by its PID on exit. Needs the
# release builds (cargo build --release -p switchboard-cli -p
# switchboard-bench) and what scripts/check-dashboard.mjs needs.
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROUNDS=${1:-2}
SECS=${2:-15}
S=target/release/switchboard
B=target/release/switchboard-bench
LOG=$(mktemp -t sb-dashcost-XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -f "$LOG"; }
trap cleanup EXIT

taskset -c 0 "$S" --listen 127.0.0.1:0 --max-message-rate 0 --log-level warn,switchboard=info 2>"$LOG" &
PID=$!
pids+=("$PID")
for _ in $(seq 100); do grep -q 'listening on' "$LOG" && break; sleep 0.1; done
ADDR=$(grep -o 'listening on http://[0-9.:]*' "$LOG" | head -1 | sed 's|listening on http://||')
BASE=http://$ADDR
echo "server pid $PID at $BASE"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
HZ=$(getconf CLK_TCK)

run_relay() {
  taskset -c 1 "$B" relay --url "ws://$ADDR/ws" -n 1000 -k 4 --duration "$SECS" --server-pid "$PID" --threads 1 |
    tail -1 | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.0f %.0f %s" % (r["delivered_per_server_cpu_sec"], r["delivered_per_sec"], r["ok"]))'
}

for round in $(seq "$ROUNDS"); do
  for dashboards in 0 5; do
    dash=""
    if [ "$dashboards" -gt 0 ]; then
      taskset -c 1 node scripts/open-dashboards.mjs "$dashboards" $((SECS + 20)) "$BASE" &
      dash=$!
      pids+=("$dash")
      sleep 10 # pages loaded, streams open
    fi
    read -r per_cpu per_sec ok < <(run_relay)
    echo "round $round, $dashboards dashboards: $per_cpu deliveries per server CPU-s, $per_sec deliveries/s, ok=$ok"
    if [ -n "$dash" ]; then wait "$dash" || echo "(the dashboards were not all live)"; fi
    sleep 2
  done
done

# No load: the server's CPU with 0, then 5 dashboards, over SECS.
idle() {
  local a b
  a=$(cpu_ticks)
  sleep "$SECS"
  b=$(cpu_ticks)
  python3 -c "print(f'{($b - $a) / $HZ / $SECS * 100:.2f}')"
}
echo "no load, 0 dashboards: $(idle)% of a core"
taskset -c 1 node scripts/open-dashboards.mjs 5 $((SECS + 15)) "$BASE" &
dash=$!
pids+=("$dash")
sleep 10
echo "no load, 5 dashboards: $(idle)% of a core"
wait "$dash" || true
