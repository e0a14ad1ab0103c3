//! HTTPS and WSS on one port with rustls, against a real TLS client, with
//! certificates made by `rcgen` here; and a certificate reload that serves
//! new connections the new certificate while an old connection stays open.
#![cfg(feature = "tls")]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::WAIT;
use futures_util::StreamExt as _;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use switchboard::tls::{Tls, TlsError};
use switchboard::{Hub, Limits, ServeOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;

/// A test CA that issues `localhost` certificates.
struct Ca {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate for localhost: (cert PEM, key PEM, cert DER).
    fn leaf(&self) -> (String, String, CertificateDer<'static>) {
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("params");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // A resumed session shows the certificate of the session it
        // resumes; every connection here does a full handshake.
        config.resumption = rustls::client::Resumption::disabled();
        TlsConnector::from(Arc::new(config))
    }
}

/// Two files in the temp directory, removed on drop.
struct Files {
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir();
        let id = std::process::id();
        Self {
            cert: dir.join(format!("switchboard-tls-{id}-{n}-cert.pem")),
            key: dir.join(format!("switchboard-tls-{id}-{n}-key.pem")),
        }
    }

    fn write(&self, cert: &str, key: &str) {
        std::fs::write(&self.cert, cert).expect("write cert");
        std::fs::write(&self.key, key).expect("write key");
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cert);
        let _ = std::fs::remove_file(&self.key);
    }
}

