//! permessage-deflate (RFC 7692): negotiation, and the per-connection
//! compressor and inflater.
//!
//! Off by default. When a client offers it and it is enabled, messages of at
//! least `min_size` bytes are sent compressed (RSV1 set on their first frame)
//! and compressed client messages are inflated, never past
//! `max_message_size` (a decompression bomb closes with 1009).
//!
//! Memory: the compressor and inflater are created on first use, so a
//! connection that never moves a large message pays almost nothing. Once
//! created they were measured (docs/benchmarks.md, `switchboard-bench hold
//! --compression --exchange`) at ≈ 312 KiB for the compressor with a 15-bit
//! window (≈ 188 KiB at 9 bits) and ≈ 19 KiB for the inflater. Lower window
//! bits trade compression ratio for memory.

use std::fmt::Write as _;

use bytes::{Bytes, BytesMut};
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress};
use http::HeaderValue;
use serde::{Deserialize, Serialize};

use super::close::{CloseCode, CloseFrame};

/// The trailer a sync flush ends with, stripped by the sender and put back
/// by the receiver (RFC 7692 §7.2.1, §7.2.2).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// permessage-deflate settings. In a config file, the `[compression]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Compression {
    /// Accept permessage-deflate when a client offers it. Default `false`.
    pub enabled: bool,
    /// Window of our compressor, 9–15 bits. Default 15. A client asking for
    /// a smaller one gets it; a client asking for 8 (which zlib cannot
    /// produce) is accepted, and that connection's replies are then sent
    /// uncompressed (RFC 7692 lets a sender leave any message uncompressed).
    pub server_max_window_bits: u8,
    /// Largest window we let the client compress with, 9–15 bits; it sizes
    /// our inflater. Default 15. Applied only if the client offered the
    /// `client_max_window_bits` parameter (RFC 7692 §7.1.2.2).
    pub client_max_window_bits: u8,
    /// Reset our compressor after every message: less memory is kept busy
    /// between messages and every message compresses the same for every
    /// client, at some cost in ratio. Default `false`.
    pub server_no_context_takeover: bool,
    /// Ask clients to reset theirs after every message. Default `false`.
    pub client_no_context_takeover: bool,
    /// Messages shorter than this are sent uncompressed. Default 256 bytes:
    /// below that, deflate's framing overhead eats most of the saving.
    pub min_size: usize,
    /// zlib level, 0–9. Default 1 (fastest): for real-time traffic latency
    /// matters more than the last few percent of ratio.
    pub level: u32,
}

impl Default for Compression {
    fn default() -> Self {
        Self {
            enabled: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            min_size: 256,
            level: 1,
        }
    }
}

impl Compression {
    /// Checks the ranges; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, bits) in [
            (
                "compression.server_max_window_bits",
                self.server_max_window_bits,
            ),
            (
                "compression.client_max_window_bits",
                self.client_max_window_bits,
            ),
        ] {
            if !(9..=15).contains(&bits) {
                return Err(format!("{key} is {bits}: use 9 to 15"));
            }
        }
        if self.level > 9 {
            return Err(format!("compression.level is {}: use 0 to 9", self.level));
        }
        Ok(())
    }
}

/// The parameters agreed with one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Agreed {
    /// 8 means "never compress": zlib has no 256-byte window.
    pub(crate) server_window: u8,
    pub(crate) client_window: u8,
    pub(crate) server_no_takeover: bool,
    pub(crate) client_no_takeover: bool,
    pub(crate) min_size: usize,
    pub(crate) level: u32,
}

