//! The in-memory presence of one node: each topic's members with their
//! connection counts, meta and pending leaves, and the watchers that hear
//! of changes.
//!
//! Memory: a member costs about 75 bytes (its entry in the topic's map:
//! the ID's pointer, counters, the meta's pointer; measured as RSS growth
//! over 200,000 members by tests/presence_memory.rs; the meta itself is
//! shared with the connection that brought it); a pending leave adds a
//! timer entry of about 100 bytes until it is due.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MemberEntry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::time::Instant;

use super::timers::{Fire, Timers};
use super::watchers::Watchers;
use super::{
    Change, Departure, Event, PresenceMember, PresenceMode, PresenceSettings, PresenceSnapshot,
};
use crate::id::{ClientId, Topic};
use crate::runtime::mailbox::{ConnId, ConnRef};

/// Presence of one node's topics.
pub(crate) struct PresenceTable {
    inner: Arc<Inner>,
}

struct Inner {
    me: Weak<Inner>,
    topics: Mutex<HashMap<Topic, Members>>,
    watchers: Watchers,
    timers: Timers<Job>,
    settings: PresenceSettings,
    /// Revisions are drawn from one counter for all topics: a topic whose
    /// last member left is forgotten, and when it gets members again its
    /// revisions must still be above any a watcher has seen. Per topic
    /// they increase; they are not contiguous.
    revs: AtomicU64,
    /// Numbers pending leaves, so a timer fires only the leave it was for.
    tickets: AtomicU64,
}

#[derive(Default)]
struct Members {
    rev: u64,
    members: HashMap<ClientId, Member>,
}

struct Member {
    conns: u32,
    since_ms: u64,
    meta: Option<Arc<str>>,
    /// The pending leave's ticket; 0 when none.
    leaving: u64,
}

enum Job {
    Leave(Topic, ClientId, u64),
    Flush(Topic),
}

impl PresenceTable {
    pub(crate) fn new(settings: PresenceSettings) -> Self {
        Self {
            inner: Arc::new_cyclic(|me| Inner {
                me: me.clone(),
                topics: Mutex::new(HashMap::new()),
                watchers: Watchers::new(settings.coalesce, settings.max_members),
                timers: Timers::new(),
                settings,
                revs: AtomicU64::new(0),
                tickets: AtomicU64::new(1),
            }),
        }
    }

    /// A connection of `id` joined `topic` with `meta`: a join if `id` was
    /// not a member, an update if its meta changed, nothing otherwise (a
    /// pending leave is called off).
    pub(crate) fn join(&self, topic: &Topic, id: &ClientId, meta: Option<Arc<str>>) {
        let inner = &self.inner;
        let mut topics = inner.topics.lock();
        // Looked up before it is made: the topic usually exists, and its
        // name then is not cloned.
        let entry = match topics.get_mut(topic) {
            Some(entry) => entry,
            None => topics.entry(topic.clone()).or_default(),
        };
        // One lookup for both cases (the ID is hashed once).
        let change = match entry.members.entry(id.clone()) {
            MemberEntry::Occupied(mut occupied) => {
                let member = occupied.get_mut();
                member.conns += 1;
                member.leaving = 0;
                if member.meta == meta {
                    return;
                }
                member.meta.clone_from(&meta);
                Change::Updated(meta)
            }
            MemberEntry::Vacant(vacant) => {
                vacant.insert(Member {
                    conns: 1,
                    since_ms: crate::backend::unix_ms(std::time::SystemTime::now()),
                    meta: meta.clone(),
                    leaving: 0,
                });
                Change::Joined(meta)
            }
        };
        inner.emit(topic, entry, id, change);
    }

    /// A connection of `id` left `topic`. If it was the member's last, the
    /// member leaves now or after the leave delay, as `departure` says.
    pub(crate) fn leave(&self, topic: &Topic, id: &ClientId, departure: Departure) {
        let inner = &self.inner;
        let mut topics = inner.topics.lock();
        let Some(entry) = topics.get_mut(topic) else {
            return;
        };
        let MemberEntry::Occupied(mut occupied) = entry.members.entry(id.clone()) else {
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
        // The entry in hand, not looked up again (`Inner::remove`): an
        // unsubscribe is half of all churn.
        occupied.remove();
        inner.emit(topic, entry, id, Change::Left);
        if entry.members.is_empty() {
            topics.remove(topic);
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
        let topics = self.inner.topics.lock();
        // Under the members' lock: no change can slip between the snapshot
        // and the first frame.
        self.inner.watchers.watch(topic, conn, mode);
        self.inner.snapshot_of(topics.get(topic), mode)
    }

    pub(crate) fn unwatch(&self, topic: &Topic, conn: ConnId) {
        self.inner.watchers.unwatch(topic, conn);
    }

    /// `topic`'s presence now.
    pub(crate) fn snapshot(&self, topic: &Topic, mode: PresenceMode) -> PresenceSnapshot {
        let topics = self.inner.topics.lock();
        self.inner.snapshot_of(topics.get(topic), mode)
    }

    /// Members over all topics, topics with members, watchers and pending
    /// timers (for metrics and tests).
    pub(crate) fn stats(&self) -> (usize, usize, usize, usize) {
        let topics = self.inner.topics.lock();
        let members = topics.values().map(|t| t.members.len()).sum();
        (
            members,
            topics.len(),
            self.inner.watchers.watcher_count(),
            self.inner.timers.len(),
        )
    }
}

impl Inner {
    fn emit(&self, topic: &Topic, entry: &mut Members, id: &ClientId, change: Change) {
        let rev = self.revs.fetch_add(1, Ordering::Relaxed) + 1;
        let event = Event {
            prev: entry.rev,
            rev,
            id: id.clone(),
            change,
            count: entry.members.len(),
        };
        entry.rev = rev;
        if let Some(at) = self.watchers.record(topic, event) {
            self.timers
                .schedule(&self.me, at, Job::Flush(topic.clone()));
        }
    }

    fn remove(&self, topics: &mut HashMap<Topic, Members>, topic: &Topic, id: &ClientId) {
        let Some(entry) = topics.get_mut(topic) else {
            return;
        };
        if entry.members.remove(id).is_none() {
            return;
        }
        self.emit(topic, entry, id, Change::Left);
        if entry.members.is_empty() {
            topics.remove(topic);
        }
    }

    fn snapshot_of(&self, entry: Option<&Members>, mode: PresenceMode) -> PresenceSnapshot {
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
            members.extend(entry.members.iter().map(|(id, m)| PresenceMember {
                id: id.clone(),
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

impl Fire for Inner {
    type Job = Job;

    fn timers(&self) -> &Timers<Job> {
        &self.timers
    }

    fn fire(&self, job: Job) {
        match job {
            Job::Flush(topic) => self.watchers.flush(&topic),
            Job::Leave(topic, id, ticket) => {
                let mut topics = self.topics.lock();
                let still_pending = topics
                    .get(&topic)
                    .and_then(|entry| entry.members.get(&id))
                    .is_some_and(|m| m.conns == 0 && m.leaving == ticket);
                if still_pending {
                    self.remove(&mut topics, &topic, &id);
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
