//! `switchboard.v1` inboxes in Redis: one stream and one meta hash per
//! client ID, hash-tagged by the ID (`P:{id:<id>}:inbox`,
//! `P:{id:<id>}:meta`) so that both live in one slot of a Redis Cluster
//! and one Lua script can number, store and trim atomically. The sequence
//! number of an ID is therefore the same on every node.
//!
//! | meta field | what |
//! |---|---|
//! | `e` | the epoch: 16 random hex digits drawn when the meta is created; a resume from another epoch is `reset` |
//! | `s` | the newest sequence number given out |
//! | `b` | payload bytes retained in the stream |
//! | `u` | Redis time (ms) until which messages to the ID are retained: an ID retains while a node has a v1 connection of it (each node refreshes this every `inbox_ttl / 4`) and for `inbox_ttl` after its last one |
//!
//! A stream entry's ID is `<seq>-0`; its fields are `p` (payload), `t`
//! (Redis time, ms), and `f` (sender), `m` (mid), `b` (binary) when set.
//!
//! `P:v1` exists while any ID may retain (every attach and refresh sets it
//! for longer than the retention it grants): a node that finds it missing
//! numbers nothing, so a cluster without v1 clients sends no payload to
//! Redis for inboxes. Its absence proves no ID retains, so skipping the
//! scripts then changes nothing.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use ::redis::Value;
use ::redis::aio::MultiplexedConnection;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::replies::{number, string};
use super::{Link, Shared};
use crate::backend::inbox::{InboxLimits, Retained, new_epoch};
use crate::backend::{Attached, Backend as _, RegisterError, Replay, ResumePoint, ResumeStatus};
use crate::id::ClientId;
use crate::protocol::frame::WireFrame;
use crate::runtime::delivery::Envelope;
use crate::runtime::mailbox::{ConnId, ConnRef};

/// What numbering a message for one target gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Numbering {
    /// Numbered `seq` in the inbox of epoch `epoch`; `kept` when the
    /// stream kept it (not when it is larger than `inbox_max_bytes`).
    Seq {
        epoch: Arc<str>,
        seq: u64,
        kept: bool,
    },
    /// The ID retains nothing (not attached within `inbox_ttl`, or its
    /// inbox is gone).
    NoInbox,
    /// This node is not connected to Redis: the message surely has no
    /// number.
    Unavailable,
    /// Numbering failed half-way (the connection was lost, Redis did not
    /// answer in time): the message may be numbered and stored, or not.
    Unknown,
}

