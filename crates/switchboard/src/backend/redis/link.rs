//! The connection to Redis and its supervision: connect (register
//! presence, subscribe), run (heartbeats, flushes), notice the loss,
//! reconnect with backoff and jitter, and publish the answers to other
//! nodes' requests.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::conn::RedisConn;
use ::redis::{PushInfo, Value};
use tokio::sync::{Notify, mpsc, watch};

use super::outbox;
use super::presence::{collect_garbage, heartbeat, leave, write_presence};
use super::replies::number;
use super::topics::subscribe_topics;
use super::wire::Kind;
use super::{
    ACK_QUEUE, Epoch, Link, MAX_BACKOFF, MIN_BACKOFF, RedisFailure, Session, Shared, TaskGuard,
    local_ms,
};
use crate::id::{ClientId, Topic};

/// Why a connection attempt failed.
pub(super) enum ConnectError {
    Redis(::redis::RedisError),
    /// Another running process has this node ID: stop for good.
    Twin(RedisFailure),
}

impl From<::redis::RedisError> for ConnectError {
    fn from(error: ::redis::RedisError) -> Self {
        Self::Redis(error)
    }
}

/// Why a connected session ended.
pub(super) enum Ended {
    Lost(String),
    Stopped,
}

pub(super) async fn supervise(shared: Arc<Shared>) {
    let _task = TaskGuard::new(&shared);
    let mut stop = shared.stop.subscribe();
    let mut backoff = MIN_BACKOFF;
    // Members of this node's earlier connections, to be marked dead once a
    // new connection is registered.
    let mut stale: Vec<Arc<str>> = Vec::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let epoch = shared.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        let member: Arc<str> = Arc::from(format!("{}{epoch}", shared.own_prefix));
        let connect = connect(&shared, Arc::clone(&member), &stale);
        let attempt = tokio::select! {
            attempt = connect => attempt,
            _ = stop.changed() => return,
        };
        match attempt {
            Ok(mut session) => {
                stale.clear();
                backoff = MIN_BACKOFF;
                shared.stats.connects.add(1);
                *shared.last_error.lock() = None;
                *shared.link.write() = Some(session.link.clone());
                tracing::info!(node = %shared.config.node_id, member = %session.link.member, "connected to redis");
                let ended = run(&shared, &mut session, &mut stop).await;
                if let Some(generation) = session.link.tracking {
                    shared.loc_cache.deactivate(generation);
                }
                *shared.link.write() = None;
                shared.stop_recording();
                session.epoch.ended.store(true, Ordering::Release);
                let _ = session.ended_tx.send(true);
                stale.push(member);
                match ended {
                    Ended::Stopped => return,
                    Ended::Lost(message) => {
                        shared.stats.connection_failures.add(1);
                        shared.set_error(format!("lost the redis connection: {message}"));
                    }
                }
            }
            Err(ConnectError::Twin(failure)) => {
                shared.stop_recording();
                shared.fail(failure);
                return;
            }
            Err(ConnectError::Redis(error)) => {
                shared.stop_recording();
                // It may have registered part of its presence. (Bounded: the
                // presence of a member not marked expires with its TTL anyway.)
                if stale.len() < 16 {
                    stale.push(member);
                }
                shared.stats.connection_failures.add(1);
                shared.set_error(format!("cannot connect to redis: {error}"));
            }
        }
        // Jitter of ±25 % so that nodes do not reconnect in lockstep.
        let jitter = RandomState::new().hash_one(local_ms()) % 50;
        let wait = backoff.mul_f64(0.75 + jitter as f64 / 100.0);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

pub(super) async fn connect(
    shared: &Arc<Shared>,
    member: Arc<str>,
    stale: &[Arc<str>],
) -> Result<Session, ConnectError> {
    let timeout = shared.config.request_timeout;
    let (acks_tx, acks_rx) = mpsc::channel(ACK_QUEUE);
    let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
    let epoch = Arc::new(Epoch {
        member: Arc::clone(&member),
        ended: AtomicBool::new(false),
        lost: Notify::new(),
        acks: acks_tx,
        alive_until_ms: AtomicU64::new(0),
        tracking: AtomicU64::new(0),
    });
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let on_push = {
        let epoch = Arc::clone(&epoch);
        move |info: PushInfo| -> Result<(), std::convert::Infallible> {
            if let Some(shared) = weak.upgrade() {
                shared.on_push(&epoch, info);
            }
            Ok(())
        }
    };
    let mut conn = shared.client.connect(timeout, on_push).await?;
    let (ended_tx, ended_rx) = watch::channel(false);
    let mut session = Session {
        link: Link {
            conn: conn.clone(),
            member: Arc::clone(&member),
            tracking: None,
            outbox: outbox_tx,
        },
        epoch: Arc::clone(&epoch),
        subscribed: HashSet::new(),
        ended_tx,
        clock_offset_ms: 0,
        deadline_ms: 0,
        last_beat: Instant::now(),
    };
    let setup = async {
        ::redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(format!("switchboard:{member}"))
            .exec_async(&mut conn)
            .await?;
        // Redis tells this connection when a location it read for the
        // cache changes (`loc_cache.rs`); only reads sent right after
        // `CLIENT CACHING YES` are tracked (`OPTIN`).
        let tracked = shared.loc_cache.enabled()
            && match ::redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .arg("OPTIN")
                .exec_async(&mut conn)
                .await
            {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(node = %shared.config.node_id, "redis refused client tracking, no location cache: {error}");
                    false
                }
            };
        // The inbox before the heartbeat: a member other nodes can see
        // always has a listener while its connection lives (which is how a
        // twin tells a running process from a dead one, below).
        ::redis::cmd("SSUBSCRIBE")
            .arg(shared.keys.node_channel(&member))
            .exec_async(&mut conn)
            .await?;
        let (_, members) = heartbeat(shared, &mut session, true).await?;
        if let Some(other) = find_twin(shared, &mut conn, &members).await? {
            // Leave no trace: nothing but the heartbeat was written.
            let _ = ::redis::cmd("ZREM")
                .arg(shared.keys.nodes())
                .arg(member.as_ref())
                .exec_async(&mut conn)
                .await;
            return Err(ConnectError::Twin(RedisFailure::NodeIdInUse {
                node_id: shared.config.node_id.clone(),
                other,
                key_prefix: shared.config.key_prefix.clone(),
            }));
        }
        // Changes from here on are recorded; everything before is in what
        // is read below.
        let generation = shared.start_recording();
        // Subscriptions first, then presence: from the moment other nodes
        // can find an ID here, its messages have a listener.
        let topics = shared.local.topic_names();
        subscribe_topics(shared, &mut session, topics).await?;
        let ids: Vec<ClientId> = shared
            .local
            .clients_now()
            .into_iter()
            .map(|c| c.id)
            .collect();
        write_presence(shared, &mut session, ids).await?;
        shared.flushed_up_to(generation);
        // Our earlier lives, now that this one is registered (so an ID here
        // never looks offline in between): mark them dead, so that the next
        // cleanup removes their presence (`XX`: not if a cleanup already did).
        for previous in stale {
            ::redis::cmd("ZADD")
                .arg(shared.keys.nodes())
                .arg("XX")
                .arg(0)
                .arg(previous.as_ref())
                .exec_async(&mut conn)
                .await?;
        }
        Ok::<_, ConnectError>(tracked)
    };
    if setup.await? {
        let generation = shared.loc_cache.activate();
        session.link.tracking = Some(generation);
        epoch.tracking.store(generation, Ordering::Release);
    }
    let acker_shared = Arc::clone(shared);
    tokio::spawn(outbox::run(
        Arc::clone(shared),
        conn.clone(),
        outbox_rx,
        ended_rx.clone(),
    ));
    tokio::spawn(acker(acker_shared, conn, acks_rx, ended_rx));
    Ok(session)
}

