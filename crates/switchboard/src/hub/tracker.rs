//! Every live connection of this node, for graceful shutdown and the open
//! connection count.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::runtime::mailbox::{ConnId, ConnRef};

/// Every live connection of this node, whether or not it registered an ID,
/// so that shutdown can close them all. Sharded by connection number so
/// that connects and disconnects on different cores rarely share a lock.
pub(crate) struct Tracker {
    pub(crate) shards: Box<[Mutex<HashMap<ConnId, ConnRef>>]>,
    pub(crate) count: AtomicUsize,
    pub(crate) empty: Notify,
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
    pub(crate) fn shard(&self, id: ConnId) -> &Mutex<HashMap<ConnId, ConnRef>> {
        &self.shards[(id.0 as usize) % self.shards.len()]
    }
}
