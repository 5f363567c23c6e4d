//! The `warren` command line: serve, token, check-config, openapi, topology.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// glibc's allocator fragments under the gateway's mix of short-lived request buffers and
/// long-lived idempotency entries (malloc_consolidate showed up in profiles); mimalloc
/// does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use warren::auth::{TokenRequest, mint};
use warren::config::Config;

#[derive(Parser)]
#[command(
    name = "warren",
    version,
    about = "HTTP/WebSocket gateway for RabbitMQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. Without --config: dev mode (loopback, tenant `default` on vhost `/`,
    /// local guest broker, random token secret; prints a token and a curl example).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override server.listen (e.g. 127.0.0.1:9000).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Mint a token signed with the configured HMAC secret (auth.hs256_secret, else the
    /// first auth.hs_secrets entry), for development and tests.
    Token {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        sub: String,
        #[arg(long, default_value = "publish subscribe")]
        scope: String,
        /// Lifetime, e.g. 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Validate a config file; exits non-zero with a message naming the bad key.
    CheckConfig { file: PathBuf },
    /// Print the OpenAPI 3.1 document (what openapi/openapi.json holds and /openapi.json serves).
    Openapi,
    /// Topology as code (SPEC §11): compare, declare, redrive dead letters.
    #[command(subcommand)]
    Topology(TopologyCommand),
}

#[derive(Subcommand)]
enum TopologyCommand {
    /// Per tenant: what exists, what is missing, what conflicts (exit 2 on conflicts).
    Plan {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Declare what is missing; refuses (exit 2, nothing applied) on any conflict.
    Apply {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Move up to --limit messages from <queue>.dlq back to the queue.
    Redrive {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        queue: String,
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        limit: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, listen } => serve(config, listen),
        Command::Token {
            config,
            tenant,
            sub,
            scope,
            ttl,
        } => token(config, &tenant, &sub, &scope, ttl),
        Command::CheckConfig { file } => check_config(file),
        Command::Topology(command) => topology(command),
        Command::Openapi => {
            print!("{}", warren::api::openapi::to_pretty_json());
            ExitCode::SUCCESS
        }
    }
}

/// The cores this process may run on (its CPU affinity and cgroup quota), 1 if unknown.
fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn serve(path: Option<PathBuf>, listen: Option<std::net::SocketAddr>) -> ExitCode {
    let dev = path.is_none();
    let mut config = match &path {
        Some(path) => match Config::load(path) {
            Ok(config) => config,
            Err(e) => return fail(e),
        },
        None => Config::dev(),
    };
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    let traces = match config.telemetry.tracing() {
        Ok(traces) => traces,
        Err(e) => return fail(e),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(config.server.runtime_threads(available_cores()));
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(async {
        // In the runtime: the span export task runs on it.
        warren::telemetry::init_tracing(
            &config.log.level,
            config.log.format == warren::config::LogFormat::Json,
            traces.as_ref(),
        )
        .context("cannot set up trace export (telemetry)")?;
        // Bound first: a port in use is one line and an exit, with no broker
        // connection started that would have to be torn down.
        let listeners = warren::Listeners::bind(&config.server).await?;
        let state = warren::App::start(config).await?;
        if dev {
            print_dev_banner(&state)?;
        }
        let ran = warren::run(state, listeners).await;
        // The spans of the last requests (the export task batches for 200 ms).
        warren::otel::flush(Duration::from_secs(2)).await;
        ran
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}")),
    }
}

fn print_dev_banner(state: &warren::AppState) -> anyhow::Result<()> {
    let secret = state
        .resolved
        .signing_secret
        .as_ref()
        .context("dev mode has no token secret")?;
    let token = mint(
        &state.config.auth,
        secret,
        &TokenRequest {
            tenant: "default",
            subject: "dev",
            scope: "publish subscribe",
            ttl: Duration::from_secs(24 * 3600),
        },
    )?;
    let listen = state.config.server.listen;
    println!(
        "\nWarren dev mode: listening on http://{listen} only, tenant `default` on vhost `/`,\n\
         broker {}. The token secret is random and lives only in this process.\n\n\
         export TOKEN={token}\n\n\
         curl -sS -X POST http://{listen}/v1/publish \\\n  \
         -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\n  \
         -d '{{\"exchange\":\"amq.topic\",\"routing_key\":\"demo.hello\",\"payload\":{{\"hello\":\"world\"}},\"mandatory\":false}}'\n\n\
         (`mandatory` defaults to true: with no queue bound, a publish answers 422 unroutable.)\n",
        state
            .resolved
            .broker_urls
            .join(", ")
            .split('@')
            .next_back()
            .unwrap_or_default()
    );
    Ok(())
}

fn token(path: PathBuf, tenant: &str, sub: &str, scope: &str, ttl: Duration) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => return fail(e),
    };
    let resolved = match config.resolve() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if !resolved.tenants.contains_key(tenant) {
        return fail(format!(
            "tenant {tenant:?} is not configured in {}",
            path.display()
        ));
    }
    let request = TokenRequest {
        tenant,
        subject: sub,
        scope,
        ttl,
    };
    let Some(secret) = &resolved.signing_secret else {
        return fail(format!(
            "{} has no HMAC secret to sign with: `warren token` needs auth.hs256_secret, \
             auth.hs256_secret_file or auth.hs_secrets. Tokens for public keys \
             (auth.public_key_files, auth.jwks_file, auth.jwks_url) come from the identity \
             provider that holds the private key.",
            path.display()
        ));
    };
    match mint(&config.auth, secret, &request) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("cannot sign the token: {e}")),
    }
}

