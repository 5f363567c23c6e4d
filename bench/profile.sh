#!/usr/bin/env bash
# Profiles Warren on a fixed amount of work (BENCHMARKS.md, "Profiling"): starts a
# release `warren` (bench config: tenant `bench` on vhost `/`, exchange `warren-bench`),
# warms it up, then sends REQUESTS requests of KIND at CONCURRENCY in flight and prints
# Warren's CPU time (user and system) and context switches per message, and
# RabbitMQ's CPU time per message. `request` runs a responder beside the load.
#
#   bench/profile.sh [publish|batch|request] [REQUESTS] [CONCURRENCY]
#   CALLGRIND=1 bench/profile.sh publish 2000 16   # under valgrind: instructions per
#                                                  # message, and the annotated profile
#   STRACE=1 bench/profile.sh publish 20000 16     # system calls per message (strace -c)
#   SEGS=1 bench/profile.sh request 20000 16       # TCP segments per message Warren sends
#                                                  # and receives on its AMQP connections
#   WORKERS=2 bench/profile.sh ...                 # server.worker_threads (default 1, as
#                                                  # bench/run.sh; 0 = one per core)
#   DEFAULTS=1 bench/profile.sh ...                # Warren's defaults, as a user runs it: no
#                                                  # worker_threads, log level or request limit
#
# With CALLGRIND=1 the counters are zeroed after the warm-up, so the profile
# (bench/callgrind.out) holds the measured requests only; its instruction counts do
# not depend on what else the machine is doing.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-publish}"
requests="${2:-20000}"
concurrency="${3:-16}"
target="${CARGO_TARGET_DIR:-target}"
scripts/ensure-services.sh >/dev/null
cargo build -q --release --bin warren --example warren-profile
dir="$(mktemp -d)"
pid=""
cleanup() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
# WORKERS=none leaves the key out (builds older than server.worker_threads).
workers="worker_threads = ${WORKERS:-1}"; [ "${WORKERS:-}" = none ] && workers=""
warren="${WARREN_BIN:-$target/release/warren}"   # WARREN_BIN: another build to profile
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
tuned="max_concurrent_requests = 100000
$workers"
log='[log]
level = "warn"'
if [ -n "${DEFAULTS:-}" ]; then tuned=""; log=""; fi
cat > "$dir/warren.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
$tuned
[auth]
hs256_secret = "warren-profile-secret-warren-profile-secret"
$log
[tenants.bench]
vhost = "/"
publish = [{ exchange = "warren-bench", routing_key = "#" }]
TOML
token="$("$warren" token --config "$dir/warren.toml" --tenant bench --sub bench --scope publish --ttl 2h)"
if [ -n "${CALLGRIND:-}" ]; then
  valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
    "$warren" serve --config "$dir/warren.toml" 2>"$dir/valgrind.log" &
else
  "$warren" serve --config "$dir/warren.toml" 2>"$dir/warren.log" &
fi
pid=$!
for _ in $(seq 600); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
drive() { "$target/release/examples/warren-profile" --addr "127.0.0.1:$port" --token "$token" --pid "$pid" --kind "$kind" --concurrency "$concurrency" --requests "$1"; }
drive $(( requests / 5 + 1 )) >/dev/null   # warm-up: connections, channels, caches
if [ -n "${CALLGRIND:-}" ]; then callgrind_control --zero "$pid" >/dev/null; fi
if [ -n "${STRACE:-}" ]; then
  strace -c -f -p "$pid" -o "$dir/strace.txt" 2>/dev/null &
  tracer=$!
  sleep 1
fi
# Segments out and in over Warren's TCP connections to the broker (ss -ti).
segs() { ss -tinpH '( dport = :5672 )' | awk -v p="pid=$pid," '
  /users:/ { keep = index($0, p) > 0; next }
  keep { for (i = 1; i <= NF; i++) { split($i, kv, ":"); if (kv[1] == "segs_out") o += kv[2]; if (kv[1] == "segs_in") n += kv[2] } }
  END { print o + 0, n + 0 }'; }
[ -n "${SEGS:-}" ] && read -r out0 in0 < <(segs)
drive "$requests"
if [ -n "${SEGS:-}" ]; then
  read -r out1 in1 < <(segs)
  per=1; [ "$kind" = batch ] && per=100
  awk -v o=$(( out1 - out0 )) -v i=$(( in1 - in0 )) -v m=$(( requests * per )) \
    'BEGIN { printf "AMQP segments per message: %.3f out, %.3f in\n", o / m, i / m }'
fi
if [ -n "${STRACE:-}" ]; then
  kill -INT "$tracer"; wait "$tracer" 2>/dev/null || true
  per=1; [ "$kind" = batch ] && per=100
  awk -v m=$(( requests * per )) '/^[ ]*[0-9]/ && NF>=5 { name=$NF; calls=$4; if ($5 ~ /^[0-9]+$/) {} ; printf "%-16s %8.3f per message\n", name, calls/m }' "$dir/strace.txt" | sort -k2 -nr | head -12
fi
if [ -n "${CALLGRIND:-}" ]; then
  callgrind_control --dump "$pid" >/dev/null
  # The dump (taken before the shutdown writes its own part) holds the measured requests.
  cp "$(ls -t "$dir"/callgrind.out* | head -1)" bench/callgrind.out
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  per=1; [ "$kind" = batch ] && per=100
  total="$(callgrind_annotate bench/callgrind.out 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1; exit}')"
  echo "instructions: $total in all, $(( total / (requests * per) )) per message (bench/callgrind.out; callgrind_annotate --inclusive=yes bench/callgrind.out)"
fi
