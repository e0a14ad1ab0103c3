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
#[cfg(feature = "redis")]
use std::hash::{BuildHasher as _, RandomState};
#[cfg(feature = "redis")]
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hashbrown::HashTable;
#[cfg(feature = "redis")]
use parking_lot::Mutex;
use tokio::time::Instant;

use super::frame::{self, Batch, Detail};
use super::{Change, Event, PresenceMode};
use crate::id::{ClientId, Topic};
use crate::protocol::frame::WireFrame;
use crate::runtime::mailbox::{ConnId, ConnRef};

/// How windows are cut and what their frames say.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coalescing {
    /// The shortest time between two frames of a topic.
    pub(crate) window: Duration,
    /// Above this many members, frames give the count only.
    pub(crate) max_members: usize,
}

/// Watchers and pending changes of every watched topic, by topic (the
/// Redis backend's; the in-memory table keeps a [`Watched`] in each
/// topic's entry instead, found with the members).
#[cfg(feature = "redis")]
pub(crate) struct Watchers {
    topics: Mutex<HashMap<Topic, Watched>>,
    /// How many topics are watched: while none is, a change costs one
    /// atomic load instead of a lock and a lookup (a perf profile of
    /// subscribe churn put `record` at a quarter of presence's CPU).
    watched: AtomicUsize,
    /// Hashes client IDs for the windows' indexes (keyed per process:
    /// IDs come from clients).
    hasher: RandomState,
    coalescing: Coalescing,
}

/// One topic's watchers and its changes not sent yet.
#[derive(Default)]
pub(crate) struct Watched {
    conns: HashMap<ConnId, (ConnRef, PresenceMode)>,
    window: Window,
    last_flush: Option<Instant>,
    flush_at: Option<Instant>,
}

/// Changes not sent yet. Kept between windows (emptied, not dropped) so
/// that its vectors' memory is reused: no allocation per change once the
/// topic has had a window as busy.
#[derive(Default)]
struct Window {
    /// Whether a change is pending (`prev`, `rev` and `count` valid).
    open: bool,
    prev: u64,
    rev: u64,
    count: usize,
    /// Members in the order they first changed in the window.
    touched: Vec<Touched>,
    /// Positions in `touched`, by the member's ID hash (the hash the
    /// caller already made: the in-memory table's members are found with
    /// it, so the window costs no hashing of its own there).
    index: HashTable<u32>,
}

struct Touched {
    id: ClientId,
    hash: u64,
    /// A member before the window?
    was_member: bool,
    /// Its last change in the window.
    last: Change,
}

#[cfg(feature = "redis")]
impl Watchers {
    pub(crate) fn new(coalescing: Coalescing) -> Self {
        Self {
            topics: Mutex::new(HashMap::new()),
            watched: AtomicUsize::new(0),
            hasher: RandomState::new(),
            coalescing,
        }
    }

    /// Sends `topic`'s presence frames to `conn` in `mode` from now on.
    pub(crate) fn watch(&self, topic: &Topic, conn: &ConnRef, mode: PresenceMode) {
        let mut topics = self.topics.lock();
        let watched = topics.entry(topic.clone()).or_insert_with(|| {
            self.watched.fetch_add(1, Ordering::Relaxed);
            Watched::default()
        });
        watched.add(conn, mode);
    }

    /// Stops sending to `conn`; returns whether the topic has watchers left.
    pub(crate) fn unwatch(&self, topic: &Topic, conn: ConnId) -> bool {
        let mut topics = self.topics.lock();
        let Some(watched) = topics.get_mut(topic) else {
            return false;
        };
        if watched.remove(conn) {
            return true;
        }
        topics.remove(topic);
        self.watched.fetch_sub(1, Ordering::Relaxed);
        false
    }

    /// Whether `topic` has a watcher on this node.
    pub(crate) fn is_watched(&self, topic: &Topic) -> bool {
        self.topics.lock().contains_key(topic)
    }

    /// Every watched topic.
    pub(crate) fn watched_topics(&self) -> Vec<Topic> {
        self.topics.lock().keys().cloned().collect()
    }

    /// Watchers over all topics (for metrics).
    pub(crate) fn watcher_count(&self) -> usize {
        self.topics.lock().values().map(Watched::len).sum()
    }

