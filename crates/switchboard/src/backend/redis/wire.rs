//! Messages between nodes: a JSON header line, then the payload bytes.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Kind {
    /// Deliver the payload to these IDs, then answer.
    Send,
    /// A topic publish (on the topic's channel); every subscribed node answers.
    Pub,
    /// Close every connection of one ID, then answer.
    Close,
    /// An answer to `r`.
    Ack,
    /// Answer once everything Redis sent before this is handled: the
    /// barrier of the first v1 hello (`inbox.rs`), after which no node
    /// still holds `P:v1` as absent in its location cache.
    Sync,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Header<'a> {
    pub(super) k: Kind,
    /// Request number, chosen by the requesting node.
    pub(super) r: u64,
    /// The member that sent this message (requests go back to it).
    #[serde(borrow)]
    pub(super) f: Cow<'a, str>,
    /// Send: the targets' indexes at the requester, one per `t`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) i: Vec<usize>,
    /// Send: the target IDs. Close: the one ID.
    #[serde(default, borrow, skip_serializing_if = "Vec::is_empty")]
    pub(super) t: Vec<Cow<'a, str>>,
    /// Send: each target's inbox sequence number, one per `t` (0: the
    /// target has no inbox). Empty when the sender numbered nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) q: Vec<u64>,
    /// Send: each numbered target's inbox epoch, one per `t` (empty where
    /// `q` is 0), so a receiver notices an inbox reset under it.
    #[serde(default, borrow, skip_serializing_if = "Vec::is_empty")]
    pub(super) e: Vec<Cow<'a, str>>,
    /// The payload is binary (else text).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) b: bool,
    /// Ack of a send: indexes delivered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) d: Vec<usize>,
    /// Ack of a send: indexes dropped (connected, every connection refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) x: Vec<usize>,
    /// Ack of a send: indexes whose inbox kept the message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) n: Vec<usize>,
    /// Send and publish: the sender's client ID, if any.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) s: Option<Cow<'a, str>>,
    /// Send and publish: the sender's message id, if any.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) m: Option<Cow<'a, str>>,
    /// Ack: connections reached (send, publish) or closed. Close: the code.
    #[serde(default)]
    pub(super) c: usize,
    /// Close under `duplicate_ids = "replace-oldest"` (`duplicates.rs`):
    /// close only the connections stamped before this (0: close every
    /// connection). Its ack: the newest stamp the answering node kept.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) o: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl<'a> Header<'a> {
    pub(super) fn new(k: Kind, r: u64, f: &'a str) -> Self {
        Self {
            k,
            r,
            f: Cow::Borrowed(f),
            i: Vec::new(),
            t: Vec::new(),
            q: Vec::new(),
            e: Vec::new(),
            b: false,
            d: Vec::new(),
            x: Vec::new(),
            n: Vec::new(),
            s: None,
            m: None,
            c: 0,
            o: 0,
        }
    }

    pub(super) fn encode(&self, body: &[u8]) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(body);
        out
    }
}

/// The message a send or publish carries: its payload and, from the
/// header, its sender and message id.
pub(super) fn envelope_of(
    header: &Header<'_>,
    body: bytes::Bytes,
) -> crate::runtime::delivery::Envelope {
    let frame = if header.b {
        crate::protocol::frame::WireFrame::from_binary(body)
    } else {
        crate::protocol::frame::WireFrame::text(body)
    };
    let sender = header
        .s
        .as_deref()
        .and_then(|s| crate::id::ClientId::new(s).ok());
    crate::runtime::delivery::Envelope::of_frame(frame)
        .from(sender)
        .mid(header.m.as_deref())
}

/// An answer, as the waiting request sees it.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) from: String,
    pub(super) delivered: Vec<usize>,
    pub(super) dropped: Vec<usize>,
    pub(super) retained: Vec<usize>,
    pub(super) count: usize,
    /// A replace-oldest close's answer: the newest stamp kept there.
    pub(super) newest: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_with_the_payload_after_the_newline() {
        let mut header = Header::new(Kind::Send, 7, "a#1");
        header.i = vec![0, 2];
        header.t = vec![Cow::Borrowed("1"), Cow::Borrowed("x")];
        let wire = header.encode(b"{\"hi\":\n1}");
        let newline = wire.iter().position(|&b| b == b'\n').expect("a newline");
        let back: Header<'_> = serde_json::from_slice(&wire[..newline]).expect("header");
        assert_eq!(back.k, Kind::Send);
        assert_eq!(back.r, 7);
        assert_eq!(back.f, "a#1");
        assert_eq!(back.i, vec![0, 2]);
        assert_eq!(&wire[newline + 1..], b"{\"hi\":\n1}");
    }
}
