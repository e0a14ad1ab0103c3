//! The Redis backend: several Switchboard nodes behind a load balancer,
//! sharing one Redis (version 7 or later) as their backplane. Enabled by the
//! cargo feature `redis`.
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
//! crosses nodes. Every command touches one key or one shard channel, so
//! the same layout runs on a Redis Cluster (with a cluster-aware client).
//!
//! | what | Redis | written when |
//! |------|-------|--------------|
//! | live nodes | sorted set `P:nodes`: member → the Redis time (ms) until which it is alive | every `presence_ttl / 3` by each node |
//! | where an ID is | set `P:loc:<id>`: the members (`node#epoch`) that have it | first connection of the ID on a node / last one gone |
//! | what a node has | hash `P:ids:<member>`: ID → `"connections,since_ms"` | every connect and disconnect |
//! | node inbox | shard channel `P:n:<member>` (`SSUBSCRIBE` / `SPUBLISH`) | sends, closes, answers |
//! | topic | shard channel `P:t:<topic>` | subscribed while the node has a subscriber |
//!
//! A *member* is the node ID plus a random epoch that changes on every
//! (re)connection to Redis; after a reconnection the node writes its
//! presence again under its new member and the old one is removed, so a
//! cleanup of a dead member can never erase a live one.
//!
//! A send looks up each target's members (`SMEMBERS`, pipelined), publishes
//! one message per member node (`SPUBLISH`), and waits for each node's
//! answer (what it delivered, dropped or found offline) up to
//! `request_timeout`. A target whose node cannot be reached or does not
//! answer is reported `unconfirmed`, never silently lost.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};

use crate::conn::{ConnId, ConnRef};
use crate::hub::{
    Backend, BackendHealth, BoxFuture, ClientInfo, DuplicateIds, RegisterError, SendReport,
};
use crate::id::{ClientId, Topic};
use crate::memory::MemoryBackend;
use crate::metrics::Counter;
use crate::protocol::close::{CloseCode, CloseFrame};
use crate::protocol::frame::WireFrame;

/// The shortest presence TTL accepted.
pub const MIN_PRESENCE_TTL: Duration = Duration::from_secs(1);

/// First wait before reconnecting; doubled after each failure.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Commands per pipeline when writing presence or subscriptions in bulk.
const BATCH: usize = 500;
/// Answers waiting to be published; past it an answer is dropped and the
/// sender reports its targets unconfirmed.
const ACK_QUEUE: usize = 16_384;

/// How to reach Redis and how this node appears in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prefix of every key and channel, so several clusters can share one
    /// Redis. Default `switchboard`.
    pub key_prefix: String,
    /// This node's name, unique in the cluster: 1 to 64 ASCII letters,
    /// digits or `- _ . :`. Default: the host name and the process ID.
    pub node_id: String,
    /// How long a node that stops refreshing its presence (it was killed, or
    /// lost Redis) is still reported as having its IDs. It refreshes every
    /// third of this. Default 10 s, at least 1 s.
    pub presence_ttl: Duration,
    /// The longest a Redis command, or a cross-node send waiting for the
    /// other nodes' answers, may take. Default 2 s.
    pub request_timeout: Duration,
}

impl RedisConfig {
    /// Defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: "switchboard".to_owned(),
            node_id: default_node_id(),
            presence_ttl: Duration::from_secs(10),
            request_timeout: Duration::from_secs(2),
        }
    }

    /// Checks every field; the error names the one to fix.
    pub fn validate(&self) -> Result<(), RedisConfigError> {
        ::redis::Client::open(self.url.as_str()).map_err(|err| RedisConfigError::Url {
            message: err.to_string(),
        })?;
        let node_ok = (1..=64).contains(&self.node_id.len())
            && self
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
        if !node_ok {
            return Err(RedisConfigError::NodeId(self.node_id.clone()));
        }
        let prefix_ok = (1..=64).contains(&self.key_prefix.len())
            && self.key_prefix.chars().all(|c| c.is_ascii_graphic());
        if !prefix_ok {
            return Err(RedisConfigError::KeyPrefix(self.key_prefix.clone()));
        }
        if self.presence_ttl < MIN_PRESENCE_TTL {
            return Err(RedisConfigError::PresenceTtl(self.presence_ttl));
        }
        if self.request_timeout < Duration::from_millis(10) {
            return Err(RedisConfigError::RequestTimeout(self.request_timeout));
        }
        Ok(())
    }
}

/// `<host name>-<process ID>`, the default node ID.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(40)
        .collect();
    let host = if host.is_empty() {
        "node".to_owned()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}

/// A [`RedisConfig`] field that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RedisConfigError {
    /// The URL does not parse.
    #[error("invalid redis url: {message}")]
    Url {
        /// What the Redis client said.
        message: String,
    },
    /// The node ID is empty, too long or has a character outside the set.
    #[error("invalid node id {0:?}: use 1 to 64 ASCII letters, digits or - _ . :")]
    NodeId(String),
    /// The key prefix is empty, too long, or has spaces or control characters.
    #[error("invalid key prefix {0:?}: use 1 to 64 printable ASCII characters, no spaces")]
    KeyPrefix(String),
    /// The presence TTL is under [`MIN_PRESENCE_TTL`].
    #[error("presence ttl {0:?} is too short: use at least 1s")]
    PresenceTtl(Duration),
    /// The request timeout is under 10 ms.
    #[error("request timeout {0:?} is too short: use at least 10ms")]
    RequestTimeout(Duration),
}

// ---------------------------------------------------------------------------
// Key and channel names
// ---------------------------------------------------------------------------

struct Keys {
    prefix: String,
    topic_prefix: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            topic_prefix: format!("{prefix}:t:"),
        }
    }
    fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    fn ids(&self, member: &str) -> String {
        format!("{}:ids:{member}", self.prefix)
    }
    fn loc(&self, id: &str) -> String {
        format!("{}:loc:{id}", self.prefix)
    }
    fn gc(&self, member: &str) -> String {
        format!("{}:gc:{member}", self.prefix)
    }
    fn node_channel(&self, member: &str) -> String {
        format!("{}:n:{member}", self.prefix)
    }
    fn topic_channel(&self, topic: &Topic) -> String {
        format!("{}{topic}", self.topic_prefix)
    }
    fn topic_of(&self, channel: &[u8]) -> Option<Topic> {
        let name = channel.strip_prefix(self.topic_prefix.as_bytes())?;
        Topic::new(std::str::from_utf8(name).ok()?).ok()
    }
}

