//! The verifier under attack: every algorithm family verifies with its pinned key, and
//! `alg: none`, key confusion, unknown or foreign `kid`s, bad claims and tampering are
//! all 401. Keys are the committed test pairs under `tests/keys/`.
//!
//! Over 500 lines on purpose: one test per attack and per key kind, kept together so
//! the verifier's whole threat list reads in one place.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::Verifier;
use super::keys::{KeyMiss, KeySources, KeyStore, parse_jwks};
use crate::config::{Config, HsSecretConfig};
use crate::error::ApiError;

const SECRET: &str = "unit-test-hs256-secret-0123456789abcdef";
const HS384_SECRET: &str = "unit-test-hs384-secret-0123456789abcdef0123456789abcdef";
const HS512_SECRET: &str =
    "unit-test-hs512-secret-0123456789abcdef0123456789abcdef0123456789abcdef";

fn key_file(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(key_file(name)).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims that pass every check of [`verifier`].
fn claims() -> Value {
    json!({"sub": "s", "tenant": "acme", "scope": "publish", "exp": now() + 600,
           "iss": "https://idp.test", "aud": "warren"})
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn private_key(alg: Algorithm, name: &str) -> EncodingKey {
    let pem = read(&format!("{name}.key.pem"));
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .unwrap()
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn b64(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(text)
}

/// One key per algorithm: the HS256 secret without kid, two more HMAC secrets, and the
/// RSA key `rsa-a` once per RSA algorithm, each under its own kid.
fn config(extra: &str) -> Config {
    let rsa = key_file("rsa-a.pub.pem");
    let text = format!(
        "[auth]\nhs256_secret = \"{SECRET}\"\nissuer = \"https://idp.test\"\naudience = \"warren\"\n\
         hs_secrets = [{{ kid = \"hs384\", alg = \"HS384\", secret = \"{HS384_SECRET}\" }},\n\
                       {{ kid = \"hs512\", alg = \"HS512\", secret = \"{HS512_SECRET}\" }}]\n\
         public_key_files = [\n\
           {{ kid = \"rsa-a\", alg = \"RS256\", file = {rsa:?} }},\n\
           {{ kid = \"rsa-a-rs384\", alg = \"RS384\", file = {rsa:?} }},\n\
           {{ kid = \"rsa-a-rs512\", alg = \"RS512\", file = {rsa:?} }},\n\
           {{ kid = \"rsa-a-ps256\", alg = \"PS256\", file = {rsa:?} }},\n\
           {{ kid = \"rsa-a-ps384\", alg = \"PS384\", file = {rsa:?} }},\n\
           {{ kid = \"rsa-a-ps512\", alg = \"PS512\", file = {rsa:?} }},\n\
           {{ kid = \"ec-p256\", alg = \"ES256\", file = {:?} }},\n\
           {{ kid = \"ec-p384\", alg = \"ES384\", file = {:?} }},\n\
           {{ kid = \"ed25519\", alg = \"EdDSA\", file = {:?} }},\n\
         ]\n{extra}\n[tenants.acme]\nvhost = \"acme\"\n",
        key_file("ec-p256.pub.pem"),
        key_file("ec-p384.pub.pem"),
        key_file("ed25519.pub.pem"),
    );
    Config::from_toml(&text).unwrap()
}

async fn start(config: &Config) -> Verifier {
    let resolved = config.resolve().unwrap();
    let entries = config.auth.token_cache_entries;
    Verifier::start(&config.auth, &resolved.token_keys, entries)
        .await
        .unwrap()
}

async fn verifier() -> Verifier {
    start(&config("")).await
}

#[track_caller]
fn assert_unauthorized(outcome: Result<super::Claims, ApiError>, case: &str) {
    match outcome {
        Err(error @ ApiError::Unauthorized(_)) => {
            assert_eq!(error.status().as_u16(), 401, "{case}");
        }
        Err(other) => panic!("{case}: expected 401 unauthorized, got {other:?}"),
        Ok(claims) => panic!("{case}: accepted ({claims:?})"),
    }
}

/// (alg, kid, private key file) for every algorithm Warren verifies.
fn asymmetric_cases() -> Vec<(Algorithm, &'static str, &'static str)> {
    vec![
        (Algorithm::RS256, "rsa-a", "rsa-a"),
        (Algorithm::RS384, "rsa-a-rs384", "rsa-a"),
        (Algorithm::RS512, "rsa-a-rs512", "rsa-a"),
        (Algorithm::PS256, "rsa-a-ps256", "rsa-a"),
        (Algorithm::PS384, "rsa-a-ps384", "rsa-a"),
        (Algorithm::PS512, "rsa-a-ps512", "rsa-a"),
        (Algorithm::ES256, "ec-p256", "ec-p256"),
        (Algorithm::ES384, "ec-p384", "ec-p384"),
        (Algorithm::EdDSA, "ed25519", "ed25519"),
    ]
}

#[tokio::test]
async fn every_algorithm_verifies_with_its_pinned_key() {
    let verifier = verifier().await;
    for (alg, kid, name) in asymmetric_cases() {
        let token = sign(alg, Some(kid), &private_key(alg, name), &claims());
        let verified = verifier.verify(&token).await;
        let claims = verified.unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(
            (claims.tenant.as_str(), claims.subject.as_str()),
            ("acme", "s")
        );
    }
    for (alg, kid, secret) in [
        (Algorithm::HS256, None, SECRET),
        (Algorithm::HS384, Some("hs384"), HS384_SECRET),
        (Algorithm::HS512, Some("hs512"), HS512_SECRET),
    ] {
        let key = EncodingKey::from_secret(secret.as_bytes());
        let token = sign(alg, kid, &key, &claims());
        verifier
            .verify(&token)
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
    }
}

#[tokio::test]
async fn a_token_without_kid_is_tried_on_every_key_of_its_algorithm() {
    let verifier = verifier().await;
    // No kid: the RS384 registration of rsa-a is the one RS384 key.
    let token = sign(
        Algorithm::RS384,
        None,
        &private_key(Algorithm::RS384, "rsa-a"),
        &claims(),
    );
    verifier.verify(&token).await.unwrap();
    let token = sign(
        Algorithm::EdDSA,
        None,
        &private_key(Algorithm::EdDSA, "ed25519"),
        &claims(),
    );
    verifier.verify(&token).await.unwrap();

    // Two HS384 secrets (a rotation): a kid-less token is tried on both.
    const NEW: &str = "another-hs384-secret-0123456789abcdef0123456789ab";
    let mut rotated = config("");
    rotated.auth.hs_secrets.push(HsSecretConfig {
        kid: "hs384-new".to_owned(),
        alg: "HS384".to_owned(),
        secret: Some(NEW.to_owned()),
        secret_file: None,
    });
    let verifier = start(&rotated).await;
    for secret in [HS384_SECRET, NEW] {
        let key = EncodingKey::from_secret(secret.as_bytes());
        let token = sign(Algorithm::HS384, None, &key, &claims());
        verifier.verify(&token).await.unwrap();
    }
    // ...and a bad signature fails on both.
    let key = EncodingKey::from_secret(b"not-any-configured-hs384-secret-0123456789abcdef");
    let token = sign(Algorithm::HS384, None, &key, &claims());
    assert_unauthorized(verifier.verify(&token).await, "kid-less, no secret fits");
}

#[tokio::test]
async fn alg_none_is_refused_in_every_spelling() {
    let verifier = verifier().await;
    let payload = b64(&claims().to_string());
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"None","typ":"JWT"}"#,
        r#"{"alg":"NONE"}"#,
        r#"{"alg":"none","kid":"rsa-a"}"#,
        r#"{"typ":"JWT"}"#,
        r#"{"alg":"","kid":"rsa-a"}"#,
    ] {
        for signature in ["", "AAAA"] {
            let token = format!("{}.{payload}.{signature}", b64(header));
            assert_unauthorized(verifier.verify(&token).await, header);
        }
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let verifier = verifier().await;
    // The classic confusion: the attacker knows the public key and uses its PEM (or its
    // DER) as an HMAC secret, hoping the server verifies HS256 with the "key" it has.
    let pem = read("rsa-a.pub.pem");
    let der_body: String = String::from_utf8(pem.clone())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(der_body)
        .unwrap();
    for secret in [pem.as_slice(), der.as_slice()] {
        let key = EncodingKey::from_secret(secret);
        for kid in [Some("rsa-a"), Some("rsa-a-ps256"), None] {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                let token = sign(alg, kid, &key, &claims());
                assert_unauthorized(
                    verifier.verify(&token).await,
                    &format!("{alg:?} with kid {kid:?}"),
                );
            }
        }
    }
    // The same from a JWKS: the RSA JWK's modulus bytes as the secret.
    let jwks: Value = serde_json::from_slice(&read("jwks.json")).unwrap();
    let n = jwks["keys"][0]["n"].as_str().unwrap().to_owned();
    let key = EncodingKey::from_secret(n.as_bytes());
    let token = sign(Algorithm::HS256, Some("rsa-a"), &key, &claims());
    assert_unauthorized(verifier.verify(&token).await, "HS256 with the JWK's n");
}

#[tokio::test]
async fn unknown_kid_and_kid_of_another_algorithm_are_refused() {
    let verifier = verifier().await;
    let rsa = private_key(Algorithm::RS256, "rsa-a");
    let token = sign(Algorithm::RS256, Some("nobody"), &rsa, &claims());
    assert_unauthorized(verifier.verify(&token).await, "unknown kid");
    // A correctly signed RS256 token that names the PS256 registration of the same key:
    // the kid pins PS256, so RS256 is refused.
    let token = sign(Algorithm::RS256, Some("rsa-a-ps256"), &rsa, &claims());
    assert_unauthorized(verifier.verify(&token).await, "RS256 under a PS256 kid");
    // ES256 token naming the RSA key; RS256 token naming an HMAC kid.
    let ec = private_key(Algorithm::ES256, "ec-p256");
    let token = sign(Algorithm::ES256, Some("rsa-a"), &ec, &claims());
    assert_unauthorized(verifier.verify(&token).await, "ES256 under an RSA kid");
    let token = sign(Algorithm::RS256, Some("hs384"), &rsa, &claims());
    assert_unauthorized(verifier.verify(&token).await, "RS256 under an HMAC kid");
    // ES384 token signed with the P-256 key but naming the P-384 kid.
    let token = sign(Algorithm::ES256, Some("ec-p384"), &ec, &claims());
    assert_unauthorized(verifier.verify(&token).await, "ES256 under an ES384 kid");
    // The HS256 secret has no kid: a token naming any kid does not reach it.
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let token = sign(Algorithm::HS256, Some("whatever"), &hs, &claims());
    assert_unauthorized(verifier.verify(&token).await, "HS256 with a made-up kid");
    // Right kid and algorithm, wrong private key.
    let other = private_key(Algorithm::RS256, "rsa-b");
    let token = sign(Algorithm::RS256, Some("rsa-a"), &other, &claims());
    assert_unauthorized(verifier.verify(&token).await, "another key under rsa-a");
    // No key without kid accepts RS256... but rsa-a has a kid and is RS256: kid-less RS256
    // tokens are tried on it, and a foreign key still fails.
    let token = sign(Algorithm::RS256, None, &other, &claims());
    assert_unauthorized(verifier.verify(&token).await, "kid-less, foreign key");
}

#[tokio::test]
async fn bad_claims_are_refused_after_a_good_signature() {
    let verifier = verifier().await;
    let base = claims();
    let cases = [
        (with(base.clone(), "exp", json!(now() - 3600)), "expired"),
        (without(base.clone(), "exp"), "no exp"),
        (
            with(base.clone(), "exp", json!("tomorrow")),
            "exp not a number",
        ),
        (
            with(base.clone(), "nbf", json!(now() + 3600)),
            "not yet valid",
        ),
        (
            with(base.clone(), "iss", json!("https://evil.test")),
            "wrong issuer",
        ),
        (
            without(base.clone(), "iss"),
            "no issuer while one is configured",
        ),
        (with(base.clone(), "aud", json!("other")), "wrong audience"),
        (
            with(base.clone(), "aud", json!(["other", "another"])),
            "wrong audiences",
        ),
        (
            without(base.clone(), "aud"),
            "no audience while one is configured",
        ),
        (without(base.clone(), "tenant"), "no tenant claim"),
        (
            with(base.clone(), "tenant", json!("")),
            "empty tenant claim",
        ),
        (
            with(base.clone(), "tenant", json!(42)),
            "tenant not a string",
        ),
    ];
    for (alg, kid, name) in asymmetric_cases() {
        let key = private_key(alg, name);
        for (claims, case) in &cases {
            let token = sign(alg, Some(kid), &key, claims);
            assert_unauthorized(verifier.verify(&token).await, &format!("{alg:?}: {case}"));
        }
    }
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    for (claims, case) in &cases {
        let token = sign(Algorithm::HS256, None, &hs, claims);
        assert_unauthorized(verifier.verify(&token).await, &format!("HS256: {case}"));
    }
    // Within the leeway (30 s) is still fine; an audience list containing ours too.
    let token = sign(
        Algorithm::HS256,
        None,
        &hs,
        &with(base.clone(), "exp", json!(now() - 5)),
    );
    verifier.verify(&token).await.unwrap();
    let token = sign(
        Algorithm::HS256,
        None,
        &hs,
        &with(base, "aud", json!(["other", "warren"])),
    );
    verifier.verify(&token).await.unwrap();
}

#[tokio::test]
async fn tampered_and_malformed_tokens_are_refused() {
    let verifier = verifier().await;
    let forged = b64(&with(claims(), "scope", json!("publish subscribe admin")).to_string());
    for (alg, kid, name) in asymmetric_cases() {
        let token = sign(alg, Some(kid), &private_key(alg, name), &claims());
        let parts: Vec<&str> = token.split('.').collect();
        let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
        assert_unauthorized(verifier.verify(&tampered).await, &format!("{alg:?}"));
        // The signature of one algorithm under the header of another.
        let header = b64(&format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#));
        let swapped = format!("{header}.{}.{}", parts[1], parts[2]);
        assert_unauthorized(
            verifier.verify(&swapped).await,
            &format!("{alg:?} as HS256"),
        );
        let stripped = format!("{}.{}.", parts[0], parts[1]);
        assert_unauthorized(
            verifier.verify(&stripped).await,
            &format!("{alg:?} unsigned"),
        );
    }
    for garbage in [
        "",
        "not a jwt",
        "a.b",
        "a.b.c",
        "...",
        "e30.e30.",
        "e30.e30.e30",
    ] {
        assert_unauthorized(verifier.verify(garbage).await, garbage);
    }
}

#[tokio::test]
async fn jwks_file_keys_verify_by_kid() {
    let config = {
        let mut config = config("");
        config.auth.public_key_files.clear();
        config.auth.jwks_file = Some(key_file("jwks.json").into());
        config
    };
    let verifier = start(&config).await;
    for (alg, kid) in [
        (Algorithm::RS256, "rsa-a"),
        (Algorithm::RS256, "rsa-b"),
        (Algorithm::ES256, "ec-p256"),
        (Algorithm::ES384, "ec-p384"),
        (Algorithm::EdDSA, "ed25519"),
    ] {
        let token = sign(alg, Some(kid), &private_key(alg, kid), &claims());
        verifier
            .verify(&token)
            .await
            .unwrap_or_else(|e| panic!("{kid}: {e}"));
    }
    // The JWK says RS256: a PS256 token under the same kid is refused.
    let token = sign(
        Algorithm::PS256,
        Some("rsa-a"),
        &private_key(Algorithm::PS256, "rsa-a"),
        &claims(),
    );
    assert_unauthorized(verifier.verify(&token).await, "PS256 under an RS256 JWK");
}

#[test]
fn jwks_entries_that_cannot_verify_are_skipped_not_fatal() {
    let good: Value = serde_json::from_slice(&read("jwks.json")).unwrap();
    let rsa = good["keys"][0].clone();
    let ec = good["keys"][2].clone();
    let mut keys = vec![
        rsa.clone(),
        with(rsa.clone(), "use", json!("enc")),
        with(
            with(rsa.clone(), "kid", json!("oaep")),
            "alg",
            json!("RSA-OAEP"),
        ),
        with(
            with(ec.clone(), "kid", json!("es512")),
            "alg",
            json!("ES512"),
        ),
        with(
            with(ec.clone(), "kid", json!("curve")),
            "alg",
            json!("ES384"),
        ),
        with(
            with(rsa.clone(), "kid", json!("as-ec")),
            "alg",
            json!("ES256"),
        ),
        json!({"kty": "oct", "kid": "hmac", "alg": "HS256", "k": b64(SECRET)}),
        json!({"kty": "RSA", "kid": "no-n", "e": "AQAB"}),
        json!({"kid": "no-kty"}),
        json!("not even an object"),
    ];
    // No alg: RSA is taken as RS256, EC by its curve.
    keys.push(with(
        without(rsa.clone(), "alg"),
        "kid",
        json!("rsa-no-alg"),
    ));
    keys.push(with(without(ec, "alg"), "kid", json!("ec-no-alg")));
    let doc = json!({ "keys": keys }).to_string();
    let parsed = parse_jwks(doc.as_bytes(), false).unwrap();
    let usable: Vec<_> = parsed
        .keys
        .iter()
        .map(|k| (k.kid().unwrap().to_owned(), k.alg()))
        .collect();
    assert_eq!(
        usable,
        vec![
            ("rsa-a".to_owned(), Algorithm::RS256),
            ("rsa-no-alg".to_owned(), Algorithm::RS256),
            ("ec-no-alg".to_owned(), Algorithm::ES256),
        ]
    );
    assert_eq!(parsed.skipped.len(), keys.len() - 3, "{:?}", parsed.skipped);
    // From a file, a symmetric key is allowed.
    let parsed = parse_jwks(doc.as_bytes(), true).unwrap();
    assert!(parsed.keys.iter().any(|k| k.kid() == Some("hmac")));
    assert!(parse_jwks(b"[]", false).is_err());
    assert!(parse_jwks(b"{}", false).is_err());
}

#[test]
fn short_rsa_and_mismatched_keys_are_refused_at_load() {
    use super::keys::pem_key;
    let short = read("rsa-1024.pub.pem");
    let err = pem_key("k", Algorithm::RS256, &short).unwrap_err();
    assert!(err.contains("1024 bits"), "{err}");
    let private = read("rsa-a.key.pem");
    let err = pem_key("k", Algorithm::RS256, &private).unwrap_err();
    assert!(err.contains("private key"), "{err}");
    // A P-384 key declared as ES256, an RSA key declared as EdDSA.
    assert!(pem_key("k", Algorithm::ES256, &read("ec-p384.pub.pem")).is_err());
    assert!(pem_key("k", Algorithm::EdDSA, &read("rsa-a.pub.pem")).is_err());
    assert!(pem_key("k", Algorithm::HS256, &read("rsa-a.pub.pem")).is_err());
    assert!(pem_key("k", Algorithm::ES384, &read("ec-p384.pub.pem")).is_ok());
    // A JWK with a short Ed25519 key is refused, not a panic later.
    let doc = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "short", "x": b64("abc")}]});
    let parsed = parse_jwks(doc.to_string().as_bytes(), false).unwrap();
    assert!(parsed.keys.is_empty(), "{:?}", parsed.keys);
}

