//! Limits every connection runs with, each with its default and what it
//! costs.
//!
//! ```
//! use std::time::Duration;
//! use switchboard::Limits;
//!
//! let limits = Limits {
//!     max_message_size: 1 << 20,
//!     ping_interval: Duration::from_secs(10),
//!     ..Limits::default()
//! };
//! assert_eq!(limits.pong_timeout, Duration::from_secs(10));
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::deflate::Compression;

/// Per-connection and per-server limits.
///
/// In a config file these are the keys of the `[limits]` table; durations
/// are written like `"25s"` or `"500ms"`. In code, build it with struct
/// update syntax, `Limits { max_message_size: 1 << 20, ..Limits::default() }`,
/// so that limits added later keep their defaults (deliberately not
/// `#[non_exhaustive]`, which would forbid exactly that).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest message a client may send, after joining fragments. Default
    /// 64 KiB. Memory: a message is buffered whole before the handler sees
    /// it, so a connection may hold up to this much while a message arrives.
    /// Over the limit: close 1009.
    pub max_message_size: usize,
    /// Largest single frame a client may send. Default 64 KiB; refused (1009)
    /// from its header, before its payload is buffered.
    pub max_frame_size: usize,
    /// Messages a connection may have queued for sending. Default 1,024
    /// (values above `u32::MAX` count as `u32::MAX`). Memory: 48 bytes per
    /// queued frame plus its payload, which is shared with every other
    /// recipient of the same message.
    pub max_queued_messages: usize,
    /// Bytes a connection may have queued for sending. Default 1 MiB
    /// (values above 4 GiB count as 4 GiB). When
    /// either queue limit is hit the client is too slow: it is closed with
    /// 1008 and the message is reported as dropped. This bounds what a client
    /// that stops reading can cost the server.
    pub max_queued_bytes: usize,
    /// Send a ping when nothing was received for this long. Default 25 s
    /// (under the 30 s idle cut of common proxies). Zero disables pings.
    /// Deadlines are kept in one timer wheel per hub, whose tick is an
    /// eighth of the shorter of this and `pong_timeout`, at most 250 ms:
    /// a ping goes out up to one tick late (never early). Memory: 16 B in
    /// each connection's task and 16 B per connection in the wheel while
    /// armed (no tokio timer per connection).
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// Close a connection that sends nothing for this long after a ping.
    /// Default 10 s. Fires up to one wheel tick late, like `ping_interval`;
    /// any byte from the client answers the ping, and the next one is due
    /// `ping_interval` after it. Memory: shares the keepalive timer above.
    #[serde(with = "duration")]
    pub pong_timeout: Duration,
    /// After sending a close frame, wait this long for the client's before
    /// dropping the TCP connection. Default 5 s. Checked on every event
    /// while closing, so a client that keeps sending (pings, data) cannot
    /// stretch it; once it passes, the connection is dropped within 250 ms.
    #[serde(with = "duration")]
    pub close_timeout: Duration,
    /// Drop an HTTP client that has not sent its request headers after this
    /// long (slowloris). Default 10 s.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// Time a request body (`POST /api/send`, …) has to arrive in full,
    /// counted from the end of its head. Default 10 s: a body of
    /// `max_message_size` (64 KiB) arrives in that time at 6.4 KB/s. Past
    /// it the request is answered 408 `body_timeout` and the connection is
    /// closed, so a client that announces a body and sends part of it
    /// cannot hold a connection (and a place under `max_connections`)
    /// open. Zero turns the deadline off. Memory: one timer per request
    /// body while it is read.
    #[serde(with = "duration")]
    pub body_timeout: Duration,
    /// Open TCP connections (HTTP and WebSocket together). Default 100,000.
    /// Past it a new connection is answered 503 and closed. Each idle
    /// WebSocket costs its socket buffers in the kernel plus the connection
    /// state in the process (see docs/design.md).
    pub max_connections: usize,
    /// Open WebSocket connections per client IP (IPv6: per /64). Default
    /// 0, no limit. Past it an upgrade is answered 429
    /// `too_many_connections` with `Retry-After`. Behind a proxy, set
    /// [`Security::trusted_proxies`](crate::Security::trusted_proxies) or
    /// every client counts as the proxy's address. Needs the peer address
    /// that [`serve`](crate::serve) provides (with `axum::serve`, serve
    /// `into_make_service_with_connect_info::<SocketAddr>()`). Memory: ~100
    /// bytes per client IP while it has connections.
    pub max_connections_per_ip: usize,
    /// New WebSocket connections per second per client IP (a token bucket
    /// holding one second's worth). Default 0, no limit. Past it an
    /// upgrade is answered 429 `connection_rate_limited` with
    /// `Retry-After`. Every attempt counts, refused ones too, so it also
    /// slows down a client guessing tokens.
    pub max_connection_rate_per_ip: u32,
    /// Targets in one relay frame or `/api/send` request. Default 10,000.
    pub max_targets: usize,
    /// Topics one connection may have joined at once. Default 1,000; 0
    /// turns the limit off. Past it [`Conn::join`](crate::Conn::join)
    /// refuses with [`TooManyTopics`](crate::TooManyTopics) and the relay
    /// answers the error frame `{"error":{"code":"too_many_topics",…}}`.
    /// Memory: about 375 bytes of server RSS per subscription with the
    /// in-memory backend (measured subscribing one connection to 60,000 new
    /// topics: the topic's name, its subscriber map and the connection's
    /// entry in it, the connection's own set entry, hash-table slack), so
    /// the default bounds one connection's subscriptions at about 375 KB.
    pub max_topics_per_connection: usize,
    /// Messages a client may send per second, sustained (a token bucket
    /// refilled at this rate). Default 10,000; 0 turns the limit off. A
    /// message over the limit is not handled: the client gets the error frame
    /// `{"error":{"code":"rate_limited",…}}`. Memory: 32 bytes per connection.
    pub max_message_rate: u32,
    /// How many messages a client may send at once above the rate (the
    /// bucket's size). Default 20,000. A client that keeps sending after
    /// the bucket is empty — more refused messages than this — is closed
    /// with 1008.
    pub message_burst: u32,
    /// What to do when a connection's outgoing queue is full. Default
    /// `close` (1008, the message is reported dropped).
    pub slow_consumer: SlowConsumer,
    /// Largest HTTP request head (request line and headers) accepted before
    /// the upgrade; larger gets 431. Default 16 KiB (minimum 8 KiB); it is
    /// the size of the read buffer of a connection in its HTTP phase.
    pub max_header_size: usize,
    /// What a second connection with the same client ID does. Default
    /// `allow`.
    pub duplicate_ids: DuplicateIds,
    /// permessage-deflate (off by default). Not a key of `[limits]`: the
    /// server reads it from its own `[compression]` table.
    #[serde(skip)]
    pub compression: Compression,
    /// The `switchboard.v1` protocol's inboxes, deduplication and hello
    /// deadline. Not a key of `[limits]`: the server reads it from its own
    /// `[v1]` table.
    #[serde(skip)]
    pub v1: V1Limits,
    /// Graceful drain: how a deploy spreads its clients' reconnects. Not a
    /// key of `[limits]`: the server reads it from its own `[drain]` table.
    #[serde(skip)]
    pub drain: DrainLimits,
}

