//! Topic presence across nodes (docs/protocol-v1.md, "Presence"; the node
//! liveness of `presence.rs` is another matter: where client IDs are).
//!
//! | what | Redis (hash tag `{pr:<topic>}` for the first five) |
//! |------|-------|
//! | members | hash `P:{pr:t}:m`: ID → `since_ms,meta` |
//! | connections per member, all nodes | hash `P:{pr:t}:t`: ID → count |
//! | connections per member per node | hash `P:{pr:t}:c`: `<id>\|<instance>` → count |
//! | revision | string `P:{pr:t}:v` (`INCR` per change) |
//! | events | shard channel `P:{pr:t}:e`, published by the script that made the change |
//! | pending leaves | sorted set `P:pl`: `"<topic> <id>"` → due (Redis time, ms) |
//! | live instances | sorted set `P:pn`: `node_id#token` → alive until (Redis time, ms) |
//! | an instance's topics | set `P:pt:<instance>` |
//! | a cleanup of a dead instance | lock `P:pgc:<instance>` (`SET NX PX`, 3 × `presence_ttl`) |
//!
//! Every change of a topic's membership is one Lua script over the topic's
//! keys that also `SPUBLISH`es the event (the channel has the same hash
//! tag, so a Cluster runs it on one shard): the revision and the order in
//! which every node hears the events are the same.
//!
//! **Pending leaves** are finalised by exactly one node: every node sweeps
//! the due entries of `P:pl` every [`SWEEP_EVERY`], claims each with a
//! compare-and-delete script (`ZREM` only if the score is still the one it
//! read: a member that left again meanwhile has a later one), and the
//! claimant runs the topic's finalise script, which sends the leave only if
//! the member still has no connection.
//!
//! **Dead nodes**: each instance refreshes its deadline in `P:pn` every
//! `presence_ttl / 3`. When a node sees a deadline passed, it takes a lock
//! (`P:pgc:<instance>`, `SET NX PX`), marks the instance (its score
//! negated, compare-and-set), removes its connection counts from every
//! topic in `P:pt:<instance>`, schedules the leave of each member left
//! without connections at *the dead instance's deadline* plus
//! `presence_leave_delay`, and removes the instance only if it still has
//! its mark. A cleanup cut short leaves the mark; the next one (after the
//! lock expires) does it again, idempotently. An instance that was only
//! frozen finds its entry missing or marked at its next beat and writes
//! its counts again. (Not covered: a frozen instance that resumes *while*
//! a cleanup runs may have counts removed after it wrote them again; its
//! members then leave although connected, until its next reconnection.) A node SIGKILLed at `k` had its deadline at most
//! `k + presence_ttl`, so each of its members leaves exactly once by
//! `k + presence_ttl + presence_leave_delay + SWEEP_EVERY` (+ the
//! coalescing window at the watchers).
//!
//! **Reconnection**: this node keeps its own connection counts; on a new
//! Redis connection it writes them again (`SETCOUNT`) and subscribes its
//! watched topics' channels again, so that Redis agrees with it even if a
//! cleanup removed its counts while it was away.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::conn::RedisConn;
use ::redis::Value;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::Shared;
use crate::backend::presence::timers::{Fire, Timers};
use crate::backend::presence::watchers::{Coalescing, Watchers};
use crate::backend::presence::{
    Change, Departure, Event, PresenceMember, PresenceMode, PresenceSettings, PresenceSnapshot,
};
use crate::id::{ClientId, Topic};
use crate::runtime::mailbox::{ConnId, ConnRef};

/// How often each node sweeps the due pending leaves. The bound on a
/// leave's lateness: a leave due at `t` is sent by `t + SWEEP_EVERY`.
pub(super) const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Pending leaves claimed per sweep at most (more wait for the next one).
const SWEEP_BATCH: usize = 500;

/// Keys `m t c v e`. Args: id, instance, since_ms, meta. A connection of
/// `id` joined on `instance`: a join (or a meta update) when it changes
/// the member.
const JOIN: &str = r"
local id, field = ARGV[1], ARGV[1] .. '|' .. ARGV[2]
redis.call('HINCRBY', KEYS[3], field, 1)
redis.call('HINCRBY', KEYS[2], id, 1)
local cur = redis.call('HGET', KEYS[1], id)
local kind
if not cur then
  redis.call('HSET', KEYS[1], id, ARGV[3] .. ',' .. ARGV[4])
  kind = 'j'
