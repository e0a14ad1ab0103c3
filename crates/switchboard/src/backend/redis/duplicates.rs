//! `duplicate_ids` across nodes: `reject-new` and `replace-oldest` hold for
//! the whole cluster, not just per node.
//!
//! Each node applies the policy to its own connections when one registers
//! (`MemoryBackend::register`); this module does the rest, after the new
//! connection's presence is written to Redis (so that every later newcomer
//! on any node finds it):
//!
//! - **`reject-new`**: the newcomer looks the ID up (`P:loc:<id>`); if a
//!   live node other than this one has it, the newcomer is refused (409
//!   `id_in_use`, or 4409 for a `switchboard.v1` hello). Each newcomer
//!   writes its presence *before* it reads the others', so of two
//!   newcomers racing on two nodes at least one sees the other: both may
//!   be refused, never both kept.
//! - **`replace-oldest`**: every connection gets a *stamp* from Redis, a
//!   number that grows with each connection of the ID cluster-wide (the
//!   Redis clock in µs, kept strictly increasing per ID by a script on
//!   `P:{id:<id>}:stamp`). The newcomer sends a close carrying its stamp to
//!   every other node that has the ID; each closes (4001) its connections
//!   of the ID stamped before it and answers with the newest stamp it kept.
//!   If a newer connection raced this one, the newcomer closes itself: the
//!   newest connection wins wherever it is.
//!
//! Race windows: while Redis cannot be reached, the policy holds per node
//! only (a node never refuses clients because the backplane is down); a
//! connection's presence reaches Redis within one flush (a few ms) and its
//! close reaches other nodes within `request_timeout`, so for that long two
//! connections of one ID can coexist under `replace-oldest`. A Redis
//! Cluster failover can lose the last writes to `P:loc:<id>`, which widens
//! the `reject-new` window to the presence TTL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::wire::{Header, Kind};
use super::{Link, Shared};
use crate::backend::RegisterError;
use crate::id::ClientId;
use crate::limits::DuplicateIds;
use crate::protocol::close::{CloseCode, CloseFrame};
use crate::runtime::mailbox::ConnId;

/// Gives the connection a stamp: the Redis time in µs, or one more than
/// the ID's last stamp if the clock has not moved past it (two connections
/// in one µs, or a clock set back). Lua numbers are doubles, exact up to
/// 2^53 µs (year 2255); `%.0f` keeps the stored value exact too.
const STAMP: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if now <= last then now = last + 1 end
redis.call('SET', KEYS[1], string.format('%.0f', now), 'PX', ARGV[1])
return now
";

/// How long the ID's last stamp is kept. The stamps follow the clock, so
/// an expired key only loses the guard against a clock set back.
const STAMP_TTL: Duration = Duration::from_secs(3600);

/// How long a close for an ID whose connection here had no stamp yet is
/// remembered (that connection then compares itself with it).
const EARLY_CLOSE_MEMORY: Duration = Duration::from_secs(10);

/// The stamps of this node's connections (`replace-oldest` only), and
/// closes that arrived for an ID while its connection here waited for its
/// stamp.
#[derive(Default)]
pub(super) struct Stamps {
    by_conn: Mutex<HashMap<ConnId, u64>>,
    early_closes: Mutex<HashMap<ClientId, (u64, Instant)>>,
}

impl Stamps {
    /// Forgets a connection that ended.
    pub(super) fn forget(&self, conn: ConnId) {
        let mut by_conn = self.by_conn.lock();
        if !by_conn.is_empty() {
            by_conn.remove(&conn);
        }
    }

    /// Records `stamp` for `conn`; returns the newest stamp of a close for
    /// `id` that arrived while `conn` had none (0: none).
    fn record(&self, id: &ClientId, conn: ConnId, stamp: u64) -> u64 {
        self.by_conn.lock().insert(conn, stamp);
        self.early_closes
            .lock()
            .remove(id)
            .map_or(0, |(newest, _)| newest)
    }

    fn remember_early_close(&self, id: &ClientId, stamp: u64) {
        let now = Instant::now();
        let mut early = self.early_closes.lock();
        // Entries are consumed by the connection they wait for; one that
        // ended without a stamp leaves its entry, dropped here.
        early.retain(|_, (_, at)| now.duration_since(*at) < EARLY_CLOSE_MEMORY);
        let entry = early.entry(id.clone()).or_insert((0, now));
        entry.0 = entry.0.max(stamp);
    }
}

fn replaced() -> CloseFrame {
    CloseFrame::new(
        CloseCode::REPLACED,
        "replaced by a newer connection with the same client id",
    )
}

