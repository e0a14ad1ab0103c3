//! A small WebSocket client (RFC 6455) written for load generation.
//!
//! The load generator needs to be cheap per message so that, on a 2-core
//! machine, the server rather than the client is what gets measured. The
//! client here therefore:
//!
//! * performs the HTTP/1.1 upgrade by hand over a [`TcpStream`] (optionally
//!   bound to a chosen source address before connecting, for `hold`);
//! * encodes masked client frames straight into a caller-owned buffer so that
//!   many frames can be written with one `write_all` call;
//! * decodes server frames out of one reusable read buffer without copying,
//!   reassembling fragmented messages when a server fragments.
//!
//! Only what the benchmarks need is implemented: no subprotocols, no TLS;
//! of the extensions only permessage-deflate (RFC 7692) can be offered, for
//! `hold --compression`, and then compressed frames (RSV1) are passed to the
//! caller as they are, flagged, for it to inflate.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use anyhow::{Context, Result, anyhow, bail, ensure};
use base64::Engine as _;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Opcode of a text frame.
pub(crate) const OP_TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub(crate) const OP_BINARY: u8 = 0x2;
const OP_CONTINUATION: u8 = 0x0;
/// Opcode of a close frame.
pub(crate) const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest message the client accepts (protects against a broken server).
const MAX_MESSAGE: usize = 64 << 20;

/// A parsed `ws://host:port/path?query` URL that points at a loopback address.
#[derive(Clone, Debug)]
pub(crate) struct WsUrl {
    /// `host[:port]` as written, used for the `Host` header.
    pub(crate) host_header: String,
    /// The resolved socket address.
    pub(crate) addr: SocketAddr,
    /// The path and query, starting with `/`.
    pub(crate) path: String,
}

impl WsUrl {
    /// Parses `ws://` (or `http://`) URLs; only loopback targets are accepted
    /// because this tool generates load and must never aim it elsewhere.
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| anyhow!("URL must start with ws:// or http:// (got {url:?})"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        ensure!(!authority.is_empty(), "URL has no host: {url:?}");
        let with_port = if authority.starts_with('[') {
            if authority.contains("]:") {
                authority.to_string()
            } else {
                format!("{authority}:80")
            }
        } else if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("resolving {with_port}"))?
            .find(|a| a.ip().is_loopback())
            .ok_or_else(|| {
                anyhow!("{authority} does not resolve to a loopback address; refusing to send load")
            })?;
        Ok(Self {
            host_header: authority.to_string(),
            addr,
            path: path.to_string(),
        })
    }

    /// The same server with another path (and query).
    pub(crate) fn with_path(&self, path: &str) -> Self {
        Self {
            host_header: self.host_header.clone(),
            addr: self.addr,
            path: path.to_string(),
        }
    }

    /// The path without its query string.
    pub(crate) fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("/")
    }
}

/// A tiny xorshift64* generator: masks, keys and random peers. Not
/// cryptographic; the benchmarks only need cheap unpredictability.
#[derive(Clone, Debug)]
pub(crate) struct FastRng(u64);

impl FastRng {
    /// Seeds from a value mixed with the clock.
    pub(crate) fn new(seed: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Self(splitmix(seed ^ nanos) | 1)
    }

    /// Next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The splitmix64 finaliser, a good 64-bit mixing function.
pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Connects to `url` (optionally from `bind_ip`), performs the opening
/// handshake and returns the stream and the reader holding any bytes that
/// arrived right after the handshake response.
pub(crate) async fn connect(
    url: &WsUrl,
    bind_ip: Option<IpAddr>,
    read_capacity: usize,
) -> Result<(TcpStream, FrameReader)> {
    let (stream, reader, _) = connect_with(url, bind_ip, read_capacity, Offer::default()).await?;
    Ok((stream, reader))
}

/// What a handshake offers besides the basics.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Offer<'a> {
    /// A `Sec-WebSocket-Extensions` value; the answer is returned.
    pub(crate) extensions: Option<&'a str>,
    /// A `Sec-WebSocket-Protocol` value the server must select.
    pub(crate) protocol: Option<&'a str>,
}

