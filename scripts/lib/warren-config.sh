# shellcheck shell=bash
# Sourced by the scripts that start a Warren of their own (api-contract.sh,
# browser-test.sh, soak.sh): the one config they share.
#
#   write_warren_config FILE PORT TENANT [EXCHANGE ROUTING_KEY]
#
# writes FILE: Warren on 127.0.0.1:PORT with a 5 s shutdown grace, the broker of
# WARREN_TEST_AMQP_URL (the tests' broker; default amqp://guest:guest@127.0.0.1:5672),
# a fresh random HS256 secret, and TENANT on vhost "/" allowed to publish and
# subscribe on EXCHANGE with ROUTING_KEY (default: every exchange, every key).
write_warren_config() {
  local file=$1 port=$2 tenant=$3 exchange=${4:-*} routing_key=${5:-#} secret
  secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  cat >"$file" <<TOML
[server]
listen = "127.0.0.1:$port"
shutdown_grace_s = 5
[amqp]
url = "${WARREN_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}"
[auth]
hs256_secret = "$secret"
[tenants.$tenant]
vhost = "/"
publish = [{ exchange = "$exchange", routing_key = "$routing_key" }]
subscribe = [{ exchange = "$exchange", routing_key = "$routing_key" }]
TOML
}
