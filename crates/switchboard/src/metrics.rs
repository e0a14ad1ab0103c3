//! Counters for `GET /metrics`, in the Prometheus text format.
//!
//! Counters are relaxed atomics: a metric may lag a concurrent update by a
//! moment, which a scrape every few seconds never notices, and no lock is
//! taken on the message path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        if n != 0 {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Error kinds counted in `switchboard_errors_total{kind="…"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A client broke RFC 6455 framing (closed with 1002).
    Protocol,
    /// A text message that was not UTF-8 (1007).
    InvalidUtf8,
    /// A frame or message over the size limit (1009).
    MessageTooBig,
    /// A handler panicked (1011).
    HandlerPanic,
    /// An outgoing queue overflowed (1008).
    QueueOverflow,
    /// No pong (or any other frame) within the keepalive timeout.
    KeepaliveTimeout,
    /// The socket failed (reset, broken pipe).
    Io,
    /// A relay or API request that could not be parsed, or an HTTP request
    /// without a usable `Host` (400).
    BadRequest,
    /// An HTTP request to a WebSocket route that was not a valid upgrade.
    Handshake,
    /// A message refused by the per-connection rate limit.
    RateLimited,
    /// An upgrade or API request refused for missing or invalid
    /// credentials (401).
    Unauthorized,
    /// An upgrade refused for its origin or a client ID it may not use, or
    /// a relay frame the client's permissions do not allow (403 or an
    /// error frame); an API request from a browser origin that is not
    /// allowed (403); a request for a `Host` the server does not answer to
    /// (421).
    Forbidden,
    /// An upgrade refused by the per-IP limits (429).
    IpLimited,
    /// A subscribe refused by `limits.max_topics_per_connection`.
    TooManyTopics,
}

impl ErrorKind {
    const ALL: [ErrorKind; 14] = [
        Self::Protocol,
        Self::InvalidUtf8,
        Self::MessageTooBig,
        Self::HandlerPanic,
        Self::QueueOverflow,
        Self::KeepaliveTimeout,
        Self::Io,
        Self::BadRequest,
        Self::Handshake,
        Self::RateLimited,
        Self::Unauthorized,
        Self::Forbidden,
        Self::IpLimited,
        Self::TooManyTopics,
    ];

    /// Every kind, in the order `GET /metrics` lists them.
    pub fn all() -> &'static [ErrorKind] {
        &Self::ALL
    }

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Protocol => "protocol",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::MessageTooBig => "message_too_big",
            Self::HandlerPanic => "handler_panic",
            Self::QueueOverflow => "queue_overflow",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::Io => "io",
            Self::BadRequest => "bad_request",
            Self::Handshake => "handshake",
            Self::RateLimited => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::IpLimited => "ip_limited",
            Self::TooManyTopics => "too_many_topics",
        }
    }
}

/// Every counter the server keeps.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Metrics {
    /// WebSocket connections accepted since start.
    pub connections_total: Counter,
    /// Data frames received.
    pub frames_in: Counter,
    /// Frames written to sockets.
    pub frames_out: Counter,
    /// Bytes read from WebSocket sockets.
    pub bytes_in: Counter,
    /// Bytes written to WebSocket sockets.
    pub bytes_out: Counter,
    /// Frames queued to a connection by a relay or `/api/send`.
    pub deliveries: Counter,
    /// Frames queued to a connection by a topic publish.
    pub publish_deliveries: Counter,
    /// Relay or `/api/send` targets with no live connection.
    pub offline_targets: Counter,
    /// Messages not delivered: queue full, or still queued when the
    /// connection ended.
    pub dropped_messages: Counter,
    /// Relay or `/api/send` targets whose delivery on another node could
    /// not be confirmed (clustered backends only).
    pub unconfirmed_targets: Counter,
    errors: [Counter; ErrorKind::ALL.len()],
}

impl Metrics {
    /// Counts one error of `kind`.
    pub fn error(&self, kind: ErrorKind) {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.errors[i].add(1);
    }

    /// The count of errors of `kind`.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.errors[i].get()
    }

    /// Renders the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, open_connections: usize) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "switchboard_connections_open",
            "gauge",
            "WebSocket connections open now.",
            open_connections as u64,
        );
        metric(
            "switchboard_connections_total",
            "counter",
            "WebSocket connections accepted since start.",
            self.connections_total.get(),
        );
        metric(
            "switchboard_frames_in_total",
            "counter",
            "Data frames received from clients.",
            self.frames_in.get(),
        );
        metric(
            "switchboard_frames_out_total",
            "counter",
            "Frames written to clients.",
            self.frames_out.get(),
        );
        metric(
            "switchboard_bytes_in_total",
            "counter",
            "Bytes read from WebSocket connections.",
            self.bytes_in.get(),
        );
        metric(
            "switchboard_bytes_out_total",
            "counter",
            "Bytes written to WebSocket connections.",
            self.bytes_out.get(),
        );
        metric(
            "switchboard_relay_deliveries_total",
            "counter",
            "Frames queued to connections by the relay and /api/send.",
            self.deliveries.get(),
        );
        metric(
            "switchboard_publish_deliveries_total",
            "counter",
            "Frames queued to connections by topic publishes.",
            self.publish_deliveries.get(),
        );
        metric(
            "switchboard_offline_targets_total",
            "counter",
            "Relay and /api/send targets that had no live connection.",
            self.offline_targets.get(),
        );
        metric(
            "switchboard_dropped_messages_total",
            "counter",
            "Messages not delivered: outgoing queue full, or still queued when the connection ended.",
            self.dropped_messages.get(),
        );
        metric(
            "switchboard_unconfirmed_targets_total",
            "counter",
            "Relay and /api/send targets whose delivery on another node could not be confirmed.",
            self.unconfirmed_targets.get(),
        );
        let _ = writeln!(
            out,
            "# HELP switchboard_errors_total Errors by kind.\n# TYPE switchboard_errors_total counter"
        );
        for (kind, counter) in ErrorKind::ALL.iter().zip(&self.errors) {
            let _ = writeln!(
                out,
                "switchboard_errors_total{{kind=\"{}\"}} {}",
                kind.label(),
                counter.get()
            );
        }
        out
    }
}
