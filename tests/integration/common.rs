//! Test harness: a real Warren on port 0 against the real RabbitMQ, a test-side AMQP
//! client for topology and inspection, and helpers that wait with deadlines. What a
//! fixture creates on the broker it deletes when dropped, so a failing test cleans up
//! too.

use std::future::Future;
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warren::auth::{TokenRequest, mint};
use warren::config::Config;
use warren::{App, AppState};

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

pub fn broker_url() -> String {
    std::env::var("WARREN_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".to_owned())
}

/// [`broker_url`] in three parts: `scheme://user:pass@`, `host:port` (with the
/// scheme's default port when it has none) and the rest (`/vhost?options`).
fn broker_url_parts() -> (String, String, String) {
    let url = broker_url();
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url.as_str()));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => (format!("{userinfo}@"), host),
        None => (String::new(), authority),
    };
    let has_port = host
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    let host = if has_port {
        host.to_owned()
    } else {
        let port = if scheme == "amqps" { 5671 } else { 5672 };
        format!("{host}:{port}")
    };
    (format!("{scheme}://{userinfo}"), host, tail.to_owned())
}

/// The broker's `host:port`, for proxies that stand in front of it.
pub fn broker_addr() -> String {
    broker_url_parts().1
}

/// [`broker_url`] through a proxy on `127.0.0.1:port`: same credentials and vhost.
pub fn broker_url_via(port: u16) -> String {
    let (prefix, _, tail) = broker_url_parts();
    format!("{prefix}127.0.0.1:{port}{tail}")
}

/// Runs `work` to completion from a `Drop`, which cannot await: on a thread of its
/// own with its own runtime (the test's may be single-threaded, blocked right here,
/// or unwinding from a panic), within `deadline`.
fn run_detached<F>(deadline: Duration, work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let _ = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let _ = tokio::time::timeout(deadline, work).await;
        });
    })
    .join();
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("wt-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A config with the test secret, the local broker, and the given tenant tables.
pub fn config(extra: &str) -> Config {
    let text = format!(
        "[auth]\nhs256_secret = \"{SECRET}\"\n[amqp]\nurl = \"{}\"\n{extra}",
        broker_url()
    );
    Config::from_toml(&text).expect("test config parses")
}

/// One tenant on vhost `/` that may publish anything on `exchange` (`*` for all).
pub fn tenant_config(tenant: &str, exchange: &str, routing_key: &str) -> Config {
    config(&format!(
        "[tenants.{tenant}]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"{exchange}\", routing_key = \"{routing_key}\" }}]\n"
    ))
}

/// The usual publishing setup: a fresh topic exchange, a queue bound to all of it
/// (`#`), a new tenant that may publish anything on it, Warren started ready with that
/// tenant's config after `edit`, and a publish token for the tenant:
/// `(rabbit, exchange, queue, tenant, server, token)`.
pub async fn publishing_tenant(
    edit: impl FnOnce(&mut Config),
) -> (Rabbit, String, String, String, TestServer, String) {
    publishing_on("#", "#", edit).await
}

/// Like [`publishing_tenant`], with the queue bound by `binding_key` and the tenant
/// granted only the routing keys that `grant` matches.
pub async fn publishing_on(
    binding_key: &str,
    grant: &str,
    edit: impl FnOnce(&mut Config),
) -> (Rabbit, String, String, String, TestServer, String) {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, binding_key).await;
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, &exchange, grant);
    edit(&mut config);
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish");
    (rabbit, exchange, queue, tenant, server, token)
}

/// Asserts that `r` is a problem answer with `status` and `code`, showing its body
/// otherwise.
#[track_caller]
pub fn assert_problem(r: &Resp, status: u16, code: &str) {
    assert_eq!((r.status, r.code()), (status, code), "{:?}", r.body);
}

/// Asserts that a finished command succeeded, showing its stderr otherwise.
#[track_caller]
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that a finished command failed and that its stderr mentions `needle`.
#[track_caller]
pub fn assert_failure_mentions(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(needle), "{stderr}");
}

pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub struct TestServer {
    pub base: String,
    /// The operators' listener (`server.metrics_listen`), when started with one.
    pub metrics_base: Option<String>,
    pub state: AppState,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        Self::start_listening(config, false).await
    }

    /// Like [`TestServer::start`], with the operators' listener (`/metrics`, and
    /// `/readyz` with names and error texts) on a port of its own.
    pub async fn start_with_metrics_listener(mut config: Config) -> Self {
        config.server.metrics_listen = Some(([127, 0, 0, 1], 0).into());
        Self::start_listening(config, true).await
    }

    async fn start_listening(config: Config, metrics: bool) -> Self {
        let state = App::start(config).await.expect("app starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let metrics_listener = if metrics {
            Some(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
        } else {
            None
        };
        let metrics_base = metrics_listener
            .as_ref()
            .map(|l| format!("http://{}", l.local_addr().expect("addr")));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(warren::serve(
            state.clone(),
            listener,
            metrics_listener,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            base,
            metrics_base,
            state,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task,
        }
    }

    /// Starts and waits (with a deadline) until `/readyz` is green.
    pub async fn start_ready(config: Config) -> Self {
        Self::ready(Self::start(config).await).await
    }

    /// [`TestServer::start_with_metrics_listener`], then ready as [`TestServer::start_ready`].
    #[allow(dead_code)]
    pub async fn start_ready_with_metrics_listener(config: Config) -> Self {
        Self::ready(Self::start_with_metrics_listener(config).await).await
    }

    async fn ready(server: Self) -> Self {
        let ready = eventually(Duration::from_secs(10), || async {
            server.get("/readyz").await.status == 200
        })
        .await;
        assert!(ready, "warren did not become ready");
        server
    }

    pub fn token(&self, tenant: &str, scope: &str) -> String {
        self.token_with(&TokenRequest {
            tenant,
            subject: "tester",
            scope,
            ttl: Duration::from_secs(600),
        })
    }

    pub fn token_with(&self, request: &TokenRequest<'_>) -> String {
        let secret = self.state.resolved.signing_secret.as_ref();
        mint(
            &self.state.config.auth,
            secret.expect("the config has an HMAC secret"),
            request,
        )
        .expect("mint")
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.get_from(&self.base, path).await
    }

    /// `GET path` on the operators' listener (started with
    /// [`TestServer::start_with_metrics_listener`]).
    #[allow(dead_code)]
    pub async fn operator_get(&self, path: &str) -> Resp {
        let base = self.metrics_base.as_deref().expect("a metrics listener");
        self.get_from(base, path).await
    }

    async fn get_from(&self, base: &str, path: &str) -> Resp {
        let response = self
            .http
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("request");
        into_resp(response).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Resp {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        into_resp(request.send().await.expect("request")).await
    }

    pub async fn publish(&self, token: &str, body: &Value) -> Resp {
        self.post("/v1/publish", Some(token), body).await
    }

    /// Publishes `"payload": 1` to `exchange` with `routing_key`, not mandatory, and
    /// asserts it is accepted.
    pub async fn publish_fire_and_forget(
        &self,
        token: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Resp {
        let r = self
            .publish(
                token,
                &json!({"exchange": exchange, "routing_key": routing_key, "payload": 1, "mandatory": false}),
            )
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        r
    }

    pub async fn metrics(&self) -> String {
        let base = self.metrics_base.as_deref().unwrap_or(&self.base);
        self.http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Triggers graceful shutdown and waits for `serve` to return.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("serve task")
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn join(self) -> std::io::Result<()> {
        self.task.await.expect("serve task")
    }
}

pub async fn into_resp(response: reqwest::Response) -> Resp {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Resp {
        status,
        headers,
        body,
    }
}

/// Polls `check` until it holds or `deadline` passes.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The test's own AMQP client: declares topology, reads what Warren published. The
/// exchanges and queues it declared are deleted when it is dropped.
pub struct Rabbit {
    url: String,
    _connection: Connection,
    pub channel: Channel,
    created: std::sync::Mutex<Created>,
}

/// What a [`Rabbit`] declared, to delete when it is dropped.
#[derive(Default)]
struct Created {
    exchanges: Vec<String>,
    queues: Vec<String>,
}

impl Rabbit {
    pub async fn connect() -> Self {
        Self::connect_to(broker_url()).await
    }

    pub async fn connect_to(url: String) -> Self {
        let (connection, channel) = Self::open(&url).await;
        Self {
            url,
            _connection: connection,
            channel,
            created: std::sync::Mutex::new(Created::default()),
        }
    }

    async fn open(url: &str) -> (Connection, Channel) {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("test AMQP connection");
        let channel = connection.create_channel().await.expect("channel");
        (connection, channel)
    }

    /// A new connection after the broker restarted; what this client created is still
    /// deleted on drop. (Only tests/solo restarts the broker.)
    #[allow(dead_code)]
    pub async fn reconnect(&mut self) {
        (self._connection, self.channel) = Self::open(&self.url).await;
    }

    fn created(&self) -> std::sync::MutexGuard<'_, Created> {
        self.created.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh topic exchange, deleted on drop.
    pub async fn topic_exchange(&self) -> String {
        self.declare_exchange(ExchangeKind::Topic, false).await
    }

    /// A fresh topic exchange that survives a broker restart, deleted on drop.
    pub async fn durable_topic_exchange(&self) -> String {
        self.declare_exchange(ExchangeKind::Topic, true).await
    }

    /// A fresh exchange of `kind`, deleted on drop.
    pub async fn exchange(&self, kind: ExchangeKind) -> String {
        self.declare_exchange(kind, false).await
    }

    /// A fresh `internal` topic exchange (only exchange bindings feed it), deleted on
    /// drop.
    pub async fn internal_exchange(&self) -> String {
        let options = ExchangeDeclareOptions {
            internal: true,
            ..ExchangeDeclareOptions::default()
        };
        self.declare_exchange_with(ExchangeKind::Topic, options)
            .await
    }

    async fn declare_exchange(&self, kind: ExchangeKind, durable: bool) -> String {
        let options = ExchangeDeclareOptions {
            durable,
            ..ExchangeDeclareOptions::default()
        };
        self.declare_exchange_with(kind, options).await
    }

    async fn declare_exchange_with(
        &self,
        kind: ExchangeKind,
        options: ExchangeDeclareOptions,
    ) -> String {
        let name = unique("ex");
        self.channel
            .exchange_declare(name.as_str().into(), kind, options, FieldTable::default())
            .await
            .expect("exchange_declare");
        self.created().exchanges.push(name.clone());
        name
    }

    /// A fresh queue, deleted on drop (and by the broker two minutes after its last
    /// use, should the process die).
    pub async fn queue(&self, arguments: FieldTable) -> String {
        self.declare_queue("q", false, arguments).await
    }

    /// Like [`Rabbit::queue`], but durable: it survives a broker restart.
    pub async fn durable_queue(&self, arguments: FieldTable) -> String {
        self.declare_queue("dq", true, arguments).await
    }

    async fn declare_queue(
        &self,
        prefix: &str,
        durable: bool,
        mut arguments: FieldTable,
    ) -> String {
        let name = unique(prefix);
        arguments.insert("x-expires".into(), AMQPValue::LongInt(120_000));
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("queue_declare");
        self.created().queues.push(name.clone());
        name
    }

    pub async fn bound_queue(&self, exchange: &str, binding_key: &str) -> String {
        let queue = self.queue(FieldTable::default()).await;
        self.bind(&queue, exchange, binding_key).await;
        queue
    }

    pub async fn bind(&self, queue: &str, exchange: &str, binding_key: &str) {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("queue_bind");
    }

    /// Deletes the exchange `name` now (it must exist).
    pub async fn delete_exchange(&self, name: &str) {
        self.channel
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await
            .expect("exchange_delete");
    }

    /// Deletes the queue `name` now (it must exist).
    pub async fn delete_queue(&self, name: &str) {
        self.channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await
            .expect("queue_delete");
    }

    pub async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
    }

    pub async fn count(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive queue_declare")
            .message_count()
    }

    /// Waits until `queue` holds exactly `expected` messages (or the deadline passes).
    pub async fn wait_count(&self, queue: &str, expected: u32) -> u32 {
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let count = self.count(queue).await;
            if count == expected || tokio::time::Instant::now() >= end {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let created = std::mem::take(&mut *self.created());
        if created.exchanges.is_empty() && created.queues.is_empty() {
            return;
        }
        let url = self.url.clone();
        run_detached(Duration::from_secs(10), async move {
            let Ok(connection) = Connection::connect(&url, ConnectionProperties::default()).await
            else {
                return;
            };
            let Ok(channel) = connection.create_channel().await else {
                return;
            };
            for name in &created.queues {
                let options = QueueDeleteOptions::default();
                let _ = channel.queue_delete(name.as_str().into(), options).await;
            }
            for name in &created.exchanges {
                let options = ExchangeDeleteOptions::default();
                let _ = channel.exchange_delete(name.as_str().into(), options).await;
            }
            let _ = connection.close(200, "test cleanup".into()).await;
        });
    }
}

/// A loopback port with nothing listening on it.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}

/// A TCP proxy in front of the test broker ([`broker_url`]) that tests can cut and
/// restore (after crates.io's chaos proxy): while cut, open connections are dropped and
/// new ones closed at once.
pub struct ChaosProxy {
    pub port: u16,
    up: tokio::sync::watch::Sender<bool>,
    /// Connections closed at once because the proxy was cut (reconnect attempts).
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl ChaosProxy {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (up, _) = tokio::sync::watch::channel(true);
        let upstream = broker_addr();
        let watch = up.clone();
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = refused.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut rx = watch.subscribe();
                if !*rx.borrow() {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self {
            port,
            up,
            refused,
            task,
        }
    }

    /// How many connections were refused while cut, so far.
    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The broker URL through this proxy.
    pub fn url(&self) -> String {
        broker_url_via(self.port)
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// The broker's management API, for topology the AMQP protocol cannot create (vhosts).
/// The vhosts it created are deleted when it is dropped.
pub struct Admin {
    http: reqwest::Client,
    base: String,
    vhosts: std::sync::Mutex<Vec<String>>,
    users: std::sync::Mutex<Vec<String>>,
}

impl Admin {
    pub fn new() -> Self {
        Self {
            http: reqwest::Client::new(),
            base: std::env::var("WARREN_TEST_MANAGEMENT_URL")
                .unwrap_or_else(|_| "http://127.0.0.1:15672".into()),
            vhosts: std::sync::Mutex::new(Vec::new()),
            users: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Creates a vhost that guest may use fully; deleted on drop.
    pub async fn vhost(&self, name: &str) {
        let vhost = name.replace('/', "%2F");
        let put = |path: String, body: serde_json::Value| {
            self.http
                .put(format!("{}/api/{path}", self.base))
                .basic_auth("guest", Some("guest"))
                .json(&body)
                .send()
        };
        let r = put(format!("vhosts/{vhost}"), serde_json::json!({}))
            .await
            .expect("management API");
        assert!(
            r.status().is_success(),
            "create vhost {name}: {}",
            r.status()
        );
        let r = put(
            format!("permissions/{vhost}/guest"),
            serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}),
        )
        .await
        .expect("management API");
        assert!(
            r.status().is_success(),
            "permissions on {name}: {}",
            r.status()
        );
        self.vhosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_owned());
    }

    /// Creates a broker user with `password` and these permission regexes on `vhost`;
    /// deleted on drop.
    pub async fn user(&self, name: &str, password: &str, vhost: &str, permissions: [&str; 3]) {
        let [configure, write, read] = permissions;
        let put = |path: String, body: serde_json::Value| {
            self.http
                .put(format!("{}/api/{path}", self.base))
                .basic_auth("guest", Some("guest"))
                .json(&body)
                .send()
        };
        let r = put(
            format!("users/{name}"),
            serde_json::json!({"password": password, "tags": ""}),
        )
        .await
        .expect("management API");
        assert!(
            r.status().is_success(),
            "create user {name}: {}",
            r.status()
        );
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_owned());
        let r = put(
            format!("permissions/{}/{name}", vhost.replace('/', "%2F")),
            serde_json::json!({"configure": configure, "write": write, "read": read}),
        )
        .await
        .expect("management API");
        assert!(
            r.status().is_success(),
            "permissions of {name}: {}",
            r.status()
        );
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        let names = std::mem::take(self.vhosts.get_mut().unwrap_or_else(|e| e.into_inner()));
        let users = std::mem::take(self.users.get_mut().unwrap_or_else(|e| e.into_inner()));
        if names.is_empty() && users.is_empty() {
            return;
        }
        let base = self.base.clone();
        run_detached(Duration::from_secs(10), async move {
            // A client of this runtime: the fixture's belongs to the test's.
            let http = reqwest::Client::new();
            for user in users {
                let _ = http
                    .delete(format!("{base}/api/users/{user}"))
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await;
            }
            for name in names {
                let _ = http
                    .delete(format!("{base}/api/vhosts/{}", name.replace('/', "%2F")))
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await;
            }
        });
    }
}

/// An AMQP connection to another vhost, for the test's own topology there.
pub async fn rabbit_in(vhost: &str) -> Rabbit {
    let url = format!(
        "{}/{}",
        broker_url().trim_end_matches('/'),
        vhost.replace('/', "%2F")
    );
    Rabbit::connect_to(url).await
}

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket to Warren at `base` (`http://…`), authenticated by header, speaking
/// `warren.v1` (checked in the handshake answer).
pub async fn ws_connect(base: &str, token: &str) -> WsStream {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::header;
    let url = format!("{}/v1/ws", base.replace("http://", "ws://"));
    let mut request = url.into_client_request().expect("a WebSocket URL");
    let headers = request.headers_mut();
    let bearer = format!("Bearer {token}").parse().expect("a header value");
    headers.insert(header::AUTHORIZATION, bearer);
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        "warren.v1".parse().expect("a header value"),
    );
    let (ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("ws connect");
    assert_eq!(
        response.headers().get(header::SEC_WEBSOCKET_PROTOCOL),
        Some(&"warren.v1".parse().expect("a header value")),
        "the server speaks warren.v1"
    );
    ws
}

#[tokio::test]
async fn fixtures_delete_what_they_created_even_when_the_test_panics() {
    let (names, mut created) = tokio::sync::mpsc::unbounded_channel();
    let vhost = unique("vh");
    let doomed = {
        let vhost = vhost.clone();
        tokio::spawn(async move {
            let admin = Admin::new();
            admin.vhost(&vhost).await;
            let rabbit = Rabbit::connect().await;
            let _ = names.send(rabbit.topic_exchange().await);
            let _ = names.send(rabbit.queue(FieldTable::default()).await);
            panic!("a failing test");
        })
    };
    assert!(doomed.await.is_err_and(|e| e.is_panic()));
    let (exchange, queue) = (created.recv().await, created.recv().await);
    let (exchange, queue) = (exchange.expect("an exchange"), queue.expect("a queue"));

    let connection = Connection::connect(&broker_url(), ConnectionProperties::default())
        .await
        .expect("test AMQP connection");
    // A failed passive declare closes its channel: one channel each.
    let channel = connection.create_channel().await.expect("channel");
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let declared = channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await;
    assert!(declared.is_err(), "the exchange is gone");
    let channel = connection.create_channel().await.expect("channel");
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.as_str().into(), options, FieldTable::default())
        .await;
    assert!(declared.is_err(), "the queue is gone");
    let admin = Admin::new();
    let status = admin
        .http
        .get(format!("{}/api/vhosts/{vhost}", admin.base))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management API")
        .status();
    assert_eq!(status, 404, "the vhost is gone");
}

/// A `warren serve` process (the real binary) on `127.0.0.1:port`, logging to a file,
/// answering `/readyz` with the status asked for, and a publish token for a tenant.
/// Killed when dropped, whatever happens.
pub struct WarrenProcess {
    child: std::process::Child,
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
    pub log: std::path::PathBuf,
}

impl WarrenProcess {
    pub async fn start(
        dir: &tempfile::TempDir,
        config: &str,
        tenant: &str,
        port: u16,
        ready_status: u16,
    ) -> Self {
        use std::process::{Command, Stdio};
        let bin = env!("CARGO_BIN_EXE_warren");
        let path = dir.path().join(format!("warren-{port}.toml"));
        std::fs::write(&path, config).expect("write the config");
        let log = dir.path().join(format!("warren-{port}.log"));
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stderr(std::fs::File::create(&log).expect("log file"))
            .stdout(Stdio::null())
            .spawn()
            .expect("warren serve");
        let mut process = Self {
            child,
            http: reqwest::Client::new(),
            base: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            log,
        };
        let ready = eventually(Duration::from_secs(10), || async {
            process
                .http
                .get(format!("{}/readyz", process.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == ready_status)
        })
        .await;
        assert!(ready, "/readyz never answered {ready_status}");
        let token = Command::new(bin)
            .args(["token", "--config"])
            .arg(&path)
            .args([
                "--tenant",
                tenant,
                "--sub",
                "process",
                "--scope",
                "publish subscribe",
            ])
            .output()
            .expect("warren token");
        process.token = String::from_utf8_lossy(&token.stdout).trim().to_owned();
        process
    }

    #[allow(dead_code)] // tests/solo reads the memory of a process
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's peak resident memory so far (`VmHWM`), in KiB.
    #[allow(dead_code)]
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL: no shutdown, no drain.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit (within the 5 s grace period and a margin).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(7);
        loop {
            if let Some(exit) = self.child.try_wait().expect("try_wait") {
                return exit;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit within the grace period"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WarrenProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
