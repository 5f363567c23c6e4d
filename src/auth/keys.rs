//! Token verification keys: where they come from (HMAC secrets, PEM public keys, a JWKS
//! file or URL), the one algorithm each key is pinned to, and reloading them without a
//! restart (files when they change, the URL periodically and on an unknown `kid`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPublicKey};
use serde::Deserialize;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::telemetry;

/// RSA moduli below this are refused (NIST SP 800-131A).
const MIN_RSA_BITS: usize = 2048;
/// A JWKS document larger than this is refused rather than buffered.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// One key a token can be verified with, pinned to one algorithm: a token is checked
/// against it only when the token's `alg` is exactly this one.
pub struct VerificationKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl VerificationKey {
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    pub(crate) fn decoding_key(&self) -> &DecodingKey {
        &self.key
    }
}

/// Key material stays out of logs.
impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// An HMAC secret from the config: it verifies tokens, and it is what `warren token`
/// and dev mode sign with.
#[derive(Clone)]
pub struct HmacSecret {
    pub kid: Option<String>,
    pub alg: Algorithm,
    secret: Vec<u8>,
}

impl HmacSecret {
    /// Refuses non-HMAC algorithms and secrets shorter than the hash (RFC 7518 §3.2).
    pub fn new(kid: Option<String>, alg: Algorithm, secret: Vec<u8>) -> Result<Self, String> {
        let min = match alg {
            Algorithm::HS256 => 32,
            Algorithm::HS384 => 48,
            Algorithm::HS512 => 64,
            other => return Err(format!("{other:?} is not an HMAC algorithm")),
        };
        if secret.len() < min {
            return Err(format!(
                "must be at least {min} bytes ({} bits) long for {alg:?}",
                min * 8
            ));
        }
        Ok(Self { kid, alg, secret })
    }

    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    pub fn encoding_key(&self) -> EncodingKey {
        EncodingKey::from_secret(&self.secret)
    }

    fn verification_key(&self) -> VerificationKey {
        VerificationKey {
            kid: self.kid.clone(),
            alg: self.alg,
            key: DecodingKey::from_secret(&self.secret),
        }
    }
}

impl fmt::Debug for HmacSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmacSecret")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// Parses a JWS algorithm name as the config spells it (`RS256`, `EdDSA`, ...).
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    Algorithm::from_str(name).map_err(|_| {
        format!(
            "unknown algorithm {name:?}; one of HS256, HS384, HS512, RS256, RS384, RS512, \
             PS256, PS384, PS512, ES256, ES384, EdDSA"
        )
    })
}

/// Checks that `key` can verify `alg` signatures, so a bad key fails when it is loaded,
/// not on every request that meets it.
fn check_key(alg: Algorithm, key: &DecodingKey) -> Result<(), String> {
    if alg.family() != key.family() {
        return Err(format!("a {:?} key cannot verify {alg:?}", key.family()));
    }
    match (key.family(), key.kind()) {
        (AlgorithmFamily::Rsa, kind) => {
            let public = match kind {
                DecodingKeyKind::SecretOrDer(der) => RsaPublicKey::from_pkcs1_der(der)
                    .map_err(|e| format!("not a valid RSA public key: {e}"))?,
                DecodingKeyKind::RsaModulusExponent { n, e } => {
                    RsaPublicKey::new(BigUint::from_bytes_be(n), BigUint::from_bytes_be(e))
                        .map_err(|e| format!("not a valid RSA public key: {e}"))?
                }
            };
            let bits = public.n().bits();
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "the RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"
                ));
            }
        }
        // jsonwebtoken slices the first 32 bytes of an Ed25519 key: check the length
        // here, where a short key is an error and not a panic.
        (AlgorithmFamily::Ed, DecodingKeyKind::SecretOrDer(bytes)) if bytes.len() != 32 => {
            return Err(format!(
                "an Ed25519 public key has 32 bytes, this one {}",
                bytes.len()
            ));
        }
        _ => {}
    }
    // Builds the verifier jsonwebtoken builds per request: this fails for an EC point
    // that is not on the curve `alg` needs.
    jsonwebtoken::crypto::verify("", b"", key, alg)
        .map(|_| ())
        .map_err(|e| format!("not a usable {alg:?} key: {e}"))
}

