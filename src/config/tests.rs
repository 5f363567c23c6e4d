//! Config parsing and validation: every bad setting is named by its key.

use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn minimal(extra: &str) -> String {
    format!(
        "[auth]\nhs256_secret = \"{SECRET}\"\n[tenants.acme]\nvhost = \"acme\"\n\
         publish = [{{ exchange = \"events\", routing_key = \"order.#\" }}]\n{extra}"
    )
}

#[test]
fn minimal_config_resolves_with_defaults() {
    let config = Config::from_toml(&minimal("")).unwrap();
    let resolved = config.resolve().unwrap();
    assert_eq!(resolved.broker_urls, vec![DEFAULT_BROKER_URL.to_owned()]);
    assert_eq!(resolved.tenants["acme"].vhost, "acme");
    assert_eq!(resolved.tenants["acme"].publish.len(), 1);
    assert_eq!(config.server.max_body_bytes, 1024 * 1024);
    assert_eq!(config.amqp.confirm_timeout_ms, 5000);
}

#[test]
fn new_limits_are_validated_and_shares_default_to_an_equal_split() {
    let err = |extra: &str| {
        Config::from_toml(&minimal(extra))
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string()
    };
    assert!(err("[server]\nbody_read_timeout_s = 0\n").starts_with("server.body_read_timeout_s:"));
    assert!(err("[server]\nworker_threads = 1025\n").starts_with("server.worker_threads:"));
    let threads = Config::from_toml(&minimal("[server]\nworker_threads = 1\n")).unwrap();
    assert_eq!(threads.server.worker_threads, 1);
    assert_eq!(threads.server.runtime_threads(8), 1, "a set count is kept");
    assert!(threads.resolve().is_ok());
    // Unset: half the cores the process may use, at least one.
    let auto = Config::from_toml(&minimal("")).unwrap();
    let chosen: Vec<usize> = [1, 2, 3, 4, 8]
        .map(|cores| auto.server.runtime_threads(cores))
        .to_vec();
    assert_eq!(chosen, [1, 1, 2, 2, 4]);
    assert!(
        err("[server]\nhttp2_max_concurrent_streams = 0\n")
            .starts_with("server.http2_max_concurrent_streams:")
    );
    assert!(
        err("[idempotency]\nmax_entries = 10\nmax_entries_per_tenant = 11\n")
            .starts_with("idempotency.max_entries_per_tenant:")
    );
    assert!(
        err("[idempotency]\nmax_bytes_per_tenant = 0\n")
            .starts_with("idempotency.max_bytes_per_tenant:")
    );
    let config = Config::from_toml(&minimal("")).unwrap();
    assert_eq!(config.server.body_read_timeout_s, 10);
    let i = &config.idempotency;
    assert_eq!(i.tenant_share(0), (i.max_entries, i.max_bytes));
    assert_eq!(i.tenant_share(4), (i.max_entries / 4, i.max_bytes / 4));
    let mut set = i.clone();
    set.max_entries_per_tenant = Some(7);
    assert_eq!(set.tenant_share(4).0, 7);
}

#[test]
fn unknown_key_is_named() {
    let err = Config::from_toml(&minimal("[server]\nlisten_port = 1\n")).unwrap_err();
    assert!(err.to_string().contains("listen_port"), "{err}");
}

#[test]
fn wrong_type_names_the_key() {
    let err = Config::from_toml(&minimal("[server]\nmax_body_bytes = \"big\"\n")).unwrap_err();
    assert!(err.to_string().contains("server.max_body_bytes"), "{err}");
}

#[test]
fn bad_grant_pattern_names_the_key() {
    let text = format!(
        "[auth]\nhs256_secret = \"{SECRET}\"\n[tenants.acme]\nvhost = \"acme\"\n\
         publish = [{{ exchange = \"events\", routing_key = \"order.#x\" }}]\n"
    );
    let err = Config::from_toml(&text).unwrap().resolve().unwrap_err();
    assert!(
        err.to_string()
            .starts_with("tenants.acme.publish[0].routing_key:"),
        "{err}"
    );
}

