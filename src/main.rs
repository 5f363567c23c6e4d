//! The `warren` command line: serve, token, check-config, openapi.

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
        Command::Openapi => {
            print!("{}", warren::api::openapi::to_pretty_json());
            ExitCode::SUCCESS
        }
    }
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
    warren::telemetry::init_tracing(
        &config.log.level,
        config.log.format == warren::config::LogFormat::Json,
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(async {
        let state = warren::App::start(config).await?;
        if dev {
            print_dev_banner(&state)?;
        }
        warren::run(state).await
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
