//! The Redis backend: several Switchboard nodes behind a load balancer,
//! sharing one Redis (version 7 or later), or a Redis Cluster
//! (`redis+cluster://` URL), as their backplane. Enabled by the cargo
//! feature `redis`.
//!
//! ```no_run
//! use switchboard::{Hub, Limits};
//! use switchboard::redis::{RedisBackend, RedisConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let limits = Limits::default();
//! let mut config = RedisConfig::new("redis://127.0.0.1:6379/");
//! config.node_id = "node-a".to_owned();
//! let backend = RedisBackend::start(config, limits.duplicate_ids)?;
//! let hub = Hub::with_backend(limits, backend.clone());
//! let app = switchboard::app(hub.clone());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! switchboard::serve(listener, app, hub, std::future::pending()).await?;
//! backend.shutdown().await; // leave the cluster: this node's IDs go offline at once
//! # Ok(()) }
//! ```
//!
//! # Design (docs/scaling.md has the whole story and the measured costs)
//!
//! Local connections live in a [`MemoryBackend`]; Redis only carries what
//! crosses nodes. Every command touches one key or one shard channel, and
//! every Lua script the keys of one hash tag, so the same layout runs on a
//! Redis Cluster: `conn.rs` connects to one Redis or to a cluster (whose
//! client splits each pipeline per slot), `resubscribe.rs` follows shard
//! channels whose slot moved.
//!
//! | what | Redis | written when |
//! |------|-------|--------------|
//! | live nodes | sorted set `P:nodes`: member → the Redis time (ms) until which it is alive | every `presence_ttl / 3` by each node |
//! | where an ID is | set `P:loc:<id>`: the members (`node#epoch`) that have it | first connection of the ID on a node / last one gone |
//! | what a node has | hash `P:ids:<member>`: ID → `"connections,since_ms"` | every connect and disconnect |
//! | node inbox | shard channel `P:n:<member>` (`SSUBSCRIBE` / `SPUBLISH`) | sends, closes, answers |
//! | topic | shard channel `P:t:<topic>` | subscribed while the node has a subscriber |
//! | a `switchboard.v1` ID's inbox | stream `P:{id:<id>}:inbox` and hash `P:{id:<id>}:meta` (`inbox.rs`, `scripts.rs`) | every send to the ID, by a Lua script; its hello; every `inbox_ttl / 4` while a node has a v1 connection of it |
//! | a sender's `mid` | string `P:{id:<sender>}:mid:<mid>` (`dedup.rs`) | sends with a `mid` |
//! | whether any ID retains | string `P:v1` | with every v1 hello and refresh |
//!
//! Each v1 connection has a sequence gate (`gate.rs`, kept with the
//! connection in `v1_conns.rs`) that delivers its ID's messages in seq
//! order, once, filling holes from the stream.
//!
//! A *member* is `node_id#instance.epoch`: the node ID, a random token
//! drawn once per process, and a number that changes on every
//! (re)connection to Redis; after a reconnection the node writes its
//! presence again under its new member and the old one is removed, so a
//! cleanup of a dead member can never erase a live one. A second process
//! with the same node ID is told apart by its token, and refuses to run
//! (see [`RedisBackend::failed`]).
//!
//! A send looks up each target's members (`SMEMBERS`, pipelined, unless
//! the location cache has them: `loc_cache.rs`, kept up to date by Redis
//! client-side caching), publishes one message per member node (through
//! the connection's outbox, `outbox.rs`, which puts what concurrent sends
//! have for one node in one `SPUBLISH`: `batch.rs`), and waits for each
//! node's answer (what it delivered, dropped or found offline) up to
//! `request_timeout`. A plain relay send whose cached targets are all on
//! this node is delivered at once ([`Backend::immediate_send`]). A target whose node cannot be reached or does not
//! answer is reported `unconfirmed`, never silently lost.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, mpsc, watch};

