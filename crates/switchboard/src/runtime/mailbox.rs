//! A connection's mailbox and the handles other parts of the program use to
//! reach it: [`ConnRef`] (type-erased, what backends store) and
//! [`ConnHandle`] (typed, for a handler's `Info` messages).
//!
//! Each connection is driven by one task that owns its socket. Everything
//! else — other connections, the HTTP API, a timer in user code — reaches
//! it only through its [`Mailbox`]: a bounded queue plus the waker of that
//! task. Nothing else ever touches the socket, so no lock is held across a
//! write and a slow client cannot block its senders.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

use parking_lot::Mutex;

use super::delivery::{Envelope, Format, Gap};
use crate::id::Topic;
use crate::protocol::close::{CloseCode, CloseFrame};
use crate::protocol::frame::WireFrame;

/// A connection's process-unique number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ConnId(pub u64);

impl ConnId {
    pub(crate) fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Makes a frame when it is queued (`ConnRef::push_after_welcome`), told
/// whether that is at once or later, at the connection's welcome.
pub(crate) type MakeFrame = Box<dyn FnOnce(Queued) -> WireFrame + Send>;

/// When a [`MakeFrame`] frame is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    /// When it was asked for.
    AtOnce,
    /// Later, with the v1 connection's welcome.
    AtWelcome,
}

/// Why a message could not be queued to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The connection has closed or is closing; drop the handle.
    #[error("connection is closed")]
    Closed,
    /// The outgoing queue is full (the client reads too slowly). The
    /// connection is being closed (1008; a `switchboard.v1` connection with
    /// 4100, "reconnect and resume"); the message was not queued.
    #[error("outgoing queue is full: the client is not reading fast enough")]
    Full,
}

pub(crate) enum Item<I> {
    Frame(WireFrame),
    /// A message to a `switchboard.v1` connection, with what a gap report
    /// says of it if the drop-oldest policy drops it.
    Tagged(WireFrame, Tag),
    Info(I),
}

/// What a dropped v1 message was: a numbered message of the ID's inbox, or
/// a message of a topic.
#[derive(Debug, Clone)]
pub(crate) enum Tag {
    Seq(u64),
    Topic(Topic),
}

/// What the connection task finds when it looks in its mailbox. Every
/// connection has one for its whole life, idle or not, so what most
/// connections never use is boxed in [`Rare`] (the mailbox's allocation
/// went from a 224 B heap chunk to 144 B).
pub(crate) struct Queue<I> {
    pub(crate) items: VecDeque<Item<I>>,
    waker: Option<Waker>,
    queued_bytes: usize,
    /// Created on first use, dropped when empty again (`tidy`).
    rare: Option<Box<Rare>>,
    /// How many of `items` are `Info`s: a take stops at the first one, and
    /// without any (the common case) takes everything without a scan.
    infos: u32,
    /// Set once the connection is closing, for whatever reason; from then on
    /// pushes are refused (`Closed`), so senders see the message as not
    /// delivered instead of queueing it where it would never be written.
    closing: bool,
    /// Deliveries are held back (a v1 connection resuming: live messages
    /// wait behind the replay, see `release`).
    held: bool,
    /// The pending close is an overflow: it must get through even while
    /// the connection's writer is backed up (see `poll_close`). Other closes
    /// (shutdown, API) wait behind the frames already queued.
    close_now: bool,
    /// A v1 connection's welcome has been queued (`release`).
    welcomed: bool,
    closed: bool,
}

/// The parts of a [`Queue`] that most connections never use.
#[derive(Default)]
struct Rare {
    /// A close requested from outside (API, shutdown, overflow), until the
    /// connection task takes it.
    close: Option<CloseFrame>,
    /// Frames dropped by the drop-oldest policy since the task last looked.
    dropped: u64,
    /// For a v1 connection: what those dropped frames were, for the gap
    /// report. Outside the queue's limits, merged until taken, so the report
    /// itself is never dropped.
    gap: Option<Box<Gap>>,
    /// A frame to queue right after the welcome, for a v1 connection that
    /// has not said hello yet (a drain's hint: see `push_after_welcome`),
    /// made when the welcome is queued.
    after_welcome: Option<MakeFrame>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.close.is_none()
            && self.dropped == 0
            && self.gap.is_none()
            && self.after_welcome.is_none()
    }
}