else
  local comma = string.find(cur, ',', 1, true)
  if string.sub(cur, comma + 1) == ARGV[4] then return 0 end
  redis.call('HSET', KEYS[1], id, string.sub(cur, 1, comma) .. ARGV[4])
  kind = 'u'
end
local rev = redis.call('INCR', KEYS[4])
local count = redis.call('HLEN', KEYS[1])
redis.call('SPUBLISH', KEYS[5], cjson.encode({rev = rev, id = id, k = kind, meta = ARGV[4], count = count}))
return rev
";

/// Keys `m t c v e`. Args: id, instance, `1` to leave now. Returns 0 when
/// the member keeps connections (or left now), else Redis's time in ms:
/// the member has none left and its leave is pending.
const LEAVE: &str = r"
local id, field = ARGV[1], ARGV[1] .. '|' .. ARGV[2]
local here = redis.call('HINCRBY', KEYS[3], field, -1)
if here < 0 then
  redis.call('HDEL', KEYS[3], field)
  return 0
end
if here == 0 then redis.call('HDEL', KEYS[3], field) end
local total = redis.call('HINCRBY', KEYS[2], id, -1)
if total > 0 then return 0 end
redis.call('HDEL', KEYS[2], id)
if ARGV[3] ~= '1' then
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
if redis.call('HDEL', KEYS[1], id) == 0 then return 0 end
local rev = redis.call('INCR', KEYS[4])
local count = redis.call('HLEN', KEYS[1])
redis.call('SPUBLISH', KEYS[5], cjson.encode({rev = rev, id = id, k = 'l', count = count}))
return 0
";

/// Keys `m t c v e`. Args: id. A due pending leave, claimed: the member
/// leaves if it still has no connection.
const FINALIZE: &str = r"
local total = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if total > 0 then return 0 end
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
local rev = redis.call('INCR', KEYS[4])
local count = redis.call('HLEN', KEYS[1])
redis.call('SPUBLISH', KEYS[5], cjson.encode({rev = rev, id = ARGV[1], k = 'l', count = count}))
return 1
";

/// Keys `m t c v e`. Args: id, instance, since_ms, meta, count. Sets this
/// instance's connection count of `id` (after a reconnection). Returns
/// Redis's time in ms when the member is left without connections (its
/// leave is then pending), else 0.
const SETCOUNT: &str = r"
local id, field = ARGV[1], ARGV[1] .. '|' .. ARGV[2]
local old = tonumber(redis.call('HGET', KEYS[3], field) or '0')
local n = tonumber(ARGV[5])
local total = tonumber(redis.call('HGET', KEYS[2], id) or '0')
if n ~= old then
  if n > 0 then redis.call('HSET', KEYS[3], field, n) else redis.call('HDEL', KEYS[3], field) end
  total = redis.call('HINCRBY', KEYS[2], id, n - old)
end
if total <= 0 then
  redis.call('HDEL', KEYS[2], id)
  if redis.call('HEXISTS', KEYS[1], id) == 0 then return 0 end
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
if redis.call('HEXISTS', KEYS[1], id) == 1 then return 0 end
redis.call('HSET', KEYS[1], id, ARGV[3] .. ',' .. ARGV[4])
local rev = redis.call('INCR', KEYS[4])
local count = redis.call('HLEN', KEYS[1])
redis.call('SPUBLISH', KEYS[5], cjson.encode({rev = rev, id = id, k = 'j', meta = ARGV[4], count = count}))
return 0
";

