//! `[[tenants.<t>.exchanges]]`, `[[tenants.<t>.queues]]` and `[topology]` (SPEC §11):
//! the topology each tenant declares, checked here (an argument that does not fit the
//! queue type is an error naming the key) and resolved into plain specs with the
//! broker's x-argument names, including the delay queues and DLQ of a retry policy.
//! The types and the exchanges and bindings are here; a queue's own checks (arguments
//! by queue type, dead-lettering, the retry policy) are in `queue.rs`.

mod queue;

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::ConfigError;
use queue::check_queue;

/// `[topology]`: what Warren does with the declared topology.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologyConfig {
    /// Apply every tenant's topology at `warren serve`; a conflict keeps Warren unready.
    pub apply_on_start: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
    Stream,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
            Self::Stream => "stream",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

impl Overflow {
    fn as_str(self) -> &'static str {
        match self {
            Self::DropHead => "drop-head",
            Self::RejectPublish => "reject-publish",
            Self::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// A binding argument (headers exchanges match on them): a string, integer or boolean.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ArgValue {
    Bool(bool),
    Int(i64),
    Str(String),
}

/// `bindings = [{ exchange, routing_key, arguments }]`: from `exchange` to the queue
/// (or exchange) that lists it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    pub exchange: String,
    #[serde(default)]
    pub routing_key: String,
    #[serde(default)]
    pub arguments: BTreeMap<String, ArgValue>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ExchangeType,
    #[serde(default = "yes")]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub internal: bool,
    pub alternate_exchange: Option<String>,
    /// Exchange-to-exchange bindings: messages of `exchange` also reach this one.
    #[serde(default)]
    pub bindings: Vec<BindingConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// One delay queue per entry: the n-th `nack` with `requeue: false` waits this long.
    pub delays_ms: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: QueueType,
    #[serde(default = "yes")]
    pub durable: bool,
    pub message_ttl_ms: Option<u32>,
    pub expires_ms: Option<u32>,
    pub max_length: Option<u32>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Option<Overflow>,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub max_priority: Option<u8>,
    pub delivery_limit: Option<u32>,
    pub single_active_consumer: Option<bool>,
    /// Streams: how long segments are kept, RabbitMQ's format (`7D`, `12h`, `30m`).
    pub max_age: Option<String>,
    pub stream_max_segment_size_bytes: Option<u64>,
    #[serde(default)]
    pub bindings: Vec<BindingConfig>,
    pub retry: Option<RetryConfig>,
}

fn yes() -> bool {
    true
}

/// Most delays a retry policy may have (each one a queue).
pub const MAX_RETRY_DELAYS: usize = 20;
/// Most exchanges, queues or bindings one tenant may declare.
const MAX_OBJECTS: usize = 1000;

/// An exchange as it is declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeType,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: BTreeMap<String, ArgValue>,
}

/// A queue as it is declared: its x-arguments under the broker's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub durable: bool,
    pub arguments: BTreeMap<String, ArgValue>,
    /// For a retry policy's delay queues and DLQ: the queue they serve.
    pub derived_from: Option<String>,
    /// The arguments an earlier Warren declared this queue with, which `plan` accepts
    /// with a warning instead of a conflict (queue arguments cannot change in place).
    pub legacy_arguments: Option<BTreeMap<String, ArgValue>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Queue(String),
    Exchange(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingSpec {
    pub source: String,
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: BTreeMap<String, ArgValue>,
}

/// A queue's retry policy: `nack` with `requeue: false` moves a message to
/// `delay_queue(n)` for its n-th retry, then to `dlq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub queue: String,
    pub delays_ms: Vec<u32>,
}

impl RetryPolicy {
    /// The queue a message waits in before its `attempt`-th retry (1-based).
    pub fn delay_queue(&self, attempt: usize) -> String {
        format!("{}.retry.{attempt}", self.queue)
    }

    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.queue)
    }
}