#[test]
fn short_secret_and_missing_secret_are_rejected() {
    let err = Config::from_toml("[auth]\nhs256_secret = \"short\"\n[tenants.a]\nvhost = \"a\"\n")
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(err.to_string().starts_with("auth.hs256_secret:"), "{err}");
    let err = Config::from_toml("[tenants.a]\nvhost = \"a\"\n")
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(
        err.to_string().starts_with("auth: a token key is required"),
        "{err}"
    );
}

#[test]
fn bad_amqp_url_is_named() {
    let err = Config::from_toml(&minimal("[amqp]\nurls = [\"amqp://ok\", \"http://x\"]\n"))
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(err.to_string().starts_with("amqp.urls[1]:"), "{err}");
}

#[test]
fn secrets_come_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let url = dir.path().join("url");
    std::fs::write(&url, "amqp://u:p@127.0.0.1:5672\n").unwrap();
    let text = format!(
        "[amqp]\nurl_file = {:?}\n[auth]\nhs256_secret_file = {:?}\n[tenants.a]\nvhost = \"a\"\n",
        url, secret
    );
    let resolved = Config::from_toml(&text).unwrap().resolve().unwrap();
    let signing = resolved.signing_secret.unwrap();
    assert_eq!(signing.secret(), SECRET.as_bytes());
    assert_eq!(resolved.broker_urls, vec!["amqp://u:p@127.0.0.1:5672"]);
    // A cluster's URLs, one per line or comma-separated.
    std::fs::write(
        &url,
        "amqp://u:p@n1:5672\namqp://u:p@n2:5672, amqp://u:p@n3:5672\n",
    )
    .unwrap();
    let resolved = Config::from_toml(&text).unwrap().resolve().unwrap();
    assert_eq!(resolved.broker_urls.len(), 3);
    assert_eq!(resolved.broker_urls[2], "amqp://u:p@n3:5672");
    std::fs::write(&url, "amqp://u:p@n1:5672 http://n2\n").unwrap();
    let err = Config::from_toml(&text).unwrap().resolve().unwrap_err();
    assert!(err.to_string().starts_with("amqp.url_file:"), "{err}");
    std::fs::write(&url, " \n").unwrap();
    let err = Config::from_toml(&text).unwrap().resolve().unwrap_err();
    assert!(err.to_string().starts_with("amqp.url_file:"), "{err}");
    std::fs::write(&url, "amqp://u:p@127.0.0.1:5672\n").unwrap();
    let missing = text.replace("secret\"", "nope\"");
    let err = Config::from_toml(&missing).unwrap().resolve().unwrap_err();
    assert!(
        err.to_string().starts_with("auth.hs256_secret_file:"),
        "{err}"
    );
}

fn keys_dir() -> String {
    format!("{}/tests/keys", env!("CARGO_MANIFEST_DIR"))
}

/// `[auth]` with `auth` as its body, and one tenant, resolved and with its key files
/// read (as `check-config` does).
fn resolve_auth(auth: &str) -> Result<Resolved, String> {
    let text = format!("[auth]\n{auth}\n[tenants.a]\nvhost = \"a\"\n");
    let resolved = Config::from_toml(&text)
        .and_then(|config| config.resolve())
        .map_err(|e| e.to_string())?;
    resolved
        .token_keys
        .check_files()
        .map_err(|e| e.to_string())?;
    Ok(resolved)
}

#[track_caller]
fn assert_names(auth: &str, key: &str) {
    let err = resolve_auth(auth).unwrap_err();
    assert!(err.starts_with(&format!("{key}:")), "{auth}\n=> {err}");
}

