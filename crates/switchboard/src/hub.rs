//! The hub: one per server, shared by every connection. It holds the
//! [`Backend`] (registry and topics), the limits, the metrics, and the set of
//! all live connections used for graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::auth::{IpLimiter, Security};
use crate::config::Limits;
use crate::conn::{ConnId, ConnRef};
use crate::expiry::Expiry;
use crate::id::{ClientId, Topic};
use crate::memory::MemoryBackend;
use crate::metrics::Metrics;
use crate::protocol::close::CloseFrame;
use crate::protocol::frame::WireFrame;

/// A boxed future, as returned by [`Backend`]'s asynchronous methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What happens when a client ID that already has a connection connects again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DuplicateIds {
    /// Keep every connection (a user with two tabs gets messages in both).
    #[default]
    Allow,
    /// Close the oldest connection of that ID with 4001 and keep the new one.
    ReplaceOldest,
    /// Refuse the new connection with HTTP 409 before the upgrade.
    RejectNew,
}

/// Why [`Conn::register`](crate::Conn::register) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The ID is connected already and the policy is `reject-new`; refuse
    /// the client (the relay answers HTTP 409) or pick another ID.
    #[error("client id {0} is already connected and duplicate_ids is \"reject-new\"")]
    AlreadyConnected(ClientId),
}

/// The result of sending one frame to a list of client IDs. Each list holds
/// indexes into the `targets` slice that was sent to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendReport {
    /// Targets with at least one connection that accepted the frame.
    pub delivered: Vec<usize>,
    /// Targets with no live connection.
    pub offline: Vec<usize>,
    /// Targets whose every connection refused the frame (queue full or
    /// closing): connected, but the message was not delivered.
    pub dropped: Vec<usize>,
    /// Targets not delivered on this node whose delivery elsewhere could not
    /// be confirmed: a clustered backend could not reach its backplane, or a
    /// node that has the target did not answer in time. Treat them as not
    /// delivered. Always empty with the in-memory backend.
    pub unconfirmed: Vec<usize>,
    /// Connections the frame was queued to, over all targets.
    pub connections: usize,
}

/// One client ID's live connections, for `GET /api/connections`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ClientInfo {
    /// The client ID.
    pub id: ClientId,
    /// How many connections it has.
    pub connections: usize,
    /// When its oldest live connection was accepted, in milliseconds since
    /// the Unix epoch.
    pub connected_since_unix_ms: u64,
}

/// A backend's state, for `GET /heartbeat` and `GET /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct BackendHealth {
    /// The backend's name: `"memory"`, `"redis"`.
    pub backend: &'static str,
    /// This node's name in the cluster; `None` for a single-node backend.
    pub node: Option<String>,
    /// `false` while the backend cannot do everything it should (a clustered
    /// backend that lost its backplane: local delivery works, cross-node
    /// delivery does not).
    pub healthy: bool,
    /// Why it is not healthy.
    pub reason: Option<String>,
}

impl BackendHealth {
    /// A healthy single-node backend named `backend`.
    pub fn healthy(backend: &'static str) -> Self {
        Self {
            backend,
            node: None,
            healthy: true,
            reason: None,
        }
    }

    /// This node's name in the cluster.
    pub fn with_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// Marks the backend degraded, saying why.
    pub fn degraded(mut self, reason: impl Into<String>) -> Self {
        self.healthy = false;
        self.reason = Some(reason.into());
        self
    }
}