use super::inbox::InboxLimits;
use super::listing::{NodeInfo, Page, PageQuery, TopicInfo};
use super::memory::MemoryBackend;
use super::presence::{Departure, PresenceMode, PresenceSettings, PresenceSnapshot};
use super::{
    Attached, Backend, BackendHealth, ClientInfo, Dedup, RegisterError, Replay, ResumePoint,
    SendReport,
};
use crate::BoxFuture;
use crate::id::{ClientId, Topic};
use crate::limits::{DuplicateIds, Limits};
use crate::protocol::close::CloseFrame;
use crate::runtime::delivery::Envelope;
use crate::runtime::mailbox::{ConnId, ConnRef};

mod batch;
mod config;
mod conn;
mod dedup;
mod delivery;
mod duplicates;
mod gate;
mod inbox;
mod keys;
mod link;
mod loc_cache;
mod nodes;
mod outbox;
mod presence;
mod presence_members;
mod replies;
mod resubscribe;
mod scripts;
mod stats;
mod topics;
mod v1_conns;
mod wire;

pub use config::{MIN_PRESENCE_TTL, RedisConfig, RedisConfigError, default_node_id};
use conn::{RedisClient, RedisConn};
use gate::Gate;
use keys::Keys;
use link::supervise;
use presence_members::PresenceMembers;
use scripts::Scripts;
use stats::{Stats, kind_index};
use wire::{Kind, Reply};

/// First wait before reconnecting; doubled after each failure.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Commands per pipeline when writing presence or subscriptions in bulk.
const BATCH: usize = 500;
/// Answers waiting to be published; past it an answer is dropped and the
/// sender reports its targets unconfirmed.
const ACK_QUEUE: usize = 16_384;
/// How long a send waits for a node that let an earlier request time out
/// and has not answered anything since, as a fraction of the request
/// timeout (at least [`MIN_SUSPECT_WAIT`]).
const SUSPECT_WAIT_DIVISOR: u32 = 10;
const MIN_SUSPECT_WAIT: Duration = Duration::from_millis(10);

/// Why the Redis backend stopped for good (it does not reconnect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RedisFailure {
    /// Another running process registered the same node ID on the same
    /// Redis and key prefix. Two processes with one node ID would each
    /// take the other's messages for their own; the one that finds the
    /// other refuses to run.
    #[error(
        "node id {node_id:?} is already used by another running node on this redis \
         (its member {other:?}, key prefix {key_prefix:?}): every node needs its own node id"
    )]
    NodeIdInUse {
        /// This node's ID.
        node_id: String,
        /// The other process's member (`node_id#instance.epoch`).
        other: String,
        /// The key prefix both use.
        key_prefix: String,
    },
}

/// The current connection to Redis and the member name it registered.
#[derive(Clone)]
struct Link {
    conn: RedisConn,
    member: Arc<str>,
    /// The location cache's generation for this connection, when Redis
    /// tracks what it reads (`loc_cache.rs`).
    tracking: Option<u64>,
    /// Sends to other nodes, published in batches (`outbox.rs`).
    outbox: mpsc::UnboundedSender<outbox::Outgoing>,
}

/// One connection's life: its member name, whether it is over, and the
/// queue of answers to publish.
struct Epoch {
    member: Arc<str>,
    ended: AtomicBool,
    lost: Notify,
    acks: mpsc::Sender<(String, Vec<u8>)>,
    /// Until when (ms since [`Shared::started`]) this member surely counts
    /// as alive for the other nodes: a little before the deadline its last
    /// heartbeat wrote. Past it, other nodes may report its IDs offline,
    /// so it delivers nothing more from them (a node frozen for longer than
    /// its TTL does not deliver, when it resumes, what was reported to the
    /// senders as not delivered).
    alive_until_ms: AtomicU64,
    /// The location cache's generation for this connection (0: not
    /// tracked), so that losing it empties the cache.
    tracking: AtomicU64,
}

/// What changed locally since the last flush, while connected. A set (each
/// ID or topic once, whatever its number of changes), and nothing is
/// recorded while disconnected: a (re)connection writes the whole local
/// state under its new member anyway.
#[derive(Default)]
struct Resync {
    /// Counts every change of an ID, so a caller can wait until its change
    /// is in Redis (see [`Shared::wait_flushed`]).
    generation: u64,
    recording: bool,
    ids: HashSet<ClientId>,
    topics: HashSet<Topic>,
}

