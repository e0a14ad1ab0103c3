//! Graceful drain: a node about to stop hands its clients to the other
//! nodes a few at a time instead of all at once (docs/protocol-v1.md,
//! "Drain"; docs/scaling.md, "Rolling restarts").
//!
//! When a drain starts ([`Hub::drain`]):
//!
//! 1. New WebSocket upgrades are refused with 503 `draining`
//!    ([`refusal`], checked by `http::upgrade`), and `/ready` answers 503,
//!    so that load balancers stop sending clients here.
//! 2. Every `switchboard.v1` connection is sent one `drain` frame with a
//!    reconnect delay chosen by the server, and closed with 1012 at that
//!    delay plus `drain.grace`; every other connection is closed with 1001
//!    at its delay. The delays of each kind are evenly spaced over
//!    `drain.window` in a random order ([`spread`]), so the reconnects
//!    reach the other nodes at an even rate whatever random generators the
//!    clients have.
//! 3. The closes are deadlines of the hub's one timer task
//!    ([`Deadline::Drain`]), not a timer per connection. At
//!    `window + grace` (or as soon as no connection is left) the drain is
//!    finished: whatever is still open is asked to close with its kind's
//!    code, and [`Hub::drain_finished`] resolves.
//!
//! A drain close is an ordinary close: the backend keeps a v1 client's
//! inbox for `v1.inbox_ttl` after its last connection ends, so the client
//! resumes on another node.

use std::hash::{BuildHasher as _, RandomState};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderValue, StatusCode, header};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Hub;
use super::expiry::Deadline;
use crate::http_error::HttpError;
use crate::limits::DrainLimits;
use crate::protocol::close::{CloseCode, CloseFrame};
use crate::protocol::frame::WireFrame;
use crate::runtime::mailbox::{ConnRef, Queued};

/// What a v1 connection still open at its reconnect delay plus the grace
/// is closed with (RFC 6455 §7.4.1 / IANA: 1012 "service restart").
pub(crate) const V1_CLOSE: CloseFrame = CloseFrame::new(
    CloseCode::SERVICE_RESTART,
    "service restart: reconnect to another node and resume",
);

/// What every other connection is closed with, at its delay: the same
/// frame as a shutdown's, so plain clients see nothing new.
pub(crate) const PLAIN_CLOSE: CloseFrame =
    CloseFrame::new(CloseCode::GOING_AWAY, "server shutting down");

/// `Retry-After` of an upgrade refused while draining, in seconds. One
/// second: behind a load balancer the retry goes to another node once the
/// balancer has seen `/ready` fail, and a client talking to this node
/// directly adds its own backoff (docs/protocol-v1.md, "Writing a
/// client"); a refusal costs the server a few microseconds.
const RETRY_AFTER_SECS: u64 = 1;

/// The drain state of a hub: unset until a drain starts.
#[derive(Default)]
pub(crate) struct DrainState {
    started: OnceLock<Started>,
    finished: AtomicBool,
    finished_notify: Notify,
    /// `drain` frames queued to v1 connections.
    hints: AtomicU64,
}

/// When a drain started and with which limits.
#[derive(Debug, Clone, Copy)]
struct Started {
    at: Instant,
    limits: DrainLimits,
}

/// What [`Hub::drain`] did or found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// This call started the drain (false: one was under way, and the
    /// counts below are zero).
    pub started_now: bool,
    /// v1 connections sent a `drain` frame and scheduled to close with 1012.
    pub v1_connections: usize,
    /// Other connections scheduled to close with 1001.
    pub plain_connections: usize,
    /// The drain's window and grace.
    pub limits: DrainLimits,
    /// How long ago the drain started.
    pub elapsed: Duration,
}

impl DrainState {
    pub(crate) fn is_started(&self) -> bool {
        self.started.get().is_some()
    }

    pub(crate) fn started_at(&self) -> Option<Instant> {
        self.started.get().map(|s| s.at)
    }

    pub(crate) fn hints(&self) -> u64 {
        self.hints.load(Ordering::Relaxed)
    }
}

/// The answer to an upgrade (and to `/ready`) while draining: 503
/// `draining` with `Retry-After`.
pub(crate) fn refusal() -> HttpError {
    HttpError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "draining",
        "this node is draining before it stops: connect to another node (retry after Retry-After seconds, with jitter)",
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS))
}

