//! Client authentication with JWTs: every way a token can be wrong gets its
//! 401 code before the upgrade; the relay registers the token's `sub`, not
//! the client's `?id=`; claims restrict targets and topics; a token that
//! expires while connected closes the connection with 4002.
#![cfg(feature = "jwt")]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use common::*;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use switchboard::auth::jwt::{JwtAuthenticator, JwtConfig, JwtError, JwtKey};
use switchboard::auth::{Authenticator, Identity, bearer_token, unauthorized};
use switchboard::{BoxFuture, ClientId, ErrorKind, HttpError, Hub, Limits, Security};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::client::Response as WsResponse;

const SECRET: &[u8] = b"test secret: at least thirty-two bytes long";
const RSA_PRIVATE: &[u8] = include_bytes!("fixtures/rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("fixtures/rsa-public.pem");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Claims for `sub` valid for an hour, plus `extra`.
fn claims(sub: &str, extra: Value) -> Value {
    let mut claims = json!({"sub": sub, "exp": now() + 3600});
    if let (Some(claims), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        claims.extend(extra);
    }
    claims
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("encode token")
}

fn hs256(claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET), claims)
}

fn security(config: JwtConfig) -> Security {
    let jwt = JwtAuthenticator::new(config).expect("a valid JWT configuration");
    Security {
        authenticator: Some(Arc::new(jwt)),
        ..Security::default()
    }
}

fn secret_config() -> JwtConfig {
    JwtConfig::new(JwtKey::Secret(SECRET.to_vec()))
}

async fn start(security: Security) -> TestServer {
    let hub = Hub::builder(Limits::default()).security(security).build();
    let app = switchboard::app(hub.clone());
    TestServer::with_router(hub, app).await
}

/// A raw upgrade of `target` with `Authorization: Bearer <token>`.
async fn upgrade_with_token(server: &TestServer, target: &str, token: &str) -> RawResponse {
    let auth = format!("Bearer {token}");
    let mut headers = upgrade_headers();
    headers.push(("Authorization", &auth));
    http_upgrade(server.addr, target, &headers).await
}

/// Expects a 401 with `code`, a JSON body and a Bearer challenge.
fn assert_401(response: &RawResponse, code: &str) {
    assert_eq!(response.status, 401, "{}", response.text());
    assert_eq!(response.error_code(), code, "{}", response.text());
    let challenge = response.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "{challenge:?}");
}

/// Connects a real client with extra request headers.
async fn connect_with(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
) -> (Client, WsResponse) {
    let mut request = server.url(path).into_client_request().expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            http::HeaderValue::from_str(value).expect("value"),
        );
    }
    tokio_tungstenite::connect_async(request)
        .await
        .unwrap_or_else(|e| panic!("connect to {path}: {e}"))
}

