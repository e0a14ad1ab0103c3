//! Redis Cluster: a shard channel follows its slot. When a slot moves to
//! another master (a resharding, or a failover seen by a replica that
//! kept our subscription), the node that had the slot drops its
//! subscribers with a `sunsubscribe` push. A channel this node still needs
//! (its inbox, a topic with local subscribers, a watched presence topic)
//! is then subscribed again at once on the current connection, which
//! routes the `SSUBSCRIBE` to the slot's new owner (following `MOVED`).
//! Messages published in between reach no one here: a send waiting for
//! this node's answer reports its targets `unconfirmed`, never lost
//! silently. If the new subscription fails, the connection is restarted
//! (which subscribes everything again).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ::redis::Value;

use super::{Epoch, Shared};

impl Shared {
    /// A `sunsubscribe` push on a cluster connection: re-subscribes
    /// `channel` if this node still needs it (our own `SUNSUBSCRIBE`s
    /// are for channels no longer needed, and end here).
    pub(super) fn on_shard_unsubscribed(&self, epoch: &Arc<Epoch>, data: Vec<Value>) {
        if !self.client.is_cluster() || epoch.ended.load(Ordering::Acquire) {
            return;
        }
        let Some(Value::BulkString(channel)) = data.into_iter().next() else {
            return;
        };
        let wanted = channel == self.keys.node_channel(&epoch.member).as_bytes()
            || self
                .keys
                .topic_of(&channel)
                .is_some_and(|topic| self.local.has_topic(&topic))
            || self
                .keys
                .presence_topic_of(&channel)
                .is_some_and(|topic| self.presence.watchers.is_watched(&topic));
        if !wanted {
            return;
        }
        let (Some(shared), Some(link)) = (self.me.upgrade(), self.link()) else {
            return;
        };
        if link.member != epoch.member {
            return;
        }
        self.stats.shard_resubscribes.add(1);
        let epoch = Arc::clone(epoch);
        tokio::spawn(async move {
            let mut conn = link.conn;
            let mut command = ::redis::cmd("SSUBSCRIBE");
            command.arg(&channel);
            let subscribe = command.exec_async(&mut conn);
            match tokio::time::timeout(shared.config.request_timeout, subscribe).await {
                Ok(Ok(())) => tracing::info!(
                    node = %shared.config.node_id,
                    channel = %String::from_utf8_lossy(&channel),
                    "redis cluster moved a shard channel: subscribed again"
                ),
                _ => {
                    shared.set_error(format!(
                        "cannot subscribe again to {} after its slot moved",
                        String::from_utf8_lossy(&channel)
                    ));
                    epoch.lost.notify_one();
                }
            }
        });
    }
}
