//! The `switchboard` binary's security, configured from a file, the
//! environment and flags: the safe defaults on a non-loopback address, a
//! production configuration (JWT + API keys + TLS + origins) end to end, a
//! certificate reload on SIGHUP, per-IP limits, and every bad setting
//! stopping the server with exit code 2 and a message naming the key.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt as _, StreamExt as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use support::{Server, TempDir, TempFile, WAIT, next_text, run_to_exit, switchboard};

const SECRET: &str = "cli test secret, at least thirty-two bytes";
const API_KEY: &str = "api-key-0123456789abcdef";
const API_KEY_2: &str = "api-key-second-fedcba9876";

// ---------------------------------------------------------------------------
// Processes and files
// ---------------------------------------------------------------------------

/// Runs with `toml` as the config file (listening on loopback) plus
/// `args`, and expects exit 2 naming every one of `named`.
fn assert_config_error(toml: &str, args: &[&str], envs: &[(&str, &str)], named: &[&str]) {
    let file = TempFile::new(".toml", toml);
    let mut command = switchboard();
    command
        .args(["--listen", "127.0.0.1:0", "--config", file.path()])
        .args(args);
    for (name, value) in envs {
        command.env(name, value);
    }
    let (code, stderr) = run_to_exit(command).into_code_and_stderr();
    assert_eq!(code, Some(2), "{toml:?} {args:?}: stderr:\n{stderr}");
    for name in named {
        assert!(
            stderr.contains(name),
            "{toml:?} {args:?}: stderr does not name {name}:\n{stderr}"
        );
    }
}

// ---------------------------------------------------------------------------
// Tokens, certificates, clients
// ---------------------------------------------------------------------------

fn token(sub: &str, exp_in: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = json!({
        "sub": sub,
        "exp": now + exp_in,
        "iss": "https://auth.example.com/",
        "aud": "switchboard",
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

struct Ca {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("CA");
        Self {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self) -> (String, String, CertificateDer<'static>) {
        let params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        TlsConnector::from(Arc::new(config))
    }
}

async fn tls(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> (TlsStream<TcpStream>, CertificateDer<'static>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let stream = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("TLS handshake");
    let cert = stream.get_ref().1.peer_certificates().expect("certs")[0].clone();
    (stream, cert)
}

/// One HTTPS request; returns status and body.
async fn https(
    connector: &TlsConnector,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let (mut stream, _) = tls(connector, addr).await;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await;
    support::status_and_body(&String::from_utf8_lossy(&response))
}

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A WSS upgrade with `headers`; `Err(status)` when refused.
async fn wss(
    connector: &TlsConnector,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Wss, CertificateDer<'static>, Option<String>), u16> {
    let (stream, cert) = tls(connector, addr).await;
    let mut request = format!("wss://localhost:{}{path}", addr.port())
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            http::HeaderValue::from_str(value).expect("value"),
        );
    }
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, response)) => {
            let protocol = response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().expect("ascii").to_owned());
            Ok((ws, cert, protocol))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(err) => panic!("unexpected handshake error: {err}"),
    }
}

// ---------------------------------------------------------------------------
// Safe defaults
// ---------------------------------------------------------------------------

#[test]
fn non_loopback_with_auth_none_exits_2_before_binding() {
    // A port taken on every interface: binding it would exit 3, so exit 2
    // shows the refusal comes first.
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let listen = format!("0.0.0.0:{port}");
    let mut command = switchboard();
    command.args(["--listen", &listen]);
    let (code, stderr) = run_to_exit(command).into_code_and_stderr();
    assert_eq!(code, Some(2), "{stderr}");
    for named in [
        "auth.mode",
        "\"none\"",
        &listen,
        "--insecure-allow-anonymous",
        "jwt",
    ] {
        assert!(stderr.contains(named), "does not name {named}:\n{stderr}");
    }

    // With authentication but no API key, the API would be open: refused too.
    let mut command = switchboard();
    command
        .args(["--listen", &listen, "--auth-mode", "jwt"])
        .env("SWITCHBOARD_AUTH_JWT_SECRET", SECRET);
    let (code, stderr) = run_to_exit(command).into_code_and_stderr();
    assert_eq!(code, Some(2), "{stderr}");
    for named in ["api.keys", "--insecure-open-api", &listen] {
        assert!(stderr.contains(named), "does not name {named}:\n{stderr}");
    }
    // The secret from the environment never appears in messages.
    assert!(!stderr.contains(SECRET), "{stderr}");
}