/// The `drain` frame of a v1 connection told to reconnect in
/// `reconnect_in` and closed `grace` after that:
/// `{"type":"drain","reconnect_in_ms":D,"close_in_ms":D+G,"window_ms":W}`.
/// A connection that gets it late (at a hello that came after the drain
/// began) is told what is left: `D` may be 0 and `G` less than the grace.
fn hint(reconnect_in: Duration, grace: Duration, limits: &DrainLimits) -> WireFrame {
    WireFrame::from_text(format!(
        r#"{{"type":"drain","reconnect_in_ms":{},"close_in_ms":{},"window_ms":{}}}"#,
        reconnect_in.as_millis(),
        reconnect_in.saturating_add(grace).as_millis(),
        limits.window.as_millis()
    ))
}

/// `n` delays in `[0, window)`, one per connection: slot `k` of `n` covers
/// `[k, k+1) × window/n`, the slots are handed out in a random order
/// (Fisher–Yates), and each delay is drawn uniformly inside its slot. So
/// every `window/n` of the window holds exactly one delay — no second of
/// it more than its share, unlike `n` independent draws (which put about
/// 1.4× the mean into the fullest of 20 one-second buckets at n = 1,000) —
/// and which client gets which slot is the server's random choice.
pub(crate) fn spread(n: usize, window: Duration, rng: &mut impl FnMut() -> u64) -> Vec<Duration> {
    let mut slots: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng() % (i as u64 + 1)) as usize;
        slots.swap(i, j);
    }
    let window_ns = window.as_nanos();
    let n128 = n.max(1) as u128;
    slots
        .into_iter()
        .map(|slot| {
            // A fraction of the slot in 1/2^32 steps.
            let within = u128::from(rng() >> 32);
            let ns = (slot as u128 * window_ns + ((window_ns * within) >> 32)) / n128;
            Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
        })
        .collect()
}

