//! Presence: who is in a topic right now (docs/protocol-v1.md, "Presence").
//!
//! A *member* is a client ID subscribed to a topic, summed over all its
//! connections (and, with Redis, all nodes): a second tab is not a join,
//! closing one of two tabs is not a leave. A member whose last connection
//! ended abnormally stays a member for `v1.presence_leave_delay`; back
//! within it, nobody hears of it.
//!
//! - this module: the types the [`Backend`](super::Backend) presence methods
//!   take and return;
//! - [`watchers`]: the connections that asked for presence events, and the
//!   coalescing of events into one frame per topic per window;
//! - [`frame`]: the JSON of snapshots and presence frames;
//! - [`table`]: the in-memory membership of one node;
//! - [`timers`]: one task that fires pending leaves and window flushes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::id::ClientId;
use crate::limits::V1Limits;

pub(crate) mod frame;
pub(crate) mod table;
pub(crate) mod timers;
pub(crate) mod watchers;

/// The largest member meta, in bytes of JSON text. Pusher allows 1 KB of
/// user info, Sockudo 2 KB: meta is a name and an avatar URL, not a
/// profile, and every snapshot carries every member's.
pub const MAX_META_BYTES: usize = 1024;

/// What a watcher of a topic's presence receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PresenceMode {
    /// The member list: snapshots list members, events name who joined,
    /// left or changed meta (only counts above `presence_max_members`).
    Full,
    /// The number of members only.
    Count,
}

impl PresenceMode {
    /// `"full"` or `"count"`, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Count => "count",
        }
    }
}

/// How a connection stopped being part of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Departure {
    /// On purpose (an unsubscribe, a close 1000): if it was the member's
    /// last connection, the member leaves now.
    Now,
    /// Abnormally (reset, timeout, slow consumer, server drain): the member
    /// leaves after `presence_leave_delay` unless a connection of it joins
    /// the topic again before.
    Delayed,
}

/// One member of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PresenceMember {
    /// The client ID.
    pub id: ClientId,
    /// Its connections subscribed to the topic, over every node (0 while
    /// its leave is pending).
    pub conns: u32,
    /// When it joined, in milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// Its meta, as JSON text.
    pub meta: Option<Arc<str>>,
}

/// A topic's presence at revision `rev`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PresenceSnapshot {
    /// The topic's presence revision: every later event has a higher one.
    pub rev: u64,
    /// How many members.
    pub count: usize,
    /// The members, sorted by ID; empty in count mode and when `truncated`.
    pub members: Vec<PresenceMember>,
    /// The topic has more than `presence_max_members` members: only the
    /// count is given.
    pub truncated: bool,
}

/// What changed about one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// It joined, with this meta.
    Joined(Option<Arc<str>>),
    /// Its meta changed (a connection joined with other meta).
    Updated(Option<Arc<str>>),
    /// It left.
    Left,
}

/// One change of a topic's membership, numbered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    /// The topic's revision before this change.
    pub(crate) prev: u64,
    /// The topic's revision with it.
    pub(crate) rev: u64,
    pub(crate) id: ClientId,
    pub(crate) change: Change,
    /// Members after the change.
    pub(crate) count: usize,
}

/// The presence settings of `V1Limits`, copied where they are used.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PresenceSettings {
    pub(crate) leave_delay: Duration,
    pub(crate) coalesce: Duration,
    pub(crate) max_members: usize,
}

impl From<&V1Limits> for PresenceSettings {
    fn from(v1: &V1Limits) -> Self {
        Self {
            leave_delay: v1.presence_leave_delay,
            coalesce: v1.presence_coalesce,
            max_members: v1.presence_max_members,
        }
    }
}

/// The future of a presence call a backend does at once: ready, and of
/// size zero, so boxing it allocates nothing (`std::future::ready(())`
/// holds a byte, and its box was an allocation per subscribe).
pub(crate) struct Done;

impl Future for Done {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }
}