/// Where client IDs and topic subscriptions live.
///
/// The in-memory [`MemoryBackend`] is the default. The trait is shaped for a
/// backplane such as Redis: registering and subscribing are synchronous
/// (local bookkeeping first, remote propagation may follow in the
/// background), while everything that must report what happened across the
/// cluster — `send`, `publish`, `connections`, `disconnect` — returns a
/// future. Frames arrive encoded ([`WireFrame`]), so a backend forwards the
/// same bytes to every local connection and can put the payload on the wire
/// to other nodes unchanged.
pub trait Backend: Send + Sync + 'static {
    /// Adds `conn` under `id`, applying the backend's duplicate-ID policy.
    fn register(&self, id: &ClientId, conn: &ConnRef) -> Result<(), RegisterError>;
    /// Removes connection `conn` from `id`; a no-op if it is not there.
    fn unregister(&self, id: &ClientId, conn: ConnId);
    /// Subscribes `conn` to `topic`.
    fn subscribe(&self, topic: &Topic, conn: &ConnRef);
    /// Unsubscribes connection `conn` from `topic`.
    fn unsubscribe(&self, topic: &Topic, conn: ConnId);
    /// Queues `frame` to every connection of every target and reports, per
    /// target, whether it was delivered, offline or dropped.
    fn send<'a>(
        &'a self,
        targets: &'a [ClientId],
        frame: &'a WireFrame,
    ) -> BoxFuture<'a, SendReport>;
    /// Queues `frame` to every subscriber of `topic`; returns how many
    /// connections it was queued to.
    fn publish<'a>(&'a self, topic: &'a Topic, frame: &'a WireFrame) -> BoxFuture<'a, usize>;
    /// Lists every client ID registered on this node.
    fn clients(&self) -> BoxFuture<'_, Vec<ClientInfo>>;
    /// Closes every connection of `id` with `frame`, on every node; returns
    /// how many.
    fn disconnect<'a>(&'a self, id: &'a ClientId, frame: CloseFrame) -> BoxFuture<'a, usize>;

    /// Lists every client ID of the whole cluster (IDs connected to several
    /// nodes once, with their connections added up), or `None` when the
    /// backend has no cluster or cannot reach it now. The default: `None`.
    fn cluster_clients(&self) -> BoxFuture<'_, Option<Vec<ClientInfo>>> {
        Box::pin(std::future::ready(None))
    }

    /// The backend's state; the default is a healthy `"memory"` backend.
    fn health(&self) -> BackendHealth {
        BackendHealth::healthy("memory")
    }

    /// Appends the backend's own metrics, in the Prometheus text format, to
    /// `GET /metrics`. The default adds nothing.
    fn render_metrics(&self, out: &mut String) {
        let _ = out;
    }
}

/// The hub every connection and API call shares. Cloning is a reference
/// count.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    backend: Arc<dyn Backend>,
    limits: Limits,
    security: Security,
    metrics: Metrics,
    live: Tracker,
    /// Per-IP admission of WebSocket upgrades.
    ip_limiter: IpLimiter,
    /// Scheduled closes (`Conn::close_at`), created on first use.
    expiry: OnceLock<Arc<Expiry>>,
}

/// Builds a [`Hub`] with a backend and security settings:
/// `Hub::builder(limits).backend(b).security(s).build()`.
#[must_use]
pub struct HubBuilder {
    limits: Limits,
    backend: Option<Arc<dyn Backend>>,
    security: Security,
}