/// How a drain ([`Hub::drain`](crate::Hub::drain): SIGTERM in the server,
/// or `POST /api/drain`) spreads its clients' reconnects, so that a deploy
/// is not a reconnect storm (docs/protocol-v1.md, "Drain";
/// docs/scaling.md, "Rolling restarts"). The `[drain]` table of a config
/// file.
///
/// Each `switchboard.v1` connection is told a reconnect delay spread
/// evenly over `window` and closed with 1012 at that delay plus `grace`;
/// every other connection is closed with 1001 at its own delay, spread the
/// same way. The last close is sent at `window + grace`, so the server's
/// `shutdown_timeout` must be at least that (the binary refuses to start
/// otherwise).
///
/// Memory: nothing until a drain starts; then one scheduled close per
/// connection, freed as the connection ends: about 150 bytes, computed
/// from the sizes (an 80-byte entry of the hub's ordered deadline map —
/// deadline, connection number, kind, connection handle, close frame — plus
/// B-tree slack, and a 32-byte entry of its per-connection index), and
/// during `Hub::drain` a transient list of 16-byte connection handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainLimits {
    /// The span the reconnect delays are spread over: each client is given
    /// a delay in `[0, window)`, evenly spaced over the clients in a random
    /// order. Default 20 s: Centrifugo's SDKs back off up to 20 s, and
    /// with the grace it leaves 5 s of Kubernetes' default 30 s
    /// termination grace for the last close handshakes. A longer window
    /// spreads the load on the other nodes thinner (N/window reconnects a
    /// second) and makes a deploy slower. Zero closes every connection at
    /// once, as a shutdown without drain did.
    #[serde(with = "duration")]
    pub window: Duration,
    /// How long a `switchboard.v1` client may stay after its reconnect
    /// delay before the server closes it with 1012. Default 5 s: time for
    /// a client to open its new connection (a TLS handshake and a resume
    /// over a slow mobile link) before the old one is cut, so it never
    /// goes without one. Plain clients get no hint and no grace.
    #[serde(with = "duration")]
    pub grace: Duration,
}

