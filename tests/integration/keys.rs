//! Token keys under a running Warren: a JWKS file rotated without a restart, a JWKS URL
//! refetched for an unknown kid at most once per interval, failing or unreachable
//! identity providers, and `warren token` without an HMAC secret.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::common::*;

fn key_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

/// A JWKS document with the committed test keys of these kids.
fn jwks_of(kids: &[&str]) -> Value {
    let all: Value =
        serde_json::from_slice(&std::fs::read(key_file("jwks.json")).unwrap()).unwrap();
    let keys: Vec<Value> = all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
        .cloned()
        .collect();
    assert_eq!(keys.len(), kids.len(), "unknown test kid in {kids:?}");
    json!({ "keys": keys })
}

/// Replaces `path` in one step, as config management (or a Kubernetes volume) does.
fn write_atomically(path: &Path, doc: &Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, doc.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// An RS256 token for `tenant`, signed with test key `key`, naming `kid`.
fn rs256(tenant: &str, kid: &str, key: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let pem = std::fs::read(key_file(&format!("{key}.key.pem"))).unwrap();
    jsonwebtoken::encode(
        &header,
        &json!({"sub": "idp-user", "tenant": tenant, "scope": "publish", "exp": exp}),
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

async fn status(server: &TestServer, token: &str) -> u16 {
    let body = json!({"exchange": "amq.topic", "routing_key": "keys.test", "payload": 1, "mandatory": false});
    let r = server.post("/v1/publish", Some(token), &body).await;
    if r.status == 401 {
        assert_eq!(r.code(), "unauthorized", "{:?}", r.body);
    }
    r.status
}

/// A stand-in identity provider: serves `/jwks` with a settable status and document
/// and counts the requests.
struct JwksServer {
    url: String,
    hits: Arc<AtomicUsize>,
    answer: Arc<Mutex<(u16, Value)>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Idp {
    hits: Arc<AtomicUsize>,
    answer: Arc<Mutex<(u16, Value)>>,
}

async fn serve_jwks(State(idp): State<Idp>) -> (StatusCode, axum::Json<Value>) {
    idp.hits.fetch_add(1, Ordering::SeqCst);
    let (status, doc) = idp.answer.lock().unwrap().clone();
    (StatusCode::from_u16(status).unwrap(), axum::Json(doc))
}

impl JwksServer {
    async fn start(status: u16, doc: Value) -> Self {
        let idp = Idp {
            hits: Arc::new(AtomicUsize::new(0)),
            answer: Arc::new(Mutex::new((status, doc))),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/jwks", get(serve_jwks))
            .with_state(idp.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            hits: idp.hits,
            answer: idp.answer,
            task,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn answer(&self, status: u16, doc: Value) {
        *self.answer.lock().unwrap() = (status, doc);
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_rewritten_jwks_file_rotates_keys_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_atomically(&path, &jwks_of(&["rsa-a"]));
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.auth.jwks_file = Some(path.clone());
    config.auth.jwks_refresh_s = 1;
    let server = TestServer::start_ready(config).await;
    let old = rs256(&tenant, "rsa-a", "rsa-a");
    let new = rs256(&tenant, "rsa-b", "rsa-b");
    assert_eq!(status(&server, &old).await, 202);
    // Not in the file yet. (This unknown kid also spends the unknown-kid refresh for the
    // next 30 s: what follows is the periodic check's doing.)
    assert_eq!(status(&server, &new).await, 401);

    // Rotation step 1: publish the new key next to the old one. Both work.
    write_atomically(&path, &jwks_of(&["rsa-a", "rsa-b"]));
    let picked_up = eventually(Duration::from_secs(10), || async {
        status(&server, &new).await == 202
    })
    .await;
    assert!(picked_up, "the new key was not picked up from the file");
    assert_eq!(
        status(&server, &old).await,
        202,
        "the old key during the overlap"
    );

    // Step 2: remove the old key. Its tokens stop working, the new ones keep working.
    write_atomically(&path, &jwks_of(&["rsa-b"]));
    let retired = eventually(Duration::from_secs(10), || async {
        status(&server, &old).await == 401
    })
    .await;
    assert!(retired, "the removed key still verifies tokens");
    assert_eq!(status(&server, &new).await, 202);

    // A broken write keeps the last good keys (the failed reload shows in the metrics).
    std::fs::write(&path, "{ half a document").unwrap();
    let failed_reload = eventually(Duration::from_secs(10), || async {
        server.metrics().await.lines().any(|l| {
            l.starts_with("warren_auth_key_reloads_total")
                && l.contains("source=\"file\"")
                && l.contains("outcome=\"error\"")
        })
    })
    .await;
    assert!(failed_reload, "the broken file was never read");
    assert_eq!(status(&server, &new).await, 202, "after a broken rewrite");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_jwks_url_is_refetched_for_an_unknown_kid_at_most_once_per_interval() {
    let idp = JwksServer::start(200, jwks_of(&["rsa-a"])).await;
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.auth.jwks_url = Some(idp.url.clone());
    config.auth.jwks_refresh_s = 3600;
    config.auth.jwks_min_refetch_s = 2;
    let started = Instant::now();
    let server = TestServer::start_ready(config).await;
    assert_eq!(idp.hits(), 1, "one fetch at start");
    // Fetches after the first are at least 2 s apart, so within `elapsed` there can be
    // at most elapsed / 2 of them, however many requests asked.
    let at_most = |started: Instant| 1 + (started.elapsed().as_secs_f64() / 2.0).floor() as usize;

    assert_eq!(
        status(&server, &rs256(&tenant, "rsa-a", "rsa-a")).await,
        202
    );
    assert_eq!(idp.hits(), 1, "a known kid costs no fetch");

    // A burst of made-up kids, concurrently and in a row.
    let burst: Vec<String> = (0..40)
        .map(|i| rs256(&tenant, &format!("made-up-{i}"), "rsa-b"))
        .collect();
    let answers =
        futures::future::join_all(burst.iter().take(20).map(|t| status(&server, t))).await;
    assert!(answers.iter().all(|s| *s == 401), "{answers:?}");
    for token in &burst[20..] {
        assert_eq!(status(&server, token).await, 401);
    }
    let hits = idp.hits();
    assert!(
        hits <= at_most(started),
        "{hits} fetches for 40 unknown kids within {:?}",
        started.elapsed()
    );

    // The provider rotates in a new key: a token naming it is accepted as soon as the
    // interval allows a refetch, with no restart and no periodic refresh (1 h).
    idp.answer(200, jwks_of(&["rsa-a", "rsa-b"]));
    let new = rs256(&tenant, "rsa-b", "rsa-b");
    let accepted = eventually(Duration::from_secs(10), || async {
        status(&server, &new).await == 202
    })
    .await;
    assert!(accepted, "the new kid was never fetched");
    let hits = idp.hits();
    assert!(hits >= 2 && hits <= at_most(started), "{hits} fetches");

    // The provider breaks: a failed fetch keeps the last good keys.
    idp.answer(500, json!({"error": "down"}));
    let unknown = rs256(&tenant, "made-up-again", "rsa-b");
    let failed_fetch = eventually(Duration::from_secs(10), || async {
        status(&server, &unknown).await;
        idp.hits() > hits
    })
    .await;
    assert!(failed_fetch, "no refetch while the provider fails");
    assert_eq!(status(&server, &new).await, 202);
    assert_eq!(
        status(&server, &rs256(&tenant, "rsa-a", "rsa-a")).await,
        202
    );
    let metrics = server.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("warren_auth_key_reloads_total")
                && l.contains("source=\"url\"")
                && l.contains("outcome=\"error\"")),
        "{metrics}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failing_jwks_url_at_start_is_retried_until_it_answers() {
    let idp = JwksServer::start(503, json!({})).await;
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.auth.jwks_url = Some(idp.url.clone());
    config.auth.jwks_refresh_s = 3600;
    config.auth.jwks_min_refetch_s = 1;
    let server = TestServer::start_ready(config).await;
    let token = rs256(&tenant, "rsa-a", "rsa-a");
    assert_eq!(status(&server, &token).await, 401);
    // The HS256 secret of the test config still works meanwhile.
    assert_eq!(
        status(&server, &server.token(&tenant, "publish")).await,
        202
    );
    idp.answer(200, jwks_of(&["rsa-a"]));
    let recovered = eventually(Duration::from_secs(10), || async {
        status(&server, &token).await == 202
    })
    .await;
    assert!(recovered, "the keys never arrived");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unanswering_jwks_url_does_not_hold_up_start() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    let black_hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.auth.jwks_url = Some(url);
    config.auth.jwks_timeout_ms = 500;
    let started = Instant::now();
    let server = TestServer::start(config).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "start took {took:?}");
    server.shutdown().await.unwrap();
    black_hole.abort();
}

#[test]
fn warren_token_needs_an_hmac_secret() {
    const BIN: &str = env!("CARGO_BIN_EXE_warren");
    let dir = tempfile::tempdir().unwrap();
    let config = |auth: &str| {
        let path = dir.path().join("warren.toml");
        std::fs::write(
            &path,
            format!(
                "[amqp]\nurl = \"{}\"\n[auth]\n{auth}\n[tenants.acme]\nvhost = \"/\"\n",
                broker_url()
            ),
        )
        .unwrap();
        path
    };
    let jwks_only = config(&format!("jwks_file = {:?}", key_file("jwks.json")));
    let out = std::process::Command::new(BIN)
        .args(["token", "--tenant", "acme", "--sub", "s", "--config"])
        .arg(&jwks_only)
        .output()
        .unwrap();
    assert_failure_mentions(&out, "no HMAC secret");

    // With an hs_secrets entry, the token carries its algorithm and kid.
    let hs384 = config(
        "hs_secrets = [{ kid = \"2025-06\", alg = \"HS384\", \
         secret = \"a-48-byte-secret-for-hs384-0123456789abcdef01234\" }]",
    );
    let out = std::process::Command::new(BIN)
        .args(["token", "--tenant", "acme", "--sub", "s", "--config"])
        .arg(&hs384)
        .output()
        .unwrap();
    assert_success(&out);
    let token = String::from_utf8(out.stdout).unwrap();
    let header = jsonwebtoken::decode_header(token.trim()).unwrap();
    assert_eq!(
        (header.alg, header.kid.as_deref()),
        (Algorithm::HS384, Some("2025-06"))
    );

    // check-config names a bad key setting.
    let bad = config(&format!(
        "public_key_files = [{{ kid = \"k\", alg = \"ES256\", file = {:?} }}]",
        key_file("rsa-a.pub.pem")
    ));
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_failure_mentions(&out, "auth.public_key_files[0].file");
}
