//! Delivery across nodes: sends and closes addressed to IDs (published on
//! the channels of the nodes that have them, each answered with an ack),
//! and what this node does with such messages from other nodes.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::conn::RedisConn;
use ::redis::{PushInfo, PushKind, Value};
use bytes::Bytes;
use tokio::sync::mpsc;

use super::inbox::Numbering;
use super::replies::{number, strings, time_ms};
use super::stats::kind_index;
use super::wire::{Header, Kind, Reply, envelope_of};
use super::{Epoch, Link, Shared, err};
use crate::backend::SendReport;
use crate::id::ClientId;
use crate::protocol::close::{CloseCode, CloseFrame};
use crate::runtime::delivery::Envelope;

/// Which member nodes have which targets: (member, target indexes).
type Located = Vec<(String, Vec<usize>)>;

impl Shared {
    /// Called by the Redis connection's reader for every push, in order.
    pub(super) fn on_push(&self, epoch: &Arc<Epoch>, info: PushInfo) {
        match info.kind {
            PushKind::Disconnection => {
                let generation = epoch.tracking.load(Ordering::Acquire);
                if generation != 0 {
                    self.loc_cache.deactivate(generation);
                }
                epoch.lost.notify_one();
            }
            PushKind::Invalidate => {
                self.loc_cache.invalidate(
                    &info.data,
                    |key| self.keys.loc_id_of(key),
                    |key| self.keys.is_v1_flag(key),
                );
            }
            PushKind::SUnsubscribe => self.on_shard_unsubscribed(epoch, info.data),
            PushKind::SMessage => {
                let mut data = info.data.into_iter();
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(message))) =
                    (data.next(), data.next())
                else {
                    self.stats.invalid.add(1);
                    return;
                };
                if let Some(topic) = self.keys.presence_topic_of(&channel) {
                    if !epoch.ended.load(Ordering::Acquire) {
                        self.on_presence_event(topic, &message);
                    }
                    return;
                }
                // One message, or several in a batch (`batch.rs`).
                match super::batch::split(Bytes::from(message)) {
                    Some(messages) => {
                        for message in messages {
                            self.on_message(epoch, &channel, message);
                        }
                    }
                    None => self.stats.invalid.add(1),
                }
            }
            _ => {}
        }
    }

    pub(super) fn on_message(&self, epoch: &Epoch, channel: &[u8], message: Bytes) {
        let Some(newline) = message.iter().position(|&b| b == b'\n') else {
            self.stats.invalid.add(1);
            return;
        };
        let Ok(header) = serde_json::from_slice::<Header<'_>>(&message[..newline]) else {
            self.stats.invalid.add(1);
            return;
        };
        self.stats.received[kind_index(header.k)].add(1);
        let body = message.slice(newline + 1..);
        if header.k == Kind::Ack {
            self.route_reply(
                header.r,
                Reply {
                    from: header.f.into_owned(),
                    delivered: header.d,
                    dropped: header.x,
                    retained: header.n,
                    count: header.c,
                    newest: header.o,
                },
            );
            return;
        }
        if self.is_own(&header.f) {
            // Our own topic publish, seen by our subscription: the local
            // subscribers already have it. Count this answer as zero.
            self.route_reply(
                header.r,
                Reply {
                    from: header.f.into_owned(),
                    delivered: Vec::new(),
                    dropped: Vec::new(),
                    retained: Vec::new(),
                    count: 0,
                    newest: 0,
                },
            );
            return;
        }
        if epoch.ended.load(Ordering::Acquire) {
            // A connection we have given up on (Redis may not have noticed
            // yet). Topic messages reach our new connection too, and a
            // sender that gets no answer from this one reports its targets
            // unconfirmed: delivering here could deliver twice.
            return;
        }
        if self.since_start_ms(Instant::now()) > epoch.alive_until_ms.load(Ordering::Acquire) {
            // This member's presence has expired as far as the other nodes
            // can tell (this node was frozen or starved for longer than its
            // TTL): a sender may have reported these targets offline
            // already. Neither deliver nor answer; a sender still waiting
            // reports them unconfirmed.
            self.stats.expired_drops.add(1);
            return;
        }
        let mut ack = Header::new(Kind::Ack, header.r, &epoch.member);
        match header.k {
            Kind::Send => {
                let message = Arc::new(envelope_of(&header, body));
                let mut ids = Vec::with_capacity(header.t.len());
                let mut at = Vec::with_capacity(header.t.len());
                let mut numbering = Vec::with_capacity(header.t.len());
                for (k, (id, &index)) in header.t.iter().zip(&header.i).enumerate() {
                    if let Ok(id) = ClientId::new(id) {
                        ids.push(id);
                        at.push(index);
                        // No seqs at all: the sender found that no ID
                        // retains; a 0: this target has no inbox.
                        numbering.push(match (header.q.get(k), header.e.get(k)) {
                            (Some(&seq), Some(epoch)) if seq > 0 => Numbering::Seq {
                                epoch: Arc::from(&**epoch),
                                seq,
                                kept: false,
                            },
                            _ => Numbering::NoInbox,
                        });
                    }
                }
                let report = self.deliver_local(&ids, &message, &numbering);
                self.stats.remote_deliveries.add(report.connections as u64);
                ack.d = report.delivered.iter().map(|&j| at[j]).collect();
                ack.x = report.dropped.iter().map(|&j| at[j]).collect();
                ack.n = report.retained.iter().map(|&j| at[j]).collect();
                ack.c = report.connections;
            }
            Kind::Pub => {
                let Some(topic) = self.keys.topic_of(channel) else {
                    self.stats.invalid.add(1);
                    return;
                };
                let message = envelope_of(&header, body).on_topic(topic);
                let n = self.local.publish_now(&message);
                self.stats.remote_deliveries.add(n as u64);
                ack.c = n;
            }
            Kind::Close => {
                let Some(Ok(id)) = header.t.first().map(|id| ClientId::new(id)) else {
                    self.stats.invalid.add(1);
                    return;
                };
                let code = u16::try_from(header.c)
                    .ok()
                    .map(CloseCode)
                    .filter(|c| c.is_valid_on_wire())
                    .unwrap_or(CloseCode::DISCONNECTED);
                let reason = String::from_utf8_lossy(&body).into_owned();
                let frame = CloseFrame {
                    code,
                    reason: Cow::Owned(reason),
                };
                ack.c = if header.o == 0 {
                    self.local.disconnect_now(&id, &frame)
                } else {
                    let (closed, newest) = self.close_older(&id, header.o, &frame);
                    ack.o = newest;
                    closed
                };
            }
            // Everything Redis sent before it (an invalidation of `P:v1`)
            // is handled: the answer says so.
            Kind::Sync => {}
            Kind::Ack => return,
        }
        let answer = ack.encode(&[]);
        if epoch
            .acks
            .try_send((self.keys.node_channel(&header.f), answer))
            .is_err()
        {
            self.stats.acks_dropped.add(1);
        }
    }

    pub(super) fn route_reply(&self, request: u64, reply: Reply) {
        {
            // Whoever answers, even too late, is no longer suspect.
            let mut suspects = self.suspects.lock();
            if !suspects.is_empty() {
                suspects.remove(&reply.from);
            }
        }
        if let Some(tx) = self.pending.lock().get(&request) {
            let _ = tx.send(reply);
        }
    }

    /// The members other than this node's that have each target, as a list
    /// of (member, target indexes); `Err` when Redis cannot answer. Targets
    /// in the location cache (`loc_cache.rs`) are not read again, unless
    /// `fresh` (a send that numbered first: see [`Shared::send`]).
    pub(super) async fn locate(
        &self,
        link: &Link,
        targets: &[ClientId],
        fresh: bool,
    ) -> Result<Located, ::redis::RedisError> {
        let mut by_member: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut misses: Vec<usize> = Vec::with_capacity(if fresh { targets.len() } else { 0 });
        for (i, id) in targets.iter().enumerate() {
            match self.loc_cache.get(id.as_str()).filter(|_| !fresh) {
                Some(members) => {
                    for member in members.iter() {
                        by_member.entry(member.to_string()).or_default().push(i);
                    }
                }
                None => misses.push(i),
            }
        }
        let mut conn = link.conn.clone();
        if !misses.is_empty() {
            let fills = self
                .loc_cache
                .begin(link.tracking, misses.iter().map(|&i| targets[i].as_str()));
            let mut pipe = ::redis::pipe();
            for &i in &misses {
                if fills.is_some() {
                    // Tracked: Redis tells us when this key changes.
                    pipe.cmd("CLIENT").arg("CACHING").arg("YES").ignore();
                }
                pipe.cmd("SMEMBERS").arg(self.keys.loc(targets[i].as_str()));
            }
            let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
            for (k, (&i, reply)) in misses.iter().zip(replies).enumerate() {
                let others: Vec<String> = strings(reply)
                    .into_iter()
                    .filter(|member| !self.is_own(member))
                    .collect();
                if let Some(fill) = fills.as_ref().and_then(|fills| fills.get(k)) {
                    let members = others.iter().map(|m| Arc::from(m.as_str())).collect();
                    self.loc_cache.finish(targets[i].as_str(), fill, members);
                }
                for member in others {
                    by_member.entry(member).or_default().push(i);
                }
            }
        }
        // Members the last heartbeat read does not show alive (a node that
        // joined or reconnected since, or one whose deadline had passed by
        // then): ask Redis now rather than judge by an old read, so that a
        // target is reported offline only when its presence has expired.
        let unsure: Vec<String> = by_member
            .keys()
            .filter(|member| !self.is_live(member))
            .cloned()
            .collect();
        if !unsure.is_empty() {
            let alive = self.check_alive(&mut conn, &unsure).await?;
            by_member.retain(|member, _| !unsure.contains(member) || alive.contains(member));
        }
        Ok(by_member.into_iter().collect())
    }

    /// Which of `members` are alive now, by their deadlines in `P:nodes`
    /// (a member not there, or marked by a cleanup, is not); remembers the
    /// live ones' deadlines until the next heartbeat read.
    async fn check_alive(
        &self,
        conn: &mut RedisConn,
        members: &[String],
    ) -> Result<HashSet<String>, ::redis::RedisError> {
        let (time, scores): (Value, Value) = ::redis::pipe()
            .cmd("TIME")
            .cmd("ZMSCORE")
            .arg(self.keys.nodes())
            .arg(members)
            .query_async(conn)
            .await?;
        let read_at = Instant::now();
        let now = time_ms(&time).ok_or_else(|| err("unexpected TIME reply"))?;
        let Value::Array(scores) = scores else {
            return Err(err("unexpected ZMSCORE reply"));
        };
        let mut alive = HashSet::new();
        let mut live = self.live.lock();
        for (member, score) in members.iter().zip(&scores) {
            match number(score) {
                Some(until) if until > now as f64 => {
                    let left = Duration::from_millis((until as u64).saturating_sub(now));
                    live.insert(member.clone(), read_at + left);
                    alive.insert(member.clone());
                }
                _ => {}
            }
        }
        Ok(alive)
    }

    /// Publishes one message per member; returns each one's receiver count
    /// (`None` where publishing failed).
    pub(super) async fn publish_each(
        &self,
        link: &Link,
        messages: Vec<(String, Vec<u8>)>,
    ) -> Vec<Option<i64>> {
        let n = messages.len();
        let mut pipe = ::redis::pipe();
        for (member, message) in messages {
            pipe.cmd("SPUBLISH")
                .arg(self.keys.node_channel(&member))
                .arg(message);
        }
        let mut conn = link.conn.clone();
        match pipe.query_async::<Vec<i64>>(&mut conn).await {
            Ok(counts) => counts.into_iter().map(Some).collect(),
            Err(_) => vec![None; n],
        }
    }

    /// [`publish_each`](Self::publish_each) through the connection's
    /// outbox (`outbox.rs`): batched with what other sends publish to the
    /// same nodes meanwhile.
    async fn publish_batched(
        &self,
        link: &Link,
        messages: Vec<(String, Vec<u8>)>,
    ) -> Vec<Option<i64>> {
        let mut answers = Vec::with_capacity(messages.len());
        for (member, body) in messages {
            let (done, answer) = tokio::sync::oneshot::channel();
            let outgoing = super::outbox::Outgoing {
                channel: self.keys.node_channel(&member),
                body,
                done,
            };
            // A closed outbox: its connection has ended.
            answers.push(link.outbox.send(outgoing).is_ok().then_some(answer));
        }
        let mut counts = Vec::with_capacity(answers.len());
        for answer in answers {
            counts.push(match answer {
                Some(answer) => answer.await.ok().flatten(),
                None => None,
            });
        }
        counts
    }

    /// Collects `expected` replies until `deadline`.
    pub(super) async fn collect(
        &self,
        rx: &mut mpsc::UnboundedReceiver<Reply>,
        expected: usize,
        deadline: tokio::time::Instant,
    ) -> Vec<Reply> {
        let mut replies = Vec::with_capacity(expected);
        while replies.len() < expected {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(reply)) => replies.push(reply),
                Ok(None) => break,
                Err(_) => {
                    self.stats.ack_timeouts.add(1);
                    break;
                }
            }
        }
        replies
    }

    /// Collects the answers `waiting` is owed until `deadline`, removing
    /// each member once it has answered; what is left in `waiting` did not
    /// answer in time. Members that let an earlier request time out and
    /// have not answered anything since (suspects: a frozen or overloaded
    /// node) are waited for only [`Shared::suspect_wait`]: a node that hangs
    /// costs each sender one request timeout, not one per message.
    async fn collect_from(
        &self,
        rx: &mut mpsc::UnboundedReceiver<Reply>,
        waiting: &mut HashMap<&str, (usize, &[usize])>,
        deadline: tokio::time::Instant,
    ) -> Vec<Reply> {
        let short = tokio::time::Instant::now() + self.suspect_wait();
        let mut replies = Vec::with_capacity(waiting.len());
        while !waiting.is_empty() {
            let only_suspects = {
                let suspects = self.suspects.lock();
                waiting.keys().all(|member| suspects.contains(*member))
            };
            let until = if only_suspects {
                deadline.min(short)
            } else {
                deadline
            };
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(reply)) => {
                    if let Some((owed, _)) = waiting.get_mut(reply.from.as_str()) {
                        *owed = owed.saturating_sub(1);
                        if *owed == 0 {
                            waiting.remove(reply.from.as_str());
                        }
                    }
                    replies.push(reply);
                }
                Ok(None) => break,
                Err(_) => {
                    self.stats.ack_timeouts.add(1);
                    break;
                }
            }
        }
        replies
    }

    /// [`Backend::send`](crate::Backend::send): numbers the message in
    /// each target's inbox (when any ID of the cluster retains) while
    /// locating the targets, in one round trip; queues it to this node's
    /// connections; then asks the nodes that have the others.
    pub(super) async fn send(&self, targets: &[ClientId], message: &Arc<Envelope>) -> SendReport {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let n = targets.len();
        let mut numbering = vec![Numbering::Unavailable; n];
        let mut located = None;
        if let Some(link) = self.link().filter(|_| n > 0) {
            let work = async {
                // Numbering before locating (one connection keeps the
                // order): a node whose hello read the inbox after this
                // numbering had written its presence before, so it is
                // found; one that read it before gets the message from
                // its replay. So a numbered send reads its targets'
                // locations from Redis, not from the cache (whose
                // invalidation may still be in flight behind the
                // numbering's reply).
                if !self.v1_known() {
                    let (must, found) =
                        tokio::join!(self.must_number(&link), self.locate(&link, targets, false));
                    if !must? {
                        return Ok::<_, ::redis::RedisError>((vec![Numbering::NoInbox; n], found?));
                    }
                }
                let (numbered, found) = tokio::join!(
                    self.number(&link, targets, message),
                    self.locate(&link, targets, true)
                );
                Ok((numbered?, found?))
            };
            match tokio::time::timeout_at(deadline, work).await {
                Ok(Ok((numbered, found))) => {
                    numbering = numbered;
                    located = Some((link, found));
                }
                // The targets are then reported unconfirmed unless
                // delivered here.
                _ => numbering = vec![Numbering::Unknown; n],
            }
        }
        let mut report = self.deliver_local(targets, message, &numbering);
        report.retained = numbering
            .iter()
            .enumerate()
            .filter(|(_, n)| matches!(n, Numbering::Seq { kept: true, .. }))
            .map(|(i, _)| i)
            .collect();
        if n > 0 {
            self.send_remote(targets, message, &numbering, located, deadline, &mut report)
                .await;
        }
        report
    }

    /// Publishes `message` to the nodes `located` found (`None`: Redis
    /// could not be asked) and merges their answers into `report`.
    async fn send_remote(
        &self,
        targets: &[ClientId],
        message: &Envelope,
        numbering: &[Numbering],
        located: Option<(Link, Located)>,
        deadline: tokio::time::Instant,
        report: &mut SendReport,
    ) {
        let n = targets.len();
        let mut delivered = vec![false; n];
        let mut dropped = vec![false; n];
        let mut unknown = vec![false; n];
        let mut retained = vec![false; n];
        for &i in &report.retained {
            retained[i] = true;
        }
        for &i in &report.delivered {
            delivered[i] = true;
        }
        for &i in &report.dropped {
            dropped[i] = true;
        }
        let outcome = async {
            let Some((link, located)) = located else {
                return Err(());
            };
            if located.is_empty() {
                return Ok(());
            }
            let (request, mut rx, _guard) = self.register_request();
            let payload = message.payload();
            let messages: Vec<(String, Vec<u8>)> = located
                .iter()
                .map(|(member, indexes)| {
                    let mut header = Header::new(Kind::Send, request, &link.member);
                    header.i.clone_from(indexes);
                    header.t = indexes
                        .iter()
                        .map(|&i| Cow::Borrowed(targets[i].as_str()))
                        .collect();
                    header.b = message.is_binary();
                    header.s = message.sender().map(|s| Cow::Borrowed(s.as_str()));
                    header.m = message.message_id().map(Cow::Borrowed);
                    if indexes
                        .iter()
                        .any(|&i| matches!(numbering[i], Numbering::Seq { .. }))
                    {
                        for &i in indexes {
                            let (seq, epoch) = match &numbering[i] {
                                Numbering::Seq { epoch, seq, .. } => (*seq, &**epoch),
                                _ => (0, ""),
                            };
                            header.q.push(seq);
                            header.e.push(Cow::Borrowed(epoch));
                        }
                    }
                    (member.clone(), header.encode(payload))
                })
                .collect();
            self.count_published(Kind::Send, messages.len());
            let counts = tokio::time::timeout_at(deadline, self.publish_batched(&link, messages))
                .await
                .unwrap_or_else(|_| vec![None; located.len()]);
            // Member → (answers it owes, its targets).
            let mut waiting: HashMap<&str, (usize, &[usize])> = HashMap::new();
            for ((member, indexes), count) in located.iter().zip(&counts) {
                match count {
                    Some(c) if *c > 0 => {
                        waiting.insert(member, (*c as usize, indexes));
                    }
                    // Nobody listens on that member's channel although its
                    // presence has not expired (checked by `locate`): a node
                    // just killed, or one that lost Redis. Unknown, not
                    // offline. (Or publishing failed.)
                    _ => indexes.iter().for_each(|&i| unknown[i] = true),
                }
            }
            let replies = self.collect_from(&mut rx, &mut waiting, deadline).await;
            for reply in replies {
                report.connections += reply.count;
                for i in reply.delivered.into_iter().filter(|&i| i < n) {
                    delivered[i] = true;
                }
                for i in reply.dropped.into_iter().filter(|&i| i < n) {
                    dropped[i] = true;
                }
                for i in reply.retained.into_iter().filter(|&i| i < n) {
                    retained[i] = true;
                }
            }
            if !waiting.is_empty() {
                let mut suspects = self.suspects.lock();
                for (member, (_, indexes)) in waiting {
                    indexes.iter().for_each(|&i| unknown[i] = true);
                    suspects.insert(member.to_owned());
                }
            }
            Ok(())
        }
        .await;
        if outcome.is_err() {
            unknown.iter_mut().for_each(|u| *u = true);
        }
        report.delivered.clear();
        report.dropped.clear();
        report.offline.clear();
        report.unconfirmed.clear();
        report.retained = (0..n).filter(|&i| retained[i]).collect();
        for i in 0..n {
            if delivered[i] {
                report.delivered.push(i);
            } else if unknown[i] {
                report.unconfirmed.push(i);
            } else if dropped[i] {
                report.dropped.push(i);
            } else {
                report.offline.push(i);
            }
        }
    }

    pub(super) async fn disconnect_remote(
        &self,
        id: &ClientId,
        frame: &CloseFrame,
    ) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let link = self.link()?;
        let located =
            tokio::time::timeout_at(deadline, self.locate(&link, std::slice::from_ref(id), true))
                .await
                .ok()?
                .ok()?;
        if located.is_empty() {
            return Some(0);
        }
        let (request, mut rx, _guard) = self.register_request();
        let messages: Vec<(String, Vec<u8>)> = located
            .iter()
            .map(|(member, _)| {
                let mut header = Header::new(Kind::Close, request, &link.member);
                header.t = vec![Cow::Borrowed(id.as_str())];
                header.c = usize::from(frame.code.0);
                (member.clone(), header.encode(frame.reason.as_bytes()))
            })
            .collect();
        self.count_published(Kind::Close, messages.len());
        let counts = tokio::time::timeout_at(deadline, self.publish_each(&link, messages))
            .await
            .ok()?;
        let expected: usize = counts
            .iter()
            .map(|c| usize::try_from(c.unwrap_or(0)).unwrap_or(0))
            .sum();
        let replies = self.collect(&mut rx, expected, deadline).await;
        Some(replies.iter().map(|r| r.count).sum())
    }
}

