//! Every live connection of this node, for graceful shutdown and the open
//! connection count.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::AtomicUsize;

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

use crate::protocol::close::CloseFrame;
use crate::runtime::mailbox::{ConnId, ConnRef};

/// Every live connection of this node, whether or not it registered an ID,
/// so that shutdown can close them all. Sharded by connection number so
/// that connects and disconnects on different cores rarely share a lock.
pub(crate) struct Tracker {
    pub(crate) shards: Box<[Mutex<HashMap<ConnId, ConnRef>>]>,
    pub(crate) count: AtomicUsize,
    pub(crate) empty: Notify,
    /// Set when shutdown begins: the close frame every connection tracked
    /// from then on is asked to close with at once. An upgrade under way
    /// when shutdown began (its request past the accept loop, its `Conn`
    /// not created yet) still completes; without this it would open after
    /// the last close was sent and hold the drain for its whole timeout.
    pub(crate) closing: OnceLock<CloseFrame>,
    /// `true` once shutdown begins, for long-lived HTTP responses (the
    /// dashboard's event stream) that must end so the drain is not held.
    pub(crate) shutting_down: watch::Sender<bool>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            shards: (0..16).map(|_| Mutex::new(HashMap::new())).collect(),
            count: AtomicUsize::new(0),
            empty: Notify::new(),
            closing: OnceLock::new(),
            shutting_down: watch::channel(false).0,
        }
    }
}

impl Tracker {
    pub(crate) fn shard(&self, id: ConnId) -> &Mutex<HashMap<ConnId, ConnRef>> {
        &self.shards[(id.0 as usize) % self.shards.len()]
    }
}
