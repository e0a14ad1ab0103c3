//! The in-memory [`Backend`]: a sharded map of client IDs and a map of
//! topics, for a single node.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::time::Instant;

use super::conns::Conns;
use super::dedup::DedupStore;
use super::inbox::{IdInbox, InboxLimits, new_epoch};
use super::listing::{Page, PageBuilder, PageQuery, TopicInfo};
use super::presence::table::PresenceTable;
use super::presence::{Departure, Done, PresenceMode, PresenceSettings, PresenceSnapshot};
use super::{
    Attached, Backend, ClientInfo, Dedup, Immediate, RegisterError, Replay, ResumePoint,
    SendCounts, SendReport, TargetOutcome, TargetOutcomes,
};
use crate::BoxFuture;
use crate::id::{ClientId, Topic};
use crate::limits::{DuplicateIds, V1Limits};
use crate::protocol::close::{CloseCode, CloseFrame};
use crate::runtime::delivery::Envelope;
use crate::runtime::mailbox::{ConnId, ConnRef};

/// Shards of the client map. Each shard is a short-held mutex; 32 shards
/// keep the chance that two cores want the same lock low without making
/// a full scan (`GET /api/connections`) expensive.
const SHARDS: usize = 32;

/// How often at most one shard is swept for expired inbox messages and
/// forgettable inboxes: every shard is visited within 32 × this.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// One client ID: its live connections, oldest first, and — once a
/// `switchboard.v1` connection has used the ID — its inbox. Kept in one
/// entry so that numbering a message and queueing it to the ID's
/// connections happen under one lock: seq order is delivery order.
#[derive(Default)]
struct Entry {
    conns: Conns,
    inbox: Option<Box<IdInbox>>,
}

/// One shard: client ID → its entry.
type ClientShard = Mutex<HashMap<ClientId, Entry>>;

/// Client IDs, their inboxes and topics, in this process's memory.
///
/// IDs are hashed with a per-process random key (`RandomState`), since they
/// come from clients and a fixed hash would let them force collisions.
pub struct MemoryBackend {
    /// Where the shard hash starts: random per process.
    shard_seed: u64,
    clients: Box<[ClientShard]>,
    // Publishing reads, subscribing writes; a read-write lock lets
    // publishes to different topics run in parallel.
    topics: RwLock<HashMap<Topic, HashMap<ConnId, ConnRef>>>,
    policy: DuplicateIds,
    /// This process's inbox epoch: inboxes do not survive a restart, so
    /// every start begins a new history (a resume across it is `reset`).
    epoch: String,
    /// Inboxes created so far, so that an inbox forgotten and made again
    /// gets an epoch of its own.
    generations: AtomicU64,
    inbox_limits: InboxLimits,
    /// Payload bytes retained over all inboxes (`v1.inbox_total_bytes`).
    retained_bytes: AtomicUsize,
    dedup: DedupStore,
    /// The next shard to sweep, and when the last sweep was.
    sweep: Mutex<(usize, Instant)>,
    presence: PresenceTable,
}

impl MemoryBackend {
    /// An empty backend with the given duplicate-ID policy and the default
    /// `switchboard.v1` limits.
    pub fn new(policy: DuplicateIds) -> Self {
        Self::with_v1(policy, &V1Limits::default())
    }

    /// An empty backend with the given duplicate-ID policy and
    /// `switchboard.v1` limits.
    pub fn with_v1(policy: DuplicateIds, v1: &V1Limits) -> Self {
        Self {
            shard_seed: RandomState::new().hash_one(SHARDS),
            clients: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            topics: RwLock::new(HashMap::new()),
            policy,
            epoch: new_epoch(),
            generations: AtomicU64::new(0),
            inbox_limits: InboxLimits::from(v1),
            retained_bytes: AtomicUsize::new(0),
            dedup: DedupStore::new(v1.dedup_ttl, v1.dedup_per_client),
            sweep: Mutex::new((0, Instant::now())),
            presence: PresenceTable::new(PresenceSettings::from(v1)),
        }
    }

