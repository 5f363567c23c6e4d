#!/usr/bin/env bash
# Static checks for everything under deploy/ plus the Dockerfile. No Docker daemon,
# cluster, broker or network needed (except to install promtool when it is missing).
#
#   bash deploy/check.sh
#
# Checks:
#   - promtool: Prometheus config, alerting rules, and the rules' unit tests
#   - every *.yml / *.yaml (all documents), *.json and *.toml under deploy/ parses
#   - the Kubernetes ConfigMap carries the same Warren config as the compose one
#   - tenants' vhosts and exchanges exist in deploy/rabbitmq/definitions.json
#   - every warren_* metric named in alerts and dashboards is defined in src/
#   - every dashboard query is valid PromQL
#   - runbook links resolve to headings of docs/src/operations/alerts.md
#   - kustomize build, `docker compose config` and hadolint, when those tools exist
#
# It does not run warren: `warren check-config` is run by the project's CI.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*"; }

# ---- promtool --------------------------------------------------------------------
if ! command -v promtool >/dev/null 2>&1; then
    step "installing promtool (Debian package prometheus)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    # The package starts a Prometheus server where services may start; stop any that
    # was not running before the install.
    before="$(pgrep -x prometheus || true)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    $SUDO systemctl stop prometheus >/dev/null 2>&1 || true
    for pid in $(pgrep -x prometheus || true); do
        if ! grep -qx "$pid" <<<"$before"; then
            $SUDO kill "$pid" || true
        fi
    done
fi

step "promtool check config"
promtool check config deploy/prometheus/prometheus.yml

step "promtool check rules"
promtool check rules deploy/prometheus/alerts.yml

step "promtool test rules"
promtool test rules deploy/prometheus/alerts.test.yml

# ---- files parse and agree with each other ---------------------------------------
step "parsing deploy/ files and cross-checking them"
if ! python3 -c 'import yaml' 2>/dev/null; then
    python3 -m pip install -q pyyaml
fi

dashboard_rules="$(mktemp --suffix=.yml)"
trap 'rm -f "$dashboard_rules"' EXIT

python3 deploy/check.py "$dashboard_rules"

step "promtool check rules (dashboard queries)"
promtool check rules "$dashboard_rules"

# ---- optional tools ----------------------------------------------------------------
step "kustomize build"
if command -v kubectl >/dev/null 2>&1; then
    kubectl kustomize deploy/kubernetes >/dev/null
    echo "ok   deploy/kubernetes"
else
    echo "skip: kubectl not installed"
fi

step "docker compose config"
if docker compose version >/dev/null 2>&1; then
    docker compose -f deploy/docker-compose.yml config --quiet
    echo "ok   deploy/docker-compose.yml"
else
    echo "skip: docker compose not installed"
fi

step "hadolint"
if command -v hadolint >/dev/null 2>&1; then
    hadolint Dockerfile
    echo "ok   Dockerfile"
else
    echo "skip: hadolint not installed"
fi

printf '\nAll deploy checks passed.\n'
