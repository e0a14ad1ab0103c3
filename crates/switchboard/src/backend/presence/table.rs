//! The in-memory presence of one node: each topic's members with their
//! connection counts, meta and pending leaves, and the watchers that hear
//! of changes.
//!
//! Cost: a subscribe+unsubscribe pair hashes the topic twice and the
//! client ID twice (once per call each, before the lock), whether or not
//! the topic is watched. Each topic's watchers and pending window live in
//! its entry, so a change reaches them without another lookup, and the
//! window finds a member by the ID hash already made. Callgrind
//! (tests/presence_cost.rs, 20 clients churning one topic with a full
//! watcher): presence adds 1,065 to 1,324 instructions per pair, 6.9 to
//! 8.2 % of the churn; with a SipHashed map per lookup (connection sets, members,
//! watchers, window: 10 to 12 hashes per pair) it added 2,766. The guard
//! `a_pair_hashes_the_topic_and_the_id_once_per_call` below counts the
//! hashes.
//!
//! Memory: a member costs about 75 bytes (its entry in the topic's table:
//! the ID's pointer, counters, the meta's pointer; measured as RSS growth
//! over 200,000 members by tests/presence_memory.rs; the meta itself is
//! shared with the connection that brought it); a pending leave adds a
//! timer entry of about 100 bytes until it is due. A watched topic's
//! window keeps its vectors between windows: about 60 bytes per member
//! that changed in its busiest window (the ID's pointer, its hash, its
//! last change, an index slot), until the last watcher leaves.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::timers::{Fire, Timers};
use super::watchers::{Coalescing, Watched};
use super::{
    Change, Departure, Event, PresenceMember, PresenceMode, PresenceSettings, PresenceSnapshot,
};
use crate::id::{ClientId, Topic};
use crate::runtime::mailbox::{ConnId, ConnRef};

/// Presence of one node's topics. `S` hashes topics and client IDs; tests
/// count its calls. By default foldhash, seeded at random per process and
/// per table: both come from clients, and a fixed hash would let them
/// force collisions. It is not SipHash: foldhash's authors call it
/// "minimally DoS-resistant" (an attacker who could learn the seed from
/// timing could collide keys), the trade for a quarter of SipHash's
/// instructions on a short name (callgrind: 160 instructions per SipHash,
/// four per subscribe+unsubscribe pair, a third of presence's cost).
pub(crate) struct PresenceTable<S = RandomState> {
    inner: Arc<Inner<S>>,
}

struct Inner<S> {
    me: Weak<Inner<S>>,
    /// Topics with members or watchers.
    topics: Mutex<HashTable<TopicEntry>>,
    hasher: S,
    timers: Timers<Job>,
    settings: PresenceSettings,
    coalescing: Coalescing,
    /// Revisions are drawn from one counter for all topics: a topic whose
    /// last member left is forgotten, and when it gets members again its
    /// revisions must still be above any a watcher has seen. Per topic
    /// they increase; they are not contiguous.
    revs: AtomicU64,
    /// Numbers pending leaves, so a timer fires only the leave it was for.
    tickets: AtomicU64,
}

struct TopicEntry {
    topic: Topic,
    rev: u64,
    members: HashTable<Member>,
    /// The topic's watchers and pending window; `None` while nobody
    /// watches, and then a change costs no watcher work at all.
    watched: Option<Box<Watched>>,
}

struct Member {
    id: ClientId,
    conns: u32,
    since_ms: u64,
    meta: Option<Arc<str>>,
    /// The pending leave's ticket; 0 when none.
    leaving: u64,
}

enum Job {
    Leave(Topic, ClientId, u64),
    /// Sends the topic's window, if its flush is still the one due at
    /// this time (a last watcher that left and a new one drop it).
    Flush(Topic, Instant),
}

impl PresenceTable {
    pub(crate) fn new(settings: PresenceSettings) -> Self {
        Self::with_hasher(settings, RandomState::default())
    }
}

