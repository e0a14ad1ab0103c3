//! This node's `switchboard.v1` connections: their life (a hello
//! attaches one to its ID's inbox in Redis, its end starts the ID's TTL),
//! the periodic refresh of their IDs' retention, and delivery to them
//! through their sequence gates (`gate.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use tokio::sync::watch;

use super::Shared;
use super::gate::{Gate, fill};
use super::inbox::{Numbering, refresh_period};
use crate::backend::{Attached, Backend as _, RegisterError, ResumePoint, SendReport};
use crate::id::ClientId;
use crate::runtime::delivery::Envelope;
use crate::runtime::mailbox::{ConnId, ConnRef};

impl Shared {
    /// [`Backend::attach`](crate::Backend::attach): registers the v1
    /// connection (with its gate, holding what arrives), writes its
    /// presence, then reads the inbox: every message numbered after the
    /// read is published to this node (its senders locate the ID after
    /// numbering), and everything up to it is in the replay.
    pub(super) async fn attach(
        &self,
        id: &ClientId,
        conn: &ConnRef,
        resume: Option<&ResumePoint>,
    ) -> Result<Attached, RegisterError> {
        let Some(link) = self.link() else {
            return Err(RegisterError::Unavailable(
                "this node is not connected to redis".to_owned(),
            ));
        };
        let gate = self.add_gate(id, conn);
        if let Err(err) = self.local.register(id, conn) {
            self.remove_gate(conn.id());
            return Err(err);
        }
        // Undone if the hello fails or its task is dropped half-way.
        let mut undo = UndoAttach {
            shared: self,
            id,
            conn: conn.id(),
            armed: true,
        };
        let generation = self.mark_id(id);
        self.wait_flushed(generation).await;
        self.settle_duplicate_ids(id, conn.id(), true).await?;
        let read = self.attach_inbox(&link, id, resume);
        let attached = match tokio::time::timeout(self.config.request_timeout, read).await {
            Ok(Ok(attached)) => attached,
            Ok(Err(error)) => return Err(RegisterError::Unavailable(error.to_string())),
            Err(_) => {
                return Err(RegisterError::Unavailable(
                    "redis did not answer in time".to_owned(),
                ));
            }
        };
        undo.armed = false;
        if gate.start(&attached.epoch, attached.top) {
            self.spawn_fill(gate);
        }
        Ok(attached)
    }

    /// This node's last v1 connection of `id` ended: start its TTL.
    pub(super) fn spawn_detach(&self, id: ClientId) {
        let (Some(shared), Some(link)) = (self.me.upgrade(), self.link()) else {
            return;
        };
        tokio::spawn(async move {
            let detach = shared.detach_inbox(&link, &id);
            let _ = tokio::time::timeout(shared.config.request_timeout, detach).await;
        });
    }
}

/// Unregisters a v1 connection whose hello did not finish.
struct UndoAttach<'a> {
    shared: &'a Shared,
    id: &'a ClientId,
    conn: ConnId,
    armed: bool,
}

impl Drop for UndoAttach<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.local.unregister(self.id, self.conn);
            self.shared.mark_id(self.id);
            self.shared.remove_gate(self.conn);
        }
    }
}

/// Keeps the inboxes of the IDs this node has v1 connections of: every
/// [`refresh_period`], refreshes their retention (and `P:v1`), and closes
/// (4101) the connections whose inbox was lost meanwhile. Ends with the
/// backend.
pub(super) async fn keep_inboxes(shared: Weak<Shared>, mut stop: watch::Receiver<bool>) {
    let period = match shared.upgrade() {
        Some(shared) => refresh_period(&shared.inbox_limits),
        None => return,
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let ids = shared.v1_ids();
        let Some(link) = shared.link() else {
            continue;
        };
        let mut epochs = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(super::BATCH) {
            let touch = shared.touch_inboxes(&link, chunk);
            match tokio::time::timeout(shared.config.request_timeout, touch).await {
                Ok(Ok(found)) => epochs.extend(chunk.iter().cloned().zip(found)),
                // The next round retries; the retention granted outlasts
                // a missed refresh.
                _ => break,
            }
        }
        shared.check_inboxes(&epochs);
    }
}