// ---------------------------------------------------------------------------
// Messages between nodes: a JSON header line, then the payload bytes
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    /// Deliver the payload to these IDs, then answer.
    Send,
    /// A topic publish (on the topic's channel); every subscribed node answers.
    Pub,
    /// Close every connection of one ID, then answer.
    Close,
    /// An answer to `r`.
    Ack,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header<'a> {
    k: Kind,
    /// Request number, chosen by the requesting node.
    r: u64,
    /// The member that sent this message (requests go back to it).
    #[serde(borrow)]
    f: Cow<'a, str>,
    /// Send: the targets' indexes at the requester, one per `t`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    i: Vec<usize>,
    /// Send: the target IDs. Close: the one ID.
    #[serde(default, borrow, skip_serializing_if = "Vec::is_empty")]
    t: Vec<Cow<'a, str>>,
    /// The payload is binary (else text).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    b: bool,
    /// Ack of a send: indexes delivered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    d: Vec<usize>,
    /// Ack of a send: indexes dropped (connected, every connection refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    x: Vec<usize>,
    /// Ack: connections reached (send, publish) or closed. Close: the code.
    #[serde(default)]
    c: usize,
}

impl<'a> Header<'a> {
    fn new(k: Kind, r: u64, f: &'a str) -> Self {
        Self {
            k,
            r,
            f: Cow::Borrowed(f),
            i: Vec::new(),
            t: Vec::new(),
            b: false,
            d: Vec::new(),
            x: Vec::new(),
            c: 0,
        }
    }

    fn encode(&self, body: &[u8]) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(body);
        out
    }
}

/// An answer, as the waiting request sees it.
#[derive(Debug)]
struct Reply {
    from: String,
    delivered: Vec<usize>,
    dropped: Vec<usize>,
    count: usize,
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

/// The current connection to Redis and the member name it registered.
#[derive(Clone)]
struct Link {
    conn: MultiplexedConnection,
    member: Arc<str>,
}

/// One connection's life: its member name, whether it is over, and the
/// queue of answers to publish.
struct Epoch {
    member: Arc<str>,
    ended: AtomicBool,
    lost: Notify,
    acks: mpsc::Sender<(String, Vec<u8>)>,
}

#[derive(Default)]
struct Stats {
    connects: Counter,
    connection_failures: Counter,
    published: [Counter; 4],
    received: [Counter; 4],
    ack_timeouts: Counter,
    acks_dropped: Counter,
    invalid: Counter,
    remote_deliveries: Counter,
    unconfirmed_publishes: Counter,
    tasks: AtomicI64,
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Send => 0,
        Kind::Pub => 1,
        Kind::Close => 2,
        Kind::Ack => 3,
    }
}

const KIND_LABELS: [&str; 4] = ["send", "pub", "close", "ack"];

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

struct Shared {
    config: RedisConfig,
    client: ::redis::Client,
    keys: Keys,
    /// `node_id#`: members of this node, whatever their epoch.
    own_prefix: String,
    local: MemoryBackend,
    link: RwLock<Option<Link>>,
    last_error: Mutex<Option<String>>,
    /// Member → until when it is alive (from the last heartbeat read).
    live: Mutex<HashMap<String, Instant>>,
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>,
    next_request: AtomicU64,
    dirty_ids: Mutex<HashSet<ClientId>>,
    dirty_topics: Mutex<HashSet<Topic>>,
    wake: Notify,
    stop: watch::Sender<bool>,
    stats: Stats,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    Live,
    Dead,
    /// Not in the last heartbeat read (a node that joined since): tried.
    Unknown,
}

impl Shared {
    fn link(&self) -> Option<Link> {
        self.link.read().clone()
    }

    fn is_own(&self, member: &str) -> bool {
        member.starts_with(&self.own_prefix)
    }

    fn liveness(&self, member: &str) -> Liveness {
        match self.live.lock().get(member) {
            Some(until) if *until > Instant::now() => Liveness::Live,
            Some(_) => Liveness::Dead,
            None => Liveness::Unknown,
        }
    }

    fn mark_id(&self, id: &ClientId) {
        self.dirty_ids.lock().insert(id.clone());
        self.wake.notify_one();
    }

