//! Complete data messages, as the reader assembles them and handlers see
//! them.

use bytes::Bytes;

use super::frame::{OpCode, WireFrame};

/// A complete WebSocket data message (fragments already joined).
///
/// Control frames (ping, pong, close) are answered by the connection runtime
/// and never reach a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message; always valid UTF-8.
    Text(Text),
    /// A binary message.
    Binary(Bytes),
}

impl Message {
    /// A text message.
    pub fn text(text: impl Into<Text>) -> Self {
        Self::Text(text.into())
    }

    /// A binary message.
    pub fn binary(bytes: impl Into<Bytes>) -> Self {
        Self::Binary(bytes.into())
    }

    /// The payload bytes, whatever the type.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Text(text) => text.as_bytes(),
            Self::Binary(bytes) => bytes,
        }
    }

    /// Encodes the message as a server frame, sharing the payload.
    pub fn into_frame(self) -> WireFrame {
        match self {
            Self::Text(text) => WireFrame::new(OpCode::Text, text.0),
            Self::Binary(bytes) => WireFrame::new(OpCode::Binary, bytes),
        }
    }
}

/// UTF-8 text backed by shared [`Bytes`], so a received message can be
/// forwarded without copying.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Text(Bytes);

impl Text {
    /// Wraps bytes already checked to be UTF-8 (by the frame reader).
    pub(crate) fn from_validated(bytes: Bytes) -> Self {
        Self(bytes)
    }

    /// The text. Validation is repeated with SIMD (several GB/s) rather than
    /// trusted with `unsafe`, which this crate forbids.
    pub fn as_str(&self) -> &str {
        // Every constructor guarantees UTF-8, so this never falls back.
        simdutf8::basic::from_utf8(&self.0).unwrap_or_default()
    }

    /// The UTF-8 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The shared bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Self(Bytes::from(s))
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Self(Bytes::from_static(s.as_bytes()))
    }
}
