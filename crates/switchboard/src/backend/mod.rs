//! Where client IDs and topic subscriptions live: the [`Backend`] trait, the
//! types its methods return, and its two implementations — [`memory`] (one
//! node, the default) and `redis` (several nodes sharing a Redis, behind the
//! `redis` feature).
//!
//! A backend stores connections as [`ConnRef`]s, the runtime's type-erased
//! handle to a connection's mailbox; it never sees a socket or a handler.

use std::sync::Arc;
use std::time::SystemTime;

use crate::BoxFuture;
use crate::id::{ClientId, Topic};
use crate::protocol::close::CloseFrame;
use crate::runtime::delivery::Envelope;
use crate::runtime::mailbox::{ConnId, ConnRef};

pub(crate) mod conns;
pub(crate) mod dedup;
pub(crate) mod inbox;
pub(crate) mod listing;
pub(crate) mod memory;
pub(crate) mod outcomes;
pub(crate) mod presence;

pub use dedup::Dedup;
pub use inbox::{Attached, Replay, ResumePoint, ResumeStatus, Retained};
pub use listing::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, NodeInfo, Page, PageQuery, TopicInfo};
pub use outcomes::{TargetOutcome, TargetOutcomes};
pub use presence::{Departure, MAX_META_BYTES, PresenceMember, PresenceMode, PresenceSnapshot};
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
    /// The backend cannot reach the store of the ID's `switchboard.v1`
    /// inbox now (a clustered node that lost Redis): retry later (a v1
    /// client is closed with 4102, "reconnect with backoff and resume").
    #[error("the inbox store cannot be reached: {0}")]
    Unavailable(String),
}

/// The result of sending one message to a list of client IDs. Each list
/// holds indexes into the `targets` slice that was sent to; `delivered`,
/// `offline`, `dropped` and `unconfirmed` together hold each index once.
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
    /// Targets whose inbox kept the message (`switchboard.v1` IDs seen
    /// recently): if they are offline or dropped it now, they get it when
    /// they resume within `v1.inbox_ttl`. Overlaps the lists above.
    pub retained: Vec<usize>,
    /// Connections the message was queued to, over all targets.
    pub connections: usize,
}

/// What a send did, counted rather than listed: for a sender that reads
/// no per-target lists (the plain relay). Each target counts in one of
/// `delivered`, `offline` and `dropped`, as in a [`SendReport`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendCounts {
    /// Targets with at least one connection that accepted the frame.
    pub delivered: usize,
    /// Targets with no live connection.
    pub offline: usize,
    /// Targets whose every connection refused the frame.
    pub dropped: usize,
    /// Connections the message was queued to, over all targets.
    pub connections: usize,
}

/// Delivery that never waits, offered by a backend whose IDs and topics
/// are all in this process (the in-memory backend) through
/// [`Backend::immediate`].
///
/// Why a second way to send: [`Backend::send`] returns a boxed future and
/// a report of lists, three allocations per message that a backend which
/// never waits and a sender that reads no lists do not need (heaptrack on
/// `tests/allocations.rs`). The plain relay uses this when it is offered.
pub trait Immediate: Send + Sync {
    /// [`Backend::send`], at once: numbers `message` in each target's inbox
    /// (if it has one), queues it to every connection of every target,
    /// named by its text, and counts what happened.
    fn send_counted(&self, targets: &[&str], message: &Envelope) -> SendCounts;
    /// [`Backend::send`] for a `switchboard.v1` sender, at once: as
    /// `send_counted`, and each target's outcome and whether its inbox
    /// kept the message, for the sender's ack. Why not `send`: its boxed
    /// future and report lists, and the await that sent the ack in a
    /// write of its own, were what a v1 send cost beyond a plain one
    /// (docs/design.md, "Per-message costs").
    /// Targets are named by their text, as in `send_counted`.
    fn send_outcomes(&self, targets: &[&str], message: &Arc<Envelope>) -> TargetOutcomes;
    /// [`Backend::dedup`], at once.
    fn dedup_now(&self, sender: &ClientId, mid: &str) -> Dedup;
    /// [`Backend::publish`], at once: queues `message` to every subscriber
    /// of its topic; returns how many connections it was queued to.
    fn publish_counted(&self, message: &Envelope) -> usize;
}

