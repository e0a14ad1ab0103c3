//! Per-ID inboxes: messages sent to a client ID, numbered and kept for a
//! while so that a `switchboard.v1` client that reconnects resumes exactly
//! where it left off (docs/protocol-v1.md, "The inbox").
//!
//! This is the in-memory store, one [`IdInbox`] per ID, kept by the memory
//! backend next to the ID's connections so that numbering a message and
//! queueing it to the ID's connections happen under one lock: the order of
//! sequence numbers is the order of delivery.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::runtime::delivery::Envelope;

/// The retention limits (the `[v1]` keys of docs/protocol-v1.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InboxLimits {
    pub(crate) size: usize,
    pub(crate) max_bytes: usize,
    pub(crate) ttl: Duration,
    pub(crate) meta_ttl: Duration,
    pub(crate) total_bytes: usize,
}

impl From<&crate::limits::V1Limits> for InboxLimits {
    fn from(v1: &crate::limits::V1Limits) -> Self {
        Self {
            size: v1.inbox_size.max(1),
            max_bytes: v1.inbox_max_bytes,
            ttl: v1.inbox_ttl,
            meta_ttl: v1.inbox_meta_ttl.max(v1.inbox_ttl),
            total_bytes: v1.inbox_total_bytes,
        }
    }
}

/// One retained message.
#[derive(Debug, Clone)]
pub struct Retained {
    /// Its sequence number in the ID's inbox.
    pub seq: u64,
    /// The message.
    pub envelope: Arc<Envelope>,
    at: Instant,
}

impl Retained {
    /// A message numbered `seq`, read from a store outside this process
    /// (the Redis backend's streams).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn read(seq: u64, envelope: Arc<Envelope>) -> Self {
        Self {
            seq,
            envelope,
            at: Instant::now(),
        }
    }
}

/// Where a v1 client says it left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// The inbox epoch it was given.
    pub epoch: String,
    /// The last sequence number it processed (or its welcome's `inbox.seq`).
    pub seq: u64,
}

/// How a resume went (docs/protocol-v1.md, "The resume states").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeStatus {
    /// No resume was asked for.
    New,
    /// Everything after the client's position is replayed.
    Recovered,
    /// Some of it was trimmed: see `lost`.
    Partial,
    /// The inbox's history is not the one the client knew.
    Reset,
}

impl ResumeStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Recovered => "recovered",
            Self::Partial => "partial",
            Self::Reset => "reset",
        }
    }
}

/// What attaching a v1 connection to its ID's inbox found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Attached {
    /// The inbox epoch.
    pub epoch: String,
    /// The newest sequence number when the connection was attached: every
    /// later message reaches the connection live.
    pub top: u64,
    /// How the resume went.
    pub status: ResumeStatus,
    /// Inclusive ranges of sequence numbers after the client's position that
    /// are gone.
    pub lost: Vec<(u64, u64)>,
    /// The retained messages after the client's position, oldest first.
    pub replay: Vec<Retained>,
}

/// What a replay of a range found.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Replay {
    /// The retained messages of the range, oldest first.
    pub messages: Vec<Retained>,
    /// Inclusive ranges of the range that are not retained.
    pub lost: Vec<(u64, u64)>,
}

impl Replay {
    /// A replay of `from..=to` from an ID without an inbox: all of it lost.
    pub fn nothing_retained(from: u64, to: u64) -> Self {
        let from = from.max(1);
        Self {
            messages: Vec::new(),
            lost: if from <= to {
                vec![(from, to)]
            } else {
                Vec::new()
            },
        }
    }
}

/// One ID's inbox.
#[derive(Debug)]
pub(crate) struct IdInbox {
    /// Which inbox of its backend this is, for its epoch.
    generation: u64,
    /// The newest sequence number given out (0: none yet).
    top: u64,
    entries: VecDeque<Retained>,
    bytes: usize,
    /// v1 connections attached now; the inbox retains while there are any.
    attached: u32,
    /// When the last v1 connection ended; it retains for `ttl` after.
    detached_at: Option<Instant>,
    /// The last time it was attached, detached or written: its meta (epoch
    /// and `top`) is forgotten `meta_ttl` after.
    touched: Instant,
}

impl IdInbox {
    pub(crate) fn new(now: Instant, generation: u64) -> Self {
        Self {
            generation,
            top: 0,
            entries: VecDeque::new(),
            bytes: 0,
            attached: 0,
            detached_at: None,
            touched: now,
        }
    }

