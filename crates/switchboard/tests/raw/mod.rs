//! Byte-level test clients: plain HTTP/1.1 requests and a WebSocket client
//! that writes its own (masked or deliberately broken) frames, for checks a
//! well-behaved client library cannot make.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How long a raw read waits before the test fails.
pub const RAW_WAIT: Duration = Duration::from_secs(5);

/// The mask every raw client frame uses (any value is valid; a fixed one
/// keeps failures reproducible).
pub const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

/// The key of the RFC 6455 §1.3 example and its accept value.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// An HTTP response as read off the socket.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    /// `body.error.code` of a JSON error body.
    pub fn error_code(&self) -> String {
        let json = self.json();
        json["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.code in {json}"))
            .to_owned()
    }
}

/// Reads one HTTP response head from `stream` (no further), returning the
/// status, the headers and whatever bytes came after the head.
pub async fn read_head(stream: &mut TcpStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        assert!(buf.len() < 64 * 1024, "response head over 64 KiB");
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(RAW_WAIT, stream.read(&mut chunk))
            .await
            .expect("response head within the timeout")
            .expect("read response head");
        assert!(
            n > 0,
            "connection closed before a full response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let rest = buf[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().expect("version");
    assert!(version.starts_with("HTTP/1."), "status line: {status_line}");
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {status_line}"));
    let headers = lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line: {line}"));
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    (status, headers, rest)
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 8192];
    let n = tokio::time::timeout(RAW_WAIT, stream.read(&mut chunk))
        .await
        .expect("response body within the timeout")
        .expect("read response body");
    buf.extend_from_slice(&chunk[..n]);
    n
}

/// Reads one complete HTTP response (Content-Length, chunked, or to EOF).
pub async fn read_response(stream: &mut TcpStream) -> HttpResponse {
    let (status, headers, buf) = read_head(stream).await;
    read_body(stream, status, headers, buf).await
}

/// Reads the body of a response whose head was read already; `buf` holds
/// the bytes read past the head.
async fn read_body(
    stream: &mut TcpStream,
    status: u16,
    headers: Vec<(String, String)>,
    mut buf: Vec<u8>,
) -> HttpResponse {
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if status == 101 || status == 204 || status == 304 {
        assert!(
            status != 101,
            "use try_upgrade or RawWs::connect for upgrades"
        );
        return response;
    }
    if let Some(len) = response.header("content-length") {
        let len: usize = len.parse().expect("numeric content-length");
        while buf.len() < len {
            assert!(read_more(stream, &mut buf).await > 0, "EOF inside the body");
        }
        buf.truncate(len);
        response.body = buf;
    } else if response
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                assert!(read_more(stream, &mut buf).await > 0, "EOF in chunk size");
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                assert!(read_more(stream, &mut buf).await > 0, "EOF in chunk");
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
            if size == 0 {
                break;
            }
        }
        response.body = body;
    } else {
        while read_more(stream, &mut buf).await > 0 {
            assert!(buf.len() < 1 << 20, "body over 1 MiB");
        }
        response.body = buf;
    }
    response
}

/// Sends one HTTP/1.1 request on a fresh connection (with
/// `Connection: close`) and reads the response.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method != "GET" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await.expect("write request");
    read_response(&mut stream).await
}

pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http(addr, "GET", path, &[], b"").await
}

/// The request of a valid WebSocket upgrade to `path`, plus `extra` headers.
pub fn upgrade_request(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> String {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// Sends a valid upgrade request to `path` and returns the response and
/// the connection, as a [`RawWs`] holding any bytes read past the response
/// head (frames the server sent at once after a 101).
pub async fn try_upgrade(
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
) -> (HttpResponse, RawWs) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(upgrade_request(addr, path, extra).as_bytes())
        .await
        .expect("write upgrade request");
    let (status, headers, rest) = read_head(&mut stream).await;
    if status == 101 {
        let response = HttpResponse {
            status,
            headers,
            body: Vec::new(),
        };
        return (response, RawWs { stream, buf: rest });
    }
    // Not upgraded: read the body the same way `read_response` does.
    let response = read_body(&mut stream, status, headers, rest).await;
    (
        response,
        RawWs {
            stream,
            buf: Vec::new(),
        },
    )
}

/// `base64(SHA-1(key ++ GUID))` (RFC 6455 §4.2.2).
pub fn accept_for(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    BASE64.encode(sha.finalize())
}

/// Encodes one client frame. `first` is the first header byte (FIN, RSV
/// bits and opcode); `mask` `None` leaves the frame unmasked.
pub fn frame(first: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked client frame, as a conforming client sends it.
pub fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    frame(first, Some(MASK), payload)
}

/// A close frame payload: the code then the reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// One frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl ServerFrame {
    /// The code and reason of a close frame.
    pub fn close(&self) -> (u16, String) {
        assert_eq!(self.opcode, 0x8, "expected a close frame, got {self:?}");
        assert!(
            self.payload.len() >= 2,
            "close frame without a code: {self:?}"
        );
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let reason = String::from_utf8(self.payload[2..].to_vec()).expect("UTF-8 close reason");
        (code, reason)
    }
}