/// Counts a background task for as long as it lives.
struct TaskGuard(Arc<Shared>);

impl TaskGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.stats.tasks.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(shared))
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.stats.tasks.fetch_sub(1, Ordering::Relaxed);
    }
}

/// This node's `switchboard.v1` connections, each with its sequence gate,
/// and how many of them each ID has.
#[derive(Default)]
struct V1Conns {
    by_conn: HashMap<ConnId, Arc<Gate>>,
    by_id: HashMap<ClientId, usize>,
}

struct Shared {
    /// This `Shared` itself, for the tasks it starts.
    me: Weak<Shared>,
    config: RedisConfig,
    client: RedisClient,
    keys: Keys,
    /// `node_id#`: members named like this node (this process's, or a
    /// twin's).
    node_prefix: String,
    /// `node_id#instance.`: this process's members, whatever their epoch.
    own_prefix: String,
    /// The last epoch number used.
    epochs: AtomicU32,
    local: MemoryBackend,
    link: RwLock<Option<Link>>,
    last_error: Mutex<Option<String>>,
    /// Member → until when it is alive (from the last heartbeat read, and
    /// from the checks of members it did not have).
    live: Mutex<HashMap<String, Instant>>,
    /// Members that let a request time out and have not answered anything
    /// since: a send waits for them only briefly.
    suspects: Mutex<HashSet<String>>,
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>,
    next_request: AtomicU64,
    resync: Mutex<Resync>,
    wake: Notify,
    stop: watch::Sender<bool>,
    /// Set once when the backend stops for good.
    failure: watch::Sender<Option<RedisFailure>>,
    started: Instant,
    stats: Stats,
    /// The generation of [`Resync`] whose IDs are all written to Redis.
    flushed: watch::Sender<u64>,
    /// `switchboard.v1`: the inbox limits, the `mid` TTL, the scripts,
    /// the connections and their gates, and until when this node knows
    /// that some ID retains (`P:v1`, see `inbox.rs`).
    inbox_limits: InboxLimits,
    dedup_ttl: Duration,
    scripts: Scripts,
    v1: RwLock<V1Conns>,
    v1_seen_until: Mutex<Option<Instant>>,
    /// Topic presence across nodes (`presence_members.rs`).
    presence: PresenceMembers,
    /// Where other nodes' IDs are, as last read (`loc_cache.rs`).
    loc_cache: loc_cache::LocCache,
    /// `duplicate_ids` across nodes: the stamps of this node's connections
    /// (`duplicates.rs`).
    stamps: duplicates::Stamps,
}

/// Removes a pending request when the request ends, however it ends.
struct PendingGuard<'a> {
    shared: &'a Shared,
    request: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().remove(&self.request);
    }
}

impl Shared {
    fn link(&self) -> Option<Link> {
        self.link.read().clone()
    }

    fn is_own(&self, member: &str) -> bool {
        member.starts_with(&self.own_prefix)
    }

    /// A member of another process with this node's ID.
    fn is_twin(&self, member: &str) -> bool {
        member.starts_with(&self.node_prefix) && !self.is_own(member)
    }

    /// Whether `member` was alive in the last heartbeat read (or the last
    /// check) and its deadline has not passed since. `false` says nothing
    /// for sure: a member that joined since is not known yet.
    fn is_live(&self, member: &str) -> bool {
        self.live
            .lock()
            .get(member)
            .is_some_and(|until| *until > Instant::now())
    }

