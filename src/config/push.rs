//! `[push]` and `[[tenants.<t>.push]]` (SPEC §13): push subscriptions deliver a queue
//! to an HTTP endpoint. Checked here: the URL (and, for an address written in it, the
//! network it is on), the queue and its retry policy in the tenant's topology, the
//! signing secrets, the static headers.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use super::ConfigError;
use super::check::read_file;
use super::topology::{ArgValue, RetryPolicy, TenantTopology};

/// What every push subscription shares.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushSettings {
    /// Deliver to loopback, private, link-local and cloud metadata addresses. Off by
    /// default (a push URL is an SSRF target); dev mode turns it on.
    pub allow_private_networks: bool,
    /// Consecutive failed attempts (timeouts, connect errors, 408, 429, 5xx) after
    /// which a subscription pauses: it stops taking messages and probes with one.
    pub pause_after_failures: u32,
    /// The longest wait between two probes of a paused subscription (they start at one
    /// second and double).
    pub max_probe_interval_s: u64,
    /// How long a connection to an endpoint may take (within each attempt's timeout).
    pub connect_timeout_ms: u64,
}

impl Default for PushSettings {
    fn default() -> Self {
        Self {
            allow_private_networks: false,
            pause_after_failures: 5,
            max_probe_interval_s: 60,
            connect_timeout_ms: 2000,
        }
    }
}

impl PushSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        super::check::all_positive(&[
            (
                "push.pause_after_failures",
                u64::from(self.pause_after_failures),
            ),
            ("push.max_probe_interval_s", self.max_probe_interval_s),
            ("push.connect_timeout_ms", self.connect_timeout_ms),
        ])
    }
}

/// One `[[tenants.<t>.push]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// `[A-Za-z0-9._-]{1,64}`, unique within the tenant: the metric label.
    pub name: String,
    /// A queue of the tenant's topology with a retry policy (its delays and DLQ are
    /// where failed deliveries go).
    pub queue: String,
    /// `http://` or `https://`; redirects are not followed.
    pub url: String,
    /// Per attempt, connect to last response byte.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Concurrent deliveries of this subscription per replica (default 16; 1 when
    /// ordered).
    pub max_in_flight: Option<u16>,
    /// One delivery at a time, in queue order, on one replica at a time (the queue must
    /// be declared `single_active_consumer = true`); retries wait in place.
    #[serde(default)]
    pub ordered: bool,
    #[serde(default)]
    pub format: PushFormat,
    /// Standard Webhooks secrets (`whsec_` + base64 of 24-64 bytes); every one signs,
    /// so a receiver can rotate.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Files each holding one secret.
    #[serde(default)]
    pub secret_files: Vec<PathBuf>,
    /// Static request headers; a value is a string or `{ file = "..." }`.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderSource>,
    /// Deliveries per second at most, per replica; 0 is unlimited.
    #[serde(default)]
    pub rate_per_s: f64,
}

fn default_timeout_ms() -> u64 {
    5000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum HeaderSource {
    Value(String),
    File { file: PathBuf },
}

/// What a delivery's request body is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushFormat {
    /// The WebSocket message frame (SPEC §6) as JSON.
    #[default]
    Warren,
    /// CloudEvents HTTP binary mode: `ce-*` headers, the data as the body.
    CloudEvents,
}

/// A push subscription ready to run.
#[derive(Debug, Clone)]
pub struct PushSpec {
    pub tenant: String,
    pub name: String,
    pub queue: String,
    pub url: reqwest::Url,
    pub timeout: Duration,
    pub max_in_flight: u16,
    pub ordered: bool,
    pub format: PushFormat,
    /// The decoded secret keys.
    pub secrets: Vec<Vec<u8>>,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub rate_per_s: Option<f64>,
    pub retry: RetryPolicy,
}

impl PushSpec {
    /// `tenant/name`: the `subscription` label of the push metrics.
    pub fn label(&self) -> String {
        format!("{}/{}", self.tenant, self.name)
    }
}

/// Most push subscriptions one tenant may have.
const MAX_PUSH: usize = 100;
const MAX_TIMEOUT_MS: u64 = 300_000;
const MAX_IN_FLIGHT: u16 = 1024;
/// An ordered subscription holds its message unacked while it retries in place; the
/// broker's `consumer_timeout` (30 minutes by default) would take it back first.
const MAX_ORDERED_HOLD: Duration = Duration::from_secs(25 * 60);
/// Headers Warren writes itself.
const RESERVED_HEADERS: [&str; 11] = [
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "traceparent",
    "tracestate",
    "user-agent",
];

