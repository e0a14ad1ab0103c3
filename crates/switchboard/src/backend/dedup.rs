//! Idempotent sends: a `switchboard.v1` client may give a send a message id
//! (`mid`); a resend with the same id within `dedup_ttl` delivers nothing
//! and gets the first send's report back (docs/protocol-v1.md, "Sending,
//! and the report").
//!
//! Ids are remembered per sending client ID, at most `dedup_per_client` of
//! them (the oldest forgotten first), so one client cannot grow this store
//! without bound however fast it sends.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::id::ClientId;

/// What a send with a message id finds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dedup {
    /// First seen: go ahead, then record the report with `dedup_done`.
    New,
    /// A send with this id is being handled now.
    InFlight,
    /// Sent before: its report (the JSON of the acknowledgement's lists).
    Done(Arc<str>),
}

const SHARDS: usize = 16;

/// The ids remembered for one sender.
#[derive(Default)]
struct Sender {
    /// id → its report, once the send is done.
    ids: HashMap<Box<str>, Option<Arc<str>>>,
    /// Ids in the order they were first seen, with when.
    order: VecDeque<(Instant, Box<str>)>,
}

impl Sender {
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some((at, _)) = self.order.front()
            && now >= *at + ttl
        {
            if let Some((_, id)) = self.order.pop_front() {
                self.ids.remove(&id);
            }
        }
    }
}

/// The in-memory store.
pub(crate) struct DedupStore {
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<ClientId, Sender>>]>,
    ttl: Duration,
    per_client: usize,
}

impl DedupStore {
    pub(crate) fn new(ttl: Duration, per_client: usize) -> Self {
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            ttl,
            per_client: per_client.max(1),
        }
    }

    fn shard(&self, sender: &ClientId) -> &Mutex<HashMap<ClientId, Sender>> {
        &self.shards[(self.hasher.hash_one(sender) as usize) % SHARDS]
    }

    /// Looks `mid` up for `sender`, and marks it in flight if it is new.
    pub(crate) fn begin(&self, sender: &ClientId, mid: &str) -> Dedup {
        let now = Instant::now();
        let mut shard = self.shard(sender).lock();
        let entry = shard.entry(sender.clone()).or_default();
        entry.expire(now, self.ttl);
        match entry.ids.get(mid) {
            Some(Some(report)) => return Dedup::Done(Arc::clone(report)),
            Some(None) => return Dedup::InFlight,
            None => {}
        }
        while entry.order.len() >= self.per_client {
            if let Some((_, old)) = entry.order.pop_front() {
                entry.ids.remove(&old);
            }
        }
        entry.ids.insert(Box::from(mid), None);
        entry.order.push_back((now, Box::from(mid)));
        Dedup::New
    }

    /// Records the report of `sender`'s send `mid`.
    pub(crate) fn done(&self, sender: &ClientId, mid: &str, report: Arc<str>) {
        let mut shard = self.shard(sender).lock();
        if let Some(slot) = shard.get_mut(sender).and_then(|s| s.ids.get_mut(mid)) {
            *slot = Some(report);
        }
    }

    /// Forgets a send that did not finish (its connection ended before the
    /// report), so that a resend is not refused as in flight.
    pub(crate) fn abort(&self, sender: &ClientId, mid: &str) {
        let mut shard = self.shard(sender).lock();
        if let Some(entry) = shard.get_mut(sender)
            && matches!(entry.ids.get(mid), Some(None))
        {
            entry.ids.remove(mid);
            entry.order.retain(|(_, id)| &**id != mid);
        }
    }

    /// Drops the senders whose every id has expired.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            shard.lock().retain(|_, sender| {
                sender.expire(now, self.ttl);
                !sender.order.is_empty()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resend_gets_the_first_report() {
        let store = DedupStore::new(Duration::from_secs(120), 10);
        let alice = ClientId::new("alice").expect("id");
        assert_eq!(store.begin(&alice, "m1"), Dedup::New);
        assert_eq!(store.begin(&alice, "m1"), Dedup::InFlight);
        store.done(&alice, "m1", Arc::from("{}"));
        assert_eq!(store.begin(&alice, "m1"), Dedup::Done(Arc::from("{}")));
        // Per sender: bob's m1 is another message.
        let bob = ClientId::new("bob").expect("id");
        assert_eq!(store.begin(&bob, "m1"), Dedup::New);
        // An aborted send may be sent again.
        assert_eq!(store.begin(&alice, "m2"), Dedup::New);
        store.abort(&alice, "m2");
        assert_eq!(store.begin(&alice, "m2"), Dedup::New);
    }

    #[test]
    fn each_sender_keeps_a_bounded_number_of_ids() {
        let store = DedupStore::new(Duration::from_secs(120), 3);
        let alice = ClientId::new("alice").expect("id");
        for i in 0..10 {
            assert_eq!(store.begin(&alice, &i.to_string()), Dedup::New);
            store.done(&alice, &i.to_string(), Arc::from("r"));
        }
        // The three newest are remembered, the oldest forgotten.
        assert!(matches!(store.begin(&alice, "9"), Dedup::Done(_)));
        assert_eq!(store.begin(&alice, "0"), Dedup::New);
    }
}