    /// Milliseconds since this backend started (for [`Epoch::alive_until_ms`]).
    fn since_start_ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_millis() as u64
    }

    /// Records that `id` changed; returns the generation to wait for (see
    /// [`wait_flushed`](Self::wait_flushed)).
    fn mark_id(&self, id: &ClientId) -> u64 {
        let mut resync = self.resync.lock();
        resync.generation += 1;
        let generation = resync.generation;
        if resync.recording {
            resync.ids.insert(id.clone());
            drop(resync);
            self.wake.notify_one();
        }
        generation
    }

    /// Waits (at most one request timeout) until the presence changes up
    /// to `generation` are written to Redis: from then on, every node that
    /// sends to them publishes to this node.
    async fn wait_flushed(&self, generation: u64) {
        let mut flushed = self.flushed.subscribe();
        let wait = flushed.wait_for(|done| *done >= generation);
        let _ = tokio::time::timeout(self.config.request_timeout, wait).await;
    }

    /// Marks the presence changes up to `generation` written.
    fn flushed_up_to(&self, generation: u64) {
        self.flushed.send_if_modified(|done| {
            let newer = generation > *done;
            if newer {
                *done = generation;
            }
            newer
        });
    }

    fn mark_topic(&self, topic: &Topic) {
        let mut resync = self.resync.lock();
        if resync.recording {
            resync.topics.insert(topic.clone());
            drop(resync);
            self.wake.notify_one();
        }
    }

    /// From now on, record changes (a connection is about to read the whole
    /// local state: what changes after this is recorded, what changed
    /// before is in what it reads).
    fn start_recording(&self) -> u64 {
        let mut resync = self.resync.lock();
        resync.recording = true;
        resync.ids.clear();
        resync.topics.clear();
        resync.generation
    }

    /// The connection is gone: the next one writes the whole state.
    fn stop_recording(&self) {
        let mut resync = self.resync.lock();
        resync.recording = false;
        resync.ids = HashSet::new();
        resync.topics = HashSet::new();
    }

    /// IDs and topics whose state is still to be written to Redis.
    fn resync_pending(&self) -> usize {
        let resync = self.resync.lock();
        resync.ids.len() + resync.topics.len()
    }

    /// Stops the backend for good with `failure`.
    fn fail(&self, failure: RedisFailure) {
        tracing::error!(node = %self.config.node_id, "{failure}");
        *self.last_error.lock() = Some(failure.to_string());
        self.failure.send_replace(Some(failure));
    }

    /// How long a send waits for the answer of a member that let an
    /// earlier request time out.
    fn suspect_wait(&self) -> Duration {
        (self.config.request_timeout / SUSPECT_WAIT_DIVISOR).max(MIN_SUSPECT_WAIT)
    }

    fn set_error(&self, message: String) {
        tracing::warn!(node = %self.config.node_id, "redis backend degraded: {message}");
        *self.last_error.lock() = Some(message);
    }

    fn register_request(&self) -> (u64, mpsc::UnboundedReceiver<Reply>, PendingGuard<'_>) {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.pending.lock().insert(request, tx);
        (
            request,
            rx,
            PendingGuard {
                shared: self,
                request,
            },
        )
    }

    fn count_published(&self, kind: Kind, n: usize) {
        self.stats.published[kind_index(kind)].add(n as u64);
    }
}

struct Session {
    link: Link,
    epoch: Arc<Epoch>,
    /// Topic channels this connection is subscribed to.
    subscribed: HashSet<Topic>,
    ended_tx: watch::Sender<bool>,
    /// Redis time minus local time, in ms, from the last `TIME`.
    clock_offset_ms: i64,
    /// The deadline (Redis time, ms) the last heartbeat wrote.
    deadline_ms: i64,
    /// When the last heartbeat was sent.
    last_beat: Instant,
}

fn err(message: impl Into<String>) -> ::redis::RedisError {
    ::redis::RedisError::from((::redis::ErrorKind::IoError, "switchboard", message.into()))
}

