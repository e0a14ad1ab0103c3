//! Shared test support: a real server on 127.0.0.1:0 and a real WebSocket
//! client (tokio-tungstenite).
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use switchboard::{Hub, Limits, Router};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(5);

/// A server started in this process on a free loopback port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub hub: Hub,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// The complete `switchboard` app with default limits.
    pub async fn start() -> Self {
        Self::with_limits(Limits::default()).await
    }

    pub async fn with_limits(limits: Limits) -> Self {
        let hub = Hub::new(limits);
        let app = switchboard::app(hub.clone());
        Self::with_router(hub, app).await
    }

    pub async fn with_router(hub: Hub, router: Router) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(switchboard::serve_with(
            listener,
            router,
            hub.clone(),
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        Self {
            addr,
            hub,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn connect(&self, path: &str) -> Client {
        let (client, response) = tokio_tungstenite::connect_async(self.url(path))
            .await
            .unwrap_or_else(|e| panic!("connect to {path}: {e}"));
        assert_eq!(response.status(), 101);
        client
    }

    /// Starts graceful shutdown and waits for `serve` to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("serve returns within its shutdown timeout")
                .expect("serve task")
                .expect("serve result");
        }
    }

    /// Waits until `cond` holds, polling; panics after `WAIT`.
    pub async fn eventually(&self, what: &str, mut cond: impl FnMut(&Hub) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond(&self.hub) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting: {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The next data message, skipping pings; panics on timeout or close.
pub async fn recv(client: &mut Client) -> WsMessage {
    loop {
        let next = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a message within the timeout")
            .expect("stream still open")
            .expect("no websocket error");
        match next {
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => return other,
        }
    }
}

pub async fn recv_text(client: &mut Client) -> String {
    match recv(client).await {
        WsMessage::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

pub async fn recv_json(client: &mut Client) -> serde_json::Value {
    let text = recv_text(client).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts nothing arrives for `quiet`.
pub async fn assert_silent(client: &mut Client, quiet: Duration) {
    match tokio::time::timeout(quiet, client.next()).await {
        Err(_) => {}
        Ok(other) => panic!("expected silence, got {other:?}"),
    }
}

/// Waits for the close frame and returns it.
pub async fn recv_close(client: &mut Client) -> Option<CloseFrame> {
    loop {
        let next = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a close within the timeout");
        match next {
            Some(Ok(WsMessage::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

pub async fn send_text(client: &mut Client, text: &str) {
    client
        .send(WsMessage::text(text.to_owned()))
        .await
        .expect("send");
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 over a TcpStream, for handshake and API tests: the request is
// written byte for byte as given, so a test controls every header.
// ---------------------------------------------------------------------------

/// The key of the RFC 6455 §1.3 example, and the accept value it must give.
pub const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// One HTTP response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone())
            .unwrap_or_else(|e| panic!("body is not UTF-8 ({e}): {:?}", self.body))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// The `code` of a `{"error":{"code":…,"message":…}}` body; panics when
    /// the body does not have that shape or the message is empty.
    pub fn error_code(&self) -> String {
        error_code_of(&self.json())
    }
}

/// The `code` of a `{"error":{"code":…,"message":…}}` value; panics when the
/// value does not have that shape or the message is empty.
pub fn error_code_of(value: &serde_json::Value) -> String {
    let code = value["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {value}"));
    let message = value["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message in {value}"));
    assert!(!message.is_empty(), "empty error.message in {value}");
    code.to_owned()
}

/// Writes `request` as-is on a new connection to `addr` and reads one
/// response. A 101 response is returned after its headers.
pub async fn http_raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    use tokio::io::AsyncWriteExt as _;
    tokio::time::timeout(WAIT, async {
        let mut stream = TcpStream::connect(addr).await.expect("tcp connect");
        stream.write_all(request).await.expect("write request");
        read_http_response(&mut stream).await
    })
    .await
    .expect("an HTTP response within the timeout")
}

/// Reads one HTTP/1.1 response: headers, then a body by `Content-Length`,
/// chunked encoding, or up to EOF.
pub async fn read_http_response(stream: &mut TcpStream) -> RawResponse {
    use tokio::io::AsyncReadExt as _;
    const MAX: usize = 16 * 1024 * 1024;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        assert!(buf.len() < MAX, "response headers too long");
        let n = stream.read(&mut chunk).await.expect("read response");
        assert!(
            n > 0,
            "connection closed before the response headers: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("headers are UTF-8");
    let mut rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    assert!(version.starts_with("HTTP/1."), "status line: {status_line}");
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {status_line}"));
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("header line: {line}"));
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    let response = |body| RawResponse {
        status,
        headers: headers.clone(),
        body,
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return response(Vec::new());
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    if let Some(len) = find("content-length") {
        let len: usize = len.parse().expect("content-length is a number");
        assert!(len <= MAX, "body too long");
        while rest.len() < len {
            let n = stream.read(&mut chunk).await.expect("read body");
            assert!(n > 0, "connection closed inside the body");
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        return response(rest);
    }
    if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let n = stream.read(&mut chunk).await.expect("read body");
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&chunk[..n]);
            assert!(rest.len() < MAX, "body too long");
            if rest.ends_with(b"0\r\n\r\n") {
                break;
            }
        }
        return response(dechunk(&rest));
    }
    loop {
        let n = stream.read(&mut chunk).await.expect("read body");
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&chunk[..n]);
        assert!(rest.len() < MAX, "body too long");
    }
    response(rest)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&data[..line_end]).expect("chunk size");
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).expect("hex chunk size");
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Sends one request with the given headers and body. Adds `Host`,
/// `Content-Length` (when there is a body or the method is POST) and, unless
/// the caller sets `Connection`, `Connection: close`.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("connection"))
    {
        request.push_str("Connection: close\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    http_raw(addr, &bytes).await
}

pub async fn http_get(addr: SocketAddr, target: &str) -> RawResponse {
    http_request(addr, "GET", target, &[], b"").await
}

pub async fn http_post_json(addr: SocketAddr, target: &str, body: &str) -> RawResponse {
    http_request(
        addr,
        "POST",
        target,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
}

pub async fn http_delete(addr: SocketAddr, target: &str) -> RawResponse {
    http_request(addr, "DELETE", target, &[], b"").await
}

/// The headers of a valid upgrade request (RFC 6455 §1.3's key).
pub fn upgrade_headers() -> Vec<(&'static str, &'static str)> {
    vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", RFC_KEY),
    ]
}

/// A WebSocket upgrade to `target` with exactly `headers`, answered by the
/// server (no WebSocket client involved).
pub async fn http_upgrade(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> RawResponse {
    http_request(addr, "GET", target, headers, b"").await
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (n, v) = line.split_once(' ')?;
            if n == name {
                v.trim().parse().ok()
            } else {
                None
            }
        })
}

/// The close code of a received close frame; panics when it has none.
pub fn close_code(frame: Option<CloseFrame>) -> u16 {
    u16::from(frame.expect("a close frame with a status code").code)
}

/// The next message, which must be a JSON error frame; returns its code.
pub async fn recv_error_code(client: &mut Client) -> String {
    error_code_of(&recv_json(client).await)
}

pub async fn send_binary(client: &mut Client, bytes: Vec<u8>) {
    client
        .send(WsMessage::binary(bytes))
        .await
        .expect("send binary");
}

pub async fn recv_binary(client: &mut Client) -> Vec<u8> {
    match recv(client).await {
        WsMessage::Binary(bytes) => bytes.to_vec(),
        other => panic!("expected binary, got {other:?}"),
    }
}

/// Waits until `cond` holds, polling every 10 ms; panics after `within`.
pub async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads until the stream ends, so the client answers a close frame it has
/// received (tungstenite sends its reply on the next read) and the server's
/// closing handshake completes without waiting for `close_timeout`.
pub async fn drain_until_closed(client: &mut Client) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, client.next()).await {
            Err(_) => panic!("the connection did not end within the timeout"),
            Ok(None | Some(Err(_))) => return,
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Sends `text` on an `/echo` connection and asserts it comes back: the
/// server still answers its other clients.
pub async fn assert_echo_answers(echo: &mut Client, text: &str) {
    send_text(echo, text).await;
    assert_eq!(recv_text(echo).await, text, "/echo did not answer");
}

/// The `message` of a `{"error":{"code":…,"message":…}}` value.
pub fn error_message_of(value: &serde_json::Value) -> String {
    value["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message in {value}"))
        .to_owned()
}

/// A v1 connection as client `id`, not yet said hello.
pub async fn connect_v1(server: &TestServer, id: &str) -> Client {
    let mut request = server
        .url(&format!("/ws?id={id}"))
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static("switchboard.v1"),
    );
    let (client, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("switchboard.v1")
    );
    client
}
