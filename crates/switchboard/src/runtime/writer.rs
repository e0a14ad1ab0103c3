//! Writing: frames queued for one connection, written with as few system
//! calls as possible.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::AsyncWrite;

use crate::metrics::Metrics;
use crate::protocol::deflate::{Agreed, Deflater};
use crate::protocol::frame::{Head, Suffix, WireFrame};

/// Slices handed to one `writev` call (two to four per frame: header,
/// envelope prefix, body, suffix; empty parts are skipped).
const MAX_IOV: usize = 64;

/// Up to this many queued bytes are copied into one stack buffer and sent
/// with a plain `write`, which on a socket is `send(2)`; more go out with
/// `writev(2)`. Why: `writev` passes through the VFS layer (`vfs_writev`,
/// `fdget_pos`), which `perf` showed costing ~7% of server CPU when fanning
/// 100-byte frames out to 2,000 connections, while copying 2 KiB costs tens
/// of nanoseconds. The buffer is the thread's (`FLAT`).
const COPY_WRITE_LIMIT: usize = 2048;

/// The largest queue buffer (in frames) kept as a thread's spare: 64
/// `WireFrame`s of 80 B, 5 KiB per worker thread.
const SPARE_QUEUE_MAX: usize = 64;

thread_local! {
    /// The buffer a burst of small frames is copied into for one `send(2)`:
    /// per thread rather than on the stack, because a stack array is zeroed
    /// on every write (`memset` of 2 KiB was 3.4% of the instructions of an
    /// echo with one message in flight, callgrind) and a thread's buffer
    /// only once. It does not grow any connection's task either.
    static FLAT: RefCell<[u8; COPY_WRITE_LIMIT]> = const { RefCell::new([0; COPY_WRITE_LIMIT]) };

    /// One emptied queue buffer per thread, handed to the next connection
    /// that queues a frame. Why: a connection frees its queue when it has
    /// written everything (an idle connection keeps none), so with one
    /// message in flight every message paid for a queue allocation and its
    /// free (callgrind, echo 100 × 1: ~330 of ~3,900 instructions per
    /// message went to the queue growing from empty).
    static SPARE_QUEUE: Cell<Option<VecDeque<WireFrame>>> = const { Cell::new(None) };
}

/// Bytes and whole frames written, for the metrics (`bytes_out`,
/// `frames_out`). Tallied by the caller, which cannot always reach the
/// metrics while it writes: a connection keeps writing while a handler
/// callback holds its `Conn`, and with it the hub.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    pub(crate) bytes: u64,
    pub(crate) frames: u64,
}

impl Written {
    /// Adds the tally to `metrics` and starts again from zero.
    pub(crate) fn count(&mut self, metrics: &Metrics) {
        if self.bytes > 0 {
            metrics.bytes_out.add(self.bytes);
            metrics.frames_out.add(self.frames);
            *self = Self::default();
        }
    }
}

/// Frames waiting to be written. A burst of frames costs one system call:
/// copied into one buffer up to `COPY_WRITE_LIMIT`, vectored above it.
pub(crate) struct Writer {
    queue: VecDeque<WireFrame>,
    /// Bytes of the front frame already written.
    offset: usize,
    /// Bytes queued and not yet written.
    pub(crate) backlog: usize,
    /// Set when permessage-deflate was agreed. Compression happens here,
    /// per connection, because with context takeover each connection's
    /// compressed bytes differ.
    deflater: Option<Box<Deflater>>,
}

impl Writer {
    pub(crate) fn new(deflate: Option<Agreed>) -> Self {
        Self {
            queue: VecDeque::new(),
            offset: 0,
            backlog: 0,
            deflater: deflate.map(|agreed| Box::new(Deflater::new(agreed))),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(crate) fn push(&mut self, mut frame: WireFrame) {
        if let Some(deflater) = self.deflater.as_mut()
            && let Some(opcode) = frame.data_opcode()
            && deflater.wants(frame.payload_len())
        {
            let body = deflater.compress(&frame.contiguous_payload());
            frame = WireFrame {
                head: Head::with_rsv1(opcode, body.len(), true),
                suffix: Suffix::None,
                prefix: Bytes::new(),
                body,
            };
        }
        self.backlog += frame.wire_len();
        if self.queue.capacity() == 0
            && let Some(spare) = SPARE_QUEUE.take()
        {
            self.queue = spare;
        }
        self.queue.push_back(frame);
    }

    pub(crate) fn poll_write<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
        written: &mut Written,
    ) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let n = if self.backlog <= COPY_WRITE_LIMIT {
                ready!(FLAT.with_borrow_mut(|flat| {
                    let len = self.copy_backlog(flat);
                    Pin::new(&mut *io).poll_write(cx, &flat[..len])
                }))?
            } else {
                ready!(self.poll_write_vectored(io, cx))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            written.bytes += n as u64;
            written.frames += self.consume(n);
        }
        // An idle connection keeps no queue buffer: it goes to the
        // thread's spare, for the next connection that queues a frame.
        let queue = std::mem::take(&mut self.queue);
        if (1..=SPARE_QUEUE_MAX).contains(&queue.capacity()) {
            SPARE_QUEUE.set(Some(queue));
        }
        Pin::new(io).poll_flush(cx)
    }