fn local_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A [`Backend`] for several nodes sharing one Redis: local connections in
/// memory, presence and cross-node messages in Redis. See the
/// [module documentation](self).
pub struct RedisBackend {
    shared: Arc<Shared>,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl RedisBackend {
    /// Checks `config` and starts connecting in the background. Must be
    /// called within a Tokio runtime. The node works before Redis answers
    /// (local delivery only, reported degraded) and reconnects with backoff
    /// whenever the connection is lost.
    pub fn start(config: RedisConfig, policy: DuplicateIds) -> Result<Arc<Self>, RedisConfigError> {
        let limits = Limits {
            duplicate_ids: policy,
            ..Limits::default()
        };
        Self::start_with_limits(config, &limits)
    }

    /// [`start`](Self::start), with the node's limits: the duplicate-ID
    /// policy and the `switchboard.v1` inbox limits.
    pub fn start_with_limits(
        config: RedisConfig,
        limits: &Limits,
    ) -> Result<Arc<Self>, RedisConfigError> {
        config.validate()?;
        let client = RedisClient::open(&config.url)?;
        let (stop, _) = watch::channel(false);
        let (failure, _) = watch::channel(None);
        let instance = format!("{}#{}", config.node_id, link::random_token());
        let shared = Arc::new_cyclic(|me| Shared {
            me: me.clone(),
            keys: Keys::new(&config.key_prefix),
            node_prefix: format!("{}#", config.node_id),
            own_prefix: format!("{instance}."),
            presence: PresenceMembers::new(instance, PresenceSettings::from(&limits.v1)),
            loc_cache: loc_cache::LocCache::new(if client.is_cluster() {
                0
            } else {
                config.location_cache_entries
            }),
            epochs: AtomicU32::new(0),
            config,
            client,
            local: MemoryBackend::with_v1(limits.duplicate_ids, &limits.v1),
            link: RwLock::new(None),
            last_error: Mutex::new(Some("connecting to redis".to_owned())),
            live: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashSet::new()),
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            resync: Mutex::new(Resync::default()),
            wake: Notify::new(),
            stop,
            failure,
            started: Instant::now(),
            stats: Stats::default(),
            flushed: watch::channel(0).0,
            inbox_limits: InboxLimits::from(&limits.v1),
            dedup_ttl: limits.v1.dedup_ttl,
            scripts: Scripts::default(),
            v1: RwLock::new(V1Conns::default()),
            v1_seen_until: Mutex::new(None),
            stamps: duplicates::Stamps::default(),
        });
        let supervisor = tokio::spawn(supervise(Arc::clone(&shared)));
        tokio::spawn(v1_conns::keep_inboxes(
            Arc::downgrade(&shared),
            shared.stop.subscribe(),
        ));
        tokio::spawn(presence_members::run(Arc::downgrade(&shared)));
        Ok(Arc::new(Self {
            shared,
            supervisor: Mutex::new(Some(supervisor)),
        }))
    }

    /// This node's ID.
    pub fn node_id(&self) -> &str {
        &self.shared.config.node_id
    }

    /// Whether the node is connected to Redis and registered.
    pub fn is_connected(&self) -> bool {
        self.shared.link.read().is_some()
    }

    /// Why the backend stopped for good, if it did.
    pub fn failure(&self) -> Option<RedisFailure> {
        self.shared.failure.borrow().clone()
    }

    /// Resolves once the backend has stopped for good, which it does only
    /// when another running process uses this node ID on the same Redis
    /// and key prefix ([`RedisFailure::NodeIdInUse`], found when this node
    /// connects or reconnects, before it registers anything). The node then
    /// serves its own clients only, reported degraded; a server should
    /// shut down (the `switchboard` binary exits with code 2). Pending
    /// forever otherwise.
    pub async fn failed(&self) -> RedisFailure {
        let mut failure = self.shared.failure.subscribe();
        loop {
            if let Some(failure) = failure.borrow_and_update().clone() {
                return failure;
            }
            if failure.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Leaves the cluster: removes this node's presence (its IDs are
    /// reported offline by the other nodes at once) and closes the Redis
    /// connection. Bounded by twice the request timeout. Call it after the
    /// server has closed its connections.
    pub async fn shutdown(&self) {
        let _ = self.shared.stop.send(true);
        let handle = self.supervisor.lock().take();
        if let Some(handle) = handle {
            let limit = self.shared.config.request_timeout * 2;
            if tokio::time::timeout(limit, handle).await.is_err() {
                tracing::warn!("redis backend did not stop in time");
            }
        }
    }
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        let _ = self.shared.stop.send(true);
        if let Some(handle) = self.supervisor.lock().take() {
            handle.abort();
        }
    }
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("node_id", &self.shared.config.node_id)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl Backend for RedisBackend {
    fn register(&self, id: &ClientId, conn: &ConnRef) -> Result<(), RegisterError> {
        self.shared.local.register(id, conn)?;
        self.shared.mark_id(id);
        Ok(())
    }

    fn unregister(&self, id: &ClientId, conn: ConnId) {
        self.shared.local.unregister(id, conn);
        self.shared.stamps.forget(conn);
        self.shared.mark_id(id);
        if let Some((id, true)) = self.shared.remove_gate(conn) {
            self.shared.spawn_detach(id);
        }
    }

    // `duplicates.rs`: stamps, and a close of the older connections.
    fn settle_duplicate_ids<'a>(
        &'a self,
        id: &'a ClientId,
        conn: ConnId,
    ) -> BoxFuture<'a, Result<(), RegisterError>> {
        Box::pin(self.shared.settle_duplicate_ids(id, conn, false))
    }