/// [`connect`], optionally offering extensions (the value of a
/// `Sec-WebSocket-Extensions` request header) and a subprotocol (which the
/// server must then select). Returns the server's
/// `Sec-WebSocket-Extensions` answer as well; when it agrees to
/// permessage-deflate, the reader accepts compressed (RSV1) data frames.
pub(crate) async fn connect_with(
    url: &WsUrl,
    bind_ip: Option<IpAddr>,
    read_capacity: usize,
    offer: Offer<'_>,
) -> Result<(TcpStream, FrameReader, Option<String>)> {
    let socket = if url.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("creating socket")?;
    if let Some(ip) = bind_ip {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding source address {ip}"))?;
    }
    let mut stream = socket
        .connect(url.addr)
        .await
        .with_context(|| format!("connecting to {}", url.addr))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let (reader, agreed) = handshake(&mut stream, url, read_capacity, offer).await?;
    Ok((stream, reader, agreed))
}

async fn handshake<S>(
    stream: &mut S,
    url: &WsUrl,
    read_capacity: usize,
    offer: Offer<'_>,
) -> Result<(FrameReader, Option<String>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut rng = FastRng::new(url.addr.port().into());
    let mut key_bytes = [0u8; 16];
    key_bytes[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    key_bytes[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
    let extensions = offer.extensions;
    let mut offered = extensions.map_or_else(String::new, |e| {
        format!("Sec-WebSocket-Extensions: {e}\r\n")
    });
    if let Some(protocol) = offer.protocol {
        offered.push_str(&format!("Sec-WebSocket-Protocol: {protocol}\r\n"));
    }
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offered}\r\n",
        url.path, url.host_header
    );
    stream
        .write_all(request.as_bytes())
        .await
        .context("sending upgrade request")?;

    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let header_end = loop {
        if let Some(i) = find_subslice(&buf[..len], b"\r\n\r\n") {
            break i + 4;
        }
        ensure!(len < buf.len(), "upgrade response headers too large");
        let n = stream
            .read(&mut buf[len..])
            .await
            .context("reading upgrade response")?;
        ensure!(n > 0, "connection closed during the upgrade");
        len += n;
    };
    let head = std::str::from_utf8(&buf[..header_end]).context("upgrade response is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    ensure!(
        status.split_whitespace().nth(1) == Some("101"),
        "upgrade refused: {status:?}"
    );
    let expected = accept_key(&key);
    let headers: Vec<(&str, &str)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(name, value)| (name.trim(), value.trim()))
        .collect();
    let header = |wanted: &str| {
        headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
            .map(|&(_, v)| v)
    };
    let accept = header("sec-websocket-accept")
        .ok_or_else(|| anyhow!("upgrade response lacks Sec-WebSocket-Accept"))?;
    ensure!(accept == expected, "bad Sec-WebSocket-Accept");
    if let Some(protocol) = offer.protocol {
        let selected = header("sec-websocket-protocol");
        ensure!(
            selected == Some(protocol),
            "the server selected subprotocol {selected:?}, not the offered {protocol:?}"
        );
    }
    let agreed = header("sec-websocket-extensions").map(str::to_string);
    ensure!(
        agreed.is_none() || extensions.is_some(),
        "the server answered with extensions nobody offered: {agreed:?}"
    );

    let mut reader = FrameReader::with_capacity(read_capacity.max(len - header_end));
    reader.allow_compressed = agreed
        .as_deref()
        .is_some_and(|a| a.trim_start().starts_with("permessage-deflate"));
    reader.push(&buf[header_end..len]);
    Ok((reader, agreed))
}