async fn connect_bearer(server: &TestServer, path: &str, token: &str) -> Client {
    let auth = format!("Bearer {token}");
    connect_with(server, path, &[("authorization", &auth)])
        .await
        .0
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

#[tokio::test]
async fn missing_token_is_401_missing_token() {
    let server = start(security(secret_config())).await;
    let response = http_upgrade(server.addr, "/ws", &upgrade_headers()).await;
    assert_401(&response, "missing_token");
    assert!(
        response.text().contains("bearer.<jwt>"),
        "{}",
        response.text()
    );
    // The old way, ?id= alone, is no credential.
    let response = http_upgrade(server.addr, "/ws?id=1", &upgrade_headers()).await;
    assert_401(&response, "missing_token");
    // Every WebSocket route is behind the authenticator, not just the relay.
    for path in ["/echo", "/chat"] {
        let response = http_upgrade(server.addr, path, &upgrade_headers()).await;
        assert_401(&response, "missing_token");
    }
    assert_eq!(server.hub.metrics().errors(ErrorKind::Unauthorized), 4);
}

#[tokio::test]
async fn malformed_tokens_are_401_invalid_token() {
    let server = start(security(secret_config())).await;
    let valid = hs256(&claims("alice", json!({})));
    let (head, rest) = valid.split_once('.').expect("dots");
    // Correctly signed, but the payload is not JSON.
    let message = format!("{head}.{}", B64URL.encode(b"not json"));
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS256,
    )
    .expect("sign");
    for token in [
        format!("{message}.{signature}"),
        "not-a-jwt".to_owned(),
        "a.b".to_owned(),
        "a.b.c.d".to_owned(),
        format!("!!!.{rest}"),
        format!("{}.{rest}", B64URL.encode(b"not json")),
        format!("{}.{rest}", B64URL.encode(br#"{"typ":"JWT"}"#)),
    ] {
        let response = upgrade_with_token(&server, "/ws", &token).await;
        assert_401(&response, "invalid_token");
    }
    // An Authorization header with another scheme.
    let mut headers = upgrade_headers();
    headers.push(("Authorization", "Basic YWxpY2U6cHc="));
    let response = http_upgrade(server.addr, "/ws", &headers).await;
    assert_401(&response, "invalid_token");
}

#[tokio::test]
async fn bad_signature_is_401_invalid_signature() {
    let server = start(security(secret_config())).await;
    let other = EncodingKey::from_secret(b"another secret, also thirty-two bytes long");
    let forged = sign(Algorithm::HS256, &other, &claims("alice", json!({})));
    let response = upgrade_with_token(&server, "/ws", &forged).await;
    assert_401(&response, "invalid_signature");

    // A valid token whose payload was swapped for another subject.
    let valid = hs256(&claims("alice", json!({})));
    let parts: Vec<&str> = valid.split('.').collect();
    let swapped = B64URL.encode(claims("mallory", json!({})).to_string());
    let tampered = format!("{}.{swapped}.{}", parts[0], parts[2]);
    let response = upgrade_with_token(&server, "/ws", &tampered).await;
    assert_401(&response, "invalid_signature");
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_refused() {
    let server = start(security(JwtConfig {
        clock_skew: Duration::from_secs(5),
        ..secret_config()
    }))
    .await;
    let expired = hs256(&json!({"sub": "alice", "exp": now() - 60}));
    assert_401(
        &upgrade_with_token(&server, "/ws", &expired).await,
        "token_expired",
    );
    let early = hs256(&json!({"sub": "alice", "exp": now() + 3600, "nbf": now() + 600}));
    assert_401(
        &upgrade_with_token(&server, "/ws", &early).await,
        "token_not_yet_valid",
    );
    // Within the clock skew both are fine.
    let just_expired = hs256(&json!({"sub": "alice", "exp": now() - 2}));
    assert_eq!(
        upgrade_with_token(&server, "/ws", &just_expired)
            .await
            .status,
        101
    );
    let almost = hs256(&json!({"sub": "alice", "exp": now() + 3600, "nbf": now() + 2}));
    assert_eq!(
        upgrade_with_token(&server, "/ws", &almost).await.status,
        101
    );
    // A token without exp never expires, so it is refused.
    let forever = hs256(&json!({"sub": "alice"}));
    assert_401(
        &upgrade_with_token(&server, "/ws", &forever).await,
        "invalid_token",
    );
}

#[tokio::test]
async fn wrong_issuer_or_audience_is_refused() {
    let server = start(security(JwtConfig {
        issuer: Some("https://auth.example.com/".into()),
        audience: Some("switchboard".into()),
        ..secret_config()
    }))
    .await;
    let good = json!({"iss": "https://auth.example.com/", "aud": "switchboard"});
    let token = hs256(&claims("alice", good));
    assert_eq!(upgrade_with_token(&server, "/ws", &token).await.status, 101);
    let token = hs256(&claims(
        "alice",
        json!({"iss": "https://auth.example.com/", "aud": ["other", "switchboard"]}),
    ));
    assert_eq!(upgrade_with_token(&server, "/ws", &token).await.status, 101);

    let token = hs256(&claims(
        "alice",
        json!({"iss": "https://evil.example/", "aud": "switchboard"}),
    ));
    assert_401(
        &upgrade_with_token(&server, "/ws", &token).await,
        "invalid_issuer",
    );
    let token = hs256(&claims(
        "alice",
        json!({"iss": "https://auth.example.com/", "aud": "another-service"}),
    ));
    assert_401(
        &upgrade_with_token(&server, "/ws", &token).await,
        "invalid_audience",
    );
    // Configured claims are required, not just checked when present.
    let token = hs256(&claims("alice", json!({"aud": "switchboard"})));
    let response = upgrade_with_token(&server, "/ws", &token).await;
    assert_401(&response, "invalid_token");
    assert!(response.text().contains("iss"), "{}", response.text());
    let token = hs256(&claims(
        "alice",
        json!({"iss": "https://auth.example.com/"}),
    ));
    let response = upgrade_with_token(&server, "/ws", &token).await;
    assert_401(&response, "invalid_token");
    assert!(response.text().contains("aud"), "{}", response.text());
}

#[tokio::test]
async fn alg_none_is_never_accepted() {
    let server = start(security(secret_config())).await;
    let payload = B64URL.encode(claims("alice", json!({})).to_string());
    for alg in ["none", "None", "NONE"] {
        let header = B64URL.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
        for signature in ["", "c2ln"] {
            let token = format!("{header}.{payload}.{signature}");
            let response = upgrade_with_token(&server, "/ws", &token).await;
            assert_401(&response, "unsupported_algorithm");
            assert!(response.text().contains("none"), "{}", response.text());
        }
    }
}

#[tokio::test]
async fn rsa_public_key_used_as_hmac_secret_is_refused() {
    // The classic algorithm confusion: the server verifies RS256 with its
    // public key; an attacker, who can read that key, signs HS256 with it
    // as the secret, hoping the server runs HMAC with the same bytes.
    let server = start(security(JwtConfig::new(JwtKey::PublicKeyPem(
        RSA_PUBLIC.to_vec(),
    ))))
    .await;
    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(RSA_PUBLIC),
        &claims("alice", json!({})),
    );
    let response = upgrade_with_token(&server, "/ws", &forged).await;
    assert_401(&response, "unsupported_algorithm");
    assert!(response.text().contains("RS256"), "{}", response.text());

    // The genuine RS256 token is accepted.
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("RSA key");
    let token = sign(Algorithm::RS256, &rsa, &claims("alice", json!({})));
    assert_eq!(upgrade_with_token(&server, "/ws", &token).await.status, 101);

    // The other way round: an HMAC server takes no RSA token.
    let server = start(security(secret_config())).await;
    let response = upgrade_with_token(&server, "/ws", &token).await;
    assert_401(&response, "unsupported_algorithm");

    // And the key itself cannot be configured as a secret.
    let err = JwtAuthenticator::new(JwtConfig::new(JwtKey::Secret(RSA_PUBLIC.to_vec())))
        .expect_err("a PEM key as HMAC secret");
    assert!(matches!(err, JwtError::SecretIsPem), "{err}");
}

#[tokio::test]
async fn es256_and_eddsa_public_keys_verify() {
    for (rcgen_alg, alg) in [
        (&rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256),
        (&rcgen::PKCS_ED25519, Algorithm::EdDSA),
    ] {
        let pair = rcgen::KeyPair::generate_for(rcgen_alg).expect("key pair");
        let public = pair.public_key_pem();
        let private = pair.serialize_pem();
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(private.as_bytes()),
            _ => EncodingKey::from_ed_pem(private.as_bytes()),
        }
        .expect("encoding key");
        let server = start(security(JwtConfig::new(JwtKey::PublicKeyPem(
            public.into_bytes(),
        ))))
        .await;
        let token = sign(alg, &key, &claims("alice", json!({})));
        assert_eq!(
            upgrade_with_token(&server, "/ws", &token).await.status,
            101,
            "{alg:?}"
        );
        let hs = hs256(&claims("alice", json!({})));
        assert_401(
            &upgrade_with_token(&server, "/ws", &hs).await,
            "unsupported_algorithm",
        );
        // Signed by another key of the same kind.
        let other = rcgen::KeyPair::generate_for(rcgen_alg).expect("key pair");
        let other = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()),
            _ => EncodingKey::from_ed_pem(other.serialize_pem().as_bytes()),
        }
        .expect("encoding key");
        let forged = sign(alg, &other, &claims("alice", json!({})));
        assert_401(
            &upgrade_with_token(&server, "/ws", &forged).await,
            "invalid_signature",
        );
    }
}

fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(key, alg).expect("jwk");
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

fn with_kid(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key).expect("encode")
}

#[tokio::test]
async fn jwks_file_picks_keys_by_kid_and_reloads() {
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("RSA key");
    let ec_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ec");
    let ec = EncodingKey::from_ec_pem(ec_pair.serialize_pem().as_bytes()).expect("ec key");
    let path = std::env::temp_dir().join(format!("switchboard-jwks-{}.json", std::process::id()));
    let write = |keys: Vec<Jwk>| {
        std::fs::write(
            &path,
            serde_json::to_string(&JwkSet { keys }).expect("json"),
        )
        .expect("write JWKS");
    };
    write(vec![jwk(&rsa, Algorithm::RS256, "rsa-1")]);
    let jwt = Arc::new(
        JwtAuthenticator::new(JwtConfig::new(JwtKey::JwksFile(path.clone()))).expect("JWKS"),
    );
    let server = start(Security {
        authenticator: Some(jwt.clone()),
        ..Security::default()
    })
    .await;
    let alice = claims("alice", json!({}));
    let rsa_token = with_kid(Algorithm::RS256, "rsa-1", &rsa, &alice);
    assert_eq!(
        upgrade_with_token(&server, "/ws", &rsa_token).await.status,
        101
    );
    let ec_token = with_kid(Algorithm::ES256, "ec-1", &ec, &alice);
    let response = upgrade_with_token(&server, "/ws", &ec_token).await;
    assert_401(&response, "unsupported_algorithm");
    let unknown = with_kid(Algorithm::RS256, "rsa-2", &rsa, &alice);
    assert_401(
        &upgrade_with_token(&server, "/ws", &unknown).await,
        "unknown_key",
    );

    // Key rotation: the file gets the EC key; reload picks it up.
    write(vec![
        jwk(&rsa, Algorithm::RS256, "rsa-1"),
        jwk(&ec, Algorithm::ES256, "ec-1"),
    ]);
    assert_eq!(jwt.reload().expect("reload"), 2);
    assert_eq!(
        upgrade_with_token(&server, "/ws", &ec_token).await.status,
        101
    );
    // A broken file leaves the keys in use alone.
    std::fs::write(&path, "{\"keys\": 42}").expect("write");
    let err = jwt.reload().expect_err("broken JWKS");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert_eq!(
        upgrade_with_token(&server, "/ws", &ec_token).await.status,
        101
    );
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn iss_must_be_a_string_not_an_array() {
    let server = start(security(JwtConfig {
        issuer: Some("https://auth.example.com/".into()),
        ..secret_config()
    }))
    .await;
    let good = hs256(&claims(
        "alice",
        json!({"iss": "https://auth.example.com/"}),
    ));
    let mut echo = connect_bearer(&server, "/echo", &good).await;

    // RFC 7519 §4.1.1: `iss` is a StringOrURI. jsonwebtoken alone would
    // accept an array whose members are all configured issuers.
    for iss in [
        json!(["https://auth.example.com/"]),
        json!(["https://auth.example.com/", "https://evil.example/"]),
        json!({"iss": "https://auth.example.com/"}),
        json!(42),
    ] {
        let token = hs256(&claims("alice", json!({ "iss": iss })));
        let response = upgrade_with_token(&server, "/ws", &token).await;
        assert_401(&response, "invalid_issuer");
        assert_echo_answers(&mut echo, &iss.to_string()).await;
    }
    let token = hs256(&claims(
        "alice",
        json!({"iss": ["https://auth.example.com/"]}),
    ));
    let response = upgrade_with_token(&server, "/ws", &token).await;
    assert!(
        error_message_of(&response.json()).contains("must be a string"),
        "{}",
        response.text()
    );
    assert_eq!(upgrade_with_token(&server, "/ws", &good).await.status, 101);

    // Without auth.issuer, `iss` is not read at all.
    let server = start(security(secret_config())).await;
    let token = hs256(&claims("alice", json!({"iss": ["anything"]})));
    assert_eq!(upgrade_with_token(&server, "/ws", &token).await.status, 101);
}

#[tokio::test]
async fn jwks_with_several_keys_requires_kid() {
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("RSA key");
    let ec_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ec");
    let ec = EncodingKey::from_ec_pem(ec_pair.serialize_pem().as_bytes()).expect("ec key");
    let two = JwkSet {
        keys: vec![
            jwk(&ec, Algorithm::ES256, "ec-1"),
            jwk(&rsa, Algorithm::RS256, "rsa-1"),
        ],
    };
    let jwks = serde_json::to_string(&two).expect("json");
    let server = start(security(JwtConfig::new(JwtKey::Jwks(jwks.clone())))).await;
    let alice = claims("alice", json!({}));
    let named = with_kid(Algorithm::RS256, "rsa-1", &rsa, &alice);
    let mut echo = connect_bearer(&server, "/echo", &named).await;

    // No kid: refused before any signature is checked.
    let unnamed = sign(Algorithm::RS256, &rsa, &alice);
    let response = upgrade_with_token(&server, "/ws", &unnamed).await;
    assert_401(&response, "missing_kid");
    let message = error_message_of(&response.json());
    assert!(message.contains("2 keys"), "{message}");
    assert!(message.contains("auth.jwks_require_kid"), "{message}");
    assert_echo_answers(&mut echo, "after missing_kid").await;
    assert_eq!(upgrade_with_token(&server, "/ws", &named).await.status, 101);

    // Turned off, a token without kid is tried against each key.
    let server = start(security(JwtConfig {
        jwks_require_kid: false,
        ..JwtConfig::new(JwtKey::Jwks(jwks))
    }))
    .await;
    assert_eq!(
        upgrade_with_token(&server, "/ws", &unnamed).await.status,
        101
    );

    // One key needs no kid.
    let one = JwkSet {
        keys: vec![jwk(&rsa, Algorithm::RS256, "rsa-1")],
    };
    let server = start(security(JwtConfig::new(JwtKey::Jwks(
        serde_json::to_string(&one).expect("json"),
    ))))
    .await;
    assert_eq!(
        upgrade_with_token(&server, "/ws", &unnamed).await.status,
        101
    );

    // Several keys, one without a kid: tokens could not name it.
    let mut anonymous = jwk(&ec, Algorithm::ES256, "unused");
    anonymous.common.key_id = None;
    let mixed = JwkSet {
        keys: vec![jwk(&rsa, Algorithm::RS256, "rsa-1"), anonymous],
    };
    let mixed = serde_json::to_string(&mixed).expect("json");
    let err = JwtAuthenticator::new(JwtConfig::new(JwtKey::Jwks(mixed.clone())))
        .expect_err("a key without kid among several");
    assert!(err.to_string().contains("key #2 has no kid"), "{err}");
    JwtAuthenticator::new(JwtConfig {
        jwks_require_kid: false,
        ..JwtConfig::new(JwtKey::Jwks(mixed))
    })
    .expect("allowed when kid is not required");
}

#[test]
fn bad_jwt_configurations_are_named() {
    let err = JwtAuthenticator::new(JwtConfig::new(JwtKey::Secret(b"short".to_vec())))
        .expect_err("short secret");
    assert!(err.to_string().contains("5 bytes"), "{err}");
    assert!(err.to_string().contains("at least 32"), "{err}");
    let err = JwtAuthenticator::new(JwtConfig::new(JwtKey::PublicKeyPem(RSA_PRIVATE.to_vec())))
        .expect_err("private key");
    assert!(err.to_string().contains("-pubout"), "{err}");
    let err = JwtAuthenticator::new(JwtConfig::new(JwtKey::PublicKeyPem(b"hello".to_vec())))
        .expect_err("not PEM");
    assert!(err.to_string().contains("BEGIN PUBLIC KEY"), "{err}");
    let err = JwtAuthenticator::new(JwtConfig::new(JwtKey::PublicKeyFile(
        "/nonexistent/key.pem".into(),
    )))
    .expect_err("missing file");
    assert!(err.to_string().contains("/nonexistent/key.pem"), "{err}");
    let oct = r#"{"keys":[{"kty":"oct","kid":"s","k":"c2VjcmV0"}]}"#;
    let err = JwtAuthenticator::new(JwtConfig::new(JwtKey::Jwks(oct.into())))
        .expect_err("symmetric JWKS key");
    assert!(err.to_string().contains("symmetric"), "{err}");
    let err = JwtAuthenticator::new(JwtConfig::new(JwtKey::Jwks(r#"{"keys":[]}"#.into())))
        .expect_err("empty JWKS");
    assert!(err.to_string().contains("no signing key"), "{err}");
}

// ---------------------------------------------------------------------------
// Where the token travels, and the subprotocol
// ---------------------------------------------------------------------------

#[tokio::test]
async fn token_in_header_subprotocol_or_query() {
    let server = start(security(secret_config())).await;
    let token = hs256(&claims("alice", json!({})));

    let auth = format!("Bearer {token}");
    let (_a, response) = connect_with(&server, "/ws", &[("authorization", &auth)]).await;
    assert_eq!(response.status(), 101);
    assert!(response.headers().get("sec-websocket-protocol").is_none());

    // What a browser does: new WebSocket(url, ["switchboard.v1", "bearer." + jwt]).
    let offer = format!("switchboard.v1, bearer.{token}");
    let (_b, response) = connect_with(&server, "/ws", &[("sec-websocket-protocol", &offer)]).await;
    assert_eq!(response.status(), 101);
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "switchboard.v1",
        "the server answers with the protocol, never the token"
    );

    let (_c, response) = connect_with(&server, &format!("/ws?token={token}"), &[]).await;
    assert_eq!(response.status(), 101);

    // A bearer entry alone cannot be answered: refused with a clear 400.
    let mut headers = upgrade_headers();
    let alone = format!("bearer.{token}");
    headers.push(("Sec-WebSocket-Protocol", &alone));
    let response = http_upgrade(server.addr, "/ws", &headers).await;
    assert_eq!(response.status, 400, "{}", response.text());
    assert_eq!(response.error_code(), "subprotocol_required");

    server
        .eventually("three connections of alice", |hub| {
            hub.live_connections() == 3
        })
        .await;
}

#[tokio::test]
async fn subprotocol_is_echoed_without_authentication_too() {
    let server = TestServer::start().await;
    let (_client, response) = connect_with(
        &server,
        "/ws?id=1",
        &[("sec-websocket-protocol", "switchboard.v1")],
    )
    .await;
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "switchboard.v1"
    );
}

// ---------------------------------------------------------------------------
// The identity is the token's
// ---------------------------------------------------------------------------

#[tokio::test]
async fn token_for_alice_cannot_act_as_bob() {
    let server = start(security(secret_config())).await;
    let alice = hs256(&claims("alice", json!({})));

    // Asking for another ID with Alice's token is refused before the upgrade.
    let response = upgrade_with_token(&server, "/ws?id=bob", &alice).await;
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(response.error_code(), "id_mismatch");
    assert_eq!(server.hub.metrics().errors(ErrorKind::Forbidden), 1);
    // Her own ID in ?id= is fine.
    let response = upgrade_with_token(&server, "/ws?id=alice", &alice).await;
    assert_eq!(response.status, 101);

    // Connected with her token, she is registered as alice, never bob:
    // messages for bob do not reach her, messages for alice do.
    let mut as_alice = connect_bearer(&server, "/ws", &alice).await;
    let carol = hs256(&claims("carol", json!({})));
    let mut as_carol = connect_bearer(&server, "/ws", &carol).await;
    server
        .eventually("alice and carol registered", |hub| {
            hub.live_connections() >= 2
        })
        .await;
    send_text(&mut as_carol, r#"{"targets":["bob"],"payload":"for bob"}"#).await;
    send_text(
        &mut as_carol,
        r#"{"targets":["alice"],"payload":"for alice"}"#,
    )
    .await;
    assert_eq!(recv_text(&mut as_alice).await, r#""for alice""#);

    let listing = http_get(server.addr, "/api/connections").await.json();
    let ids: Vec<&str> = listing["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"alice") && ids.contains(&"carol"),
        "{listing}"
    );
    assert!(!ids.contains(&"bob"), "{listing}");

    // A sub that is not a valid client ID is refused.
    let bad = hs256(&claims("not a valid id", json!({})));
    assert_401(
        &upgrade_with_token(&server, "/ws", &bad).await,
        "invalid_token",
    );
}

#[tokio::test]
async fn claims_restrict_targets_and_topics() {
    let server = start(security(secret_config())).await;
    let limited = hs256(&claims(
        "alice",
        json!({"sb_targets": ["bob", "team-*"], "sb_subscribe": ["room/*"], "sb_publish": []}),
    ));
    let mut alice = connect_bearer(&server, "/ws", &limited).await;
    let mut bob = connect_bearer(&server, "/ws", &hs256(&claims("bob", json!({})))).await;
    server
        .eventually("both registered", |hub| hub.live_connections() == 2)
        .await;

    send_text(&mut alice, r#"{"targets":["bob"],"payload":1}"#).await;
    assert_eq!(recv_text(&mut bob).await, "1");
    // One forbidden target refuses the whole frame: bob gets nothing.
    send_text(&mut alice, r#"{"targets":["bob","carol"],"payload":2}"#).await;
    let error = recv_json(&mut alice).await;
    assert_eq!(error_code_of(&error), "forbidden_target");
    assert!(error.to_string().contains("targets[1]"), "{error}");
    send_text(&mut alice, r#"{"type":"subscribe","topic":"lobby"}"#).await;
    assert_eq!(recv_error_code(&mut alice).await, "forbidden_topic");
    send_text(&mut alice, r#"{"type":"subscribe","topic":"room/7"}"#).await;
    assert_eq!(recv_json(&mut alice).await, json!({"subscribed": "room/7"}));
    send_text(
        &mut alice,
        r#"{"type":"publish","topic":"room/7","payload":3}"#,
    )
    .await;
    assert_eq!(recv_error_code(&mut alice).await, "forbidden_topic");
    assert_silent(&mut bob, Duration::from_millis(200)).await;
    assert_eq!(server.hub.metrics().errors(ErrorKind::Forbidden), 3);

    // /chat is the topic "chat": not in alice's sb_subscribe.
    let response = upgrade_with_token(&server, "/chat", &limited).await;
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(response.error_code(), "forbidden_topic");
    // A reader of /chat who may not publish there.
    let reader = hs256(&claims("dave", json!({"sb_publish": []})));
    let mut dave = connect_bearer(&server, "/chat", &reader).await;
    send_text(&mut dave, "hello").await;
    assert_eq!(recv_error_code(&mut dave).await, "forbidden_topic");

    // A claim of the wrong shape is a bad token.
    let bad = hs256(&claims("eve", json!({"sb_targets": "bob"})));
    let response = upgrade_with_token(&server, "/ws", &bad).await;
    assert_401(&response, "invalid_token");
    assert!(
        response.text().contains("sb_targets"),
        "{}",
        response.text()
    );
}

// ---------------------------------------------------------------------------
// Expiry while connected
// ---------------------------------------------------------------------------

#[tokio::test]
async fn token_expiring_while_connected_closes_with_4002_after_the_grace() {
    let server = start(Security {
        expiry_grace: Duration::from_millis(500),
        ..security(JwtConfig {
            clock_skew: Duration::ZERO,
            ..secret_config()
        })
    })
    .await;
    let short = hs256(&json!({"sub": "alice", "exp": now() + 2}));
    let long = hs256(&claims("bob", json!({})));
    let connected = tokio::time::Instant::now();
    let mut alice = connect_bearer(&server, "/ws", &short).await;
    let mut bob = connect_bearer(&server, "/ws", &long).await;

    // Still open and working before exp.
    assert_silent(&mut alice, Duration::from_millis(700)).await;
    send_text(&mut bob, r#"{"targets":["alice"],"payload":"still here"}"#).await;
    assert_eq!(recv_text(&mut alice).await, r#""still here""#);

    let frame = recv_close(&mut alice).await.expect("a close frame");
    let elapsed = connected.elapsed();
    assert_eq!(u16::from(frame.code), 4002, "{frame:?}");
    assert!(frame.reason.contains("token expired"), "{frame:?}");
    // exp is whole seconds: 1-2 s away when connecting, plus 0.5 s of grace.
    assert!(elapsed >= Duration::from_millis(1000), "{elapsed:?}");
    drain_until_closed(&mut alice).await;

    // The connection with a long-lived token is untouched.
    send_text(&mut bob, r#"{"type":"subscribe","topic":"t"}"#).await;
    assert_eq!(recv_json(&mut bob).await, json!({"subscribed": "t"}));
    server
        .eventually("alice unregistered", |hub| hub.live_connections() == 1)
        .await;
}

// ---------------------------------------------------------------------------
// A custom authenticator
// ---------------------------------------------------------------------------

/// Opaque session tokens from a table, as an embedder might check them.
struct Sessions;

impl Authenticator for Sessions {
    fn authenticate<'a>(
        &'a self,
        request: &'a http::request::Parts,
    ) -> BoxFuture<'a, Result<Identity, HttpError>> {
        Box::pin(async move {
            let token = bearer_token(request)?
                .ok_or_else(|| unauthorized("missing_token", "send a session token"))?;
            let user = match token.as_str() {
                "session-of-zoe" => "zoe",
                _ => return Err(unauthorized("invalid_token", "unknown session")),
            };
            let id =
                ClientId::new(user).map_err(|e| unauthorized("invalid_token", e.to_string()))?;
            Ok(Identity::new(id))
        })
    }
}

#[tokio::test]
async fn a_custom_authenticator_plugs_in() {
    let server = start(Security {
        authenticator: Some(Arc::new(Sessions)),
        ..Security::default()
    })
    .await;
    let response = upgrade_with_token(&server, "/ws", "session-of-someone").await;
    assert_401(&response, "invalid_token");
    let mut zoe = connect_bearer(&server, "/ws", "session-of-zoe").await;
    server
        .eventually("zoe registered", |hub| hub.live_connections() == 1)
        .await;
    let report = http_post_json(
        server.addr,
        "/api/send",
        r#"{"targets":["zoe"],"payload":"hi"}"#,
    )
    .await
    .json();
    assert_eq!(report["delivered"], json!(["zoe"]));
    assert_eq!(recv_text(&mut zoe).await, r#""hi""#);
}

// ---------------------------------------------------------------------------
// switchboard.v1: the sender is the token's subject; refresh in-band
// ---------------------------------------------------------------------------

/// A v1 connection with `token` in the subprotocol, hello answered.
async fn v1_with_token(server: &TestServer, token: &str) -> Client {
    let offer = format!("switchboard.v1, bearer.{token}");
    let (mut client, response) =
        connect_with(server, "/ws", &[("sec-websocket-protocol", &offer)]).await;
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "switchboard.v1"
    );
    send_text(&mut client, r#"{"type":"hello","id":0}"#).await;
    assert_eq!(recv_json(&mut client).await["type"], "welcome");
    client
}

#[tokio::test]
async fn v1_refresh_moves_the_expiry_and_keeps_the_subject() {
    let server = start(Security {
        expiry_grace: Duration::from_millis(300),
        ..security(JwtConfig {
            clock_skew: Duration::ZERO,
            ..secret_config()
        })
    })
    .await;
    let short = hs256(&json!({"sub": "alice", "exp": now() + 2}));
    let mut alice = v1_with_token(&server, &short).await;
    let mut bob = v1_with_token(&server, &hs256(&claims("bob", json!({})))).await;

    // The sender of a message is the token's subject.
    send_text(
        &mut alice,
        r#"{"type":"send","id":1,"targets":["bob"],"payload":"hi"}"#,
    )
    .await;
    assert_eq!(recv_json(&mut alice).await["delivered"], json!(["bob"]));
    assert_eq!(recv_json(&mut bob).await["from"], "alice");

    // Someone else's token: refused, nothing changes.
    let bobs = hs256(&claims("bob", json!({})));
    send_text(
        &mut alice,
        &json!({"type": "refresh", "id": 2, "token": bobs}).to_string(),
    )
    .await;
    assert_eq!(
        recv_json(&mut alice).await["error"]["code"],
        "subject_mismatch"
    );
    // A bad token: refused with the handshake's code.
    send_text(
        &mut alice,
        r#"{"type":"refresh","id":3,"token":"not.a.token"}"#,
    )
    .await;
    let refused = recv_json(&mut alice).await;
    assert_eq!(refused["id"], 3);
    assert!(refused["error"]["code"].as_str().is_some(), "{refused}");

    // A new token for alice, valid for an hour: the 4002 at exp + grace
    // (under 3 s from now) does not come.
    let exp = now() + 3600;
    let fresh = hs256(&json!({"sub": "alice", "exp": exp}));
    send_text(
        &mut alice,
        &json!({"type": "refresh", "id": 4, "token": fresh}).to_string(),
    )
    .await;
    let ack = recv_json(&mut alice).await;
    assert_eq!(ack["id"], 4);
    assert_eq!(ack["expires_at_ms"], exp * 1000);
    assert_silent(&mut alice, Duration::from_millis(3500)).await;
    send_text(
        &mut alice,
        r#"{"type":"send","id":5,"targets":["bob"],"payload":"still"}"#,
    )
    .await;
    assert_eq!(recv_json(&mut alice).await["delivered"], json!(["bob"]));
}

#[tokio::test]
async fn repeated_token_parameter_is_400_invalid_query() {
    let server = start(security(secret_config())).await;
    let alice = hs256(&claims("alice", json!({})));
    let mut echo = connect_bearer(&server, "/echo", &alice).await;
    // Read as a list the first token counted, read as a map the last: a
    // repeated ?token= is refused whichever is valid.
    let mallory = hs256(&claims("mallory", json!({})));
    for target in [
        format!("/ws?token={alice}&token={mallory}"),
        format!("/ws?token=junk&token={alice}"),
    ] {
        let response = http_upgrade(server.addr, &target, &upgrade_headers()).await;
        assert_eq!(response.status, 400, "{}", response.text());
        assert_eq!(response.error_code(), "invalid_query");
        assert!(
            error_message_of(&response.json()).contains("`token` is given 2 times"),
            "{}",
            response.text()
        );
        assert_echo_answers(&mut echo, "still answering").await;
    }
    let response = http_upgrade(
        server.addr,
        &format!("/ws?token={alice}"),
        &upgrade_headers(),
    )
    .await;
    assert_eq!(response.status, 101, "{}", response.text());
}
