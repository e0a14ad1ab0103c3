//! The receiving side's sequence gate: one per `switchboard.v1`
//! connection on this node, so that the messages numbered for its ID by
//! any node reach it gap-free, in seq order, each once.
//!
//! Messages of one ID are numbered by Redis (`inbox.rs`) but reach this
//! node over pub/sub from whichever node sent them, so seq 8 from one
//! sender can arrive before seq 7 from another. The gate queues a message
//! when it is the next one; holds a later one (a hole) for [`HOLD`]; then
//! reads the missing seqs from the stream (`XRANGE`) and fills the hole
//! with them. A seq neither delivered nor retained by then (its sender died
//! between numbering and publishing, and it was not kept) is skipped: the
//! client's resume or `replay` reports it lost.
//!
//! A gate starts when its connection's hello has read the inbox (`start`):
//! every message numbered after the welcome's `inbox.seq` goes through it.
//! Messages that arrive before are held, and those at or below that seq
//! (in the replay) dropped.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::Shared;
use super::inbox::Numbering;
use crate::id::ClientId;
use crate::protocol::close::{CloseCode, CloseFrame};
use crate::runtime::delivery::Envelope;
use crate::runtime::mailbox::{ConnRef, PushError};

/// How long a hole is waited for before it is read from the stream. Pub/sub
/// messages of different senders reach a node a fraction of a millisecond
/// apart on one Redis; 50 ms covers a sender's scheduling delay on a busy
/// machine while adding little to the one message held behind a real loss.
pub(super) const HOLD: Duration = Duration::from_millis(50);

/// Messages held behind a hole (or before the start): past it, the hole
/// is read at once rather than after [`HOLD`], and later messages are not
/// held but read from the stream with it, which bounds a gate's memory
/// (1,024 map entries of about 56 B, the payloads shared) however long
/// Redis is away.
const MAX_HELD: usize = 1024;

/// How many times a fill retries a failed read (every [`HOLD`]: 10 s,
/// longer than a node takes to reconnect to Redis) before it skips the
/// hole.
const FILL_ATTEMPTS: u32 = 200;

/// Skipped ranges remembered, to report a late arrival of one as dropped.
const SKIPPED_KEPT: usize = 16;

/// One v1 connection's gate.
pub(super) struct Gate {
    pub(super) id: ClientId,
    conn: ConnRef,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The inbox epoch and the next seq to deliver, once started.
    start: Option<(Arc<str>, u64)>,
    /// Numbered messages that arrived before the start.
    early: Vec<(Arc<str>, u64, Arc<Envelope>)>,
    /// Messages after a hole, by seq.
    held: BTreeMap<u64, Arc<Envelope>>,
    /// The newest seq known to be given out (from messages and from the
    /// refreshes of `inbox.rs`): a seq up to it that never arrives (lost
    /// with a node's Redis connection) is read from the stream even when
    /// no later message comes.
    tail: u64,
    /// Seqs given up on (neither delivered nor retained in time).
    skipped: VecDeque<(u64, u64)>,
    /// A fill task is running for this gate.
    filling: bool,
    /// The inbox was lost under the connection: it is being closed.
    reset: bool,
}

/// What an offer did: `Err` counts the connection as not reached, `fill`
/// asks the caller to start a fill task.
pub(super) struct Offered {
    pub(super) result: Result<(), PushError>,
    pub(super) fill: bool,
}

impl Gate {
    pub(super) fn new(id: ClientId, conn: ConnRef) -> Self {
        Self {
            id,
            conn,
            state: Mutex::new(State::default()),
        }
    }

