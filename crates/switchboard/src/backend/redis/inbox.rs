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

use std::sync::Arc;
use std::time::Duration;

use ::redis::Value;
use bytes::Bytes;

use super::replies::{number, string};
use super::scripts::with_scripts;
use super::{Link, Shared};
use crate::backend::inbox::{InboxLimits, Retained, new_epoch};
use crate::backend::{Attached, Replay, ResumePoint, ResumeStatus};
use crate::id::ClientId;
use crate::protocol::frame::WireFrame;
use crate::runtime::delivery::Envelope;

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
        if self.loc_cache.v1_absent() {
            // Read absent on this connection and not written since.
            return Ok(false);
        }
        let mut conn = link.conn.clone();
        let fill = self.loc_cache.begin_flag(link.tracking);
        let mut pipe = ::redis::pipe();
        if fill.is_some() {
            pipe.cmd("CLIENT").arg("CACHING").arg("YES").ignore();
        }
        pipe.cmd("GET").arg(self.keys.v1_flag());
        let (found,): (Option<String>,) = pipe.query_async(&mut conn).await?;
        match (&found, fill) {
            (Some(_), _) => self.v1_seen(),
            (None, Some(fill)) => self.loc_cache.finish_flag_absent(&fill),
            (None, None) => {}
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
        let (previous, reply): (Option<String>, Value) = with_scripts(self, &mut conn, |shas| {
            let mut pipe = ::redis::pipe();
            // The flag before the retention it covers (`GET`: was it
            // there?).
            pipe.cmd("SET")
                .arg(self.keys.v1_flag())
                .arg(1)
                .arg("PX")
                .arg(ms(hold(&self.inbox_limits) + FLAG_MARGIN))
                .arg("GET");
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
        if previous.is_none() && !self.client.is_cluster() {
            // The first v1 ID of the cluster (or the first since the flag
            // expired): other nodes may hold the flag as absent in their
            // location cache, its invalidation on its way. Wait until they
            // have handled it, so that a message sent after this hello's
            // welcome is numbered (docs/scaling.md, "The location cache").
            self.sync_nodes(link).await;
        }
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