/// Picks the first acceptable permessage-deflate offer among the
/// `Sec-WebSocket-Extensions` header values and returns the agreement and
/// the response header. An offer with an unknown, repeated or out-of-range
/// parameter is declined, as RFC 7692 §5 requires; other extensions are
/// ignored.
pub(crate) fn negotiate<'a>(
    config: &Compression,
    offers: impl Iterator<Item = &'a HeaderValue>,
) -> Option<(Agreed, HeaderValue)> {
    if !config.enabled {
        return None;
    }
    for value in offers {
        let Ok(value) = value.to_str() else { continue };
        for offer in value.split(',') {
            let mut params = offer.split(';').map(str::trim);
            if params.next() != Some("permessage-deflate") {
                continue;
            }
            if let Some((agreed, named)) = accept_offer(config, params) {
                return Some((agreed, response_header(&agreed, &named)));
            }
        }
    }
    None
}

/// What the client's offer named, so the response names exactly that
/// (RFC 7692 §7.1.2: `server_max_window_bits` is echoed when offered;
/// `client_max_window_bits` may be sent only if the client offered it).
#[derive(Default)]
struct Named {
    server_bits: bool,
    client_bits: bool,
}

fn accept_offer<'a>(
    config: &Compression,
    params: impl Iterator<Item = &'a str>,
) -> Option<(Agreed, Named)> {
    let mut agreed = Agreed {
        server_window: config.server_max_window_bits,
        client_window: 15,
        server_no_takeover: config.server_no_context_takeover,
        client_no_takeover: config.client_no_context_takeover,
        min_size: config.min_size,
        level: config.level,
    };
    let mut named = Named::default();
    let mut seen = Vec::new();
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        if seen.contains(&name) {
            return None;
        }
        seen.push(name);
        match (name, value) {
            ("server_no_context_takeover", None) => agreed.server_no_takeover = true,
            ("client_no_context_takeover", None) => agreed.client_no_takeover = true,
            ("server_max_window_bits", Some(v)) => {
                agreed.server_window = agreed.server_window.min(window_bits(v)?);
                named.server_bits = true;
            }
            ("client_max_window_bits", None) => {
                agreed.client_window = config.client_max_window_bits;
                named.client_bits = true;
            }
            ("client_max_window_bits", Some(v)) => {
                agreed.client_window = window_bits(v)?.min(config.client_max_window_bits);
                named.client_bits = true;
            }
            _ => return None,
        }
    }
    Some((agreed, named))
}

fn window_bits(value: &str) -> Option<u8> {
    // RFC 7692 §7.1.2: 1*DIGIT from 8 to 15, no leading zeros.
    if value.starts_with('0') {
        return None;
    }
    value.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

fn response_header(agreed: &Agreed, named: &Named) -> HeaderValue {
    let mut s = String::from("permessage-deflate");
    if agreed.server_no_takeover {
        s.push_str("; server_no_context_takeover");
    }
    if agreed.client_no_takeover {
        s.push_str("; client_no_context_takeover");
    }
    if named.server_bits || agreed.server_window < 15 {
        let _ = write!(s, "; server_max_window_bits={}", agreed.server_window);
    }
    if named.client_bits && agreed.client_window < 15 {
        let _ = write!(s, "; client_max_window_bits={}", agreed.client_window);
    }
    // Built from ASCII only.
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("permessage-deflate"))
}

/// Compresses outgoing messages for one connection.
pub(crate) struct Deflater {
    agreed: Agreed,
    /// Created on first use: most connections never send a large message.
    zlib: Option<Compress>,
}

impl Deflater {
    pub(crate) fn new(agreed: Agreed) -> Self {
        Self { agreed, zlib: None }
    }

    /// Whether a payload this long is worth compressing (never, on a
    /// connection whose client limited us to an 8-bit window).
    pub(crate) fn wants(&self, len: usize) -> bool {
        len >= self.agreed.min_size && self.agreed.server_window >= 9
    }

