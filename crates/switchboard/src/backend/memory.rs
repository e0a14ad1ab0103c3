//! The in-memory [`Backend`]: a sharded map of client IDs and a map of
//! topics, for a single node.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use parking_lot::{Mutex, RwLock};

use super::{Backend, ClientInfo, RegisterError, SendReport};
use crate::BoxFuture;
use crate::id::{ClientId, Topic};
use crate::limits::DuplicateIds;
use crate::protocol::close::{CloseCode, CloseFrame};
use crate::protocol::frame::WireFrame;
use crate::runtime::mailbox::{ConnId, ConnRef, PushError};

/// Shards of the client map. Each shard is a short-held mutex; 32 shards
/// keep the chance that two cores want the same lock low without making
/// a full scan (`GET /api/connections`) expensive.
const SHARDS: usize = 32;

/// One shard: client ID → its live connections, oldest first.
type ClientShard = Mutex<HashMap<ClientId, Vec<ConnRef>>>;

/// Client IDs and topics, in this process's memory.
///
/// IDs are hashed with a per-process random key (`RandomState`), since they
/// come from clients and a fixed hash would let them force collisions.
pub struct MemoryBackend {
    hasher: RandomState,
    clients: Box<[ClientShard]>,
    // Publishing reads, subscribing writes; a read-write lock lets
    // publishes to different topics run in parallel.
    topics: RwLock<HashMap<Topic, HashMap<ConnId, ConnRef>>>,
    policy: DuplicateIds,
}

impl MemoryBackend {
    /// An empty backend with the given duplicate-ID policy.
    pub fn new(policy: DuplicateIds) -> Self {
        Self {
            hasher: RandomState::new(),
            clients: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            topics: RwLock::new(HashMap::new()),
            policy,
        }
    }

    fn shard(&self, id: &ClientId) -> &ClientShard {
        let h = self.hasher.hash_one(id);
        &self.clients[(h as usize) % SHARDS]
    }

    /// Queues `frame` to every connection of `id`, without a report.
    /// Returns (connections queued to, whether the ID had any connection).
    fn deliver(&self, id: &ClientId, frame: &WireFrame) -> (usize, bool) {
        let shard = self.shard(id).lock();
        let Some(conns) = shard.get(id) else {
            return (0, false);
        };
        let mut queued = 0;
        for conn in conns {
            match conn.push(frame.clone()) {
                Ok(()) => queued += 1,
                Err(PushError::Full | PushError::Closed) => {}
            }
        }
        (queued, true)
    }

    /// [`Backend::send`], synchronously: the in-memory backend never waits.
    pub(crate) fn send_now(&self, targets: &[ClientId], frame: &WireFrame) -> SendReport {
        let mut report = SendReport::default();
        for (i, id) in targets.iter().enumerate() {
            match self.deliver(id, frame) {
                (0, false) => report.offline.push(i),
                (0, true) => report.dropped.push(i),
                (n, _) => {
                    report.connections += n;
                    report.delivered.push(i);
                }
            }
        }
        report
    }

    /// [`Backend::publish`], synchronously.
    pub(crate) fn publish_now(&self, topic: &Topic, frame: &WireFrame) -> usize {
        let topics = self.topics.read();
        topics.get(topic).map_or(0, |subs| {
            subs.values()
                .filter(|conn| conn.push(frame.clone()).is_ok())
                .count()
        })
    }

    /// [`Backend::clients`], synchronously.
    pub(crate) fn clients_now(&self) -> Vec<ClientInfo> {
        let mut out = Vec::new();
        for shard in self.clients.iter() {
            for (id, conns) in shard.lock().iter() {
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
        let conns: Vec<ConnRef> = self.shard(id).lock().get(id).cloned().unwrap_or_default();
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
        let conns = shard.get(id).filter(|c| !c.is_empty())?;
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
        self.clients.iter().map(|s| s.lock().len()).sum()
    }

    /// How many topics have at least one subscriber.
    pub fn topic_count(&self) -> usize {
        self.topics.read().len()
    }
}

impl Backend for MemoryBackend {
    fn register(&self, id: &ClientId, conn: &ConnRef) -> Result<(), RegisterError> {
        let mut shard = self.shard(id).lock();
        let conns = shard.entry(id.clone()).or_default();
        match self.policy {
            DuplicateIds::Allow => {}
            DuplicateIds::RejectNew if !conns.is_empty() => {
                return Err(RegisterError::AlreadyConnected(id.clone()));
            }
            DuplicateIds::RejectNew => {}
            DuplicateIds::ReplaceOldest => {
                if !conns.is_empty() {
                    // Oldest first: connections are appended in order.
                    let oldest = conns.remove(0);
                    oldest.close(CloseFrame::new(
                        CloseCode::REPLACED,
                        "replaced by a newer connection with the same client id",
                    ));
                }
            }
        }
        conns.push(conn.clone());
        Ok(())
    }

    fn unregister(&self, id: &ClientId, conn: ConnId) {
        let mut shard = self.shard(id).lock();
        if let Some(conns) = shard.get_mut(id) {
            conns.retain(|c| c.id() != conn);
            if conns.is_empty() {
                shard.remove(id);
            }
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
        frame: &'a WireFrame,
    ) -> BoxFuture<'a, SendReport> {
        Box::pin(std::future::ready(self.send_now(targets, frame)))
    }

    fn publish<'a>(&'a self, topic: &'a Topic, frame: &'a WireFrame) -> BoxFuture<'a, usize> {
        Box::pin(std::future::ready(self.publish_now(topic, frame)))
    }

    fn clients(&self) -> BoxFuture<'_, Vec<ClientInfo>> {
        Box::pin(std::future::ready(self.clients_now()))
    }

    fn disconnect<'a>(&'a self, id: &'a ClientId, frame: CloseFrame) -> BoxFuture<'a, usize> {
        Box::pin(std::future::ready(self.disconnect_now(id, &frame)))
    }
}