#[test]
fn a_listen_name_resolving_to_a_non_loopback_address_needs_auth() {
    // glibc resolves the name "0" to 0.0.0.0 (the inet_aton form): a host
    // name that resolves to a non-loopback address, without the network
    // or /etc/hosts. The port is taken on every interface, so exit 2 shows
    // the refusal comes before binding.
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let listen = format!("0:{port}");
    let resolved = format!("0.0.0.0:{port}");
    for env in [false, true] {
        let mut command = switchboard();
        if env {
            command.env("SWITCHBOARD_LISTEN", &listen);
        } else {
            command.args(["--listen", &listen]);
        }
        let (code, stderr) = run_to_exit(command).into_code_and_stderr();
        assert_eq!(code, Some(2), "{stderr}");
        for named in [
            "auth.mode",
            &listen,
            &resolved,
            "not a loopback address",
            "--insecure-allow-anonymous",
        ] {
            assert!(stderr.contains(named), "does not name {named}:\n{stderr}");
        }
    }
}

#[tokio::test]
async fn insecure_flags_start_on_a_public_address_with_warnings() {
    let mut command = switchboard();
    command.args([
        "--listen",
        "0.0.0.0:0",
        "--insecure-allow-anonymous",
        "--insecure-open-api",
    ]);
    let server = Server::spawn(command);
    let log = server.log_text();
    assert!(
        log.contains("WARN") && log.contains("--insecure-allow-anonymous"),
        "{log}"
    );
    assert!(log.contains("no api.keys"), "{log}");
    // Anonymous clients work, as asked.
    let addr = SocketAddr::from(([127, 0, 0, 1], server.addr.port()));
    let (mut client, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/echo"))
        .await
        .expect("connect");
    client.send(WsMessage::text("hi")).await.expect("send");
    let echoed = tokio::time::timeout(WAIT, client.next())
        .await
        .expect("echo in time")
        .expect("open")
        .expect("ok");
    assert_eq!(echoed, WsMessage::text("hi"));
}

// ---------------------------------------------------------------------------
// The production configuration
// ---------------------------------------------------------------------------

#[tokio::test]
async fn production_config_jwt_api_keys_tls_origins_and_sighup_reload() {
    let ca = Ca::new();
    let (cert_a, key_a, der_a) = ca.leaf();
    let (cert_b, key_b, der_b) = ca.leaf();
    let cert = TempFile::new("-cert.pem", &cert_a);
    let key = TempFile::new("-key.pem", &key_a);
    let config = TempFile::new(
        ".toml",
        &format!(
            r#"
listen = "127.0.0.1:0"
allowed_origins = ["https://app.example.com", "https://*.example.com"]

[auth]
mode = "jwt"
issuer = "https://auth.example.com/"
audience = "switchboard"
clock_skew = "5s"
expiry_grace = "10s"

[api]
keys = ["{API_KEY}", "{API_KEY_2}"]

[tls]
cert = "{}"
key = "{}"
"#,
            cert.path(),
            key.path()
        ),
    );
    let mut command = switchboard();
    command
        .args(["--config", config.path()])
        .env("SWITCHBOARD_AUTH_JWT_SECRET", SECRET);
    let server = Server::spawn(command);
    assert!(
        server.log_text().contains("listening on https://"),
        "{}",
        server.log_text()
    );
    let addr = server.addr;
    let connector = ca.connector();
    let alice = token("alice", 3600);
    // A browser wanting the plain relay offers switchboard.plain with its
    // token (switchboard.v1 would select the v1 protocol).
    let offer = format!("switchboard.plain, bearer.{alice}");
    let origin = ("origin", "https://app.example.com");

    // No token: 401. A token for alice, in the subprotocol, from an allowed
    // origin: connected, answered with switchboard.plain only.
    assert_eq!(
        wss(&connector, addr, "/ws", &[origin]).await.err(),
        Some(401)
    );
    let (mut ws, shown, protocol) = wss(
        &connector,
        addr,
        "/ws",
        &[origin, ("sec-websocket-protocol", &offer)],
    )
    .await
    .expect("alice connects");
    assert_eq!(shown, der_a);
    assert_eq!(protocol.as_deref(), Some("switchboard.plain"));
    // Another origin: 403, token or not.
    assert_eq!(
        wss(
            &connector,
            addr,
            "/ws",
            &[
                ("origin", "https://evil.example"),
                ("sec-websocket-protocol", &offer)
            ],
        )
        .await
        .err(),
        Some(403)
    );
    // A wildcard origin, the token in the header, someone else's ?id=: 403.
    let bearer = format!("Bearer {alice}");
    assert_eq!(
        wss(
            &connector,
            addr,
            "/ws?id=bob",
            &[
                ("origin", "https://chat.example.com"),
                ("authorization", &bearer)
            ],
        )
        .await
        .err(),
        Some(403)
    );

    // The API over HTTPS: no key 401, each key 200, alice listed.
    let (status, body) = https(&connector, addr, "GET", "/api/connections", &[]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("missing_api_key"), "{body}");
    for key in [API_KEY, API_KEY_2] {
        let auth = format!("Bearer {key}");
        let (status, body) = https(
            &connector,
            addr,
            "GET",
            "/api/connections",
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"alice\""), "{body}");
    }
    let (status, _) = https(&connector, addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 401, "/metrics is protected by default");
    let (status, _) = https(&connector, addr, "GET", "/heartbeat", &[]).await;
    assert_eq!(status, 200, "/heartbeat stays public for load balancers");

    // SIGHUP with a renewed certificate: new connections get it, alice's
    // connection stays open.
    cert.write(&cert_b);
    key.write(&key_b);
    server.signal("HUP");
    server.wait_for_log("reloaded the TLS certificate");
    let (_, shown) = tls(&connector, addr).await;
    assert_eq!(shown, der_b);
    let auth = format!("Bearer {API_KEY}");
    let body = r#"{"targets":["alice"],"payload":"after reload"}"#;
    let (mut stream, _) = tls(&connector, addr).await;
    let request = format!(
        "POST /api/send HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.contains("\"delivered\":[\"alice\"]"), "{response}");
    assert_eq!(next_text(&mut ws).await, "\"after reload\"");

    // A broken certificate on the next SIGHUP is logged; the server keeps
    // serving the current one.
    cert.write("garbage");
    server.signal("HUP");
    server.wait_for_log("TLS reload failed");
    let (_, shown) = tls(&connector, addr).await;
    assert_eq!(shown, der_b);
}