/// One client ID's live connections, for `GET /api/connections`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct ClientInfo {
    /// The client ID.
    #[schema(value_type = String)]
    pub id: ClientId,
    /// How many connections it has.
    pub connections: usize,
    /// When its oldest live connection was accepted, in milliseconds since
    /// the Unix epoch.
    pub connected_since_unix_ms: u64,
}

/// A backend's state, for `GET /heartbeat` and `GET /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
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
/// future. Messages arrive as an [`Envelope`], whose payload a backend
/// forwards unchanged to every local connection ([`ConnRef::deliver`] picks
/// each connection's frame) and can put on the wire to other nodes as it is.
///
/// The `switchboard.v1` methods (`attach`, `replay`, `dedup*`) have defaults
/// for a backend without inboxes: v1 clients then always resume `new` or
/// `reset`, and sends are not deduplicated.
pub trait Backend: Send + Sync + 'static {
    /// Adds `conn` under `id`, applying the backend's duplicate-ID policy.
    fn register(&self, id: &ClientId, conn: &ConnRef) -> Result<(), RegisterError>;
    /// Removes connection `conn` from `id`; a no-op if it is not there.
    fn unregister(&self, id: &ClientId, conn: ConnId);
    /// Applies the duplicate-ID policy across nodes to `conn`, which
    /// [`register`](Self::register) has just added under `id` (that call
    /// applied it on this node). Under `reject-new`, `Err` when another
    /// node has `id`: the caller then drops the connection (which
    /// unregisters it). Under `replace-oldest`, older connections of `id`
    /// on other nodes are closed with 4001, and `conn` itself if a newer
    /// one raced it. The default, for a single-node backend: nothing to do.
    fn settle_duplicate_ids<'a>(
        &'a self,
        id: &'a ClientId,
        conn: ConnId,
    ) -> BoxFuture<'a, Result<(), RegisterError>> {
        let _ = (id, conn);
        Box::pin(std::future::ready(Ok(())))
    }
    /// Subscribes `conn` to `topic`.
    fn subscribe(&self, topic: &Topic, conn: &ConnRef);
    /// Unsubscribes connection `conn` from `topic`.
    fn unsubscribe(&self, topic: &Topic, conn: ConnId);
    /// Numbers `message` in each target's inbox (if it has one), queues it
    /// to every connection of every target, and reports, per target, what
    /// happened.
    fn send<'a>(
        &'a self,
        targets: &'a [ClientId],
        message: &'a Arc<Envelope>,
    ) -> BoxFuture<'a, SendReport>;
    /// Queues `message` to every subscriber of `topic`; returns how many
    /// connections it was queued to.
    fn publish<'a>(&'a self, topic: &'a Topic, message: &'a Arc<Envelope>) -> BoxFuture<'a, usize>;
    /// Delivery that never waits, for a backend that can always deliver
    /// without waiting (all its IDs and topics are in this process); see
    /// [`Immediate`]. The default: `None` (use `send` and `publish`).
    fn immediate(&self) -> Option<&dyn Immediate> {
        None
    }
    /// Delivery that never waits for a send to `targets` (named by their
    /// text), for a backend that can sometimes deliver without waiting: the
    /// Redis backend when its location cache says every target is on this
    /// node or nowhere. `None`: use `send`. The default:
    /// [`immediate`](Self::immediate).
    fn immediate_send(&self, targets: &[&str]) -> Option<&dyn Immediate> {
        let _ = targets;
        self.immediate()
    }
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

    /// One page of the client IDs (see [`PageQuery`]), of the whole cluster
    /// when the backend has one and can reach it, else of this node. The
    /// default pages through [`cluster_clients`](Self::cluster_clients) or
    /// [`clients`](Self::clients).
    fn client_page<'a>(&'a self, query: &'a PageQuery) -> BoxFuture<'a, Page<ClientInfo>> {
        Box::pin(async move {
            let all = match self.cluster_clients().await {
                Some(all) => all,
                None => self.clients().await,
            };
            listing::page_of(all, query)
        })
    }

    /// One page of the topics with a subscriber on this node, with their
    /// subscriber counts. The default: none.
    fn topic_page<'a>(&'a self, query: &'a PageQuery) -> BoxFuture<'a, Page<TopicInfo>> {
        let _ = query;
        Box::pin(std::future::ready(Page {
            items: Vec::new(),
            next: None,
        }))
    }

    /// The nodes of the cluster as the backplane sees them, or `None` for a
    /// single-node backend or when the backplane cannot be reached. The
    /// default: `None`.
    fn nodes(&self) -> BoxFuture<'_, Option<Vec<NodeInfo>>> {
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

    /// Registers the `switchboard.v1` connection `conn` under `id` (as
    /// [`register`](Self::register) does), gives the ID an inbox if it has
    /// none, and finds what a client at `resume` missed. Every message
    /// numbered after [`Attached::top`] reaches `conn` live; the caller
    /// queues [`Attached::replay`] ahead of them (the connection's mailbox
    /// is held meanwhile). The default registers and resumes nothing.
    fn attach<'a>(
        &'a self,
        id: &'a ClientId,
        conn: &'a ConnRef,
        resume: Option<&'a ResumePoint>,
    ) -> BoxFuture<'a, Result<Attached, RegisterError>> {
        let result = self.register(id, conn).map(|()| Attached {
            epoch: String::new(),
            top: 0,
            status: if resume.is_some() {
                ResumeStatus::Reset
            } else {
                ResumeStatus::New
            },
            lost: Vec::new(),
            replay: Vec::new(),
        });
        Box::pin(std::future::ready(result))
    }

    /// The retained messages of `id`'s inbox numbered `from..=to`. The
    /// default has none.
    fn replay<'a>(&'a self, id: &'a ClientId, from: u64, to: u64) -> BoxFuture<'a, Replay> {
        let _ = id;
        Box::pin(std::future::ready(Replay::nothing_retained(from, to)))
    }

    /// Looks up `sender`'s message id `mid` (see [`Dedup`]) and marks it in
    /// flight if it is new. The default deduplicates nothing.
    fn dedup<'a>(&'a self, sender: &'a ClientId, mid: &'a str) -> BoxFuture<'a, Dedup> {
        let _ = (sender, mid);
        Box::pin(std::future::ready(Dedup::New))
    }

    /// Records the report of `sender`'s send `mid`, for `dedup_ttl`.
    fn dedup_done(&self, sender: &ClientId, mid: &str, report: Arc<str>) {
        let _ = (sender, mid, report);
    }

    /// Forgets `sender`'s send `mid` that did not finish.
    fn dedup_abort(&self, sender: &ClientId, mid: &str) {
        let _ = (sender, mid);
    }

    /// A connection of `member` joined `topic`'s presence with `meta`
    /// (JSON text, at most [`MAX_META_BYTES`]): a join if the ID was not a
    /// member on any node, an update if its meta changed, else nothing.
    /// Resolves once the change is visible to [`presence`](Self::presence)
    /// on every node. The default (a backend without presence) does
    /// nothing.
    fn presence_join<'a>(
        &'a self,
        topic: &'a Topic,
        member: &'a ClientId,
        meta: Option<Arc<str>>,
    ) -> BoxFuture<'a, ()> {
        let _ = (topic, member, meta);
        Box::pin(std::future::ready(()))
    }

    /// A connection of `member` left `topic`'s presence; if it was the
    /// ID's last anywhere, the member leaves now or after the leave delay,
    /// as `departure` says. Never waits (it is called when connections
    /// end).
    fn presence_leave(&self, topic: &Topic, member: &ClientId, departure: Departure) {
        let _ = (topic, member, departure);
    }

    /// Sends `topic`'s presence frames to `watcher` in `mode` from now on;
    /// resolves to the snapshot they follow (every frame sent after has a
    /// higher `rev`). `None`: the backend has no presence (the default) or
    /// cannot read it now.
    fn presence_watch<'a>(
        &'a self,
        topic: &'a Topic,
        watcher: &'a ConnRef,
        mode: PresenceMode,
    ) -> BoxFuture<'a, Option<PresenceSnapshot>> {
        let _ = (topic, watcher, mode);
        Box::pin(std::future::ready(None))
    }

    /// Stops sending `topic`'s presence frames to connection `watcher`.
    fn presence_unwatch(&self, topic: &Topic, watcher: ConnId) {
        let _ = (topic, watcher);
    }

    /// `topic`'s presence over the whole cluster, or `None` when the
    /// backend has no presence (the default) or cannot read it now.
    fn presence<'a>(
        &'a self,
        topic: &'a Topic,
        mode: PresenceMode,
    ) -> BoxFuture<'a, Option<PresenceSnapshot>> {
        let _ = (topic, mode);
        Box::pin(std::future::ready(None))
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
