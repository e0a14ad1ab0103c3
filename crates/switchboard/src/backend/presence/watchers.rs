//! The connections watching each topic's presence, and the coalescing of
//! membership changes into at most one `presence` frame per topic per
//! `presence_coalesce` window. Shared by the in-memory table (changes made
//! here) and the Redis backend (changes read from the topic's presence
//! channel).
//!
//! Every watcher of a topic gets the same frames, so "one frame per topic
//! per window" holds for each of them. The first change after a quiet
//! window is sent at once; later ones wait for the window's end and go out
//! together, each member once with its state at the frame's `rev`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::frame::{self, Batch, Detail};
use super::{Change, Event, PresenceMode};
use crate::id::{ClientId, Topic};
use crate::protocol::frame::WireFrame;
use crate::runtime::mailbox::{ConnId, ConnRef};

/// Watchers and pending changes of every watched topic.
pub(crate) struct Watchers {
    topics: Mutex<HashMap<Topic, Watched>>,
    /// How many topics are watched: while none is, a change costs one
    /// atomic load instead of a lock and a lookup (a perf profile of
    /// subscribe churn put `record` at a quarter of presence's CPU).
    watched: AtomicUsize,
    coalesce: Duration,
    max_members: usize,
}

#[derive(Default)]
struct Watched {
    conns: HashMap<ConnId, (ConnRef, PresenceMode)>,
    window: Option<Window>,
    last_flush: Option<Instant>,
    flush_at: Option<Instant>,
}

/// Changes not sent yet.
struct Window {
    prev: u64,
    rev: u64,
    count: usize,
    /// Members in the order they first changed, with whether each was a
    /// member before the window and its last change.
    touched: Vec<(ClientId, bool, Change)>,
    /// Where each member is in `touched`, once it holds more than
    /// `SCAN_TOUCHED` (below that a scan is cheaper than hashing the ID).
    index: HashMap<ClientId, usize>,
}

/// Members a window finds by scanning rather than by its index. Hashing a
/// client ID (SipHash) costs about as much as comparing 16 short IDs; a
/// window of subscribe churn usually touches fewer members (callgrind,
/// tests/presence_cost.rs: `record` 543 instructions per change).
const SCAN_TOUCHED: usize = 16;

impl Watchers {
    pub(crate) fn new(coalesce: Duration, max_members: usize) -> Self {
        Self {
            topics: Mutex::new(HashMap::new()),
            watched: AtomicUsize::new(0),
            coalesce,
            max_members,
        }
    }

    /// Sends `topic`'s presence frames to `conn` in `mode` from now on.
    pub(crate) fn watch(&self, topic: &Topic, conn: &ConnRef, mode: PresenceMode) {
        let mut topics = self.topics.lock();
        let watched = topics.entry(topic.clone()).or_insert_with(|| {
            self.watched.fetch_add(1, Ordering::Relaxed);
            Watched::default()
        });
        watched.conns.insert(conn.id(), (conn.clone(), mode));
    }

    /// Stops sending to `conn`; returns whether the topic has watchers left.
    pub(crate) fn unwatch(&self, topic: &Topic, conn: ConnId) -> bool {
        let mut topics = self.topics.lock();
        let Some(watched) = topics.get_mut(topic) else {
            return false;
        };
        watched.conns.remove(&conn);
        if watched.conns.is_empty() {
            topics.remove(topic);
            self.watched.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Whether `topic` has a watcher on this node.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn is_watched(&self, topic: &Topic) -> bool {
        self.topics.lock().contains_key(topic)
    }

    /// Every watched topic.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn watched_topics(&self) -> Vec<Topic> {
        self.topics.lock().keys().cloned().collect()
    }

    /// Watchers over all topics (for metrics).
    pub(crate) fn watcher_count(&self) -> usize {
        self.topics.lock().values().map(|w| w.conns.len()).sum()
    }

    /// Adds `event` to `topic`'s window. Sends it at once when the last
    /// frame is a window old; otherwise returns when the window must be
    /// flushed (the caller schedules [`flush`](Self::flush) then), or
    /// `None` when a flush is scheduled already or nobody watches.
    pub(crate) fn record(&self, topic: &Topic, event: Event) -> Option<Instant> {
        // Relaxed is enough: a watcher registers under the caller's
        // membership lock (memory) or after its channel subscription
        // (Redis), so a change it must see is recorded after it counts.
        if self.watched.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut topics = self.topics.lock();
        let watched = topics.get_mut(topic)?;
        let window = watched.window.get_or_insert_with(|| Window {
            prev: event.prev,
            rev: event.rev,
            count: event.count,
            touched: Vec::new(),
            index: HashMap::new(),
        });
        window.rev = window.rev.max(event.rev);
        window.count = event.count;
        let found = if window.touched.len() <= SCAN_TOUCHED {
            window.touched.iter().position(|(id, _, _)| *id == event.id)
        } else {
            if window.index.is_empty() {
                let ids = window.touched.iter().map(|(id, _, _)| id.clone());
                window.index.extend(ids.zip(0..));
            }
            window.index.get(&event.id).copied()
        };
        match found {
            Some(at) => window.touched[at].2 = event.change,
            None => {
                let was_member = !matches!(event.change, Change::Joined(_));
                if !window.index.is_empty() {
                    window.index.insert(event.id.clone(), window.touched.len());
                }
                window.touched.push((event.id, was_member, event.change));
            }
        }
        if watched.flush_at.is_some() {
            return None;
        }
        let now = Instant::now();
        match watched.last_flush {
            Some(last) if now < last + self.coalesce => {
                let at = last + self.coalesce;
                watched.flush_at = Some(at);
                Some(at)
            }
            _ => {
                self.send_window(topic, watched, now);
                None
            }
        }
    }

    /// Sends `topic`'s pending window (its flush time has come).
    pub(crate) fn flush(&self, topic: &Topic) {
        let mut topics = self.topics.lock();
        if let Some(watched) = topics.get_mut(topic) {
            watched.flush_at = None;
            self.send_window(topic, watched, Instant::now());
        }
    }

    fn send_window(&self, topic: &Topic, watched: &mut Watched, now: Instant) {
        let Some(window) = watched.window.take() else {
            return;
        };
        watched.last_flush = Some(now);
        let changes = window
            .touched
            .into_iter()
            .map(|(id, was_member, last)| {
                let change = match last {
                    Change::Left => Change::Left,
                    Change::Joined(meta) | Change::Updated(meta) if was_member => {
                        Change::Updated(meta)
                    }
                    Change::Joined(meta) | Change::Updated(meta) => Change::Joined(meta),
                };
                (id, change)
            })
            .collect();
        let batch = Batch {
            prev: window.prev,
            rev: window.rev,
            count: window.count,
            changes,
        };
        let over = batch.count > self.max_members;
        let mut frames: [Option<WireFrame>; 3] = [None, None, None];
        for (conn, mode) in watched.conns.values() {
            let detail = match mode {
                PresenceMode::Count => Detail::Count,
                PresenceMode::Full if over => Detail::Truncated,
                PresenceMode::Full => Detail::Members,
            };
            let slot = &mut frames[detail as usize];
            let frame = slot
                .get_or_insert_with(|| WireFrame::from_text(frame::event(topic, &batch, detail)))
                .clone();
            // A watcher whose queue is full misses this frame; the next one
            // it gets has a `prev` above its revision, and it asks for a
            // snapshot (and under the `close` policy it is closed anyway).
            let _ = conn.push(frame);
        }
    }
}
