//! `[auth]`: how tokens are checked and where their keys come from. The sources are
//! checked and described here (secrets read, since a secret is a setting); key files
//! and the JWKS URL are read by the key store ([`crate::auth::keys`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::Deserialize;

use super::ConfigError;
use super::check::{Given, all_positive, inline_or_file};
use crate::auth::keys::{
    HmacSecret, KeyFileKind, KeyFileSource, KeySources, is_loopback_host, parse_algorithm,
};
use crate::auth::rules::ClaimRules;

/// Token verification (SPEC §3). At least one key source is required: an HS256 secret,
/// `hs_secrets`, `public_key_files`, `jwks_file` or `jwks_url`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub hs256_secret: Option<String>,
    pub hs256_secret_file: Option<PathBuf>,
    /// `kid` of the HS256 secret. When set, tokens must name it, and `warren token`
    /// puts it in the header; when unset, the secret verifies tokens without a `kid`.
    pub hs256_kid: Option<String>,
    /// More HMAC keys, each with its own `kid` and algorithm (rotation of shared secrets).
    pub hs_secrets: Vec<HsSecretConfig>,
    /// PEM public keys (RS*, PS*, ES256/384, EdDSA), each pinned to a `kid` and algorithm.
    pub public_key_files: Vec<PublicKeyFileConfig>,
    /// A JWKS document on disk, re-read when it changes.
    pub jwks_file: Option<PathBuf>,
    /// An identity provider's JWKS endpoint (https; http only on loopback).
    pub jwks_url: Option<String>,
    /// How often key files are checked for changes and `jwks_url` is fetched.
    pub jwks_refresh_s: u64,
    /// The least time between two refreshes caused by a token with an unknown `kid`.
    pub jwks_min_refetch_s: u64,
    /// Bound of one `jwks_url` fetch, including the first one at start.
    pub jwks_timeout_ms: u64,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub tenant_claim: String,
    pub leeway_s: u64,
    /// Verified tokens kept so that a token sent again is not verified again (until its
    /// `exp`, with the keys it verified against); 0 turns the cache off.
    pub token_cache_entries: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            hs256_secret_file: None,
            hs256_kid: None,
            hs_secrets: Vec::new(),
            public_key_files: Vec::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_s: 300,
            jwks_min_refetch_s: 30,
            jwks_timeout_ms: 5000,
            issuer: None,
            audience: None,
            tenant_claim: "tenant".to_owned(),
            leeway_s: 30,
            token_cache_entries: 10_000,
        }
    }
}

/// `[[auth.hs_secrets]]`: an HMAC key with its `kid`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsSecretConfig {
    pub kid: String,
    /// HS256 (default), HS384 or HS512.
    #[serde(default = "default_hs_alg")]
    pub alg: String,
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
}

fn default_hs_alg() -> String {
    "HS256".to_owned()
}

/// `[[auth.public_key_files]]`: a PEM public key with its `kid` and algorithm.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFileConfig {
    pub kid: String,
    pub alg: String,
    pub file: PathBuf,
}

/// Claims the first use of each `kid`: one kid names one key, so the same kid twice in
/// the config is a mistake.
#[derive(Default)]
struct Kids(BTreeMap<String, String>);

impl Kids {
    fn claim(&mut self, key: &str, kid: &str) -> Result<(), ConfigError> {
        if kid.is_empty() {
            return Err(ConfigError::invalid(key, "must not be empty"));
        }
        match self.0.insert(kid.to_owned(), key.to_owned()) {
            Some(other) => Err(ConfigError::invalid(
                key,
                format!("kid {kid:?} is already used by {other}"),
            )),
            None => Ok(()),
        }
    }
}

/// The bytes of a secret given inline or in a file (a file's trailing newline is not
/// part of it).
fn secret_bytes(given: Given<'_>) -> Vec<u8> {
    match given {
        Given::Inline(secret) => secret.as_bytes().to_vec(),
        Given::File(text) => text.trim_end().as_bytes().to_vec(),
    }
}

impl From<&AuthConfig> for ClaimRules {
    fn from(config: &AuthConfig) -> Self {
        Self {
            tenant_claim: config.tenant_claim.clone(),
            leeway_s: config.leeway_s,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        }
    }
}