/// Numbers, stores and trims one message of one ID. Returns
/// `{epoch, seq, kept}`, or nil when the ID retains nothing.
const APPEND: &str = r"
local m = redis.call('HMGET', KEYS[1], 'e', 's', 'b', 'u')
if not m[1] then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(m[4] or 0) <= now then return false end
local seq = tonumber(m[2] or 0) + 1
local bytes = tonumber(m[3] or 0)
if redis.call('EXISTS', KEYS[2]) == 0 then bytes = 0 end
local size, maxb, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local len = string.len(ARGV[1])
local kept = 0
if len <= maxb then
  local f = {'p', ARGV[1], 't', now}
  if ARGV[6] ~= '' then f[#f + 1] = 'f'; f[#f + 1] = ARGV[6] end
  if ARGV[7] ~= '' then f[#f + 1] = 'm'; f[#f + 1] = ARGV[7] end
  if ARGV[8] == '1' then f[#f + 1] = 'b'; f[#f + 1] = '1' end
  redis.call('XADD', KEYS[2], string.format('%d-0', seq), unpack(f))
  bytes = bytes + len
  kept = 1
end
local n = redis.call('XLEN', KEYS[2])
while n > 0 do
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  local fields, flen, ft = first[2], 0, 0
  for i = 1, #fields, 2 do
    if fields[i] == 'p' then flen = string.len(fields[i + 1])
    elseif fields[i] == 't' then ft = tonumber(fields[i + 1]) end
  end
  if n > size or bytes > maxb or ft + ttl <= now then
    redis.call('XDEL', KEYS[2], first[1])
    bytes = bytes - flen
    n = n - 1
  else
    break
  end
end
redis.call('HSET', KEYS[1], 's', seq, 'b', bytes)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if n > 0 then redis.call('PEXPIRE', KEYS[2], ttl) else redis.call('DEL', KEYS[2]) end
return {m[1], seq, kept}
";

/// A v1 connection attaches: creates the meta (new epoch, empty stream)
/// if there is none, retains until now + ARGV[2], and reads what a client
/// at (ARGV[4], ARGV[5]) missed. Returns `{epoch, top, now, entries}`.
const ATTACH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 's', 0, 'b', 0)
end
local until_ms = now + tonumber(ARGV[2])
if until_ms > tonumber(redis.call('HGET', KEYS[1], 'u') or 0) then
  redis.call('HSET', KEYS[1], 'u', until_ms)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local top = tonumber(redis.call('HGET', KEYS[1], 's') or 0)
local entries = {}
if ARGV[4] == e then
  local from = tonumber(ARGV[5])
  if from < top then
    entries = redis.call('XRANGE', KEYS[2], string.format('%d-0', from + 1), string.format('%d-0', top))
  end
end
return {e, top, now, entries}
";

/// Reads the entries ARGV[1]..=ARGV[2]. Returns `{epoch, top, now,
/// entries}`, or nil when the ID has no inbox.
const READ: &str = r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local top = tonumber(redis.call('HGET', KEYS[1], 's') or 0)
return {e, top, now, redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', ARGV[2] .. '-0')}
";

/// A node still has v1 connections of the ID: retain until now + ARGV[1]
/// (never shortened). Returns `{epoch, top}`, or nil when the meta is
/// gone.
const TOUCH: &str = r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
if until_ms > tonumber(redis.call('HGET', KEYS[1], 'u') or 0) then
  redis.call('HSET', KEYS[1], 'u', until_ms)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {e, tonumber(redis.call('HGET', KEYS[1], 's') or 0)}
";

/// A node's last v1 connection of the ID ended: retain for ARGV[1] more
/// (a node that still has one refreshes it within a quarter of that).
const DETACH: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'u', now + tonumber(ARGV[1]))
return 1
";

/// The scripts, by their SHA1 once loaded (`SCRIPT LOAD` on first use and
/// again after `NOSCRIPT`: a restarted Redis has forgotten them). Called
/// with `EVALSHA`, so a message carries 40 bytes of script name, not the
/// script.
#[derive(Default)]
pub(super) struct Scripts {
    shas: Mutex<Option<Arc<Shas>>>,
}

pub(super) struct Shas {
    append: String,
    attach: String,
    read: String,
    touch: String,
    detach: String,
}

impl Scripts {
    /// The loaded scripts, loading them if needed (or if `reload`).
    pub(super) async fn get(
        &self,
        conn: &mut MultiplexedConnection,
        reload: bool,
    ) -> Result<Arc<Shas>, ::redis::RedisError> {
        if !reload && let Some(shas) = self.shas.lock().clone() {
            return Ok(shas);
        }
        let (append, attach, read, touch, detach): (String, String, String, String, String) =
            ::redis::pipe()
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(APPEND)
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(ATTACH)
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(READ)
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(TOUCH)
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(DETACH)
                .query_async(conn)
                .await?;
        let shas = Arc::new(Shas {
            append,
            attach,
            read,
            touch,
            detach,
        });
        *self.shas.lock() = Some(Arc::clone(&shas));
        Ok(shas)
    }
}

/// Runs `build`'s pipeline of `EVALSHA`s, loading the scripts first if
/// needed and once more if Redis answers `NOSCRIPT`.
pub(super) async fn with_scripts<T: ::redis::FromRedisValue>(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    build: impl Fn(&Shas) -> ::redis::Pipeline,
) -> Result<T, ::redis::RedisError> {
    let shas = shared.scripts.get(conn, false).await?;
    match build(&shas).query_async(conn).await {
        Err(error) if error.kind() == ::redis::ErrorKind::NoScriptError => {
            let shas = shared.scripts.get(conn, true).await?;
            build(&shas).query_async(conn).await
        }
        other => other,
    }
}

/// What the attach and read scripts return.
struct Read {
    epoch: String,
    top: u64,
    now_ms: u64,
    entries: Vec<(u64, u64, Arc<Envelope>)>,
}

impl Read {
    fn parse(value: Value) -> Option<Self> {
        let Value::Array(parts) = value else {
            return None;
        };
        let mut parts = parts.into_iter();
        let epoch = string(parts.next()?)?;
        let top = number(&parts.next()?)? as u64;
        let now_ms = number(&parts.next()?)? as u64;
        let entries = match parts.next()? {
            Value::Array(items) => items.into_iter().filter_map(entry).collect(),
            _ => Vec::new(),
        };
        Some(Self {
            epoch,
            top,
            now_ms,
            entries,
        })
    }

    /// The entries still within `ttl`, numbered `from..=to` (clamped to
    /// what was given out), and the parts of the range not retained.
    fn range(&self, from: u64, to: u64, ttl: Duration) -> Replay {
        let from = from.max(1);
        let to = to.min(self.top);
        let mut replay = Replay::default();
        if from > to {
            return replay;
        }
        let ttl_ms = ttl.as_millis() as u64;
        let mut next = from;
        for (seq, at, envelope) in &self.entries {
            if !(from..=to).contains(seq) || at + ttl_ms <= self.now_ms {
                continue;
            }
            if *seq > next {
                replay.lost.push((next, seq - 1));
            }
            replay
                .messages
                .push(Retained::read(*seq, Arc::clone(envelope)));
            next = seq + 1;
        }
        if next <= to {
            replay.lost.push((next, to));
        }
        replay
    }
}

/// One stream entry `[<seq>-0, [field, value, …]]` → (seq, time, message).
fn entry(value: Value) -> Option<(u64, u64, Arc<Envelope>)> {
    let Value::Array(pair) = value else {
        return None;
    };
    let mut pair = pair.into_iter();
    let id = string(pair.next()?)?;
    let seq: u64 = id.split_once('-')?.0.parse().ok()?;
    let Value::Array(fields) = pair.next()? else {
        return None;
    };
    let (mut payload, mut at, mut from, mut mid, mut binary) = (None, 0, None, None, false);
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        match (string(name).as_deref(), value) {
            (Some("p"), Value::BulkString(bytes)) => payload = Some(Bytes::from(bytes)),
            (Some("t"), value) => at = number(&value).unwrap_or(0.0) as u64,
            (Some("f"), value) => from = string(value).and_then(|s| ClientId::new(&s).ok()),
            (Some("m"), value) => mid = string(value),
            (Some("b"), _) => binary = true,
            _ => {}
        }
    }
    let payload = payload?;
    let frame = if binary {
        WireFrame::from_binary(payload)
    } else {
        WireFrame::text(payload)
    };
    let envelope = Envelope::of_frame(frame).from(from).mid(mid.as_deref());
    Some((seq, at, Arc::new(envelope)))
}

/// How long after a touch an attached ID surely still retains: the TTL
/// plus the refresh period, so a refresh that comes a little late never
/// lets retention lapse under a live connection.
pub(super) fn hold(limits: &InboxLimits) -> Duration {
    limits.ttl + refresh_period(limits)
}

/// How often a node refreshes the retention of the IDs it has v1
/// connections of: a quarter of the TTL (30 s by default), at least
/// 100 ms.
pub(super) fn refresh_period(limits: &InboxLimits) -> Duration {
    (limits.ttl / 4).max(Duration::from_millis(100))
}

/// How long `P:v1` outlives the retention its setter granted.
const FLAG_MARGIN: Duration = Duration::from_secs(5);

fn ms(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

impl Shared {
    /// Whether this node has recently seen `P:v1` (so it numbers without
    /// asking first).
    pub(super) fn v1_known(&self) -> bool {
        self.v1_seen_until
            .lock()
            .is_some_and(|until| until > std::time::Instant::now())
    }

    fn v1_seen(&self) {
        // Seen: number directly for a while (a wrong "yes" costs one
        // script that answers "no inbox"; a "no" is always checked).
        *self.v1_seen_until.lock() = Some(std::time::Instant::now() + FLAG_SEEN_FOR);
    }

    /// `SET P:v1` for longer than the retention granted next to it.
    fn flag_pipe(&self, pipe: &mut ::redis::Pipeline) {
        pipe.cmd("SET")
            .arg(self.keys.v1_flag())
            .arg(1)
            .arg("PX")
            .arg(ms(hold(&self.inbox_limits) + FLAG_MARGIN))
            .ignore();
    }

    /// Numbers `message` in each target's inbox (atomically per target:
    /// one `EVALSHA` each, pipelined). `None` from `probe` when `P:v1` was
    /// found missing: nothing to number.
    pub(super) async fn number(
        &self,
        link: &Link,
        targets: &[ClientId],
        message: &Envelope,
    ) -> Result<Vec<Numbering>, ::redis::RedisError> {
        let mut conn = link.conn.clone();
        let limits = &self.inbox_limits;
        let (size, max_bytes) = (limits.size.to_string(), limits.max_bytes.to_string());
        let (ttl, meta_ttl) = (ms(limits.ttl).to_string(), ms(limits.meta_ttl).to_string());
        let from = message.sender().map_or("", ClientId::as_str);
        let mid = message.message_id().unwrap_or("");
        let binary = if message.is_binary() { "1" } else { "0" };
        let payload: &[u8] = message.payload();
        let replies: Vec<Value> = with_scripts(self, &mut conn, |shas| {
            let mut pipe = ::redis::pipe();
            for id in targets {
                pipe.cmd("EVALSHA")
                    .arg(&shas.append)
                    .arg(2)
                    .arg(self.keys.inbox_meta(id.as_str()))
                    .arg(self.keys.inbox_stream(id.as_str()))
                    .arg(payload)
                    .arg(&size)
                    .arg(&max_bytes)
                    .arg(&ttl)
                    .arg(&meta_ttl)
                    .arg(from)
                    .arg(mid)
                    .arg(binary);
            }
            pipe
        })
        .await?;
        let numbered = replies
            .into_iter()
            .map(|reply| {
                let Value::Array(parts) = reply else {
                    return Numbering::NoInbox;
                };
                let mut parts = parts.into_iter();
                let epoch = parts.next().and_then(string);
                let seq = parts.next().as_ref().and_then(number);
                let kept = parts.next().as_ref().and_then(number);
                match (epoch, seq, kept) {
                    (Some(epoch), Some(seq), Some(kept)) => Numbering::Seq {
                        epoch: Arc::from(epoch),
                        seq: seq as u64,
                        kept: kept > 0.0,
                    },
                    _ => Numbering::NoInbox,
                }
            })
            .collect::<Vec<_>>();
        if numbered.iter().any(|n| matches!(n, Numbering::Seq { .. })) {
            self.v1_seen();
        }
        Ok(numbered)
    }

    /// Whether messages must be numbered: `true` when this node knows
    /// `P:v1` exists; otherwise asks (`GET`, no payload) — `false` means no
    /// ID of the cluster retains, so numbering would give `NoInbox` for
    /// every target.
    pub(super) async fn must_number(&self, link: &Link) -> Result<bool, ::redis::RedisError> {
        if self.v1_known() {
            return Ok(true);
        }
        let mut conn = link.conn.clone();
        let found: Option<String> = ::redis::cmd("GET")
            .arg(self.keys.v1_flag())
            .query_async(&mut conn)
            .await?;
        if found.is_some() {
            self.v1_seen();
        }
        Ok(found.is_some())
    }

    /// Attaches a v1 connection of `id` to its inbox (creating it), and
    /// reads what a client at `resume` missed.
    pub(super) async fn attach_inbox(
        &self,
        link: &Link,
        id: &ClientId,
        resume: Option<&ResumePoint>,
    ) -> Result<Attached, ::redis::RedisError> {
        let mut conn = link.conn.clone();
        let limits = &self.inbox_limits;
        let fresh = new_epoch();
        let hold_ms = ms(hold(limits)).to_string();
        let meta_ttl = ms(limits.meta_ttl).to_string();
        let (resume_epoch, resume_seq) =
            resume.map_or(("", 0), |point| (point.epoch.as_str(), point.seq));
        let (reply,): (Value,) = with_scripts(self, &mut conn, |shas| {
            let mut pipe = ::redis::pipe();
            // The flag before the retention it covers.
            self.flag_pipe(&mut pipe);
            pipe.cmd("EVALSHA")
                .arg(&shas.attach)
                .arg(2)
                .arg(self.keys.inbox_meta(id.as_str()))
                .arg(self.keys.inbox_stream(id.as_str()))
                .arg(&fresh)
                .arg(&hold_ms)
                .arg(&meta_ttl)
                .arg(resume_epoch)
                .arg(resume_seq);
            pipe
        })
        .await?;
        self.v1_seen();
        let read = Read::parse(reply).ok_or_else(|| super::err("unexpected attach reply"))?;
        let (status, lost, replay) = match resume {
            None => (ResumeStatus::New, Vec::new(), Vec::new()),
            Some(point) if point.epoch != read.epoch || point.seq > read.top => {
                (ResumeStatus::Reset, Vec::new(), Vec::new())
            }
            Some(point) => {
                let found = read.range(point.seq + 1, read.top, limits.ttl);
                let status = if found.lost.is_empty() {
                    ResumeStatus::Recovered
                } else {
                    ResumeStatus::Partial
                };
                (status, found.lost, found.messages)
            }
        };
        Ok(Attached {
            epoch: read.epoch,
            top: read.top,
            status,
            lost,
            replay,
        })
    }

    /// The retained messages of `id` numbered `from..=to`, with the epoch
    /// they belong to; `None` for the epoch when the ID has no inbox.
    pub(super) async fn read_range(
        &self,
        link: &Link,
        id: &ClientId,
        from: u64,
        to: u64,
    ) -> Result<(Option<String>, Replay), ::redis::RedisError> {
        let mut conn = link.conn.clone();
        let (reply,): (Value,) = with_scripts(self, &mut conn, |shas| {
            let mut pipe = ::redis::pipe();
            pipe.cmd("EVALSHA")
                .arg(&shas.read)
                .arg(2)
                .arg(self.keys.inbox_meta(id.as_str()))
                .arg(self.keys.inbox_stream(id.as_str()))
                .arg(from.max(1))
                .arg(to.max(1));
            pipe
        })
        .await?;
        Ok(match Read::parse(reply) {
            Some(read) => {
                let replay = read.range(from, to, self.inbox_limits.ttl);
                (Some(read.epoch), replay)
            }
            None => (None, Replay::nothing_retained(from, to)),
        })
    }

    /// Refreshes the retention of `ids` (this node has v1 connections of
    /// them); returns each one's epoch and newest seq (`None`: its inbox
    /// is gone).
    pub(super) async fn touch_inboxes(
        &self,
        link: &Link,
        ids: &[ClientId],
    ) -> Result<Vec<Option<(String, u64)>>, ::redis::RedisError> {
        let mut conn = link.conn.clone();
        let hold_ms = ms(hold(&self.inbox_limits)).to_string();
        let meta_ttl = ms(self.inbox_limits.meta_ttl).to_string();
        let replies: Vec<Value> = with_scripts(self, &mut conn, |shas| {
            let mut pipe = ::redis::pipe();
            self.flag_pipe(&mut pipe);
            for id in ids {
                pipe.cmd("EVALSHA")
                    .arg(&shas.touch)
                    .arg(1)
                    .arg(self.keys.inbox_meta(id.as_str()))
                    .arg(&hold_ms)
                    .arg(&meta_ttl);
            }
            pipe
        })
        .await?;
        Ok(replies
            .into_iter()
            .map(|reply| {
                let Value::Array(parts) = reply else {
                    return None;
                };
                let mut parts = parts.into_iter();
                let epoch = string(parts.next()?)?;
                let top = number(&parts.next()?)? as u64;
                Some((epoch, top))
            })
            .collect())
    }

    /// This node's last v1 connection of `id` ended: the ID retains for
    /// `inbox_ttl` from now (unless another node refreshes it).
    pub(super) async fn detach_inbox(
        &self,
        link: &Link,
        id: &ClientId,
    ) -> Result<(), ::redis::RedisError> {
        let mut conn = link.conn.clone();
        let ttl = ms(self.inbox_limits.ttl).to_string();
        let _: (Value,) = with_scripts(self, &mut conn, |shas| {
            let mut pipe = ::redis::pipe();
            self.flag_pipe(&mut pipe);
            pipe.cmd("EVALSHA")
                .arg(&shas.detach)
                .arg(1)
                .arg(self.keys.inbox_meta(id.as_str()))
                .arg(&ttl);
            pipe
        })
        .await?;
        Ok(())
    }
}

impl Shared {
    /// [`Backend::attach`](crate::Backend::attach): registers the v1
    /// connection (with its gate, holding what arrives), writes its
    /// presence, then reads the inbox: every message numbered after the
    /// read is published to this node (its senders locate the ID after
    /// numbering), and everything up to it is in the replay.
    pub(super) async fn attach(
        &self,
        id: &ClientId,
        conn: &ConnRef,
        resume: Option<&ResumePoint>,
    ) -> Result<Attached, RegisterError> {
        let Some(link) = self.link() else {
            return Err(RegisterError::Unavailable(
                "this node is not connected to redis".to_owned(),
            ));
        };
        let gate = self.add_gate(id, conn);
        if let Err(err) = self.local.register(id, conn) {
            self.remove_gate(conn.id());
            return Err(err);
        }
        // Undone if the hello fails or its task is dropped half-way.
        let mut undo = UndoAttach {
            shared: self,
            id,
            conn: conn.id(),
            armed: true,
        };
        let generation = self.mark_id(id);
        self.wait_flushed(generation).await;
        let read = self.attach_inbox(&link, id, resume);
        let attached = match tokio::time::timeout(self.config.request_timeout, read).await {
            Ok(Ok(attached)) => attached,
            Ok(Err(error)) => return Err(RegisterError::Unavailable(error.to_string())),
            Err(_) => {
                return Err(RegisterError::Unavailable(
                    "redis did not answer in time".to_owned(),
                ));
            }
        };
        undo.armed = false;
        if gate.start(&attached.epoch, attached.top) {
            self.spawn_fill(gate);
        }
        Ok(attached)
    }

    /// This node's last v1 connection of `id` ended: start its TTL.
    pub(super) fn spawn_detach(&self, id: ClientId) {
        let (Some(shared), Some(link)) = (self.me.upgrade(), self.link()) else {
            return;
        };
        tokio::spawn(async move {
            let detach = shared.detach_inbox(&link, &id);
            let _ = tokio::time::timeout(shared.config.request_timeout, detach).await;
        });
    }
}

/// Unregisters a v1 connection whose hello did not finish.
struct UndoAttach<'a> {
    shared: &'a Shared,
    id: &'a ClientId,
    conn: ConnId,
    armed: bool,
}

impl Drop for UndoAttach<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.local.unregister(self.id, self.conn);
            self.shared.mark_id(self.id);
            self.shared.remove_gate(self.conn);
        }
    }
}

