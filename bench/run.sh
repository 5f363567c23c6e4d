#!/usr/bin/env bash
# Builds Warren and the load generator in release and runs every measurement once
# (see BENCHMARKS.md) against RabbitMQ on 127.0.0.1 (5672, 15672; guest/guest), which
# scripts/ensure-services.sh starts and gives its management plugin. Extra arguments
# go to the load generator, e.g.
#   bench/run.sh --levels 1,16,64 --seconds 3
#   bench/run.sh --only publish,stomp
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
scripts/ensure-services.sh   # RabbitMQ up, management plugin enabled
# The `stomp` section compares with RabbitMQ's Web-STOMP (ws://127.0.0.1:15674/ws).
if ! (exec 3<>/dev/tcp/127.0.0.1/15674) 2>/dev/null; then
  echo "Enabling rabbitmq_web_stomp..." >&2
  rabbitmq-plugins enable rabbitmq_web_stomp >/dev/null
  for _ in $(seq 60); do
    (exec 3<>/dev/tcp/127.0.0.1/15674) 2>/dev/null && break
    sleep 1
  done
fi
# The `external` section measures as a user would: wrk and h2load (nghttp2) from Debian.
if ! command -v wrk >/dev/null || ! command -v h2load >/dev/null; then
  echo "Installing wrk and h2load (Debian packages wrk, nghttp2-client)..." >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk nghttp2-client >/dev/null
fi
cargo build --release --bin warren --example warren-bench --example warren-thin-relay
# 10,000 sockets on each side of the memory test: raise the descriptor limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
"$target/release/examples/warren-bench" --warren "$target/release/warren" "$@" | tee bench/results.txt
# The kernel's share of one fan-out delivery on this machine (BENCHMARKS.md, fan-out).
python3 bench/send_floor.py | tee -a bench/results.txt