/// What the connection task takes from its mailbox in one go.
pub(crate) struct Taken<I> {
    /// Frames, then at most one `Info`, the last item.
    pub(crate) items: VecDeque<Item<I>>,
    pub(crate) close: Option<CloseFrame>,
    /// Frames dropped (drop-oldest policy) since the last take: the client
    /// is told before it gets `items`.
    pub(crate) dropped: u64,
    /// For a v1 connection, what they were.
    pub(crate) gap: Option<Box<Gap>>,
}

impl<I> Queue<I> {
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Gives the rare parts' box back once nothing is in it.
    fn tidy(&mut self) {
        if self.rare.as_ref().is_some_and(|rare| rare.is_empty()) {
            self.rare = None;
        }
    }

    fn has_close(&self) -> bool {
        self.rare.as_ref().is_some_and(|rare| rare.close.is_some())
    }

    fn dropped(&self) -> u64 {
        self.rare.as_ref().map_or(0, |rare| rare.dropped)
    }

    /// Drop-oldest policy: drops the oldest frames until one of `bytes`
    /// fits. `Info` messages are never dropped (handlers may rely on them);
    /// if only those are queued, the overflow closes the connection as usual.
    /// A v1 connection (`v1`) also records what it dropped, for its gap
    /// report.
    fn make_room(&mut self, max_messages: usize, max_bytes: usize, bytes: usize, v1: bool) {
        while self.items.len() >= max_messages
            || self.queued_bytes.saturating_add(bytes) > max_bytes
        {
            let Some(at) = self.items.iter().position(|i| !matches!(i, Item::Info(_))) else {
                return;
            };
            let tag = match self.items.remove(at) {
                Some(Item::Frame(frame)) => {
                    self.queued_bytes = self.queued_bytes.saturating_sub(frame.wire_len());
                    None
                }
                Some(Item::Tagged(frame, tag)) => {
                    self.queued_bytes = self.queued_bytes.saturating_sub(frame.wire_len());
                    Some(tag)
                }
                Some(Item::Info(_)) | None => return,
            };
            let rare = self.rare();
            rare.dropped += 1;
            if v1 {
                let gap = rare.gap.get_or_insert_default();
                match tag {
                    Some(tag) => gap.add(tag),
                    None => gap.add_untagged(),
                }
            }
        }
    }
}

/// The shared half of a connection: its queue and its task's waker.
///
/// Why a `Mutex<VecDeque>` and not a `tokio::sync::mpsc` channel: an mpsc
/// channel allocates a block of 32 slots when created, about 1.5 KiB per
/// connection with 48-byte frames, even while idle; an empty `VecDeque`
/// allocates nothing. The lock is held only to push or to swap out the
/// whole queue, never across I/O.
pub(crate) struct Mailbox<I> {
    id: ConnId,
    /// When the connection was accepted, in ms since the Unix epoch (8 B;
    /// a `SystemTime` takes 16).
    since_unix_ms: u64,
    /// `limits.max_queued_messages` and `max_queued_bytes`, saturated at
    /// `u32::MAX` (4 billion messages, 4 GiB: no bound in practice) to
    /// keep every mailbox 8 B smaller.
    max_messages: u32,
    max_bytes: u32,
    drop_oldest: bool,
    /// How messages are written to this connection ([`Format`] as bits).
    format: AtomicU8,
    queue: Mutex<Queue<I>>,
}

