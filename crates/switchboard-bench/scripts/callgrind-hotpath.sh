#!/usr/bin/env bash
# Server instructions per delivered frame, counted by callgrind: a number
# that does not move with the machine's load (unlike CPU seconds), for
# comparing two builds of the message path (relay, echo, fan-out).
#
#   crates/switchboard-bench/scripts/callgrind-hotpath.sh WORKLOAD [OUT_DIR]
#
# WORKLOAD: relay (100 clients x 4 in flight), relay-v1 (the same over
# switchboard.v1: hello, sends with ids, an ack per send, msg envelopes
# numbered in each receiver's inbox), echo (100 connections x 1 in flight,
# 32 B text) or fanout (one relay frame to 2,000 subscribers, one publish
# in flight) or handshake (opens and closes 500, then 2,500 idle
# connections with `hold`: instructions per connection, upgrade and close).
#
# Besides instructions per frame written, the relay workloads print
# instructions per relayed delivery (`switchboard_relay_deliveries_total`):
# a v1 send writes an ack besides its delivery, so per delivery is the
# figure that compares v1 with plain.
#
# How: the release server runs under `valgrind --tool=callgrind`; the load
# generator runs twice against it, a short run then a long one, and the
# counters are dumped (and zeroed) after each. Each run costs its
# handshakes plus a cost per frame, so the difference of the two dumps
# divided by the difference of their frames written (the server's
# `switchboard_frames_out_total`) is the cost of one frame with the
# connections' setup cancelled out. Under callgrind the server runs ~50x
# slower and is always the bottleneck, so its reads hold many frames:
# system calls and wake-ups weigh less here than on a real run.
#
# Loopback only, a free port; the server is ended by its PID on exit.
# SB_SERVER_BIN picks another server binary (e.g. a copy of the build
# before a change). Needs valgrind and the release builds (cargo build --release -p
# switchboard-cli -p switchboard-bench).
set -euo pipefail
cd "$(dirname "$0")/../../.."
WORKLOAD=${1:?usage: callgrind-hotpath.sh relay|relay-v1|echo|fanout|handshake [OUT_DIR]}
OUT=${2:-$(mktemp -d -t sb-callgrind-XXXXXX)}
mkdir -p "$OUT"
# Not SWITCHBOARD_*: the server refuses unknown variables with that prefix.
S=${SB_SERVER_BIN:-target/release/switchboard}
B=target/release/switchboard-bench
LOG=$OUT/server.log
PID=
cleanup() { if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; fi; }
trap cleanup EXIT

valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out.%p" \
  "$S" --listen 127.0.0.1:0 --max-message-rate 0 --drain-window 0 \
  --shutdown-timeout 5s --log-level warn,switchboard=info 2>"$LOG" &
PID=$!
for _ in $(seq 600); do grep -q 'listening on' "$LOG" && break; sleep 0.1; done
ADDR=$(grep -o 'listening on http://[0-9.:]*' "$LOG" | head -1 | sed 's|listening on http://||')
[ -n "$ADDR" ] || { echo "the server did not start: $(cat "$LOG")" >&2; exit 1; }

frames_out() {
  if [ "$WORKLOAD" = handshake ]; then
    connections
    return
  fi
  curl -sf "http://$ADDR/metrics" | awk '$1 == "switchboard_frames_out_total" {print $2}'
}

deliveries() {
  curl -sf "http://$ADDR/metrics" | awk '$1 == "switchboard_relay_deliveries_total" {print $2}'
}

metric() {
  curl -sf "http://$ADDR/metrics" | awk -v name="$1" '$1 == name {print $2}'
}

# The handshake workload counts connections, not frames; it waits for the
# closes to be handled so that each dump holds whole connections.
connections() {
  for _ in $(seq 300); do
    [ "$(metric switchboard_connections_open)" = 0 ] && break
    sleep 0.2
  done
  metric switchboard_connections_total
}

# Runs the load generator for a short (1) or long (2) run.
load() {
  local long=$1
  case "$WORKLOAD" in
  relay)
    "$B" --threads 1 relay --url "ws://$ADDR/ws" -n 100 -k 4 --drain 10 \
      --duration "$([ "$long" = 2 ] && echo 12 || echo 4)"
    ;;
  relay-v1)
    "$B" --threads 1 relay --url "ws://$ADDR/ws" -n 100 -k 4 --drain 10 --protocol v1 \
      --duration "$([ "$long" = 2 ] && echo 12 || echo 4)"
    ;;
  echo)
    "$B" --threads 1 echo --url "ws://$ADDR/echo" -c 100 -k 1 -s 32 --text --drain 10 \
      --duration "$([ "$long" = 2 ] && echo 12 || echo 4)"
    ;;
  fanout)
    "$B" --threads 1 fanout --url "ws://$ADDR/ws" --via relay -n 2000 -k 1 --drain 30 \
      -m "$([ "$long" = 2 ] && echo 60 || echo 20)"
    ;;
  handshake)
    "$B" --threads 1 hold --url "ws://$ADDR/ws" --settle 1 \
      -n "$([ "$long" = 2 ] && echo 2500 || echo 500)"
    ;;
  *)
    echo "unknown workload $WORKLOAD: use relay, relay-v1, echo, fanout or handshake" >&2
    exit 2
    ;;
  esac
}

# Dumps (and zeroes) the counters; prints the new dump's total instructions.
dump() {
  local before after
  before=$(ls "$OUT"/callgrind.out.* 2>/dev/null | wc -l)
  callgrind_control -d "$PID" >/dev/null 2>&1
  for _ in $(seq 300); do
    after=$(ls "$OUT"/callgrind.out.* 2>/dev/null | wc -l)
    [ "$after" -gt "$before" ] && break
    sleep 0.2
  done
  sleep 1
  local file
  file=$(ls -t "$OUT"/callgrind.out.* | head -1)
  awk '/^(summary|totals):/ {print $2; exit}' "$file"
}

F0=$(frames_out)
D0=$(deliveries)
dump >/dev/null # startup
load 1 | tail -1 >"$OUT/short.json"
F1=$(frames_out)
D1=$(deliveries)
I1=$(dump)
load 2 | tail -1 >"$OUT/long.json"
F2=$(frames_out)
D2=$(deliveries)
I2=$(dump)
LONG_DUMP=$(ls -t "$OUT"/callgrind.out.* | head -1)
python3 - "$WORKLOAD" "$F0" "$F1" "$F2" "$I1" "$I2" "$OUT" "$LONG_DUMP" "$D0" "$D1" "$D2" <<'EOF'
import json, sys
workload, f0, f1, f2, i1, i2, out, dump, d0, d1, d2 = sys.argv[1:]
f0, f1, f2, i1, i2, d0, d1, d2 = map(int, (f0, f1, f2, i1, i2, d0, d1, d2))
short, long_ = (f1 - f0), (f2 - f1)
ok = all(json.load(open(f"{out}/{n}.json"))["ok"] for n in ("short", "long"))
per = (i2 - i1) / (long_ - short)
unit = "connections" if workload == "handshake" else "frames"
line = (f"{workload}: short run {short} {unit} {i1} Ir, long run {long_} {unit} {i2} Ir; "
        f"{per:,.0f} instructions per {'connection' if workload == 'handshake' else 'frame written'}")
dshort, dlong = (d1 - d0), (d2 - d1)
if workload.startswith("relay") and dlong != dshort:
    line += f", {(i2 - i1) / (dlong - dshort):,.0f} per relayed delivery ({dlong} in the long run)"
print(f"{line} (load generator ok={ok}); dump {dump}")
EOF
