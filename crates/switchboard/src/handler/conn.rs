//! [`Conn`]: the connection as its handler sees it.

use std::sync::Arc;

use crate::backend::{Attached, RegisterError, ResumePoint};
use crate::hub::Hub;
use crate::hub::expiry::Deadline;
use crate::id::{ClientId, Topic};
use crate::limits::SlowConsumer;
use crate::protocol::close::CloseFrame;
use crate::protocol::frame::WireFrame;
use crate::runtime::delivery::Format;
use crate::runtime::mailbox::{ConnHandle, ConnId, ConnRef, Mailbox};

/// The connection as its handler sees it: passed to every callback.
///
/// Registrations made through it (an ID, topics) are undone when the
/// connection ends, however it ends — close, error, reset, panic or a failed
/// upgrade — because `Conn` undoes them when it is dropped.
pub struct Conn<I: Send + 'static> {
    pub(crate) mailbox: Arc<Mailbox<I>>,
    hub: Hub,
    client_id: Option<ClientId>,
    topics: Vec<Topic>,
}

impl<I: Send + 'static> Conn<I> {
    pub(crate) fn new(hub: Hub) -> Self {
        let limits = hub.limits();
        let mailbox = Mailbox::new(
            limits.max_queued_messages,
            limits.max_queued_bytes,
            limits.slow_consumer == SlowConsumer::DropOldest,
        );
        hub.track(ConnRef::new(mailbox.clone()));
        Self {
            mailbox,
            hub,
            client_id: None,
            topics: Vec::new(),
        }
    }

    /// This connection's number.
    pub fn id(&self) -> ConnId {
        self.mailbox.id()
    }

    /// The hub: registry, topics, metrics.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// A handle for sending `Info` messages to this connection.
    pub fn handle(&self) -> ConnHandle<I> {
        ConnHandle::new(Arc::clone(&self.mailbox))
    }

    /// The client ID this connection registered, if any.
    pub fn client_id(&self) -> Option<&ClientId> {
        self.client_id.as_ref()
    }

    /// Registers this connection under `id` so that sends to `id` reach it.
    /// One ID per connection; registering again replaces the first.
    ///
    /// What happens when `id` already has connections is the hub's
    /// [`DuplicateIds`](crate::DuplicateIds) policy.
    pub fn register(&mut self, id: ClientId) -> Result<(), RegisterError> {
        if let Some(old) = self.client_id.take() {
            self.hub.backend().unregister(&old, self.id());
        }
        self.hub
            .backend()
            .register(&id, &ConnRef::new(self.mailbox.clone()))?;
        self.client_id = Some(id);
        Ok(())
    }

    /// Subscribes this connection to `topic`; publishes to it reach this
    /// client as frames, without passing through the handler.
    pub fn join(&mut self, topic: Topic) {
        if self.topics.contains(&topic) {
            return;
        }
        self.hub
            .backend()
            .subscribe(&topic, &ConnRef::new(self.mailbox.clone()));
        self.topics.push(topic);
    }

    /// Unsubscribes from `topic`; returns whether it was subscribed.
    pub fn leave(&mut self, topic: &Topic) -> bool {
        let Some(at) = self.topics.iter().position(|t| t == topic) else {
            return false;
        };
        self.topics.swap_remove(at);
        self.hub.backend().unsubscribe(topic, self.id());
        true
    }

    /// The topics this connection has joined.
    pub fn topics(&self) -> &[Topic] {
        &self.topics
    }

    /// Closes this connection with `frame` at `at`, after the frames queued
    /// to it by then, unless it has ended before; a second call replaces
    /// the first. One timer task per hub keeps every such deadline, so a
    /// connection pays for none until it asks. [`ws`](crate::ws) uses it to
    /// close connections whose credentials expire (4002).
    pub fn close_at(&self, at: tokio::time::Instant, frame: CloseFrame) {
        self.hub.expiry().schedule(
            ConnRef::new(self.mailbox.clone()),
            Deadline::Credentials,
            at,
            frame,
        );
    }

    /// Closes this connection with `frame` at `at` unless cancelled with
    /// `None` first: a deadline of the connection's protocol (a v1 hello),
    /// kept apart from the credentials' (`close_at`).
    pub(crate) fn protocol_deadline(&self, at: Option<(tokio::time::Instant, CloseFrame)>) {
        let expiry = self.hub.expiry();
        match at {
            Some((at, frame)) => expiry.schedule(
                ConnRef::new(self.mailbox.clone()),
                Deadline::Protocol,
                at,
                frame,
            ),
            None => expiry.cancel_one(self.id(), Deadline::Protocol),
        }
    }

    /// Sets how messages sent to this connection are written. Call it in
    /// `connect`, before registering: every message then has one format.
    pub(crate) fn set_format(&self, format: Format) {
        self.mailbox.set_format(format);
    }

    /// Registers this `switchboard.v1` connection under `id` with an inbox
    /// (see [`Backend::attach`](crate::Backend::attach)) and holds its
    /// deliveries until [`release`](Self::release), which puts the welcome
    /// and the replay ahead of them.
    pub(crate) async fn attach(
        &mut self,
        id: ClientId,
        resume: Option<&ResumePoint>,
    ) -> Result<Attached, RegisterError> {
        if let Some(old) = self.client_id.take() {
            self.hub.backend().unregister(&old, self.id());
        }
        self.mailbox.hold();
        let conn = ConnRef::new(self.mailbox.clone());
        match self.hub.backend().attach(&id, &conn, resume).await {
            Ok(attached) => {
                self.client_id = Some(id);
                Ok(attached)
            }
            Err(err) => {
                self.mailbox.release(Vec::new());
                Err(err)
            }
        }
    }

    /// Queues `front` ahead of every delivery held since
    /// [`attach`](Self::attach), and lets them all through.
    pub(crate) fn release(&self, front: Vec<WireFrame>) {
        self.mailbox.release(front);
    }
}

impl<I: Send + 'static> Drop for Conn<I> {
    fn drop(&mut self) {
        let id = self.id();
        let backend = self.hub.backend();
        if let Some(client) = self.client_id.take() {
            backend.unregister(&client, id);
        }
        for topic in self.topics.drain(..) {
            backend.unsubscribe(&topic, id);
        }
        let dropped = self.mailbox.mark_closed();
        self.hub.metrics().dropped_messages.add(dropped as u64);
        self.hub.untrack(id);
    }
}