impl<S: BuildHasher + Send + Sync + 'static> PresenceTable<S> {
    pub(crate) fn with_hasher(settings: PresenceSettings, hasher: S) -> Self {
        Self {
            inner: Arc::new_cyclic(|me| Inner {
                me: me.clone(),
                topics: Mutex::new(HashTable::new()),
                hasher,
                timers: Timers::new(),
                settings,
                coalescing: Coalescing {
                    window: settings.coalesce,
                    max_members: settings.max_members,
                },
                revs: AtomicU64::new(0),
                tickets: AtomicU64::new(1),
            }),
        }
    }

    /// A connection of `id` joined `topic` with `meta`: a join if `id` was
    /// not a member, an update if its meta changed, nothing otherwise (a
    /// pending leave is called off).
    pub(crate) fn join(&self, topic: &Topic, id: &ClientId, meta: Option<Arc<str>>) {
        let inner = &*self.inner;
        // Hashed once each, outside the lock.
        let topic_hash = inner.hasher.hash_one(topic);
        let id_hash = inner.hasher.hash_one(id);
        let mut topics = inner.topics.lock();
        let entry = inner.entry_or_new(&mut topics, topic_hash, topic);
        let rehash = |m: &Member| inner.hasher.hash_one(&m.id);
        let change = match entry.members.entry(id_hash, |m| m.id == *id, rehash) {
            Entry::Occupied(mut occupied) => {
                let member = occupied.get_mut();
                member.conns += 1;
                member.leaving = 0;
                if member.meta == meta {
                    return;
                }
                member.meta.clone_from(&meta);
                Change::Updated(meta)
            }
            Entry::Vacant(vacant) => {
                vacant.insert(Member {
                    id: id.clone(),
                    conns: 1,
                    since_ms: crate::backend::unix_ms(std::time::SystemTime::now()),
                    meta: meta.clone(),
                    leaving: 0,
                });
                Change::Joined(meta)
            }
        };
        inner.emit(entry, id, id_hash, change);
    }

    /// A connection of `id` left `topic`. If it was the member's last, the
    /// member leaves now or after the leave delay, as `departure` says.
    pub(crate) fn leave(&self, topic: &Topic, id: &ClientId, departure: Departure) {
        let inner = &*self.inner;
        let topic_hash = inner.hasher.hash_one(topic);
        let id_hash = inner.hasher.hash_one(id);
        let mut topics = inner.topics.lock();
        let Ok(mut found) = topics.find_entry(topic_hash, |e| e.topic == *topic) else {
            return;
        };
        let entry = found.get_mut();
        let Ok(mut occupied) = entry.members.find_entry(id_hash, |m| m.id == *id) else {
            return;
        };
        let member = occupied.get_mut();
        member.conns = member.conns.saturating_sub(1);
        if member.conns > 0 {
            return;
        }
        let delay = inner.settings.leave_delay;
        if departure == Departure::Delayed && !delay.is_zero() {
            let ticket = inner.tickets.fetch_add(1, Ordering::Relaxed);
            member.leaving = ticket;
            drop(topics);
            inner.timers.schedule(
                &inner.me,
                Instant::now() + delay,
                Job::Leave(topic.clone(), id.clone(), ticket),
            );
            return;
        }
        occupied.remove();
        inner.emit(entry, id, id_hash, Change::Left);
        if entry.is_unused() {
            found.remove();
        }
    }

    /// Sends `topic`'s presence frames to `conn` from now on, and returns
    /// the snapshot they follow.
    pub(crate) fn watch(
        &self,
        topic: &Topic,
        conn: &ConnRef,
        mode: PresenceMode,
    ) -> PresenceSnapshot {
        let inner = &*self.inner;
        let topic_hash = inner.hasher.hash_one(topic);
        let mut topics = inner.topics.lock();
        let entry = inner.entry_or_new(&mut topics, topic_hash, topic);
        // Under the members' lock: no change can slip between the snapshot
        // and the first frame.
        entry
            .watched
            .get_or_insert_with(Box::default)
            .add(conn, mode);
        inner.snapshot_of(Some(entry), mode)
    }

    pub(crate) fn unwatch(&self, topic: &Topic, conn: ConnId) {
        let inner = &*self.inner;
        let topic_hash = inner.hasher.hash_one(topic);
        let mut topics = inner.topics.lock();
        let Ok(mut found) = topics.find_entry(topic_hash, |e| e.topic == *topic) else {
            return;
        };
        let entry = found.get_mut();
        if let Some(watched) = &mut entry.watched
            && !watched.remove(conn)
        {
            entry.watched = None;
        }
        if entry.is_unused() {
            found.remove();
        }
    }

    /// `topic`'s presence now.
    pub(crate) fn snapshot(&self, topic: &Topic, mode: PresenceMode) -> PresenceSnapshot {
        let inner = &*self.inner;
        let topic_hash = inner.hasher.hash_one(topic);
        let topics = inner.topics.lock();
        inner.snapshot_of(topics.find(topic_hash, |e| e.topic == *topic), mode)
    }

    /// Members over all topics, topics with members, watchers and pending
    /// timers (for metrics and tests).
    pub(crate) fn stats(&self) -> (usize, usize, usize, usize) {
        let topics = self.inner.topics.lock();
        let members = topics.iter().map(|t| t.members.len()).sum();
        let with_members = topics.iter().filter(|t| !t.members.is_empty()).count();
        let watchers = topics
            .iter()
            .filter_map(|t| t.watched.as_ref())
            .map(|w| w.len())
            .sum();
        (members, with_members, watchers, self.inner.timers.len())
    }
}

