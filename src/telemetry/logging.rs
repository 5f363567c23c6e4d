//! The `tracing` subscriber: log lines to stderr, and Warren's spans to the OpenTelemetry
//! exporter when traces are on (SPEC §16).

use tracing_subscriber::EnvFilter;

/// Installs the `tracing` subscriber: human text, or JSON lines when `json`. `level` is
/// a filter directive (`log.level`); `RUST_LOG` wins over it. With `traces`, Warren's
/// spans (target [`crate::otel::TARGET`], whatever the log level) are exported too;
/// call it inside the runtime, which runs the export task.
pub fn init_tracing(
    level: &str,
    json: bool,
    traces: Option<&crate::config::Tracing>,
) -> anyhow::Result<()> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // lapin logs a returned message with its body at WARN; bodies are never logged.
    // It also logs every channel the broker closes at ERROR, including those a client
    // causes (a missing exchange); Warren logs those itself, at the level they deserve.
    const QUIET: &str = "lapin::returned_messages=off,lapin::channel=off";
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},{QUIET}")))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{QUIET}")))
        .add_directive("lapin::returned_messages=off".parse().unwrap_or_default())
        .add_directive("lapin::channel=off".parse().unwrap_or_default());
    // Colours only for a person at a terminal: escape codes in a log file or a
    // collector's input are noise, and rendering them was a tenth of a request's CPU.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = if json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    };
    let otel = match traces {
        Some(settings) => Some(
            tracing_opentelemetry::layer()
                .with_tracer(crate::otel::tracer(settings)?)
                .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                    meta.target() == crate::otel::TARGET
                })),
        ),
        None => None,
    };
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Ok(())
}
