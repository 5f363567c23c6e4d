#!/usr/bin/env bash
# A throwaway 3-node RabbitMQ cluster beside the machine's own broker, for the
# scale-out tests (tests/solo/cluster.rs) and for trying Warren against a cluster.
#
#   scripts/cluster.sh start            start rabbit2/3/4@localhost and cluster them
#   scripts/cluster.sh stop             stop all three and delete their data
#   scripts/cluster.sh kill N           SIGKILL node N (2, 3 or 4)
#   scripts/cluster.sh restart N        start node N again (after kill or stop-node)
#   scripts/cluster.sh stop-node N      stop node N gracefully
#   scripts/cluster.sh urls             the three AMQP URLs, comma-separated
#   scripts/cluster.sh ctl N ARGS...    rabbitmqctl ARGS against node N
#
# Node N listens for AMQP on 127.0.0.1:568N (distribution on 2568N) with its own
# config file and data directory under $WARREN_CLUSTER_DIR (default
# /tmp/warren-cluster). The nodes run as the `rabbitmq` user (sharing its Erlang
# cookie) through setpriv, because Debian's rabbitmq-server wrapper drops RABBITMQ_*
# variables when it switches user. Needs root (or the rabbitmq user) and Debian's
# rabbitmq-server package.
set -euo pipefail

DIR=${WARREN_CLUSTER_DIR:-/tmp/warren-cluster}
NODES=(2 3 4)
RMQ=/usr/lib/rabbitmq/bin

amqp_port() { echo $((5680 + $1)); }
node_name() { echo "rabbit$1@localhost"; }

as_rabbitmq() {
  if [[ $(id -un) == rabbitmq ]]; then
    env HOME=/var/lib/rabbitmq "$@"
  else
    setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
      env HOME=/var/lib/rabbitmq "$@"
  fi
}

ctl() { as_rabbitmq "$RMQ/rabbitmqctl" -n "$(node_name "$1")" "${@:2}"; }

start_node() {
  local n=$1 base="$DIR/rabbit$1"
  mkdir -p "$base/mnesia" "$base/log"
  cat >"$base/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
loopback_users = none
# The scale-out tests write little; a low watermark on a shared machine would block them.
vm_memory_high_watermark.relative = 0.8
disk_free_limit.absolute = 50MB
CONF
  echo "[]." >"$base/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$base" 2>/dev/null || true
  # Enough descriptors for many connections (root's default gives ~1,000).
  ulimit -n 65536 2>/dev/null || true
  as_rabbitmq env \
    RABBITMQ_NODENAME="$(node_name "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
    RABBITMQ_DIST_PORT=$((25680 + n)) \
    RABBITMQ_CONFIG_FILE="$base/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$base/mnesia" \
    RABBITMQ_LOG_BASE="$base/log" \
    RABBITMQ_PID_FILE="$base/pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none" \
    "$RMQ/rabbitmq-server" -detached
}

wait_node() {
  local n=$1
  for _ in $(seq 1 120); do
    if ctl "$n" await_startup --timeout 5 >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "node $(node_name "$n") did not start; see $DIR/rabbit$n/log" >&2
  return 1
}

case "${1:-}" in
  start)
    for n in "${NODES[@]}"; do
      if ctl "$n" status >/dev/null 2>&1; then continue; fi
      start_node "$n"
    done
    for n in "${NODES[@]}"; do wait_node "$n"; done
    for n in 3 4; do
      if ctl "$n" cluster_status 2>/dev/null | grep -q "$(node_name 2)"; then continue; fi
      ctl "$n" stop_app >/dev/null
      ctl "$n" join_cluster "$(node_name 2)" >/dev/null
      ctl "$n" start_app >/dev/null
    done
    # Quorum queues by default for new queues would need a policy per vhost; the
    # tests declare x-queue-type explicitly.
    echo "cluster up: $("$0" urls)"
    ;;
  stop)
    for n in "${NODES[@]}"; do
      ctl "$n" stop >/dev/null 2>&1 || true
      pkill -9 -f "rabbit$n@localhost" 2>/dev/null || true
    done
    rm -rf "$DIR"
    ;;
  kill)
    pid=$(cat "$DIR/rabbit$2/pid" 2>/dev/null || true)
    if [[ -z $pid ]]; then pid=$(pgrep -f "nodename rabbit$2@localhost|-sname rabbit$2@localhost" | head -1); fi
    kill -9 "$pid"
    ;;
  stop-node)
    ctl "$2" stop >/dev/null
    ;;
  restart)
    start_node "$2"
    wait_node "$2"
    ;;
  ctl)
    ctl "$2" "${@:3}"
    ;;
  urls)
    urls=()
    for n in "${NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"); done
    (IFS=,; echo "${urls[*]}")
    ;;
  *)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
