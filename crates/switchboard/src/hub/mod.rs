//! The hub: one per server, shared by every connection. It holds the
//! [`Backend`] (registry and topics), the limits, the metrics, and the set of
//! all live connections used for graceful shutdown.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::auth::{IpLimiter, Security};
use crate::backend::memory::MemoryBackend;
use crate::backend::{Backend, Immediate, SendCounts, SendReport, TargetOutcomes};
use crate::id::{ClientId, Topic};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::protocol::close::CloseFrame;
use crate::protocol::frame::WireFrame;
use crate::runtime::delivery::Envelope;
use crate::runtime::mailbox::{ConnId, ConnRef};
use crate::runtime::wheel::TimerWheel;

mod admission;
pub(crate) mod drain;
pub(crate) mod expiry;
pub(crate) mod refusals;
mod tracker;

pub(crate) use admission::{Admission, CapPermit};
pub use drain::DrainReport;
use drain::DrainState;
use expiry::Expiry;
use refusals::{Refusal, RefusalLog};
use tracker::Tracker;

/// The hub every connection and API call shares. Cloning is a reference
/// count.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    backend: Arc<dyn Backend>,
    limits: Limits,
    security: Security,
    metrics: Metrics,
    live: Tracker,
    /// Per-IP admission of WebSocket upgrades.
    ip_limiter: IpLimiter,
    /// Scheduled closes (`Conn::close_at`), created on first use.
    expiry: OnceLock<Arc<Expiry>>,
    /// Refused upgrades, logged (rate-limited) and the latest kept.
    refusals: RefusalLog,
    /// Set once a drain starts (`Hub::drain`).
    drain: DrainState,
    /// Every connection's keepalive deadline, in one coarse wheel.
    timers: Arc<TimerWheel>,
}

/// Builds a [`Hub`] with a backend and security settings:
/// `Hub::builder(limits).backend(b).security(s).build()`.
#[must_use]
pub struct HubBuilder {
    limits: Limits,
    backend: Option<Arc<dyn Backend>>,
    security: Security,
}

