//! Presence: the node heartbeat (`P:nodes`), where each ID is (`P:loc:<id>`,
//! `P:ids:<member>`), the cleanup of dead nodes, and the cluster listing.
//!
//! The cleanup of a dead member and late writes under it (from a node that
//! was frozen or cut off for longer than its TTL, or commands of a dead
//! connection still on their way) never leave a location entry behind:
//!
//! - a node writes an ID's location entry (`SADD`) before its hash field
//!   (`HSET`), and ends every batch of presence writes with
//!   `ZADD P:nodes GT CH <its deadline> <member>`;
//! - a cleanup first marks the member with a negative score of its own,
//!   then moves the member's hash away (`RENAME`, atomic), removes the
//!   location entry of every ID in the moved hash, and last removes the
//!   member only if its score is still its mark (`ZREMRANGEBYSCORE`).
//!
//! A batch whose hash fields landed before the `RENAME` has its location
//! entries (written before them) removed by the cleanup. A batch whose
//! fields landed after it put them in a new hash, and its `ZADD` (after
//! them) either raised the mark or added the member again: the member stays
//! in `P:nodes` with a deadline that has passed, and the next cleanup finds
//! the new hash. The writer, if alive, sees its `ZADD` change something and
//! starts over under a new member. A cleanup cut short leaves the member
//! marked and the moved hash in place, and the next one finishes it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::conn::RedisConn;
use ::redis::Value;

use super::keys::Keys;
use super::link::random_u32;
use super::replies::{number, parse_presence, scan_reply, scored, time_ms};
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
    let ttl = shared.config.presence_ttl;
    let ttl_ms = ttl.as_millis() as i64;
    let mut conn = session.link.conn.clone();
    if first {
        let time: Value = ::redis::cmd("TIME").query_async(&mut conn).await?;
        let now = time_ms(&time).ok_or_else(|| err("unexpected TIME reply"))?;
        session.clock_offset_ms = now as i64 - local_ms();
    }
    let sent_at = Instant::now();
    let deadline = local_ms() + session.clock_offset_ms + ttl_ms;
    let (score, _, time, nodes): (Value, Value, Value, Value) = ::redis::pipe()
        .cmd("ZSCORE")
        .arg(shared.keys.nodes())
        .arg(session.link.member.as_ref())
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
    session.deadline_ms = deadline;
    session.last_beat = sent_at;
    if !first && number(&score).is_none_or(|score| score <= 0.0) {
        // Another node found us dead (we missed heartbeats for longer than
        // the TTL) and removed our presence, or is removing it (its mark is
        // a negative score): start over as a new member. (The ZADD just
        // written is removed with the rest: the member is marked stale.)
        return Err(err("this node's presence expired; re-registering"));
    }
    // Other nodes count this member alive until `deadline` (Redis time);
    // a little margin for the clock offset's error.
    let alive_until = sent_at + ttl.saturating_sub(ttl / 20);
    session
        .epoch
        .alive_until_ms
        .store(shared.since_start_ms(alive_until), Ordering::Release);
    let members = scored(nodes);
    let mut live = HashMap::with_capacity(members.len());
    for (member, until) in &members {
        let left = Duration::from_millis(until.saturating_sub(now));
        live.insert(member.clone(), read_at + left);
    }
    shared
        .suspects
        .lock()
        .retain(|member| live.get(member).is_some_and(|until| *until > read_at));
    *shared.live.lock() = live;
    Ok((now, members))
}

/// Removes the presence of members dead for longer than the TTL (killed
/// nodes, this node's previous lives), from the heartbeat's read of
/// `P:nodes` at Redis time `now`. One node does each: a lock key. Keeps
/// this node's heartbeat going meanwhile (a dead node may have had many
/// IDs).
pub(super) async fn collect_garbage(
    shared: &Shared,
    session: &mut Session,
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
        remove_member(shared, &mut conn, &member, Some(&mut *session)).await?;
    }
    Ok(())
}