/// A WebSocket client working on raw bytes.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Opens `path` with a hand-written handshake; asserts 101 and the
    /// accept value.
    pub async fn connect(addr: SocketAddr, path: &str) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(upgrade_request(addr, path, &[]).as_bytes())
            .await
            .expect("write upgrade request");
        let (status, headers, rest) = read_head(&mut stream).await;
        assert_eq!(status, 101, "upgrade of {path} refused: {headers:?}");
        let accept = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|(_, v)| v.clone());
        assert_eq!(accept.as_deref(), Some(accept_for(KEY).as_str()));
        Self { stream, buf: rest }
    }

    /// A client on a connection whose 101 was read already; `rest` holds
    /// the bytes read past the response head.
    pub fn from_upgraded(stream: TcpStream, rest: Vec<u8>) -> Self {
        Self { stream, buf: rest }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write frame");
    }

    /// Reads more bytes; returns 0 at EOF.
    async fn fill(&mut self, wait: Duration) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(wait, self.stream.read(&mut chunk))
            .await
            .expect("server bytes within the timeout")
            .expect("read from server");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// The next frame from the server; panics on timeout or EOF.
    pub async fn read_frame(&mut self) -> ServerFrame {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            let n = self.fill(RAW_WAIT).await;
            assert!(
                n > 0,
                "EOF before a complete frame ({} bytes buffered)",
                self.buf.len()
            );
        }
    }

    /// Reads frames until a close frame and returns its code and reason.
    /// Frames before it are returned too.
    pub async fn read_until_close(&mut self) -> (Vec<ServerFrame>, (u16, String)) {
        let mut before = Vec::new();
        for _ in 0..10_000 {
            let frame = self.read_frame().await;
            if frame.opcode == 0x8 {
                return (before, frame.close());
            }
            before.push(frame);
        }
        panic!("no close frame within 10,000 frames");
    }

    /// Expects the server's close frame next (nothing before it), then EOF.
    pub async fn expect_close(&mut self) -> (u16, String) {
        let frame = self.read_frame().await;
        let close = frame.close();
        self.expect_eof().await;
        close
    }

    /// Asserts the server closes the TCP connection with nothing more sent.
    pub async fn expect_eof(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before EOF: {:?}",
            self.buf
        );
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(RAW_WAIT, self.stream.read(&mut chunk))
            .await
            .expect("the server closes TCP within the timeout")
            .expect("clean EOF, not an error");
        assert_eq!(
            n,
            0,
            "expected EOF, got more bytes: {:?}",
            &chunk[..n.min(64)]
        );
    }
}

/// Parses one unmasked or masked frame from the start of `buf`; returns it
/// with the bytes it used, or `None` if more bytes are needed.
pub fn parse_server_frame(buf: &[u8]) -> Option<(ServerFrame, usize)> {
    let [b0, b1, ..] = *buf else {
        return None;
    };
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let m: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let len = usize::try_from(len).expect("frame length fits usize");
    let mut payload = buf.get(at..at + len)?.to_vec();
    if let Some(mask) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Some((
        ServerFrame {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x7,
            opcode: b0 & 0x0F,
            masked,
            payload,
        },
        at + len,
    ))
}

// ---------------------------------------------------------------------------
// Helpers of the conformance suite (tests/conformance*.rs).
// ---------------------------------------------------------------------------