    /// Writes the front of the queue with `writev`, up to `MAX_IOV` slices.
    fn poll_write_vectored<S: AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let mut n = 0;
        for part in self.unwritten().take(MAX_IOV) {
            slices[n] = IoSlice::new(part);
            n += 1;
        }
        Pin::new(io).poll_write_vectored(cx, &slices[..n])
    }

    /// Copies every byte not yet written into `flat`, which must hold
    /// `self.backlog` bytes; returns how many were copied.
    fn copy_backlog(&self, flat: &mut [u8]) -> usize {
        debug_assert!(self.backlog <= flat.len());
        let mut len = 0;
        for part in self.unwritten() {
            flat[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        debug_assert_eq!(len, self.backlog);
        len
    }

    /// The bytes not yet written, in order: the rest of the front frame,
    /// then each queued frame's header and body (empty parts skipped).
    fn unwritten(&self) -> impl Iterator<Item = &[u8]> {
        let mut skip = self.offset;
        self.queue
            .iter()
            .flat_map(WireFrame::parts)
            .filter_map(move |part| {
                if skip >= part.len() {
                    skip -= part.len();
                    return None;
                }
                let rest = &part[skip..];
                skip = 0;
                Some(rest)
            })
    }

    /// Drops `n` written bytes from the front; returns whole frames written.
    fn consume(&mut self, mut n: usize) -> u64 {
        debug_assert!(
            n <= self.backlog,
            "the socket reported more bytes than it was given"
        );
        self.backlog -= n;
        let mut frames = 0;
        while let Some(front) = self.queue.front() {
            let left = front.wire_len() - self.offset;
            if n < left {
                self.offset += n;
                break;
            }
            n -= left;
            self.offset = 0;
            self.queue.pop_front();
            frames += 1;
        }
        frames
    }
}

#[cfg(test)]
mod writer_props {
    use std::task::Waker;

    use proptest::prelude::*;

    use crate::protocol::frame::OpCode;

    use super::*;

    /// A socket that takes at most `max` bytes per call and records them,
    /// and whether any call was vectored.
    struct ShortWrites {
        max: usize,
        out: Vec<u8>,
        plain_calls: usize,
        vectored_calls: usize,
    }

    impl AsyncWrite for ShortWrites {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            self.plain_calls += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut left = self.max;
            for buf in bufs {
                let n = buf.len().min(left);
                self.out.extend_from_slice(&buf[..n]);
                left -= n;
            }
            self.vectored_calls += 1;
            Poll::Ready(Ok(self.max - left))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    proptest! {
        /// Whatever the frame sizes and however short the socket's writes,
        /// the bytes on the wire are each frame's header and body in order,
        /// once, and every frame is counted as written.
        #[test]
        fn short_writes_keep_bytes_in_order(
            // A few large frames, or many small ones (past the 64 slices
            // one `writev` takes).
            bodies in prop_oneof![
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 1..12),
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 12..48),
            ],
            max in 1usize..5000,
        ) {
            let mut writer = Writer::new(None);
            let mut expected = Vec::new();
            for (i, body) in bodies.iter().enumerate() {
                // Every third frame is enveloped: prefix, shared body, `}`.
                let frame = if i % 3 == 2 {
                    let prefix = Bytes::from(format!("{{\"seq\":{i},\"payload\":"));
                    WireFrame::enveloped(prefix, Bytes::from(body.clone()), Suffix::CloseBrace)
                } else {
                    WireFrame::new(OpCode::Binary, Bytes::from(body.clone()))
                };
                for part in frame.parts() {
                    expected.extend_from_slice(part);
                }
                writer.push(frame);
            }
            let mut io = ShortWrites { max, out: Vec::new(), plain_calls: 0, vectored_calls: 0 };
            let metrics = Metrics::default();
            let mut cx = Context::from_waker(Waker::noop());
            let mut written = Written::default();
            let done = writer.poll_write(&mut io, &mut cx, &mut written);
            written.count(&metrics);
            prop_assert!(matches!(done, Poll::Ready(Ok(()))));
            prop_assert_eq!(&io.out, &expected);
            prop_assert_eq!(metrics.frames_out.get(), bodies.len() as u64);
            prop_assert_eq!(metrics.bytes_out.get(), expected.len() as u64);
            prop_assert!(writer.is_empty());
            // A small backlog goes out through the copy only; a large one
            // starts vectored.
            let small = expected.len() <= COPY_WRITE_LIMIT;
            prop_assert_eq!(io.vectored_calls == 0, small);
        }
    }
}
