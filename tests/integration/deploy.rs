//! The deploy/ artefacts against the running code: every Warren metric that an alert
//! rule or the Grafana dashboard names is actually exported, and the shipped config
//! passes `warren check-config`.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::json;

use crate::common::*;

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("warren_") {
        let start = i + found;
        let preceded_by_word =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if !preceded_by_word {
            let name = &text[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(base.to_owned());
        }
        i = end;
    }
    names
}

#[tokio::test]
async fn every_metric_in_alerts_and_dashboards_is_exported() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut wanted = BTreeSet::new();
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/dashboards/warren.json",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{file} names no warren_ metric");
        wanted.extend(names);
    }

    let (_rabbit, exchange, _queue, _, server, token) = publishing_tenant(|_| {}).await;
    // Exercise the paths whose series appear on first use.
    let body = json!({"exchange": exchange, "routing_key": "k", "payload": 1});
    assert_eq!(server.publish(&token, &body).await.status, 202);
    let keyed = server
        .http
        .post(format!("{}/v1/publish", server.base))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .header("idempotency-key", unique("k"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), 202);
    // A push subscription delivering one message, for the push series.
    let receiver = crate::push::Receiver::healthy().await;
    let (_admin, push_rabbit, push_server, _) =
        crate::push::pushing(&receiver.url, "100", "", "").await;
    crate::push::fill(&push_rabbit, "jobs", 0..1).await;
    let delivered = eventually(std::time::Duration::from_secs(10), || async {
        push_server
            .metrics()
            .await
            .contains("warren_push_attempt_duration_seconds")
    })
    .await;
    assert!(delivered, "the push delivery was counted");
    // A scheduled message firing, for the scheduling series.
    let scheduling = crate::schedule_support::scheduling().await;
    let schedule_server = scheduling.server().await;
    let r = schedule_server
        .publish(
            &scheduling.token(&schedule_server),
            &json!({"exchange": scheduling.exchange, "routing_key": "k", "payload": 1, "delay_ms": 100}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let fired = eventually(std::time::Duration::from_secs(10), || async {
        schedule_server
            .metrics()
            .await
            .contains("warren_schedule_lag_seconds")
    })
    .await;
    assert!(fired, "the scheduled message was counted");
    let mut exported = metric_names(&server.metrics().await);
    exported.extend(metric_names(&push_server.metrics().await));
    exported.extend(metric_names(&schedule_server.metrics().await));
    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "named in deploy/ but not exported: {missing:?}"
    );
    server.shutdown().await.unwrap();
}

#[test]
fn the_shipped_configs_pass_check_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let secrets = root.join("deploy/warren/dev-secrets");
    // The secrets are mounted under /run/secrets there; here they are the examples.
    let shipped = std::fs::read_to_string(root.join("deploy/warren/warren.toml")).unwrap();
    let config = shipped.replace("/run/secrets/", &format!("{}/", secrets.display()));
    assert_ne!(
        config, shipped,
        "the shipped config reads its secrets from files"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warren.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .current_dir(root)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_success(&out);
}