impl AuthConfig {
    /// Checks the section and describes every key source; also returns what `warren
    /// token` and dev mode sign with.
    pub(super) fn key_sources(&self) -> Result<(KeySources, Option<HmacSecret>), ConfigError> {
        if self.tenant_claim.is_empty() {
            return Err(ConfigError::invalid(
                "auth.tenant_claim",
                "must not be empty",
            ));
        }
        all_positive(&[
            ("auth.jwks_refresh_s", self.jwks_refresh_s),
            ("auth.jwks_min_refetch_s", self.jwks_min_refetch_s),
            ("auth.jwks_timeout_ms", self.jwks_timeout_ms),
        ])?;
        let mut kids = Kids::default();
        let mut hmac = Vec::new();
        let hs256 = inline_or_file(
            self.hs256_secret.as_deref(),
            self.hs256_secret_file.as_deref(),
            "auth.hs256_secret_file",
            (
                "auth.hs256_secret_file",
                "set either auth.hs256_secret or auth.hs256_secret_file, not both",
            ),
        )?;
        match hs256 {
            Some(given) => {
                if let Some(kid) = &self.hs256_kid {
                    kids.claim("auth.hs256_kid", kid)?;
                }
                let secret = HmacSecret::new(
                    self.hs256_kid.clone(),
                    Algorithm::HS256,
                    secret_bytes(given),
                )
                .map_err(|m| ConfigError::invalid("auth.hs256_secret", m))?;
                hmac.push(secret);
            }
            None if self.hs256_kid.is_some() => {
                return Err(ConfigError::invalid(
                    "auth.hs256_kid",
                    "is set, but neither auth.hs256_secret nor auth.hs256_secret_file is",
                ));
            }
            None => {}
        }
        for (i, entry) in self.hs_secrets.iter().enumerate() {
            let prefix = format!("auth.hs_secrets[{i}]");
            kids.claim(&format!("{prefix}.kid"), &entry.kid)?;
            let alg = parse_algorithm(&entry.alg)
                .map_err(|m| ConfigError::invalid(format!("{prefix}.alg"), m))?;
            let secret_key = format!("{prefix}.secret");
            let given = inline_or_file(
                entry.secret.as_deref(),
                entry.secret_file.as_deref(),
                &format!("{prefix}.secret_file"),
                (&secret_key, "set exactly one of secret and secret_file"),
            )?
            .ok_or_else(|| {
                ConfigError::invalid(&secret_key, "set exactly one of secret and secret_file")
            })?;
            let secret = HmacSecret::new(Some(entry.kid.clone()), alg, secret_bytes(given))
                .map_err(|m| {
                    let field = if alg.family() == AlgorithmFamily::Hmac {
                        "secret"
                    } else {
                        "alg"
                    };
                    ConfigError::invalid(format!("{prefix}.{field}"), m)
                })?;
            hmac.push(secret);
        }

        let mut files = Vec::new();
        for (i, entry) in self.public_key_files.iter().enumerate() {
            let prefix = format!("auth.public_key_files[{i}]");
            kids.claim(&format!("{prefix}.kid"), &entry.kid)?;
            let alg = parse_algorithm(&entry.alg)
                .map_err(|m| ConfigError::invalid(format!("{prefix}.alg"), m))?;
            if alg.family() == AlgorithmFamily::Hmac {
                return Err(ConfigError::invalid(
                    format!("{prefix}.alg"),
                    format!("{alg:?} is an HMAC algorithm; HMAC secrets belong in auth.hs_secrets"),
                ));
            }
            files.push(KeyFileSource {
                source: prefix,
                path: entry.file.clone(),
                kind: KeyFileKind::Pem {
                    kid: entry.kid.clone(),
                    alg,
                },
            });
        }
        if let Some(path) = &self.jwks_file {
            files.push(KeyFileSource {
                source: "auth.jwks_file".to_owned(),
                path: path.clone(),
                kind: KeyFileKind::Jwks,
            });
        }
        let jwks_url = match &self.jwks_url {
            Some(url) => Some(check_jwks_url(url)?),
            None => None,
        };
        if hmac.is_empty() && files.is_empty() && jwks_url.is_none() {
            return Err(ConfigError::invalid(
                "auth",
                "a token key is required: set auth.hs256_secret (or auth.hs256_secret_file), \
                 auth.hs_secrets, auth.public_key_files, auth.jwks_file or auth.jwks_url",
            ));
        }
        let signing_secret = hmac.first().cloned();
        Ok((
            KeySources {
                hmac,
                files,
                jwks_url,
                refresh_every: Duration::from_secs(self.jwks_refresh_s),
                min_refetch: Duration::from_secs(self.jwks_min_refetch_s),
                fetch_timeout: Duration::from_millis(self.jwks_timeout_ms),
            },
            signing_secret,
        ))
    }
}

/// A JWKS URL must be https: over plain http anyone on the path could hand Warren their
/// own keys. Plain http is allowed for loopback addresses (a local sidecar, tests).
fn check_jwks_url(url: &str) -> Result<String, ConfigError> {
    let key = "auth.jwks_url";
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ConfigError::invalid(key, format!("not a valid URL: {e}")))?;
    let loopback = is_loopback_host(parsed.host_str());
    match parsed.scheme() {
        "https" => Ok(url.to_owned()),
        "http" if loopback => Ok(url.to_owned()),
        _ => Err(ConfigError::invalid(
            key,
            "must be an https:// URL (http:// only for a loopback address)",
        )),
    }
}
