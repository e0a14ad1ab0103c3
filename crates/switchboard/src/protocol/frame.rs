//! RFC 6455 §5 framing: parsing client frames and encoding server frames.
//!
//! The decoder works on a byte slice and never allocates; the connection
//! runtime decides where the bytes live. Server frames are never masked
//! (§5.1), so encoding is a header of 2 to 10 bytes in front of a payload
//! that is shared, not copied, between every recipient.

use bytes::Bytes;

use super::close::CloseCode;

/// A frame opcode (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Control frames are close, ping and pong (§5.5).
    pub(crate) fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// The parsed header of one client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub(crate) fin: bool,
    /// RSV1: "this message is compressed" once permessage-deflate is agreed.
    pub(crate) rsv1: bool,
    pub(crate) opcode: OpCode,
    pub(crate) mask: [u8; 4],
    /// Length of the header in bytes (2 to 14).
    pub(crate) header_len: usize,
    /// Length of the payload in bytes.
    pub(crate) payload_len: usize,
}

/// Why a client frame was refused; each maps to one close code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FrameError {
    pub(crate) code: CloseCode,
    pub(crate) reason: &'static str,
}

impl FrameError {
    const fn protocol(reason: &'static str) -> Self {
        Self {
            code: CloseCode::PROTOCOL_ERROR,
            reason,
        }
    }
}

/// Parses a client frame header from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed. `max_payload` bounds a
/// single frame's payload; a longer frame is refused with 1009 before any of
/// its payload is buffered. `rsv1_allowed` is true once permessage-deflate
/// is agreed (RFC 7692 §6).
pub(crate) fn parse_header(
    buf: &[u8],
    max_payload: usize,
    rsv1_allowed: bool,
) -> Result<Option<FrameHeader>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let rsv1 = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (rsv1 && !rsv1_allowed) {
        return Err(FrameError::protocol(
            "reserved bits set without a negotiated extension (RFC 6455 §5.2)",
        ));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_bits(b0 & 0x0F)
        .ok_or(FrameError::protocol("reserved opcode (RFC 6455 §5.2)"))?;
    if b1 & 0x80 == 0 {
        return Err(FrameError::protocol(
            "client frames must be masked (RFC 6455 §5.1)",
        ));
    }
    let len7 = b1 & 0x7F;
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::protocol(
                "control frames must not be fragmented (RFC 6455 §5.5)",
            ));
        }
        if len7 > 125 {
            return Err(FrameError::protocol(
                "control frame payload over 125 bytes (RFC 6455 §5.5)",
            ));
        }
        if rsv1 {
            return Err(FrameError::protocol(
                "control frames cannot be compressed (RFC 7692 §6.1)",
            ));
        }
    }
    let (payload_len, len_bytes) = match len7 {
        126 => {
            let Some(bytes) = buf.get(2..4).and_then(|s| <[u8; 2]>::try_from(s).ok()) else {
                return Ok(None);
            };
            let len = u64::from(u16::from_be_bytes(bytes));
            if len < 126 {
                return Err(FrameError::protocol(
                    "payload length not minimally encoded (RFC 6455 §5.2)",
                ));
            }
            (len, 2)
        }
        127 => {
            let Some(bytes) = buf.get(2..10).and_then(|s| <[u8; 8]>::try_from(s).ok()) else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(bytes);
            if len >> 63 != 0 {
                return Err(FrameError::protocol(
                    "payload length has its most significant bit set (RFC 6455 §5.2)",
                ));
            }
            if len <= 0xFFFF {
                return Err(FrameError::protocol(
                    "payload length not minimally encoded (RFC 6455 §5.2)",
                ));
            }
            (len, 8)
        }
        n => (u64::from(n), 0),
    };
    if payload_len > max_payload as u64 {
        return Err(FrameError {
            code: CloseCode::MESSAGE_TOO_BIG,
            reason: "frame larger than the configured maximum (RFC 6455 §7.4.1)",
        });
    }
    let mask_at = 2 + len_bytes;
    let Some(mask) = buf
        .get(mask_at..mask_at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
    else {
        return Ok(None);
    };
    if rsv1 && opcode == OpCode::Continuation {
        return Err(FrameError::protocol(
            "RSV1 set on a continuation frame (RFC 7692 §6.1)",
        ));
    }
    Ok(Some(FrameHeader {
        fin,
        rsv1,
        opcode,
        mask,
        header_len: mask_at + 4,
        // Bounded by `max_payload` above, so it fits a usize.
        payload_len: payload_len as usize,
    }))
}