impl TopicEntry {
    /// No member and no watcher: the entry can go.
    fn is_unused(&self) -> bool {
        self.members.is_empty() && self.watched.is_none()
    }
}

impl<S: BuildHasher + Send + Sync + 'static> Inner<S> {
    /// `topic`'s entry, made if it has none (the name is cloned only then).
    fn entry_or_new<'a>(
        &self,
        topics: &'a mut HashTable<TopicEntry>,
        topic_hash: u64,
        topic: &Topic,
    ) -> &'a mut TopicEntry {
        let rehash = |e: &TopicEntry| self.hasher.hash_one(&e.topic);
        match topics.entry(topic_hash, |e| e.topic == *topic, rehash) {
            Entry::Occupied(occupied) => occupied.into_mut(),
            Entry::Vacant(vacant) => vacant
                .insert(TopicEntry {
                    topic: topic.clone(),
                    // What a snapshot said while the topic had no entry,
                    // so that its first frame follows that snapshot.
                    rev: self.revs.load(Ordering::Relaxed),
                    members: HashTable::new(),
                    watched: None,
                })
                .into_mut(),
        }
    }

    fn emit(&self, entry: &mut TopicEntry, id: &ClientId, id_hash: u64, change: Change) {
        let rev = self.revs.fetch_add(1, Ordering::Relaxed) + 1;
        let prev = std::mem::replace(&mut entry.rev, rev);
        let Some(watched) = entry.watched.as_deref_mut() else {
            return;
        };
        let event = Event {
            prev,
            rev,
            id: id.clone(),
            change,
            count: entry.members.len(),
        };
        if let Some(at) = watched.record(&entry.topic, id_hash, event, self.coalescing) {
            self.timers
                .schedule(&self.me, at, Job::Flush(entry.topic.clone(), at));
        }
    }

    fn snapshot_of(&self, entry: Option<&TopicEntry>, mode: PresenceMode) -> PresenceSnapshot {
        let Some(entry) = entry else {
            return PresenceSnapshot {
                // No member: any later change has a higher revision.
                rev: self.revs.load(Ordering::Relaxed),
                count: 0,
                members: Vec::new(),
                truncated: false,
            };
        };
        let count = entry.members.len();
        let truncated = count > self.settings.max_members;
        let mut members = Vec::new();
        if mode == PresenceMode::Full && !truncated {
            members.reserve(count);
            members.extend(entry.members.iter().map(|m| PresenceMember {
                id: m.id.clone(),
                conns: m.conns,
                since_ms: m.since_ms,
                meta: m.meta.clone(),
            }));
            members.sort_by(|a, b| a.id.cmp(&b.id));
        }
        PresenceSnapshot {
            rev: entry.rev,
            count,
            members,
            truncated,
        }
    }
}

