//! `[telemetry]` (SPEC §16): where spans go over OTLP/HTTP, the service name, the
//! sampler, and the bound on spans waiting for export. Each key unset falls back to
//! the OpenTelemetry environment variable for it (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`); with no endpoint at all, tracing is off.

use serde::Deserialize;

use super::ConfigError;
use super::check::all_positive;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans go to
    /// `<it>/v1/traces` (a URL already ending in `/v1/traces` is used as it is).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans; default `warren`.
    pub service_name: Option<String>,
    /// `always_on`, `always_off`, `traceidratio`, `parentbased_always_on` (default),
    /// `parentbased_always_off`, `parentbased_traceidratio`.
    pub sampler: Option<String>,
    /// The ratio of the `*traceidratio` samplers, 0 to 1 (default 1).
    pub sampler_arg: Option<f64>,
    /// Spans waiting for export at most (default 2048); past it new spans are dropped
    /// and counted (`warren_trace_spans_dropped_total`), never waited for.
    pub max_queue_spans: Option<usize>,
    /// One export's deadline (default 10 s).
    pub export_timeout_ms: Option<u64>,
}

/// Which traces are recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    /// Follow the caller's sampled flag when there is a parent, else the inner one.
    ParentBased(ParentRoot),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParentRoot {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

/// The settings in effect, config and environment together.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// The full traces URL.
    pub traces_url: String,
    pub service_name: String,
    pub sampler: Sampler,
    pub max_queue_spans: usize,
    pub export_timeout_ms: u64,
}

