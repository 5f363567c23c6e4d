"""Parses every YAML, JSON and TOML file under deploy/ and cross-checks them (run by
deploy/check.sh from the repository root):

- the Kubernetes ConfigMap carries the same Warren config as the compose one;
- tenants' vhosts and exchanges exist in deploy/rabbitmq/definitions.json;
- the example secret satisfies Warren's rules;
- every warren_* metric named in alerts and dashboards is defined in src/;
- every alert has a severity, summary, description and a runbook that resolves to a
  heading of docs/src/operations/alerts.md;
- the kustomization lists only files that exist, and never the example Secret.

It writes every dashboard query as a recording rule to the file named by its one
argument, for promtool to check the PromQL. Exits 1 on any failure.
"""
import json
import pathlib
import re
import sys
import tomllib

import yaml

failures = []


def fail(message):
    failures.append(message)
    print(f"FAIL {message}")


root = pathlib.Path("deploy")
parsed = {}
for path in sorted(root.rglob("*")):
    if not path.is_file():
        continue
    try:
        if path.suffix in (".yml", ".yaml"):
            parsed[path] = list(yaml.safe_load_all(path.read_text()))
        elif path.suffix == ".json":
            parsed[path] = json.loads(path.read_text())
        elif path.suffix == ".toml":
            parsed[path] = tomllib.loads(path.read_text())
        else:
            continue
        print(f"ok   {path}")
    except Exception as e:  # noqa: BLE001 - report every broken file
        fail(f"{path}: {e}")

if failures:
    sys.exit(1)

# The Kubernetes ConfigMap and the compose config must not drift apart.
compose_cfg = parsed[root / "warren/warren.toml"]
(configmap,) = parsed[root / "kubernetes/configmap.yaml"]
if tomllib.loads(configmap["data"]["warren.toml"]) != compose_cfg:
    fail("kubernetes/configmap.yaml warren.toml differs from warren/warren.toml")

# Tenants point at vhosts the broker definitions create, and at exchanges and queues
# that the definitions or the tenant's own topology (Warren's config, SPEC §11) declare.
# Warren's broker user may configure (declare) every object of that topology.
defs = parsed[root / "rabbitmq/definitions.json"]
vhosts = {v["name"] for v in defs["vhosts"]}
exchanges = {(e["vhost"], e["name"]) for e in defs["exchanges"]}
queues = {(q["vhost"], q["name"]) for q in defs["queues"]}
configure = {p["vhost"]: p["configure"] for p in defs["permissions"] if p["user"] == "warren"}
for name, tenant in compose_cfg.get("tenants", {}).items():
    vhost = tenant["vhost"]
    if vhost not in vhosts:
        fail(f"tenant {name}: vhost {vhost!r} is not in rabbitmq/definitions.json")
    declared = [x["name"] for x in tenant.get("exchanges", [])]
    exchanges |= {(vhost, x) for x in declared}
    for q in tenant.get("queues", []):
        declared.append(q["name"])
        delays = q.get("retry", {}).get("delays_ms", [])
        declared += [f"{q['name']}.retry.{i + 1}" for i in range(len(delays))]
        declared += [f"{q['name']}.dlq"] if delays else []
        queues.add((vhost, q["name"]))
    for obj in declared:
        if not re.search(configure.get(vhost, "^$"), obj):
            fail(f"tenant {name}: user warren may not configure {obj!r} in vhost {vhost!r}")
    for kind in ("publish", "subscribe"):
        for grant in tenant.get(kind, []):
            if "queue" in grant:
                if grant["queue"] != "*" and (vhost, grant["queue"]) not in queues:
                    fail(f"tenant {name}: {kind} queue {grant['queue']!r} is not declared in vhost {vhost!r}")
                continue
            if "stream" in grant:
                continue
            ex = grant["exchange"]
            if ex not in ("*", "") and not ex.startswith("amq.") and (vhost, ex) not in exchanges:
                fail(f"tenant {name}: {kind} exchange {ex!r} is not declared in vhost {vhost!r}")