/// Another running process with this node ID, among the members of
/// `P:nodes`: a member named like this node but not of this process, whose
/// inbox has a listener (a live connection, even of a process frozen past
/// its deadline). A member whose inbox has none belongs to a process that
/// is gone (a node restarted after a crash, within its predecessor's TTL)
/// or to an earlier connection of one that is reconnecting (which then
/// finds this node, and refuses): not a reason to refuse.
///
/// Each process subscribes to its inbox, then adds its member, then reads
/// the members: of two starting at once, at least the second to add its
/// member sees the first.
async fn find_twin(
    shared: &Shared,
    conn: &mut RedisConn,
    members: &[(String, u64)],
) -> Result<Option<String>, ::redis::RedisError> {
    let candidates: Vec<&String> = members
        .iter()
        .filter(|(member, _)| shared.is_twin(member))
        .map(|(member, _)| member)
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    let mut pipe = ::redis::pipe();
    for member in &candidates {
        pipe.cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(shared.keys.node_channel(member));
    }
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    for (member, reply) in candidates.into_iter().zip(replies) {
        // [channel, count]
        let listeners = match &reply {
            Value::Array(items) => items.get(1).and_then(number).unwrap_or(0.0),
            Value::Map(pairs) => pairs.first().and_then(|(_, n)| number(n)).unwrap_or(0.0),
            _ => 0.0,
        };
        if listeners > 0.0 {
            return Ok(Some(member.clone()));
        }
    }
    Ok(None)
}