impl Shared {
    /// A barrier: asks every other node (`P:nodes`, read now) to answer
    /// once it has handled everything Redis sent it before, and waits for
    /// the answers, at most one request timeout. Redis sends a node its
    /// pushes in order on its one connection, so an invalidation written
    /// before this is handled by the node before it answers.
    pub(super) async fn sync_nodes(&self, link: &Link) {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let mut conn = link.conn.clone();
        let mut zrange = ::redis::cmd("ZRANGE");
        zrange.arg(self.keys.nodes()).arg(0).arg(-1);
        let read = zrange.query_async::<Vec<String>>(&mut conn);
        let Ok(Ok(members)) = tokio::time::timeout_at(deadline, read).await else {
            return;
        };
        let members: Vec<String> = members.into_iter().filter(|m| !self.is_own(m)).collect();
        if members.is_empty() {
            return;
        }
        let (request, mut rx, _guard) = self.register_request();
        let messages: Vec<(String, Vec<u8>)> = members
            .into_iter()
            .map(|member| {
                let header = Header::new(Kind::Sync, request, &link.member);
                (member, header.encode(&[]))
            })
            .collect();
        self.count_published(Kind::Sync, messages.len());
        let Ok(counts) = tokio::time::timeout_at(deadline, self.publish_each(link, messages)).await
        else {
            return;
        };
        let expected: usize = counts
            .iter()
            .map(|c| usize::try_from(c.unwrap_or(0)).unwrap_or(0))
            .sum();
        self.collect(&mut rx, expected, deadline).await;
    }
}