# The example secrets satisfy Warren's rules.
secret = (root / "warren/dev-secrets/warren_hs256").read_bytes().rstrip()
if len(secret) < 32:
    fail("warren/dev-secrets/warren_hs256 is shorter than 32 bytes")

# Only metrics Warren defines (string literals in src/) may be alerted on or graphed.
defined = set()
for src in pathlib.Path("src").rglob("*.rs"):
    defined |= set(re.findall(r'"(warren_[a-z0-9_]+)"', src.read_text()))
alerts_text = (root / "prometheus/alerts.yml").read_text()
dashboard_texts = {p: p.read_text() for p in (root / "grafana/dashboards").glob("*.json")}
for path, text in [(root / "prometheus/alerts.yml", alerts_text), *dashboard_texts.items()]:
    for metric in sorted(set(re.findall(r"\b(warren_[a-z0-9_]+)", text))):
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        if metric not in defined and base not in defined:
            fail(f"{path}: {metric} is not a metric defined in src/")

# Every dashboard query, with Grafana's variables filled in, becomes a recording rule
# so that promtool can check its PromQL.
rules = []
for path in dashboard_texts:
    dashboard = parsed[path]
    seen_ids = set()
    for panel in dashboard["panels"]:
        if panel["id"] in seen_ids:
            fail(f"{path}: duplicate panel id {panel['id']}")
        seen_ids.add(panel["id"])
        for target in panel.get("targets", []):
            expr = target["expr"]
            expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
            expr = re.sub(r"\$\{?[a-z_]+\}?", ".*", expr)
            rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
with open(sys.argv[1], "w") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard_queries", "rules": rules}]}, f)

# Runbook links: every alert's runbook is a section of the alerts page of the book.
RUNBOOK_PAGE = "docs/src/operations/alerts.md"
runbook_page = pathlib.Path(RUNBOOK_PAGE)
if not runbook_page.exists():
    fail(f"{RUNBOOK_PAGE} does not exist: alert runbook links cannot resolve")
else:
    # The slug rules of scripts/check_links.py (GitHub's and mdBook's).
    def slug(heading):
        s = heading.strip().lower()
        s = "".join(c for c in s if c.isalnum() or c in "-_ ")
        return s.replace(" ", "-")

    page_text = runbook_page.read_text()
    anchors = {slug(h) for h in re.findall(r"^#+\s+(.+?)\s*#*$", page_text, re.M)}
    anchors |= set(re.findall(r'<a\s+(?:name|id)="([^"]+)"', page_text))
    (alert_doc,) = parsed[root / "prometheus/alerts.yml"]
    for group in alert_doc["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            runbook = rule.get("annotations", {}).get("runbook", "")
            page, _, anchor = runbook.partition("#")
            if page != RUNBOOK_PAGE or anchor not in anchors:
                fail(f"alert {rule['alert']}: runbook {runbook!r} has no matching heading in {RUNBOOK_PAGE}")

# Every alert carries what on-call needs.
(alert_doc,) = parsed[root / "prometheus/alerts.yml"]
for group in alert_doc["groups"]:
    for rule in group["rules"]:
        if "alert" not in rule:
            continue
        if "severity" not in rule.get("labels", {}):
            fail(f"alert {rule['alert']}: no severity label")
        for key in ("summary", "description", "runbook"):
            if key not in rule.get("annotations", {}):
                fail(f"alert {rule['alert']}: no {key} annotation")

# The example Secret must never be applied by kustomize.
(kustomization,) = parsed[root / "kubernetes/kustomization.yaml"]
for resource in kustomization["resources"]:
    if not (root / "kubernetes" / resource).exists():
        fail(f"kubernetes/kustomization.yaml lists missing {resource}")
    if "example" in resource:
        fail(f"kubernetes/kustomization.yaml must not list {resource}")

sys.exit(1 if failures else 0)