    /// A message for this connection's ID.
    pub(super) fn offer(&self, numbering: &Numbering, message: &Arc<Envelope>) -> Offered {
        let mut st = self.state.lock();
        let done = |result| Offered {
            result,
            fill: false,
        };
        if st.reset {
            return done(Err(PushError::Closed));
        }
        match numbering {
            // Surely not numbered (its sender is not connected to Redis):
            // delivered as it is, `"seq":null` (it is in no inbox).
            Numbering::Unavailable => done(self.conn.deliver(message, None, &mut None)),
            // Perhaps numbered: if it is, it reaches the connection through
            // the stream (a later seq or the next refresh shows the hole);
            // delivering it here too could deliver it twice. Not queued
            // now: the sender reports it unconfirmed.
            Numbering::Unknown => done(Err(PushError::Closed)),
            // Sent before this connection's inbox existed: not for it.
            Numbering::NoInbox if st.start.is_none() => done(Err(PushError::Closed)),
            // The ID retains nothing, yet this connection is attached: its
            // inbox was lost (flushed, restarted).
            Numbering::NoInbox => {
                self.reset(&mut st);
                done(Err(PushError::Closed))
            }
            Numbering::Seq { epoch, seq, .. } => {
                st.tail = st.tail.max(*seq);
                let Some((current, next)) = st.start.clone() else {
                    // Past the cap, it is read from the stream once the
                    // gate starts (the tail says it exists).
                    if st.early.len() < MAX_HELD {
                        st.early
                            .push((Arc::clone(epoch), *seq, Arc::clone(message)));
                    }
                    return done(Ok(()));
                };
                if **epoch != *current {
                    self.reset(&mut st);
                    return done(Err(PushError::Closed));
                }
                if *seq < next {
                    // Delivered already (filled from the stream), unless it
                    // was given up on.
                    let skipped = st.skipped.iter().any(|(a, b)| (*a..=*b).contains(seq));
                    return done(if skipped {
                        Err(PushError::Full)
                    } else {
                        Ok(())
                    });
                }
                if *seq == next {
                    let result = self.conn.deliver(message, Some(*seq), &mut None);
                    st.start = Some((current, next + 1));
                    self.drain(&mut st);
                    return done(result);
                }
                if st.held.len() < MAX_HELD {
                    st.held.insert(*seq, Arc::clone(message));
                }
                Offered {
                    result: Ok(()),
                    fill: self.want_fill(&mut st),
                }
            }
        }
    }

    /// The connection's hello read the inbox: epoch `epoch`, newest seq
    /// `top` (the replay covers up to it). Returns whether a fill is needed.
    pub(super) fn start(&self, epoch: &str, top: u64) -> bool {
        let mut st = self.state.lock();
        let epoch: Arc<str> = Arc::from(epoch);
        for (e, seq, message) in std::mem::take(&mut st.early) {
            if e == epoch && seq > top {
                st.held.insert(seq, message);
            }
        }
        st.start = Some((epoch, top + 1));
        st.tail = st.tail.max(top);
        self.drain(&mut st);
        self.want_fill(&mut st)
    }

    /// Whether a fill task should start now (and marks one started).
    fn want_fill(&self, st: &mut State) -> bool {
        let next = st.start.as_ref().map_or(u64::MAX, |(_, next)| *next);
        if (st.held.is_empty() && st.tail < next) || st.filling || st.reset {
            return false;
        }
        st.filling = true;
        true
    }

    /// Delivers the held messages that are next in line.
    fn drain(&self, st: &mut State) {
        let Some((_, mut next)) = st.start.clone() else {
            return;
        };
        while let Some(entry) = st.held.first_entry() {
            let seq = *entry.key();
            if seq > next {
                break;
            }
            let message = entry.remove();
            if seq == next {
                let _ = self.conn.deliver(&message, Some(seq), &mut None);
                next += 1;
            }
        }
        if let Some((_, n)) = st.start.as_mut() {
            *n = next;
        }
    }

    /// The inbox was lost under the connection: close it, 4101.
    fn reset(&self, st: &mut State) {
        if !st.reset {
            st.reset = true;
            st.held.clear();
            self.conn.close(CloseFrame::new(
                CloseCode::INBOX_RESET,
                "the inbox was lost (its store was flushed or restarted): reconnect and resume",
            ));
        }
    }

    /// Closes the connection when its ID's inbox is gone or has another
    /// epoch than the gate follows (`None`: gone). Otherwise `top` is the
    /// inbox's newest seq: returns whether a fill should start for seqs up
    /// to it that have not arrived.
    pub(super) fn check(&self, found: Option<(&str, u64)>) -> bool {
        let mut st = self.state.lock();
        let same = match (&st.start, found) {
            (Some((current, _)), Some((epoch, _))) => **current == *epoch,
            (None, _) => true,
            (Some(_), None) => false,
        };
        if !same {
            self.reset(&mut st);
            return false;
        }
        if let Some((_, top)) = found {
            st.tail = st.tail.max(top);
        }
        self.want_fill(&mut st)
    }