fn check_config(path: PathBuf) -> ExitCode {
    // Key files are the key store's to read; check-config reads them too, to catch bad
    // keys before a deploy does.
    let checked = Config::load(&path)
        .map_err(|e| e.to_string())
        .and_then(|c| c.resolve().map(|r| (c, r)).map_err(|e| e.to_string()))
        .and_then(|(c, r)| {
            r.token_keys
                .check_files()
                .map(|()| c)
                .map_err(|e| e.to_string())
        });
    match checked {
        Ok(config) => {
            for warning in config.warnings() {
                eprintln!("{}: warning: {warning}", path.display());
            }
            println!(
                "{}: OK ({} tenant(s), listening on {})",
                path.display(),
                config.tenants.len(),
                config.server.listen
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("{}: {e}", path.display())),
    }
}

fn topology(command: TopologyCommand) -> ExitCode {
    use warren::topology::run::{Verdict, apply_command, plan_command, redrive_command};
    let path = match &command {
        TopologyCommand::Plan { config, .. }
        | TopologyCommand::Apply { config, .. }
        | TopologyCommand::Redrive { config, .. } => config,
    };
    let (config, resolved) = match Config::load(path).and_then(|c| c.resolve().map(|r| (c, r))) {
        Ok(loaded) => loaded,
        Err(e) => return fail(format!("{}: {e}", path.display())),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    let tenants = resolved.tenants.values();
    let known = |tenant: &Option<String>| match tenant {
        Some(t) if !resolved.tenants.contains_key(t) => Err(fail(format!(
            "tenant {t:?} is not configured in {}",
            path.display()
        ))),
        _ => Ok(()),
    };
    let (verdict, report) = match &command {
        TopologyCommand::Plan { tenant, .. } => {
            if let Err(code) = known(tenant) {
                return code;
            }
            runtime.block_on(plan_command(&config.amqp, tenants, tenant.as_deref()))
        }
        TopologyCommand::Apply { tenant, .. } => {
            if let Err(code) = known(tenant) {
                return code;
            }
            runtime.block_on(apply_command(&config.amqp, tenants, tenant.as_deref()))
        }
        TopologyCommand::Redrive {
            tenant,
            queue,
            limit,
            ..
        } => {
            let Some(t) = resolved.tenants.get(tenant) else {
                return fail(format!(
                    "tenant {tenant:?} is not configured in {}",
                    path.display()
                ));
            };
            match runtime.block_on(redrive_command(&config.amqp, t, queue, *limit)) {
                Ok(moved) => (
                    Verdict::Clean,
                    format!("redriven {moved} message(s) to queue {queue:?}\n"),
                ),
                Err(e) => (Verdict::Failed, format!("redrive failed: {e}\n")),
            }
        }
    };
    print!("{report}");
    match verdict {
        Verdict::Clean => ExitCode::SUCCESS,
        Verdict::Conflicts => ExitCode::from(2),
        Verdict::Failed => ExitCode::FAILURE,
    }
}