/// XORs `data` with the 4-byte `mask` in place (RFC 6455 §5.3).
///
/// Works eight bytes at a time; the compiler turns the chunk loop into
/// vector instructions, so no `unsafe` is needed for speed.
pub(crate) fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_ne_bytes(word) ^ wide;
        chunk.copy_from_slice(&x.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// The header of a server frame: 2 to 10 bytes, stored inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    bytes: [u8; 10],
    len: u8,
}

impl Head {
    /// Encodes a final (FIN) unmasked header for a payload of `len` bytes.
    pub(crate) fn new(opcode: OpCode, len: usize) -> Self {
        Self::with_rsv1(opcode, len, false)
    }

    /// The same, with RSV1 ("compressed", RFC 7692 §6) set as asked.
    pub(crate) fn with_rsv1(opcode: OpCode, len: usize, rsv1: bool) -> Self {
        let mut bytes = [0u8; 10];
        bytes[0] = 0x80 | if rsv1 { 0x40 } else { 0 } | opcode.bits();
        let used = if len < 126 {
            bytes[1] = len as u8;
            2
        } else if len <= 0xFFFF {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Self { bytes, len: used }
    }

    /// The encoded header bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// One encoded server frame: an inline header and a shared payload.
///
/// Cloning is cheap (a reference count), which is how one message is
/// encoded once and queued to thousands of connections.
///
/// A frame may wrap the shared payload in a short per-recipient envelope —
/// `prefix`, then the payload, then `suffix` — written with one vectored
/// write, so a `switchboard.v1` message (`{"type":"msg","seq":7,…,"payload":`,
/// the sender's JSON, then `}`) shares the payload bytes between all its
/// recipients instead of copying them into each recipient's frame.
#[derive(Debug, Clone)]
pub struct WireFrame {
    pub(crate) head: Head,
    pub(crate) suffix: Suffix,
    pub(crate) prefix: Bytes,
    pub(crate) body: Bytes,
}

/// What follows the body of a frame: nothing, or the `}` that closes an
/// envelope begun in its prefix. An enum of one byte rather than a slice,
/// because every queued frame carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Suffix {
    None,
    CloseBrace,
}

impl Suffix {
    pub(crate) fn as_slice(self) -> &'static [u8] {
        match self {
            Self::None => b"",
            Self::CloseBrace => b"}",
        }
    }
}

impl WireFrame {
    pub(crate) fn new(opcode: OpCode, body: Bytes) -> Self {
        Self {
            head: Head::new(opcode, body.len()),
            suffix: Suffix::None,
            prefix: Bytes::new(),
            body,
        }
    }

    /// A text frame `prefix` + `body` + `suffix`, sharing `body`. The caller
    /// guarantees the three together are UTF-8.
    pub(crate) fn enveloped(prefix: Bytes, body: Bytes, suffix: Suffix) -> Self {
        let len = prefix.len() + body.len() + suffix.as_slice().len();
        Self {
            head: Head::new(OpCode::Text, len),
            suffix,
            prefix,
            body,
        }
    }

    /// A text frame. The caller guarantees `body` is UTF-8 (it came from a
    /// `&str` or from validated input).
    pub(crate) fn text(body: Bytes) -> Self {
        Self::new(OpCode::Text, body)
    }

    /// Builds a text frame from a string, copying it once.
    pub fn from_text(text: impl Into<String>) -> Self {
        Self::text(Bytes::from(text.into()))
    }

    /// Builds a binary frame; the payload is shared, not copied.
    pub fn from_binary(body: impl Into<Bytes>) -> Self {
        Self::new(OpCode::Binary, body.into())
    }

    /// Total bytes this frame occupies on the wire.
    pub fn wire_len(&self) -> usize {
        self.head.as_slice().len() + self.payload_len()
    }

    /// Length of the frame's payload: envelope and body.
    pub(crate) fn payload_len(&self) -> usize {
        self.prefix.len() + self.body.len() + self.suffix.as_slice().len()
    }

    /// The frame's bytes in order: header, envelope prefix, body, suffix
    /// (some may be empty).
    pub(crate) fn parts(&self) -> [&[u8]; 4] {
        [
            self.head.as_slice(),
            &self.prefix,
            &self.body,
            self.suffix.as_slice(),
        ]
    }

    /// The shared body: the whole payload of a plain frame, the wrapped
    /// payload of an enveloped one.
    pub fn payload(&self) -> &Bytes {
        &self.body
    }