/// Loads a PEM public key (SPKI `PUBLIC KEY`, or PKCS#1 `RSA PUBLIC KEY`) for `alg`.
pub fn pem_key(kid: &str, alg: Algorithm, pem: &[u8]) -> Result<VerificationKey, String> {
    if String::from_utf8_lossy(pem).contains("PRIVATE KEY") {
        return Err(
            "this is a private key; give Warren the public key only (openssl pkey -pubout)"
                .to_owned(),
        );
    }
    let key = match alg.family() {
        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
        AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem),
        AlgorithmFamily::Hmac => {
            return Err(format!(
                "{alg:?} is an HMAC algorithm; HMAC secrets belong in auth.hs_secrets"
            ));
        }
    }
    .map_err(|e| format!("not a {:?} public key in PEM: {e}", alg.family()))?;
    check_key(alg, &key)?;
    Ok(VerificationKey {
        kid: Some(kid.to_owned()),
        alg,
        key,
    })
}

/// One entry of a JWKS `keys` array, as far as Warren reads it (RFC 7517/7518).
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    key_use: Option<String>,
    key_ops: Option<Vec<String>>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
    k: Option<String>,
}

#[derive(Deserialize)]
struct RawJwkSet {
    keys: Vec<serde_json::Value>,
}

/// The usable keys of a JWKS document and why the others were left out.
#[derive(Debug, Default)]
pub struct ParsedJwks {
    pub keys: Vec<Arc<VerificationKey>>,
    pub skipped: Vec<String>,
}

/// Reads a JWKS document. One unusable entry (an encryption key, an algorithm Warren
/// does not verify, a short RSA key) is skipped, not fatal: identity providers publish
/// such keys next to their signing keys. `symmetric` allows `oct` (HMAC) keys, which
/// Warren takes from a file but never from a URL.
pub fn parse_jwks(bytes: &[u8], symmetric: bool) -> Result<ParsedJwks, String> {
    let set: RawJwkSet = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JWKS document (a JSON object with \"keys\"): {e}"))?;
    let mut parsed = ParsedJwks::default();
    for (i, entry) in set.keys.into_iter().enumerate() {
        let label = entry.get("kid").and_then(|k| k.as_str()).map_or_else(
            || format!("keys[{i}]"),
            |kid| format!("keys[{i}] (kid {kid:?})"),
        );
        let outcome = serde_json::from_value::<RawJwk>(entry)
            .map_err(|e| e.to_string())
            .and_then(|raw| jwk_key(&raw, symmetric));
        match outcome {
            Ok(Some(key)) => parsed.keys.push(Arc::new(key)),
            Ok(None) => parsed.skipped.push(format!("{label}: not a signature key")),
            Err(reason) => parsed.skipped.push(format!("{label}: {reason}")),
        }
    }
    Ok(parsed)
}

/// The key of one JWK, `None` for keys not meant for signatures.
fn jwk_key<'a>(raw: &'a RawJwk, symmetric: bool) -> Result<Option<VerificationKey>, String> {
    if raw.key_use.as_deref().is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    if let Some(ops) = &raw.key_ops
        && !ops.iter().any(|op| op == "verify")
    {
        return Ok(None);
    }
    let need = |value: &'a Option<String>, name: &str| -> Result<&'a str, String> {
        value
            .as_deref()
            .ok_or_else(|| format!("a {} key needs {name:?}", raw.kty))
    };
    let alg = match raw.alg.as_deref() {
        Some(name) => Algorithm::from_str(name)
            .map_err(|_| format!("algorithm {name:?} is not one Warren verifies"))?,
        // Without `alg` the key type and curve decide; RSA keys are taken as RS256,
        // the OpenID Connect default (give `alg` for PS* or RS384/RS512 keys).
        None => match (raw.kty.as_str(), raw.crv.as_deref()) {
            ("RSA", _) => Algorithm::RS256,
            ("EC", Some("P-256")) => Algorithm::ES256,
            ("EC", Some("P-384")) => Algorithm::ES384,
            ("OKP", Some("Ed25519")) => Algorithm::EdDSA,
            _ => return Err("no \"alg\", and none follows from the key type".to_owned()),
        },
    };
    let key = match (raw.kty.as_str(), alg.family()) {
        ("RSA", AlgorithmFamily::Rsa) => {
            DecodingKey::from_rsa_components(need(&raw.n, "n")?, need(&raw.e, "e")?)
        }
        ("EC", AlgorithmFamily::Ec) => {
            let curve = if alg == Algorithm::ES256 {
                "P-256"
            } else {
                "P-384"
            };
            if raw.crv.as_deref() != Some(curve) {
                return Err(format!("{alg:?} needs curve {curve}, not {:?}", raw.crv));
            }
            DecodingKey::from_ec_components(need(&raw.x, "x")?, need(&raw.y, "y")?)
        }
        ("OKP", AlgorithmFamily::Ed) => {
            if raw.crv.as_deref() != Some("Ed25519") {
                return Err(format!("EdDSA keys must be Ed25519, not {:?}", raw.crv));
            }
            DecodingKey::from_ed_components(need(&raw.x, "x")?)
        }
        ("oct", AlgorithmFamily::Hmac) if symmetric => {
            let secret = URL_SAFE_NO_PAD
                .decode(need(&raw.k, "k")?.trim_end_matches('='))
                .map_err(|e| format!("\"k\" is not base64url: {e}"))?;
            let hmac = HmacSecret::new(raw.kid.clone(), alg, secret)?;
            return Ok(Some(hmac.verification_key()));
        }
        ("oct", _) => return Err("symmetric keys are not taken from a JWKS URL".to_owned()),
        (kty, _) => return Err(format!("a {kty:?} key cannot be a {alg:?} key")),
    }
    .map_err(|e| format!("malformed key: {e}"))?;
    check_key(alg, &key)?;
    Ok(Some(VerificationKey {
        kid: raw.kid.clone(),
        alg,
        key,
    }))
}

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