    /// Adds `event` to `topic`'s window; see [`Watched::record`].
    pub(crate) fn record(&self, topic: &Topic, event: Event) -> Option<Instant> {
        // Relaxed is enough: a watcher registers after its channel
        // subscription, so a change it must see is recorded after it
        // counts.
        if self.watched.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut topics = self.topics.lock();
        let watched = topics.get_mut(topic)?;
        let hash = self.hasher.hash_one(&event.id);
        watched.record(topic, hash, event, self.coalescing)
    }

    /// Sends `topic`'s pending window (its flush time has come).
    pub(crate) fn flush(&self, topic: &Topic) {
        let mut topics = self.topics.lock();
        if let Some(watched) = topics.get_mut(topic) {
            watched.flush(topic, self.coalescing);
        }
    }
}

impl Watched {
    /// Sends the topic's presence frames to `conn` in `mode` from now on.
    pub(crate) fn add(&mut self, conn: &ConnRef, mode: PresenceMode) {
        self.conns.insert(conn.id(), (conn.clone(), mode));
    }

    /// Stops sending to `conn`; returns whether watchers are left.
    pub(crate) fn remove(&mut self, conn: ConnId) -> bool {
        self.conns.remove(&conn);
        !self.conns.is_empty()
    }

    /// How many connections watch.
    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    /// Adds `event` (of the member whose ID hashes to `hash`) to the
    /// window. Sends it at once when the last frame is a window old;
    /// otherwise returns when the window must be flushed (the caller
    /// schedules [`flush`](Self::flush) then), or `None` when a flush is
    /// scheduled already.
    pub(crate) fn record(
        &mut self,
        topic: &Topic,
        hash: u64,
        event: Event,
        coalescing: Coalescing,
    ) -> Option<Instant> {
        let window = &mut self.window;
        if !window.open {
            window.open = true;
            window.prev = event.prev;
            window.rev = event.rev;
        }
        window.rev = window.rev.max(event.rev);
        window.count = event.count;
        let touched = &mut window.touched;
        match window
            .index
            .find(hash, |&at| touched[at as usize].id == event.id)
        {
            Some(&at) => touched[at as usize].last = event.change,
            None => {
                // Positions fit in u32: a window holds each member once,
                // and a topic's members are counted in u32 elsewhere too.
                let at = u32::try_from(touched.len()).unwrap_or(u32::MAX);
                window.index.insert_unique(hash, at, |&at| {
                    touched.get(at as usize).map_or(0, |t| t.hash)
                });
                touched.push(Touched {
                    was_member: !matches!(event.change, Change::Joined(_)),
                    id: event.id,
                    hash,
                    last: event.change,
                });
            }
        }
        if self.flush_at.is_some() {
            return None;
        }
        let now = Instant::now();
        match self.last_flush {
            Some(last) if now < last + coalescing.window => {
                let at = last + coalescing.window;
                self.flush_at = Some(at);
                Some(at)
            }
            _ => {
                self.send_window(topic, now, coalescing);
                None
            }
        }
    }

    /// Sends the pending window (its flush time has come).
    pub(crate) fn flush(&mut self, topic: &Topic, coalescing: Coalescing) {
        self.flush_at = None;
        self.send_window(topic, Instant::now(), coalescing);
    }

    /// Sends the pending window if its flush was the one due at `at`: a
    /// timer set for an earlier `Watched` of the topic (its last watcher
    /// left, a new one came) must not send this one's window early.
    pub(crate) fn flush_due(&mut self, topic: &Topic, at: Instant, coalescing: Coalescing) {
        if self.flush_at == Some(at) {
            self.flush(topic, coalescing);
        }
    }

    fn send_window(&mut self, topic: &Topic, now: Instant, coalescing: Coalescing) {
        let window = &mut self.window;
        if !window.open {
            return;
        }
        window.open = false;
        window.index.clear();
        self.last_flush = Some(now);
        let changes = window
            .touched
            .drain(..)
            .map(|touched| {
                let change = match touched.last {
                    Change::Left => Change::Left,
                    Change::Joined(meta) | Change::Updated(meta) if touched.was_member => {
                        Change::Updated(meta)
                    }
                    Change::Joined(meta) | Change::Updated(meta) => Change::Joined(meta),
                };
                (touched.id, change)
            })
            .collect();
        let batch = Batch {
            prev: window.prev,
            rev: window.rev,
            count: window.count,
            changes,
        };
        let over = batch.count > coalescing.max_members;
        let mut frames: [Option<WireFrame>; 3] = [None, None, None];
        for (conn, mode) in self.conns.values() {
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
