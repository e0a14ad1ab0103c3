//! Reading: assembles complete messages and control frames from the bytes a
//! client sends, with the size limits, UTF-8 checks and permessage-deflate
//! inflation of RFC 6455 and RFC 7692.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use crate::protocol::close::{CloseCode, CloseFrame, parse_close_payload};
use crate::protocol::deflate::{Agreed, Inflater};
use crate::protocol::frame::{OpCode, apply_mask, parse_header};
use crate::protocol::message::{Message, Text};

/// Size of the per-thread read buffer. One read takes at most this much;
/// it is shared by every connection on the thread, so it costs 64 KiB per
/// worker thread, not per connection.
const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// What the reader found in the bytes received.
pub(crate) enum Incoming {
    Message(Message),
    Ping(Bytes),
    Pong,
    Close(Option<CloseFrame>),
}

/// Assembles messages from the bytes a client sends.
pub(crate) struct Reader {
    /// Received bytes not yet parsed. Empty (no allocation) while idle.
    buf: BytesMut,
    /// A fragmented message in progress (RFC 6455 §5.4). Boxed: fragmented
    /// messages are rare, and inline it would cost every connection 40 B.
    partial: Option<Box<Partial>>,
    max_frame: usize,
    max_message: usize,
    /// Set when permessage-deflate was agreed; boxed so that connections
    /// without it pay one pointer.
    inflater: Option<Box<Inflater>>,
    /// While the frame at the front of `buf` is unfinished and carries
    /// text: how many of its payload bytes are known to be valid UTF-8, up
    /// to a character boundary (`check_unfinished`). 0 otherwise.
    frame_checked: usize,
}

struct Partial {
    text: bool,
    /// Compressed (RSV1 on its first frame): inflated when complete, and
    /// its UTF-8 checked then.
    compressed: bool,
    data: BytesMut,
    /// For text: bytes already known to be valid UTF-8.
    checked: usize,
}

impl Reader {
    pub(crate) fn new(
        leftover: Bytes,
        max_frame: usize,
        max_message: usize,
        deflate: Option<Agreed>,
    ) -> Self {
        Self {
            buf: BytesMut::from(&leftover[..]),
            partial: None,
            max_frame,
            max_message,
            inflater: deflate.map(|agreed| Box::new(Inflater::new(agreed))),
            frame_checked: 0,
        }
    }