impl<I: Send + 'static> Mailbox<I> {
    /// The connection's number.
    pub(crate) fn id(&self) -> ConnId {
        self.id
    }

    pub(crate) fn new(max_messages: usize, max_bytes: usize, drop_oldest: bool) -> Arc<Self> {
        Arc::new(Self {
            id: ConnId::next(),
            since_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |since| {
                    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
                }),
            max_messages: u32::try_from(max_messages).unwrap_or(u32::MAX),
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
            drop_oldest,
            format: AtomicU8::new(Format::Plain.to_bits()),
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                waker: None,
                queued_bytes: 0,
                rare: None,
                infos: 0,
                closing: false,
                held: false,
                close_now: false,
                welcomed: false,
                closed: false,
            }),
        })
    }

    fn push_item(&self, item: Item<I>, bytes: usize) -> Result<(), (PushError, Item<I>)> {
        let waker = {
            let mut queue = self.queue.lock();
            if queue.closing {
                return Err((PushError::Closed, item));
            }
            let (max_messages, max_bytes) = (self.max_messages as usize, self.max_bytes as usize);
            if self.drop_oldest {
                queue.make_room(max_messages, max_bytes, bytes, self.format() == Format::V1);
            }
            if queue.items.len() >= max_messages
                || queue.queued_bytes.saturating_add(bytes) > max_bytes
            {
                queue.rare().close = Some(if self.format() == Format::V1 {
                    // A v1 client loses nothing it cannot get back: its
                    // inbox has what it missed, so it is told to resume.
                    CloseFrame::new(
                        CloseCode::SLOW_CONSUMER,
                        "slow consumer: reconnect and resume",
                    )
                } else {
                    CloseFrame::new(
                        CloseCode::POLICY_VIOLATION,
                        "outgoing queue overflow: the client read too slowly",
                    )
                });
                queue.closing = true;
                queue.close_now = true;
                let waker = queue.waker.take();
                drop(queue);
                if let Some(w) = waker {
                    w.wake();
                }
                return Err((PushError::Full, item));
            }
            queue.queued_bytes += bytes;
            if let Item::Info(_) = item {
                queue.infos += 1;
            }
            queue.items.push_back(item);
            queue.waker.take()
        };
        if let Some(w) = waker {
            // Deferred while the sender handles a read's messages at once
            // (see `wakes`): the recipient then takes them in one go.
            super::wakes::wake(w);
        }
        Ok(())
    }

    pub(crate) fn push_frame(&self, frame: WireFrame) -> Result<(), PushError> {
        let bytes = frame.wire_len();
        self.push_item(Item::Frame(frame), bytes)
            .map_err(|(e, _)| e)
    }

    pub(crate) fn push_tagged(&self, frame: WireFrame, tag: Tag) -> Result<(), PushError> {
        let bytes = frame.wire_len();
        self.push_item(Item::Tagged(frame, tag), bytes)
            .map_err(|(e, _)| e)
    }

    pub(crate) fn push_info(&self, info: I) -> Result<(), (PushError, I)> {
        self.push_item(Item::Info(info), 0)
            .map_err(|(e, item)| match item {
                Item::Info(info) => (e, info),
                // push_item hands back the item it was given.
                Item::Frame(_) | Item::Tagged(..) => {
                    unreachable!("push_item returned a different item")
                }
            })
    }

    /// How messages are written to this connection.
    pub(crate) fn format(&self) -> Format {
        Format::from_bits(self.format.load(Ordering::Acquire))
    }

    /// Sets how messages are written to this connection; before it is
    /// registered anywhere, so that every message it gets has one format.
    pub(crate) fn set_format(&self, format: Format) {
        self.format.store(format.to_bits(), Ordering::Release);
    }

    /// Holds deliveries back: they are queued but not taken until
    /// [`release`](Self::release).
    pub(crate) fn hold(&self) {
        self.queue.lock().held = true;
    }

    /// Puts `front` ahead of everything queued meanwhile and lets the
    /// connection take it all: a v1 welcome and its replay come before the
    /// live messages that arrived while they were read. `front` is outside
    /// the queue's limits (it is bounded by the inbox's).
    pub(crate) fn release(&self, front: Vec<WireFrame>) {
        let waker = {
            let mut queue = self.queue.lock();
            queue.held = false;
            queue.welcomed = true;
            if let Some(make) = queue
                .rare
                .as_mut()
                .and_then(|rare| rare.after_welcome.take())
            {
                queue.tidy();
                let frame = make(Queued::AtWelcome);
                queue.queued_bytes += frame.wire_len();
                queue.items.push_front(Item::Frame(frame));
            }
            for frame in front.into_iter().rev() {
                queue.queued_bytes += frame.wire_len();
                queue.items.push_front(Item::Frame(frame));
            }
            queue.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Queues the frame `make` makes: now if the connection is not
    /// `switchboard.v1` or has had its welcome; else right after the
    /// welcome (and its replay), made then — a v1 client's first frame must
    /// be the welcome, and a frame that counts time (a drain's delay) must
    /// count it from when it is sent. Decided under the queue's lock, so a
    /// hello answered at the same moment neither loses the frame nor gets
    /// it first.
    pub(crate) fn push_after_welcome(&self, make: MakeFrame) -> Result<(), PushError> {
        {
            let mut queue = self.queue.lock();
            if queue.closing {
                return Err(PushError::Closed);
            }
            if self.format() == Format::V1 && !queue.welcomed {
                queue.rare().after_welcome = Some(make);
                return Ok(());
            }
        }
        self.push_frame(make(Queued::AtOnce))
    }

    /// Asks the connection to close after the frames already queued.
    pub(crate) fn request_close(&self, frame: CloseFrame) {
        let waker = {
            let mut queue = self.queue.lock();
            if queue.closing {
                return;
            }
            queue.rare().close = Some(frame);
            queue.closing = true;
            queue.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Called by the connection task: takes the frames queued up to and
    /// including the first `Info` (everything when there is none, the
    /// common case), the close request once nothing is queued ahead of it,
    /// and the count of dropped frames; or registers the waker and returns
    /// `Pending`.
    ///
    /// Why stop at an `Info`: the handler runs for it, and meanwhile the
    /// task takes the frames queued after it (`poll_take_frames`); had it
    /// taken them with the info, those would be written after frames that
    /// were queued later.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Taken<I>> {
        self.take(cx, true)
    }

    /// For a connection whose handler callback is running: takes the frames
    /// queued before the first `Info` and the count of dropped frames,
    /// leaving the infos (they need the handler) and the close request; or
    /// registers the waker and returns `Pending`.
    pub(crate) fn poll_take_frames(&self, cx: &mut Context<'_>) -> Poll<Taken<I>> {
        self.take(cx, false)
    }

    fn take(&self, cx: &mut Context<'_>, with_info: bool) -> Poll<Taken<I>> {
        let mut queue = self.queue.lock();
        let count = if queue.infos == 0 {
            queue.items.len()
        } else {
            let first = queue
                .items
                .iter()
                .position(|item| matches!(item, Item::Info(_)))
                .unwrap_or(queue.items.len());
            first + usize::from(with_info)
        };
        // While held (a v1 connection resuming), deliveries wait behind the
        // replay; a close request still gets through.
        let count = if queue.held { 0 } else { count };
        let everything = count == queue.items.len();
        let close = with_info && everything && queue.has_close();
        let dropped = if queue.held { 0 } else { queue.dropped() };
        if count == 0 && !close && dropped == 0 {
            match &queue.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => queue.waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        let items: VecDeque<Item<I>> = if everything {
            queue.queued_bytes = 0;
            std::mem::take(&mut queue.items)
        } else {
            let items: VecDeque<Item<I>> = queue.items.drain(..count).collect();
            let bytes: usize = items
                .iter()
                .map(|item| match item {
                    Item::Frame(frame) | Item::Tagged(frame, _) => frame.wire_len(),
                    Item::Info(_) => 0,
                })
                .sum();
            queue.queued_bytes = queue.queued_bytes.saturating_sub(bytes);
            items
        };
        if let Some(Item::Info(_)) = items.back() {
            queue.infos -= 1;
        }
        let taken = match queue.rare.as_mut() {
            Some(rare) => Taken {
                items,
                close: if close { rare.close.take() } else { None },
                dropped: std::mem::take(&mut rare.dropped),
                gap: rare.gap.take(),
            },
            None => Taken {
                items,
                close: None,
                dropped: 0,
                gap: None,
            },
        };
        queue.tidy();
        Poll::Ready(taken)
    }

    /// Like `poll_take`, but only for an overflow close: used while the
    /// connection's writer is backed up and it takes no frames. A client
    /// that stops reading is exactly the one whose queue overflows, so that
    /// close must get through even then; flushing first would never end.
    pub(crate) fn poll_close(&self, cx: &mut Context<'_>) -> Poll<CloseFrame> {
        let mut queue = self.queue.lock();
        if queue.close_now
            && let Some(close) = queue.rare.as_mut().and_then(|rare| rare.close.take())
        {
            queue.tidy();
            return Poll::Ready(close);
        }
        match &queue.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => queue.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The connection started closing on its own (a handler `Stop`, a
    /// protocol error, the client's close) or its socket is done (EOF, an
    /// error, a deadline): refuse further pushes.
    pub(crate) fn mark_closing(&self) {
        self.queue.lock().closing = true;
    }

    /// Marks the mailbox closed; later pushes fail with `Closed`. Returns how
    /// many queued items were never delivered.
    pub(crate) fn mark_closed(&self) -> usize {
        let mut queue = self.queue.lock();
        queue.closed = true;
        queue.closing = true;
        queue.waker = None;
        let dropped = queue.items.len();
        queue.items = VecDeque::new();
        queue.infos = 0;
        dropped
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.queue.lock().closed
    }
}

/// The object-safe view of a mailbox that registries and topics hold: it can
/// take frames and close requests whatever the handler's `Info` type.
trait Outlet: Send + Sync {
    fn id(&self) -> ConnId;
    fn since(&self) -> SystemTime;
    fn format(&self) -> Format;
    fn push_frame(&self, frame: WireFrame) -> Result<(), PushError>;
    fn push_tagged(&self, frame: WireFrame, tag: Tag) -> Result<(), PushError>;
    fn push_after_welcome(&self, make: MakeFrame) -> Result<(), PushError>;
    fn request_close(&self, frame: CloseFrame);
}

impl<I: Send + 'static> Outlet for Mailbox<I> {
    fn id(&self) -> ConnId {
        self.id
    }
    fn since(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(self.since_unix_ms)
    }
    fn format(&self) -> Format {
        Mailbox::format(self)
    }
    fn push_frame(&self, frame: WireFrame) -> Result<(), PushError> {
        Mailbox::push_frame(self, frame)
    }
    fn push_tagged(&self, frame: WireFrame, tag: Tag) -> Result<(), PushError> {
        Mailbox::push_tagged(self, frame, tag)
    }
    fn push_after_welcome(&self, make: MakeFrame) -> Result<(), PushError> {
        Mailbox::push_after_welcome(self, make)
    }
    fn request_close(&self, frame: CloseFrame) {
        Mailbox::request_close(self, frame);
    }
}

/// A type-erased reference to a live connection, as a [`Backend`] stores
/// it: it can queue frames and ask the connection to close.
///
/// [`Backend`]: crate::Backend
#[derive(Clone)]
pub struct ConnRef(Arc<dyn Outlet>);

impl ConnRef {
    pub(crate) fn new<I: Send + 'static>(mailbox: Arc<Mailbox<I>>) -> Self {
        Self(mailbox)
    }

    /// The connection's number.
    pub fn id(&self) -> ConnId {
        self.0.id()
    }

    /// When the connection was accepted.
    pub fn since(&self) -> SystemTime {
        self.0.since()
    }

    /// Queues an encoded frame. Cheap: a reference count and a short lock.
    pub fn push(&self, frame: WireFrame) -> Result<(), PushError> {
        self.0.push_frame(frame)
    }

    /// Asks the connection to send `frame` as its close frame after what is
    /// already queued, then end.
    pub fn close(&self, frame: CloseFrame) {
        self.0.request_close(frame);
    }

    /// Queues `message` in the connection's format: a message to the ID
    /// with inbox number `seq`, or a topic message. `v1` keeps the v1 frame
    /// made for the first v1 connection of an ID for its others.
    pub fn deliver(
        &self,
        message: &Envelope,
        seq: Option<u64>,
        v1: &mut Option<WireFrame>,
    ) -> Result<(), PushError> {
        match self.0.format() {
            Format::V1 => {
                let frame = v1
                    .get_or_insert_with(|| message.frame_for(Format::V1, seq))
                    .clone();
                match (message.topic(), seq) {
                    (Some(topic), _) => self.0.push_tagged(frame, Tag::Topic(topic.clone())),
                    (None, Some(seq)) => self.0.push_tagged(frame, Tag::Seq(seq)),
                    (None, None) => self.0.push_frame(frame),
                }
            }
            format => self.0.push_frame(message.frame_for(format, seq)),
        }
    }

    /// Queues the frame `make` makes, after the welcome for a
    /// `switchboard.v1` connection that has not said hello yet (see
    /// `Mailbox::push_after_welcome`).
    pub(crate) fn push_after_welcome(&self, make: MakeFrame) -> Result<(), PushError> {
        self.0.push_after_welcome(make)
    }

    /// Whether this is a `switchboard.v1` connection.
    pub(crate) fn is_v1(&self) -> bool {
        self.0.format() == Format::V1
    }
}

impl std::fmt::Debug for ConnRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ConnRef").field(&self.id()).finish()
    }
}

/// A cloneable handle that sends `Info` messages and frames to one
/// connection from anywhere in the program; the `Kernel.send(pid, msg)` of
/// the Erlang world. The handler's [`on_info`](crate::Handler::on_info)
/// receives the messages, in order, on the connection's own task.
pub struct ConnHandle<I> {
    mailbox: Arc<Mailbox<I>>,
}

impl<I> Clone for ConnHandle<I> {
    fn clone(&self) -> Self {
        Self {
            mailbox: Arc::clone(&self.mailbox),
        }
    }
}

impl<I: Send + 'static> ConnHandle<I> {
    pub(crate) fn new(mailbox: Arc<Mailbox<I>>) -> Self {
        Self { mailbox }
    }

    /// The connection's number.
    pub fn id(&self) -> ConnId {
        self.mailbox.id
    }

    /// Sends an info message; on error the message is handed back.
    pub fn send(&self, info: I) -> Result<(), (PushError, I)> {
        self.mailbox.push_info(info)
    }

    /// Queues an encoded frame straight to the client, bypassing the handler.
    pub fn send_frame(&self, frame: WireFrame) -> Result<(), PushError> {
        self.mailbox.push_frame(frame)
    }

    /// Asks the connection to close with `frame`.
    pub fn close(&self, frame: CloseFrame) {
        self.mailbox.request_close(frame);
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.mailbox.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    fn frame(text: &'static str) -> WireFrame {
        WireFrame::from_text(text)
    }

    fn texts(taken: &Taken<&'static str>) -> Vec<String> {
        taken
            .items
            .iter()
            .map(|item| match item {
                Item::Frame(frame) | Item::Tagged(frame, _) => {
                    String::from_utf8_lossy(&frame.body).into_owned()
                }
                Item::Info(info) => format!("info {info}"),
            })
            .collect()
    }

    /// A take stops at the first info (inclusive); a frames-only take, for a
    /// connection whose handler is busy, stops before it and never takes
    /// the close; the close comes once nothing is queued ahead of it.
    #[test]
    fn takes_stop_at_infos_and_keep_the_order() {
        let mailbox: Arc<Mailbox<&'static str>> = Mailbox::new(100, 1 << 20, false);
        let mut cx = Context::from_waker(Waker::noop());
        for push in ["a", "info 1", "b", "info 2", "c"] {
            match push.strip_prefix("info ") {
                Some(info) => mailbox.push_info(info).map_err(|(e, _)| e),
                None => mailbox.push_frame(frame(push)),
            }
            .expect("queued");
        }
        mailbox.request_close(CloseFrame::new(CloseCode::GOING_AWAY, "bye"));
        let take = |frames_only: bool| match if frames_only {
            mailbox.poll_take_frames(&mut Context::from_waker(Waker::noop()))
        } else {
            mailbox.poll_take(&mut Context::from_waker(Waker::noop()))
        } {
            Poll::Ready(taken) => Some((texts(&taken), taken.close.is_some())),
            Poll::Pending => None,
        };
        assert_eq!(take(true), Some((vec!["a".to_owned()], false)));
        assert_eq!(take(true), None, "an info is next: it needs the handler");
        assert_eq!(take(false), Some((vec!["info 1".to_owned()], false)));
        assert_eq!(take(true), Some((vec!["b".to_owned()], false)));
        assert_eq!(take(false), Some((vec!["info 2".to_owned()], false)));
        assert_eq!(
            take(true),
            Some((vec!["c".to_owned()], false)),
            "a frames-only take leaves the close"
        );
        assert_eq!(take(false), Some((vec![], true)));
        assert!(mailbox.poll_take(&mut cx).is_pending());
        let queue = mailbox.queue.lock();
        assert_eq!((queue.queued_bytes, queue.infos), (0, 0));
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// Every connection keeps its mailbox for its whole life. With the
    /// `Arc`'s two counts it must stay within a 144 B heap chunk (glibc
    /// serves a request of n bytes from a chunk of n + 8 rounded up to 16):
    /// 136 B. Before the rarely used parts were boxed (`Rare`) it took a
    /// 224 B chunk. Printed with `--nocapture`.
    #[test]
    fn a_mailbox_fits_a_144_byte_heap_chunk() {
        let mailbox = std::mem::size_of::<Mailbox<()>>();
        let queue = std::mem::size_of::<Queue<()>>();
        println!(
            "Mailbox {mailbox} B (Queue {queue} B), Arc allocation {} B",
            mailbox + 16
        );
        assert!(
            mailbox + 16 <= 136,
            "the mailbox grew to {mailbox} B: past the 144 B heap chunk"
        );
    }
}