/// Publishes the answers queued by the reader, in batches; ends with its
/// connection's epoch.
pub(super) async fn acker(
    shared: Arc<Shared>,
    mut conn: RedisConn,
    mut rx: mpsc::Receiver<(String, Vec<u8>)>,
    mut ended: watch::Receiver<bool>,
) {
    let _task = TaskGuard::new(&shared);
    let timeout = shared.config.request_timeout;
    let mut batch = Vec::with_capacity(256);
    loop {
        tokio::select! {
            biased;
            _ = ended.changed() => return,
            n = rx.recv_many(&mut batch, 256) => if n == 0 { return },
        }
        shared.count_published(Kind::Ack, batch.len());
        // The answers to one node in one `SPUBLISH` (`batch.rs`).
        let mut pipe = ::redis::pipe();
        super::batch::group(&batch, |channel, body, _| {
            pipe.cmd("SPUBLISH").arg(channel).arg(body).ignore();
        });
        batch.clear();
        // A failure is the sender's timeout: it reports its targets
        // unconfirmed. The connection's loss is noticed by the supervisor.
        let _ = tokio::time::timeout(timeout, pipe.exec_async(&mut conn)).await;
    }
}

pub(super) async fn run(
    shared: &Arc<Shared>,
    session: &mut Session,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let period = shared.config.presence_ttl / 3;
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = shared.config.request_timeout;
    loop {
        let result = tokio::select! {
            biased;
            _ = stop.changed() => {
                leave(shared, session).await;
                return Ended::Stopped;
            }
            () = session.epoch.lost.notified() => {
                return Ended::Lost("connection closed".to_owned());
            }
            _ = beat.tick() => {
                let work = async {
                    let (now, members) = heartbeat(shared, session, false).await?;
                    collect_garbage(shared, session, now, members).await
                };
                tokio::time::timeout(timeout * 4, work).await
            }
            () = shared.wake.notified() => {
                tokio::time::timeout(timeout * 4, flush(shared, session)).await
            }
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Ended::Lost(error.to_string()),
            Err(_) => return Ended::Lost("redis did not answer in time".to_owned()),
        }
    }
}

/// Applies the IDs and topics that changed since the last flush.
pub(super) async fn flush(
    shared: &Shared,
    session: &mut Session,
) -> Result<(), ::redis::RedisError> {
    // Taken whole, so that a burst of changes leaves no capacity behind.
    let topics: Vec<Topic> = std::mem::take(&mut shared.resync.lock().topics)
        .into_iter()
        .collect();
    if !topics.is_empty() {
        subscribe_topics(shared, session, topics).await?;
    }
    let (ids, generation) = {
        let mut resync = shared.resync.lock();
        (std::mem::take(&mut resync.ids), resync.generation)
    };
    let ids: Vec<ClientId> = ids.into_iter().collect();
    if !ids.is_empty() {
        write_presence(shared, session, ids).await?;
    }
    shared.flushed_up_to(generation);
    Ok(())
}

/// A random token of 8 hex digits: this process's part of its members.
pub(super) fn random_token() -> String {
    format!("{:08x}", random_u32())
}

pub(super) fn random_u32() -> u32 {
    static N: AtomicU64 = AtomicU64::new(0);
    let seed = (
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        N.fetch_add(1, Ordering::Relaxed),
        std::process::id(),
    );
    RandomState::new().hash_one(seed) as u32
}