/// Keys `m t c v e`. Args: instance. Removes a dead instance's connection
/// counts; returns the IDs left without connections.
const DROP_INSTANCE: &str = r"
local suffix = '|' .. ARGV[1]
local fields = redis.call('HGETALL', KEYS[3])
local gone = {}
for i = 1, #fields, 2 do
  local f = fields[i]
  if #f > #suffix and string.sub(f, -#suffix) == suffix then
    local id = string.sub(f, 1, #f - #suffix)
    redis.call('HDEL', KEYS[3], f)
    local total = redis.call('HINCRBY', KEYS[2], id, -tonumber(fields[i + 1]))
    if total <= 0 then
      redis.call('HDEL', KEYS[2], id)
      table.insert(gone, id)
    end
  end
end
return gone
";

/// Keys `m t v`. Args: `1` for the member list, the member limit. Returns
/// `[rev, count]` or `[rev, count, members, connections]`.
const SNAPSHOT: &str = r"
local count = redis.call('HLEN', KEYS[1])
local rev = tonumber(redis.call('GET', KEYS[3]) or '0')
if ARGV[1] == '1' and count <= tonumber(ARGV[2]) then
  return {rev, count, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
end
return {rev, count}
";

/// Keys: a sorted set. Args: how many. The entries due by Redis's clock,
/// with their scores as strings (for [`CLAIM`]).
const DUE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
";

/// Keys: a sorted set. Args: member, score as read. Compare-and-delete:
/// 1 for exactly one caller, and only while the score is unchanged.
const CLAIM: &str = r"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
";

/// Keys `P:pn`. Args: instance, ttl ms. Refreshes the instance's deadline;
/// returns 1 when the instance was missing or marked by a cleanup (its
/// counts are gone or going: it must write them again), else 0.
const BEAT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if (not old) or tonumber(old) < 0 then return 1 end
return 0
";

/// Keys `P:pn`. Args: instance, score as read. Marks a dead instance as
/// being cleaned up (its score negated, so that its deadline is kept) if
/// its score is still the one read, or was marked already; returns the
/// mark, or 0 when the instance beat meanwhile.
const MARK: &str = r"
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
if score ~= ARGV[2] then return 0 end
local n = tonumber(score)
if n > 0 then
  redis.call('ZADD', KEYS[1], -n, ARGV[1])
  return -n
end
return n
";

/// What a connection did, queued for the worker in order.
enum Op {
    Join {
        topic: Topic,
        id: ClientId,
        meta: Option<Arc<str>>,
        done: oneshot::Sender<()>,
        /// The local change's number (see [`LocalState::seq`]).
        seq: u64,
    },
    Leave {
        topic: Topic,
        id: ClientId,
        departure: Departure,
        seq: u64,
    },
    Subscribe(Topic, oneshot::Sender<()>),
    Unsubscribe(Topic),
}

/// This node's part of cluster presence.
pub(super) struct PresenceMembers {
    /// `node_id#token`: this process, whatever its Redis connection.
    instance: String,
    pub(super) watchers: Watchers,
    timers: Timers<Topic>,
    settings: PresenceSettings,
    ops: mpsc::UnboundedSender<Op>,
    ops_rx: Mutex<Option<mpsc::UnboundedReceiver<Op>>>,
    local: Mutex<LocalState>,
    /// Members whose count changed while Redis could not be written.
    dirty: Mutex<HashSet<(Topic, ClientId)>>,
}

/// This node's connections per topic and member, with the meta and join
/// time they were written with: what a (re)connection writes whole.
#[derive(Default)]
struct LocalState {
    topics: HashMap<Topic, HashMap<ClientId, LocalMember>>,
    /// Numbers every change; a queued operation whose number is at or below
    /// the one a resync read is already in what the resync wrote.
    seq: u64,
}

#[derive(Clone)]
struct LocalMember {
    conns: u32,
    since_ms: u64,
    meta: Option<Arc<str>>,
}

impl PresenceMembers {
    pub(super) fn new(instance: String, settings: PresenceSettings) -> Self {
        let (ops, rx) = mpsc::unbounded_channel();
        Self {
            instance,
            watchers: Watchers::new(Coalescing {
                window: settings.coalesce,
                max_members: settings.max_members,
            }),
            timers: Timers::new(),
            settings,
            ops,
            ops_rx: Mutex::new(Some(rx)),
            local: Mutex::new(LocalState::default()),
            dirty: Mutex::new(HashSet::new()),
        }
    }

    /// Members with a connection here, and watchers (for metrics).
    pub(super) fn stats(&self) -> (usize, usize) {
        let members = self.local.lock().topics.values().map(HashMap::len).sum();
        (members, self.watchers.watcher_count())
    }
}

impl Fire for Shared {
    type Job = Topic;

    fn timers(&self) -> &Timers<Topic> {
        &self.presence.timers
    }

    fn fire(&self, topic: Topic) {
        self.presence.watchers.flush(&topic);
    }
}

/// One event as the scripts publish it.
#[derive(serde::Deserialize)]
struct Published {
    rev: u64,
    id: String,
    k: String,
    #[serde(default)]
    meta: String,
    count: usize,
}

impl Shared {
    pub(super) async fn presence_join(&self, topic: &Topic, id: &ClientId, meta: Option<Arc<str>>) {
        let seq = {
            let mut local = self.presence.local.lock();
            local.seq += 1;
            let seq = local.seq;
            let member = local
                .topics
                .entry(topic.clone())
                .or_default()
                .entry(id.clone())
                .or_insert_with(|| LocalMember {
                    conns: 0,
                    since_ms: crate::backend::unix_ms(std::time::SystemTime::now()),
                    meta: meta.clone(),
                });
            member.conns += 1;
            member.meta.clone_from(&meta);
            seq
        };
        let (done, wait) = oneshot::channel();
        let op = Op::Join {
            topic: topic.clone(),
            id: id.clone(),
            meta,
            done,
            seq,
        };
        if self.presence.ops.send(op).is_ok() {
            let _ = tokio::time::timeout(self.config.request_timeout, wait).await;
        }
    }

    pub(super) fn presence_leave(&self, topic: &Topic, id: &ClientId, departure: Departure) {
        let seq = {
            let mut local = self.presence.local.lock();
            let local = &mut *local;
            let Some(members) = local.topics.get_mut(topic) else {
                return;
            };
            let Some(member) = members.get_mut(id) else {
                return;
            };
            member.conns = member.conns.saturating_sub(1);
            if member.conns == 0 {
                members.remove(id);
                if members.is_empty() {
                    local.topics.remove(topic);
                }
            }
            local.seq += 1;
            local.seq
        };
        let _ = self.presence.ops.send(Op::Leave {
            topic: topic.clone(),
            id: id.clone(),
            departure,
            seq,
        });
    }

    pub(super) async fn presence_watch(
        &self,
        topic: &Topic,
        watcher: &ConnRef,
        mode: PresenceMode,
    ) -> Option<PresenceSnapshot> {
        // The channel first, then the snapshot, then the watcher: an event
        // published between the read and the registration is missed by
        // this watcher, and its next frame's `prev` shows the jump.
        let (done, wait) = oneshot::channel();
        self.presence
            .ops
            .send(Op::Subscribe(topic.clone(), done))
            .ok()?;
        tokio::time::timeout(self.config.request_timeout, wait)
            .await
            .ok()?
            .ok()?;
        let snapshot = self.presence_snapshot(topic, mode).await?;
        self.presence.watchers.watch(topic, watcher, mode);
        Some(snapshot)
    }

    pub(super) fn presence_unwatch(&self, topic: &Topic, watcher: ConnId) {
        if !self.presence.watchers.unwatch(topic, watcher) {
            let _ = self.presence.ops.send(Op::Unsubscribe(topic.clone()));
        }
    }

    pub(super) async fn presence_snapshot(
        &self,
        topic: &Topic,
        mode: PresenceMode,
    ) -> Option<PresenceSnapshot> {
        let link = self.link()?;
        let mut conn = link.conn.clone();
        let [m, t, _, v, _] = self.keys.presence_topic(topic);
        let full = mode == PresenceMode::Full;
        let mut command = ::redis::cmd("EVAL");
        command
            .arg(SNAPSHOT)
            .arg(3)
            .arg(m)
            .arg(t)
            .arg(v)
            .arg(if full { "1" } else { "0" })
            .arg(self.presence.settings.max_members);
        let read = command.query_async::<Value>(&mut conn);
        let reply = tokio::time::timeout(self.config.request_timeout, read)
            .await
            .ok()?
            .ok()?;
        parse_snapshot(reply, full, self.presence.settings.max_members)
    }

    /// A message on a presence channel: one event of `topic`.
    pub(super) fn on_presence_event(&self, topic: Topic, message: &[u8]) {
        let Ok(published) = serde_json::from_slice::<Published>(message) else {
            self.stats.invalid.add(1);
            return;
        };
        let Ok(id) = ClientId::new(&published.id) else {
            self.stats.invalid.add(1);
            return;
        };
        let meta = (!published.meta.is_empty()).then(|| Arc::from(published.meta.as_str()));
        let change = match published.k.as_str() {
            "j" => Change::Joined(meta),
            "u" => Change::Updated(meta),
            "l" => Change::Left,
            _ => {
                self.stats.invalid.add(1);
                return;
            }
        };
        let event = Event {
            prev: published.rev.saturating_sub(1),
            rev: published.rev,
            id,
            change,
            count: published.count,
        };
        if let Some(at) = self.presence.watchers.record(&topic, event) {
            self.presence.timers.schedule(&self.me, at, topic);
        }
    }
}

fn parse_snapshot(reply: Value, full: bool, max_members: usize) -> Option<PresenceSnapshot> {
    let Value::Array(items) = reply else {
        return None;
    };
    let int = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    let rev = int(items.first()?)?;
    let count = usize::try_from(int(items.get(1)?)?).ok()?;
    let truncated = count > max_members;
    let mut members = Vec::new();
    if let (true, Some(m), Some(t)) = (full && !truncated, items.get(2), items.get(3)) {
        let conns: HashMap<String, u32> = pairs(t)
            .into_iter()
            .filter_map(|(id, n)| Some((id, n.parse().ok()?)))
            .collect();
        for (id, value) in pairs(m) {
            let Ok(client) = ClientId::new(&id) else {
                continue;
            };
            let (since, meta) = value.split_once(',').unwrap_or((value.as_str(), ""));
            members.push(PresenceMember {
                conns: conns.get(&id).copied().unwrap_or(0),
                id: client,
                since_ms: since.parse().unwrap_or(0),
                meta: (!meta.is_empty()).then(|| Arc::from(meta)),
            });
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
    }
    Some(PresenceSnapshot {
        rev,
        count,
        members,
        truncated,
    })
}

/// A flat `[field, value, …]` reply (or a RESP3 map) as string pairs.
fn pairs(value: &Value) -> Vec<(String, String)> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    };
    match value {
        Value::Array(items) => items
            .chunks_exact(2)
            .filter_map(|pair| Some((text(&pair[0])?, text(&pair[1])?)))
            .collect(),
        Value::Map(items) => items
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
            .collect(),
        _ => Vec::new(),
    }
}

/// Runs the queued operations in order, the sweeps of pending leaves and
/// the instance heartbeat, for as long as the backend lives.
pub(super) async fn run(weak: Weak<Shared>) {
    let Some(mut ops) = weak
        .upgrade()
        .and_then(|shared| shared.presence.ops_rx.lock().take())
    else {
        return;
    };
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_member: Option<Arc<str>> = None;
    // The local change number the last resync wrote up to.
    let mut resynced = 0u64;
    let mut last_beat: Option<tokio::time::Instant> = None;
    let mut subscribed: HashSet<Topic> = HashSet::new();
    loop {
        let op = tokio::select! {
            op = ops.recv() => match op {
                Some(op) => Some(op),
                None => return,
            },
            _ = sweep.tick() => None,
        };
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let Some(link) = shared.link() else {
            // No Redis: remember what to write again, answer the waiters.
            if let Some(op) = op {
                shared.presence_offline(op, &mut subscribed);
            }
            last_member = None;
            continue;
        };
        let mut conn = link.conn.clone();
        let timeout = shared.config.request_timeout * 2;
        if last_member.as_ref() != Some(&link.member) {
            subscribed.clear();
            let resync = shared.presence_resync(&mut conn, &mut subscribed);
            if let Ok(Ok(seq)) = tokio::time::timeout(timeout * 4, resync).await {
                last_member = Some(Arc::clone(&link.member));
                resynced = seq;
            }
        }
        let work = async {
            match op {
                Some(op) => {
                    shared
                        .presence_apply(&mut conn, op, &mut subscribed, resynced)
                        .await
                }
                None => {
                    let period = shared.config.presence_ttl / 3;
                    if last_beat.is_none_or(|at| at.elapsed() >= period) {
                        last_beat = Some(tokio::time::Instant::now());
                        shared.presence_beat(&mut conn).await?;
                    }
                    shared.presence_sweep(&mut conn).await
                }
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "presence: a redis command failed; rewriting this node's presence");
                last_member = None;
            }
            Err(_) => {
                tracing::warn!(
                    "presence: redis did not answer in time; rewriting this node's presence"
                );
                last_member = None;
            }
        }
    }
}