impl DrainLimits {
    /// No spread and no grace: every connection is closed at once (v1
    /// clients still get their `drain` frame, with a delay of 0). For tests
    /// and embedders that stop a hub nobody reconnects to.
    pub const fn immediate() -> Self {
        Self {
            window: Duration::ZERO,
            grace: Duration::ZERO,
        }
    }

    /// When the last close of a drain is sent, counted from its start.
    pub fn total(&self) -> Duration {
        self.window.saturating_add(self.grace)
    }
}

impl Default for DrainLimits {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(20),
            grace: Duration::from_secs(5),
        }
    }
}

/// What the `switchboard.v1` protocol keeps and for how long
/// (docs/protocol-v1.md, "The inbox"). The `[v1]` table of a config file.
///
/// Memory: a retained message costs its payload (shared with the frames
/// that delivered it) plus about 100 bytes of bookkeeping; an inbox with
/// nothing retained about 200 bytes; `inbox_total_bytes` caps the payload
/// bytes of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct V1Limits {
    /// Messages kept per client ID; older ones are trimmed. Default 256.
    pub inbox_size: usize,
    /// Payload bytes kept per client ID; older messages are trimmed.
    /// Default 1 MiB.
    pub inbox_max_bytes: usize,
    /// How long a message is kept, and how long an ID keeps its inbox after
    /// its last v1 connection ends. Default 120 s (Socket.IO's and Ably's
    /// two minutes).
    #[serde(with = "duration")]
    pub inbox_ttl: Duration,
    /// How long an ID's epoch and newest sequence number outlive its
    /// messages, so that a client back after an hour with nothing missed
    /// resumes `recovered`. Default 24 h.
    #[serde(with = "duration")]
    pub inbox_meta_ttl: Duration,
    /// Payload bytes retained over all IDs of this node; past it a message
    /// is delivered but not retained, and its sender told so. Default
    /// 256 MiB. With the Redis backend the inboxes are in Redis and this
    /// budget does not apply (Redis's `maxmemory` bounds them).
    pub inbox_total_bytes: usize,
    /// How long a sender's message id (`mid`) is remembered, so that a
    /// resend delivers nothing new. Default 120 s, like `inbox_ttl`: a send
    /// retried after a resume is still recognised.
    #[serde(with = "duration")]
    pub dedup_ttl: Duration,
    /// Message ids remembered per sending client ID; the oldest is
    /// forgotten first. Default 4,096 (about 150 bytes each, with the
    /// stored report).
    pub dedup_per_client: usize,
    /// How long a v1 connection may take to send its `hello`; then it is
    /// closed with 4400. Default 10 s.
    #[serde(with = "duration")]
    pub hello_timeout: Duration,
    /// How long a presence member whose last connection ended abnormally
    /// (reset, EOF without a close, keepalive timeout, slow-consumer
    /// close, a server shutdown or drain close) stays a member before its
    /// leave is sent; a member back within it causes no event at all.
    /// Default 10 s: Ably keeps an abruptly gone member about 15 s, and the
    /// reconnect-flapping reports (klangk#246) settle on 10–15 s; a v1
    /// client's full-jitter backoff reaches its 2nd retry within 1.5 s.
    /// Memory: one pending-leave entry (about 100 B) per member waiting.
    /// `0s` sends every leave at once.
    #[serde(with = "duration")]
    pub presence_leave_delay: Duration,
    /// Whether v1 subscribers are presence members at all. Default `true`.
    /// `false`: no membership is kept (no memory, no Redis writes per
    /// subscribe) and presence requests are refused with
    /// `presence_disabled`.
    pub presence: bool,
    /// At most one presence frame per topic per this window, carrying every
    /// change of the window. Default 250 ms: four frames a second is what
    /// a member list on a screen can show, and a mass reconnect then costs
    /// each watcher at most four frames a second instead of one per member.
    /// Memory: the changes of one window per watched topic.
    #[serde(with = "duration")]
    pub presence_coalesce: Duration,
    /// Above this many members a topic's presence is sent as a count only
    /// (`"truncated":true`), in snapshots and events. Default 1,000 (Pusher
    /// stops at 100 members, Sockudo at 100): a 1,000-member list is about
    /// 60 KiB of JSON per snapshot, and every join or leave of a larger
    /// topic would otherwise reach every watcher.
    pub presence_max_members: usize,
    /// Whether a subscribe may carry the member's own `meta`. Default
    /// `false`: meta comes from the token's `sb_presence` claim, so a
    /// client cannot claim another's name. Meta is at most 1 KiB either way.
    pub presence_client_meta: bool,
}