#[test]
fn public_keys_and_jwks_resolve_without_an_hmac_secret() {
    let dir = keys_dir();
    let resolved = resolve_auth(&format!(
        "public_key_files = [{{ kid = \"a\", alg = \"RS256\", file = \"{dir}/rsa-a.pub.pem\" }},\n\
         {{ kid = \"e\", alg = \"EdDSA\", file = \"{dir}/ed25519.pub.pem\" }}]\n\
         jwks_file = \"{dir}/jwks.json\"\n\
         jwks_url = \"https://idp.example/.well-known/jwks.json\"\n"
    ))
    .unwrap();
    assert!(resolved.signing_secret.is_none());
    assert_eq!(resolved.token_keys.files.len(), 3);
    assert_eq!(resolved.token_keys.refresh_every, Duration::from_secs(300));
    assert_eq!(resolved.token_keys.min_refetch, Duration::from_secs(30));
    // The HS256 secret signs when there is one; else the first hs_secrets entry.
    let resolved = resolve_auth(&format!(
        "hs_secrets = [{{ kid = \"h\", alg = \"HS384\", secret = \"{SECRET}{SECRET}\" }}]\n"
    ))
    .unwrap();
    let signing = resolved.signing_secret.unwrap();
    assert_eq!(
        (signing.kid.as_deref(), signing.alg),
        (Some("h"), Algorithm::HS384)
    );
}

#[test]
fn bad_key_settings_name_the_key() {
    let dir = keys_dir();
    let pem = |kid: &str, alg: &str, file: &str| {
        format!("{{ kid = \"{kid}\", alg = \"{alg}\", file = \"{dir}/{file}\" }}")
    };
    let files = |entries: &[String]| format!("public_key_files = [{}]\n", entries.join(", "));
    for (auth, key) in [
        (
            files(&[pem("a", "RS999", "rsa-a.pub.pem")]),
            "auth.public_key_files[0].alg",
        ),
        (
            files(&[pem("a", "HS256", "rsa-a.pub.pem")]),
            "auth.public_key_files[0].alg",
        ),
        (
            files(&[pem("a", "RS256", "missing.pem")]),
            "auth.public_key_files[0].file",
        ),
        (
            files(&[pem("a", "RS256", "rsa-a.key.pem")]),
            "auth.public_key_files[0].file",
        ),
        (
            files(&[pem("a", "RS256", "rsa-1024.pub.pem")]),
            "auth.public_key_files[0].file",
        ),
        (
            files(&[pem("a", "ES256", "ec-p384.pub.pem")]),
            "auth.public_key_files[0].file",
        ),
        (
            files(&[pem("a", "ES256", "rsa-a.pub.pem")]),
            "auth.public_key_files[0].file",
        ),
        (
            files(&[pem("", "RS256", "rsa-a.pub.pem")]),
            "auth.public_key_files[0].kid",
        ),
        (
            files(&[
                pem("a", "RS256", "rsa-a.pub.pem"),
                pem("a", "EdDSA", "ed25519.pub.pem"),
            ]),
            "auth.public_key_files[1].kid",
        ),
        (
            format!(
                "hs256_secret = \"{SECRET}\"\nhs256_kid = \"a\"\n{}",
                files(&[pem("a", "RS256", "rsa-a.pub.pem")])
            ),
            "auth.public_key_files[0].kid",
        ),
        (
            format!("hs_secrets = [{{ kid = \"h\", alg = \"HS512\", secret = \"{SECRET}\" }}]"),
            "auth.hs_secrets[0].secret",
        ),
        (
            format!("hs_secrets = [{{ kid = \"h\", alg = \"RS256\", secret = \"{SECRET}\" }}]"),
            "auth.hs_secrets[0].alg",
        ),
        (
            "hs_secrets = [{ kid = \"h\" }]".to_owned(),
            "auth.hs_secrets[0].secret",
        ),
        (
            format!("hs_secrets = [{{ kid = \"h\", secret_file = \"{dir}/nope\" }}]"),
            "auth.hs_secrets[0].secret_file",
        ),
        (
            "hs256_kid = \"k\"\njwks_url = \"https://idp.test/jwks\"".to_owned(),
            "auth.hs256_kid",
        ),
        (
            format!("jwks_file = \"{dir}/rsa-a.pub.pem\""),
            "auth.jwks_file",
        ),
        (
            "jwks_file = \"/nonexistent/jwks.json\"".to_owned(),
            "auth.jwks_file",
        ),
        (
            "jwks_url = \"http://idp.example/jwks\"".to_owned(),
            "auth.jwks_url",
        ),
        (
            "jwks_url = \"ftp://127.0.0.1/jwks\"".to_owned(),
            "auth.jwks_url",
        ),
        ("jwks_url = \"not a url\"".to_owned(), "auth.jwks_url"),
        (
            "jwks_url = \"https://idp.test/jwks\"\njwks_refresh_s = 0".to_owned(),
            "auth.jwks_refresh_s",
        ),
        (
            "jwks_url = \"https://idp.test/jwks\"\njwks_min_refetch_s = 0".to_owned(),
            "auth.jwks_min_refetch_s",
        ),
        ("issuer = \"https://idp.test\"".to_owned(), "auth"),
    ] {
        assert_names(&auth, key);
    }
    // An empty JWKS file is named too (it has no usable key).
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        tmp.path(),
        r#"{"keys": [{"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}]}"#,
    )
    .unwrap();
    assert_names(&format!("jwks_file = {:?}", tmp.path()), "auth.jwks_file");
    // http is fine on loopback (a sidecar, tests).
    for url in [
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]:1/jwks",
    ] {
        resolve_auth(&format!("jwks_url = \"{url}\"")).unwrap();
    }
}