    /// The shard of the ID whose text is `id`: a `&ClientId` and a `&str`
    /// of the same text hash alike (see `ClientId`'s `Borrow<str>`).
    ///
    /// With FNV-1a from a per-process random start, not the maps' SipHash:
    /// a shard only spreads lock traffic (colliding IDs cost contention on
    /// one mutex, never a slower lookup: the map inside keeps SipHash), and
    /// hashing each target twice with SipHash was 4.4% of the relay's
    /// instructions (callgrind, ~300 per message); FNV-1a on a short ID
    /// costs a few dozen.
    fn shard<Q: Hash + ?Sized>(&self, id: &Q) -> &ClientShard {
        let mut hasher = ShardHasher(self.shard_seed);
        id.hash(&mut hasher);
        &self.clients[(hasher.finish() as usize) % SHARDS]
    }

    /// The epoch of an inbox of generation `generation`.
    fn epoch_of(&self, generation: u64) -> String {
        format!("{}{generation:x}", self.epoch)
    }

    /// [`Backend::send`], synchronously: the in-memory backend never waits.
    pub(crate) fn send_now(&self, targets: &[ClientId], message: &Arc<Envelope>) -> SendReport {
        let mut report = SendReport::default();
        self.send_each(targets, &mut Shared::Arc(message), &mut report);
        report
    }

    /// Queues `message` to every connection of every target (IDs, or their
    /// texts), numbering it first in the inbox of a target that has one,
    /// and records each target's outcome in `tally`.
    fn send_each<K: Borrow<str>>(
        &self,
        targets: &[K],
        message: &mut Shared<'_>,
        tally: &mut impl Tally,
    ) {
        // One clock read per send, shared by the sweep check and every
        // inbox append (two before: the sweep read its own).
        let now = Instant::now();
        self.maybe_sweep(now);
        for (i, id) in targets.iter().enumerate() {
            let id: &str = id.borrow();
            let mut shard = self.shard(id).lock();
            let Some(entry) = shard.get_mut(id) else {
                tally.offline(i);
                continue;
            };
            let numbered = entry.inbox.as_mut().and_then(|inbox| {
                inbox.append(message.arc(), now, &self.inbox_limits, &self.retained_bytes)
            });
            if matches!(numbered, Some((_, true))) {
                tally.retained(i);
            }
            let seq = numbered.map(|(seq, _)| seq);
            let mut v1 = None;
            let envelope = message.envelope();
            let queued = entry
                .conns
                .iter()
                .filter(|conn| conn.deliver(envelope, seq, &mut v1).is_ok())
                .count();
            match (queued, entry.conns.is_empty()) {
                (0, true) => tally.offline(i),
                (0, false) => tally.dropped(i),
                (n, _) => tally.delivered(i, n),
            }
        }
    }