    /// Reads what the socket has into `buf`, through the per-thread scratch
    /// buffer so that a connection waiting for data owns no buffer.
    pub(crate) fn poll_fill<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut rb = ReadBuf::new(scratch);
            ready!(Pin::new(io).poll_read(cx, &mut rb))?;
            let filled = rb.filled();
            self.buf.extend_from_slice(filled);
            Poll::Ready(Ok(filled.len()))
        })
    }

    pub(crate) fn discard(&mut self) {
        self.buf = BytesMut::new();
        self.partial = None;
        self.frame_checked = 0;
    }

    /// The next complete message or control frame, if buffered.
    pub(crate) fn next(&mut self) -> Result<Option<Incoming>, CloseFrame> {
        loop {
            // A frame may be no larger than a whole message either: an
            // unfragmented message is one frame.
            let frame_limit = self.max_frame.min(self.max_message);
            let head = match parse_header(&self.buf, frame_limit, self.inflater.is_some()) {
                Ok(Some(head)) => head,
                Ok(None) => return Ok(None),
                Err(err) => return Err(CloseFrame::new(err.code, err.reason)),
            };
            let frame_len = head.header_len + head.payload_len;
            if self.buf.len() < frame_len {
                self.check_unfinished(head.opcode, head.rsv1, head.header_len, head.mask)?;
                // Reserve once for the whole frame instead of growing in steps.
                self.buf.reserve(frame_len - self.buf.len());
                return Ok(None);
            }
            self.frame_checked = 0;
            self.buf.advance(head.header_len);
            let mut payload = if self.buf.len() == head.payload_len {
                // The read's last frame takes the whole buffer, which also
                // drops our hold on it: an idle connection keeps no read
                // buffer. Why not `split_to`: it would make the buffer
                // shared, one more allocation (`bytes`' reference count)
                // and free for a read holding one message, as an echo with
                // one message in flight reads (callgrind).
                std::mem::take(&mut self.buf)
            } else {
                self.buf.split_to(head.payload_len)
            };
            apply_mask(&mut payload, head.mask);

            match head.opcode {
                OpCode::Ping => return Ok(Some(Incoming::Ping(payload.freeze()))),
                OpCode::Pong => return Ok(Some(Incoming::Pong)),
                OpCode::Close => {
                    return parse_close_payload(&payload).map(|c| Some(Incoming::Close(c)));
                }
                OpCode::Text | OpCode::Binary => {
                    if self.partial.is_some() {
                        return Err(CloseFrame::new(
                            CloseCode::PROTOCOL_ERROR,
                            "new message before the fragmented one finished (RFC 6455 §5.4)",
                        ));
                    }
                    let text = head.opcode == OpCode::Text;
                    if head.fin {
                        let payload = self.inflate_if(head.rsv1, payload)?;
                        return finish_message(text, payload).map(Some);
                    }
                    let mut partial = Partial {
                        text,
                        compressed: head.rsv1,
                        data: payload,
                        checked: 0,
                    };
                    partial.check_utf8(false)?;
                    self.partial = Some(Box::new(partial));
                }
                OpCode::Continuation => {
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(CloseFrame::new(
                            CloseCode::PROTOCOL_ERROR,
                            "continuation frame with nothing to continue (RFC 6455 §5.4)",
                        ));
                    };
                    if partial.data.len() + payload.len() > self.max_message {
                        return Err(CloseFrame::new(
                            CloseCode::MESSAGE_TOO_BIG,
                            "message larger than the configured maximum (RFC 6455 §7.4.1)",
                        ));
                    }
                    partial.data.extend_from_slice(&payload);
                    partial.check_utf8(head.fin)?;
                    if head.fin
                        && let Some(done) = self.partial.take().map(|boxed| *boxed)
                    {
                        let data = self.inflate_if(done.compressed, done.data)?;
                        return finish_message(done.text, data).map(Some);
                    }
                }
            }
        }
    }

    /// Fail fast inside a frame (RFC 6455 §8.1, Autobahn 6.4.3 and 6.4.4):
    /// checks the UTF-8 of the part of an unfinished text frame received so
    /// far, from where the last check stopped, allowing a character cut at
    /// the end. Without it, invalid text was found only once the whole frame
    /// had arrived, however late its tail, or never if it never came.
    ///
    /// The frame is checked again whole once complete (cheap next to the
    /// copy, and it keeps that path the single source of truth); compressed
    /// text can only be checked once inflated.
    fn check_unfinished(
        &mut self,
        opcode: OpCode,
        compressed: bool,
        header_len: usize,
        mask: [u8; 4],
    ) -> Result<(), CloseFrame> {
        // A continuation goes on from the message's last character, which
        // the previous fragment may have cut. A text frame inside a
        // fragmented message is a protocol error, reported when complete.
        let carry: &[u8] = match (opcode, self.partial.as_deref()) {
            (OpCode::Text, None) if !compressed => &[],
            (OpCode::Continuation, Some(partial)) if partial.text && !partial.compressed => {
                &partial.data[partial.checked..]
            }
            _ => return Ok(()),
        };
        let received = &self.buf[header_len..];
        check_prefix(received, mask, carry, &mut self.frame_checked)
    }

    /// Inflates a complete message if it was sent compressed.
    fn inflate_if(&mut self, compressed: bool, data: BytesMut) -> Result<Bytes, CloseFrame> {
        match (compressed, self.inflater.as_mut()) {
            (true, Some(inflater)) => inflater.inflate(data, self.max_message),
            // parse_header refuses RSV1 unless an inflater exists.
            _ => Ok(data.freeze()),
        }
    }
}