#[derive(Debug, Clone)]
enum FileKind {
    Pem { kid: String, alg: Algorithm },
    Jwks,
}

/// A key file (PEM or JWKS) with the keys of its last good read.
#[derive(Debug, Clone)]
pub struct KeyFile {
    /// The config key that names the file, for logs (`auth.public_key_files[0]`).
    source: String,
    path: PathBuf,
    kind: FileKind,
    stamp: Option<FileStamp>,
    keys: Vec<Arc<VerificationKey>>,
}

impl KeyFile {
    /// Reads a PEM public key file now.
    pub fn pem(source: &str, path: &Path, kid: &str, alg: Algorithm) -> Result<Self, String> {
        Self::load(
            source,
            path,
            FileKind::Pem {
                kid: kid.to_owned(),
                alg,
            },
        )
    }

    /// Reads a JWKS file now; it must hold at least one usable signature key.
    pub fn jwks(source: &str, path: &Path) -> Result<Self, String> {
        Self::load(source, path, FileKind::Jwks)
    }

    fn load(source: &str, path: &Path, kind: FileKind) -> Result<Self, String> {
        let mut file = Self {
            source: source.to_owned(),
            path: path.to_owned(),
            kind,
            stamp: None,
            keys: Vec::new(),
        };
        file.read()?;
        Ok(file)
    }