/// Says `switchboard.v1`'s hello on a fresh connection and reads up to its
/// welcome (the connection is then attached: registered, with an inbox).
pub(crate) async fn v1_hello(
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    rng: &mut FastRng,
) -> Result<()> {
    let mut out = Vec::with_capacity(32);
    encode_frame(
        &mut out,
        OP_TEXT,
        br#"{"type":"hello"}"#,
        rng.next_u64() as u32,
    );
    stream.write_all(&out).await.context("sending hello")?;
    loop {
        while let Some(message) = reader.next_message()? {
            if let Message::Text(text) = message {
                ensure!(
                    text.starts_with(br#"{"type":"welcome""#),
                    "expected a welcome, got {}",
                    String::from_utf8_lossy(text)
                );
                return Ok(());
            }
        }
        let n = reader.fill(stream).await?;
        ensure!(n > 0, "connection closed before the welcome");
    }
}

/// A window-bits parameter (`name=N`) of a `Sec-WebSocket-Extensions`
/// permessage-deflate answer, if present.
pub(crate) fn deflate_param(agreed: &str, name: &str) -> Option<u8> {
    agreed.split(';').map(str::trim).find_map(|p| {
        let (n, v) = p.split_once('=')?;
        (n.trim() == name)
            .then(|| v.trim().trim_matches('"').parse().ok())
            .flatten()
    })
}

/// The trailer of a sync flush, stripped from compressed messages
/// (RFC 7692 §7.2.1) and appended again before inflating.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// Compresses one message as permessage-deflate does (raw deflate with a
/// `window_bits` window, sync flush, tail removed), with a fresh compressor
/// that is dropped afterwards: the load generator keeps no zlib state.
pub(crate) fn deflate_message(input: &[u8], window_bits: u8) -> Result<Vec<u8>> {
    let mut z = flate2::Compress::new_with_window_bits(
        flate2::Compression::new(6),
        false,
        window_bits.clamp(9, 15),
    );
    let mut out = Vec::with_capacity(input.len() + 64);
    loop {
        let consumed = z.total_in() as usize;
        z.compress_vec(&input[consumed..], &mut out, flate2::FlushCompress::Sync)
            .context("deflating")?;
        if z.total_in() as usize == input.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&SYNC_TAIL) {
        out.truncate(out.len() - SYNC_TAIL.len());
    }
    Ok(out)
}

/// Inflates one permessage-deflate message (any window up to 15 bits), at
/// most `max` bytes of output.
pub(crate) fn inflate_message(input: &[u8], max: usize) -> Result<Vec<u8>> {
    let mut z = flate2::Decompress::new(false);
    let mut data = Vec::with_capacity(input.len() + SYNC_TAIL.len());
    data.extend_from_slice(input);
    data.extend_from_slice(&SYNC_TAIL);
    let mut out = Vec::with_capacity((input.len() * 4).clamp(64, max));
    loop {
        let consumed = z.total_in() as usize;
        let produced = out.len();
        let status = z
            .decompress_vec(&data[consumed..], &mut out, flate2::FlushDecompress::Sync)
            .context("inflating")?;
        ensure!(out.len() <= max, "inflated message larger than {max} bytes");
        if status == flate2::Status::StreamEnd
            || (z.total_in() as usize == data.len() && out.len() < out.capacity())
        {
            return Ok(out);
        }
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(64));
        } else if z.total_in() as usize == consumed && out.len() == produced {
            bail!("compressed message is not valid deflate data");
        }
    }
}

/// The `Sec-WebSocket-Accept` value a server must answer `key` with.
fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

fn find_subslice(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Appends one masked client frame to `out`.
pub(crate) fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: u32) {
    encode_frame_rsv(out, opcode, false, payload, mask);
}

/// [`encode_frame`] with RSV1 set when `compressed` (a permessage-deflate
/// message in one frame).
pub(crate) fn encode_frame_rsv(
    out: &mut Vec<u8>,
    opcode: u8,
    compressed: bool,
    payload: &[u8],
    mask: u32,
) {
    out.push(0x80 | if compressed { 0x40 } else { 0 } | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask_bytes = mask.to_ne_bytes();
    out.extend_from_slice(&mask_bytes);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask_bytes);
}

/// XORs `data` with the 4-byte mask, eight bytes at a time.
fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let m32 = u32::from_ne_bytes(mask);
    let m64 = (u64::from(m32) << 32) | u64::from(m32);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ m64).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// One complete message (or control frame) decoded from the server.
#[derive(Debug)]
pub(crate) enum Message<'a> {
    /// A text message.
    Text(&'a [u8]),
    /// A binary message.
    Binary(&'a [u8]),
    /// A ping; the caller should answer with [`encode_frame`] and opcode pong.
    Ping(&'a [u8]),
    /// A pong (ignored by the benchmarks).
    Pong,
    /// A close frame.
    Close,
}

impl Message<'_> {
    /// The opcode to answer a ping with.
    pub(crate) const PONG: u8 = OP_PONG;
}

/// Incremental frame decoder with one growable buffer.
#[derive(Debug)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Opcode, RSV1 and payload of a fragmented message being reassembled.
    fragments: Option<(u8, bool, Vec<u8>)>,
    /// The reassembled message was handed out and must be dropped next time.
    pending_fragment_done: bool,
    /// permessage-deflate was agreed: RSV1 marks a compressed message.
    allow_compressed: bool,
    /// Whether the message last returned by [`Self::next_message`] was
    /// compressed (RSV1 on its first frame); its payload is then raw deflate
    /// data without the sync-flush tail.
    pub(crate) last_compressed: bool,
}