impl Shared {
    /// [`Backend::settle_duplicate_ids`](crate::backend::Backend::settle_duplicate_ids);
    /// `flushed`: the connection's presence is in Redis already.
    pub(super) async fn settle_duplicate_ids(
        &self,
        id: &ClientId,
        conn: ConnId,
        flushed: bool,
    ) -> Result<(), RegisterError> {
        let policy = self.local.duplicate_ids();
        if policy == DuplicateIds::Allow {
            return Ok(());
        }
        // Without Redis the policy holds per node only (see the module
        // documentation); a connection without a stamp counts as the
        // oldest.
        let Some(link) = self.link() else {
            self.stamps.record(id, conn, 0);
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let stamp = if policy == DuplicateIds::ReplaceOldest {
            let stamp = tokio::time::timeout_at(deadline, self.stamp(&link, id)).await;
            let Ok(Ok(stamp)) = stamp else {
                self.stamps.record(id, conn, 0);
                return Ok(());
            };
            if self.stamps.record(id, conn, stamp) > stamp {
                self.local.disconnect_where(id, &replaced(), |c| c == conn);
                return Ok(());
            }
            stamp
        } else {
            0
        };
        if !flushed {
            let generation = self.mark_id(id);
            self.wait_flushed(generation).await;
        }
        let located =
            tokio::time::timeout_at(deadline, self.locate(&link, std::slice::from_ref(id), true))
                .await;
        let Ok(Ok(located)) = located else {
            return Ok(());
        };
        if located.is_empty() {
            return Ok(());
        }
        if policy == DuplicateIds::RejectNew {
            return Err(RegisterError::AlreadyConnected(id.clone()));
        }
        if self
            .close_older_elsewhere(&link, id, stamp, &located, deadline)
            .await
            > stamp
        {
            self.local.disconnect_where(id, &replaced(), |c| c == conn);
        }
        Ok(())
    }

    /// A new stamp for a connection of `id`.
    async fn stamp(&self, link: &Link, id: &ClientId) -> Result<u64, ::redis::RedisError> {
        // `EVAL` with the script's text (~300 bytes): once per connection,
        // and only under `replace-oldest`, so not worth a cached SHA.
        let mut conn = link.conn.clone();
        ::redis::cmd("EVAL")
            .arg(STAMP)
            .arg(1)
            .arg(self.keys.id_stamp(id.as_str()))
            .arg(STAMP_TTL.as_millis() as u64)
            .query_async(&mut conn)
            .await
    }

    /// Asks each member of `located` to close its connections of `id`
    /// stamped before `stamp`; returns the newest stamp any of them kept.
    async fn close_older_elsewhere(
        &self,
        link: &Link,
        id: &ClientId,
        stamp: u64,
        located: &[(String, Vec<usize>)],
        deadline: tokio::time::Instant,
    ) -> u64 {
        let (request, mut rx, _guard) = self.register_request();
        let frame = replaced();
        let messages: Vec<(String, Vec<u8>)> = located
            .iter()
            .map(|(member, _)| {
                let mut header = Header::new(Kind::Close, request, &link.member);
                header.t = vec![std::borrow::Cow::Borrowed(id.as_str())];
                header.c = usize::from(frame.code.0);
                header.o = stamp;
                (member.clone(), header.encode(frame.reason.as_bytes()))
            })
            .collect();
        self.count_published(Kind::Close, messages.len());
        let Ok(counts) = tokio::time::timeout_at(deadline, self.publish_each(link, messages)).await
        else {
            return 0;
        };
        let expected: usize = counts
            .iter()
            .map(|c| usize::try_from(c.unwrap_or(0)).unwrap_or(0))
            .sum();
        let replies = self.collect(&mut rx, expected, deadline).await;
        replies.iter().map(|r| r.newest).max().unwrap_or(0)
    }

    /// Another node's newcomer stamped `stamp`: closes this node's
    /// connections of `id` stamped before it. Returns how many were closed
    /// and the newest stamp kept. A connection still waiting for its own
    /// stamp is left to compare itself once it has one.
    pub(super) fn close_older(
        &self,
        id: &ClientId,
        stamp: u64,
        frame: &CloseFrame,
    ) -> (usize, u64) {
        let conns = self.local.connections_of(id);
        let mut older = Vec::new();
        let mut newest = 0;
        let mut unstamped = false;
        {
            let by_conn = self.stamps.by_conn.lock();
            for conn in conns {
                match by_conn.get(&conn) {
                    Some(&own) if own < stamp => older.push(conn),
                    Some(&own) => newest = newest.max(own),
                    None => unstamped = true,
                }
            }
        }
        if unstamped {
            self.stamps.remember_early_close(id, stamp);
        }
        let closed = self
            .local
            .disconnect_where(id, frame, |c| older.contains(&c));
        (closed, newest)
    }
}