impl TelemetryConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.effective(|_| None).map(|_| ())
    }

    /// The settings in effect, reading the OpenTelemetry variables from the
    /// environment; `None` when no endpoint is set anywhere (tracing off).
    pub fn tracing(&self) -> Result<Option<Tracing>, ConfigError> {
        self.effective(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
    }

    /// [`TelemetryConfig::tracing`] with `env` for the environment.
    pub fn effective(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Tracing>, ConfigError> {
        all_positive(&[
            (
                "telemetry.max_queue_spans",
                self.max_queue_spans.unwrap_or(1) as u64,
            ),
            (
                "telemetry.export_timeout_ms",
                self.export_timeout_ms.unwrap_or(1),
            ),
        ])?;
        let (key, traces_url) = match (
            &self.otlp_endpoint,
            env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ) {
            (Some(base), _) => ("telemetry.otlp_endpoint", traces_url(base)),
            (None, Some(full)) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", full),
            (None, None) => match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(base) => ("OTEL_EXPORTER_OTLP_ENDPOINT", traces_url(&base)),
                None => return Ok(None),
            },
        };
        let url = url::Url::parse(traces_url.trim())
            .map_err(|e| ConfigError::invalid(key, format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(ConfigError::invalid(
                key,
                "must be an http:// or https:// URL with a host (OTLP/HTTP, e.g. http://collector:4318)",
            ));
        }
        let service_name = self
            .service_name
            .clone()
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "warren".to_owned());
        if service_name.is_empty() || service_name.len() > 255 {
            return Err(ConfigError::invalid(
                "telemetry.service_name",
                "must be 1 to 255 bytes",
            ));
        }
        let (sampler_key, sampler) = match &self.sampler {
            Some(s) => ("telemetry.sampler", Some(s.clone())),
            None => ("OTEL_TRACES_SAMPLER", env("OTEL_TRACES_SAMPLER")),
        };
        let arg = match (self.sampler_arg, env("OTEL_TRACES_SAMPLER_ARG")) {
            (Some(arg), _) => Some(("telemetry.sampler_arg", arg)),
            (None, Some(text)) => Some((
                "OTEL_TRACES_SAMPLER_ARG",
                text.trim().parse::<f64>().map_err(|_| {
                    ConfigError::invalid("OTEL_TRACES_SAMPLER_ARG", "must be a number from 0 to 1")
                })?,
            )),
            (None, None) => None,
        };
        let ratio = match arg {
            Some((key, ratio)) if !(0.0..=1.0).contains(&ratio) => {
                return Err(ConfigError::invalid(key, "must be from 0 to 1"));
            }
            Some((_, ratio)) => ratio,
            None => 1.0,
        };
        let sampler = match sampler.as_deref().map(str::trim) {
            None | Some("parentbased_always_on") => Sampler::ParentBased(ParentRoot::AlwaysOn),
            Some("always_on") => Sampler::AlwaysOn,
            Some("always_off") => Sampler::AlwaysOff,
            Some("traceidratio") => Sampler::Ratio(ratio),
            Some("parentbased_always_off") => Sampler::ParentBased(ParentRoot::AlwaysOff),
            Some("parentbased_traceidratio") => Sampler::ParentBased(ParentRoot::Ratio(ratio)),
            Some(other) => {
                return Err(ConfigError::invalid(
                    sampler_key,
                    format!(
                        "{other:?} is not a sampler: always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                    ),
                ));
            }
        };
        Ok(Some(Tracing {
            traces_url: url.to_string(),
            service_name,
            sampler,
            max_queue_spans: self.max_queue_spans.unwrap_or(2048),
            export_timeout_ms: self.export_timeout_ms.unwrap_or(10_000),
        }))
    }
}

/// `<base>/v1/traces`, unless `base` names that path already.
fn traces_url(base: &str) -> String {
    let base = base.trim().trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn off_without_an_endpoint_and_the_environment_fills_what_the_config_leaves() {
        let none = TelemetryConfig::default();
        assert_eq!(none.effective(env(&[])).unwrap(), None);
        let t = none
            .effective(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_SERVICE_NAME", "edge"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
            ]))
            .unwrap()
            .unwrap();
        assert_eq!(t.traces_url, "http://collector:4318/v1/traces");
        assert_eq!(t.service_name, "edge");
        assert_eq!(t.sampler, Sampler::ParentBased(ParentRoot::Ratio(0.01)));
        let full = none
            .effective(env(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://otel.example/custom/path",
            )]))
            .unwrap()
            .unwrap();
        assert_eq!(full.traces_url, "https://otel.example/custom/path");
        let config = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:4318".into()),
            sampler: Some("always_on".into()),
            ..TelemetryConfig::default()
        };
        let t = config
            .effective(env(&[(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://elsewhere:4318",
            )]))
            .unwrap()
            .unwrap();
        assert_eq!(t.traces_url, "http://127.0.0.1:4318/v1/traces");
        assert_eq!((t.sampler, t.max_queue_spans), (Sampler::AlwaysOn, 2048));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let bad =
            |config: TelemetryConfig, pairs: &[(&str, &str)]| match config.effective(env(pairs)) {
                Err(ConfigError::Invalid { key, .. }) => key,
                other => panic!("{other:?}"),
            };
        let with = |endpoint: &str| TelemetryConfig {
            otlp_endpoint: Some(endpoint.into()),
            ..TelemetryConfig::default()
        };
        assert_eq!(bad(with("collector:4318"), &[]), "telemetry.otlp_endpoint");
        assert_eq!(bad(with("ftp://c/"), &[]), "telemetry.otlp_endpoint");
        let sampler = TelemetryConfig {
            sampler: Some("sometimes".into()),
            ..with("http://c:4318")
        };
        assert_eq!(bad(sampler, &[]), "telemetry.sampler");
        assert_eq!(
            bad(with("http://c:4318"), &[("OTEL_TRACES_SAMPLER_ARG", "2")]),
            "OTEL_TRACES_SAMPLER_ARG"
        );
        let queue = TelemetryConfig {
            max_queue_spans: Some(0),
            ..with("http://c:4318")
        };
        assert_eq!(bad(queue, &[]), "telemetry.max_queue_spans");
    }
}