/// One tenant's resolved topology, in declaration order (exchanges, queues, bindings).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantTopology {
    pub exchanges: Vec<ExchangeSpec>,
    pub queues: Vec<QueueSpec>,
    pub bindings: Vec<BindingSpec>,
    /// By queue name.
    pub retry: BTreeMap<String, RetryPolicy>,
}

impl TenantTopology {
    pub fn is_empty(&self) -> bool {
        self.exchanges.is_empty() && self.queues.is_empty() && self.bindings.is_empty()
    }
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 255 {
        return Err(ConfigError::invalid(key, "must be 1-255 bytes"));
    }
    if name.starts_with("amq.") {
        return Err(ConfigError::invalid(
            key,
            "names starting with `amq.` are reserved by the broker",
        ));
    }
    Ok(())
}

fn check_bindings(
    key: &str,
    bindings: &[BindingConfig],
    destination: &Destination,
    out: &mut Vec<BindingSpec>,
) -> Result<(), ConfigError> {
    for (i, b) in bindings.iter().enumerate() {
        let at = format!("{key}.bindings[{i}]");
        if b.exchange.is_empty() || b.exchange.len() > 255 {
            return Err(ConfigError::invalid(
                format!("{at}.exchange"),
                "must be 1-255 bytes (the default exchange takes no bindings)",
            ));
        }
        if b.routing_key.len() > 255 {
            return Err(ConfigError::invalid(
                format!("{at}.routing_key"),
                "must be at most 255 bytes",
            ));
        }
        if b.arguments.len() > 64 {
            return Err(ConfigError::invalid(
                format!("{at}.arguments"),
                "at most 64 arguments",
            ));
        }
        if let Some(m) = b.arguments.get("x-match")
            && !matches!(m, ArgValue::Str(s) if matches!(s.as_str(), "all" | "any" | "all-with-x" | "any-with-x"))
        {
            return Err(ConfigError::invalid(
                format!("{at}.arguments.x-match"),
                "must be \"all\", \"any\", \"all-with-x\" or \"any-with-x\"",
            ));
        }
        out.push(BindingSpec {
            source: b.exchange.clone(),
            destination: destination.clone(),
            routing_key: b.routing_key.clone(),
            arguments: b.arguments.clone(),
        });
    }
    Ok(())
}