    /// Which inbox of its backend this is.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether messages to this ID are retained now.
    fn retaining(&self, now: Instant, limits: &InboxLimits) -> bool {
        self.attached > 0 || self.detached_at.is_some_and(|at| now < at + limits.ttl)
    }

    /// Numbers `envelope` for this ID and, while the ID retains and the
    /// node's budget allows, keeps it. Returns the sequence number and
    /// whether it was kept; `None` when the ID retains nothing (it has not
    /// been attached within `ttl`): such a message has no number.
    pub(crate) fn append(
        &mut self,
        envelope: &Arc<Envelope>,
        now: Instant,
        limits: &InboxLimits,
        total: &AtomicUsize,
    ) -> Option<(u64, bool)> {
        if !self.retaining(now, limits) {
            return None;
        }
        self.trim(now, limits, total);
        self.top += 1;
        self.touched = now;
        let len = envelope.payload().len();
        if len > limits.max_bytes || !reserve(total, len, limits.total_bytes) {
            // Numbered (the client sees the number and a resume reports it
            // lost), but not kept.
            return Some((self.top, false));
        }
        self.entries.push_back(Retained {
            seq: self.top,
            envelope: Arc::clone(envelope),
            at: now,
        });
        self.bytes += len;
        while self.entries.len() > limits.size || self.bytes > limits.max_bytes {
            self.pop_front(total);
        }
        Some((self.top, true))
    }

    /// Drops messages older than `ttl`.
    pub(crate) fn trim(&mut self, now: Instant, limits: &InboxLimits, total: &AtomicUsize) {
        while self
            .entries
            .front()
            .is_some_and(|e| now >= e.at + limits.ttl)
        {
            self.pop_front(total);
        }
    }

    fn pop_front(&mut self, total: &AtomicUsize) {
        if let Some(entry) = self.entries.pop_front() {
            let len = entry.envelope.payload().len();
            self.bytes -= len;
            total.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// A v1 connection of this ID starts: the inbox retains from now on.
    /// Returns what a client at `resume` has missed.
    pub(crate) fn attach(
        &mut self,
        epoch: &str,
        resume: Option<&ResumePoint>,
        now: Instant,
        limits: &InboxLimits,
        total: &AtomicUsize,
    ) -> Attached {
        self.trim(now, limits, total);
        self.attached += 1;
        self.detached_at = None;
        self.touched = now;
        let (status, lost, replay) = match resume {
            None => (ResumeStatus::New, Vec::new(), Vec::new()),
            Some(point) if point.epoch != epoch || point.seq > self.top => {
                (ResumeStatus::Reset, Vec::new(), Vec::new())
            }
            Some(point) => {
                let found = self.range(point.seq + 1, self.top);
                let status = if found.lost.is_empty() {
                    ResumeStatus::Recovered
                } else {
                    ResumeStatus::Partial
                };
                (status, found.lost, found.messages)
            }
        };
        Attached {
            epoch: epoch.to_owned(),
            top: self.top,
            status,
            lost,
            replay,
        }
    }

    /// A v1 connection of this ID ended.
    pub(crate) fn detach(&mut self, now: Instant) {
        self.attached = self.attached.saturating_sub(1);
        if self.attached == 0 {
            self.detached_at = Some(now);
        }
        self.touched = now;
    }

    /// The retained messages with seqs in `from..=to` (clamped to what was
    /// given out), and the parts of the range that are gone.
    pub(crate) fn range(&self, from: u64, to: u64) -> Replay {
        let from = from.max(1);
        let to = to.min(self.top);
        let mut replay = Replay::default();
        if from > to {
            return replay;
        }
        let mut next = from;
        for entry in self.entries.iter().filter(|e| (from..=to).contains(&e.seq)) {
            if entry.seq > next {
                replay.lost.push((next, entry.seq - 1));
            }
            replay.messages.push(entry.clone());
            next = entry.seq + 1;
        }
        if next <= to {
            replay.lost.push((next, to));
        }
        replay
    }

    /// Whether the inbox can be forgotten: nothing attached, nothing left to
    /// keep, and its meta older than `meta_ttl`.
    pub(crate) fn forgettable(&self, now: Instant, limits: &InboxLimits) -> bool {
        self.attached == 0 && self.entries.is_empty() && now >= self.touched + limits.meta_ttl
    }

    /// Frees what the budget counted when the inbox is dropped.
    pub(crate) fn release(&mut self, total: &AtomicUsize) {
        total.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        self.entries.clear();
    }
}

/// Takes `len` bytes of the node's retention budget, if they fit.
fn reserve(total: &AtomicUsize, len: usize, budget: usize) -> bool {
    total
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
            used.checked_add(len).filter(|&n| n <= budget)
        })
        .is_ok()
}

