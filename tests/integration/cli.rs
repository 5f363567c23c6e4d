//! The `warren` binary: dev mode, check-config, token, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_warren");

fn write_config(dir: &tempfile::TempDir, body: &str) -> std::path::PathBuf {
    let path = dir.path().join("warren.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn valid_config(tenant: &str, listen: &str) -> String {
    format!(
        "[server]\nlisten = \"{listen}\"\nshutdown_grace_s = 5\n\
         [amqp]\nurl = \"{}\"\n[auth]\nhs256_secret = \"{SECRET}\"\n\
         [tenants.{tenant}]\nvhost = \"/\"\npublish = [{{ exchange = \"*\", routing_key = \"#\" }}]\n",
        broker_url()
    )
}

/// Kills the child when the test ends, whatever happens.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads stdout/stderr lines until one contains `needle` (or the deadline passes).
fn wait_for_line(reader: impl std::io::Read + Send + 'static, needle: &str) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if line.contains(&needle) {
                let _ = tx.send(line);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20)).ok()
}

#[test]
fn check_config_accepts_good_and_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(&dir, &valid_config("acme", "127.0.0.1:0"));
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_success(&out);

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        valid_config("acme", "127.0.0.1:0").replace("vhost = \"/\"", "vhost = 5"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_failure_mentions(&out, "tenants.acme.vhost");

    // Environment overrides apply, and their errors name the key too.
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(&good)
        .env("WARREN_SERVER__MAX_BODY_BYTES", "lots")
        .output()
        .unwrap();
    assert_failure_mentions(&out, "server.max_body_bytes");
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(&good)
        .env("WARREN_SERVER__MAX_BODY_BYTES", "0")
        .output()
        .unwrap();
    assert!(!out.status.success(), "override to 0 must be rejected");

    let out = Command::new(BIN)
        .args(["check-config", "/nonexistent/warren.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn minted_token_is_accepted_by_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let tenant = unique("t");
    let path = write_config(&dir, &valid_config(&tenant, "127.0.0.1:0"));
    let out = Command::new(BIN)
        .args(["token", "--config"])
        .arg(&path)
        .args([
            "--tenant", &tenant, "--sub", "ci", "--scope", "publish", "--ttl", "5m",
        ])
        .output()
        .unwrap();
    assert_success(&out);
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let server = TestServer::start_ready(tenant_config(&tenant, "*", "#")).await;
    server
        .publish_fire_and_forget(&token, "amq.topic", "k")
        .await;
    server.shutdown().await.unwrap();

    let out = Command::new(BIN)
        .args(["token", "--config"])
        .arg(&path)
        .args(["--tenant", "unknown", "--sub", "ci"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn dev_mode_prints_a_token_and_a_curl_line_that_works() {
    let port = closed_port().await;
    let child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Guard(child);
    let stdout = child.0.stdout.take().unwrap();
    let line = wait_for_line(stdout, "export TOKEN=").expect("dev mode prints a token");
    let token = line.trim().trim_start_matches("export TOKEN=").to_owned();

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let ready = eventually(Duration::from_secs(10), || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready);
    // The exact body the banner prints.
    let response = http
        .post(format!("{base}/v1/publish"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(r#"{"exchange":"amq.topic","routing_key":"demo.hello","payload":{"hello":"world"},"mandatory":false}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

#[test]
fn a_port_in_use_exits_non_zero_with_one_line_and_no_panic() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &valid_config("acme", &addr));
    // The panic at exit came about every other run: try several.
    for attempt in 0..6 {
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "attempt {attempt}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "attempt {attempt}: {stderr}");
        assert!(
            lines[0].contains(&format!("cannot listen on {addr} (server.listen)")),
            "{stderr}"
        );
    }
}

#[test]
fn sigterm_exits_cleanly_within_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &valid_config("acme", "127.0.0.1:0"));
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .env("RUST_LOG", "info")
        .spawn()
        .unwrap();
    let mut child = Guard(child);
    let stderr = child.0.stderr.take().unwrap();
    wait_for_line(stderr, "Warren is listening").expect("server starts");

    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(7);
    let exit = loop {
        if let Some(exit) = child.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "did not exit within the grace period"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[tokio::test]
async fn json_logs_carry_request_id_tenant_and_outcome_and_metrics_have_their_own_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics_port) = (closed_port().await, closed_port().await);
    let tenant = unique("t");
    let config = format!(
        "{}[log]\nformat = \"json\"\nlevel = \"info\"\naccess = true\n",
        valid_config(&tenant, &format!("127.0.0.1:{port}")).replace(
            "shutdown_grace_s = 5\n",
            &format!("shutdown_grace_s = 5\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n"),
        )
    );
    let logged = WarrenProcess::start(&dir, &config, &tenant, port, 200).await;
    let (http, base, token, log) = (&logged.http, &logged.base, &logged.token, &logged.log);
    let response = http
        .post(format!("{base}/v1/publish"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("x-request-id", "req-for-the-log-test")
        .body(
            r#"{"exchange":"amq.topic","routing_key":"nobody","payload":{"secret":"do-not-log"}}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);

    // Metrics on their own listener, not on the API one.
    let metrics = http
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(
        metrics
            .text()
            .await
            .unwrap()
            .contains("warren_publish_total")
    );
    assert_eq!(
        http.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let found = eventually(Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines()
            .any(|line| line.contains("req-for-the-log-test") && line.contains("\"status\":422"))
    })
    .await;
    let text = std::fs::read_to_string(log).unwrap();
    assert!(found, "no response log line for the request:\n{text}");
    for line in text.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(value.get("level").is_some(), "{line}");
    }
    let line = text
        .lines()
        .find(|l| l.contains("req-for-the-log-test") && l.contains("\"status\":422"))
        .unwrap();
    assert!(line.contains(&format!("\"tenant\":\"{tenant}\"")), "{line}");
    assert!(line.contains("\"outcome\":\"unroutable\""), "{line}");
    assert!(
        !text.contains("do-not-log"),
        "a message body reached the log"
    );
    assert!(!text.contains(token.as_str()), "a token reached the log");

    // Shutting down closes the broker link on purpose: said once at info, not
    // reported as a link loss.
    let mut logged = logged;
    assert!(logged.terminate().success());
    let text = std::fs::read_to_string(&logged.log).unwrap();
    assert!(
        text.contains("Broker link closed by Warren"),
        "the close is not logged:\n{text}"
    );
    assert!(
        !text.contains("Broker link down"),
        "a shutdown was logged as a lost link:\n{text}"
    );
}

#[tokio::test]
async fn without_log_access_a_request_logs_no_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port().await;
    let tenant = unique("t");
    let config = format!(
        "{}[log]\nformat = \"json\"\nlevel = \"info\"\n",
        valid_config(&tenant, &format!("127.0.0.1:{port}"))
    );
    let mut logged = WarrenProcess::start(&dir, &config, &tenant, port, 200).await;
    let response = logged
        .http
        .post(format!("{}/v1/publish", logged.base))
        .bearer_auth(&logged.token)
        .header("content-type", "application/json")
        .header("x-request-id", "req-not-logged")
        .body(r#"{"exchange":"amq.topic","routing_key":"nobody","payload":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert!(logged.terminate().success());
    let text = std::fs::read_to_string(&logged.log).unwrap();
    // The log is written (the shutdown line), but no line per request.
    assert!(text.contains("Broker link closed by Warren"), "{text}");
    assert!(!text.contains("req-not-logged"), "{text}");
    assert!(!text.contains("/v1/publish"), "{text}");
}

#[tokio::test]
async fn a_broker_outage_logs_one_line_per_request_not_an_error_each() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port().await;
    let tenant = unique("t");
    let unreachable = format!("amqp://guest:guest@127.0.0.1:{}", closed_port().await);
    let config = format!(
        "{}[log]\nformat = \"json\"\nlevel = \"info\"\naccess = true\n",
        valid_config(&tenant, &format!("127.0.0.1:{port}")).replace(&broker_url(), &unreachable)
    );
    let logged = WarrenProcess::start(&dir, &config, &tenant, port, 503).await;
    for n in 0..20 {
        let response = logged
            .http
            .post(format!("{}/v1/publish", logged.base))
            .bearer_auth(&logged.token)
            .header("content-type", "application/json")
            .header("x-request-id", format!("outage-{n}"))
            .body(r#"{"exchange":"amq.topic","routing_key":"k","payload":1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
    }
    let answered = eventually(Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&logged.log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("outage-") && l.contains("\"status\":503"))
            .count()
            == 20
    })
    .await;
    let text = std::fs::read_to_string(&logged.log).unwrap();
    assert!(answered, "one response line per request:\n{text}");
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("outage-") && l.contains("\"level\":\"ERROR\""))
        .collect();
    assert!(
        errors.is_empty(),
        "{} of 20 503s during an outage logged at ERROR, e.g. {}",
        errors.len(),
        errors[0]
    );
}