/// Checks a tenant's push subscriptions against its topology.
pub(super) fn resolve(
    prefix: &str,
    tenant: &str,
    push: &[PushConfig],
    topology: &TenantTopology,
    settings: &PushSettings,
) -> Result<Vec<PushSpec>, ConfigError> {
    if push.len() > MAX_PUSH {
        return Err(ConfigError::invalid(
            format!("{prefix}.push"),
            format!("at most {MAX_PUSH} push subscriptions per tenant"),
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    push.iter()
        .enumerate()
        .map(|(i, p)| {
            let key = format!("{prefix}.push[{i}]");
            let spec = resolve_one(&key, tenant, p, topology, settings)?;
            if !names.insert(spec.name.clone()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("push subscription {:?} is declared twice", spec.name),
                ));
            }
            Ok(spec)
        })
        .collect()
}

fn resolve_one(
    key: &str,
    tenant: &str,
    p: &PushConfig,
    topology: &TenantTopology,
    settings: &PushSettings,
) -> Result<PushSpec, ConfigError> {
    let valid_name = !p.name.is_empty()
        && p.name.len() <= 64
        && p.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid_name {
        return Err(ConfigError::invalid(
            format!("{key}.name"),
            "must be 1-64 characters [A-Za-z0-9._-]",
        ));
    }
    let url = check_push_url(
        &format!("{key}.url"),
        &p.url,
        settings.allow_private_networks,
    )?;
    let Some(queue) = topology.queues.iter().find(|q| q.name == p.queue) else {
        return Err(ConfigError::invalid(
            format!("{key}.queue"),
            format!(
                "queue {:?} is not in this tenant's topology: declare it under [[{}.queues]] with a retry policy (its delays and DLQ take the failed deliveries)",
                p.queue,
                key.rsplit_once(".push").map_or(key, |(t, _)| t)
            ),
        ));
    };
    let Some(retry) = topology.retry.get(&p.queue).cloned() else {
        return Err(ConfigError::invalid(
            format!("{key}.queue"),
            format!(
                "queue {:?} needs a retry policy (retry = {{ delays_ms = [...] }}): failed deliveries go through its delays, then to {:?}",
                p.queue,
                format!("{}.dlq", p.queue)
            ),
        ));
    };
    if p.timeout_ms == 0 || p.timeout_ms > MAX_TIMEOUT_MS {
        return Err(ConfigError::invalid(
            format!("{key}.timeout_ms"),
            format!("must be from 1 to {MAX_TIMEOUT_MS}"),
        ));
    }
    let max_in_flight = match (p.ordered, p.max_in_flight) {
        (true, Some(n)) if n != 1 => {
            return Err(ConfigError::invalid(
                format!("{key}.max_in_flight"),
                "an ordered subscription delivers one message at a time: leave it unset or 1",
            ));
        }
        (true, _) => 1,
        (false, Some(n)) if n == 0 || n > MAX_IN_FLIGHT => {
            return Err(ConfigError::invalid(
                format!("{key}.max_in_flight"),
                format!("must be from 1 to {MAX_IN_FLIGHT}"),
            ));
        }
        (false, n) => n.unwrap_or(16),
    };
    if p.ordered {
        let single = queue.arguments.get("x-single-active-consumer") == Some(&ArgValue::Bool(true));
        if !single {
            return Err(ConfigError::invalid(
                format!("{key}.ordered"),
                format!(
                    "queue {:?} must be declared with single_active_consumer = true, so one replica at a time takes its messages in order",
                    p.queue
                ),
            ));
        }
        let timeout = Duration::from_millis(p.timeout_ms);
        let hold = retry
            .delays_ms
            .iter()
            .map(|d| Duration::from_millis(u64::from(*d)) + timeout)
            .sum::<Duration>()
            + timeout;
        if hold > MAX_ORDERED_HOLD {
            return Err(ConfigError::invalid(
                format!("{key}.ordered"),
                format!(
                    "retrying in place holds a message up to {}s (the retry delays plus each attempt's timeout); keep it under {}s, below the broker's consumer_timeout",
                    hold.as_secs(),
                    MAX_ORDERED_HOLD.as_secs()
                ),
            ));
        }
    }
    if !(p.rate_per_s.is_finite() && p.rate_per_s >= 0.0) {
        return Err(ConfigError::invalid(
            format!("{key}.rate_per_s"),
            "must be 0 (unlimited) or a positive number",
        ));
    }
    let mut secrets = Vec::new();
    for (i, s) in p.secrets.iter().enumerate() {
        secrets.push(decode_secret(&format!("{key}.secrets[{i}]"), s)?);
    }
    for (i, path) in p.secret_files.iter().enumerate() {
        let at = format!("{key}.secret_files[{i}]");
        let text = read_file(&at, path)?;
        secrets.push(decode_secret(&at, text.trim())?);
    }
    if secrets.is_empty() {
        return Err(ConfigError::invalid(
            format!("{key}.secrets"),
            "at least one signing secret (secrets or secret_files): receivers verify every delivery",
        ));
    }
    let mut headers = Vec::new();
    for (name, source) in &p.headers {
        let at = format!("{key}.headers.{name}");
        let parsed = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::invalid(&at, "not a valid HTTP header name"))?;
        let lower = parsed.as_str();
        if RESERVED_HEADERS.contains(&lower) || lower.starts_with("ce-") {
            return Err(ConfigError::invalid(
                &at,
                "Warren sets this header itself (Standard Webhooks, trace context, CloudEvents)",
            ));
        }
        let value = match source {
            HeaderSource::Value(v) => v.clone(),
            HeaderSource::File { file } => read_file(&at, file)?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        };
        let value = http::HeaderValue::from_str(&value)
            .map_err(|_| ConfigError::invalid(&at, "not a valid HTTP header value"))?;
        headers.push((parsed, value));
    }
    Ok(PushSpec {
        tenant: tenant.to_owned(),
        name: p.name.clone(),
        queue: p.queue.clone(),
        url,
        timeout: Duration::from_millis(p.timeout_ms),
        max_in_flight,
        ordered: p.ordered,
        format: p.format,
        secrets,
        headers,
        rate_per_s: (p.rate_per_s > 0.0).then_some(p.rate_per_s),
        retry,
    })
}