/// Deletes every trace of `member`: its IDs' location entries, its hash,
/// its heartbeat (see the module documentation for why late writes under
/// it cannot outlive this).
pub(super) async fn remove_member(
    shared: &Shared,
    conn: &mut RedisConn,
    member: &str,
    mut beating: Option<&mut Session>,
) -> Result<(), ::redis::RedisError> {
    // A mark of this cleanup's own: readers see the member dead from here
    // on, and the last step removes it only if nobody wrote since.
    let mark = -1 - i64::from(random_u32());
    ::redis::cmd("ZADD")
        .arg(shared.keys.nodes())
        .arg("XX")
        .arg(mark)
        .arg(member)
        .exec_async(conn)
        .await?;
    let moved = shared.keys.gc_ids(member);
    // What an earlier cleanup moved and did not finish, then the hash.
    sweep(shared, conn, &moved, member, beating.as_deref_mut()).await?;
    let renamed: Result<(), ::redis::RedisError> = ::redis::cmd("RENAME")
        .arg(shared.keys.ids(member))
        .arg(&moved)
        .exec_async(conn)
        .await;
    match renamed {
        Ok(()) => sweep(shared, conn, &moved, member, beating).await?,
        // "no such key": no hash (an error Redis sent, not a lost link).
        Err(error) if error.kind() == ::redis::ErrorKind::ResponseError => {}
        Err(error) => return Err(error),
    }
    ::redis::pipe()
        .cmd("ZREMRANGEBYSCORE")
        .arg(shared.keys.nodes())
        .arg(mark)
        .arg(mark)
        .ignore()
        .cmd("DEL")
        .arg(shared.keys.gc(member))
        .ignore()
        .exec_async(conn)
        .await
}

/// Removes `member` from the location set of every ID in the hash `key`
/// (which nobody writes to), then deletes the hash. With `beating`, keeps
/// that session's heartbeat going.
async fn sweep(
    shared: &Shared,
    conn: &mut RedisConn,
    key: &str,
    member: &str,
    mut beating: Option<&mut Session>,
) -> Result<(), ::redis::RedisError> {
    let period = shared.config.presence_ttl / 3;
    let mut cursor = 0u64;
    // Bounded: HSCAN ends, and the hash does not grow while it is read.
    for _ in 0..u32::MAX {
        if let Some(session) = beating.as_deref_mut()
            && session.last_beat.elapsed() >= period
        {
            heartbeat(shared, session, false).await?;
        }
        let reply: Value = ::redis::cmd("HSCAN")
            .arg(key)
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
    ::redis::cmd("DEL").arg(key).exec_async(conn).await
}

/// Writes the current local state of each of `ids`. Refreshes the
/// heartbeat between batches when it is due (a node registering many IDs
/// must not look dead meanwhile), and fails when this member's presence
/// was removed or is being removed by a cleanup.
pub(super) async fn write_presence(
    shared: &Shared,
    session: &mut Session,
    ids: Vec<ClientId>,
) -> Result<(), ::redis::RedisError> {
    let member = Arc::clone(&session.link.member);
    let hash = shared.keys.ids(&member);
    let mut conn = session.link.conn.clone();
    let period = shared.config.presence_ttl / 3;
    for chunk in ids.chunks(BATCH) {
        if session.last_beat.elapsed() >= period {
            heartbeat(shared, session, false).await?;
        }
        let mut pipe = ::redis::pipe();
        for id in chunk {
            let loc = shared.keys.loc(id.as_str());
            match shared.local.presence(id) {
                Some((count, since)) => {
                    // The location entry first: see the module docs.
                    pipe.cmd("SADD").arg(loc).arg(member.as_ref()).ignore();
                    pipe.cmd("HSET")
                        .arg(&hash)
                        .arg(id.as_str())
                        .arg(format!("{count},{since}"))
                        .ignore();
                }
                None => {
                    pipe.cmd("HDEL").arg(&hash).arg(id.as_str()).ignore();
                    pipe.cmd("SREM").arg(loc).arg(member.as_ref()).ignore();
                }
            }
        }
        pipe.cmd("ZADD")
            .arg(shared.keys.nodes())
            .arg("GT")
            .arg("CH")
            .arg(session.deadline_ms)
            .arg(member.as_ref());
        let (changed,): (i64,) = pipe.query_async(&mut conn).await?;
        if changed != 0 {
            // Our deadline is what the last heartbeat wrote: anything else
            // there means a cleanup marked or removed this member.
            return Err(err(
                "this node's presence was removed by a cleanup; re-registering",
            ));
        }
    }
    Ok(())
}

/// Leaving the cluster on shutdown: remove this member's presence so that
/// other nodes report its IDs offline at once.
pub(super) async fn leave(shared: &Shared, session: &Session) {
    let mut conn = session.link.conn.clone();
    let member = Arc::clone(&session.link.member);
    let work = remove_member(shared, &mut conn, &member, None);
    match tokio::time::timeout(shared.config.request_timeout, work).await {
        Ok(Ok(())) => tracing::info!(node = %shared.config.node_id, "left the cluster"),
        Ok(Err(error)) => tracing::warn!(%error, "could not remove this node's presence"),
        Err(_) => tracing::warn!("timed out removing this node's presence"),
    }
}

/// Redis's clock and every member of `P:nodes` with its deadline.
pub(super) async fn read_nodes(
    conn: &mut RedisConn,
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