    /// [`send_now`](Self::send_now) for a backend that numbers messages
    /// itself (Redis): queues `message` to every plain connection of every
    /// target, and hands each `switchboard.v1` connection to `v1` (with the
    /// target's index) instead, which queues it in seq order. Uses no inbox
    /// of this backend.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn send_via(
        &self,
        targets: &[ClientId],
        message: &Arc<Envelope>,
        v1: &mut dyn FnMut(usize, &ConnRef) -> Result<(), crate::runtime::mailbox::PushError>,
    ) -> SendReport {
        // No inbox here; the sweep keeps the `mid` store (used while the
        // caller cannot reach its own) from keeping expired senders.
        self.maybe_sweep(Instant::now());
        let mut report = SendReport::default();
        for (i, id) in targets.iter().enumerate() {
            let shard = self.shard(id).lock();
            let Some(entry) = shard.get(id) else {
                report.offline.push(i);
                continue;
            };
            let mut frame = None;
            let queued = entry
                .conns
                .iter()
                .filter(|conn| {
                    if conn.is_v1() {
                        v1(i, conn).is_ok()
                    } else {
                        conn.deliver(message, None, &mut frame).is_ok()
                    }
                })
                .count();
            match (queued, entry.conns.is_empty()) {
                (0, true) => report.offline.push(i),
                (0, false) => report.dropped.push(i),
                (n, _) => {
                    report.connections += n;
                    report.delivered.push(i);
                }
            }
        }
        report
    }

    /// [`Backend::publish`], synchronously.
    pub(crate) fn publish_now(&self, message: &Envelope) -> usize {
        let Some(topic) = message.topic() else {
            return 0;
        };
        let topics = self.topics.read();
        topics.get(topic).map_or(0, |subs| {
            subs.values()
                .filter(|conn| conn.deliver(message, None, &mut None).is_ok())
                .count()
        })
    }

    /// [`Backend::attach`], synchronously.
    pub(crate) fn attach_now(
        &self,
        id: &ClientId,
        conn: &ConnRef,
        resume: Option<&ResumePoint>,
    ) -> Result<Attached, RegisterError> {
        let now = Instant::now();
        let mut shard = self.shard(id).lock();
        let entry = shard.entry(id.clone()).or_default();
        self.admit(id, &mut entry.conns)?;
        let inbox = entry.inbox.get_or_insert_with(|| {
            let generation = self.generations.fetch_add(1, Ordering::Relaxed);
            Box::new(IdInbox::new(now, generation))
        });
        let epoch = self.epoch_of(inbox.generation());
        let attached = inbox.attach(
            &epoch,
            resume,
            now,
            &self.inbox_limits,
            &self.retained_bytes,
        );
        entry.conns.push(conn.clone());
        Ok(attached)
    }

    /// [`Backend::replay`], synchronously.
    pub(crate) fn replay_now(&self, id: &ClientId, from: u64, to: u64) -> Replay {
        let shard = self.shard(id).lock();
        match shard.get(id).and_then(|entry| entry.inbox.as_ref()) {
            Some(inbox) => inbox.range(from, to),
            None => Replay::nothing_retained(from, to),
        }
    }

    /// The duplicate-ID policy, for a connection about to join `conns`.
    fn admit(&self, id: &ClientId, conns: &mut Conns) -> Result<(), RegisterError> {
        match self.policy {
            DuplicateIds::Allow => {}
            DuplicateIds::RejectNew if !conns.is_empty() => {
                return Err(RegisterError::AlreadyConnected(id.clone()));
            }
            DuplicateIds::RejectNew => {}
            DuplicateIds::ReplaceOldest => {
                // Oldest first: connections are appended in order.
                if let Some(oldest) = conns.remove(0) {
                    oldest.close(CloseFrame::new(
                        CloseCode::REPLACED,
                        "replaced by a newer connection with the same client id",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sweeps one shard, if the last sweep was `SWEEP_EVERY` ago: drops
    /// inbox messages past their TTL (giving their bytes back to the node's
    /// budget) and forgets inboxes whose meta has expired. Done on the
    /// sending path rather than by a task of its own, so that an idle
    /// backend costs nothing; one shard at a time keeps each pass short.
    /// `now` is the caller's clock read (a send reads the clock once).
    fn maybe_sweep(&self, now: Instant) {
        let shard = {
            let Some(mut sweep) = self.sweep.try_lock() else {
                return;
            };
            if now < sweep.1 + SWEEP_EVERY {
                return;
            }
            sweep.1 = now;
            sweep.0 = (sweep.0 + 1) % SHARDS;
            sweep.0
        };
        self.clients[shard].lock().retain(|_, entry| {
            if let Some(inbox) = entry.inbox.as_mut() {
                inbox.trim(now, &self.inbox_limits, &self.retained_bytes);
                if inbox.forgettable(now, &self.inbox_limits) {
                    inbox.release(&self.retained_bytes);
                    entry.inbox = None;
                }
            }
            !entry.conns.is_empty() || entry.inbox.is_some()
        });
        if shard == 0 {
            self.dedup.sweep();
        }
    }

    /// Payload bytes retained in inboxes now.
    pub fn retained_bytes(&self) -> usize {
        self.retained_bytes.load(Ordering::Relaxed)
    }

    /// [`Backend::clients`], synchronously.
    pub(crate) fn clients_now(&self) -> Vec<ClientInfo> {
        let mut out = Vec::new();
        for shard in self.clients.iter() {
            for (id, entry) in shard.lock().iter() {
                let conns = &entry.conns;
                if conns.is_empty() {
                    continue;
                }
                let oldest = conns.iter().map(ConnRef::since).min();
                out.push(ClientInfo {
                    id: id.clone(),
                    connections: conns.len(),
                    connected_since_unix_ms: oldest.map_or(0, crate::backend::unix_ms),
                });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// [`Backend::disconnect`], synchronously.
    pub(crate) fn disconnect_now(&self, id: &ClientId, frame: &CloseFrame) -> usize {
        // Closing is asynchronous: each connection unregisters itself when
        // its task ends, so the entry is left for that path to remove.
        let conns: Vec<ConnRef> = self
            .shard(id)
            .lock()
            .get(id)
            .map(|entry| entry.conns.to_vec())
            .unwrap_or_default();
        for conn in &conns {
            conn.close(frame.clone());
        }
        conns.len()
    }

    /// The duplicate-ID policy this backend applies.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn duplicate_ids(&self) -> DuplicateIds {
        self.policy
    }

    /// The connections of `id` on this node.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn connections_of(&self, id: &ClientId) -> Vec<ConnId> {
        self.shard(id)
            .lock()
            .get(id)
            .map(|entry| entry.conns.iter().map(ConnRef::id).collect())
            .unwrap_or_default()
    }

    /// Closes the connections of `id` for which `close` says yes, with
    /// `frame`; returns how many.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn disconnect_where(
        &self,
        id: &ClientId,
        frame: &CloseFrame,
        mut close: impl FnMut(ConnId) -> bool,
    ) -> usize {
        let conns: Vec<ConnRef> = self
            .shard(id)
            .lock()
            .get(id)
            .map(|entry| {
                entry
                    .conns
                    .iter()
                    .filter(|conn| close(conn.id()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for conn in &conns {
            conn.close(frame.clone());
        }
        conns.len()
    }

    /// `id`'s connections on this node and when the oldest was accepted
    /// (Unix ms), or `None` when it has none.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn presence(&self, id: &ClientId) -> Option<(usize, u64)> {
        let shard = self.shard(id).lock();
        let conns = shard.get(id).map(|e| &e.conns).filter(|c| !c.is_empty())?;
        let oldest = conns.iter().map(ConnRef::since).min();
        Some((conns.len(), oldest.map_or(0, crate::backend::unix_ms)))
    }

    /// Whether `topic` has a subscriber on this node.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn has_topic(&self, topic: &Topic) -> bool {
        self.topics.read().contains_key(topic)
    }

    /// Every topic with a subscriber on this node.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn topic_names(&self) -> Vec<Topic> {
        self.topics.read().keys().cloned().collect()
    }

    /// How many client IDs are registered (for tests and metrics).
    pub fn client_count(&self) -> usize {
        self.clients
            .iter()
            .map(|s| s.lock().values().filter(|e| !e.conns.is_empty()).count())
            .sum()
    }

    /// How many topics have at least one subscriber.
    pub fn topic_count(&self) -> usize {
        self.topics.read().len()
    }

    /// [`Backend::client_page`] for this node: one pass over the shards,
    /// keeping only the page's entries (see [`PageBuilder`]).
    pub(crate) fn client_page_now(&self, query: &PageQuery) -> Page<ClientInfo> {
        let mut page = PageBuilder::new(query);
        for shard in self.clients.iter() {
            for (id, entry) in shard.lock().iter() {
                let conns = &entry.conns;
                if conns.is_empty() {
                    continue;
                }
                page.offer(id.as_str(), || ClientInfo {
                    id: id.clone(),
                    connections: conns.len(),
                    connected_since_unix_ms: conns
                        .iter()
                        .map(ConnRef::since)
                        .min()
                        .map_or(0, crate::backend::unix_ms),
                });
            }
        }
        page.finish()
    }

    /// [`Backend::topic_page`]: one pass over the topics, under the read
    /// lock (publishes go on meanwhile).
    pub(crate) fn topic_page_now(&self, query: &PageQuery) -> Page<TopicInfo> {
        let mut page = PageBuilder::new(query);
        for (topic, subs) in self.topics.read().iter() {
            page.offer(topic.as_str(), || TopicInfo {
                topic: topic.clone(),
                subscribers: subs.len(),
            });
        }
        page.finish()
    }

    /// Presence members over all topics, counting those whose leave is
    /// pending.
    pub fn presence_members(&self) -> usize {
        self.presence.stats().0
    }
}

impl Immediate for MemoryBackend {
    fn send_counted(&self, targets: &[&str], message: &Envelope) -> SendCounts {
        let mut counts = SendCounts::default();
        self.send_each(targets, &mut Shared::Lazy(message, None), &mut counts);
        counts
    }

    fn publish_counted(&self, message: &Envelope) -> usize {
        self.publish_now(message)
    }

    fn send_outcomes(&self, targets: &[&str], message: &Arc<Envelope>) -> TargetOutcomes {
        let mut outcomes = TargetOutcomes::new(targets.len());
        self.send_each(targets, &mut Shared::Arc(message), &mut outcomes);
        outcomes
    }

    fn dedup_now(&self, sender: &ClientId, mid: &str) -> Dedup {
        self.dedup.begin(sender, mid)
    }
}

/// FNV-1a (64-bit), for picking a shard; see `MemoryBackend::shard`.
struct ShardHasher(u64);

impl Hasher for ShardHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        // FNV's low bits mix least: fold the high half in before `% SHARDS`.
        self.0 ^ (self.0 >> 32)
    }
}

/// The message of a send, as an inbox keeps it: an `Arc`. The relay's
/// immediate path has the envelope on its stack and makes the `Arc` only
/// when a target has an inbox (a `switchboard.v1` ID): one allocation per
/// message saved on the plain relay.
enum Shared<'a> {
    Arc(&'a Arc<Envelope>),
    Lazy(&'a Envelope, Option<Arc<Envelope>>),
}

impl Shared<'_> {
    fn envelope(&self) -> &Envelope {
        match self {
            Self::Arc(arc) => arc,
            Self::Lazy(envelope, _) => envelope,
        }
    }

    fn arc(&mut self) -> &Arc<Envelope> {
        match self {
            Self::Arc(arc) => arc,
            Self::Lazy(envelope, arc) => arc.get_or_insert_with(|| Arc::new(envelope.duplicate())),
        }
    }
}

/// Where a send records each target's outcome: a full [`SendReport`],
/// [`TargetOutcomes`] for a v1 sender's ack, or [`SendCounts`] for a
/// sender that reads no lists.
trait Tally {
    fn offline(&mut self, target: usize);
    fn dropped(&mut self, target: usize);
    fn delivered(&mut self, target: usize, connections: usize);
    fn retained(&mut self, target: usize);
}

impl Tally for SendReport {
    fn offline(&mut self, target: usize) {
        self.offline.push(target);
    }
    fn dropped(&mut self, target: usize) {
        self.dropped.push(target);
    }
    fn delivered(&mut self, target: usize, connections: usize) {
        self.connections += connections;
        self.delivered.push(target);
    }
    fn retained(&mut self, target: usize) {
        self.retained.push(target);
    }
}

impl Tally for TargetOutcomes {
    fn offline(&mut self, target: usize) {
        self.set(target, TargetOutcome::Offline);
    }
    fn dropped(&mut self, target: usize) {
        self.set(target, TargetOutcome::Dropped);
    }
    fn delivered(&mut self, target: usize, connections: usize) {
        self.add_connections(connections);
        self.set(target, TargetOutcome::Delivered);
    }
    fn retained(&mut self, target: usize) {
        self.set_retained(target);
    }
}

impl Tally for SendCounts {
    fn offline(&mut self, _: usize) {
        self.offline += 1;
    }
    fn dropped(&mut self, _: usize) {
        self.dropped += 1;
    }
    fn delivered(&mut self, _: usize, connections: usize) {
        self.connections += connections;
        self.delivered += 1;
    }
    fn retained(&mut self, _: usize) {}
}

impl Backend for MemoryBackend {
    fn register(&self, id: &ClientId, conn: &ConnRef) -> Result<(), RegisterError> {
        let mut shard = self.shard(id).lock();
        let entry = shard.entry(id.clone()).or_default();
        self.admit(id, &mut entry.conns)?;
        entry.conns.push(conn.clone());
        Ok(())
    }

    fn unregister(&self, id: &ClientId, conn: ConnId) {
        let mut shard = self.shard(id).lock();
        let Some(entry) = shard.get_mut(id) else {
            return;
        };
        if let Some(at) = entry.conns.iter().position(|c| c.id() == conn)
            && let Some(gone) = entry.conns.remove(at)
            && gone.is_v1()
            && let Some(inbox) = entry.inbox.as_mut()
        {
            inbox.detach(Instant::now());
        }
        if entry.conns.is_empty() && entry.inbox.is_none() {
            shard.remove(id);
        }
    }

    fn subscribe(&self, topic: &Topic, conn: &ConnRef) {
        self.topics
            .write()
            .entry(topic.clone())
            .or_default()
            .insert(conn.id(), conn.clone());
    }

    fn unsubscribe(&self, topic: &Topic, conn: ConnId) {
        let mut topics = self.topics.write();
        if let Some(subs) = topics.get_mut(topic) {
            subs.remove(&conn);
            if subs.is_empty() {
                topics.remove(topic);
            }
        }
    }

    fn send<'a>(
        &'a self,
        targets: &'a [ClientId],
        message: &'a Arc<Envelope>,
    ) -> BoxFuture<'a, SendReport> {
        Box::pin(std::future::ready(self.send_now(targets, message)))
    }

    fn immediate(&self) -> Option<&dyn Immediate> {
        Some(self)
    }

    fn publish<'a>(&'a self, topic: &'a Topic, message: &'a Arc<Envelope>) -> BoxFuture<'a, usize> {
        debug_assert_eq!(message.topic(), Some(topic));
        Box::pin(std::future::ready(self.publish_now(message)))
    }

    fn clients(&self) -> BoxFuture<'_, Vec<ClientInfo>> {
        Box::pin(std::future::ready(self.clients_now()))
    }

    fn disconnect<'a>(&'a self, id: &'a ClientId, frame: CloseFrame) -> BoxFuture<'a, usize> {
        Box::pin(std::future::ready(self.disconnect_now(id, &frame)))
    }

    fn client_page<'a>(&'a self, query: &'a PageQuery) -> BoxFuture<'a, Page<ClientInfo>> {
        Box::pin(std::future::ready(self.client_page_now(query)))
    }

    fn topic_page<'a>(&'a self, query: &'a PageQuery) -> BoxFuture<'a, Page<TopicInfo>> {
        Box::pin(std::future::ready(self.topic_page_now(query)))
    }

    fn attach<'a>(
        &'a self,
        id: &'a ClientId,
        conn: &'a ConnRef,
        resume: Option<&'a ResumePoint>,
    ) -> BoxFuture<'a, Result<Attached, RegisterError>> {
        Box::pin(std::future::ready(self.attach_now(id, conn, resume)))
    }

    fn replay<'a>(&'a self, id: &'a ClientId, from: u64, to: u64) -> BoxFuture<'a, Replay> {
        Box::pin(std::future::ready(self.replay_now(id, from, to)))
    }

    fn dedup<'a>(&'a self, sender: &'a ClientId, mid: &'a str) -> BoxFuture<'a, Dedup> {
        Box::pin(std::future::ready(self.dedup_now(sender, mid)))
    }

    fn dedup_done(&self, sender: &ClientId, mid: &str, report: Arc<str>) {
        self.dedup.done(sender, mid, report);
    }

    fn dedup_abort(&self, sender: &ClientId, mid: &str) {
        self.dedup.abort(sender, mid);
    }

    fn presence_join<'a>(
        &'a self,
        topic: &'a Topic,
        member: &'a ClientId,
        meta: Option<Arc<str>>,
    ) -> BoxFuture<'a, ()> {
        self.presence.join(topic, member, meta);
        Box::pin(Done)
    }

    fn presence_leave(&self, topic: &Topic, member: &ClientId, departure: Departure) {
        self.presence.leave(topic, member, departure);
    }

    fn presence_watch<'a>(
        &'a self,
        topic: &'a Topic,
        watcher: &'a ConnRef,
        mode: PresenceMode,
    ) -> BoxFuture<'a, Option<PresenceSnapshot>> {
        Box::pin(std::future::ready(Some(
            self.presence.watch(topic, watcher, mode),
        )))
    }

    fn presence_unwatch(&self, topic: &Topic, watcher: ConnId) {
        self.presence.unwatch(topic, watcher);
    }

    fn presence<'a>(
        &'a self,
        topic: &'a Topic,
        mode: PresenceMode,
    ) -> BoxFuture<'a, Option<PresenceSnapshot>> {
        Box::pin(std::future::ready(Some(
            self.presence.snapshot(topic, mode),
        )))
    }

    fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP switchboard_inbox_retained_bytes Payload bytes kept in switchboard.v1 inboxes.\n# TYPE switchboard_inbox_retained_bytes gauge\nswitchboard_inbox_retained_bytes {}",
            self.retained_bytes()
        );
        let (members, topics, watchers, timers) = self.presence.stats();
        let _ = writeln!(
            out,
            "# HELP switchboard_presence_members Presence members over all topics (pending leaves included).\n# TYPE switchboard_presence_members gauge\nswitchboard_presence_members {members}\n# HELP switchboard_presence_topics Topics with presence members.\n# TYPE switchboard_presence_topics gauge\nswitchboard_presence_topics {topics}\n# HELP switchboard_presence_watchers Connections watching a topic's presence.\n# TYPE switchboard_presence_watchers gauge\nswitchboard_presence_watchers {watchers}\n# HELP switchboard_presence_timers Pending presence leaves and frame flushes.\n# TYPE switchboard_presence_timers gauge\nswitchboard_presence_timers {timers}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shard hash spreads the IDs clients typically pick (numbers, and
    /// names that differ in their last character) over every shard, and an
    /// ID and its text land in the same one.
    #[test]
    fn shards_spread_ids_and_ids_find_their_text() {
        let backend = MemoryBackend::new(DuplicateIds::Allow);
        let index = |shard: &ClientShard| {
            backend
                .clients
                .iter()
                .position(|s| std::ptr::eq(s, shard))
                .expect("one of the shards")
        };
        for ids in [
            (0..3200).map(|n| n.to_string()).collect::<Vec<_>>(),
            (0..3200).map(|n| format!("user-{n}")).collect(),
        ] {
            let mut per_shard = [0usize; SHARDS];
            for id in &ids {
                let client = ClientId::new(id).expect("valid");
                let shard = index(backend.shard(&client));
                assert_eq!(shard, index(backend.shard(id.as_str())), "{id}");
                per_shard[shard] += 1;
            }
            // 100 per shard on average.
            assert!(
                per_shard.iter().all(|&n| (40..=200).contains(&n)),
                "{per_shard:?}"
            );
        }
    }
}