/// A random inbox epoch: 16 hex digits, different on every start of a
/// memory backend (its inboxes do not survive a restart).
pub(crate) fn new_epoch() -> String {
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:016x}",
        RandomState::new().hash_one((seed, std::process::id()))
    )
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn limits() -> InboxLimits {
        InboxLimits {
            size: 256,
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(120),
            meta_ttl: Duration::from_secs(86_400),
            total_bytes: 256 << 20,
        }
    }

    fn message(n: usize) -> Arc<Envelope> {
        Arc::new(Envelope::json(Bytes::from(n.to_string())))
    }

    fn resume(seq: u64) -> ResumePoint {
        ResumePoint {
            epoch: "e".to_owned(),
            seq,
        }
    }

    fn seqs(retained: &[Retained]) -> Vec<u64> {
        retained.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn an_unattached_id_retains_nothing() {
        let (now, total) = (Instant::now(), AtomicUsize::new(0));
        let mut inbox = IdInbox::new(now, 0);
        assert_eq!(inbox.append(&message(1), now, &limits(), &total), None);
    }

    #[test]
    fn resume_replays_what_was_missed_and_reports_what_is_gone() {
        let (now, total, l) = (Instant::now(), AtomicUsize::new(0), limits());
        let mut inbox = IdInbox::new(now, 0);
        let first = inbox.attach("e", None, now, &l, &total);
        assert_eq!((first.status, first.top), (ResumeStatus::New, 0));
        inbox.detach(now);
        for n in 0..300 {
            inbox.append(&message(n), now, &l, &total);
        }
        // 300 sent while away, 256 kept: seqs 1..=44 are gone.
        let back = inbox.attach("e", Some(&resume(0)), now, &l, &total);
        assert_eq!(back.status, ResumeStatus::Partial);
        assert_eq!(back.lost, vec![(1, 44)]);
        assert_eq!(seqs(&back.replay), (45..=300).collect::<Vec<_>>());
        // From the top: nothing missed.
        let again = inbox.attach("e", Some(&resume(300)), now, &l, &total);
        assert_eq!(
            (again.status, again.replay.len()),
            (ResumeStatus::Recovered, 0)
        );
        // Another epoch, or a position ahead of the inbox: reset.
        let other = ResumePoint {
            epoch: "x".to_owned(),
            seq: 3,
        };
        assert_eq!(
            inbox.attach("e", Some(&other), now, &l, &total).status,
            ResumeStatus::Reset
        );
        assert_eq!(
            inbox
                .attach("e", Some(&resume(301)), now, &l, &total)
                .status,
            ResumeStatus::Reset
        );
    }

    #[test]
    fn messages_expire_after_the_ttl_and_retention_ends_after_detach() {
        let (t0, total, l) = (Instant::now(), AtomicUsize::new(0), limits());
        let mut inbox = IdInbox::new(t0, 0);
        inbox.attach("e", None, t0, &l, &total);
        inbox.detach(t0);
        for n in 0..50 {
            inbox.append(&message(n), t0, &l, &total);
        }
        let later = t0 + l.ttl + Duration::from_secs(5);
        let back = inbox.attach("e", Some(&resume(0)), later, &l, &total);
        assert_eq!(back.status, ResumeStatus::Partial);
        assert_eq!(back.lost, vec![(1, 50)]);
        assert!(back.replay.is_empty());
        assert_eq!(total.load(Ordering::Relaxed), 0, "expired bytes are freed");
        inbox.detach(later);
        let much_later = later + l.ttl;
        assert_eq!(inbox.append(&message(1), much_later, &l, &total), None);
    }

    #[test]
    fn the_node_budget_numbers_but_does_not_keep() {
        let (now, total) = (Instant::now(), AtomicUsize::new(0));
        let l = InboxLimits {
            total_bytes: 3,
            ..limits()
        };
        let mut inbox = IdInbox::new(now, 0);
        inbox.attach("e", None, now, &l, &total);
        assert_eq!(inbox.append(&message(10), now, &l, &total), Some((1, true)));
        assert_eq!(
            inbox.append(&message(10), now, &l, &total),
            Some((2, false))
        );
        assert_eq!(inbox.append(&message(1), now, &l, &total), Some((3, true)));
        let replay = inbox.range(1, 3);
        assert_eq!(seqs(&replay.messages), vec![1, 3]);
        assert_eq!(replay.lost, vec![(2, 2)]);
        inbox.release(&total);
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }
}