impl HubBuilder {
    /// Where IDs and topics live (default: a [`MemoryBackend`] with the
    /// limits' duplicate-ID policy).
    pub fn backend(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Authentication, origins, API keys, trusted proxies (default: none
    /// of them; see [`Security`]).
    pub fn security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// The hub.
    pub fn build(self) -> Hub {
        let backend = self.backend.unwrap_or_else(|| {
            Arc::new(MemoryBackend::with_v1(
                self.limits.duplicate_ids,
                &self.limits.v1,
            ))
        });
        let timers = Arc::new(TimerWheel::for_keepalive(
            self.limits.ping_interval,
            self.limits.pong_timeout,
        ));
        Hub {
            inner: Arc::new(HubInner {
                timers,
                backend,
                limits: self.limits,
                security: self.security,
                metrics: Metrics::default(),
                live: Tracker::default(),
                ip_limiter: IpLimiter::default(),
                expiry: OnceLock::new(),
                refusals: RefusalLog::default(),
                drain: DrainState::default(),
            }),
        }
    }
}

impl Hub {
    /// A hub with the in-memory backend and no security settings.
    pub fn new(limits: Limits) -> Self {
        Self::builder(limits).build()
    }

    /// A hub with a custom backend.
    pub fn with_backend(limits: Limits, backend: Arc<dyn Backend>) -> Self {
        Self::builder(limits).backend(backend).build()
    }

    /// A builder, to set the backend and the [`Security`] settings.
    pub fn builder(limits: Limits) -> HubBuilder {
        HubBuilder {
            limits,
            backend: None,
            security: Security::default(),
        }
    }

    /// Authentication, origins, API keys and trusted proxies.
    pub fn security(&self) -> &Security {
        &self.inner.security
    }

    pub(crate) fn ip_limiter(&self) -> &IpLimiter {
        &self.inner.ip_limiter
    }

    /// The keepalive timer wheel every connection of this hub shares.
    pub(crate) fn timers(&self) -> &Arc<TimerWheel> {
        &self.inner.timers
    }

    pub(crate) fn expiry(&self) -> &Arc<Expiry> {
        self.inner.expiry.get_or_init(Arc::default)
    }

    /// The most recent refused connections (at most 100), oldest first:
    /// what the server logged about each, for an operator's view.
    pub fn recent_refusals(&self) -> Vec<Refusal> {
        self.inner.refusals.recent()
    }

    /// Connections refused since the hub started.
    pub fn refusals_total(&self) -> u64 {
        self.inner.refusals.total()
    }

    pub(crate) fn refusal_log(&self) -> &RefusalLog {
        &self.inner.refusals
    }

    /// The backend (registry and topics).
    pub fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
    }

    /// The limits every connection runs with.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The server's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Encodes a text frame once, to be sent to any number of connections.
    pub fn encode_text(text: impl Into<Bytes>) -> WireFrame {
        WireFrame::text(text.into())
    }

    /// Sends `frame` to every connection of each target, as it is (a
    /// `switchboard.v1` connection gets it wrapped as a `msg`).
    pub async fn send(&self, targets: &[ClientId], frame: &WireFrame) -> SendReport {
        self.deliver(targets, &Arc::new(Envelope::of_frame(frame.clone())))
            .await
    }

    /// Sends `message` to each target: numbered in the target's inbox when
    /// it has one, queued to each of its connections in that connection's
    /// format.
    pub async fn deliver(&self, targets: &[ClientId], message: &Arc<Envelope>) -> SendReport {
        let report = self.backend().send(targets, message).await;
        let m = self.metrics();
        m.deliveries.add(report.connections as u64);
        m.offline_targets.add(report.offline.len() as u64);
        m.dropped_messages.add(report.dropped.len() as u64);
        m.unconfirmed_targets.add(report.unconfirmed.len() as u64);
        report
    }

    /// [`send`](Self::send) through the backend's delivery that never
    /// waits (see [`Immediate`]), to targets named by their text: no boxed
    /// future, no report lists, no `Arc` for the message. Counted in the
    /// metrics like `deliver`.
    pub(crate) fn send_at_once(
        &self,
        immediate: &dyn Immediate,
        targets: &[&str],
        frame: WireFrame,
    ) -> SendCounts {
        let counts = immediate.send_counted(targets, &Envelope::of_frame(frame));
        let m = self.metrics();
        m.deliveries.add(counts.connections as u64);
        m.offline_targets.add(counts.offline as u64);
        m.dropped_messages.add(counts.dropped as u64);
        counts
    }

    /// [`deliver`](Self::deliver) through the backend's delivery that never
    /// waits (see [`Immediate::send_outcomes`]): each target's outcome for
    /// a `switchboard.v1` ack, without a boxed future or report lists.
    /// Counted in the metrics like `deliver`.
    pub(crate) fn deliver_at_once(
        &self,
        immediate: &dyn Immediate,
        targets: &[&str],
        message: &Arc<Envelope>,
    ) -> TargetOutcomes {
        let outcomes = immediate.send_outcomes(targets, message);
        let m = self.metrics();
        m.deliveries.add(outcomes.connections() as u64);
        m.offline_targets.add(outcomes.offline() as u64);
        m.dropped_messages.add(outcomes.dropped() as u64);
        m.unconfirmed_targets.add(outcomes.unconfirmed() as u64);
        outcomes
    }

    /// [`publish`](Self::publish) through the backend's delivery that never
    /// waits (see [`Immediate`]).
    pub(crate) fn publish_at_once(
        &self,
        immediate: &dyn Immediate,
        topic: &Topic,
        frame: WireFrame,
    ) -> usize {
        let message = Envelope::of_frame(frame).on_topic(topic.clone());
        let n = immediate.publish_counted(&message);
        self.metrics().publish_deliveries.add(n as u64);
        n
    }

    /// Publishes `frame` to every subscriber of `topic`; returns the number
    /// of connections it was queued to.
    pub async fn publish(&self, topic: &Topic, frame: &WireFrame) -> usize {
        let message = Envelope::of_frame(frame.clone()).on_topic(topic.clone());
        self.publish_message(&Arc::new(message)).await
    }

    /// Publishes `message` to every subscriber of its topic (see
    /// [`Envelope::on_topic`]); returns the number of connections it was
    /// queued to, or 0 for a message without a topic.
    pub async fn publish_message(&self, message: &Arc<Envelope>) -> usize {
        let Some(topic) = message.topic() else {
            return 0;
        };
        let n = self.backend().publish(topic, message).await;
        self.metrics().publish_deliveries.add(n as u64);
        n
    }

    /// How many WebSocket connections are open on this node.
    pub fn live_connections(&self) -> usize {
        self.inner.live.count.load(Ordering::Relaxed)
    }

    /// Asks every live connection to close with `frame` after flushing what
    /// is queued to it. Connections opened afterwards are not affected: to
    /// shut down, use [`begin_shutdown`](Self::begin_shutdown).
    pub fn close_all(&self, frame: CloseFrame) {
        for conn in self.live_list() {
            conn.close(frame.clone());
        }
    }

    /// Every live connection of this node, shard by shard.
    fn live_list(&self) -> Vec<ConnRef> {
        self.inner
            .live
            .shards
            .iter()
            .flat_map(|shard| shard.lock().values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Begins shutdown: like [`close_all`](Self::close_all), and every
    /// connection opened from now on is asked to close with `frame` as soon
    /// as it exists — an upgrade that was under way completes and is closed
    /// at once. [`serve`](crate::serve) calls it when its shutdown future
    /// resolves; then wait with [`drained`](Self::drained). The first
    /// frame given stays.
    pub fn begin_shutdown(&self, frame: CloseFrame) {
        // Set before `close_all` takes the shard locks, which `track` reads
        // it under: no connection misses both.
        let _ = self.inner.live.closing.set(frame.clone());
        self.inner.live.shutting_down.send_replace(true);
        self.close_all(frame);
    }

    /// Resolves once [`begin_shutdown`](Self::begin_shutdown) has been
    /// called (at once if it was). A long-lived HTTP response, such as an
    /// event stream, ends on it: [`serve`](crate::serve) waits for every
    /// response in flight, so one that never ended would hold shutdown for
    /// its whole timeout.
    pub async fn shutdown_begun(&self) {
        let mut begun = self.inner.live.shutting_down.subscribe();
        let _ = begun.wait_for(|begun| *begun).await;
    }

    /// Waits until no WebSocket connection is left on this node.
    pub async fn drained(&self) {
        loop {
            let notified = self.inner.live.empty.notified();
            if self.live_connections() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn track(&self, conn: ConnRef) {
        let live = &self.inner.live;
        live.count.fetch_add(1, Ordering::Relaxed);
        self.metrics().connections_total.add(1);
        let mut shard = live.shard(conn.id()).lock();
        // Read under the shard's lock: `begin_shutdown` sets the frame
        // before `close_all` takes the shard locks, so either that sees
        // this connection or this sees the frame.
        if let Some(frame) = live.closing.get() {
            conn.close(frame.clone());
        } else if self.inner.drain.is_started() {
            // The same for a drain (`Hub::drain` sets its state before it
            // lists the connections): an upgrade that passed the 503 check
            // just before the drain began. Its protocol is not known yet,
            // so it gets the shutdown's 1001, which also says "reconnect
            // and resume".
            conn.close(drain::PLAIN_CLOSE);
        }
        shard.insert(conn.id(), conn);
    }

    pub(crate) fn untrack(&self, id: ConnId) {
        if let Some(expiry) = self.inner.expiry.get() {
            expiry.cancel(id);
        }
        let live = &self.inner.live;
        live.shard(id).lock().remove(&id);
        if live.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            live.empty.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("live_connections", &self.live_connections())
            .finish_non_exhaustive()
    }
}