    /// The hole to fill now, `(epoch, first missing, last missing)`; `None`
    /// (and the fill ends) when there is none.
    fn hole(&self) -> Option<(Arc<str>, u64, u64)> {
        let mut st = self.state.lock();
        let start = st.start.clone();
        let first_held = st.held.keys().next().copied();
        match (start, first_held) {
            _ if st.reset => {}
            (Some((epoch, next)), Some(first)) if first > next => {
                return Some((epoch, next, first - 1));
            }
            (Some((epoch, next)), None) if st.tail >= next => {
                return Some((epoch, next, st.tail));
            }
            _ => {}
        }
        st.filling = false;
        None
    }

    /// Delivers what the stream had of the hole `from..=to`, skips the rest
    /// of it, then what is held after it. Returns how many seqs it skipped.
    fn fill_with(&self, messages: &[crate::backend::Retained], from: u64, to: u64) -> u64 {
        let mut st = self.state.lock();
        let Some((_, mut next)) = st.start.clone() else {
            return 0;
        };
        if next != from {
            // Moved on meanwhile (the missing message arrived): drain only.
            self.drain(&mut st);
            return 0;
        }
        let mut skipped = 0;
        for retained in messages {
            if retained.seq < next || retained.seq > to {
                continue;
            }
            if retained.seq > next {
                Self::skip(&mut st, next, retained.seq - 1);
                skipped += retained.seq - next;
            }
            let _ = self
                .conn
                .deliver(&retained.envelope, Some(retained.seq), &mut None);
            next = retained.seq + 1;
        }
        if next <= to {
            Self::skip(&mut st, next, to);
            skipped += to + 1 - next;
            next = to + 1;
        }
        if let Some((_, n)) = st.start.as_mut() {
            *n = next;
        }
        self.drain(&mut st);
        skipped
    }

    fn skip(st: &mut State, from: u64, to: u64) {
        tracing::debug!(
            from,
            to,
            "sequence gate skips seqs neither delivered nor retained"
        );
        if st.skipped.len() >= SKIPPED_KEPT {
            st.skipped.pop_front();
        }
        st.skipped.push_back((from, to));
    }

    /// Whether the hole is urgent (too much held behind it).
    fn crowded(&self) -> bool {
        self.state.lock().held.len() >= MAX_HELD
    }
}