#[tokio::test]
async fn per_ip_limits_from_flags() {
    let mut command = switchboard();
    command.args(["--listen", "127.0.0.1:0", "--max-connections-per-ip", "1"]);
    let server = Server::spawn(command);
    let url = format!("ws://{}/echo", server.addr);
    let (_held, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("first connection");
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
            assert!(response.headers().contains_key("retry-after"));
        }
        other => panic!("expected 429, got {:?}", other.map(|(_, r)| r.status())),
    }
}

// ---------------------------------------------------------------------------
// Bad settings
// ---------------------------------------------------------------------------

#[test]
fn bad_security_settings_exit_2_naming_the_key() {
    assert_config_error(
        "[auth]\nmode = \"jwt\"\n",
        &[],
        &[],
        &["auth.mode", "jwt_secret"],
    );
    assert_config_error(
        &format!("[auth]\nmode = \"jwt\"\njwt_secret = \"{SECRET}\"\njwt_jwks = \"k.json\"\n"),
        &[],
        &[],
        &["auth.jwt_secret", "auth.jwt_jwks"],
    );
    assert_config_error(
        "[auth]\nmode = \"jwt\"\njwt_secret = \"too short\"\n",
        &[],
        &[],
        &["auth.jwt_secret", "at least 32"],
    );
    assert_config_error(
        "[auth]\nmode = \"jwt\"\njwt_public_key = \"/nonexistent/key.pem\"\n",
        &[],
        &[],
        &["auth.jwt_public_key", "/nonexistent/key.pem"],
    );
    assert_config_error(
        &format!("[auth]\njwt_secret = \"{SECRET}\"\n"),
        &[],
        &[],
        &["auth.mode", "\"jwt\""],
    );
    assert_config_error("[auth]\nmode = \"oauth\"\n", &[], &[], &["mode", "oauth"]);
    assert_config_error("[auth]\nsecret = \"x\"\n", &[], &[], &["secret"]);
    assert_config_error("[api]\nkeys = [\"short\"]\n", &[], &[], &["api.keys", "16"]);
    assert_config_error("[api]\nkey = \"x\"\n", &[], &[], &["key"]);
    assert_config_error(
        "allowed_origins = [\"app.example.com\"]\n",
        &[],
        &[],
        &["allowed_origins", "app.example.com", "https://"],
    );
    assert_config_error(
        "trusted_proxies = [\"10.0.0.0/40\"]\n",
        &[],
        &[],
        &["trusted_proxies", "10.0.0.0/40"],
    );
    assert_config_error("[tls]\ncert = \"c.pem\"\n", &[], &[], &["tls.key"]);
    assert_config_error(
        "[tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n",
        &[],
        &[],
        &["tls.cert", "/nonexistent/c.pem"],
    );
    assert_config_error("[tls]\ncrt = \"c.pem\"\n", &[], &[], &["crt"]);
    // Flags and the environment are checked the same way.
    assert_config_error("", &["--auth-mode", "jwt"], &[], &["auth.mode"]);
    assert_config_error(
        "",
        &[],
        &[("SWITCHBOARD_API_KEYS", "0123456789abcdef0123,tiny")],
        &["api.keys", "#2"],
    );
    assert_config_error(
        "",
        &["--allowed-origins", "https://a.example.com,https://*"],
        &[],
        &["allowed_origins"],
    );
    assert_config_error("", &["--tls-key", "k.pem"], &[], &["tls.cert"]);
}