impl Shared {
    fn presence_offline(&self, op: Op, subscribed: &mut HashSet<Topic>) {
        match op {
            Op::Join {
                topic, id, done, ..
            } => {
                self.presence.dirty.lock().insert((topic, id));
                let _ = done.send(());
            }
            Op::Leave { topic, id, .. } => {
                self.presence.dirty.lock().insert((topic, id));
            }
            // Not answered: the watch fails (`presence_unavailable`).
            Op::Subscribe(..) => {}
            Op::Unsubscribe(topic) => {
                subscribed.remove(&topic);
            }
        }
    }

    /// Writes one local change; `resynced`: the change number the last
    /// resync wrote up to (changes at or below it are written already).
    async fn presence_apply(
        &self,
        conn: &mut RedisConn,
        op: Op,
        subscribed: &mut HashSet<Topic>,
        resynced: u64,
    ) -> Result<(), ::redis::RedisError> {
        match op {
            Op::Join { done, seq, .. } if seq <= resynced => {
                let _ = done.send(());
                Ok(())
            }
            Op::Leave {
                topic,
                id,
                departure,
                seq,
            } if seq <= resynced => {
                // The resync wrote the count; a leave meant to be at once
                // is finalised now (a no-op while connections remain).
                if departure == Departure::Now {
                    ::redis::cmd("EVAL")
                        .arg(FINALIZE)
                        .arg(5)
                        .arg(&self.keys.presence_topic(&topic))
                        .arg(id.as_str())
                        .exec_async(conn)
                        .await?;
                }
                Ok(())
            }
            Op::Join {
                topic,
                id,
                meta,
                done,
                ..
            } => {
                let since = self
                    .presence
                    .local
                    .lock()
                    .topics
                    .get(&topic)
                    .and_then(|m| m.get(&id))
                    .map_or(0, |m| m.since_ms);
                let keys = self.keys.presence_topic(&topic);
                let result = ::redis::pipe()
                    .cmd("EVAL")
                    .arg(JOIN)
                    .arg(5)
                    .arg(&keys)
                    .arg(id.as_str())
                    .arg(&self.presence.instance)
                    .arg(since)
                    .arg(meta.as_deref().unwrap_or(""))
                    .ignore()
                    .cmd("SADD")
                    .arg(self.keys.presence_instance_topics(&self.presence.instance))
                    .arg(topic.as_str())
                    .ignore()
                    .exec_async(conn)
                    .await;
                let _ = done.send(());
                if result.is_err() {
                    self.presence.dirty.lock().insert((topic, id));
                }
                result
            }
            Op::Leave {
                topic,
                id,
                departure,
                ..
            } => {
                let keys = self.keys.presence_topic(&topic);
                let now =
                    departure == Departure::Now || self.presence.settings.leave_delay.is_zero();
                let pending_since: i64 = ::redis::cmd("EVAL")
                    .arg(LEAVE)
                    .arg(5)
                    .arg(&keys)
                    .arg(id.as_str())
                    .arg(&self.presence.instance)
                    .arg(if now { "1" } else { "0" })
                    .query_async(conn)
                    .await
                    .inspect_err(|_| {
                        self.presence
                            .dirty
                            .lock()
                            .insert((topic.clone(), id.clone()));
                    })?;
                if pending_since > 0 {
                    self.presence_pending(conn, &topic, &id, pending_since)
                        .await?;
                }
                if !self.presence.local.lock().topics.contains_key(&topic) {
                    ::redis::cmd("SREM")
                        .arg(self.keys.presence_instance_topics(&self.presence.instance))
                        .arg(topic.as_str())
                        .exec_async(conn)
                        .await?;
                }
                Ok(())
            }
            Op::Subscribe(topic, done) => {
                if !subscribed.contains(&topic) {
                    let channel = self.keys.presence_topic(&topic)[4].clone();
                    ::redis::cmd("SSUBSCRIBE")
                        .arg(channel)
                        .exec_async(conn)
                        .await?;
                    subscribed.insert(topic);
                }
                let _ = done.send(());
                Ok(())
            }
            Op::Unsubscribe(topic) => {
                if subscribed.remove(&topic) && !self.presence.watchers.is_watched(&topic) {
                    let channel = self.keys.presence_topic(&topic)[4].clone();
                    ::redis::cmd("SUNSUBSCRIBE")
                        .arg(channel)
                        .exec_async(conn)
                        .await?;
                } else if self.presence.watchers.is_watched(&topic) {
                    subscribed.insert(topic);
                }
                Ok(())
            }
        }
    }

