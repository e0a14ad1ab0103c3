#!/usr/bin/env bash
# Honest-reference check (issue #15, target 6): each reference server's echo
# figure against an independently written echo server on the same library,
# measured alike (same load generator, same pinning, per server CPU-second).
#
#   ref-uwebsockets     vs  uWebSockets' own examples/EchoServer.cpp (compiled
#                           from the vendored source with build.c's flags)
#                       and an echo server on uWebSockets.js from npm
#                           (node/uws-echo.js)
#   ref-fastwebsockets  vs  fastwebsockets' own examples/echo_server.rs
#                           (compiled from the crate's source in the registry),
#                           as published and with TCP_NODELAY added
#
# Nothing of those examples is copied into this repository: they are built
# in place from the packages cargo downloaded, under target/.
#
# The two example servers listen on fixed ports (9001 and 8080), so every
# server runs in a private network namespace of this script (`unshare -n`,
# root; only its own loopback is up), where no other process's ports exist.
# Servers are pinned to CPU 0, the load generator to CPU 1 (as in compare).
#
# Usage: crates/switchboard-bench/scripts/reference-check.sh [SECONDS] [ROUNDS]
#   (default 5 s per run, 3 rounds; prints one line per run and the medians)
set -euo pipefail
cd "$(dirname "$0")/../../.."
SECS=${1:-5}
ROUNDS=${2:-3}
UWS_JS=${UWS_JS:-@trufflesuite/uws-js-unofficial@20.30.0-unofficial.0}

[ "$(id -u)" = 0 ] || { echo "reference-check: needs root (unshare -n)" >&2; exit 1; }
for tool in unshare ip taskset c++ node npm; do
  command -v "$tool" >/dev/null || { echo "reference-check: $tool is missing" >&2; exit 1; }
done

TARGET=${CARGO_TARGET_DIR:-target}
WORK=$TARGET/switchboard-bench/reference-check
mkdir -p "$WORK"
cargo build --release -q -p switchboard-bench --bins
B=$TARGET/release/switchboard-bench
# build-uws prints a JSON line with the uWebSockets source directory.
UWS=$("$B" build-uws | tail -n 1 | sed -n 's/.*"uwebsockets_source":"\([^"]*\)".*/\1/p')
[ -d "$UWS" ] || { echo "reference-check: build-uws gave no source directory" >&2; exit 1; }