impl HubBuilder {
    /// Where IDs and topics live (default: a [`MemoryBackend`] with the
    /// limits' duplicate-ID policy).
    pub fn backend(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Authentication, origins, API keys, trusted proxies (default: none
    /// of them; see [`Security`]).
    pub fn security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// The hub.
    pub fn build(self) -> Hub {
        let backend = self
            .backend
            .unwrap_or_else(|| Arc::new(MemoryBackend::new(self.limits.duplicate_ids)));
        Hub {
            inner: Arc::new(HubInner {
                backend,
                limits: self.limits,
                security: self.security,
                metrics: Metrics::default(),
                live: Tracker::default(),
                ip_limiter: IpLimiter::default(),
                expiry: OnceLock::new(),
            }),
        }
    }
}

impl Hub {
    /// A hub with the in-memory backend and no security settings.
    pub fn new(limits: Limits) -> Self {
        Self::builder(limits).build()
    }

    /// A hub with a custom backend.
    pub fn with_backend(limits: Limits, backend: Arc<dyn Backend>) -> Self {
        Self::builder(limits).backend(backend).build()
    }

    /// A builder, to set the backend and the [`Security`] settings.
    pub fn builder(limits: Limits) -> HubBuilder {
        HubBuilder {
            limits,
            backend: None,
            security: Security::default(),
        }
    }

    /// Authentication, origins, API keys and trusted proxies.
    pub fn security(&self) -> &Security {
        &self.inner.security
    }

    pub(crate) fn ip_limiter(&self) -> &IpLimiter {
        &self.inner.ip_limiter
    }

    pub(crate) fn expiry(&self) -> &Arc<Expiry> {
        self.inner.expiry.get_or_init(Arc::default)
    }

    /// The backend (registry and topics).
    pub fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
    }

    /// The limits every connection runs with.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The server's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Encodes a text frame once, to be sent to any number of connections.
    pub fn encode_text(text: impl Into<Bytes>) -> WireFrame {
        WireFrame::text(text.into())
    }

    /// Sends `frame` to every connection of each target.
    pub async fn send(&self, targets: &[ClientId], frame: &WireFrame) -> SendReport {
        let report = self.backend().send(targets, frame).await;
        let m = self.metrics();
        m.deliveries.add(report.connections as u64);
        m.offline_targets.add(report.offline.len() as u64);
        m.dropped_messages.add(report.dropped.len() as u64);
        m.unconfirmed_targets.add(report.unconfirmed.len() as u64);
        report
    }

    /// Publishes `frame` to every subscriber of `topic`; returns the number
    /// of connections it was queued to.
    pub async fn publish(&self, topic: &Topic, frame: &WireFrame) -> usize {
        let n = self.backend().publish(topic, frame).await;
        self.metrics().publish_deliveries.add(n as u64);
        n
    }

    /// How many WebSocket connections are open on this node.
    pub fn live_connections(&self) -> usize {
        self.inner.live.count.load(Ordering::Relaxed)
    }

    /// Asks every live connection to close with `frame` after flushing what
    /// is queued to it.
    pub fn close_all(&self, frame: CloseFrame) {
        let all: Vec<ConnRef> = self
            .inner
            .live
            .shards
            .iter()
            .flat_map(|shard| shard.lock().values().cloned().collect::<Vec<_>>())
            .collect();
        for conn in all {
            conn.close(frame.clone());
        }
    }

    /// Waits until no WebSocket connection is left on this node.
    pub async fn drained(&self) {
        loop {
            let notified = self.inner.live.empty.notified();
            if self.live_connections() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn track(&self, conn: ConnRef) {
        let live = &self.inner.live;
        live.count.fetch_add(1, Ordering::Relaxed);
        self.metrics().connections_total.add(1);
        live.shard(conn.id()).lock().insert(conn.id(), conn);
    }

    pub(crate) fn untrack(&self, id: ConnId) {
        if let Some(expiry) = self.inner.expiry.get() {
            expiry.cancel(id);
        }
        let live = &self.inner.live;
        live.shard(id).lock().remove(&id);
        if live.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            live.empty.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("live_connections", &self.live_connections())
            .finish_non_exhaustive()
    }
}

/// Every live connection of this node, whether or not it registered an ID,
/// so that shutdown can close them all. Sharded by connection number so
/// that connects and disconnects on different cores rarely share a lock.
struct Tracker {
    shards: Box<[Mutex<HashMap<ConnId, ConnRef>>]>,
    count: AtomicUsize,
    empty: Notify,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            shards: (0..16).map(|_| Mutex::new(HashMap::new())).collect(),
            count: AtomicUsize::new(0),
            empty: Notify::new(),
        }
    }
}

impl Tracker {
    fn shard(&self, id: ConnId) -> &Mutex<HashMap<ConnId, ConnRef>> {
        &self.shards[(id.0 as usize) % self.shards.len()]
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