impl RawWs {
    /// Like [`RawWs::connect`], with the client's receive buffer fixed at
    /// `bytes` (no autotuning): a slow reader whose kernel holds little.
    pub async fn connect_with_recv_buffer(addr: SocketAddr, path: &str, bytes: u32) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let mut stream = socket.connect(addr).await.expect("connect");
        stream
            .write_all(upgrade_request(addr, path, &[]).as_bytes())
            .await
            .expect("write upgrade request");
        let (status, headers, rest) = read_head(&mut stream).await;
        assert_eq!(status, 101, "upgrade of {path} refused: {headers:?}");
        Self { stream, buf: rest }
    }

    /// Turns Nagle's algorithm off, so that every small write leaves as its
    /// own segment instead of waiting for an acknowledgement.
    pub fn no_delay(&self) {
        self.stream.set_nodelay(true).expect("set TCP_NODELAY");
    }

    /// Sends `bytes` in pieces of `chunk` bytes, sleeping `pause` after each
    /// piece (`Duration::ZERO`: no sleep), with Nagle off so the server
    /// really sees the pieces one by one.
    pub async fn send_in_chunks(&mut self, bytes: &[u8], chunk: usize, pause: Duration) {
        self.no_delay();
        for piece in bytes.chunks(chunk.max(1)) {
            self.send(piece).await;
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// The next frame and its raw header bytes (to check the length
    /// encoding the server chose).
    pub async fn read_frame_and_header(&mut self) -> (ServerFrame, Vec<u8>) {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                let header = self.buf[..used - frame.payload.len()].to_vec();
                self.buf.drain(..used);
                return (frame, header);
            }
            let n = self.fill(RAW_WAIT).await;
            assert!(
                n > 0,
                "EOF before a complete frame ({} bytes buffered)",
                self.buf.len()
            );
        }
    }

    /// The next frame, or a description of why none came within `wait`
    /// (timeout, EOF, or a socket error such as a reset).
    pub async fn try_read_frame(&mut self, wait: Duration) -> Result<ServerFrame, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => {
                    return Err(format!(
                        "no complete frame within {wait:?} ({} bytes buffered)",
                        self.buf.len()
                    ));
                }
                Ok(Err(err)) => {
                    return Err(format!(
                        "socket error ({err}) with {} bytes of an unfinished frame buffered",
                        self.buf.len()
                    ));
                }
                Ok(Ok(0)) => {
                    return Err(format!(
                        "EOF with {} bytes of an unfinished frame buffered",
                        self.buf.len()
                    ));
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Expects one final, unmasked frame with no reserved bits, carrying
    /// exactly `payload` with `opcode`: how a message is echoed on a
    /// connection without extensions.
    pub async fn expect_frame(&mut self, opcode: u8, payload: &[u8]) {
        let frame = self.read_frame().await;
        assert_eq!(
            (frame.fin, frame.rsv, frame.opcode, frame.masked),
            (true, 0, opcode, false),
            "expected a final unmasked frame with opcode {opcode:#x} and {} payload bytes",
            payload.len()
        );
        if frame.payload != payload {
            let first_diff = frame
                .payload
                .iter()
                .zip(payload)
                .position(|(a, b)| a != b)
                .unwrap_or(frame.payload.len().min(payload.len()));
            panic!(
                "payload differs: got {} bytes, expected {}; first difference at byte {first_diff}",
                frame.payload.len(),
                payload.len()
            );
        }
    }

    /// Expects the server's close frame next (nothing before it), checks its
    /// form (final, unmasked, no reserved bits, a code, a UTF-8 reason),
    /// then expects TCP to be closed. Returns the code and the reason.
    pub async fn expect_close_frame(&mut self) -> (u16, String) {
        let frame = self.read_frame().await;
        assert_eq!(
            (frame.fin, frame.rsv, frame.opcode, frame.masked),
            (true, 0, 0x8, false),
            "expected the server's close frame, got {frame:?}"
        );
        assert!(frame.payload.len() <= 125, "close frame over 125 bytes");
        let close = frame.close();
        self.expect_eof().await;
        close
    }

    /// Asserts that nothing at all arrives for `quiet`: no bytes, no EOF.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes buffered: {:?}",
            &self.buf[..self.buf.len().min(64)]
        );
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(quiet, self.stream.read(&mut chunk)).await {
            Err(_) => {}
            Ok(Ok(0)) => panic!("expected silence, got EOF"),
            Ok(Ok(n)) => panic!("expected silence, got {n} bytes: {:?}", &chunk[..n.min(64)]),
            Ok(Err(err)) => panic!("expected silence, got a socket error: {err}"),
        }
    }

    /// Closes with 1000 and expects 1000 back, then EOF: the connection was
    /// still in a good state.
    pub async fn close_normally(&mut self) {
        self.send(&masked(0x88, &close_payload(1000, ""))).await;
        let (code, _) = self.expect_close_frame().await;
        assert_eq!(code, 1000, "the server answers a 1000 close with 1000");
    }
}