    /// Compresses one whole message (RFC 7692 §7.2.1).
    pub(crate) fn compress(&mut self, input: &[u8]) -> Bytes {
        let agreed = self.agreed;
        let zlib = self.zlib.get_or_insert_with(|| {
            Compress::new_with_window_bits(
                flate2::Compression::new(agreed.level),
                false,
                agreed.server_window,
            )
        });
        let mut out = Vec::with_capacity(input.len() / 2 + 64);
        let start = zlib.total_in();
        loop {
            let consumed = (zlib.total_in() - start) as usize;
            // Sync flush on an in-memory buffer cannot fail.
            let _ = zlib.compress_vec(&input[consumed..], &mut out, FlushCompress::Sync);
            let done = (zlib.total_in() - start) as usize == input.len();
            if done && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.ends_with(&SYNC_TAIL) {
            out.truncate(out.len() - SYNC_TAIL.len());
        }
        if out.is_empty() {
            // zlib writes nothing for an empty message after a flush; the
            // receiver appends 00 00 FF FF, which needs the stored block's
            // header byte in front to parse (RFC 7692 §7.2.3.6).
            out.push(0x00);
        }
        if agreed.server_no_takeover {
            zlib.reset();
        }
        Bytes::from(out)
    }
}

fn invalid_deflate() -> CloseFrame {
    CloseFrame::new(
        CloseCode::INVALID_PAYLOAD,
        "compressed message is not valid deflate data (RFC 7692 §7.2.2)",
    )
}

fn too_big() -> CloseFrame {
    CloseFrame::new(
        CloseCode::MESSAGE_TOO_BIG,
        "inflated message larger than the configured maximum (RFC 6455 §7.4.1)",
    )
}

/// Inflates compressed client messages for one connection.
pub(crate) struct Inflater {
    agreed: Agreed,
    zlib: Option<Decompress>,
}

impl Inflater {
    pub(crate) fn new(agreed: Agreed) -> Self {
        Self { agreed, zlib: None }
    }

    /// Inflates one whole message, refusing (1009) to produce more than
    /// `max` bytes however small the input: the decompression bomb guard.
    pub(crate) fn inflate(&mut self, mut input: BytesMut, max: usize) -> Result<Bytes, CloseFrame> {
        let window = self.agreed.client_window.max(9);
        let zlib = self
            .zlib
            .get_or_insert_with(|| Decompress::new_with_window_bits(false, window));
        input.extend_from_slice(&SYNC_TAIL);
        let mut out = Vec::with_capacity((input.len() * 3).clamp(64, max.saturating_add(1)));
        let start = zlib.total_in();
        let mut stream_ended = false;
        loop {
            let consumed = (zlib.total_in() - start) as usize;
            let before = (consumed, out.len());
            let status = zlib
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                .map_err(|_| invalid_deflate())?;
            if out.len() > max {
                return Err(too_big());
            }
            if status == flate2::Status::StreamEnd {
                // The message ended with a BFINAL block (RFC 7692
                // §7.2.3.4): the rest of the input is the tail we appended,
                // and the next message starts a new stream.
                stream_ended = true;
                break;
            }
            let consumed = (zlib.total_in() - start) as usize;
            if consumed == input.len() && out.len() < out.capacity() {
                break;
            }
            if out.len() == out.capacity() {
                let room = max.saturating_add(1) - out.len();
                if room == 0 {
                    return Err(too_big());
                }
                out.reserve(out.capacity().max(64).min(room));
            } else if (consumed, out.len()) == before {
                // Input left, output room left, and zlib moved neither:
                // the data cannot be inflated. Never spin on it.
                return Err(invalid_deflate());
            }
        }
        if stream_ended {
            zlib.reset(false);
            return Ok(Bytes::from(out));
        }
        if self.agreed.client_no_takeover {
            zlib.reset(false);
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> Compression {
        Compression {
            enabled: true,
            ..Compression::default()
        }
    }

    fn offer(s: &'static str) -> Option<String> {
        let header = HeaderValue::from_static(s);
        negotiate(&enabled(), std::iter::once(&header))
            .map(|(_, h)| h.to_str().expect("ascii").to_owned())
    }

    #[test]
    fn negotiates_the_common_offers() {
        assert_eq!(
            offer("permessage-deflate").as_deref(),
            Some("permessage-deflate")
        );
        assert_eq!(
            offer("permessage-deflate; client_max_window_bits").as_deref(),
            Some("permessage-deflate")
        );
        assert_eq!(
            offer("permessage-deflate; server_no_context_takeover; server_max_window_bits=10")
                .as_deref(),
            Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=10")
        );
        assert_eq!(
            offer("permessage-deflate; client_max_window_bits=9").as_deref(),
            Some("permessage-deflate; client_max_window_bits=9")
        );
    }

    #[test]
    fn declines_bad_offers_and_takes_the_next() {
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=8").as_deref(),
            Some("permessage-deflate; server_max_window_bits=8")
        );
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=15").as_deref(),
            Some("permessage-deflate; server_max_window_bits=15")
        );
        assert_eq!(offer("permessage-deflate; bogus"), None);
        assert_eq!(offer("permessage-deflate; server_max_window_bits=16"), None);
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=010"),
            None
        );
        assert_eq!(
            offer("permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
            None
        );
        assert_eq!(offer("x-webkit-deflate-frame"), None);
        assert_eq!(
            offer("permessage-deflate; bogus, permessage-deflate").as_deref(),
            Some("permessage-deflate")
        );
    }

