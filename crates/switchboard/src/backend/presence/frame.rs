//! The JSON of presence (docs/protocol-v1.md, "Presence"): the snapshot
//! object of a subscribe or `presence_get` ack and of
//! `GET /api/presence/{topic}`, and the `presence` event frame. Written by
//! hand, as the other v1 frames are.

use std::fmt::Write as _;
use std::sync::Arc;

use super::{Change, PresenceMember, PresenceMode, PresenceSnapshot};
use crate::id::{ClientId, Topic};
use crate::runtime::delivery::push_json_str;

/// Appends the snapshot object: `{"rev":R,"count":N,"members":[…]}`, or
/// without `members` in count mode, or with `"truncated":true` instead when
/// the topic is over the member limit.
pub(crate) fn push_snapshot(out: &mut String, snapshot: &PresenceSnapshot, mode: PresenceMode) {
    let _ = write!(
        out,
        r#"{{"rev":{},"count":{}"#,
        snapshot.rev, snapshot.count
    );
    if snapshot.truncated {
        out.push_str(r#","truncated":true"#);
    } else if mode == PresenceMode::Full {
        out.push_str(r#","members":["#);
        for (i, member) in snapshot.members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_member(out, member);
        }
        out.push(']');
    }
    out.push('}');
}

fn push_member(out: &mut String, member: &PresenceMember) {
    out.push_str(r#"{"id":"#);
    push_json_str(out, member.id.as_str());
    let _ = write!(
        out,
        r#","conns":{},"since_ms":{}"#,
        member.conns, member.since_ms
    );
    push_meta(out, member.meta.as_ref());
    out.push('}');
}

fn push_meta(out: &mut String, meta: Option<&Arc<str>>) {
    if let Some(meta) = meta {
        out.push_str(r#","meta":"#);
        out.push_str(meta);
    }
}

/// The changes of one coalescing window of one topic: revisions
/// `prev + 1 ..= rev`, each member once with its state at `rev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Batch {
    pub(crate) prev: u64,
    pub(crate) rev: u64,
    pub(crate) count: usize,
    pub(crate) changes: Vec<(ClientId, Change)>,
}

/// What a watcher is sent of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detail {
    /// Who joined, left or changed.
    Members,
    /// The count only.
    Count,
    /// The count only, because the topic is over the member limit.
    Truncated,
}

/// A `presence` frame.
pub(crate) fn event(topic: &Topic, batch: &Batch, detail: Detail) -> String {
    let mut out = String::with_capacity(96 + 48 * batch.changes.len());
    out.push_str(r#"{"type":"presence","topic":"#);
    push_json_str(&mut out, topic.as_str());
    let _ = write!(
        out,
        r#","prev":{},"rev":{},"count":{}"#,
        batch.prev, batch.rev, batch.count
    );
    match detail {
        Detail::Count => {}
        Detail::Truncated => out.push_str(r#","truncated":true"#),
        Detail::Members => {
            for (name, wanted) in [("joins", 0), ("leaves", 1), ("updates", 2)] {
                let _ = write!(out, r#","{name}":["#);
                let mut first = true;
                for (id, change) in &batch.changes {
                    let (kind, meta) = match change {
                        Change::Joined(meta) => (0, meta.as_ref()),
                        Change::Left => (1, None),
                        Change::Updated(meta) => (2, meta.as_ref()),
                    };
                    if kind != wanted {
                        continue;
                    }
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    out.push_str(r#"{"id":"#);
                    push_json_str(&mut out, id.as_str());
                    push_meta(&mut out, meta);
                    out.push('}');
                }
                out.push(']');
            }
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClientId {
        ClientId::new(s).expect("id")
    }

    #[test]
    fn frames_are_valid_json_with_every_list() {
        let topic = Topic::new("room/1").expect("topic");
        let batch = Batch {
            prev: 4,
            rev: 7,
            count: 2,
            changes: vec![
                (id("a"), Change::Joined(Some(Arc::from(r#"{"n":"A"}"#)))),
                (id("b"), Change::Left),
                (id("c"), Change::Updated(None)),
            ],
        };
        let full: serde_json::Value =
            serde_json::from_str(&event(&topic, &batch, Detail::Members)).expect("json");
        assert_eq!(
            full,
            serde_json::json!({"type":"presence","topic":"room/1","prev":4,"rev":7,"count":2,
                "joins":[{"id":"a","meta":{"n":"A"}}],"leaves":[{"id":"b"}],"updates":[{"id":"c"}]})
        );
        let count: serde_json::Value =
            serde_json::from_str(&event(&topic, &batch, Detail::Truncated)).expect("json");
        assert_eq!(
            count,
            serde_json::json!({"type":"presence","topic":"room/1","prev":4,"rev":7,"count":2,"truncated":true})
        );
    }

    #[test]
    fn snapshots_list_members_in_full_mode_only() {
        let snapshot = PresenceSnapshot {
            rev: 3,
            count: 1,
            members: vec![PresenceMember {
                id: id("a"),
                conns: 2,
                since_ms: 10,
                meta: None,
            }],
            truncated: false,
        };
        let mut full = String::new();
        push_snapshot(&mut full, &snapshot, PresenceMode::Full);
        assert_eq!(
            full,
            r#"{"rev":3,"count":1,"members":[{"id":"a","conns":2,"since_ms":10}]}"#
        );
        let mut count = String::new();
        push_snapshot(&mut count, &snapshot, PresenceMode::Count);
        assert_eq!(count, r#"{"rev":3,"count":1}"#);
    }
}
