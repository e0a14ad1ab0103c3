//! Presence: the node heartbeat (`P:nodes`), where each ID is (`P:loc:<id>`,
//! `P:ids:<member>`), the cleanup of dead nodes, and the cluster listing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::Value;
use ::redis::aio::MultiplexedConnection;

use super::keys::Keys;
use super::replies::{parse_presence, scan_reply, scored, time_ms};
use super::{BATCH, Session, Shared, err, local_ms};
use crate::backend::ClientInfo;
use crate::id::ClientId;

impl Shared {
    pub(super) async fn cluster_clients(&self) -> Option<Vec<ClientInfo>> {
        let link = self.link()?;
        let listing = async {
            let mut conn = link.conn.clone();
            let (now_ms, members) = read_nodes(&mut conn, &self.keys).await?;
            let mut merged: BTreeMap<ClientId, (usize, u64)> = BTreeMap::new();
            for (member, until_ms) in members {
                if until_ms <= now_ms || self.is_own(&member) {
                    continue;
                }
                let key = self.keys.ids(&member);
                let mut cursor = 0u64;
                loop {
                    let reply: Value = ::redis::cmd("HSCAN")
                        .arg(&key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await?;
                    let (next, fields) = scan_reply(reply);
                    for pair in fields.chunks_exact(2) {
                        let (Ok(id), Some((count, since))) =
                            (ClientId::new(&pair[0]), parse_presence(&pair[1]))
                        else {
                            continue;
                        };
                        let entry = merged.entry(id).or_insert((0, u64::MAX));
                        entry.0 += count;
                        entry.1 = entry.1.min(since);
                    }
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            for info in self.local.clients_now() {
                let since = info.connected_since_unix_ms;
                let entry = merged.entry(info.id).or_insert((0, u64::MAX));
                entry.0 += info.connections;
                entry.1 = entry.1.min(since);
            }
            Ok::<_, ::redis::RedisError>(
                merged
                    .into_iter()
                    .map(|(id, (connections, since))| ClientInfo {
                        id,
                        connections,
                        connected_since_unix_ms: since,
                    })
                    .collect(),
            )
        };
        tokio::time::timeout(self.config.request_timeout, listing)
            .await
            .ok()?
            .ok()
    }
}

/// Refreshes this member's deadline and reads everyone else's: Redis's
/// clock (ms) and every member with its deadline.
pub(super) async fn heartbeat(
    shared: &Shared,
    session: &mut Session,
    first: bool,
) -> Result<(u64, Vec<(String, u64)>), ::redis::RedisError> {
    let ttl_ms = shared.config.presence_ttl.as_millis() as i64;
    let mut conn = session.link.conn.clone();
    if first {
        let time: Value = ::redis::cmd("TIME").query_async(&mut conn).await?;
        let now = time_ms(&time).ok_or_else(|| err("unexpected TIME reply"))?;
        session.clock_offset_ms = now as i64 - local_ms();
    }
    let deadline = local_ms() + session.clock_offset_ms + ttl_ms;
    let (added, time, nodes): (i64, Value, Value) = ::redis::pipe()
        .cmd("ZADD")
        .arg(shared.keys.nodes())
        .arg(deadline)
        .arg(session.link.member.as_ref())
        .cmd("TIME")
        .cmd("ZRANGE")
        .arg(shared.keys.nodes())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await?;
    let read_at = Instant::now();
    let now = time_ms(&time).ok_or_else(|| err("unexpected TIME reply"))?;
    session.clock_offset_ms = now as i64 - local_ms();
    if added == 1 && !first {
        // Another node found us dead (we missed heartbeats for longer than
        // the TTL) and removed our presence: start over as a new member.
        return Err(err("this node's presence expired; re-registering"));
    }
    let members = scored(nodes);
    let mut live = HashMap::with_capacity(members.len());
    for (member, until) in &members {
        let left = Duration::from_millis(until.saturating_sub(now));
        live.insert(member.clone(), read_at + left);
    }
    *shared.live.lock() = live;
    Ok((now, members))
}

/// Removes the presence of members dead for longer than the TTL (killed
/// nodes, this node's previous lives), from the heartbeat's read of
/// `P:nodes` at Redis time `now`. One node does each: a lock key.
pub(super) async fn collect_garbage(
    shared: &Shared,
    session: &Session,
    now: u64,
    members: Vec<(String, u64)>,
) -> Result<(), ::redis::RedisError> {
    let mut conn = session.link.conn.clone();
    let grace = shared.config.presence_ttl.as_millis() as u64;
    for (member, until) in members {
        if until.saturating_add(grace) >= now || member == *session.link.member {
            continue;
        }
        let locked: Option<String> = ::redis::cmd("SET")
            .arg(shared.keys.gc(&member))
            .arg(session.link.member.as_ref())
            .arg("NX")
            .arg("PX")
            .arg(grace.saturating_mul(3))
            .query_async(&mut conn)
            .await?;
        if locked.is_none() {
            continue;
        }
        tracing::info!(node = %shared.config.node_id, dead = %member, "removing the presence of a dead node");
        remove_member(shared, &mut conn, &member).await?;
    }
    Ok(())
}

/// Deletes every trace of `member`: its IDs' location entries, its hash,
/// its heartbeat.
pub(super) async fn remove_member(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    member: &str,
) -> Result<(), ::redis::RedisError> {
    let key = shared.keys.ids(member);
    let mut cursor = 0u64;
    loop {
        let reply: Value = ::redis::cmd("HSCAN")
            .arg(&key)
            .arg(cursor)
            .arg("COUNT")
            .arg(BATCH)
            .query_async(conn)
            .await?;
        let (next, fields) = scan_reply(reply);
        let mut pipe = ::redis::pipe();
        for pair in fields.chunks_exact(2) {
            pipe.cmd("SREM")
                .arg(shared.keys.loc(&pair[0]))
                .arg(member)
                .ignore();
        }
        if !fields.is_empty() {
            pipe.exec_async(conn).await?;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    ::redis::pipe()
        .cmd("DEL")
        .arg(&key)
        .ignore()
        .cmd("ZREM")
        .arg(shared.keys.nodes())
        .arg(member)
        .ignore()
        .cmd("DEL")
        .arg(shared.keys.gc(member))
        .ignore()
        .exec_async(conn)
        .await
}

/// Writes the current local state of each of `ids`.
pub(super) async fn write_presence(
    shared: &Shared,
    session: &Session,
    ids: Vec<ClientId>,
) -> Result<(), ::redis::RedisError> {
    let member = session.link.member.as_ref();
    let hash = shared.keys.ids(member);
    let mut conn = session.link.conn.clone();
    for chunk in ids.chunks(BATCH) {
        let mut pipe = ::redis::pipe();
        for id in chunk {
            let loc = shared.keys.loc(id.as_str());
            match shared.local.presence(id) {
                Some((count, since)) => {
                    pipe.cmd("HSET")
                        .arg(&hash)
                        .arg(id.as_str())
                        .arg(format!("{count},{since}"))
                        .ignore();
                    pipe.cmd("SADD").arg(loc).arg(member).ignore();
                }
                None => {
                    pipe.cmd("HDEL").arg(&hash).arg(id.as_str()).ignore();
                    pipe.cmd("SREM").arg(loc).arg(member).ignore();
                }
            }
        }
        pipe.exec_async(&mut conn).await?;
    }
    Ok(())
}

/// Leaving the cluster on shutdown: remove this member's presence so that
/// other nodes report its IDs offline at once.
pub(super) async fn leave(shared: &Shared, session: &Session) {
    let mut conn = session.link.conn.clone();
    let member = Arc::clone(&session.link.member);
    let work = remove_member(shared, &mut conn, &member);
    match tokio::time::timeout(shared.config.request_timeout, work).await {
        Ok(Ok(())) => tracing::info!(node = %shared.config.node_id, "left the cluster"),
        Ok(Err(error)) => tracing::warn!(%error, "could not remove this node's presence"),
        Err(_) => tracing::warn!("timed out removing this node's presence"),
    }
}

/// Redis's clock and every member of `P:nodes` with its deadline.
pub(super) async fn read_nodes(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
) -> Result<(u64, Vec<(String, u64)>), ::redis::RedisError> {
    let (time, nodes): (Value, Value) = ::redis::pipe()
        .cmd("TIME")
        .cmd("ZRANGE")
        .arg(keys.nodes())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(conn)
        .await?;
    let now = time_ms(&time).ok_or_else(|| {
        ::redis::RedisError::from((::redis::ErrorKind::TypeError, "unexpected TIME reply"))
    })?;
    Ok((now, scored(nodes)))
}
