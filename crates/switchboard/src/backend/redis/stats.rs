//! The backend's own metrics (`switchboard_redis_*`, `switchboard_backend_up`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use super::Shared;
use super::wire::Kind;
use crate::metrics::Counter;

#[derive(Default)]
pub(super) struct Stats {
    pub(super) connects: Counter,
    pub(super) connection_failures: Counter,
    pub(super) published: [Counter; 5],
    pub(super) received: [Counter; 5],
    pub(super) ack_timeouts: Counter,
    pub(super) acks_dropped: Counter,
    pub(super) invalid: Counter,
    pub(super) remote_deliveries: Counter,
    pub(super) unconfirmed_publishes: Counter,
    pub(super) shard_resubscribes: Counter,
    pub(super) expired_drops: Counter,
    pub(super) v1_fills: Counter,
    pub(super) v1_skipped: Counter,
    pub(super) tasks: AtomicI64,
}

pub(super) fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Send => 0,
        Kind::Pub => 1,
        Kind::Close => 2,
        Kind::Ack => 3,
        Kind::Sync => 4,
    }
}

pub(super) const KIND_LABELS: [&str; 5] = ["send", "pub", "close", "ack", "sync"];

impl Stats {
    /// Appends the backend's metrics in the Prometheus text format.
    pub(super) fn render(&self, shared: &Shared, connected: bool, out: &mut String) {
        let s = self;
        let live = {
            let now = Instant::now();
            shared
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
            u8::from(connected).to_string(),
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
            "switchboard_redis_location_cache_entries",
            "gauge",
            "IDs whose location this node holds from Redis until Redis says it changed (client-side caching).",
            shared.loc_cache.len().to_string(),
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
            shared.pending.lock().len().to_string(),
        );
        line(
            "switchboard_redis_resync_pending",
            "gauge",
            "IDs and topics changed locally whose state is still to be written to Redis.",
            shared.resync_pending().to_string(),
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
            "switchboard_redis_shard_resubscribes_total",
            "counter",
            "Shard channels subscribed again after a Redis Cluster moved their slot.",
            s.shard_resubscribes.get().to_string(),
        );
        line(
            "switchboard_redis_unresponsive_nodes",
            "gauge",
            "Nodes that let a request time out and have not answered since (sends wait for them only briefly).",
            shared.suspects.lock().len().to_string(),
        );
        line(
            "switchboard_redis_expired_messages_total",
            "counter",
            "Messages from other nodes neither delivered nor answered because this node's presence had expired (it was frozen or starved for longer than its TTL).",
            s.expired_drops.get().to_string(),
        );
        line(
            "switchboard_redis_v1_connections",
            "gauge",
            "switchboard.v1 connections of this node, each with a sequence gate.",
            shared.v1.read().by_conn.len().to_string(),
        );
        line(
            "switchboard_redis_v1_fills_total",
            "counter",
            "Holes in a v1 connection's sequence read from the inbox stream (a message arrived after a later one, or never came over pub/sub).",
            s.v1_fills.get().to_string(),
        );
        line(
            "switchboard_redis_v1_skipped_seqs_total",
            "counter",
            "Sequence numbers a v1 connection skipped: neither delivered nor retained when their hole was read.",
            s.v1_skipped.get().to_string(),
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