/// Fills `gate`'s holes until it has none: waits [`HOLD`] (less when many
/// messages wait), then reads each missing range from the stream.
pub(super) async fn fill(shared: Arc<Shared>, gate: Arc<Gate>) {
    let mut failures = 0;
    loop {
        if !gate.crowded() {
            tokio::time::sleep(HOLD).await;
        }
        let Some((epoch, from, to)) = gate.hole() else {
            return;
        };
        let read = match shared.link() {
            Some(link) => tokio::time::timeout(
                shared.config.request_timeout,
                shared.read_range(&link, &gate.id, from, to),
            )
            .await
            .ok()
            .and_then(Result::ok),
            None => None,
        };
        match read {
            Some((Some(found), replay)) if *found == *epoch => {
                shared.stats.v1_fills.add(1);
                let skipped = gate.fill_with(&replay.messages, from, to);
                shared.stats.v1_skipped.add(skipped);
            }
            Some(_) => {
                gate.check(None);
            }
            None => {
                failures += 1;
                if failures >= FILL_ATTEMPTS {
                    // Redis is gone for longer than a reconnection takes:
                    // skip the hole rather than hold the connection.
                    let skipped = gate.fill_with(&[], from, to);
                    shared.stats.v1_skipped.add(skipped);
                    failures = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll, Waker};

    use bytes::Bytes;

    use super::*;
    use crate::backend::Retained;
    use crate::runtime::delivery::Format;
    use crate::runtime::mailbox::{Item, Mailbox};

    fn new_gate() -> (Arc<Mailbox<()>>, Gate) {
        let mailbox: Arc<Mailbox<()>> = Mailbox::new(10_000, 1 << 24, false);
        mailbox.set_format(Format::V1);
        let id = ClientId::new("bob").expect("id");
        let gate = Gate::new(id, ConnRef::new(Arc::clone(&mailbox)));
        (mailbox, gate)
    }

    fn message(n: u64) -> Arc<Envelope> {
        Arc::new(Envelope::json(Bytes::from(n.to_string())))
    }

    fn seq(epoch: &str, n: u64) -> Numbering {
        Numbering::Seq {
            epoch: Arc::from(epoch),
            seq: n,
            kept: true,
        }
    }

    /// The `seq`s of the frames queued so far (`None` for `"seq":null`),
    /// and whether a close was asked for, with its code.
    fn taken(mailbox: &Mailbox<()>) -> (Vec<Option<u64>>, Option<u16>) {
        match mailbox.poll_take(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(taken) => {
                let seqs = taken
                    .items
                    .iter()
                    .map(|item| match item {
                        Item::Frame(frame) | Item::Tagged(frame, _) => {
                            let v: serde_json::Value =
                                serde_json::from_slice(&frame.contiguous_payload()).expect("JSON");
                            v["seq"].as_u64()
                        }
                        Item::Info(()) => None,
                    })
                    .collect();
                (seqs, taken.close.map(|c| c.code.0))
            }
            Poll::Pending => (Vec::new(), None),
        }
    }

    #[test]
    fn messages_reach_the_connection_in_seq_order_each_once() {
        let (mailbox, gate) = new_gate();
        // Before the start: 3 is in the replay (top 3), 4 and 6 are not.
        for n in [3, 6, 4] {
            assert!(gate.offer(&seq("e", n), &message(n)).result.is_ok());
        }
        assert!(gate.start("e", 3), "5 is missing: a fill starts");
        assert_eq!(taken(&mailbox).0, vec![Some(4)]);
        // 5 arrives: 5 and the held 6 go out; a second 5 is a duplicate.
        assert!(gate.offer(&seq("e", 5), &message(5)).result.is_ok());
        assert!(gate.offer(&seq("e", 5), &message(5)).result.is_ok());
        assert!(gate.offer(&seq("e", 7), &message(7)).result.is_ok());
        assert_eq!(taken(&mailbox).0, vec![Some(5), Some(6), Some(7)]);
        assert_eq!(gate.hole(), None, "nothing missing: the fill ends");
    }

    #[test]
    fn a_hole_is_filled_from_the_stream_and_what_is_gone_skipped() {
        let (mailbox, gate) = new_gate();
        gate.start("e", 0);
        let offered = gate.offer(&seq("e", 5), &message(5));
        assert!(offered.result.is_ok() && offered.fill);
        let (epoch, from, to) = gate.hole().expect("a hole");
        assert_eq!((&*epoch, from, to), ("e", 1, 4));
        // The stream has 2 and 3; 1 and 4 are gone.
        let read = [Retained::read(2, message(2)), Retained::read(3, message(3))];
        gate.fill_with(&read, from, to);
        assert_eq!(taken(&mailbox).0, vec![Some(2), Some(3), Some(5)]);
        // A late copy of a skipped seq is reported not delivered, and not
        // queued out of order.
        assert!(gate.offer(&seq("e", 4), &message(4)).result.is_err());
        assert!(gate.offer(&seq("e", 3), &message(3)).result.is_ok());
        assert_eq!(taken(&mailbox).0, Vec::<Option<u64>>::new());
        assert_eq!(gate.hole(), None, "filled: the fill task ends");
        // A refresh that shows a newer seq than arrived starts a fill.
        assert!(gate.check(Some(("e", 7))));
        assert_eq!(gate.hole().map(|(_, a, b)| (a, b)), Some((6, 7)));
    }

    #[test]
    fn a_lost_inbox_closes_the_connection_4101() {
        let (mailbox, gate) = new_gate();
        gate.start("e", 0);
        assert!(gate.offer(&seq("e", 1), &message(1)).result.is_ok());
        // Another epoch: the inbox was made again under the connection.
        assert!(gate.offer(&seq("f", 1), &message(1)).result.is_err());
        assert_eq!(taken(&mailbox), (vec![Some(1)], Some(4101)));
        assert!(gate.offer(&seq("e", 2), &message(2)).result.is_err());

        let (mailbox, gate) = new_gate();
        gate.start("e", 0);
        assert!(gate.offer(&Numbering::NoInbox, &message(1)).result.is_err());
        assert_eq!(taken(&mailbox).1, Some(4101));
    }

    #[test]
    fn unnumbered_messages_are_delivered_only_when_surely_unnumbered() {
        let (mailbox, gate) = new_gate();
        // Before the start, "no inbox" means sent before this connection.
        assert!(gate.offer(&Numbering::NoInbox, &message(0)).result.is_err());
        gate.start("e", 0);
        assert!(
            gate.offer(&Numbering::Unavailable, &message(1))
                .result
                .is_ok()
        );
        assert!(gate.offer(&Numbering::Unknown, &message(2)).result.is_err());
        assert_eq!(taken(&mailbox), (vec![None], None));
    }
}
