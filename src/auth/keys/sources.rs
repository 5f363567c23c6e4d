//! Where token keys come from: the described sources (HMAC secrets, PEM public key
//! files, a JWKS file, a JWKS URL) as the config names them, and reading them: files
//! when they change, the URL over https only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jsonwebtoken::Algorithm;
use tracing::warn;

use super::material::{HmacSecret, ParsedJwks, VerificationKey, parse_jwks, pem_key};

/// A JWKS document larger than this is refused rather than buffered.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// What a file looked like when it was last read, to notice that it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Result<FileStamp, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

/// A key file as the config describes it; [`KeySources::load_files`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFileSource {
    /// The config key that names the file, for logs and errors
    /// (`auth.public_key_files[0]`, `auth.jwks_file`).
    pub source: String,
    pub path: PathBuf,
    pub kind: KeyFileKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFileKind {
    /// A PEM public key, pinned to its `kid` and algorithm.
    Pem { kid: String, alg: Algorithm },
    /// A JWKS document; it must hold at least one usable signature key.
    Jwks,
}

impl KeyFileSource {
    /// The config key an unreadable or unusable file is reported under.
    fn error_key(&self) -> String {
        match self.kind {
            KeyFileKind::Pem { .. } => format!("{}.file", self.source),
            KeyFileKind::Jwks => self.source.clone(),
        }
    }
}

/// A key file that cannot be read or holds no usable key, named by its config key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct KeyLoadError {
    pub key: String,
    pub message: String,
}

/// A key file (PEM or JWKS) with the keys of its last good read.
#[derive(Debug, Clone)]
pub struct KeyFile {
    pub(super) source: KeyFileSource,
    stamp: Option<FileStamp>,
    pub(super) keys: Vec<Arc<VerificationKey>>,
}

impl KeyFile {
    /// Reads the file now.
    fn load(source: &KeyFileSource) -> Result<Self, KeyLoadError> {
        let mut file = Self {
            source: source.clone(),
            stamp: None,
            keys: Vec::new(),
        };
        file.read().map_err(|message| KeyLoadError {
            key: source.error_key(),
            message,
        })?;
        Ok(file)
    }

    pub(super) fn path(&self) -> &Path {
        &self.source.path
    }

    /// Reads the file; on any error the previous keys and stamp stay as they were, so
    /// the next check tries again.
    fn read(&mut self) -> Result<(), String> {
        let path = &self.source.path;
        let stamp = stamp(path)?;
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        self.keys = match &self.source.kind {
            KeyFileKind::Pem { kid, alg } => vec![Arc::new(pem_key(kid, *alg, &bytes)?)],
            KeyFileKind::Jwks => {
                let parsed = parse_jwks(&bytes, true)?;
                if parsed.keys.is_empty() {
                    return Err(format!(
                        "{} holds no usable signature key ({})",
                        path.display(),
                        parsed.skipped.join("; ")
                    ));
                }
                for reason in &parsed.skipped {
                    warn!(source = %self.source.source, reason = %reason, "JWKS key skipped.");
                }
                parsed.keys
            }
        };
        self.stamp = Some(stamp);
        Ok(())
    }

    /// Re-reads the file when its modification time or size changed; `Ok(true)` when it
    /// was re-read.
    pub(super) fn reload_if_changed(&mut self) -> Result<bool, String> {
        if self.stamp == Some(stamp(&self.source.path)?) {
            return Ok(false);
        }
        self.read()?;
        Ok(true)
    }
}

/// Every configured key source, described and checked but not read: what
/// `Config::resolve` produces and [`super::KeyStore::start`] loads.
#[derive(Debug, Clone)]
pub struct KeySources {
    pub hmac: Vec<HmacSecret>,
    pub files: Vec<KeyFileSource>,
    pub jwks_url: Option<String>,
    /// How often files are checked and the URL fetched.
    pub refresh_every: Duration,
    /// The least time between two refreshes caused by an unknown `kid`.
    pub min_refetch: Duration,
    /// Bound of one URL fetch, the first one at start included.
    pub fetch_timeout: Duration,
}

impl KeySources {
    /// Reads every key file now, as the key store does at start: `check-config` calls
    /// this to catch bad keys. The error names the config key of the first bad file.
    pub fn check_files(&self) -> Result<(), KeyLoadError> {
        self.load_files().map(|_| ())
    }

    pub(super) fn load_files(&self) -> Result<Vec<KeyFile>, KeyLoadError> {
        self.files.iter().map(KeyFile::load).collect()
    }
}

/// The JWKS URL and the keys of its last good fetch.
pub(super) struct RemoteJwks {
    pub(super) url: String,
    pub(super) client: reqwest::Client,
    pub(super) keys: Vec<Arc<VerificationKey>>,
    /// Whether the last fetch succeeded; while not, it is retried sooner.
    pub(super) healthy: bool,
}

impl RemoteJwks {
    pub(super) async fn fetch(&self) -> Result<ParsedJwks, String> {
        let mut response = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("the server answered {status}"));
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
        {
            return Err(format!("the document is over {MAX_JWKS_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the document is over {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let parsed = parse_jwks(&body, false)?;
        if parsed.keys.is_empty() {
            return Err(format!(
                "no usable signature key in the document ({})",
                parsed.skipped.join("; ")
            ));
        }
        Ok(parsed)
    }
}

/// `localhost` or a loopback address: where plain http cannot be intercepted.
pub fn is_loopback_host(host: Option<&str>) -> bool {
    host.is_some_and(|host| {
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
