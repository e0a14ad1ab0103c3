//! [`Conn`]: the connection as its handler sees it.

use std::collections::HashSet;
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
    /// The topics joined, so that `join` and `leave` cost one hash lookup
    /// each whatever the count (a `Vec` made them linear: ~35 µs per
    /// subscribe at 20,000 topics) and `Drop` can undo them. Topic names
    /// come from clients, so the set hashes with a random key
    /// (`RandomState`). Boxed and created on the first join: most
    /// connections join nothing, and inline the set would add 40 B to every
    /// connection's task (see `connection_future_sizes`).
    #[allow(clippy::box_collection)] // on purpose: 8 B inline instead of 48
    topics: Option<Box<HashSet<Topic>>>,
}

/// [`Conn::join`] refused a topic: the connection has joined as many as
/// `limits.max_topics_per_connection` allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this connection has joined {limit} topics, the most limits.max_topics_per_connection allows: leave one before joining {:?}",
    topic.as_str()
)]
#[non_exhaustive]
pub struct TooManyTopics {
    /// The limit that was reached.
    pub limit: usize,
    /// The topic that was not joined, handed back.
    pub topic: Topic,
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
            topics: None,
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

    /// This connection as the backend stores it (for presence watchers).
    pub(crate) fn conn_ref(&self) -> ConnRef {
        ConnRef::new(self.mailbox.clone())
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

    /// [`register`](Self::register), then the duplicate-ID policy across
    /// nodes when the backend has several (with Redis: a round trip or
    /// two, only under `reject-new` and `replace-oldest`; see
    /// [`Backend::settle_duplicate_ids`](crate::Backend::settle_duplicate_ids)).
    /// On `Err` the connection is registered under no ID.
    pub async fn register_cluster_wide(&mut self, id: ClientId) -> Result<(), RegisterError> {
        self.register(id.clone())?;
        let hub = self.hub.clone();
        let backend = hub.backend();
        if let Err(err) = backend.settle_duplicate_ids(&id, self.id()).await {
            backend.unregister(&id, self.id());
            self.client_id = None;
            return Err(err);
        }
        Ok(())
    }

    /// Subscribes this connection to `topic`; publishes to it reach this
    /// client as frames, without passing through the handler. Returns
    /// whether it was newly joined (`false`: it was joined already).
    ///
    /// # Errors
    /// [`TooManyTopics`] when the connection has joined
    /// `limits.max_topics_per_connection` topics already (0: no limit);
    /// nothing is changed then.
    pub fn join(&mut self, topic: Topic) -> Result<bool, TooManyTopics> {
        let limit = self.hub.limits().max_topics_per_connection;
        let topics = self.topics.get_or_insert_with(Box::default);
        if topics.contains(&topic) {
            return Ok(false);
        }
        if limit != 0 && topics.len() >= limit {
            return Err(TooManyTopics { limit, topic });
        }
        self.hub
            .backend()
            .subscribe(&topic, &ConnRef::new(self.mailbox.clone()));
        topics.insert(topic);
        Ok(true)
    }

    /// Unsubscribes from `topic`; returns whether it was subscribed.
    pub fn leave(&mut self, topic: &Topic) -> bool {
        let Some(topics) = self.topics.as_mut() else {
            return false;
        };
        if !topics.remove(topic) {
            return false;
        }
        if topics.is_empty() {
            // Give the table back: a client that joined many topics and left
            // them all should not keep their space.
            self.topics = None;
        }
        self.hub.backend().unsubscribe(topic, self.id());
        true
    }

    /// The topics this connection has joined, in no particular order.
    pub fn topics(&self) -> impl Iterator<Item = &Topic> + '_ {
        self.topics.iter().flat_map(|topics| topics.iter())
    }

    /// How many topics this connection has joined.
    pub fn topic_count(&self) -> usize {
        self.topics.as_ref().map_or(0, |topics| topics.len())
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
        for topic in self
            .topics
            .take()
            .into_iter()
            .flat_map(|topics| topics.into_iter())
        {
            backend.unsubscribe(&topic, id);
        }
        let dropped = self.mailbox.mark_closed();
        self.hub.metrics().dropped_messages.add(dropped as u64);
        self.hub.untrack(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::limits::{DuplicateIds, Limits};

    fn topic(i: usize) -> Topic {
        Topic::new(&format!("room/{i}")).expect("a valid topic name")
    }

    fn hub(max_topics_per_connection: usize) -> (Hub, Arc<MemoryBackend>) {
        let backend = Arc::new(MemoryBackend::new(DuplicateIds::Allow));
        let limits = Limits {
            max_topics_per_connection,
            ..Limits::default()
        };
        (Hub::with_backend(limits, backend.clone()), backend)
    }

    /// 20,000 joins and leaves on one connection: each is one hash lookup
    /// (the CPU this costs a real server is measured in CHANGELOG.md), and
    /// the connection and the backend agree at every step.
    #[test]
    fn twenty_thousand_topics_join_and_leave() {
        const N: usize = 20_000;
        let (hub, backend) = hub(0);
        let mut conn: Conn<()> = Conn::new(hub);
        for i in 0..N {
            assert_eq!(conn.join(topic(i)), Ok(true), "join room/{i}");
        }
        assert_eq!(
            conn.join(topic(7)),
            Ok(false),
            "a second join changes nothing"
        );
        assert_eq!(conn.topic_count(), N);
        assert_eq!(conn.topics().count(), N);
        assert_eq!(backend.topic_count(), N);
        for i in 0..N {
            assert!(conn.leave(&topic(i)), "leave room/{i}");
        }
        assert!(!conn.leave(&topic(0)), "a second leave changes nothing");
        assert_eq!(conn.topic_count(), 0);
        assert_eq!(backend.topic_count(), 0);
    }

    #[test]
    fn join_past_the_limit_is_refused_and_hands_the_topic_back() {
        let (hub, backend) = hub(3);
        let mut conn: Conn<()> = Conn::new(hub);
        for i in 0..3 {
            assert_eq!(conn.join(topic(i)), Ok(true));
        }
        let refused = conn.join(topic(3)).expect_err("a fourth topic is refused");
        assert_eq!(refused.limit, 3);
        assert_eq!(refused.topic, topic(3));
        let message = refused.to_string();
        assert!(
            message.contains("limits.max_topics_per_connection") && message.contains("room/3"),
            "{message}"
        );
        assert_eq!(
            backend.topic_count(),
            3,
            "the refused topic was not subscribed"
        );
        assert_eq!(
            conn.join(topic(1)),
            Ok(false),
            "joined topics stay joinable"
        );
        assert!(conn.leave(&topic(0)));
        assert_eq!(conn.join(topic(3)), Ok(true), "a leave makes room");
        drop(conn);
        assert_eq!(
            backend.topic_count(),
            0,
            "dropping the connection leaves all"
        );
    }
}
