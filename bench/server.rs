//! Warren as a separate process: its config, start, readiness and stop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail, ensure};

use super::http::Http;
use super::measure::WARREN_PID;
use super::{AMQP_URL, EXCHANGE, SECRET, WARREN_WORKERS};

pub(crate) struct Warren {
    pub(crate) child: Child,
    pub(crate) addr: String,
    pub(crate) token: String,
    pub(crate) log: PathBuf,
}

impl Warren {
    pub(crate) async fn start(bin: &Path, dir: &Path, name: &str) -> anyhow::Result<Self> {
        Self::start_on(bin, dir, name, &[AMQP_URL.to_owned()]).await
    }

    /// [`Warren::start`] against the broker (or cluster) at `urls`.
    pub(crate) async fn start_on(
        bin: &Path,
        dir: &Path,
        name: &str,
        urls: &[String],
    ) -> anyhow::Result<Self> {
        Self::start_with(bin, dir, name, urls, "").await
    }

    /// [`Warren::start_on`] with `extra` TOML appended to the config (more tables of
    /// the `bench` tenant, e.g. a push subscription).
    pub(crate) async fn start_with(
        bin: &Path,
        dir: &Path,
        name: &str,
        urls: &[String],
        extra: &str,
    ) -> anyhow::Result<Self> {
        let urls = urls
            .iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let workers = WARREN_WORKERS.load(Ordering::Relaxed);
        Self::launch(bin, dir, name, |addr| {
            format!(
                "[server]\nlisten = \"{addr}\"\nmax_concurrent_requests = 100000\n\
                 worker_threads = {workers}\n\
                 [amqp]\nurls = [{urls}]\n\
                 [auth]\nhs256_secret = \"{SECRET}\"\n\
                 [log]\nlevel = \"warn\"\n\
                 [ws]\nmax_sockets_per_tenant = 100000\n\
                 [tenants.bench]\nvhost = \"/\"\n\
                 publish = [{{ exchange = \"{EXCHANGE}\", routing_key = \"#\" }}]\n\
                 subscribe = [{{ exchange = \"{EXCHANGE}\", routing_key = \"#\" }}, {{ queue = \"warren-bench-pull\" }}]\n{extra}"
            )
        })
        .await
    }

    /// Starts Warren with the config `config(listen address)` returns, on a free port,
    /// and waits until it is ready; the token is for tenant `bench`.
    pub(crate) async fn launch(
        bin: &Path,
        dir: &Path,
        name: &str,
        config: impl FnOnce(&str) -> String,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let text = config(&addr);
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text)?;
        let out = Command::new(bin)
            .args(["token", "--config"])
            .arg(&config)
            .args(["--tenant", "bench", "--sub", "bench", "--scope"])
            .arg("publish subscribe")
            .args(["--ttl", "2h"])
            .output()
            .with_context(|| format!("running {} token", bin.display()))?;
        ensure!(
            out.status.success(),
            "warren token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout)?.trim().to_owned();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join(format!("{name}.err")))?)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        WARREN_PID.store(child.id(), Ordering::Relaxed);
        let mut warren = Warren {
            child,
            addr,
            token,
            log,
        };
        let ready = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n";
        for _ in 0..200 {
            if let Ok(mut c) = Http::connect(&warren.addr).await
                && c.call(ready).await.ok() == Some(200)
            {
                return Ok(warren);
            }
            if let Some(status) = warren.child.try_wait()? {
                bail!("warren exited with {status}; see {}", warren.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("warren did not become ready; see {}", warren.log.display())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS")?;
        Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
    }

    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A run that ends in an error still stops its Warren (otherwise it would keep the
/// port and the CPU for the next run).
impl Drop for Warren {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `warren-thin-relay` (built beside this binary, `bench/relay.rs`) as a process,
/// relaying to the bench exchange with `routing_key`.
pub(crate) struct ThinRelay {
    pub(crate) child: std::process::Child,
    pub(crate) addr: String,
}

impl ThinRelay {
    /// `options`: the relay's own (`--stack`, `--work-us`, `--mode`).
    pub(crate) async fn start(routing_key: &str, options: &[&str]) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let bin = std::env::current_exe()?.with_file_name("warren-thin-relay");
        let mut child = std::process::Command::new(&bin)
            .args(["--exchange", EXCHANGE, "--routing-key", routing_key])
            .args(options)
            .stdout(std::process::Stdio::piped())
            .stdin(std::process::Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (cargo build --release --example warren-thin-relay)",
                    bin.display()
                )
            })?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
        })
        .await??;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("the relay said {line:?}"))?
            .to_owned();
        Ok(Self { child, addr })
    }
}

impl Drop for ThinRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