/// A Standard Webhooks secret: `whsec_` and the base64 of 24 to 64 bytes.
fn decode_secret(key: &str, secret: &str) -> Result<Vec<u8>, ConfigError> {
    let bad = || {
        ConfigError::invalid(
            key,
            "must be a Standard Webhooks secret: whsec_ and the base64 of 24 to 64 random bytes",
        )
    };
    let encoded = secret.strip_prefix("whsec_").ok_or_else(bad)?;
    let bytes = BASE64.decode(encoded).map_err(|_| bad())?;
    if !(24..=64).contains(&bytes.len()) {
        return Err(bad());
    }
    Ok(bytes)
}

/// An `http`/`https` URL with a host and no credentials; an address written in it must
/// be public unless `allow_private`. (Names are checked when they are resolved, at each
/// connection: DNS can change.)
pub fn check_push_url(
    key: &str,
    url: &str,
    allow_private: bool,
) -> Result<reqwest::Url, ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ConfigError::invalid(key, format!("not a valid URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError::invalid(
            key,
            "must be an http:// or https:// URL",
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ConfigError::invalid(
            key,
            "must not carry credentials (they would end up in logs): send them in `headers`",
        ));
    }
    match parsed.host() {
        None => return Err(ConfigError::invalid(key, "must name a host")),
        Some(url::Host::Ipv4(ip)) if !allow_private && !is_public(IpAddr::V4(ip)) => {
            return Err(private_address(key));
        }
        Some(url::Host::Ipv6(ip)) if !allow_private && !is_public(IpAddr::V6(ip)) => {
            return Err(private_address(key));
        }
        Some(url::Host::Domain(name)) if !allow_private && is_local_name(name) => {
            return Err(private_address(key));
        }
        _ => {}
    }
    Ok(parsed)
}

fn private_address(key: &str) -> ConfigError {
    ConfigError::invalid(
        key,
        "is on a loopback, private, link-local or metadata address; set push.allow_private_networks = true to deliver there",
    )
}

/// `localhost` and its subdomains always resolve to loopback.
fn is_local_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Whether a push may connect to `ip` without `push.allow_private_networks`: not
/// loopback, private (RFC 1918, unique local), shared (CGNAT), link-local (where cloud
/// metadata services live), unspecified, broadcast, multicast or documentation
/// ranges; an IPv4-mapped or NAT64 IPv6 address is judged by its IPv4 part.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let segments = v6.segments();
            // 64:ff9b::/96 (NAT64) carries an IPv4 address in its last 32 bits.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [.., hi, lo] = segments;
                let v4 = std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
                return is_public(IpAddr::V4(v4));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (segments[0] & 0xfe00) == 0xfc00 // unique local (fd00:ec2::254 too)
                || (segments[0] & 0xffc0) == 0xfe80 // link-local
                || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_metadata_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn push_urls_are_http_with_a_host_no_credentials_and_public_when_written_as_addresses() {
        let ok = |url: &str, allow: bool| check_push_url("k", url, allow).is_ok();
        assert!(ok("https://hooks.example/orders", false));
        assert!(ok("http://127.0.0.1:9000/x", true));
        assert!(!ok("http://127.0.0.1:9000/x", false));
        assert!(!ok("http://[::1]/x", false));
        assert!(!ok("http://169.254.169.254/latest/meta-data", false));
        assert!(!ok("http://localhost:8080/", false));
        assert!(!ok("http://api.localhost/", false));
        assert!(!ok("ftp://hooks.example/", false));
        assert!(!ok("https://user:pw@hooks.example/", false));
        assert!(!ok("not a url", false));
        assert!(!ok("file:///etc/passwd", true));
    }

    #[test]
    fn secrets_are_standard_webhooks_secrets() {
        assert_eq!(
            decode_secret("k", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .ok()
                .map(|k| k.len()),
            Some(24)
        );
        for bad in ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_!!", "whsec_YWJj"] {
            assert!(decode_secret("k", bad).is_err(), "{bad}");
        }
    }
}
