//! The sends of this node to other nodes, published by one task per Redis
//! connection: whatever the concurrent senders queued while the previous
//! pipeline was on its way goes out as one pipeline with one `SPUBLISH`
//! per member node (a batch, `batch.rs`), and each sender gets the
//! receiver count of the `SPUBLISH` that carried its message.
//!
//! Why a task: `SPUBLISH` costs Redis one command and each receiving node
//! one push whatever the size; with 100 senders per node relaying across
//! 3 nodes, one per message was most of Redis's CPU (see docs/scaling.md
//! "Batching between nodes"). No timer: a batch is what queued during one
//! round trip, so a lone send waits for nothing but the task's wake-up.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::conn::RedisConn;
use super::{Shared, TaskGuard, batch};

/// Messages taken from the queue per pipeline at most.
const PER_FLUSH: usize = 256;

/// A message for a member node's channel, and where its receiver count
/// goes (`None`: publishing failed).
pub(super) struct Outgoing {
    pub(super) channel: String,
    pub(super) body: Vec<u8>,
    pub(super) done: oneshot::Sender<Option<i64>>,
}

/// Publishes what is queued on `rx` until the connection ends. A message
/// still queued then is answered `None` (its sender reports its targets
/// unconfirmed).
pub(super) async fn run(
    shared: Arc<Shared>,
    mut conn: RedisConn,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    mut ended: watch::Receiver<bool>,
) {
    let _task = TaskGuard::new(&shared);
    let timeout = shared.config.request_timeout;
    let mut queue = Vec::with_capacity(PER_FLUSH);
    loop {
        tokio::select! {
            biased;
            _ = ended.changed() => return,
            n = rx.recv_many(&mut queue, PER_FLUSH) => if n == 0 { return },
        }
        let mut messages = Vec::with_capacity(queue.len());
        let mut done = Vec::with_capacity(queue.len());
        for outgoing in queue.drain(..) {
            messages.push((outgoing.channel, outgoing.body));
            done.push(Some(outgoing.done));
        }
        let mut pipe = ::redis::pipe();
        let mut carried: Vec<Vec<usize>> = Vec::new();
        batch::group(&messages, |channel, body, positions| {
            pipe.cmd("SPUBLISH").arg(channel).arg(body);
            carried.push(positions.to_vec());
        });
        drop(messages);
        let counts: Option<Vec<i64>> =
            match tokio::time::timeout(timeout, pipe.query_async(&mut conn)).await {
                Ok(Ok(counts)) => Some(counts),
                _ => None,
            };
        for (k, positions) in carried.iter().enumerate() {
            let count = counts.as_ref().and_then(|counts| counts.get(k).copied());
            for &position in positions {
                if let Some(done) = done[position].take() {
                    let _ = done.send(count);
                }
            }
        }
    }
}