    /// Schedules `id`'s leave of `topic` at `since_ms` + the leave delay.
    async fn presence_pending(
        &self,
        conn: &mut RedisConn,
        topic: &Topic,
        id: &ClientId,
        since_ms: i64,
    ) -> Result<(), ::redis::RedisError> {
        let due = since_ms + self.presence.settings.leave_delay.as_millis() as i64;
        ::redis::cmd("ZADD")
            .arg(self.keys.presence_pending())
            .arg(due)
            .arg(format!("{topic} {id}"))
            .exec_async(conn)
            .await
    }

    /// Writes this node's whole presence again (a new Redis connection),
    /// and subscribes the watched topics' channels again; returns the
    /// number of the last local change written.
    async fn presence_resync(
        &self,
        conn: &mut RedisConn,
        subscribed: &mut HashSet<Topic>,
    ) -> Result<u64, ::redis::RedisError> {
        let ttl_ms = self.config.presence_ttl.as_millis() as u64;
        ::redis::cmd("EVAL")
            .arg(BEAT)
            .arg(1)
            .arg(self.keys.presence_instances())
            .arg(&self.presence.instance)
            .arg(ttl_ms)
            .exec_async(conn)
            .await?;
        let (local, seq) = {
            let state = self.presence.local.lock();
            (state.topics.clone(), state.seq)
        };
        let dirty: Vec<(Topic, ClientId)> = self.presence.dirty.lock().drain().collect();
        let mut all: Vec<(Topic, ClientId, LocalMember)> = Vec::new();
        for (topic, members) in &local {
            for (id, member) in members {
                all.push((topic.clone(), id.clone(), member.clone()));
            }
        }
        for (topic, id) in dirty {
            if !local.get(&topic).is_some_and(|m| m.contains_key(&id)) {
                all.push((
                    topic,
                    id,
                    LocalMember {
                        conns: 0,
                        since_ms: 0,
                        meta: None,
                    },
                ));
            }
        }
        for (topic, id, member) in all {
            let keys = self.keys.presence_topic(&topic);
            let pending_since: i64 = ::redis::cmd("EVAL")
                .arg(SETCOUNT)
                .arg(5)
                .arg(&keys)
                .arg(id.as_str())
                .arg(&self.presence.instance)
                .arg(member.since_ms)
                .arg(member.meta.as_deref().unwrap_or(""))
                .arg(member.conns)
                .query_async(conn)
                .await?;
            if pending_since > 0 {
                self.presence_pending(conn, &topic, &id, pending_since)
                    .await?;
            }
            if member.conns > 0 {
                ::redis::cmd("SADD")
                    .arg(self.keys.presence_instance_topics(&self.presence.instance))
                    .arg(topic.as_str())
                    .exec_async(conn)
                    .await?;
            }
        }
        for topic in self.presence.watchers.watched_topics() {
            let channel = self.keys.presence_topic(&topic)[4].clone();
            ::redis::cmd("SSUBSCRIBE")
                .arg(channel)
                .exec_async(conn)
                .await?;
            subscribed.insert(topic);
        }
        Ok(seq)
    }