/// A small fast generator (splitmix64) seeded from the standard library's
/// per-process random keys: the spread needs no cryptographic strength,
/// only an order no client can predict or share with others.
fn generator() -> impl FnMut() -> u64 {
    let mut state = RandomState::new().hash_one(std::process::id());
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Hub {
    /// Starts draining this node with the hub's `limits.drain`: refuses new
    /// upgrades (503 `draining`), hints every `switchboard.v1` connection
    /// to reconnect after a delay the server spreads over the window, and
    /// schedules every connection's close (v1: 1012 after its delay plus
    /// the grace; others: 1001 at their delay). A second call changes
    /// nothing and reports the drain under way. Must be called inside a
    /// tokio runtime. To stop serving when it is done, await
    /// [`drain_finished`](Self::drain_finished) in `serve`'s shutdown
    /// future (the `switchboard` binary does).
    pub fn drain(&self) -> DrainReport {
        let state = &self.inner.drain;
        let limits = self.limits().drain;
        let now = Instant::now();
        let mut first = false;
        let started = *state.started.get_or_init(|| {
            first = true;
            Started { at: now, limits }
        });
        if !first {
            return DrainReport {
                started_now: false,
                v1_connections: 0,
                plain_connections: 0,
                limits: started.limits,
                elapsed: now.saturating_duration_since(started.at),
            };
        }
        // The state is set (above) before the shard locks are taken here,
        // and `track` reads it under them: a connection tracked from now on
        // is closed at once (its upgrade passed the 503 check before the
        // drain began), one tracked before is in this list, and one that is
        // both is closing already (its hint is refused, its close kept).
        let (v1, plain): (Vec<ConnRef>, Vec<ConnRef>) =
            self.live_list().into_iter().partition(ConnRef::is_v1);
        let mut rng = generator();
        let expiry = self.expiry();
        let mut hints = 0u64;
        for (conn, delay) in v1.iter().zip(spread(v1.len(), limits.window, &mut rng)) {
            // After the welcome for a connection that has not said hello
            // yet. Refused only by a connection already closing or whose
            // queue is full (then closed 4100, which also says "resume").
            let close_at = now + delay.saturating_add(limits.grace);
            let make = Box::new(move |queued| match queued {
                // Sent now: the delay as assigned, to the millisecond.
                Queued::AtOnce => hint(delay, limits.grace, &limits),
                // Sent at a late hello: what is left of it.
                Queued::AtWelcome => {
                    let close_in = close_at.saturating_duration_since(Instant::now());
                    hint(
                        close_in.saturating_sub(limits.grace),
                        close_in.min(limits.grace),
                        &limits,
                    )
                }
            });
            if conn.push_after_welcome(make).is_ok() {
                hints += 1;
            }
            expiry.schedule(conn.clone(), Deadline::Drain, close_at, V1_CLOSE);
        }
        for (conn, delay) in plain
            .iter()
            .zip(spread(plain.len(), limits.window, &mut rng))
        {
            expiry.schedule(conn.clone(), Deadline::Drain, now + delay, PLAIN_CLOSE);
        }
        state.hints.fetch_add(hints, Ordering::Relaxed);
        tracing::info!(
            v1 = v1.len(),
            plain = plain.len(),
            window = %crate::limits::duration::format(limits.window),
            grace = %crate::limits::duration::format(limits.grace),
            "draining: new upgrades get 503, connections are closed spread over the window"
        );
        let hub = self.clone();
        tokio::spawn(async move {
            let end = now + limits.total();
            tokio::select! {
                () = hub.drained() => {}
                () = tokio::time::sleep_until(end) => {
                    // Every scheduled close is due by now; the timer task
                    // may not have sent the last ones yet. Closing the rest
                    // here with their own codes keeps a shutdown that
                    // follows at once from turning them into 1001s.
                    for conn in hub.live_list() {
                        conn.close(if conn.is_v1() { V1_CLOSE } else { PLAIN_CLOSE });
                    }
                }
            }
            let state = &hub.inner.drain;
            state.finished.store(true, Ordering::Release);
            state.finished_notify.notify_waiters();
            tracing::info!(
                connections = hub.live_connections(),
                "drain finished: every connection has been asked to close"
            );
        });
        DrainReport {
            started_now: true,
            v1_connections: v1.len(),
            plain_connections: plain.len(),
            limits,
            elapsed: Duration::ZERO,
        }
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.inner.drain.is_started()
    }

    /// Resolves once a drain has started and finished: no connection is
    /// left, or `window + grace` has passed and every connection has been
    /// asked to close. Pending for as long as no drain starts.
    pub async fn drain_finished(&self) {
        let state = &self.inner.drain;
        loop {
            let notified = state.finished_notify.notified();
            if state.finished.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// When the drain started, if one did: `serve` counts its shutdown
    /// timeout from there.
    pub(crate) fn drain_started_at(&self) -> Option<Instant> {
        self.inner.drain.started_at()
    }

    /// `drain` frames sent since the hub started.
    pub fn drain_hints_total(&self) -> u64 {
        self.inner.drain.hints()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spread puts exactly one delay in each `window/n`, stays inside
    /// the window, and is not the identity order.
    #[test]
    fn spread_fills_each_slot_once() {
        let mut rng = generator();
        let window = Duration::from_secs(20);
        let delays = spread(1000, window, &mut rng);
        let mut slots: Vec<u128> = delays
            .iter()
            .map(|d| {
                assert!(*d < window, "{d:?}");
                d.as_nanos() * 1000 / window.as_nanos()
            })
            .collect();
        let in_order = slots.windows(2).all(|w| w[0] <= w[1]);
        assert!(!in_order, "the slots are handed out in a random order");
        slots.sort_unstable();
        assert_eq!(slots, (0..1000).collect::<Vec<u128>>());
        assert!(spread(0, window, &mut rng).is_empty());
        assert_eq!(spread(3, Duration::ZERO, &mut rng), vec![Duration::ZERO; 3]);
    }

    #[test]
    fn the_hint_frame_names_delay_close_and_window() {
        let limits = DrainLimits {
            window: Duration::from_secs(20),
            grace: Duration::from_secs(5),
        };
        let text = |frame: WireFrame| String::from_utf8_lossy(&frame.body).into_owned();
        assert_eq!(
            text(hint(Duration::from_millis(7312), limits.grace, &limits)),
            r#"{"type":"drain","reconnect_in_ms":7312,"close_in_ms":12312,"window_ms":20000}"#
        );
        // Late (a hello after the delay ran out): what is left.
        assert_eq!(
            text(hint(Duration::ZERO, Duration::from_millis(2312), &limits)),
            r#"{"type":"drain","reconnect_in_ms":0,"close_in_ms":2312,"window_ms":20000}"#
        );
    }
}