    fn subscribe(&self, topic: &Topic, conn: &ConnRef) {
        self.shared.local.subscribe(topic, conn);
        self.shared.mark_topic(topic);
    }

    fn unsubscribe(&self, topic: &Topic, conn: ConnId) {
        self.shared.local.unsubscribe(topic, conn);
        self.shared.mark_topic(topic);
    }

    fn send<'a>(
        &'a self,
        targets: &'a [ClientId],
        message: &'a Arc<Envelope>,
    ) -> BoxFuture<'a, SendReport> {
        Box::pin(self.shared.send(targets, message))
    }

    // At once when the location cache says every target is on this node
    // or nowhere, no ID of the cluster retains (`P:v1` read absent), and
    // this node has no `switchboard.v1` connection (whose messages go
    // through their sequence gates): then the send would not touch Redis.
    fn immediate_send(&self, targets: &[&str]) -> Option<&dyn super::Immediate> {
        let shared = &self.shared;
        if shared.v1_known()
            || !shared.loc_cache.v1_absent()
            || !shared.v1.read().by_conn.is_empty()
        {
            return None;
        }
        let mut elsewhere = false;
        let known = shared
            .loc_cache
            .all_known(targets.iter().copied(), |_, members| {
                elsewhere |= !members.is_empty();
            });
        (known && !elsewhere).then_some(&shared.local as &dyn super::Immediate)
    }

    fn publish<'a>(&'a self, topic: &'a Topic, message: &'a Arc<Envelope>) -> BoxFuture<'a, usize> {
        Box::pin(async move {
            let local = self.shared.local.publish_now(message);
            match self.shared.publish_remote(topic, message).await {
                Some(remote) => local + remote,
                None => {
                    self.shared.stats.unconfirmed_publishes.add(1);
                    local
                }
            }
        })
    }

    fn clients(&self) -> BoxFuture<'_, Vec<ClientInfo>> {
        Box::pin(std::future::ready(self.shared.local.clients_now()))
    }

    fn disconnect<'a>(&'a self, id: &'a ClientId, frame: CloseFrame) -> BoxFuture<'a, usize> {
        Box::pin(async move {
            let local = self.shared.local.disconnect_now(id, &frame);
            let remote = self.shared.disconnect_remote(id, &frame).await;
            local + remote.unwrap_or(0)
        })
    }

    fn cluster_clients(&self) -> BoxFuture<'_, Option<Vec<ClientInfo>>> {
        Box::pin(self.shared.cluster_clients())
    }

    // The cluster's IDs when Redis answers (a full `HSCAN` of every other
    // node's hash per page: see `presence.rs`), else this node's.
    fn client_page<'a>(&'a self, query: &'a PageQuery) -> BoxFuture<'a, Page<ClientInfo>> {
        Box::pin(async move {
            match self.shared.cluster_clients().await {
                Some(all) => super::listing::page_of(all, query),
                None => self.shared.local.client_page_now(query),
            }
        })
    }

    // Subscribers are counted where they are: this node's.
    fn topic_page<'a>(&'a self, query: &'a PageQuery) -> BoxFuture<'a, Page<TopicInfo>> {
        Box::pin(std::future::ready(self.shared.local.topic_page_now(query)))
    }

    fn nodes(&self) -> BoxFuture<'_, Option<Vec<NodeInfo>>> {
        Box::pin(self.shared.nodes())
    }

    // switchboard.v1: inboxes in Redis (`inbox.rs`), a sequence gate per
    // connection (`gate.rs`), `mid`s in Redis (`dedup.rs`).
    fn attach<'a>(
        &'a self,
        id: &'a ClientId,
        conn: &'a ConnRef,
        resume: Option<&'a ResumePoint>,
    ) -> BoxFuture<'a, Result<Attached, RegisterError>> {
        Box::pin(self.shared.attach(id, conn, resume))
    }

    fn replay<'a>(&'a self, id: &'a ClientId, from: u64, to: u64) -> BoxFuture<'a, Replay> {
        Box::pin(async move {
            let Some(link) = self.shared.link() else {
                return Replay::nothing_retained(from, to);
            };
            let read = self.shared.read_range(&link, id, from, to);
            match tokio::time::timeout(self.shared.config.request_timeout, read).await {
                Ok(Ok((_, replay))) => replay,
                _ => Replay::nothing_retained(from, to),
            }
        })
    }

    fn dedup<'a>(&'a self, sender: &'a ClientId, mid: &'a str) -> BoxFuture<'a, Dedup> {
        Box::pin(self.shared.dedup_begin(sender, mid))
    }

    fn dedup_done(&self, sender: &ClientId, mid: &str, report: Arc<str>) {
        self.shared.dedup_record(sender, mid, Some(report));
    }

    fn dedup_abort(&self, sender: &ClientId, mid: &str) {
        self.shared.dedup_record(sender, mid, None);
    }

    fn presence_join<'a>(
        &'a self,
        topic: &'a Topic,
        member: &'a ClientId,
        meta: Option<Arc<str>>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(self.shared.presence_join(topic, member, meta))
    }

    fn presence_leave(&self, topic: &Topic, member: &ClientId, departure: Departure) {
        self.shared.presence_leave(topic, member, departure);
    }

    fn presence_watch<'a>(
        &'a self,
        topic: &'a Topic,
        watcher: &'a ConnRef,
        mode: PresenceMode,
    ) -> BoxFuture<'a, Option<PresenceSnapshot>> {
        Box::pin(self.shared.presence_watch(topic, watcher, mode))
    }

    fn presence_unwatch(&self, topic: &Topic, watcher: ConnId) {
        self.shared.presence_unwatch(topic, watcher);
    }

    fn presence<'a>(
        &'a self,
        topic: &'a Topic,
        mode: PresenceMode,
    ) -> BoxFuture<'a, Option<PresenceSnapshot>> {
        Box::pin(self.shared.presence_snapshot(topic, mode))
    }

    fn health(&self) -> BackendHealth {
        let health = BackendHealth::healthy("redis").with_node(self.node_id());
        if self.is_connected() {
            return health;
        }
        let reason = self
            .shared
            .last_error
            .lock()
            .clone()
            .unwrap_or_else(|| "not connected to redis".to_owned());
        health.degraded(reason)
    }

    fn render_metrics(&self, out: &mut String) {
        self.shared
            .stats
            .render(&self.shared, self.is_connected(), out);
        let (members, watchers) = self.shared.presence.stats();
        let _ = std::fmt::Write::write_fmt(
            out,
            format_args!(
                "# HELP switchboard_presence_local_members Topic presence members with a connection on this node.\n# TYPE switchboard_presence_local_members gauge\nswitchboard_presence_local_members {members}\n# HELP switchboard_presence_watchers Connections of this node watching a topic's presence.\n# TYPE switchboard_presence_watchers gauge\nswitchboard_presence_watchers {watchers}\n"
            ),
        );
    }
}