#[tokio::test]
async fn a_rewritten_jwks_file_is_read_on_an_unknown_kid_at_most_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let all: Value = serde_json::from_slice(&read("jwks.json")).unwrap();
    let only = |kids: &[&str]| {
        let keys: Vec<Value> = all["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
            .cloned()
            .collect();
        json!({ "keys": keys }).to_string()
    };
    let write = |text: String| {
        let tmp = dir.path().join("jwks.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    write(only(&["rsa-a"]));
    let mut config = config("");
    config.auth.public_key_files.clear();
    config.auth.jwks_file = Some(path.clone());
    config.auth.jwks_refresh_s = 3600;
    config.auth.jwks_min_refetch_s = 3600;
    let verifier = start(&config).await;
    let token = |kid: &str| {
        let alg = if kid.starts_with("rsa") {
            Algorithm::RS256
        } else {
            Algorithm::ES256
        };
        sign(alg, Some(kid), &private_key(alg, kid), &claims())
    };
    verifier.verify(&token("rsa-a")).await.unwrap();

    // Nothing refreshed since start: the first unknown kid re-reads the file.
    write(only(&["rsa-a", "rsa-b"]));
    verifier.verify(&token("rsa-b")).await.unwrap();
    // Within the interval, another unknown kid does not (the file is not re-read).
    write(only(&["rsa-a", "rsa-b", "ec-p256"]));
    assert_unauthorized(verifier.verify(&token("ec-p256")).await, "rate-limited");
    // A periodic refresh (here: called directly) picks it up.
    verifier.keys().refresh().await;
    verifier.verify(&token("ec-p256")).await.unwrap();

    // A broken rewrite keeps the last good keys.
    std::fs::write(&path, "{ not json").unwrap();
    verifier.keys().refresh().await;
    verifier.verify(&token("rsa-a")).await.unwrap();
    // Removing a key from the file ends it.
    write(only(&["rsa-b"]));
    verifier.keys().refresh().await;
    assert_unauthorized(verifier.verify(&token("rsa-a")).await, "removed");
    verifier.verify(&token("rsa-b")).await.unwrap();
}

#[tokio::test]
async fn key_selection_follows_kid_then_alg() {
    let verifier = verifier().await;
    let keys = verifier.keys().keys();
    let pick = |kid: Option<&str>, alg| -> Result<Vec<Option<String>>, KeyMiss> {
        let found = keys.select(kid, alg)?;
        Ok(found.iter().map(|k| k.kid().map(str::to_owned)).collect())
    };
    assert_eq!(
        pick(Some("rsa-a"), Algorithm::RS256),
        Ok(vec![Some("rsa-a".to_owned())])
    );
    assert_eq!(
        pick(Some("rsa-a"), Algorithm::HS256),
        Err(KeyMiss::OtherAlgorithm(vec![Algorithm::RS256]))
    );
    assert_eq!(
        pick(Some("nope"), Algorithm::RS256),
        Err(KeyMiss::UnknownKid)
    );
    // Without kid: every key of the algorithm, with or without a kid of its own.
    assert_eq!(pick(None, Algorithm::HS256), Ok(vec![None]));
    assert_eq!(
        pick(None, Algorithm::ES384),
        Ok(vec![Some("ec-p384".to_owned())])
    );
    assert_eq!(
        pick(None, Algorithm::PS512),
        Ok(vec![Some("rsa-a-ps512".to_owned())])
    );
}

/// This machine's address on its default route, if it has one (no packet is sent).
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:80").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn a_jwks_url_redirect_away_from_https_is_not_followed() {
    use axum::response::Redirect;
    use axum::routing::get;

    let Some(ip) = non_loopback_ip() else {
        eprintln!("no non-loopback address: skipped");
        return;
    };
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let jwks: Value = serde_json::from_slice(&read("jwks.json")).unwrap();
    let app = axum::Router::new()
        // Plain http on a non-loopback address: reachable, but not to be trusted.
        .route(
            "/downgrade",
            get(move || async move { Redirect::temporary(&format!("http://{ip}:{port}/jwks")) }),
        )
        .route("/moved", get(|| async { Redirect::temporary("/jwks") }))
        .route("/jwks", get(move || async move { axum::Json(jwks) }));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let sources = |path: &str| KeySources {
        hmac: Vec::new(),
        files: Vec::new(),
        jwks_url: Some(format!("http://127.0.0.1:{port}{path}")),
        refresh_every: std::time::Duration::from_secs(3600),
        min_refetch: std::time::Duration::from_secs(3600),
        fetch_timeout: std::time::Duration::from_secs(2),
    };
    let store = KeyStore::start(&sources("/downgrade")).await.unwrap();
    assert!(store.keys().is_empty(), "followed a redirect to plain http");
    let store = KeyStore::start(&sources("/moved")).await.unwrap();
    assert_eq!(store.keys().len(), 5, "a loopback redirect is followed");
    server.abort();
}