impl Default for V1Limits {
    fn default() -> Self {
        Self {
            inbox_size: 256,
            inbox_max_bytes: 1024 * 1024,
            inbox_ttl: Duration::from_secs(120),
            inbox_meta_ttl: Duration::from_secs(24 * 3600),
            inbox_total_bytes: 256 * 1024 * 1024,
            dedup_ttl: Duration::from_secs(120),
            dedup_per_client: 4096,
            hello_timeout: Duration::from_secs(10),
            presence_leave_delay: Duration::from_secs(10),
            presence: true,
            presence_coalesce: Duration::from_millis(250),
            presence_max_members: 1_000,
            presence_client_meta: false,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 64 * 1024,
            max_frame_size: 64 * 1024,
            max_queued_messages: 1024,
            max_queued_bytes: 1024 * 1024,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            max_connections_per_ip: 0,
            max_connection_rate_per_ip: 0,
            max_targets: 10_000,
            max_topics_per_connection: 1_000,
            max_message_rate: 10_000,
            message_burst: 20_000,
            slow_consumer: SlowConsumer::Close,
            max_header_size: 16 * 1024,
            duplicate_ids: DuplicateIds::Allow,
            compression: Compression::default(),
            v1: V1Limits::default(),
            drain: DrainLimits::default(),
        }
    }
}

/// What happens when a connection's outgoing queue is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumer {
    /// Close the connection with 1008 "outgoing queue overflow"; the message
    /// that did not fit is reported dropped. A client that cannot keep up
    /// learns it at once and can reconnect and resynchronise.
    #[default]
    Close,
    /// Drop the oldest queued frames to make room, and tell the client how
    /// many it lost with the text frame
    /// `{"warning":{"code":"messages_dropped","count":N}}` before the next
    /// frame it gets. For feeds where only the latest messages matter.
    DropOldest,
}

/// What happens when a client ID that already has a connection connects again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DuplicateIds {
    /// Keep every connection (a user with two tabs gets messages in both).
    #[default]
    Allow,
    /// Close the oldest connection of that ID with 4001 and keep the new one.
    ReplaceOldest,
    /// Refuse the new connection with HTTP 409 before the upgrade.
    RejectNew,
}

/// Durations as strings: `"25s"`, `"500ms"`, `"2m"`, `"0"`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Parses `"25s"`, `"500ms"`, `"2m"`, `"1h"` or `"0"`.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Duration::ZERO);
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
            format!("duration {s:?} has no unit: write e.g. \"25s\" or \"500ms\"")
        })?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration {s:?} must start with a whole number, e.g. \"25s\""))?;
        match unit {
            "ms" => Ok(Duration::from_millis(n)),
            "s" => Ok(Duration::from_secs(n)),
            "m" => Ok(Duration::from_secs(n * 60)),
            "h" => Ok(Duration::from_secs(n * 3600)),
            _ => Err(format!(
                "duration {s:?} has unknown unit {unit:?}: use ms, s, m or h"
            )),
        }
    }

    /// Formats a duration the way [`parse`] reads it.
    pub fn format(d: Duration) -> String {
        if d.subsec_millis() != 0 || d.is_zero() {
            format!("{}ms", d.as_millis())
        } else {
            format!("{}s", d.as_secs())
        }
    }

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::duration::parse;
    use std::time::Duration;

    #[test]
    fn parses_durations() {
        assert_eq!(parse("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert!(parse("25").expect_err("no unit").contains("no unit"));
        assert!(parse("5y").expect_err("bad unit").contains("\"y\""));
    }
}