echo "building uWebSockets' examples/EchoServer.cpp from $UWS"
c++ -march=native -O3 -flto -std=c++20 -DLIBUS_NO_SSL -I"$UWS/src" -I"$UWS/uSockets/src" \
  "$UWS/examples/EchoServer.cpp" "$TARGET"/switchboard-bench/uws-build/obj/*.o -lz \
  -o "$WORK/uws-example-echo" 2>"$WORK/uws-example-echo.log"

if [ ! -f "$WORK/node/node_modules/${UWS_JS%@*}/package.json" ]; then
  echo "installing $UWS_JS into $WORK/node"
  npm install --prefix "$WORK/node" --no-audit --no-fund --no-save --loglevel=error "$UWS_JS"
fi

# fastwebsockets' example, built as a bin of a throwaway package.
FWS=$(cargo metadata --format-version 1 | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "fastwebsockets":
        print(p["manifest_path"].rsplit("/", 1)[0]); break')
mkdir -p "$WORK/fws-example"
cat >"$WORK/fws-example/Cargo.toml" <<EOF
[package]
name = "fws-example-echo"
version = "0.0.0"
edition = "2021"
publish = false
[[bin]]
name = "fws-example-echo"
path = "$FWS/examples/echo_server.rs"
[dependencies]
fastwebsockets = { path = "$FWS", features = ["upgrade"] }
http-body-util = "0.1"
hyper = { version = "1", features = ["http1", "server"] }
hyper-util = { version = "0.1", features = ["tokio"] }
tokio = { version = "1", features = ["full"] }
anyhow = "1"
[[bin]]
name = "fws-example-nodelay"
path = "nodelay.rs"
[profile.release]
codegen-units = 4
lto = "thin"
[workspace]
EOF
# The same example with TCP_NODELAY on accepted sockets, as every server in
# compare has (the example leaves Nagle's algorithm on): one line added by
# sed at build time, into target/ only.
sed 's/let (stream, _) = listener.accept().await?;/&\n      stream.set_nodelay(true)?;/' \
  "$FWS/examples/echo_server.rs" >"$WORK/fws-example/nodelay.rs"
grep -q set_nodelay "$WORK/fws-example/nodelay.rs" ||
  { echo "reference-check: could not add set_nodelay to the example" >&2; exit 1; }
echo "building fastwebsockets' examples/echo_server.rs from $FWS"
CARGO_TARGET_DIR="$PWD/$WORK/fws-example/target" cargo build --release -q \
  --manifest-path "$WORK/fws-example/Cargo.toml"
FWS_BIN=$WORK/fws-example/target/release/fws-example-echo
FWS_NODELAY_BIN=$WORK/fws-example/target/release/fws-example-nodelay

# name | command | fixed port (empty: ours print "listening on http://ADDR")
SERVERS=(
  "ref-uwebsockets|$TARGET/release/ref-uwebsockets --listen 127.0.0.1:0|"
  "uws-example-EchoServer|$WORK/uws-example-echo|9001"
  "uWebSockets.js|env NODE_PATH=$WORK/node/node_modules UWS_PACKAGE=${UWS_JS%@*} node crates/switchboard-bench/node/uws-echo.js|"
  "ref-fastwebsockets|$TARGET/release/ref-fastwebsockets --listen 127.0.0.1:0|"
  "fws-example-echo_server|$FWS_BIN|8080"
  "fws-example-nodelay|$FWS_NODELAY_BIN|8080"
)

# One echo run against one server inside the namespace; prints
# "name inflight msgs-per-server-CPU-s msgs-per-s load-gen-CPU-share".
run_one() {
  local name=$1 cmd=$2 port=$3 inflight=$4
  unshare -n bash -c '
    set -euo pipefail
    ip link set lo up
    log=$(mktemp)
    taskset -c 0 '"$cmd"' >"$log" 2>&1 &
    pid=$!
    trap "kill $pid 2>/dev/null; rm -f $log" EXIT
    addr=""
    for _ in $(seq 100); do
      if [ -n "'"$port"'" ]; then
        (exec 3<>/dev/tcp/127.0.0.1/'"$port"') 2>/dev/null && addr=127.0.0.1:'"$port"'
      else
        addr=$(sed -n "s#.*listening on http://\([0-9.:]*\).*#\1#p" "$log" | head -n 1)
      fi
      [ -n "$addr" ] && break
      sleep 0.1
    done
    [ -n "$addr" ] || { echo "'"$name"' did not start: $(cat $log)" >&2; exit 1; }
    json=$(taskset -c 1 '"$B"' --threads 1 echo --url "ws://$addr/echo" -c 100 -s 32 \
      -k '"$inflight"' --duration '"$SECS"' --server-pid "$pid" | tail -n 1)
    python3 -c "
import json, sys
r = json.loads(sys.argv[1])
c = r[\"cpu\"]
assert r[\"ok\"], r
print(\"%-24s k=%s %10.0f %10.0f %5.0f%%\" % (sys.argv[2], sys.argv[3], r[\"msgs_per_server_cpu_sec\"],
      r[\"msgs_per_sec\"], 100 * c[\"client_cpu_secs\"] / c[\"wall_secs\"]))
" "$json" "'"$name"'" "'"$inflight"'"
  '
}

echo
echo "echo 32 B, 100 connections, ${SECS} s per run, ${ROUNDS} rounds"
echo "server                   inflight  per-srv-CPU-s   per-s  load-gen CPU"
RESULTS=$WORK/results.txt
: >"$RESULTS"
for round in $(seq "$ROUNDS"); do
  for inflight in 1 8; do
    for entry in "${SERVERS[@]}"; do
      IFS='|' read -r name cmd port <<<"$entry"
      run_one "$name" "$cmd" "$port" "$inflight" | tee -a "$RESULTS"
    done
  done
done

echo
echo "medians (messages per server CPU-second):"
python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, k, per_cpu, *_ = line.split()
    rows.setdefault((name, k), []).append(float(per_cpu))
med = {key: statistics.median(v) for key, v in rows.items()}
for (name, k), v in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"  {name:24} {k}: {v:10.0f}")
pairs = [("uws-example-EchoServer", "ref-uwebsockets"), ("uWebSockets.js", "ref-uwebsockets"),
         ("fws-example-echo_server", "ref-fastwebsockets"),
         ("fws-example-nodelay", "ref-fastwebsockets")]
for other, ref in pairs:
    for k in ("k=1", "k=8"):
        if (other, k) in med and (ref, k) in med:
            print(f"  {ref} / {other} ({k}): {med[(ref, k)] / med[(other, k)]:.2f}")
PY