#[test]
fn dev_config_is_valid_and_loopback() {
    let config = Config::dev();
    assert!(config.server.listen.ip().is_loopback());
    let resolved = config.resolve().unwrap();
    assert_eq!(resolved.tenants["default"].vhost, "/");
}

#[test]
fn queue_and_stream_grants_compile_and_bad_shapes_name_the_grant() {
    let config = Config::from_toml(&minimal(
        "subscribe = [{ exchange = \"events\", routing_key = \"#\" }, { queue = \"billing\" },\n\
         { stream = \"order-log\" }, { stream = \"audit\", routing_key = \"eu.#\" }]\n",
    ))
    .unwrap();
    let subscribe = config.resolve().unwrap().tenants["acme"].subscribe.clone();
    assert_eq!(subscribe.exchanges.len(), 1);
    assert!(subscribe.allows_queue("billing"));
    assert!(!subscribe.allows_queue("billing2"));
    let streams = &subscribe.streams;
    let every = crate::auth::grants::GrantPattern::every_key();
    let eu = crate::auth::grants::GrantPattern::parse("eu.*").unwrap();
    assert_eq!(
        crate::auth::grants::allows_subscribe(streams, "order-log", &every),
        Ok(true)
    );
    assert_eq!(
        crate::auth::grants::allows_subscribe(streams, "audit", &every),
        Ok(false)
    );
    assert_eq!(
        crate::auth::grants::allows_subscribe(streams, "audit", &eu),
        Ok(true)
    );
    assert_eq!(
        crate::auth::grants::allows_subscribe(streams, "other", &eu),
        Ok(false)
    );

    let err = |grants: &str| {
        Config::from_toml(&minimal(&format!("subscribe = [{grants}]\n")))
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string()
    };
    assert!(err("{ queue = \"q\", stream = \"s\" }").starts_with("tenants.acme.subscribe[0]:"));
    assert!(err("{ exchange = \"e\" }").starts_with("tenants.acme.subscribe[0].routing_key:"));
    assert!(
        err("{ queue = \"q\", routing_key = \"#\" }")
            .starts_with("tenants.acme.subscribe[0].routing_key:")
    );
    assert!(err("{ queue = \"\" }").starts_with("tenants.acme.subscribe[0].queue:"));
    assert!(err("{ routing_key = \"#\" }").starts_with("tenants.acme.subscribe[0]:"));
    let publish_queue =
        Config::from_toml(&minimal("").replace("publish = [", "publish = [{ queue = \"q\" }, "))
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
    assert!(
        publish_queue.starts_with("tenants.acme.publish:"),
        "{publish_queue}"
    );
}