impl FrameReader {
    /// A reader whose buffer starts at `capacity` bytes (it grows for large
    /// frames).
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity.max(64)],
            start: 0,
            end: 0,
            fragments: None,
            pending_fragment_done: false,
            allow_compressed: false,
            last_compressed: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.make_room(bytes.len());
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Ensures at least `extra` free bytes after `end`.
    fn make_room(&mut self, extra: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end >= extra {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < extra {
            let want = (self.end + extra).next_power_of_two();
            self.buf.resize(want, 0);
        }
    }

    /// Reads more bytes from `stream`. Fails on EOF. Cancel-safe: no bytes
    /// are lost if the future is dropped before completion.
    pub(crate) async fn fill<R: AsyncRead + Unpin>(&mut self, stream: &mut R) -> Result<usize> {
        let need = self.bytes_needed().max(1);
        let free = self.buf.len() - self.end;
        if free < need || free < self.buf.len() / 8 {
            self.make_room(need.max(self.buf.len() / 2));
        }
        let n = stream
            .read(&mut self.buf[self.end..])
            .await
            .context("reading from server")?;
        if n == 0 {
            bail!("server closed the connection");
        }
        self.end += n;
        Ok(n)
    }

    /// How many more bytes are needed to complete the next frame (0 if it is
    /// complete or unknown).
    fn bytes_needed(&self) -> usize {
        match parse_header(&self.buf[self.start..self.end]) {
            Ok(Some((_, _, _, header_len, payload_len))) => {
                let total = header_len + payload_len;
                total.saturating_sub(self.end - self.start)
            }
            _ => 0,
        }
    }

    /// Decodes the next complete message in the buffer, if any.
    pub(crate) fn next_message(&mut self) -> Result<Option<Message<'_>>> {
        if self.pending_fragment_done {
            self.pending_fragment_done = false;
            self.fragments = None;
        }
        self.last_compressed = false;
        loop {
            let avail = &self.buf[self.start..self.end];
            let Some((fin, opcode, rsv1, header_len, payload_len)) = parse_header(avail)? else {
                return Ok(None);
            };
            ensure!(
                !rsv1 || (self.allow_compressed && (opcode == OP_TEXT || opcode == OP_BINARY)),
                "RSV1 set on a frame that cannot be compressed (opcode {opcode:#x})"
            );
            let total = header_len + payload_len;
            if avail.len() < total {
                return Ok(None);
            }
            let p_start = self.start + header_len;
            let p_end = self.start + total;
            self.start += total;
            match opcode {
                OP_TEXT | OP_BINARY if fin && self.fragments.is_none() => {
                    self.last_compressed = rsv1;
                    let payload = &self.buf[p_start..p_end];
                    return Ok(Some(if opcode == OP_TEXT {
                        Message::Text(payload)
                    } else {
                        Message::Binary(payload)
                    }));
                }
                OP_TEXT | OP_BINARY => {
                    ensure!(
                        self.fragments.is_none(),
                        "new data frame inside a fragmented message"
                    );
                    self.fragments = Some((opcode, rsv1, self.buf[p_start..p_end].to_vec()));
                }
                OP_CONTINUATION => {
                    let Some((_, _, data)) = self.fragments.as_mut() else {
                        bail!("continuation frame without a message");
                    };
                    data.extend_from_slice(&self.buf[p_start..p_end]);
                    ensure!(data.len() <= MAX_MESSAGE, "message too large");
                    if fin {
                        self.pending_fragment_done = true;
                        let Some((op, compressed, data)) = self.fragments.as_ref() else {
                            bail!("fragment state lost");
                        };
                        self.last_compressed = *compressed;
                        return Ok(Some(if *op == OP_TEXT {
                            Message::Text(data)
                        } else {
                            Message::Binary(data)
                        }));
                    }
                }
                OP_PING => return Ok(Some(Message::Ping(&self.buf[p_start..p_end]))),
                OP_PONG => return Ok(Some(Message::Pong)),
                OP_CLOSE => return Ok(Some(Message::Close)),
                other => bail!("unknown opcode {other:#x}"),
            }
        }
    }
}

/// A parsed frame header: `(fin, opcode, rsv1, header_len, payload_len)`.
type Header = (bool, u8, bool, usize, usize);

/// Parses a frame header.
fn parse_header(b: &[u8]) -> Result<Option<Header>> {
    if b.len() < 2 {
        return Ok(None);
    }
    let fin = b[0] & 0x80 != 0;
    let rsv1 = b[0] & 0x40 != 0;
    ensure!(
        b[0] & 0x30 == 0,
        "RSV2 or RSV3 set (no extension defines them)"
    );
    let opcode = b[0] & 0x0F;
    ensure!(b[1] & 0x80 == 0, "server sent a masked frame");
    let (header_len, payload_len) = match b[1] & 0x7F {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (4, usize::from(u16::from_be_bytes([b[2], b[3]])))
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut len = [0u8; 8];
            len.copy_from_slice(&b[2..10]);
            let len = u64::from_be_bytes(len);
            ensure!(len <= MAX_MESSAGE as u64, "frame too large ({len} bytes)");
            (10, len as usize)
        }
        n => (2, usize::from(n)),
    };
    Ok(Some((fin, opcode, rsv1, header_len, payload_len)))
}