/// Checks one tenant's `exchanges` and `queues`; errors name `tenants.<t>.…`.
pub(super) fn resolve(
    prefix: &str,
    exchanges: &[ExchangeConfig],
    queues: &[QueueConfig],
) -> Result<TenantTopology, ConfigError> {
    if exchanges.len() > MAX_OBJECTS {
        return Err(ConfigError::invalid(
            format!("{prefix}.exchanges"),
            format!("at most {MAX_OBJECTS}"),
        ));
    }
    if queues.len() > MAX_OBJECTS {
        return Err(ConfigError::invalid(
            format!("{prefix}.queues"),
            format!("at most {MAX_OBJECTS}"),
        ));
    }
    let mut out = TenantTopology::default();
    let mut exchange_names = BTreeSet::new();
    for (i, x) in exchanges.iter().enumerate() {
        let key = format!("{prefix}.exchanges[{i}]");
        check_name(&format!("{key}.name"), &x.name)?;
        if !exchange_names.insert(x.name.clone()) {
            return Err(ConfigError::invalid(
                format!("{key}.name"),
                format!("exchange {:?} is declared twice", x.name),
            ));
        }
        let mut arguments = BTreeMap::new();
        if let Some(ae) = &x.alternate_exchange {
            if ae.is_empty() || ae.len() > 255 {
                return Err(ConfigError::invalid(
                    format!("{key}.alternate_exchange"),
                    "must be 1-255 bytes",
                ));
            }
            arguments.insert("alternate-exchange".to_owned(), ArgValue::Str(ae.clone()));
        }
        out.exchanges.push(ExchangeSpec {
            name: x.name.clone(),
            kind: x.kind,
            durable: x.durable,
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments,
        });
        check_bindings(
            &key,
            &x.bindings,
            &Destination::Exchange(x.name.clone()),
            &mut out.bindings,
        )?;
    }
    let mut queue_names = BTreeSet::new();
    for (i, q) in queues.iter().enumerate() {
        check_queue(
            &format!("{prefix}.queues[{i}]"),
            q,
            &mut queue_names,
            &mut out,
        )?;
    }
    if out.bindings.len() > MAX_OBJECTS {
        return Err(ConfigError::invalid(
            format!("{prefix}.queues"),
            format!("at most {MAX_OBJECTS} bindings"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    fn load(queues: &str) -> Result<TenantTopology, String> {
        let text = format!(
            "[auth]\nhs256_secret = \"0123456789abcdef0123456789abcdef\"\n\
             [tenants.acme]\nvhost = \"acme\"\n{queues}"
        );
        let config = Config::from_toml(&text).map_err(|e| e.to_string())?;
        let resolved = config.resolve().map_err(|e| e.to_string())?;
        Ok(resolved.tenants["acme"].topology.clone())
    }

    fn error(queues: &str) -> String {
        load(queues).expect_err("a config error")
    }

    #[test]
    fn a_full_topology_resolves_with_the_brokers_argument_names() {
        let topology = load(
            r##"
            [[tenants.acme.exchanges]]
            name = "events"
            type = "topic"
            alternate_exchange = "unrouted"
            [[tenants.acme.exchanges]]
            name = "audit"
            type = "headers"
            internal = true
            bindings = [{ exchange = "events", routing_key = "#" }]
            [[tenants.acme.queues]]
            name = "billing"
            type = "quorum"
            message_ttl_ms = 60000
            delivery_limit = 5
            overflow = "reject-publish"
            bindings = [{ exchange = "events", routing_key = "order.#" }]
            retry = { delays_ms = [1000, 10000] }
            [[tenants.acme.queues]]
            name = "pdfs"
            max_priority = 10
            bindings = [{ exchange = "audit", arguments = { "x-match" = "all", format = "pdf", size = 3 } }]
            [[tenants.acme.queues]]
            name = "log"
            type = "stream"
            max_age = "7D"
            stream_max_segment_size_bytes = 1000000
            "##,
        )
        .unwrap();
        let names: Vec<&str> = topology.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "billing",
                "billing.retry.1",
                "billing.retry.2",
                "billing.dlq",
                "pdfs",
                "log"
            ]
        );
        let billing = &topology.queues[0].arguments;
        assert_eq!(billing["x-queue-type"], ArgValue::Str("quorum".into()));
        assert_eq!(billing["x-delivery-limit"], ArgValue::Int(5));
        assert_eq!(
            billing["x-overflow"],
            ArgValue::Str("reject-publish".into())
        );
        // Rejected by any consumer (or expired), a message goes to the DLQ, not away.
        assert_eq!(
            billing["x-dead-letter-exchange"],
            ArgValue::Str(String::new())
        );
        assert_eq!(
            billing["x-dead-letter-routing-key"],
            ArgValue::Str("billing.dlq".into())
        );
        let delay = &topology.queues[2].arguments;
        assert_eq!(delay["x-message-ttl"], ArgValue::Int(10000));
        assert_eq!(
            delay["x-dead-letter-exchange"],
            ArgValue::Str(String::new())
        );
        assert_eq!(
            delay["x-dead-letter-routing-key"],
            ArgValue::Str("billing".into())
        );
        assert_eq!(topology.retry["billing"].dlq(), "billing.dlq");
        assert_eq!(topology.bindings.len(), 3);
        assert_eq!(
            topology.bindings[0].destination,
            Destination::Exchange("audit".into())
        );
        assert_eq!(topology.bindings[2].arguments["size"], ArgValue::Int(3));
        assert_eq!(
            topology.exchanges[0].arguments["alternate-exchange"],
            ArgValue::Str("unrouted".into())
        );
    }

    #[test]
    fn arguments_that_do_not_fit_the_queue_type_name_the_key() {
        let cases = [
            (
                "name = \"q\"\ndelivery_limit = 3",
                "tenants.acme.queues[0].delivery_limit:",
            ),
            (
                "name = \"q\"\ntype = \"quorum\"\nmax_priority = 3",
                "tenants.acme.queues[0].max_priority:",
            ),
            (
                "name = \"q\"\ntype = \"stream\"\nmessage_ttl_ms = 3",
                "tenants.acme.queues[0].message_ttl_ms:",
            ),
            (
                "name = \"q\"\nmax_age = \"7D\"",
                "tenants.acme.queues[0].max_age:",
            ),
            (
                "name = \"q\"\ntype = \"stream\"\nmax_age = \"7 days\"",
                "tenants.acme.queues[0].max_age:",
            ),
            (
                "name = \"q\"\ntype = \"stream\"\nretry = { delays_ms = [1] }",
                "tenants.acme.queues[0].retry:",
            ),
            (
                "name = \"q\"\nretry = { delays_ms = [] }",
                "tenants.acme.queues[0].retry.delays_ms:",
            ),
            (
                "name = \"q\"\ntype = \"quorum\"\ndurable = false",
                "tenants.acme.queues[0].durable:",
            ),
            (
                "name = \"q\"\ndead_letter_routing_key = \"x\"",
                "tenants.acme.queues[0].dead_letter_routing_key:",
            ),
            ("name = \"amq.q\"", "tenants.acme.queues[0].name:"),
        ];
        for (queue, key) in cases {
            let err = error(&format!("[[tenants.acme.queues]]\n{queue}\n"));
            assert!(err.starts_with(key), "{queue}: {err}");
        }
        let twice = error(
            "[[tenants.acme.queues]]\nname = \"q.dlq\"\n[[tenants.acme.queues]]\nname = \"q\"\nretry = { delays_ms = [5] }\n",
        );
        assert!(twice.contains("declared twice"), "{twice}");
    }

    #[test]
    fn unknown_and_ill_typed_arguments_name_the_key() {
        let unknown = error("[[tenants.acme.queues]]\nname = \"q\"\nx_max_priority = 3\n");
        assert!(unknown.contains("x_max_priority"), "{unknown}");
        let typed = error("[[tenants.acme.queues]]\nname = \"q\"\nmax_priority = \"high\"\n");
        assert!(typed.contains("max_priority"), "{typed}");
        let range = error("[[tenants.acme.queues]]\nname = \"q\"\nmax_priority = 300\n");
        assert!(range.contains("max_priority"), "{range}");
        let overflow = error("[[tenants.acme.queues]]\nname = \"q\"\noverflow = \"spill\"\n");
        assert!(overflow.contains("overflow"), "{overflow}");
        let kind = error("[[tenants.acme.exchanges]]\nname = \"x\"\ntype = \"fan\"\n");
        assert!(kind.contains("type"), "{kind}");
        let apply = error("[topology]\napply_on_start = \"yes\"\n");
        assert!(apply.contains("topology.apply_on_start"), "{apply}");
    }

    #[test]
    fn the_topology_guide_example_resolves() {
        let guide = include_str!("../../../docs/src/guides/topology.md");
        let section = guide
            .split("## A complete example")
            .nth(1)
            .expect("the topology guide's complete example");
        let example = section
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("its TOML example");
        let text =
            format!("[auth]\nhs256_secret = \"0123456789abcdef0123456789abcdef\"\n{example}");
        let config = Config::from_toml(&text).unwrap();
        assert!(config.topology.apply_on_start);
        let resolved = config.resolve().unwrap();
        let acme = &resolved.tenants["acme"].topology;
        assert_eq!(acme.retry["billing"].delays_ms, [1000, 10000, 60000]);
        assert_eq!(resolved.tenants["globex"].topology.queues.len(), 1);
    }
}
