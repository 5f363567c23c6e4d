//! The HTTP side of push: one client for every subscription (connections reused per
//! endpoint), no redirects, an overall timeout per attempt, response bodies read up to
//! [`MAX_RESPONSE_BYTES`] and dropped, and, unless `push.allow_private_networks`, a
//! resolver that refuses loopback, private, link-local and metadata addresses at every
//! connection (a name that resolved to a public address yesterday may not today).
//! Addresses written in a push URL are checked when the config loads.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::config::{PushSettings, is_public};

/// What is read of a response body (and discarded): SPEC §13.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// One attempt's request.
pub struct Attempt<'a> {
    pub url: &'a reqwest::Url,
    pub timeout: Duration,
    pub body: bytes::Bytes,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The endpoint answered with this status (and maybe `Retry-After`).
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No complete answer within the attempt's timeout.
    Timeout,
    /// No connection (refused, reset, TLS, DNS).
    ConnectError,
    /// The name resolved only to addresses push may not reach.
    Refused,
}

impl Answer {
    /// The `x-warren-push-status` a dead letter carries, and the metric label.
    pub fn label(&self) -> String {
        match self {
            Self::Status { status, .. } => status.to_string(),
            Self::Timeout => "timeout".to_owned(),
            Self::ConnectError => "connect_error".to_owned(),
            Self::Refused => "refused_address".to_owned(),
        }
    }

    /// The bounded class for metrics: `2xx`, `3xx`, `4xx`, `5xx`, or the failure kind.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Status { status, .. } => match status / 100 {
                2 => "2xx",
                3 => "3xx",
                4 => "4xx",
                _ => "5xx",
            },
            Self::Timeout => "timeout",
            Self::ConnectError => "connect_error",
            Self::Refused => "refused_address",
        }
    }
}

#[derive(Clone)]
pub struct PushClient {
    http: reqwest::Client,
}

impl PushClient {
    pub fn new(settings: &PushSettings) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("warren/", env!("CARGO_PKG_VERSION")));
        if !settings.allow_private_networks {
            builder = builder.dns_resolver(std::sync::Arc::new(PublicOnly));
        }
        Ok(Self {
            http: builder.build()?,
        })
    }

    /// POSTs one attempt and reads at most [`MAX_RESPONSE_BYTES`] of the answer.
    pub async fn post(&self, attempt: Attempt<'_>) -> Answer {
        let mut request = self
            .http
            .post(attempt.url.clone())
            .timeout(attempt.timeout)
            .body(attempt.body);
        for (name, value) in attempt.headers {
            request = request.header(name, value);
        }
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) => return failure(&error),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let mut read = 0;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    read += chunk.len();
                    if read >= MAX_RESPONSE_BYTES {
                        break; // the rest is dropped with the connection
                    }
                }
                Ok(None) => break,
                // The status is in: a body cut short does not change the outcome,
                // except that the whole attempt ran out of time.
                Err(error) if error.is_timeout() => return Answer::Timeout,
                Err(_) => break,
            }
        }
        Answer::Status {
            status,
            retry_after,
        }
    }
}

fn failure(error: &reqwest::Error) -> Answer {
    if error.is_timeout() {
        return Answer::Timeout;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<PrivateAddress>() {
            return Answer::Refused;
        }
        source = e.source();
    }
    Answer::ConnectError
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Resolves names as the system does, keeping only addresses push may connect to.
struct PublicOnly;

#[derive(Debug)]
struct PrivateAddress;

impl std::fmt::Display for PrivateAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the name resolves only to loopback, private, link-local or metadata addresses (push.allow_private_networks)",
        )
    }
}

impl std::error::Error for PrivateAddress {}

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let public: Vec<SocketAddr> = resolved.filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(Box::new(PrivateAddress) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[tokio::test]
    async fn a_name_for_loopback_is_refused_without_private_networks() {
        let client = PushClient::new(&PushSettings::default()).unwrap();
        let url = reqwest::Url::parse("http://localhost:9/").unwrap();
        let answer = client
            .post(Attempt {
                url: &url,
                timeout: Duration::from_secs(2),
                body: bytes::Bytes::new(),
                headers: Vec::new(),
            })
            .await;
        assert_eq!(answer, Answer::Refused);
    }
}
