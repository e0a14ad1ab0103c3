//! Close codes (RFC 6455 §7.4) and the close frames Switchboard sends.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};

/// A WebSocket close status code (RFC 6455 §7.4).
///
/// Switchboard sends the standard codes below plus three of its own in the
/// private range 4000–4999 (§7.4.2):
///
/// | code | constant | when |
/// |------|----------|------|
/// | 1000 | [`NORMAL`](Self::NORMAL) | the handler stopped normally, or the client closed |
/// | 1001 | [`GOING_AWAY`](Self::GOING_AWAY) | the server is shutting down, or keepalive found the peer dead |
/// | 1002 | [`PROTOCOL_ERROR`](Self::PROTOCOL_ERROR) | the client broke RFC 6455 framing |
/// | 1003 | [`UNSUPPORTED_DATA`](Self::UNSUPPORTED_DATA) | a data type the endpoint does not accept |
/// | 1007 | [`INVALID_PAYLOAD`](Self::INVALID_PAYLOAD) | a text message that is not UTF-8 |
/// | 1008 | [`POLICY_VIOLATION`](Self::POLICY_VIOLATION) | the outgoing queue overflowed (slow consumer) |
/// | 1009 | [`MESSAGE_TOO_BIG`](Self::MESSAGE_TOO_BIG) | a frame or message over the size limit |
/// | 1011 | [`INTERNAL_ERROR`](Self::INTERNAL_ERROR) | the handler panicked |
/// | 1012 | [`SERVICE_RESTART`](Self::SERVICE_RESTART) | a draining node closes a `switchboard.v1` client after its reconnect delay plus the grace ([`Hub::drain`](crate::Hub::drain)) |
/// | 4000 | [`DISCONNECTED`](Self::DISCONNECTED) | the backend closed it (`DELETE /api/connections/{id}`) |
/// | 4001 | [`REPLACED`](Self::REPLACED) | a newer connection took this ID (`duplicate_ids = "replace-oldest"`) |
/// | 4002 | [`TOKEN_EXPIRED`](Self::TOKEN_EXPIRED) | the client's credentials expired (plus the grace period): reconnect with a fresh token |
/// | 4100 | [`SLOW_CONSUMER`](Self::SLOW_CONSUMER) | a `switchboard.v1` client's queue overflowed: reconnect with backoff and resume |
/// | 4101 | [`INBOX_RESET`](Self::INBOX_RESET) | a `switchboard.v1` client's inbox was lost under it (Redis flushed or restarted): reconnect and resume (it will say `reset`) |
/// | 4102 | [`INBOX_UNAVAILABLE`](Self::INBOX_UNAVAILABLE) | a `switchboard.v1` hello could not reach the inbox store (the node lost Redis): reconnect with backoff and resume |
/// | 4400 | [`BAD_HELLO`](Self::BAD_HELLO) | a `switchboard.v1` client did not start with a valid `hello` |
/// | 4409 | [`ID_IN_USE`](Self::ID_IN_USE) | a `switchboard.v1` hello for an ID already connected, under `duplicate_ids = "reject-new"` |
///
/// For clients: 4100–4199 mean "reconnect with backoff, then resume";
/// 4400–4499 mean "do not reconnect unchanged" (docs/protocol-v1.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: normal closure.
    pub const NORMAL: Self = Self(1000);
    /// 1001: the endpoint is going away (shutdown, dead peer).
    pub const GOING_AWAY: Self = Self(1001);
    /// 1002: protocol error.
    pub const PROTOCOL_ERROR: Self = Self(1002);
    /// 1003: the endpoint cannot accept this data type.
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    /// 1007: message data inconsistent with its type (invalid UTF-8).
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// 1008: policy violation.
    pub const POLICY_VIOLATION: Self = Self(1008);
    /// 1009: message too big.
    pub const MESSAGE_TOO_BIG: Self = Self(1009);
    /// 1011: unexpected condition in the server.
    pub const INTERNAL_ERROR: Self = Self(1011);
    /// 1012: service restart (IANA registry): a draining node closes a
    /// `switchboard.v1` client that is still connected after its
    /// reconnect delay plus the grace; reconnect (to another node) and
    /// resume.
    pub const SERVICE_RESTART: Self = Self(1012);
    /// 4000: disconnected by the backend through the HTTP API.
    pub const DISCONNECTED: Self = Self(4000);
    /// 4001: replaced by a newer connection with the same client ID.
    pub const REPLACED: Self = Self(4001);
    /// 4002: the client's token expired while it was connected (after
    /// `Security::expiry_grace`); it should get a new token and reconnect.
    pub const TOKEN_EXPIRED: Self = Self(4002);
    /// 4100: a `switchboard.v1` connection's outgoing queue overflowed; its
    /// inbox has what it missed, so it should reconnect and resume.
    pub const SLOW_CONSUMER: Self = Self(4100);
    /// 4101: the client ID's `switchboard.v1` inbox was lost while the
    /// connection was open (its store was flushed or restarted): what it
    /// resumes from is gone. Reconnect and resume; the answer is `reset`.
    pub const INBOX_RESET: Self = Self(4101);
    /// 4102: a `switchboard.v1` hello could not reach the inbox store (a
    /// clustered node that lost Redis). Reconnect with backoff and resume.
    pub const INBOX_UNAVAILABLE: Self = Self(4102);
    /// 4400: a `switchboard.v1` connection did not start with a valid
    /// `hello` in time; reconnecting unchanged will fail the same way.
    pub const BAD_HELLO: Self = Self(4400);
    /// 4409: a `switchboard.v1` hello for an ID that is connected already,
    /// under `duplicate_ids = "reject-new"`.
    pub const ID_IN_USE: Self = Self(4409);

    /// Whether a peer may send this code in a close frame (RFC 6455 §7.4.1,
    /// §7.4.2 and the IANA registry): 1000–1003, 1007–1014 and 3000–4999.
    /// 1004–1006 and 1015 are reserved and must never appear on the wire.
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// A close code with a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The status code.
    pub code: CloseCode,
    /// The reason, at most 123 bytes on the wire (longer reasons are cut at
    /// a character boundary when encoded).
    pub reason: Cow<'static, str>,
}