/// The RSA public key the library's tests use, as PEM.
fn rsa_public_pem() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../switchboard/tests/fixtures/rsa-public.pem"
    ))
    .expect("read rsa-public.pem")
}

#[tokio::test]
async fn relative_paths_in_the_file_are_taken_from_the_files_folder() {
    let ca = Ca::new();
    let (cert_pem, key_pem, der) = ca.leaf();
    let dir = TempDir::new();
    dir.file("tls/cert.pem", &cert_pem);
    dir.file("tls/key.pem", &key_pem);
    dir.file("jwt.pem", &rsa_public_pem());
    dir.file(
        "conf/switchboard.toml",
        "listen = \"127.0.0.1:0\"\n[auth]\nmode = \"jwt\"\njwt_public_key = \"../jwt.pem\"\n[tls]\ncert = \"../tls/cert.pem\"\nkey = \"../tls/key.pem\"\n",
    );
    // The working directory holds none of the files: from `/` with an
    // absolute --config, and from the folder above with a relative one.
    let above = dir.path().parent().expect("temp dir has a parent");
    let name = dir.path().file_name().expect("temp dir name");
    let relative = std::path::Path::new(name).join("conf/switchboard.toml");
    for (cwd, config) in [
        (std::path::Path::new("/"), dir.join("conf/switchboard.toml")),
        (above, relative.to_str().expect("UTF-8").to_owned()),
    ] {
        let mut command = switchboard();
        command.current_dir(cwd).args(["--config", &config]);
        let server = Server::spawn(command);
        let log = server.log_text();
        assert!(log.contains("listening on https://"), "{log}");
        assert!(log.contains(r#"auth="jwt""#), "{log}");
        let (_, shown) = tls(&ca.connector(), server.addr).await;
        assert_eq!(shown, der, "--config {config} from {}", cwd.display());
    }
}

#[test]
fn file_errors_name_the_path_that_was_tried() {
    let dir = TempDir::new();
    // (config file, flags, environment, stderr must name)
    type Case<'a> = (
        &'a str,
        &'a [&'a str],
        &'a [(&'a str, &'a str)],
        [String; 2],
    );
    let cases: [Case<'_>; 6] = [
        // In the file: relative to the file's folder, whatever the working
        // directory and however --config was written.
        (
            "[tls]\ncert = \"missing-cert.pem\"\nkey = \"missing-key.pem\"\n",
            &[],
            &[],
            ["tls.cert".into(), dir.join("conf/missing-cert.pem")],
        ),
        (
            "[auth]\nmode = \"jwt\"\njwt_jwks = \"keys/missing.json\"\n",
            &[],
            &[],
            ["auth.jwt_jwks".into(), dir.join("conf/keys/missing.json")],
        ),
        (
            "[auth]\nmode = \"jwt\"\njwt_public_key = \"missing.pem\"\n",
            &[],
            &[],
            ["auth.jwt_public_key".into(), dir.join("conf/missing.pem")],
        ),
        // In flags and the environment: relative to the working directory.
        (
            "",
            &["--tls-cert", "c.pem", "--tls-key", "k.pem"],
            &[],
            ["tls.cert".into(), dir.join("c.pem")],
        ),
        (
            "",
            &["--auth-mode", "jwt"],
            &[("SWITCHBOARD_AUTH_JWT_JWKS", "jwks.json")],
            ["auth.jwt_jwks".into(), dir.join("jwks.json")],
        ),
        (
            "",
            &["--auth-mode", "jwt", "--auth-jwt-public-key", "pub.pem"],
            &[],
            ["auth.jwt_public_key".into(), dir.join("pub.pem")],
        ),
    ];
    for (toml, args, envs, named) in cases {
        dir.file("conf/switchboard.toml", toml);
        let mut command = switchboard();
        command
            .current_dir(dir.path())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--config",
                "conf/switchboard.toml",
            ])
            .args(args);
        for (name, value) in envs {
            command.env(name, value);
        }
        let (code, stderr) = run_to_exit(command).into_code_and_stderr();
        assert_eq!(code, Some(2), "{toml:?} {args:?} {envs:?}: {stderr}");
        for name in &named {
            assert!(
                stderr.contains(name.as_str()),
                "{toml:?} {args:?} {envs:?}: stderr does not name {name}:\n{stderr}"
            );
        }
    }
    // The config file itself.
    let mut command = switchboard();
    command
        .current_dir(dir.path())
        .args(["--config", "missing.toml"]);
    let (code, stderr) = run_to_exit(command).into_code_and_stderr();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(&dir.join("missing.toml")), "{stderr}");
}