impl Partial {
    /// Validates new text bytes as they arrive, so an invalid fragment is
    /// refused at once rather than after the whole message (RFC 6455 §8.1).
    /// A character cut at the end of a non-final fragment is allowed.
    fn check_utf8(&mut self, fin: bool) -> Result<(), CloseFrame> {
        if !self.text || self.compressed {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(&self.data[self.checked..]) {
            Ok(_) => self.checked = self.data.len(),
            Err(e) if e.error_len().is_none() && !fin => self.checked += e.valid_up_to(),
            Err(_) => return Err(invalid_utf8()),
        }
        Ok(())
    }
}

/// Checks `received[*checked..]` — masked payload bytes of an unfinished
/// frame — as the continuation of valid UTF-8, allowing a character cut at
/// the end, and moves `*checked` to the last character boundary. While
/// `*checked` is 0, `carry` (a character the previous fragment cut, at most
/// 3 bytes) comes first. Unmasks a copy, 4 KiB at a time on the stack: the
/// frame's bytes stay masked until it is complete.
fn check_prefix(
    received: &[u8],
    mask: [u8; 4],
    carry: &[u8],
    checked: &mut usize,
) -> Result<(), CloseFrame> {
    const CHUNK: usize = 4096;
    // Up to 3 bytes of a cut character, then a chunk.
    let mut window = [0u8; CHUNK + 4];
    let mut pending = 0;
    if *checked == 0 {
        let carry = carry.get(..3).unwrap_or(carry);
        window[..carry.len()].copy_from_slice(carry);
        pending = carry.len();
    }
    let mut at = *checked;
    while at < received.len() {
        let n = (received.len() - at).min(CHUNK);
        let chunk = &mut window[pending..pending + n];
        chunk.copy_from_slice(&received[at..at + n]);
        let offset = at % 4;
        apply_mask(
            chunk,
            [
                mask[offset],
                mask[(offset + 1) % 4],
                mask[(offset + 2) % 4],
                mask[(offset + 3) % 4],
            ],
        );
        let len = pending + n;
        match simdutf8::compat::from_utf8(&window[..len]) {
            Ok(_) => pending = 0,
            Err(e) if e.error_len().is_none() => {
                let valid = e.valid_up_to();
                window.copy_within(valid..len, 0);
                pending = len - valid;
            }
            Err(_) => return Err(invalid_utf8()),
        }
        at += n;
        // Bytes of the carry still pending leave the boundary before this
        // frame: 0, and the carry is read again next time.
        *checked = at.saturating_sub(pending);
    }
    Ok(())
}

fn invalid_utf8() -> CloseFrame {
    CloseFrame::new(
        CloseCode::INVALID_PAYLOAD,
        "text message is not valid UTF-8 (RFC 6455 §8.1)",
    )
}

fn finish_message(text: bool, bytes: Bytes) -> Result<Incoming, CloseFrame> {
    if text {
        if simdutf8::basic::from_utf8(&bytes).is_err() {
            return Err(invalid_utf8());
        }
        Ok(Incoming::Message(Message::Text(Text::from_validated(
            bytes,
        ))))
    } else {
        Ok(Incoming::Message(Message::Binary(bytes)))
    }
}

/// Feeds bytes to a reader in `chunk`-sized pieces, without and with
/// permessage-deflate agreed (for the fuzz targets).
pub(crate) fn fuzz_reader(data: &[u8], chunk: usize) {
    let agreed = crate::protocol::deflate::Agreed {
        server_window: 15,
        client_window: 15,
        server_no_takeover: false,
        client_no_takeover: false,
        min_size: 0,
        level: 1,
    };
    for deflate in [None, Some(agreed)] {
        let mut reader = Reader::new(Bytes::new(), 1 << 16, 1 << 16, deflate);
        'feed: for piece in data.chunks(chunk) {
            reader.buf.extend_from_slice(piece);
            loop {
                match reader.next() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    }
}

/// Property tests of the frame reader: arbitrary bytes never panic it, and
/// any message, fragmented and masked any way and delivered in chunks of any
/// size, comes out whole.
#[cfg(test)]
mod reader_props {
    use proptest::prelude::*;

    use super::*;

    fn masked_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
        let first = if fin { 0x80 } else { 0 } | opcode;
        out.extend(crate::protocol::frame::masked_client_frame(
            first, payload, mask,
        ));
    }

    /// Feeds `wire` to a reader in `chunks`-sized pieces; collects results.
    fn read_all(wire: &[u8], chunk: usize) -> Vec<Result<Incoming, CloseFrame>> {
        let mut reader = Reader::new(Bytes::new(), 1 << 20, 1 << 20, None);
        let mut out = Vec::new();
        for piece in wire.chunks(chunk.max(1)) {
            reader.buf.extend_from_slice(piece);
            loop {
                match reader.next() {
                    Ok(Some(incoming)) => out.push(Ok(incoming)),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
        }
        out
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
            let _ = read_all(&bytes, chunk);
        }

        #[test]
        fn fragmented_messages_reassemble(
            text in ".{0,300}",
            binary in proptest::collection::vec(any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(0usize..3000, 0..5),
            mask in any::<[u8; 4]>(),
            chunk in 1usize..200,
            as_text in any::<bool>(),
        ) {
            let payload: Vec<u8> = if as_text { text.into_bytes() } else { binary };
            // Cut points at arbitrary byte offsets, even inside a UTF-8
            // character: only the whole message must be valid.
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (payload.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut bounds = vec![0];
            bounds.extend(cuts);
            bounds.push(payload.len());
            bounds.dedup();
            let pieces: Vec<&[u8]> = if payload.is_empty() {
                vec![&[][..]]
            } else {
                bounds.windows(2).map(|w| &payload[w[0]..w[1]]).collect()
            };
            let mut wire = Vec::new();
            for (i, piece) in pieces.iter().enumerate() {
                let opcode = if i > 0 { 0 } else if as_text { 1 } else { 2 };
                masked_frame(&mut wire, i + 1 == pieces.len(), opcode, piece, mask);
                if i == 0 {
                    // A ping between fragments is allowed (RFC 6455 §5.4).
                    masked_frame(&mut wire, true, 0x9, b"p", mask);
                }
            }
            let results = read_all(&wire, chunk);
            let messages: Vec<&Message> = results
                .iter()
                .filter_map(|r| match r {
                    Ok(Incoming::Message(m)) => Some(m),
                    _ => None,
                })
                .collect();
            prop_assert!(results.iter().all(Result::is_ok), "{results:?}");
            prop_assert_eq!(messages.len(), 1);
            prop_assert_eq!(messages[0].as_bytes(), &payload[..]);
        }
    }

    proptest! {
        /// Text with bytes replaced anywhere, fragmented anywhere and fed
        /// in chunks of any size (so most frames are checked unfinished
        /// first, characters cut across chunks and fragments): refused with
        /// 1007 exactly when the whole message is not UTF-8.
        #[test]
        fn text_is_refused_exactly_when_invalid_however_it_arrives(
            text in ".{1,200}",
            replace in proptest::collection::vec((0usize..1000, any::<u8>()), 0..3),
            cut in 0usize..1000,
            mask in any::<[u8; 4]>(),
            chunk in 1usize..50,
        ) {
            let mut payload = text.into_bytes();
            for (at, byte) in replace {
                let at = at % payload.len();
                payload[at] = byte;
            }
            let cut = cut % (payload.len() + 1);
            let mut wire = Vec::new();
            masked_frame(&mut wire, false, 0x1, &payload[..cut], mask);
            masked_frame(&mut wire, true, 0x0, &payload[cut..], mask);
            let valid = std::str::from_utf8(&payload).is_ok();
            let results = read_all(&wire, chunk);
            match results.last() {
                Some(Ok(Incoming::Message(m))) if valid => prop_assert_eq!(m.as_bytes(), &payload[..]),
                Some(Err(e)) if !valid => prop_assert_eq!(e.code, CloseCode::INVALID_PAYLOAD),
                other => prop_assert!(false, "valid {}: {:?}", valid, other),
            }
            prop_assert_eq!(results.len(), 1);
        }
    }

    impl std::fmt::Debug for Incoming {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Incoming::Message(m) => write!(f, "Message({} bytes)", m.as_bytes().len()),
                Incoming::Ping(p) => write!(f, "Ping({} bytes)", p.len()),
                Incoming::Pong => f.write_str("Pong"),
                Incoming::Close(c) => write!(f, "Close({c:?})"),
            }
        }
    }
}
