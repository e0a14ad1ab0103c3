//! Where client IDs and topic subscriptions live: the [`Backend`] trait, the
//! types its methods return, and its two implementations — [`memory`] (one
//! node, the default) and `redis` (several nodes sharing a Redis, behind the
//! `redis` feature).
//!
//! A backend stores connections as [`ConnRef`]s, the runtime's type-erased
//! handle to a connection's mailbox; it never sees a socket or a handler.

use std::time::SystemTime;

use crate::BoxFuture;
use crate::id::{ClientId, Topic};
use crate::protocol::close::CloseFrame;
use crate::protocol::frame::WireFrame;
use crate::runtime::mailbox::{ConnId, ConnRef};

pub(crate) mod memory;
#[cfg(feature = "redis")]
pub mod redis;

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
/// The in-memory [`MemoryBackend`](memory::MemoryBackend) is the default. The trait is shaped for a
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

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