    #[test]
    fn disabled_means_no_extension() {
        let header = HeaderValue::from_static("permessage-deflate");
        assert!(negotiate(&Compression::default(), std::iter::once(&header)).is_none());
    }

    fn agreed(no_takeover: bool) -> Agreed {
        Agreed {
            server_window: 15,
            client_window: 15,
            server_no_takeover: no_takeover,
            client_no_takeover: no_takeover,
            min_size: 0,
            level: 6,
        }
    }

    #[test]
    fn round_trips_with_and_without_context_takeover() {
        for no_takeover in [false, true] {
            let mut deflater = Deflater::new(agreed(no_takeover));
            let mut inflater = Inflater::new(agreed(no_takeover));
            for msg in [
                "hello hello hello hello",
                "",
                "x",
                "",
                "",
                &"abc".repeat(10_000),
                "y",
            ] {
                let packed = deflater.compress(msg.as_bytes());
                let unpacked = inflater
                    .inflate(BytesMut::from(&packed[..]), 1 << 20)
                    .unwrap_or_else(|e| {
                        panic!("no_takeover={no_takeover}, {} bytes: {e:?}", msg.len())
                    });
                assert_eq!(&unpacked[..], msg.as_bytes());
            }
        }
    }

    #[test]
    fn refuses_a_decompression_bomb() {
        let mut deflater = Deflater::new(agreed(false));
        let bomb = deflater.compress(&vec![0u8; 10 << 20]);
        assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
        let err = Inflater::new(agreed(false))
            .inflate(BytesMut::from(&bomb[..]), 64 * 1024)
            .expect_err("over the limit");
        assert_eq!(err.code, CloseCode::MESSAGE_TOO_BIG);
    }

    #[test]
    fn understands_a_final_block_and_starts_a_new_stream_after_it() {
        // RFC 7692 §7.2.3.4: "Hello" in a BFINAL block.
        let mut inflater = Inflater::new(agreed(false));
        let hello = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        for _ in 0..2 {
            let out = inflater
                .inflate(BytesMut::from(&hello[..]), 1024)
                .expect("inflates");
            assert_eq!(&out[..], b"Hello");
        }
    }

    #[test]
    fn refuses_garbage() {
        let err = Inflater::new(agreed(false))
            .inflate(BytesMut::from(&[0xFFu8, 0xFF, 0xFF][..]), 1024)
            .expect_err("garbage");
        assert_eq!(err.code, CloseCode::INVALID_PAYLOAD);
    }
}