impl Shared {
    /// Adds a v1 connection of `id` with its gate, before it is registered
    /// (so that every delivery to it finds the gate).
    pub(super) fn add_gate(&self, id: &ClientId, conn: &ConnRef) -> Arc<Gate> {
        let gate = Arc::new(Gate::new(id.clone(), conn.clone()));
        let mut v1 = self.v1.write();
        v1.by_conn.insert(conn.id(), Arc::clone(&gate));
        *v1.by_id.entry(id.clone()).or_default() += 1;
        gate
    }

    /// Removes the v1 connection `conn`; returns whether it was the last
    /// one of its ID on this node.
    pub(super) fn remove_gate(&self, conn: ConnId) -> Option<(ClientId, bool)> {
        let mut v1 = self.v1.write();
        let gate = v1.by_conn.remove(&conn)?;
        let last = match v1.by_id.get_mut(&gate.id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                v1.by_id.remove(&gate.id);
                true
            }
        };
        Some((gate.id.clone(), last))
    }

    /// The IDs this node has v1 connections of.
    pub(super) fn v1_ids(&self) -> Vec<ClientId> {
        self.v1.read().by_id.keys().cloned().collect()
    }

    /// Closes the v1 connections of the IDs whose inbox is gone or has
    /// another epoch than their gate follows, and fills the seqs up to
    /// each inbox's newest that have not reached a connection.
    pub(super) fn check_inboxes(&self, found: &HashMap<ClientId, Option<(String, u64)>>) {
        let mut fills = Vec::new();
        {
            let v1 = self.v1.read();
            for gate in v1.by_conn.values() {
                if let Some(inbox) = found.get(&gate.id)
                    && gate.check(inbox.as_ref().map(|(e, top)| (e.as_str(), *top)))
                {
                    fills.push(Arc::clone(gate));
                }
            }
        }
        for gate in fills {
            self.spawn_fill(gate);
        }
    }

    /// Queues `message` to this node's connections of `targets`: plain
    /// ones at once, v1 ones through their gates (`numbering[i]` is the
    /// number of `targets[i]`).
    pub(super) fn deliver_local(
        &self,
        targets: &[ClientId],
        message: &Arc<Envelope>,
        numbering: &[Numbering],
    ) -> SendReport {
        let mut fills = Vec::new();
        let mut verify = Vec::new();
        let report = {
            let v1 = self.v1.read();
            self.local.send_via(targets, message, &mut |i, conn| {
                let Some(gate) = v1.by_conn.get(&conn.id()) else {
                    return conn.deliver(message, None, &mut None);
                };
                let numbering = numbering.get(i).unwrap_or(&Numbering::Unknown);
                let offered = gate.offer(numbering, message);
                if offered.fill {
                    fills.push(Arc::clone(gate));
                }
                if offered.verify {
                    verify.push(gate.id.clone());
                }
                offered.result
            })
        };
        for gate in fills {
            self.spawn_fill(gate);
        }
        if !verify.is_empty() {
            self.spawn_verify(verify);
        }
        report
    }

    /// Reads the inboxes of `ids` (refreshing their retention, like the
    /// periodic round) and checks their gates: a lost inbox closes its
    /// connections (4101). A read that fails is left to the next round.
    fn spawn_verify(&self, ids: Vec<ClientId>) {
        let Some(shared) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let Some(link) = shared.link() else {
                return;
            };
            let touch = shared.touch_inboxes(&link, &ids);
            if let Ok(Ok(found)) = tokio::time::timeout(shared.config.request_timeout, touch).await
            {
                shared.check_inboxes(&ids.into_iter().zip(found).collect());
            }
        });
    }

    pub(super) fn spawn_fill(&self, gate: Arc<Gate>) {
        if let Some(shared) = self.me.upgrade() {
            tokio::spawn(fill(shared, gate));
        }
    }
}