/// Writes a close frame (best effort) so the server sees an orderly goodbye.
pub(crate) async fn send_close<W: AsyncWrite + Unpin>(stream: &mut W, rng: &mut FastRng) {
    let mut out = Vec::with_capacity(8);
    encode_frame(
        &mut out,
        OP_CLOSE,
        &1000u16.to_be_bytes(),
        rng.next_u64() as u32,
    );
    let _ = stream.write_all(&out).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
        if payload.len() < 126 {
            v.push(payload.len() as u8);
        } else {
            v.push(126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn masks_roundtrip() {
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        encode_frame(&mut out, OP_BINARY, &payload, 0xDEAD_BEEF);
        assert_eq!(out[0], 0x82);
        assert_eq!(out[1], 0x80 | 126);
        let mask = [out[4], out[5], out[6], out[7]];
        let mut body = out[8..].to_vec();
        apply_mask(&mut body, mask);
        assert_eq!(body, payload);
    }

    #[test]
    fn decodes_split_and_fragmented_frames() -> Result<()> {
        let mut bytes = server_frame(OP_TEXT, true, b"hello");
        bytes.extend(server_frame(OP_BINARY, false, b"ab"));
        bytes.extend(server_frame(OP_PING, true, b"p"));
        bytes.extend(server_frame(OP_CONTINUATION, true, &[b'c'; 200]));
        let mut r = FrameReader::with_capacity(16);
        let mut got = Vec::new();
        for chunk in bytes.chunks(3) {
            r.push(chunk);
            while let Some(m) = r.next_message()? {
                got.push(match m {
                    Message::Text(t) => format!("T{}", t.len()),
                    Message::Binary(b) => format!("B{}", b.len()),
                    Message::Ping(_) => "P".to_string(),
                    Message::Pong => "O".to_string(),
                    Message::Close => "C".to_string(),
                });
            }
        }
        assert_eq!(got, ["T5", "P", "B202"]);
        Ok(())
    }

    #[test]
    fn deflate_roundtrips_and_rsv1_needs_agreement() -> Result<()> {
        let text = b"hello hello hello hello hello hello hello hello".repeat(20);
        for bits in [9, 15] {
            let compressed = deflate_message(&text, bits)?;
            assert!(compressed.len() < text.len() / 4);
            assert!(!compressed.ends_with(&SYNC_TAIL));
            assert_eq!(inflate_message(&compressed, text.len())?, text);
            assert!(inflate_message(&compressed, text.len() - 1).is_err());
            // A server frame carrying it, RSV1 set.
            let mut frame = server_frame(OP_TEXT, true, &compressed);
            frame[0] |= 0x40;
            let mut r = FrameReader::with_capacity(64);
            r.push(&frame);
            assert!(r.next_message().is_err(), "RSV1 without an agreement");
            let mut r = FrameReader::with_capacity(64);
            r.allow_compressed = true;
            r.push(&frame);
            r.push(&server_frame(OP_TEXT, true, b"plain"));
            let first = match r.next_message()? {
                Some(Message::Text(p)) => p.to_vec(),
                other => bail!("unexpected {other:?}"),
            };
            assert!(r.last_compressed);
            assert_eq!(first, compressed);
            assert!(matches!(r.next_message()?, Some(Message::Text(b"plain"))));
            assert!(!r.last_compressed);
        }
        Ok(())
    }

    #[test]
    fn reads_window_bits_of_an_agreement() {
        let agreed = "permessage-deflate; server_max_window_bits=9; client_max_window_bits=10";
        assert_eq!(deflate_param(agreed, "server_max_window_bits"), Some(9));
        assert_eq!(deflate_param(agreed, "client_max_window_bits"), Some(10));
        assert_eq!(
            deflate_param("permessage-deflate", "client_max_window_bits"),
            None
        );
    }

    #[test]
    fn parses_urls() -> Result<()> {
        let u = WsUrl::parse("ws://127.0.0.1:9000/ws?id=3")?;
        assert_eq!(u.addr.port(), 9000);
        assert_eq!(u.path, "/ws?id=3");
        assert_eq!(u.path_only(), "/ws");
        assert!(WsUrl::parse("ws://10.0.0.1:80/").is_err());
        Ok(())
    }
}
