//! Key material: one verification key pinned to one algorithm, HMAC secrets, and
//! turning PEM and JWKS bytes into checked keys. No I/O here; reading files and
//! fetching URLs is [`super::sources`]' job.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPublicKey};
use serde::Deserialize;

/// RSA moduli below this are refused (NIST SP 800-131A).
const MIN_RSA_BITS: usize = 2048;

/// One key a token can be verified with, pinned to one algorithm: a token is checked
/// against it only when the token's `alg` is exactly this one.
pub struct VerificationKey {
    pub(super) kid: Option<String>,
    pub(super) alg: Algorithm,
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

    pub(super) fn verification_key(&self) -> VerificationKey {
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