impl<S: BuildHasher + Send + Sync + 'static> Fire for Inner<S> {
    type Job = Job;

    fn timers(&self) -> &Timers<Job> {
        &self.timers
    }

    fn fire(&self, job: Job) {
        match job {
            Job::Flush(topic, at) => {
                let topic_hash = self.hasher.hash_one(&topic);
                let mut topics = self.topics.lock();
                let watched = topics
                    .find_mut(topic_hash, |e| e.topic == topic)
                    .and_then(|e| e.watched.as_deref_mut());
                if let Some(watched) = watched {
                    watched.flush_due(&topic, at, self.coalescing);
                }
            }
            Job::Leave(topic, id, ticket) => {
                let topic_hash = self.hasher.hash_one(&topic);
                let id_hash = self.hasher.hash_one(&id);
                let mut topics = self.topics.lock();
                let Ok(mut found) = topics.find_entry(topic_hash, |e| e.topic == topic) else {
                    return;
                };
                let entry = found.get_mut();
                let Ok(occupied) = entry.members.find_entry(id_hash, |m| m.id == id) else {
                    return;
                };
                let member = occupied.get();
                if member.conns != 0 || member.leaving != ticket {
                    return;
                }
                occupied.remove();
                self.emit(entry, &id, id_hash, Change::Left);
                if entry.is_unused() {
                    found.remove();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings(leave_delay: Duration) -> PresenceSettings {
        PresenceSettings {
            leave_delay,
            coalesce: Duration::from_millis(250),
            max_members: 2,
        }
    }

    fn topic() -> Topic {
        Topic::new("room").expect("topic")
    }

    fn id(s: &str) -> ClientId {
        ClientId::new(s).expect("id")
    }

    #[test]
    fn a_member_is_a_client_id_over_its_connections() {
        let table = PresenceTable::new(settings(Duration::from_secs(10)));
        table.join(&topic(), &id("a"), None);
        table.join(&topic(), &id("a"), None);
        let snap = table.snapshot(&topic(), PresenceMode::Full);
        assert_eq!(snap.count, 1);
        assert_eq!(snap.members[0].conns, 2);
        let rev = snap.rev;
        table.leave(&topic(), &id("a"), Departure::Now);
        let snap = table.snapshot(&topic(), PresenceMode::Full);
        assert_eq!((snap.count, snap.rev), (1, rev), "one of two is no leave");
        table.leave(&topic(), &id("a"), Departure::Now);
        assert_eq!(table.snapshot(&topic(), PresenceMode::Full).count, 0);
    }

    #[test]
    fn a_delayed_leave_keeps_the_member_and_a_return_changes_nothing() {
        let table = PresenceTable::new(settings(Duration::from_secs(10)));
        table.join(&topic(), &id("a"), None);
        let rev = table.snapshot(&topic(), PresenceMode::Full).rev;
        table.leave(&topic(), &id("a"), Departure::Delayed);
        let snap = table.snapshot(&topic(), PresenceMode::Full);
        assert_eq!((snap.count, snap.members[0].conns), (1, 0));
        table.join(&topic(), &id("a"), None);
        assert_eq!(table.snapshot(&topic(), PresenceMode::Full).rev, rev);
    }

    /// A `RandomState` that counts the hashes it starts.
    #[derive(Clone, Default)]
    struct Counting {
        inner: std::hash::RandomState,
        calls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl BuildHasher for Counting {
        type Hasher = <std::hash::RandomState as BuildHasher>::Hasher;

        fn build_hasher(&self) -> Self::Hasher {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.inner.build_hasher()
        }
    }

    /// The CI guard of presence's cost on subscribe churn (an operation
    /// count, not a time: tests/presence_cost.rs measures the time by
    /// hand). 20 clients churn through a topic with a watcher, as in
    /// that measurement: each pair hashes the topic once and the ID once
    /// per call, and the watcher's window hashes nothing of its own.
    #[test]
    fn a_pair_hashes_the_topic_and_the_id_once_per_call() {
        const PAIRS: usize = 1_000;
        let ids: Vec<ClientId> = (0..20).map(|i| id(&format!("c{i}"))).collect();
        for watch in [false, true] {
            let hasher = Counting::default();
            let table = PresenceTable::with_hasher(settings(Duration::ZERO), hasher.clone());
            let mailbox = crate::runtime::mailbox::Mailbox::<()>::new(1 << 20, 1 << 30, false);
            let watcher = ConnRef::new(mailbox);
            table.join(&topic(), &id("w"), None);
            if watch {
                table.watch(&topic(), &watcher, PresenceMode::Full);
            }
            hasher.calls.store(0, Ordering::Relaxed);
            for n in 0..PAIRS {
                let member = &ids[n % ids.len()];
                table.join(&topic(), member, None);
                table.leave(&topic(), member, Departure::Now);
            }
            let calls = hasher.calls.load(Ordering::Relaxed);
            // Four: topic and ID on join, topic and ID on leave. Growing
            // or cleaning a table rehashes what it holds; the members'
            // table here holds two, so that is rare.
            assert!(
                calls <= 4 * PAIRS + PAIRS / 100,
                "watched {watch}: {calls} hashes for {PAIRS} pairs (4 per pair expected)"
            );
            assert!(calls >= 4 * PAIRS, "{calls}: every call hashes");
            let (members, topics, watchers, _) = table.stats();
            assert_eq!((members, topics, watchers), (1, 1, usize::from(watch)));
        }
    }

    #[test]
    fn a_watched_topic_without_members_keeps_its_watcher_until_unwatched() {
        let table = PresenceTable::new(settings(Duration::ZERO));
        let mailbox = crate::runtime::mailbox::Mailbox::<()>::new(64, 1 << 20, false);
        let watcher = ConnRef::new(mailbox);
        let snap = table.watch(&topic(), &watcher, PresenceMode::Full);
        assert_eq!(snap.count, 0);
        table.join(&topic(), &id("a"), None);
        table.leave(&topic(), &id("a"), Departure::Now);
        assert_eq!(table.stats().2, 1, "the watcher stays with no member");
        table.unwatch(&topic(), watcher.id());
        let (members, topics, watchers, _flush_due) = table.stats();
        assert_eq!((members, topics, watchers), (0, 0, 0), "the entry is gone");
        assert!(table.inner.topics.lock().is_empty(), "no entry is left");
        let later = table.snapshot(&topic(), PresenceMode::Count);
        assert!(later.rev > snap.rev, "revisions still increase");
    }

    #[test]
    fn over_the_member_limit_only_the_count_is_given() {
        let table = PresenceTable::new(settings(Duration::ZERO));
        for name in ["a", "b", "c"] {
            table.join(&topic(), &id(name), None);
        }
        let snap = table.snapshot(&topic(), PresenceMode::Full);
        assert!(snap.truncated);
        assert_eq!(snap.count, 3);
        assert!(snap.members.is_empty());
    }
}