#[test]
fn a_pem_key_as_the_jwt_secret_gets_the_same_message_from_flag_env_and_file() {
    let pem = rsa_public_pem();
    let body = pem.lines().nth(1).expect("a PEM body line");
    let file = TempFile::config(&format!(
        "[auth]\nmode = \"jwt\"\njwt_secret = \"\"\"\n{pem}\"\"\"\n"
    ));
    let mut by_flag = switchboard();
    by_flag.args(["--auth-mode", "jwt", "--auth-jwt-secret", &pem]);
    let mut by_env = switchboard();
    by_env
        .args(["--auth-mode", "jwt"])
        .env("SWITCHBOARD_AUTH_JWT_SECRET", &pem);
    let mut by_file = switchboard();
    by_file.args(["--config", file.path()]);
    for (source, mut command) in [("flag", by_flag), ("env", by_env), ("file", by_file)] {
        command.args(["--listen", "127.0.0.1:0"]);
        let (code, stderr) = run_to_exit(command).into_code_and_stderr();
        assert_eq!(code, Some(2), "{source}: {stderr}");
        for named in ["auth.jwt_secret", "is a PEM key", "jwt_public_key"] {
            assert!(
                stderr.contains(named),
                "{source}: does not say {named:?}:\n{stderr}"
            );
        }
        // The key is not echoed back (it might have been a private one).
        assert!(
            !stderr.contains(body),
            "{source}: echoes the key:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn api_keys_from_the_environment_are_comma_separated() {
    let mut command = switchboard();
    command
        .args(["--listen", "127.0.0.1:0"])
        .env("SWITCHBOARD_API_KEYS", format!("{API_KEY},{API_KEY_2}"));
    let server = Server::spawn(command);
    for (key, expected) in [
        (API_KEY, 200),
        (API_KEY_2, 200),
        ("not-a-key-0123456789", 401),
    ] {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        let request = format!(
            "GET /api/connections HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\nauthorization: Bearer {key}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await;
        let response = String::from_utf8_lossy(&response);
        assert!(
            response.starts_with(&format!("HTTP/1.1 {expected}")),
            "{key}: {response}"
        );
    }
}

#[tokio::test]
async fn the_readme_production_example_starts_on_a_public_address() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("read README.md");
    let start = readme
        .find("```toml\n# /etc/switchboard/switchboard.toml")
        .expect("the production example in README.md");
    let block = &readme[start + "```toml\n".len()..];
    let block = &block[..block.find("```").expect("end of the block")];
    let ca = Ca::new();
    let (cert_pem, key_pem, der) = ca.leaf();
    let cert = TempFile::new("-cert.pem", &cert_pem);
    let key = TempFile::new("-key.pem", &key_pem);
    let public_key = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../switchboard/tests/fixtures/rsa-public.pem"
    );
    // Only the port and the file paths change.
    let mut toml = String::new();
    for line in block.lines() {
        let line = match line.split_once(" = ").map(|(k, _)| k) {
            Some("listen") => "listen = \"0.0.0.0:0\"".to_owned(),
            Some("jwt_public_key") => format!("jwt_public_key = \"{public_key}\""),
            Some("cert") => format!("cert = \"{}\"", cert.path()),
            Some("key") => format!("key = \"{}\"", key.path()),
            _ => line.to_owned(),
        };
        toml.push_str(&line);
        toml.push('\n');
    }
    let config = TempFile::new(".toml", &toml);
    let mut command = switchboard();
    command
        .args(["--config", config.path()])
        .env("SWITCHBOARD_API_KEYS", API_KEY);
    let server = Server::spawn(command);
    assert!(
        server.log_text().contains("listening on https://0.0.0.0:"),
        "{}",
        server.log_text()
    );
    assert!(!server.log_text().contains("WARN"), "{}", server.log_text());
    let addr = SocketAddr::from(([127, 0, 0, 1], server.addr.port()));
    let connector = ca.connector();
    let (_, shown) = tls(&connector, addr).await;
    assert_eq!(shown, der);
    let origin = ("origin", "https://app.example.com");
    assert_eq!(
        wss(&connector, addr, "/ws", &[origin]).await.err(),
        Some(401)
    );
}
