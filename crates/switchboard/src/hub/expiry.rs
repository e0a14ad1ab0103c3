//! Scheduled closes (`Conn::close_at`, a v1 hello's deadline, a drain's
//! spread-out closes): one timer task per hub, not one timer per
//! connection.
//!
//! A `tokio::time::Sleep` in every connection would cost ~100 bytes each
//! and a timer-wheel entry, for an event most connections never reach
//! (a token expiring while connected). Instead the hub keeps the deadlines
//! in one ordered map and one task sleeps until the earliest; at a deadline
//! it asks the connection to close through its mailbox, as
//! `DELETE /api/connections/{id}` does. A connection that ends first
//! removes its entry (`Hub::untrack`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::protocol::close::CloseFrame;
use crate::runtime::mailbox::{ConnId, ConnRef};

#[derive(Default)]
pub(crate) struct Expiry {
    state: Mutex<State>,
    wake: Arc<Notify>,
}

/// Which of a connection's deadlines: it may have one of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Deadline {
    /// Its credentials expire (4002).
    Credentials,
    /// Its protocol wants something by then (a v1 hello: 4400).
    Protocol,
    /// Its place in a drain (`hub::drain`): 1012 for a v1 connection at its
    /// reconnect delay plus the grace, 1001 for the others at their delay.
    Drain,
}

#[derive(Default)]
struct State {
    by_deadline: BTreeMap<(Instant, ConnId, Deadline), (ConnRef, CloseFrame)>,
    by_conn: HashMap<(ConnId, Deadline), Instant>,
    /// The timer task; started on first use, and again if the runtime it
    /// ran on has gone (a hub outliving a test's runtime).
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Expiry {
    /// Closes `conn` with `frame` at `at` (at once if `at` has passed),
    /// replacing an earlier schedule of the same connection and kind. Must
    /// be called inside a tokio runtime.
    pub(crate) fn schedule(
        self: &Arc<Self>,
        conn: ConnRef,
        kind: Deadline,
        at: Instant,
        frame: CloseFrame,
    ) {
        let id = conn.id();
        let mut state = self.state.lock();
        if let Some(old) = state.by_conn.insert((id, kind), at) {
            state.by_deadline.remove(&(old, id, kind));
        }
        let earliest = state.by_deadline.keys().next().map(|(at, ..)| *at);
        state.by_deadline.insert((at, id, kind), (conn, frame));
        if state.task.as_ref().is_none_or(|task| task.is_finished()) {
            state.task = Some(tokio::spawn(run(
                Arc::downgrade(self),
                Arc::clone(&self.wake),
            )));
        }
        drop(state);
        if earliest.is_none_or(|earliest| at < earliest) {
            self.wake.notify_one();
        }
    }

    /// Forgets `id`'s schedules, if any.
    pub(crate) fn cancel(&self, id: ConnId) {
        for kind in [Deadline::Credentials, Deadline::Protocol, Deadline::Drain] {
            self.cancel_one(id, kind);
        }
    }

    /// Forgets `id`'s schedule of `kind`, if any.
    pub(crate) fn cancel_one(&self, id: ConnId, kind: Deadline) {
        let mut state = self.state.lock();
        if let Some(at) = state.by_conn.remove(&(id, kind)) {
            state.by_deadline.remove(&(at, id, kind));
        }
    }

    /// Takes every entry due at `now`; returns them and the next deadline.
    fn due(&self, now: Instant) -> (Vec<(ConnRef, CloseFrame)>, Option<Instant>) {
        let mut state = self.state.lock();
        let mut due = Vec::new();
        while let Some(entry) = state.by_deadline.first_entry() {
            let (at, id, kind) = *entry.key();
            if at > now {
                return (due, Some(at));
            }
            due.push(entry.remove());
            state.by_conn.remove(&(id, kind));
        }
        (due, None)
    }
}

impl Drop for Expiry {
    fn drop(&mut self) {
        // Wakes the task so that it sees the hub is gone and ends.
        self.wake.notify_one();
    }
}

async fn run(expiry: Weak<Expiry>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(expiry) = expiry.upgrade() else {
                return;
            };
            let (due, next) = expiry.due(Instant::now());
            for (conn, frame) in due {
                conn.close(frame);
            }
            next
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}
