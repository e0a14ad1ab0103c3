//! One sample of the server's state for the dashboard: the counters of
//! `GET /metrics`, errors by kind, the latest refusals, the backend's
//! health and, in a cluster, every node.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::backend::{BackendHealth, NodeInfo, unix_ms};
use crate::hub::Hub;
use crate::hub::refusals::Refusal;
use crate::metrics::ErrorKind;

/// How many of the latest refusals a sample carries (of the 100 the hub
/// keeps): enough for a table, ~3 KB of JSON.
pub(crate) const RECENT_REFUSALS: usize = 10;

/// How often the node listing is read from the backplane at most, however
/// many dashboards are open: it scans every other node's presence hash
/// (see `backend/redis/nodes.rs`).
pub(crate) const NODES_EVERY: Duration = Duration::from_secs(2);

/// The counters since the server started and the gauges now. Rates are the
/// differences between two samples over the difference of their `at_unix_ms`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Stats {
    /// When this sample was taken, in milliseconds since the Unix epoch.
    pub(crate) at_unix_ms: u64,
    /// WebSocket connections open on this node now.
    pub(crate) connections_open: u64,
    /// WebSocket connections accepted since start.
    pub(crate) connections_total: u64,
    /// Data frames received from clients.
    pub(crate) frames_in: u64,
    /// Frames written to clients.
    pub(crate) frames_out: u64,
    /// Bytes read from WebSocket connections.
    pub(crate) bytes_in: u64,
    /// Bytes written to WebSocket connections.
    pub(crate) bytes_out: u64,
    /// Frames queued to connections by the relay and `/api/send`.
    pub(crate) deliveries: u64,
    /// Frames queued to connections by topic publishes.
    pub(crate) publish_deliveries: u64,
    /// Relay and `/api/send` targets that had no live connection.
    pub(crate) offline_targets: u64,
    /// Messages not delivered: outgoing queue full, or still queued when
    /// the connection ended.
    pub(crate) dropped_messages: u64,
    /// Targets whose delivery on another node could not be confirmed.
    pub(crate) unconfirmed_targets: u64,
    /// Errors since start, by kind (the `kind` labels of
    /// `switchboard_errors_total`).
    pub(crate) errors: BTreeMap<String, u64>,
    /// Connections refused since start.
    pub(crate) refusals_total: u64,
    /// The latest refusals, oldest first.
    pub(crate) recent_refusals: Vec<Refusal>,
    /// This node's backend.
    pub(crate) backend: BackendHealth,
    /// Every node of the cluster as the backplane sees it (read at most
    /// every 2 s); `null` for a single node or while the backplane cannot
    /// be read.
    pub(crate) nodes: Option<Vec<NodeInfo>>,
}

/// The last node listing and when it was read, shared by every stream.
#[derive(Default)]
pub(crate) struct NodesCache {
    last: tokio::sync::Mutex<Option<(Instant, Option<Vec<NodeInfo>>)>>,
}

impl NodesCache {
    /// The node listing, read again when the last is [`NODES_EVERY`] old;
    /// `None` for a single-node backend (without asking it).
    async fn get(&self, hub: &Hub, clustered: bool) -> Option<Vec<NodeInfo>> {
        if !clustered {
            return None;
        }
        // Held across the read: streams that want it meanwhile wait for
        // this read rather than starting their own.
        let mut last = self.last.lock().await;
        if let Some((at, nodes)) = last.as_ref()
            && at.elapsed() < NODES_EVERY
        {
            return nodes.clone();
        }
        let nodes = hub.backend().nodes().await;
        *last = Some((Instant::now(), nodes.clone()));
        nodes
    }
}

/// A sample of `hub` now.
pub(crate) async fn sample(hub: &Hub, nodes: &NodesCache) -> Stats {
    let m = hub.metrics();
    let backend = hub.backend().health();
    let nodes = nodes.get(hub, backend.node.is_some()).await;
    let mut recent = hub.recent_refusals();
    let skip = recent.len().saturating_sub(RECENT_REFUSALS);
    recent.drain(..skip);
    Stats {
        at_unix_ms: unix_ms(SystemTime::now()),
        connections_open: hub.live_connections() as u64,
        connections_total: m.connections_total.get(),
        frames_in: m.frames_in.get(),
        frames_out: m.frames_out.get(),
        bytes_in: m.bytes_in.get(),
        bytes_out: m.bytes_out.get(),
        deliveries: m.deliveries.get(),
        publish_deliveries: m.publish_deliveries.get(),
        offline_targets: m.offline_targets.get(),
        dropped_messages: m.dropped_messages.get(),
        unconfirmed_targets: m.unconfirmed_targets.get(),
        errors: ErrorKind::all()
            .iter()
            .map(|kind| (kind.label().to_owned(), m.errors(*kind)))
            .collect(),
        refusals_total: hub.refusals_total(),
        recent_refusals: recent,
        backend,
        nodes,
    }
}