async fn serve_tls(tls: Tls) -> SocketAddr {
    let hub = Hub::new(Limits::default());
    let app = switchboard::app(hub.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let options = ServeOptions {
        tls: Some(tls),
        ..ServeOptions::default()
    };
    tokio::spawn(switchboard::serve_with_options(
        listener,
        app,
        hub,
        std::future::pending(),
        options,
    ));
    addr
}

/// A TLS connection to `addr` and the certificate the server showed.
async fn tls_connect(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> (TlsStream<TcpStream>, CertificateDer<'static>) {
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    let name = ServerName::try_from("localhost").expect("server name");
    let stream = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake within the timeout")
        .expect("TLS handshake");
    let cert = stream.get_ref().1.peer_certificates().expect("peer certs")[0].clone();
    (stream, cert)
}

async fn wss(
    connector: &TlsConnector,
    addr: SocketAddr,
    path: &str,
) -> (
    WebSocketStream<TlsStream<TcpStream>>,
    CertificateDer<'static>,
) {
    let (stream, cert) = tls_connect(connector, addr).await;
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, response) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("WebSocket handshake over TLS");
    assert_eq!(response.status(), 101);
    (ws, cert)
}

#[tokio::test]
async fn https_and_wss_on_one_port_with_a_real_client() {
    let ca = Ca::new();
    let (cert, key, der) = ca.leaf();
    let files = Files::new();
    files.write(&cert, &key);
    let addr = serve_tls(Tls::from_pem_files(&files.cert, &files.key).expect("tls")).await;
    let connector = ca.connector();

    // HTTPS.
    let (mut stream, shown) = tls_connect(&connector, addr).await;
    assert_eq!(shown, der);
    stream
        .write_all(b"GET /heartbeat HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(r#"{"status":"ok"}"#), "{response}");

    // WSS on the same port: echo and the relay.
    let (mut echo, _) = wss(&connector, addr, "/echo").await;
    send_text_tls(&mut echo, "over TLS").await;
    assert_eq!(recv_text_tls(&mut echo).await, "over TLS");
    let (mut one, _) = wss(&connector, addr, "/ws?id=1").await;
    let (mut two, _) = wss(&connector, addr, "/ws?id=2").await;
    send_text_tls(&mut two, r#"{"targets":[1],"payload":{"hi":2}}"#).await;
    assert_eq!(recv_text_tls(&mut one).await, r#"{"hi":2}"#);

    // A plain-text client is told to use TLS (see
    // plain_http_on_the_tls_port_gets_a_readable_400_tls_required).
    let mut plain = TcpStream::connect(addr).await.expect("connect");
    plain
        .write_all(b"GET /heartbeat HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut bytes)).await;
    assert!(
        bytes.starts_with(b"HTTP/1.1 400 "),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );

    // A client that does not trust the CA fails the handshake.
    let stranger = Ca::new().connector();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    assert!(stranger.connect(name, tcp).await.is_err());
}

/// Writes `bytes` on a new plain TCP connection to `addr` and reads until
/// the server closes it.
async fn plain_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut plain = TcpStream::connect(addr).await.expect("connect");
    plain.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, plain.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .expect("read");
    answer
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_readable_400_tls_required() {
    let ca = Ca::new();
    let (cert, key, _) = ca.leaf();
    let files = Files::new();
    files.write(&cert, &key);
    let addr = serve_tls(Tls::from_pem_files(&files.cert, &files.key).expect("tls")).await;
    let connector = ca.connector();
    let (mut echo, _) = wss(&connector, addr, "/echo").await;

    for request in [
        &b"GET /heartbeat HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
        b"POST /api/send HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /ws?id=1 HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
    ] {
        let answer = plain_exchange(addr, request).await;
        let text = String::from_utf8(answer).expect("a readable answer");
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).expect("JSON"),
            serde_json::json!({"error":{
                "code":"tls_required",
                "message":"this port speaks HTTPS: use https:// or wss://"
            }})
        );
        send_text_tls(&mut echo, "still answering").await;
        assert_eq!(recv_text_tls(&mut echo).await, "still answering");
    }

    // Neither HTTP nor TLS: no HTTP answer, the connection is dropped.
    let answer = plain_exchange(addr, &[0, 1, 2, 3, 4, 5, 6, 7]).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // And TLS is unaffected by the peek.
    let (mut again, _) = wss(&connector, addr, "/echo").await;
    send_text_tls(&mut again, "over TLS").await;
    assert_eq!(recv_text_tls(&mut again).await, "over TLS");
}

#[tokio::test]
async fn reload_serves_the_new_certificate_and_keeps_open_connections() {
    let ca = Ca::new();
    let (cert_a, key_a, der_a) = ca.leaf();
    let (cert_b, key_b, der_b) = ca.leaf();
    assert_ne!(der_a, der_b);
    let files = Files::new();
    files.write(&cert_a, &key_a);
    let tls = Tls::from_pem_files(&files.cert, &files.key).expect("tls");
    let addr = serve_tls(tls.clone()).await;
    let connector = ca.connector();

    let (mut old, shown) = wss(&connector, addr, "/echo").await;
    assert_eq!(shown, der_a);

    files.write(&cert_b, &key_b);
    tls.reload().expect("reload");
    let (mut new, shown) = wss(&connector, addr, "/echo").await;
    assert_eq!(shown, der_b, "a new connection gets the new certificate");

    // The connection made before the reload still works.
    send_text_tls(&mut old, "still open").await;
    assert_eq!(recv_text_tls(&mut old).await, "still open");
    send_text_tls(&mut new, "new").await;
    assert_eq!(recv_text_tls(&mut new).await, "new");

    // A broken reload keeps the current certificate.
    std::fs::write(&files.key, key_a).expect("write mismatching key");
    let err = tls.reload().expect_err("key of another certificate");
    assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
    let (_, shown) = wss(&connector, addr, "/echo").await;
    assert_eq!(shown, der_b);
}

#[test]
fn bad_certificate_files_are_named() {
    let ca = Ca::new();
    let (cert, key, _) = ca.leaf();
    let (_, other_key, _) = ca.leaf();
    let files = Files::new();

    files.write("not a certificate", &key);
    let err = Tls::from_pem_files(&files.cert, &files.key).expect_err("no cert");
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    assert!(
        err.to_string().contains(&files.cert.display().to_string()),
        "{err}"
    );

    files.write(&cert, "not a key");
    let err = Tls::from_pem_files(&files.cert, &files.key).expect_err("no key");
    assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
    assert!(err.to_string().contains("PRIVATE KEY"), "{err}");

    files.write(&cert, &other_key);
    let err = Tls::from_pem_files(&files.cert, &files.key).expect_err("mismatch");
    assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");

    let err = Tls::from_pem_files("/nonexistent/cert.pem", &files.key).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
}

async fn send_text_tls(client: &mut WebSocketStream<TlsStream<TcpStream>>, text: &str) {
    use futures_util::SinkExt as _;
    client
        .send(tokio_tungstenite::tungstenite::Message::text(
            text.to_owned(),
        ))
        .await
        .expect("send");
}

async fn recv_text_tls(client: &mut WebSocketStream<TlsStream<TcpStream>>) -> String {
    loop {
        let next = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a message within the timeout")
            .expect("stream open")
            .expect("no error");
        match next {
            tokio_tungstenite::tungstenite::Message::Text(text) => return text.to_string(),
            tokio_tungstenite::tungstenite::Message::Ping(_)
            | tokio_tungstenite::tungstenite::Message::Pong(_) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
}
