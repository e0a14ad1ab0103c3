//! The server's answers to `switchboard.v1` requests: the welcome and the
//! fields of each acknowledgement. Written by hand into one string rather
//! than through `serde_json::Value`: an ack is built for every send, and a
//! value tree would cost an allocation per field.

use std::fmt::Write as _;

use crate::backend::presence::frame::push_snapshot;
use crate::backend::{Attached, PresenceMode, PresenceSnapshot};
use crate::handler::Conn;
use crate::id::{ClientId, Topic};
use crate::runtime::delivery::{push_json_str, push_u64};

/// `{"type":"ack","id":N` — the caller appends `,`-led fields and `}`.
pub(crate) fn ack_head(out: &mut String, id: Option<u64>) {
    out.push_str(r#"{"type":"ack""#);
    if let Some(id) = id {
        out.push_str(r#","id":"#);
        push_u64(out, id);
    }
}

/// The answer to a hello.
pub(crate) fn welcome(
    id: Option<u64>,
    client: &ClientId,
    conn: &Conn<()>,
    attached: &Attached,
) -> String {
    let hub = conn.hub();
    let node = hub.backend().health().node;
    let limits = hub.limits();
    let mut out = String::with_capacity(320);
    out.push_str(r#"{"type":"welcome""#);
    if let Some(id) = id {
        let _ = write!(out, r#","id":{id}"#);
    }
    out.push_str(r#","client":"#);
    push_json_str(&mut out, client.as_str());
    out.push_str(r#","conn":"#);
    let conn_name = format!("{}/{}", node.as_deref().unwrap_or("local"), conn.id().0);
    push_json_str(&mut out, &conn_name);
    out.push_str(r#","node":"#);
    match &node {
        Some(node) => push_json_str(&mut out, node),
        None => out.push_str("null"),
    }
    out.push_str(r#","inbox":{"epoch":"#);
    push_json_str(&mut out, &attached.epoch);
    let _ = write!(out, r#","seq":{}}}"#, attached.top);
    out.push_str(r#","resume":{"status":"#);
    push_json_str(&mut out, attached.status.as_str());
    let _ = write!(out, r#","replayed":{}"#, attached.replay.len());
    if !attached.lost.is_empty() {
        out.push_str(r#","lost":"#);
        push_ranges(&mut out, &attached.lost);
    }
    out.push('}');
    let _ = write!(
        out,
        r#","heartbeat_ms":{},"limits":{{"max_message_size":{},"max_targets":{},"inbox_size":{},"inbox_ttl_ms":{}}}}}"#,
        limits.ping_interval.as_millis(),
        limits.max_message_size,
        limits.max_targets,
        limits.v1.inbox_size,
        limits.v1.inbox_ttl.as_millis(),
    );
    out
}

/// A send's ack fields: its `mid`, the report's lists, and whether it was
/// a duplicate.
pub(crate) fn sent(out: &mut String, mid: Option<&str>, lists: &str, duplicate: bool) {
    sent_head(out, mid);
    out.push_str(lists);
    if duplicate {
        out.push_str(r#","duplicate":true"#);
    }
}

/// A send's ack fields before its report's lists: its `mid`, and the comma
/// the lists follow.
pub(crate) fn sent_head(out: &mut String, mid: Option<&str>) {
    if let Some(mid) = mid {
        out.push_str(r#","mid":"#);
        push_json_str(out, mid);
    }
    out.push(',');
}

pub(crate) fn published(out: &mut String, recipients: usize) {
    let _ = write!(out, r#","recipients":{recipients}"#);
}

/// A subscribe's ack fields: the topic, and the presence snapshot when the
/// client asked for presence.
pub(crate) fn subscribed(
    out: &mut String,
    topic: &Topic,
    presence: Option<(&PresenceSnapshot, PresenceMode)>,
) {
    out.push_str(r#","topic":"#);
    push_json_str(out, topic.as_str());
    if let Some((snapshot, mode)) = presence {
        out.push_str(r#","presence":"#);
        push_snapshot(out, snapshot, mode);
    }
}

/// A `presence_get`'s ack fields.
pub(crate) fn presence(
    out: &mut String,
    topic: &Topic,
    snapshot: &PresenceSnapshot,
    mode: PresenceMode,
) {
    subscribed(out, topic, Some((snapshot, mode)));
}

pub(crate) fn unsubscribed(out: &mut String, topic: &Topic, was: bool) {
    subscribed(out, topic, None);
    let _ = write!(out, r#","was_subscribed":{was}"#);
}

/// A replay's ack fields, and its closing brace.
pub(crate) fn replayed(out: &mut String, replayed: usize, lost: &[(u64, u64)]) {
    let _ = write!(out, r#","replayed":{replayed}"#);
    if !lost.is_empty() {
        out.push_str(r#","lost":"#);
        push_ranges(out, lost);
    }
    out.push('}');
}

pub(crate) fn refreshed(out: &mut String, expires_at_ms: Option<u64>) {
    match expires_at_ms {
        Some(ms) => {
            let _ = write!(out, r#","expires_at_ms":{ms}"#);
        }
        None => out.push_str(r#","expires_at_ms":null"#),
    }
}

fn push_ranges(out: &mut String, ranges: &[(u64, u64)]) {
    out.push('[');
    for (i, (a, b)) in ranges.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "[{a},{b}]");
    }
    out.push(']');
}