    /// Reads the file; on any error the previous keys and stamp stay as they were, so
    /// the next check tries again.
    fn read(&mut self) -> Result<(), String> {
        let stamp = stamp(&self.path)?;
        let bytes = std::fs::read(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        self.keys = match &self.kind {
            FileKind::Pem { kid, alg } => vec![Arc::new(pem_key(kid, *alg, &bytes)?)],
            FileKind::Jwks => {
                let parsed = parse_jwks(&bytes, true)?;
                if parsed.keys.is_empty() {
                    return Err(format!(
                        "{} holds no usable signature key ({})",
                        self.path.display(),
                        parsed.skipped.join("; ")
                    ));
                }
                for reason in &parsed.skipped {
                    warn!(source = %self.source, reason = %reason, "JWKS key skipped.");
                }
                parsed.keys
            }
        };
        self.stamp = Some(stamp);
        Ok(())
    }

    /// Re-reads the file when its modification time or size changed; `Ok(true)` when it
    /// was re-read.
    fn reload_if_changed(&mut self) -> Result<bool, String> {
        if self.stamp == Some(stamp(&self.path)?) {
            return Ok(false);
        }
        self.read()?;
        Ok(true)
    }
}

/// Every configured key source, checked and with files read (what `Config::resolve`
/// produces and [`KeyStore::start`] starts from).
#[derive(Debug, Clone)]
pub struct KeySources {
    pub hmac: Vec<HmacSecret>,
    pub files: Vec<KeyFile>,
    pub jwks_url: Option<String>,
    /// How often files are checked and the URL fetched.
    pub refresh_every: Duration,
    /// The least time between two refreshes caused by an unknown `kid`.
    pub min_refetch: Duration,
    /// Bound of one URL fetch, the first one at start included.
    pub fetch_timeout: Duration,
}

/// The JWKS URL and the keys of its last good fetch.
struct RemoteJwks {
    url: String,
    client: reqwest::Client,
    keys: Vec<Arc<VerificationKey>>,
    /// Whether the last fetch succeeded; while not, it is retried sooner.
    healthy: bool,
}

impl RemoteJwks {
    async fn fetch(&self) -> Result<ParsedJwks, String> {
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

/// The sources as they change at run time.
struct SourceState {
    hmac: Vec<Arc<VerificationKey>>,
    files: Vec<KeyFile>,
    remote: Option<RemoteJwks>,
    last_refresh: Option<Instant>,
}

impl SourceState {
    fn all_keys(&self) -> Vec<Arc<VerificationKey>> {
        let mut keys = self.hmac.clone();
        for file in &self.files {
            keys.extend(file.keys.iter().cloned());
        }
        if let Some(remote) = &self.remote {
            keys.extend(remote.keys.iter().cloned());
        }
        keys
    }
}

/// Why no key was found for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMiss {
    /// No key has the token's `kid`.
    UnknownKid,
    /// Keys with the token's `kid` exist, pinned to other algorithms.
    OtherAlgorithm(Vec<Algorithm>),
    /// The token has no `kid`, and no key is pinned to its algorithm.
    NoKeyForAlgorithm,
}

/// The keys in force at one moment.
#[derive(Debug, Default)]
pub struct KeySet(Vec<Arc<VerificationKey>>);

impl KeySet {
    /// The keys to try for a token with this `kid` and `alg`: with a `kid`, the keys
    /// having that `kid` and pinned to `alg`; without one, every key pinned to `alg`.
    pub fn select(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<Arc<VerificationKey>>, KeyMiss> {
        let Some(kid) = kid else {
            let keys: Vec<_> = self.0.iter().filter(|k| k.alg == alg).cloned().collect();
            return if keys.is_empty() {
                Err(KeyMiss::NoKeyForAlgorithm)
            } else {
                Ok(keys)
            };
        };
        let named: Vec<_> = self
            .0
            .iter()
            .filter(|k| k.kid.as_deref() == Some(kid))
            .collect();
        if named.is_empty() {
            return Err(KeyMiss::UnknownKid);
        }
        let keys: Vec<_> = named
            .iter()
            .filter(|k| k.alg == alg)
            .map(|k| Arc::clone(k))
            .collect();
        if keys.is_empty() {
            Err(KeyMiss::OtherAlgorithm(
                named.iter().map(|k| k.alg).collect(),
            ))
        } else {
            Ok(keys)
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The keys in force, and their sources. Requests read a snapshot (one `Arc` clone);
/// refreshes run one at a time and swap in a new snapshot.
pub struct KeyStore {
    current: RwLock<Arc<KeySet>>,
    sources: tokio::sync::Mutex<SourceState>,
    /// Refreshes finished so far; lets a request that waited for a running refresh
    /// use its result instead of starting another.
    refreshes: AtomicU64,
    reloadable: bool,
    refresh_every: Duration,
    min_refetch: Duration,
}

impl KeyStore {
    /// Builds the store and, with a JWKS URL, fetches it once: that fetch is bounded by
    /// `fetch_timeout`, and if it fails Warren starts without those keys (logged) and
    /// keeps trying every `min_refetch`.
    pub async fn start(sources: &KeySources) -> anyhow::Result<Arc<Self>> {
        let remote = match &sources.jwks_url {
            Some(url) => Some(RemoteJwks {
                url: url.clone(),
                client: reqwest::Client::builder()
                    .timeout(sources.fetch_timeout)
                    .connect_timeout(sources.fetch_timeout)
                    .user_agent(concat!("warren/", env!("CARGO_PKG_VERSION")))
                    .redirect(reqwest::redirect::Policy::custom(|attempt| {
                        // The https rule of auth.jwks_url holds for redirects too.
                        if attempt.previous().len() >= 5 {
                            attempt.error("too many redirects")
                        } else if attempt.url().scheme() == "https"
                            || is_loopback_host(attempt.url().host_str())
                        {
                            attempt.follow()
                        } else {
                            attempt.error("redirected away from https")
                        }
                    }))
                    .build()
                    .map_err(|e| anyhow::anyhow!("cannot build the JWKS client: {e}"))?,
                keys: Vec::new(),
                healthy: false,
            }),
            None => None,
        };
        let state = SourceState {
            hmac: sources
                .hmac
                .iter()
                .map(|s| Arc::new(s.verification_key()))
                .collect(),
            files: sources.files.clone(),
            remote,
            last_refresh: None,
        };
        let store = Arc::new(Self {
            current: RwLock::new(Arc::new(KeySet(state.all_keys()))),
            reloadable: !state.files.is_empty() || state.remote.is_some(),
            sources: tokio::sync::Mutex::new(state),
            refreshes: AtomicU64::new(0),
            refresh_every: sources.refresh_every,
            min_refetch: sources.min_refetch,
        });
        if sources.jwks_url.is_some() {
            store.refresh().await;
        }
        telemetry::auth_keys(store.keys().len());
        Ok(store)
    }

    /// The keys in force now.
    pub fn keys(&self) -> Arc<KeySet> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            // A panic while swapping cannot leave a half-written Arc behind.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Called for a token whose `kid` no key has: refreshes every source unless a
    /// refresh ran less than `min_refetch` ago, so a stream of made-up `kid`s costs at
    /// most one fetch per interval. `true` when the keys may have changed since the
    /// caller looked (a refresh ran, here or while the caller waited for one).
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        if !self.reloadable {
            return false;
        }
        let seen = self.refreshes.load(Ordering::Acquire);
        let mut state = self.sources.lock().await;
        if self.refreshes.load(Ordering::Acquire) != seen {
            return true;
        }
        if state
            .last_refresh
            .is_some_and(|at| at.elapsed() < self.min_refetch)
        {
            return false;
        }
        self.refresh_locked(&mut state).await;
        true
    }

    /// Re-reads changed files and fetches the URL; a source that fails keeps its last
    /// good keys.
    pub async fn refresh(&self) {
        let mut state = self.sources.lock().await;
        self.refresh_locked(&mut state).await;
    }

    async fn refresh_locked(&self, state: &mut SourceState) {
        state.last_refresh = Some(Instant::now());
        for file in &mut state.files {
            match file.reload_if_changed() {
                Ok(false) => {}
                Ok(true) => {
                    telemetry::auth_key_reload("file", true);
                    info!(source = %file.source, path = %file.path.display(),
                        kids = ?kids(&file.keys), "Token keys reloaded from file.");
                }
                Err(error) => {
                    telemetry::auth_key_reload("file", false);
                    warn!(source = %file.source, %error,
                        "Cannot reload token keys; keeping the previous ones.");
                }
            }
        }
        if let Some(remote) = &mut state.remote {
            match remote.fetch().await {
                Ok(parsed) => {
                    telemetry::auth_key_reload("url", true);
                    for reason in &parsed.skipped {
                        tracing::debug!(url = %remote.url, reason = %reason, "JWKS key skipped.");
                    }
                    if kids(&parsed.keys) != kids(&remote.keys) || !remote.healthy {
                        info!(url = %remote.url, kids = ?kids(&parsed.keys),
                            skipped = parsed.skipped.len(), "Token keys fetched from the JWKS URL.");
                    }
                    remote.keys = parsed.keys;
                    remote.healthy = true;
                }
                Err(error) => {
                    telemetry::auth_key_reload("url", false);
                    remote.healthy = false;
                    warn!(url = %remote.url, %error,
                        kept = remote.keys.len(), "JWKS fetch failed; keeping the previous keys.");
                }
            }
        }
        let next = Arc::new(KeySet(state.all_keys()));
        telemetry::auth_keys(next.len());
        match self.current.write() {
            Ok(mut current) => *current = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        self.refreshes.fetch_add(1, Ordering::AcqRel);
    }

    /// Time until the next periodic refresh: sooner while the URL is failing.
    async fn next_refresh_in(&self) -> Duration {
        let state = self.sources.lock().await;
        match &state.remote {
            Some(remote) if !remote.healthy => self.min_refetch.min(self.refresh_every),
            _ => self.refresh_every,
        }
    }

    /// Starts the periodic refresh when some source can change. The task ends when the
    /// store is dropped; the handle aborts it sooner.
    pub fn spawn_refresher(self: &Arc<Self>) -> Option<AbortHandle> {
        if !self.reloadable {
            return None;
        }
        let store: Weak<Self> = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                let Some(delay) = (match store.upgrade() {
                    Some(store) => Some(store.next_refresh_in().await),
                    None => None,
                }) else {
                    return;
                };
                tokio::time::sleep(delay).await;
                match store.upgrade() {
                    Some(store) => store.refresh().await,
                    None => return,
                }
            }
        });
        Some(task.abort_handle())
    }
}

fn kids(keys: &[Arc<VerificationKey>]) -> Vec<String> {
    keys.iter()
        .map(|k| format!("{}:{:?}", k.kid.as_deref().unwrap_or("-"), k.alg))
        .collect()
}