    /// The whole payload as one buffer (copied only for an enveloped frame).
    pub(crate) fn contiguous_payload(&self) -> Bytes {
        if self.prefix.is_empty() && self.suffix == Suffix::None {
            return self.body.clone();
        }
        let mut out = Vec::with_capacity(self.payload_len());
        for part in &self.parts()[1..] {
            out.extend_from_slice(part);
        }
        Bytes::from(out)
    }

    /// Whether this is a text frame.
    pub fn is_text(&self) -> bool {
        self.head.bytes[0] & 0x0F == OpCode::Text.bits()
    }

    /// The data opcode (text or binary) of an uncompressed data frame, or
    /// `None` for control frames and frames already compressed.
    pub(crate) fn data_opcode(&self) -> Option<OpCode> {
        if self.head.bytes[0] & 0x40 != 0 {
            return None;
        }
        match self.head.bytes[0] & 0x0F {
            0x1 => Some(OpCode::Text),
            0x2 => Some(OpCode::Binary),
            _ => None,
        }
    }
}

/// A client frame as a browser sends it (RFC 6455 §5.2: masked, the
/// shortest length encoding), for the codec's and the reader's tests.
/// `first` is the first byte: FIN, RSV and opcode.
#[cfg(test)]
pub(crate) fn masked_client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let mut body = payload.to_vec();
    apply_mask(&mut body, mask);
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        masked_client_frame(first, payload, [1, 2, 3, 4])
    }

    #[test]
    fn parses_each_length_encoding() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let bytes = masked(0x82, &vec![7u8; len]);
            let head = parse_header(&bytes, 1 << 20, false)
                .expect("valid")
                .expect("complete");
            assert_eq!(head.payload_len, len);
            assert_eq!(head.header_len + len, bytes.len());
            assert_eq!(head.opcode, OpCode::Binary);
            assert!(head.fin);
        }
    }

    #[test]
    fn needs_more_bytes_for_partial_headers() {
        let bytes = masked(0x81, &[b'a'; 300]);
        for cut in 0..8 {
            assert_eq!(
                parse_header(&bytes[..cut], 1 << 20, false),
                Ok(None),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn refuses_protocol_violations() {
        let cases: &[(&[u8], CloseCode)] = &[
            (&[0xC1, 0x80, 0, 0, 0, 0], CloseCode::PROTOCOL_ERROR), // RSV1
            (&[0x83, 0x80, 0, 0, 0, 0], CloseCode::PROTOCOL_ERROR), // opcode 3
            (&[0x81, 0x00], CloseCode::PROTOCOL_ERROR),             // unmasked
            (&[0x09, 0x80, 0, 0, 0, 0], CloseCode::PROTOCOL_ERROR), // fragmented ping
            (&[0x89, 0xFE, 0, 200], CloseCode::PROTOCOL_ERROR),     // ping of 200 bytes
            (&[0x82, 0xFE, 0, 5], CloseCode::PROTOCOL_ERROR),       // non-minimal length
            (
                &[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0],
                CloseCode::PROTOCOL_ERROR,
            ), // 64-bit MSB
            (
                &[0x82, 0xFF, 0, 0, 0, 0, 0, 0x10, 0, 0],
                CloseCode::MESSAGE_TOO_BIG,
            ),
        ];
        for (bytes, code) in cases {
            let err = parse_header(bytes, 65_536, false).expect_err("must be refused");
            assert_eq!(err.code, *code, "{bytes:?}: {}", err.reason);
        }
    }

    #[test]
    fn mask_round_trips_at_every_alignment() {
        let original: Vec<u8> = (0..=255u8).collect();
        for start in 0..9 {
            let mut data = original[start..].to_vec();
            apply_mask(&mut data, [0xA5, 0x5A, 0x0F, 0xF0]);
            assert_ne!(data, original[start..]);
            apply_mask(&mut data, [0xA5, 0x5A, 0x0F, 0xF0]);
            assert_eq!(data, original[start..]);
        }
    }

    #[test]
    fn encodes_server_headers_minimally() {
        assert_eq!(Head::new(OpCode::Text, 5).as_slice(), &[0x81, 5]);
        assert_eq!(
            Head::new(OpCode::Binary, 126).as_slice(),
            &[0x82, 126, 0, 126]
        );
        assert_eq!(
            Head::new(OpCode::Binary, 70_000).as_slice(),
            &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]
        );
    }
}