    fn mark_topic(&self, topic: &Topic) {
        self.dirty_topics.lock().insert(topic.clone());
        self.wake.notify_one();
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

    // -- Receiving ---------------------------------------------------------

    /// Called by the Redis connection's reader for every push, in order.
    fn on_push(&self, epoch: &Epoch, info: PushInfo) {
        match info.kind {
            PushKind::Disconnection => {
                epoch.lost.notify_one();
            }
            PushKind::SMessage => {
                let mut data = info.data.into_iter();
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(message))) =
                    (data.next(), data.next())
                else {
                    self.stats.invalid.add(1);
                    return;
                };
                self.on_message(epoch, &channel, Bytes::from(message));
            }
            _ => {}
        }
    }

    fn on_message(&self, epoch: &Epoch, channel: &[u8], message: Bytes) {
        let Some(newline) = message.iter().position(|&b| b == b'\n') else {
            self.stats.invalid.add(1);
            return;
        };
        let Ok(header) = serde_json::from_slice::<Header<'_>>(&message[..newline]) else {
            self.stats.invalid.add(1);
            return;
        };
        self.stats.received[kind_index(header.k)].add(1);
        let body = message.slice(newline + 1..);
        if header.k == Kind::Ack {
            self.route_reply(
                header.r,
                Reply {
                    from: header.f.into_owned(),
                    delivered: header.d,
                    dropped: header.x,
                    count: header.c,
                },
            );
            return;
        }
        if self.is_own(&header.f) {
            // Our own topic publish, seen by our subscription: the local
            // subscribers already have it. Count this answer as zero.
            self.route_reply(
                header.r,
                Reply {
                    from: header.f.into_owned(),
                    delivered: Vec::new(),
                    dropped: Vec::new(),
                    count: 0,
                },
            );
            return;
        }
        if epoch.ended.load(Ordering::Acquire) {
            // A connection we have given up on (Redis may not have noticed
            // yet). Topic messages reach our new connection too, and a
            // sender that gets no answer from this one reports its targets
            // unconfirmed: delivering here could deliver twice.
            return;
        }
        let mut ack = Header::new(Kind::Ack, header.r, &epoch.member);
        match header.k {
            Kind::Send => {
                let frame = frame_of(header.b, body);
                let mut ids = Vec::with_capacity(header.t.len());
                let mut at = Vec::with_capacity(header.t.len());
                for (id, &index) in header.t.iter().zip(&header.i) {
                    if let Ok(id) = ClientId::new(id) {
                        ids.push(id);
                        at.push(index);
                    }
                }
                let report = self.local.send_now(&ids, &frame);
                self.stats.remote_deliveries.add(report.connections as u64);
                ack.d = report.delivered.iter().map(|&j| at[j]).collect();
                ack.x = report.dropped.iter().map(|&j| at[j]).collect();
                ack.c = report.connections;
            }
            Kind::Pub => {
                let Some(topic) = self.keys.topic_of(channel) else {
                    self.stats.invalid.add(1);
                    return;
                };
                let n = self.local.publish_now(&topic, &frame_of(header.b, body));
                self.stats.remote_deliveries.add(n as u64);
                ack.c = n;
            }
            Kind::Close => {
                let Some(Ok(id)) = header.t.first().map(|id| ClientId::new(id)) else {
                    self.stats.invalid.add(1);
                    return;
                };
                let code = u16::try_from(header.c)
                    .ok()
                    .map(CloseCode)
                    .filter(|c| c.is_valid_on_wire())
                    .unwrap_or(CloseCode::DISCONNECTED);
                let reason = String::from_utf8_lossy(&body).into_owned();
                let frame = CloseFrame {
                    code,
                    reason: Cow::Owned(reason),
                };
                ack.c = self.local.disconnect_now(&id, &frame);
            }
            Kind::Ack => return,
        }
        let answer = ack.encode(&[]);
        if epoch
            .acks
            .try_send((self.keys.node_channel(&header.f), answer))
            .is_err()
        {
            self.stats.acks_dropped.add(1);
        }
    }

    fn route_reply(&self, request: u64, reply: Reply) {
        if let Some(tx) = self.pending.lock().get(&request) {
            let _ = tx.send(reply);
        }
    }

    // -- Cross-node operations ---------------------------------------------

    /// The members other than this node's that have each target, as a list
    /// of (member, target indexes); `Err` when Redis cannot answer.
    async fn locate(
        &self,
        link: &Link,
        targets: &[ClientId],
    ) -> Result<Vec<(String, Vec<usize>)>, ::redis::RedisError> {
        let mut pipe = ::redis::pipe();
        for id in targets {
            pipe.cmd("SMEMBERS").arg(self.keys.loc(id.as_str()));
        }
        let mut conn = link.conn.clone();
        let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
        let mut by_member: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, reply) in replies.into_iter().enumerate() {
            for member in strings(reply) {
                if self.is_own(&member) || self.liveness(&member) == Liveness::Dead {
                    continue;
                }
                by_member.entry(member).or_default().push(i);
            }
        }
        Ok(by_member.into_iter().collect())
    }

    /// Publishes one message per member; returns each one's receiver count
    /// (`None` where publishing failed).
    async fn publish_each(
        &self,
        link: &Link,
        messages: Vec<(String, Vec<u8>)>,
    ) -> Vec<Option<i64>> {
        let n = messages.len();
        let mut pipe = ::redis::pipe();
        for (member, message) in messages {
            pipe.cmd("SPUBLISH")
                .arg(self.keys.node_channel(&member))
                .arg(message);
        }
        let mut conn = link.conn.clone();
        match pipe.query_async::<Vec<i64>>(&mut conn).await {
            Ok(counts) => counts.into_iter().map(Some).collect(),
            Err(_) => vec![None; n],
        }
    }

    /// Collects `expected` replies until `deadline`.
    async fn collect(
        &self,
        rx: &mut mpsc::UnboundedReceiver<Reply>,
        expected: usize,
        deadline: tokio::time::Instant,
    ) -> Vec<Reply> {
        let mut replies = Vec::with_capacity(expected);
        while replies.len() < expected {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(reply)) => replies.push(reply),
                Ok(None) => break,
                Err(_) => {
                    self.stats.ack_timeouts.add(1);
                    break;
                }
            }
        }
        replies
    }

    async fn send_remote(&self, targets: &[ClientId], frame: &WireFrame, report: &mut SendReport) {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let n = targets.len();
        let mut delivered = vec![false; n];
        let mut dropped = vec![false; n];
        let mut unknown = vec![false; n];
        for &i in &report.delivered {
            delivered[i] = true;
        }
        for &i in &report.dropped {
            dropped[i] = true;
        }
        let outcome = async {
            let Some(link) = self.link() else {
                return Err(());
            };
            let located = tokio::time::timeout_at(deadline, self.locate(&link, targets))
                .await
                .map_err(drop)?
                .map_err(drop)?;
            if located.is_empty() {
                return Ok(());
            }
            let (request, mut rx, _guard) = self.register_request();
            let payload = frame.payload();
            let messages: Vec<(String, Vec<u8>)> = located
                .iter()
                .map(|(member, indexes)| {
                    let mut header = Header::new(Kind::Send, request, &link.member);
                    header.i.clone_from(indexes);
                    header.t = indexes
                        .iter()
                        .map(|&i| Cow::Borrowed(targets[i].as_str()))
                        .collect();
                    header.b = !frame.is_text();
                    (member.clone(), header.encode(payload))
                })
                .collect();
            self.count_published(Kind::Send, messages.len());
            let counts = tokio::time::timeout_at(deadline, self.publish_each(&link, messages))
                .await
                .unwrap_or_else(|_| vec![None; located.len()]);
            let mut expected = 0;
            let mut waiting: HashMap<&str, &[usize]> = HashMap::new();
            for ((member, indexes), count) in located.iter().zip(&counts) {
                match count {
                    Some(c) if *c > 0 => {
                        expected += *c as usize;
                        waiting.insert(member, indexes);
                    }
                    // Nobody listens on that member's channel: a node that
                    // left without cleaning up (its entry was not in the
                    // last heartbeat read) is offline; a node still within
                    // its presence TTL may have only lost Redis.
                    Some(_) if self.liveness(member) == Liveness::Unknown => {}
                    _ => indexes.iter().for_each(|&i| unknown[i] = true),
                }
            }
            for reply in self.collect(&mut rx, expected, deadline).await {
                waiting.remove(reply.from.as_str());
                report.connections += reply.count;
                for i in reply.delivered.into_iter().filter(|&i| i < n) {
                    delivered[i] = true;
                }
                for i in reply.dropped.into_iter().filter(|&i| i < n) {
                    dropped[i] = true;
                }
            }
            for indexes in waiting.values() {
                indexes.iter().for_each(|&i| unknown[i] = true);
            }
            Ok(())
        }
        .await;
        if outcome.is_err() {
            unknown.iter_mut().for_each(|u| *u = true);
        }
        report.delivered.clear();
        report.dropped.clear();
        report.offline.clear();
        report.unconfirmed.clear();
        for i in 0..n {
            if delivered[i] {
                report.delivered.push(i);
            } else if unknown[i] {
                report.unconfirmed.push(i);
            } else if dropped[i] {
                report.dropped.push(i);
            } else {
                report.offline.push(i);
            }
        }
    }

    async fn publish_remote(&self, topic: &Topic, frame: &WireFrame) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let link = self.link()?;
        let (request, mut rx, _guard) = self.register_request();
        let mut header = Header::new(Kind::Pub, request, &link.member);
        header.b = !frame.is_text();
        let message = header.encode(frame.payload());
        self.count_published(Kind::Pub, 1);
        let mut conn = link.conn.clone();
        let mut command = ::redis::cmd("SPUBLISH");
        command.arg(self.keys.topic_channel(topic)).arg(message);
        let publish = command.query_async::<i64>(&mut conn);
        let receivers = tokio::time::timeout_at(deadline, publish)
            .await
            .ok()?
            .ok()?;
        let expected = usize::try_from(receivers).unwrap_or(0);
        let replies = self.collect(&mut rx, expected, deadline).await;
        if replies.len() < expected {
            self.stats.unconfirmed_publishes.add(1);
        }
        Some(replies.iter().map(|r| r.count).sum())
    }

    async fn disconnect_remote(&self, id: &ClientId, frame: &CloseFrame) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let link = self.link()?;
        let located =
            tokio::time::timeout_at(deadline, self.locate(&link, std::slice::from_ref(id)))
                .await
                .ok()?
                .ok()?;
        if located.is_empty() {
            return Some(0);
        }
        let (request, mut rx, _guard) = self.register_request();
        let messages: Vec<(String, Vec<u8>)> = located
            .iter()
            .map(|(member, _)| {
                let mut header = Header::new(Kind::Close, request, &link.member);
                header.t = vec![Cow::Borrowed(id.as_str())];
                header.c = usize::from(frame.code.0);
                (member.clone(), header.encode(frame.reason.as_bytes()))
            })
            .collect();
        self.count_published(Kind::Close, messages.len());
        let counts = tokio::time::timeout_at(deadline, self.publish_each(&link, messages))
            .await
            .ok()?;
        let expected: usize = counts
            .iter()
            .map(|c| usize::try_from(c.unwrap_or(0)).unwrap_or(0))
            .sum();
        let replies = self.collect(&mut rx, expected, deadline).await;
        Some(replies.iter().map(|r| r.count).sum())
    }

    async fn cluster_clients(&self) -> Option<Vec<ClientInfo>> {
        let link = self.link()?;
        let listing = async {
            let mut conn = link.conn.clone();
            let (now_ms, members) = read_nodes(&mut conn, &self.keys).await?;
            let mut merged: BTreeMap<ClientId, (usize, u64)> = BTreeMap::new();
            for (member, until_ms) in members {
                if until_ms <= now_ms || self.is_own(&member) {
                    continue;
                }
                let key = self.keys.ids(&member);
                let mut cursor = 0u64;
                loop {
                    let reply: Value = ::redis::cmd("HSCAN")
                        .arg(&key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await?;
                    let (next, fields) = scan_reply(reply);
                    for pair in fields.chunks_exact(2) {
                        let (Ok(id), Some((count, since))) =
                            (ClientId::new(&pair[0]), parse_presence(&pair[1]))
                        else {
                            continue;
                        };
                        let entry = merged.entry(id).or_insert((0, u64::MAX));
                        entry.0 += count;
                        entry.1 = entry.1.min(since);
                    }
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            for info in self.local.clients_now() {
                let since = info.connected_since_unix_ms;
                let entry = merged.entry(info.id).or_insert((0, u64::MAX));
                entry.0 += info.connections;
                entry.1 = entry.1.min(since);
            }
            Ok::<_, ::redis::RedisError>(
                merged
                    .into_iter()
                    .map(|(id, (connections, since))| ClientInfo {
                        id,
                        connections,
                        connected_since_unix_ms: since,
                    })
                    .collect(),
            )
        };
        tokio::time::timeout(self.config.request_timeout, listing)
            .await
            .ok()?
            .ok()
    }
}

fn frame_of(binary: bool, body: Bytes) -> WireFrame {
    if binary {
        WireFrame::from_binary(body)
    } else {
        WireFrame::text(body)
    }
}

// ---------------------------------------------------------------------------
// Reply parsing
// ---------------------------------------------------------------------------

fn string(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn strings(value: Value) -> Vec<String> {
    match value {
        Value::Array(items) | Value::Set(items) => items.into_iter().filter_map(string).collect(),
        _ => Vec::new(),
    }
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Int(n) => Some(*n as f64),
        Value::Double(d) => Some(*d),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// `TIME` → milliseconds.
fn time_ms(value: &Value) -> Option<u64> {
    let Value::Array(parts) = value else {
        return None;
    };
    let secs = number(parts.first()?)? as u64;
    let micros = number(parts.get(1)?)? as u64;
    Some(secs * 1000 + micros / 1000)
}

/// `ZRANGE … WITHSCORES`, RESP2 (flat) or RESP3 (pairs) → (member, score).
fn scored(value: Value) -> Vec<(String, u64)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if items.iter().all(|v| matches!(v, Value::Array(_))) {
        for item in items {
            if let Value::Array(mut pair) = item
                && pair.len() == 2
            {
                let score = number(&pair[1]).unwrap_or(0.0) as u64;
                if let Some(member) = string(pair.swap_remove(0)) {
                    out.push((member, score));
                }
            }
        }
    } else {
        let mut iter = items.into_iter();
        while let (Some(member), Some(score)) = (iter.next(), iter.next()) {
            let score = number(&score).unwrap_or(0.0) as u64;
            if let Some(member) = string(member) {
                out.push((member, score));
            }
        }
    }
    out
}

/// `HSCAN` → (next cursor, fields and values).
fn scan_reply(value: Value) -> (u64, Vec<String>) {
    let Value::Array(mut parts) = value else {
        return (0, Vec::new());
    };
    if parts.len() != 2 {
        return (0, Vec::new());
    }
    let items = strings(parts.pop().unwrap_or(Value::Nil));
    let cursor = parts.first().and_then(number).unwrap_or(0.0) as u64;
    (cursor, items)
}

fn parse_presence(value: &str) -> Option<(usize, u64)> {
    let (count, since) = value.split_once(',')?;
    Some((count.parse().ok()?, since.parse().ok()?))
}

/// Redis's clock and every member of `P:nodes` with its deadline.
async fn read_nodes(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
) -> Result<(u64, Vec<(String, u64)>), ::redis::RedisError> {
    let (time, nodes): (Value, Value) = ::redis::pipe()
        .cmd("TIME")
        .cmd("ZRANGE")
        .arg(keys.nodes())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(conn)
        .await?;
    let now = time_ms(&time).ok_or_else(|| {
        ::redis::RedisError::from((::redis::ErrorKind::TypeError, "unexpected TIME reply"))
    })?;
    Ok((now, scored(nodes)))
}

fn random_epoch() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let seed = (
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        N.fetch_add(1, Ordering::Relaxed),
        std::process::id(),
    );
    format!("{:08x}", RandomState::new().hash_one(seed) as u32)
}

// ---------------------------------------------------------------------------
// The connection supervisor
// ---------------------------------------------------------------------------

/// Why a connected session ended.
enum Ended {
    Lost(String),
    Stopped,
}

struct Session {
    link: Link,
    epoch: Arc<Epoch>,
    /// Topic channels this connection is subscribed to.
    subscribed: HashSet<Topic>,
    ended_tx: watch::Sender<bool>,
    /// Redis time minus local time, in ms, from the last `TIME`.
    clock_offset_ms: i64,
}

fn err(message: impl Into<String>) -> ::redis::RedisError {
    ::redis::RedisError::from((::redis::ErrorKind::IoError, "switchboard", message.into()))
}

fn local_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn supervise(shared: Arc<Shared>) {
    let _task = TaskGuard::new(&shared);
    let mut stop = shared.stop.subscribe();
    let mut backoff = MIN_BACKOFF;
    // Members of this node's earlier connections, to be marked dead once a
    // new connection is registered.
    let mut stale: Vec<Arc<str>> = Vec::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let member: Arc<str> = Arc::from(format!("{}#{}", shared.config.node_id, random_epoch()));
        let connect = connect(&shared, Arc::clone(&member), &stale);
        let attempt = tokio::select! {
            attempt = connect => attempt,
            _ = stop.changed() => return,
        };
        match attempt {
            Ok(mut session) => {
                stale.clear();
                backoff = MIN_BACKOFF;
                shared.stats.connects.add(1);
                *shared.last_error.lock() = None;
                *shared.link.write() = Some(session.link.clone());
                tracing::info!(node = %shared.config.node_id, member = %session.link.member, "connected to redis");
                let ended = run(&shared, &mut session, &mut stop).await;
                *shared.link.write() = None;
                session.epoch.ended.store(true, Ordering::Release);
                let _ = session.ended_tx.send(true);
                stale.push(member);
                match ended {
                    Ended::Stopped => return,
                    Ended::Lost(message) => {
                        shared.stats.connection_failures.add(1);
                        shared.set_error(format!("lost the redis connection: {message}"));
                    }
                }
            }
            Err(error) => {
                // It may have registered part of its presence. (Bounded: the
                // presence of a member not marked expires with its TTL anyway.)
                if stale.len() < 16 {
                    stale.push(member);
                }
                shared.stats.connection_failures.add(1);
                shared.set_error(format!("cannot connect to redis: {error}"));
            }
        }
        // Jitter of ±25 % so that nodes do not reconnect in lockstep.
        let jitter = RandomState::new().hash_one(local_ms()) % 50;
        let wait = backoff.mul_f64(0.75 + jitter as f64 / 100.0);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(
    shared: &Arc<Shared>,
    member: Arc<str>,
    stale: &[Arc<str>],
) -> Result<Session, ::redis::RedisError> {
    let timeout = shared.config.request_timeout;
    let (acks_tx, acks_rx) = mpsc::channel(ACK_QUEUE);
    let epoch = Arc::new(Epoch {
        member: Arc::clone(&member),
        ended: AtomicBool::new(false),
        lost: Notify::new(),
        acks: acks_tx,
    });
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let on_push = {
        let epoch = Arc::clone(&epoch);
        move |info: PushInfo| -> Result<(), std::convert::Infallible> {
            if let Some(shared) = weak.upgrade() {
                shared.on_push(&epoch, info);
            }
            Ok(())
        }
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout)
        .set_push_sender(on_push);
    let mut conn = shared
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let (ended_tx, ended_rx) = watch::channel(false);
    let mut session = Session {
        link: Link {
            conn: conn.clone(),
            member: Arc::clone(&member),
        },
        epoch: Arc::clone(&epoch),
        subscribed: HashSet::new(),
        ended_tx,
        clock_offset_ms: 0,
    };
    let setup = async {
        ::redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(format!("switchboard:{member}"))
            .exec_async(&mut conn)
            .await?;
        heartbeat(shared, &mut session, true).await?;
        ::redis::cmd("SSUBSCRIBE")
            .arg(shared.keys.node_channel(&member))
            .exec_async(&mut conn)
            .await?;
        // Subscriptions first, then presence: from the moment other nodes
        // can find an ID here, its messages have a listener.
        shared.dirty_topics.lock().clear();
        let topics = shared.local.topic_names();
        subscribe_topics(shared, &mut session, topics).await?;
        shared.dirty_ids.lock().clear();
        let ids: Vec<ClientId> = shared
            .local
            .clients_now()
            .into_iter()
            .map(|c| c.id)
            .collect();
        write_presence(shared, &session, ids).await?;
        // Our earlier lives, now that this one is registered (so an ID here
        // never looks offline in between): mark them dead, so that the next
        // cleanup removes their presence (`XX`: not if a cleanup already did).
        for previous in stale {
            ::redis::cmd("ZADD")
                .arg(shared.keys.nodes())
                .arg("XX")
                .arg(0)
                .arg(previous.as_ref())
                .exec_async(&mut conn)
                .await?;
        }
        Ok::<_, ::redis::RedisError>(())
    };
    setup.await?;
    let acker_shared = Arc::clone(shared);
    tokio::spawn(acker(acker_shared, conn, acks_rx, ended_rx));
    Ok(session)
}

/// Publishes the answers queued by the reader, in batches; ends with its
/// connection's epoch.
async fn acker(
    shared: Arc<Shared>,
    mut conn: MultiplexedConnection,
    mut rx: mpsc::Receiver<(String, Vec<u8>)>,
    mut ended: watch::Receiver<bool>,
) {
    let _task = TaskGuard::new(&shared);
    let timeout = shared.config.request_timeout;
    let mut batch = Vec::with_capacity(256);
    loop {
        tokio::select! {
            biased;
            _ = ended.changed() => return,
            n = rx.recv_many(&mut batch, 256) => if n == 0 { return },
        }
        shared.count_published(Kind::Ack, batch.len());
        let mut pipe = ::redis::pipe();
        for (channel, message) in batch.drain(..) {
            pipe.cmd("SPUBLISH").arg(channel).arg(message).ignore();
        }
        // A failure is the sender's timeout: it reports its targets
        // unconfirmed. The connection's loss is noticed by the supervisor.
        let _ = tokio::time::timeout(timeout, pipe.exec_async(&mut conn)).await;
    }
}

async fn run(
    shared: &Arc<Shared>,
    session: &mut Session,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let period = shared.config.presence_ttl / 3;
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = shared.config.request_timeout;
    loop {
        let result = tokio::select! {
            biased;
            _ = stop.changed() => {
                leave(shared, session).await;
                return Ended::Stopped;
            }
            () = session.epoch.lost.notified() => {
                return Ended::Lost("connection closed".to_owned());
            }
            _ = beat.tick() => {
                let work = async {
                    let (now, members) = heartbeat(shared, session, false).await?;
                    collect_garbage(shared, session, now, members).await
                };
                tokio::time::timeout(timeout * 4, work).await
            }
            () = shared.wake.notified() => {
                tokio::time::timeout(timeout * 4, flush(shared, session)).await
            }
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Ended::Lost(error.to_string()),
            Err(_) => return Ended::Lost("redis did not answer in time".to_owned()),
        }
    }
}

/// Refreshes this member's deadline and reads everyone else's: Redis's
/// clock (ms) and every member with its deadline.
async fn heartbeat(
    shared: &Shared,
    session: &mut Session,
    first: bool,
) -> Result<(u64, Vec<(String, u64)>), ::redis::RedisError> {
    let ttl_ms = shared.config.presence_ttl.as_millis() as i64;
    let mut conn = session.link.conn.clone();
    if first {
        let time: Value = ::redis::cmd("TIME").query_async(&mut conn).await?;
        let now = time_ms(&time).ok_or_else(|| err("unexpected TIME reply"))?;
        session.clock_offset_ms = now as i64 - local_ms();
    }
    let deadline = local_ms() + session.clock_offset_ms + ttl_ms;
    let (added, time, nodes): (i64, Value, Value) = ::redis::pipe()
        .cmd("ZADD")
        .arg(shared.keys.nodes())
        .arg(deadline)
        .arg(session.link.member.as_ref())
        .cmd("TIME")
        .cmd("ZRANGE")
        .arg(shared.keys.nodes())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await?;
    let read_at = Instant::now();
    let now = time_ms(&time).ok_or_else(|| err("unexpected TIME reply"))?;
    session.clock_offset_ms = now as i64 - local_ms();
    if added == 1 && !first {
        // Another node found us dead (we missed heartbeats for longer than
        // the TTL) and removed our presence: start over as a new member.
        return Err(err("this node's presence expired; re-registering"));
    }
    let members = scored(nodes);
    let mut live = HashMap::with_capacity(members.len());
    for (member, until) in &members {
        let left = Duration::from_millis(until.saturating_sub(now));
        live.insert(member.clone(), read_at + left);
    }
    *shared.live.lock() = live;
    Ok((now, members))
}

/// Removes the presence of members dead for longer than the TTL (killed
/// nodes, this node's previous lives), from the heartbeat's read of
/// `P:nodes` at Redis time `now`. One node does each: a lock key.
async fn collect_garbage(
    shared: &Shared,
    session: &Session,
    now: u64,
    members: Vec<(String, u64)>,
) -> Result<(), ::redis::RedisError> {
    let mut conn = session.link.conn.clone();
    let grace = shared.config.presence_ttl.as_millis() as u64;
    for (member, until) in members {
        if until.saturating_add(grace) >= now || member == *session.link.member {
            continue;
        }
        let locked: Option<String> = ::redis::cmd("SET")
            .arg(shared.keys.gc(&member))
            .arg(session.link.member.as_ref())
            .arg("NX")
            .arg("PX")
            .arg(grace.saturating_mul(3))
            .query_async(&mut conn)
            .await?;
        if locked.is_none() {
            continue;
        }
        tracing::info!(node = %shared.config.node_id, dead = %member, "removing the presence of a dead node");
        remove_member(shared, &mut conn, &member).await?;
    }
    Ok(())
}

/// Deletes every trace of `member`: its IDs' location entries, its hash,
/// its heartbeat.
async fn remove_member(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    member: &str,
) -> Result<(), ::redis::RedisError> {
    let key = shared.keys.ids(member);
    let mut cursor = 0u64;
    loop {
        let reply: Value = ::redis::cmd("HSCAN")
            .arg(&key)
            .arg(cursor)
            .arg("COUNT")
            .arg(BATCH)
            .query_async(conn)
            .await?;
        let (next, fields) = scan_reply(reply);
        let mut pipe = ::redis::pipe();
        for pair in fields.chunks_exact(2) {
            pipe.cmd("SREM")
                .arg(shared.keys.loc(&pair[0]))
                .arg(member)
                .ignore();
        }
        if !fields.is_empty() {
            pipe.exec_async(conn).await?;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    ::redis::pipe()
        .cmd("DEL")
        .arg(&key)
        .ignore()
        .cmd("ZREM")
        .arg(shared.keys.nodes())
        .arg(member)
        .ignore()
        .cmd("DEL")
        .arg(shared.keys.gc(member))
        .ignore()
        .exec_async(conn)
        .await
}

/// Applies the IDs and topics that changed since the last flush.
async fn flush(shared: &Shared, session: &mut Session) -> Result<(), ::redis::RedisError> {
    let topics: Vec<Topic> = shared.dirty_topics.lock().drain().collect();
    if !topics.is_empty() {
        subscribe_topics(shared, session, topics).await?;
    }
    let ids: Vec<ClientId> = shared.dirty_ids.lock().drain().collect();
    if !ids.is_empty() {
        write_presence(shared, session, ids).await?;
    }
    Ok(())
}

/// Makes the topic subscriptions match the local subscribers of `topics`.
/// One channel per `SSUBSCRIBE`, so that each command has one answer.
async fn subscribe_topics(
    shared: &Shared,
    session: &mut Session,
    topics: Vec<Topic>,
) -> Result<(), ::redis::RedisError> {
    let mut conn = session.link.conn.clone();
    for chunk in topics.chunks(BATCH) {
        let mut pipe = ::redis::pipe();
        let mut changes = Vec::new();
        for topic in chunk {
            let want = shared.local.has_topic(topic);
            let have = session.subscribed.contains(topic);
            if want != have {
                let command = if want { "SSUBSCRIBE" } else { "SUNSUBSCRIBE" };
                pipe.cmd(command)
                    .arg(shared.keys.topic_channel(topic))
                    .ignore();
                changes.push((topic.clone(), want));
            }
        }
        if changes.is_empty() {
            continue;
        }
        pipe.exec_async(&mut conn).await?;
        for (topic, subscribed) in changes {
            if subscribed {
                session.subscribed.insert(topic);
            } else {
                session.subscribed.remove(&topic);
            }
        }
    }
    Ok(())
}

/// Writes the current local state of each of `ids`.
async fn write_presence(
    shared: &Shared,
    session: &Session,
    ids: Vec<ClientId>,
) -> Result<(), ::redis::RedisError> {
    let member = session.link.member.as_ref();
    let hash = shared.keys.ids(member);
    let mut conn = session.link.conn.clone();
    for chunk in ids.chunks(BATCH) {
        let mut pipe = ::redis::pipe();
        for id in chunk {
            let loc = shared.keys.loc(id.as_str());
            match shared.local.presence(id) {
                Some((count, since)) => {
                    pipe.cmd("HSET")
                        .arg(&hash)
                        .arg(id.as_str())
                        .arg(format!("{count},{since}"))
                        .ignore();
                    pipe.cmd("SADD").arg(loc).arg(member).ignore();
                }
                None => {
                    pipe.cmd("HDEL").arg(&hash).arg(id.as_str()).ignore();
                    pipe.cmd("SREM").arg(loc).arg(member).ignore();
                }
            }
        }
        pipe.exec_async(&mut conn).await?;
    }
    Ok(())
}

/// Leaving the cluster on shutdown: remove this member's presence so that
/// other nodes report its IDs offline at once.
async fn leave(shared: &Shared, session: &Session) {
    let mut conn = session.link.conn.clone();
    let member = Arc::clone(&session.link.member);
    let work = remove_member(shared, &mut conn, &member);
    match tokio::time::timeout(shared.config.request_timeout, work).await {
        Ok(Ok(())) => tracing::info!(node = %shared.config.node_id, "left the cluster"),
        Ok(Err(error)) => tracing::warn!(%error, "could not remove this node's presence"),
        Err(_) => tracing::warn!("timed out removing this node's presence"),
    }
}

// ---------------------------------------------------------------------------
// The backend
// ---------------------------------------------------------------------------

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
        config.validate()?;
        let mut info = ::redis::IntoConnectionInfo::into_connection_info(config.url.as_str())
            .map_err(|err| RedisConfigError::Url {
                message: err.to_string(),
            })?;
        // RESP3: pushes (messages) and replies share one connection.
        info.redis.protocol = ::redis::ProtocolVersion::RESP3;
        let client = ::redis::Client::open(info).map_err(|err| RedisConfigError::Url {
            message: err.to_string(),
        })?;
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            keys: Keys::new(&config.key_prefix),
            own_prefix: format!("{}#", config.node_id),
            config,
            client,
            local: MemoryBackend::new(policy),
            link: RwLock::new(None),
            last_error: Mutex::new(Some("connecting to redis".to_owned())),
            live: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            dirty_ids: Mutex::new(HashSet::new()),
            dirty_topics: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            stop,
            stats: Stats::default(),
        });
        let supervisor = tokio::spawn(supervise(Arc::clone(&shared)));
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
        self.shared.mark_id(id);
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
        frame: &'a WireFrame,
    ) -> BoxFuture<'a, SendReport> {
        Box::pin(async move {
            let mut report = self.shared.local.send_now(targets, frame);
            if !targets.is_empty() {
                self.shared.send_remote(targets, frame, &mut report).await;
            }
            report
        })
    }

    fn publish<'a>(&'a self, topic: &'a Topic, frame: &'a WireFrame) -> BoxFuture<'a, usize> {
        Box::pin(async move {
            let local = self.shared.local.publish_now(topic, frame);
            match self.shared.publish_remote(topic, frame).await {
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
        use std::fmt::Write as _;
        let s = &self.shared.stats;
        let live = {
            let now = Instant::now();
            self.shared
                .live
                .lock()
                .values()
                .filter(|until| **until > now)
                .count()
        };
        let mut line = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        line(
            "switchboard_backend_up",
            "gauge",
            "1 while the cluster backend (redis) is connected, 0 while degraded (local delivery only).",
            u8::from(self.is_connected()).to_string(),
        );
        line(
            "switchboard_redis_connects_total",
            "counter",
            "Connections to Redis established (the first and every reconnection).",
            s.connects.get().to_string(),
        );
        line(
            "switchboard_redis_connection_failures_total",
            "counter",
            "Connection attempts that failed and connections lost.",
            s.connection_failures.get().to_string(),
        );
        line(
            "switchboard_cluster_nodes",
            "gauge",
            "Nodes alive in the last heartbeat read, this one included.",
            live.to_string(),
        );
        line(
            "switchboard_redis_pending_requests",
            "gauge",
            "Cross-node requests waiting for answers.",
            self.shared.pending.lock().len().to_string(),
        );
        line(
            "switchboard_redis_tasks",
            "gauge",
            "Background tasks of the redis backend (2 while connected).",
            s.tasks.load(Ordering::Relaxed).to_string(),
        );
        line(
            "switchboard_redis_remote_deliveries_total",
            "counter",
            "Frames queued to local connections for messages from other nodes.",
            s.remote_deliveries.get().to_string(),
        );
        line(
            "switchboard_redis_ack_timeouts_total",
            "counter",
            "Cross-node requests that did not get every answer in time.",
            s.ack_timeouts.get().to_string(),
        );
        line(
            "switchboard_redis_acks_dropped_total",
            "counter",
            "Answers not published because the answer queue was full.",
            s.acks_dropped.get().to_string(),
        );
        line(
            "switchboard_redis_unconfirmed_publishes_total",
            "counter",
            "Topic publishes that could not reach or hear from every node.",
            s.unconfirmed_publishes.get().to_string(),
        );
        line(
            "switchboard_redis_invalid_messages_total",
            "counter",
            "Messages on switchboard channels that could not be read.",
            s.invalid.get().to_string(),
        );
        for (name, counters, help) in [
            (
                "switchboard_redis_published_total",
                &s.published,
                "Messages published to other nodes, by kind.",
            ),
            (
                "switchboard_redis_received_total",
                &s.received,
                "Messages received from other nodes, by kind.",
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (label, counter) in KIND_LABELS.iter().zip(counters.iter()) {
                let _ = writeln!(out, "{name}{{kind=\"{label}\"}} {}", counter.get());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_with_the_payload_after_the_newline() {
        let mut header = Header::new(Kind::Send, 7, "a#1");
        header.i = vec![0, 2];
        header.t = vec![Cow::Borrowed("1"), Cow::Borrowed("x")];
        let wire = header.encode(b"{\"hi\":\n1}");
        let newline = wire.iter().position(|&b| b == b'\n').expect("a newline");
        let back: Header<'_> = serde_json::from_slice(&wire[..newline]).expect("header");
        assert_eq!(back.k, Kind::Send);
        assert_eq!(back.r, 7);
        assert_eq!(back.f, "a#1");
        assert_eq!(back.i, vec![0, 2]);
        assert_eq!(&wire[newline + 1..], b"{\"hi\":\n1}");
    }

    #[test]
    fn parses_resp2_and_resp3_scored_replies() {
        let flat = Value::Array(vec![
            Value::BulkString(b"a#1".to_vec()),
            Value::BulkString(b"1500".to_vec()),
        ]);
        assert_eq!(scored(flat), vec![("a#1".to_owned(), 1500)]);
        let pairs = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"b#2".to_vec()),
            Value::Double(2500.0),
        ])]);
        assert_eq!(scored(pairs), vec![("b#2".to_owned(), 2500)]);
        assert_eq!(
            parse_presence("3,1700000000000"),
            Some((3, 1_700_000_000_000))
        );
        assert_eq!(parse_presence("x"), None);
    }

    #[test]
    fn validates_the_config() {
        let ok = RedisConfig::new("redis://127.0.0.1:6379/");
        assert_eq!(ok.validate(), Ok(()));
        let mut bad = ok.clone();
        bad.node_id = "a#b".to_owned();
        assert!(matches!(bad.validate(), Err(RedisConfigError::NodeId(_))));
        let mut bad = ok.clone();
        bad.url = "http://nope".to_owned();
        assert!(matches!(bad.validate(), Err(RedisConfigError::Url { .. })));
        let mut bad = ok.clone();
        bad.key_prefix = "a b".to_owned();
        assert!(matches!(
            bad.validate(),
            Err(RedisConfigError::KeyPrefix(_))
        ));
        let mut bad = ok;
        bad.presence_ttl = Duration::from_millis(500);
        assert!(matches!(
            bad.validate(),
            Err(RedisConfigError::PresenceTtl(_))
        ));
        assert!(default_node_id().ends_with(&std::process::id().to_string()));
    }

    #[test]
    fn topic_channels_map_back_to_topics() {
        let keys = Keys::new("sb");
        let topic = Topic::new("room/1").expect("topic");
        let channel = keys.topic_channel(&topic);
        assert_eq!(channel, "sb:t:room/1");
        assert_eq!(keys.topic_of(channel.as_bytes()), Some(topic));
        assert_eq!(keys.topic_of(b"sb:n:x"), None);
    }
}