    /// Refreshes this instance's deadline and removes the presence of
    /// instances whose deadline has passed.
    async fn presence_beat(&self, conn: &mut RedisConn) -> Result<(), ::redis::RedisError> {
        let ttl_ms = self.config.presence_ttl.as_millis() as u64;
        let instances = self.keys.presence_instances();
        let removed: i64 = ::redis::cmd("EVAL")
            .arg(BEAT)
            .arg(1)
            .arg(&instances)
            .arg(&self.presence.instance)
            .arg(ttl_ms)
            .query_async(conn)
            .await?;
        if removed == 1 {
            return Err(super::err(
                "this node's topic presence was removed by a cleanup (it was frozen past presence_ttl)",
            ));
        }
        let dead: Value = ::redis::cmd("EVAL")
            .arg(DUE)
            .arg(1)
            .arg(&instances)
            .arg(SWEEP_BATCH)
            .query_async(conn)
            .await?;
        for (instance, score) in pairs(&dead) {
            if instance == self.presence.instance {
                continue;
            }
            let lock = self.keys.presence_cleanup_lock(&instance);
            let locked: Option<String> = ::redis::cmd("SET")
                .arg(&lock)
                .arg(&self.presence.instance)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms.saturating_mul(3))
                .query_async(conn)
                .await?;
            if locked.is_none() {
                continue;
            }
            let mark: i64 = ::redis::cmd("EVAL")
                .arg(MARK)
                .arg(1)
                .arg(&instances)
                .arg(&instance)
                .arg(&score)
                .query_async(conn)
                .await?;
            if mark >= 0 {
                // It beat meanwhile: alive.
                ::redis::cmd("DEL").arg(&lock).exec_async(conn).await?;
                continue;
            }
            let deadline = -mark;
            tracing::info!(node = %self.config.node_id, dead = %instance, "removing the topic presence of a dead node");
            let topics_key = self.keys.presence_instance_topics(&instance);
            let topics: Vec<String> = ::redis::cmd("SMEMBERS")
                .arg(&topics_key)
                .query_async(conn)
                .await?;
            for topic in topics {
                let Ok(topic) = Topic::new(&topic) else {
                    continue;
                };
                let keys = self.keys.presence_topic(&topic);
                let gone: Vec<String> = ::redis::cmd("EVAL")
                    .arg(DROP_INSTANCE)
                    .arg(5)
                    .arg(&keys)
                    .arg(&instance)
                    .query_async(conn)
                    .await?;
                for id in gone {
                    if let Ok(id) = ClientId::new(&id) {
                        self.presence_pending(conn, &topic, &id, deadline).await?;
                    }
                }
            }
            ::redis::pipe()
                .cmd("DEL")
                .arg(&topics_key)
                .ignore()
                .cmd("EVAL")
                .arg(CLAIM)
                .arg(1)
                .arg(&instances)
                .arg(&instance)
                .arg(mark)
                .ignore()
                .cmd("DEL")
                .arg(&lock)
                .ignore()
                .exec_async(conn)
                .await?;
        }
        Ok(())
    }

    /// Finalises the pending leaves that are due and that this node claims.
    async fn presence_sweep(&self, conn: &mut RedisConn) -> Result<(), ::redis::RedisError> {
        let pending = self.keys.presence_pending();
        let due: Value = ::redis::cmd("EVAL")
            .arg(DUE)
            .arg(1)
            .arg(&pending)
            .arg(SWEEP_BATCH)
            .query_async(conn)
            .await?;
        for (entry, score) in pairs(&due) {
            let claimed: i64 = ::redis::cmd("EVAL")
                .arg(CLAIM)
                .arg(1)
                .arg(&pending)
                .arg(&entry)
                .arg(&score)
                .query_async(conn)
                .await?;
            if claimed != 1 {
                continue;
            }
            let Some((topic, id)) = entry.split_once(' ') else {
                continue;
            };
            let Ok(topic) = Topic::new(topic) else {
                continue;
            };
            let keys = self.keys.presence_topic(&topic);
            ::redis::cmd("EVAL")
                .arg(FINALIZE)
                .arg(5)
                .arg(&keys)
                .arg(id)
                .exec_async(conn)
                .await?;
        }
        Ok(())
    }
}