impl CloseFrame {
    /// A close frame with a static reason.
    pub const fn new(code: CloseCode, reason: &'static str) -> Self {
        Self {
            code,
            reason: Cow::Borrowed(reason),
        }
    }

    /// The control-frame payload: the code, then the reason cut to fit the
    /// 125-byte control frame limit (RFC 6455 §5.5).
    pub(crate) fn payload(&self) -> Bytes {
        let mut end = self.reason.len().min(123);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut buf = BytesMut::with_capacity(2 + end);
        buf.put_u16(self.code.0);
        buf.put_slice(&self.reason.as_bytes()[..end]);
        buf.freeze()
    }
}

/// Parses a close frame payload received from a client (RFC 6455 §5.5.1).
///
/// An empty payload means "no status"; one byte, a code that may not appear
/// on the wire, or a reason that is not UTF-8 are protocol errors.
pub(crate) fn parse_close_payload(payload: &[u8]) -> Result<Option<CloseFrame>, CloseFrame> {
    match payload {
        [] => Ok(None),
        [_] => Err(CloseFrame::new(
            CloseCode::PROTOCOL_ERROR,
            "close payload of 1 byte (RFC 6455 §5.5.1)",
        )),
        [hi, lo, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
            if !code.is_valid_on_wire() {
                return Err(CloseFrame::new(
                    CloseCode::PROTOCOL_ERROR,
                    "invalid close code (RFC 6455 §7.4)",
                ));
            }
            let reason = simdutf8::basic::from_utf8(reason).map_err(|_| {
                CloseFrame::new(
                    CloseCode::INVALID_PAYLOAD,
                    "close reason is not UTF-8 (RFC 6455 §5.5.1)",
                )
            })?;
            Ok(Some(CloseFrame {
                code,
                reason: Cow::Owned(reason.to_owned()),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_validity_follows_the_registry() {
        for ok in [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert!(CloseCode(ok).is_valid_on_wire(), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(!CloseCode(bad).is_valid_on_wire(), "{bad}");
        }
    }

    #[test]
    fn parses_close_payloads() {
        assert_eq!(parse_close_payload(&[]), Ok(None));
        assert_eq!(
            parse_close_payload(&[3, 232, b'o', b'k']).map(|f| f.map(|f| f.code)),
            Ok(Some(CloseCode::NORMAL))
        );
        assert_eq!(
            parse_close_payload(&[3]).map_err(|f| f.code),
            Err(CloseCode::PROTOCOL_ERROR)
        );
        assert_eq!(
            parse_close_payload(&[3, 237]).map_err(|f| f.code),
            Err(CloseCode::PROTOCOL_ERROR)
        );
        assert_eq!(
            parse_close_payload(&[3, 232, 0xFF]).map_err(|f| f.code),
            Err(CloseCode::INVALID_PAYLOAD)
        );
    }

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let frame = CloseFrame {
            code: CloseCode::NORMAL,
            reason: Cow::Owned("é".repeat(100)),
        };
        let payload = frame.payload();
        assert!(payload.len() <= 125);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }
}