/// Keeps the inboxes of the IDs this node has v1 connections of: every
/// [`refresh_period`], refreshes their retention (and `P:v1`), and closes
/// (4101) the connections whose inbox was lost meanwhile. Ends with the
/// backend.
pub(super) async fn keep_inboxes(shared: Weak<Shared>, mut stop: watch::Receiver<bool>) {
    let period = match shared.upgrade() {
        Some(shared) => refresh_period(&shared.inbox_limits),
        None => return,
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let ids = shared.v1_ids();
        let Some(link) = shared.link() else {
            continue;
        };
        let mut epochs = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(super::BATCH) {
            let touch = shared.touch_inboxes(&link, chunk);
            match tokio::time::timeout(shared.config.request_timeout, touch).await {
                Ok(Ok(found)) => epochs.extend(chunk.iter().cloned().zip(found)),
                // The next round retries; the retention granted outlasts
                // a missed refresh.
                _ => break,
            }
        }
        shared.check_inboxes(&epochs);
    }
}

/// How long a node numbers without asking after it last saw `P:v1`.
const FLAG_SEEN_FOR: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn read(entries: &[(u64, u64)], top: u64, now_ms: u64) -> Read {
        Read {
            epoch: "e".to_owned(),
            top,
            now_ms,
            entries: entries
                .iter()
                .map(|&(seq, at)| {
                    (
                        seq,
                        at,
                        Arc::new(Envelope::json(Bytes::from(seq.to_string()))),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_range_lists_what_is_retained_and_exactly_what_is_lost() {
        let ttl = Duration::from_secs(120);
        // Seqs 1..=10 given out; 3..=5 and 8 trimmed; 9 too old.
        let r = read(
            &[
                (1, 1000),
                (2, 1000),
                (6, 1000),
                (7, 1000),
                (9, 0),
                (10, 1000),
            ],
            10,
            120_500,
        );
        let replay = r.range(1, 10, ttl);
        let seqs: Vec<u64> = replay.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![1, 2, 6, 7, 10]);
        assert_eq!(replay.lost, vec![(3, 5), (8, 9)]);
        // Clamped to the top; nothing after it is "lost".
        assert_eq!(r.range(10, 50, ttl).lost, Vec::<(u64, u64)>::new());
        assert!(r.range(11, 50, ttl).messages.is_empty());
    }

    #[test]
    fn stream_entries_parse_back_into_messages() {
        let value = Value::Array(vec![
            Value::BulkString(b"42-0".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"p".to_vec()),
                Value::BulkString(b"{\"a\":1}".to_vec()),
                Value::BulkString(b"t".to_vec()),
                Value::BulkString(b"1700".to_vec()),
                Value::BulkString(b"f".to_vec()),
                Value::BulkString(b"alice".to_vec()),
                Value::BulkString(b"m".to_vec()),
                Value::BulkString(b"m-1".to_vec()),
            ]),
        ]);
        let (seq, at, envelope) = entry(value).expect("an entry");
        assert_eq!((seq, at), (42, 1700));
        assert_eq!(&envelope.payload()[..], b"{\"a\":1}");
        assert_eq!(envelope.sender().map(ClientId::as_str), Some("alice"));
        assert_eq!(envelope.message_id(), Some("m-1"));
    }
}
