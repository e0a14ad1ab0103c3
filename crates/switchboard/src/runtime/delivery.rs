//! Messages on their way to connections, and how each connection wants
//! them written.
//!
//! A message sent to IDs or published to a topic is one [`Envelope`]: the
//! sender's payload bytes, who sent it, and the frames made from it. A
//! connection's [`Format`] picks the frame: the payload as it is (the plain
//! relay), as text for people (`/chat`), or wrapped in a `switchboard.v1`
//! envelope with the recipient's inbox sequence number. Each frame shared by
//! several recipients is encoded once per message, when the first of them
//! needs it; a v1 direct message differs per recipient ID (its `seq`), so
//! only its short header is made per ID, and the payload bytes are shared by
//! every frame (see [`WireFrame::enveloped`]).

use std::fmt::Write as _;
use std::sync::OnceLock;

use bytes::Bytes;

use crate::id::{ClientId, Topic};
use crate::protocol::frame::{OpCode, Suffix, WireFrame};

/// How a connection wants messages addressed to it written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Format {
    /// The payload exactly as sent: the plain relay's contract.
    #[default]
    Plain,
    /// Text for people (`/chat`): a payload that is a JSON string is written
    /// as that string's text; any other payload as its JSON text.
    Text,
    /// `switchboard.v1`: `{"type":"msg","seq":…,"from":…,"mid":…,"payload":X}`
    /// for direct messages, `{"type":"pub","topic":…,"from":…,"payload":X}`
    /// for topic messages.
    V1,
}

impl Format {
    pub(crate) fn to_bits(self) -> u8 {
        match self {
            Self::Plain => 0,
            Self::Text => 1,
            Self::V1 => 2,
        }
    }

    pub(crate) fn from_bits(bits: u8) -> Self {
        match bits {
            1 => Self::Text,
            2 => Self::V1,
            _ => Self::Plain,
        }
    }
}

/// One message on its way to its recipients: the payload (shared, never
/// copied per recipient), its sender, and the frames made from it.
#[derive(Debug)]
pub struct Envelope {
    /// The payload bytes: the sender's JSON text, or binary data.
    payload: Bytes,
    binary: bool,
    /// The sender's client ID, when it has one (not for the HTTP API).
    from: Option<ClientId>,
    /// The sender's idempotency key, echoed to recipients.
    mid: Option<Box<str>>,
    /// Set for topic messages.
    topic: Option<Topic>,
    /// The plain frame, made when the envelope is.
    plain: WireFrame,
    text: OnceLock<WireFrame>,
    v1_pub: OnceLock<WireFrame>,
}

impl Envelope {
    /// A message whose payload is JSON text.
    pub fn json(payload: Bytes) -> Self {
        Self::of_frame(WireFrame::text(payload))
    }

    /// A message that is an already encoded frame: delivered as it is to
    /// plain connections (a text frame's payload is taken as JSON by the
    /// other formats).
    pub fn of_frame(frame: WireFrame) -> Self {
        Self {
            payload: frame.body.clone(),
            binary: !frame.is_text(),
            from: None,
            mid: None,
            topic: None,
            plain: frame,
            text: OnceLock::new(),
            v1_pub: OnceLock::new(),
        }
    }

    /// The same message, to be shared on its own (an inbox keeps it): the
    /// payload and the plain frame are shared, the other frames are made
    /// again when needed.
    pub(crate) fn duplicate(&self) -> Self {
        Self {
            payload: self.payload.clone(),
            binary: self.binary,
            from: self.from.clone(),
            mid: self.mid.clone(),
            topic: self.topic.clone(),
            plain: self.plain.clone(),
            text: OnceLock::new(),
            v1_pub: OnceLock::new(),
        }
    }

    /// Sets the sender.
    pub fn from(mut self, sender: Option<ClientId>) -> Self {
        self.from = sender;
        self
    }

    /// Sets the sender's idempotency key.
    pub fn mid(mut self, mid: Option<&str>) -> Self {
        self.mid = mid.map(Box::from);
        self
    }

    /// Marks the message as published to `topic`.
    pub fn on_topic(mut self, topic: Topic) -> Self {
        self.topic = Some(topic);
        self
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Whether the payload is binary.
    pub fn is_binary(&self) -> bool {
        self.binary
    }

    /// The sender, if any.
    pub fn sender(&self) -> Option<&ClientId> {
        self.from.as_ref()
    }

    /// The idempotency key, if any.
    pub fn message_id(&self) -> Option<&str> {
        self.mid.as_deref()
    }

    /// The topic of a topic message.
    pub fn topic(&self) -> Option<&Topic> {
        self.topic.as_ref()
    }

    /// The frame of the plain relay: the payload as sent.
    pub fn plain(&self) -> &WireFrame {
        &self.plain
    }

    /// The frame for a connection of `format`, for a message sent to an ID
    /// with inbox sequence number `seq` (`None`: not retained, or a topic
    /// message). A v1 direct frame is made per call: callers delivering to
    /// several connections of one ID keep the first (see
    /// [`ConnRef::deliver`](super::mailbox::ConnRef::deliver)).
    pub(crate) fn frame_for(&self, format: Format, seq: Option<u64>) -> WireFrame {
        match format {
            Format::Plain => self.plain.clone(),
            Format::Text => self.text.get_or_init(|| self.text_frame()).clone(),
            Format::V1 => match &self.topic {
                Some(_) => self.v1_pub.get_or_init(|| self.v1_frame(None)).clone(),
                None => self.v1_frame(seq),
            },
        }
    }

    /// `/chat`'s view: a JSON string becomes its text — without a copy when
    /// it has no escapes, as the body between the quotes — and anything else
    /// stays as it is.
    fn text_frame(&self) -> WireFrame {
        if self.binary {
            return self.plain.clone();
        }
        let p = &self.payload;
        if p.len() >= 2 && p[0] == b'"' && p[p.len() - 1] == b'"' {
            if !p.contains(&b'\\') {
                return WireFrame::text(p.slice(1..p.len() - 1));
            }
            if let Ok(text) = serde_json::from_slice::<String>(p) {
                return WireFrame::text(Bytes::from(text));
            }
        }
        self.plain.clone()
    }

    /// A `switchboard.v1` frame: the header is built here, the payload
    /// shared. v1 is a JSON protocol: a binary payload (possible only from
    /// library code) is announced as `"binary":true,"payload":null` rather
    /// than re-encoded.
    fn v1_frame(&self, seq: Option<u64>) -> WireFrame {
        // Built in the thread's scratch string and copied out once: this
        // runs per recipient ID of every direct message (callgrind, relay
        // over v1: with a `String` of its own turned into `Bytes`, two
        // allocations, and `write!` for the seq, ~550 instructions per
        // message; ~410 so).
        let head = scratch_bytes(|head| {
            match &self.topic {
                Some(topic) => {
                    head.push_str(r#"{"type":"pub","topic":"#);
                    push_json_str(head, topic.as_str());
                }
                None => {
                    head.push_str(r#"{"type":"msg","seq":"#);
                    match seq {
                        Some(seq) => push_u64(head, seq),
                        None => head.push_str("null"),
                    }
                }
            }
            if let Some(from) = &self.from {
                head.push_str(r#","from":"#);
                push_json_str(head, from.as_str());
            }
            if let Some(mid) = &self.mid {
                head.push_str(r#","mid":"#);
                push_json_str(head, mid);
            }
            if self.binary {
                head.push_str(r#","binary":true,"payload":null}"#);
            } else {
                head.push_str(r#","payload":"#);
            }
        });
        if self.binary {
            return WireFrame::new(OpCode::Text, head);
        }
        WireFrame::enveloped(head, self.payload.clone(), Suffix::CloseBrace)
    }
}

/// Ranges a gap report lists before it widens the last one.
const MAX_GAP_RANGES: usize = 16;

/// What a `switchboard.v1` connection lost to the drop-oldest policy since
/// it was last told: sent as one `gap` frame before its next message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Gap {
    /// Inbox seqs dropped, as ascending inclusive ranges.
    ranges: Vec<(u64, u64)>,
    /// More ranges than `MAX_GAP_RANGES`: the last one was widened.
    truncated: bool,
    /// Topic messages dropped, per topic.
    topics: Vec<(Topic, u64)>,
    /// Every frame dropped.
    frames: u64,
}

impl Gap {
    /// Counts one dropped message.
    pub(crate) fn add(&mut self, tag: super::mailbox::Tag) {
        self.frames += 1;
        match tag {
            super::mailbox::Tag::Seq(seq) => self.add_seq(seq),
            super::mailbox::Tag::Topic(topic) => {
                match self.topics.iter_mut().find(|(t, _)| *t == topic) {
                    Some((_, n)) => *n += 1,
                    None => self.topics.push((topic, 1)),
                }
            }
        }
    }

    /// Counts one dropped frame that was neither (library code's frames).
    pub(crate) fn add_untagged(&mut self) {
        self.frames += 1;
    }

    fn add_seq(&mut self, seq: u64) {
        // Drops take the oldest first, so seqs arrive ascending and extend
        // the last range; a seq out of order (a replay racing live
        // messages) is merged where it belongs.
        let full = self.ranges.len() >= MAX_GAP_RANGES;
        match self.ranges.last_mut() {
            Some(last) if seq == last.1 + 1 => last.1 = seq,
            Some(last) if (last.0..=last.1).contains(&seq) => {}
            Some(last) if seq > last.1 && full => {
                last.1 = seq;
                self.truncated = true;
            }
            _ => {
                self.ranges.push((seq, seq));
                self.ranges.sort_unstable();
                self.merge();
            }
        }
    }

    fn merge(&mut self) {
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.ranges.len());
        for &(a, b) in &self.ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        if merged.len() > MAX_GAP_RANGES {
            let end = merged[merged.len() - 1].1;
            merged.truncate(MAX_GAP_RANGES);
            merged[MAX_GAP_RANGES - 1].1 = end;
            self.truncated = true;
        }
        self.ranges = merged;
    }

    /// The `gap` frame (docs/protocol-v1.md, "Slow consumers and gaps").
    pub(crate) fn frame(&self) -> WireFrame {
        let mut out = String::with_capacity(96);
        out.push_str(r#"{"type":"gap","reason":"slow_consumer","ranges":["#);
        for (i, (a, b)) in self.ranges.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "[{a},{b}]");
        }
        out.push(']');
        if self.truncated {
            out.push_str(r#","ranges_truncated":true"#);
        }
        out.push_str(r#","topics":{"#);
        for (i, (topic, n)) in self.topics.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_str(&mut out, topic.as_str());
            let _ = write!(out, ":{n}");
        }
        let _ = write!(out, r#"}},"frames":{}}}"#, self.frames);
        WireFrame::text(Bytes::from(out))
    }
}

/// The largest `switchboard.v1` request id: the largest integer a
/// JavaScript number holds exactly (2^53 − 1), so browsers can use any id
/// they can count to.
pub(crate) const MAX_REQUEST_ID: u64 = (1 << 53) - 1;

/// The request id of a v1 frame that was not handled (a message over the
/// rate limit), so its refusal can be tied to it; `None` when it has none
/// or the frame is not a JSON object with a usable one.
pub(crate) fn v1_request_id(input: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct OnlyId<'a> {
        #[serde(borrow, default)]
        id: Option<&'a serde_json::value::RawValue>,
    }
    let fields: OnlyId<'_> = serde_json::from_slice(input).ok()?;
    serde_json::from_str::<u64>(fields.id?.get())
        .ok()
        .filter(|&id| id <= MAX_REQUEST_ID)
}

/// A v1 error: `{"type":"ack","id":N,"error":{…}}` for a request with an
/// id, `{"type":"error","error":{…}}` for one without.
pub(crate) fn v1_error(id: Option<u64>, code: &str, message: &str, temporary: bool) -> String {
    let mut out = String::with_capacity(96 + message.len());
    match id {
        Some(id) => {
            let _ = write!(out, r#"{{"type":"ack","id":{id},"error":{{"code":"#);
        }
        None => out.push_str(r#"{"type":"error","error":{"code":"#),
    }
    push_json_str(&mut out, code);
    out.push_str(r#","message":"#);
    push_json_str(&mut out, message);
    let _ = write!(out, r#","temporary":{temporary}}}}}"#);
    out
}

/// Appends `n` in decimal, without `fmt`'s machinery: acks and envelopes
/// write a few numbers per message (callgrind: ~190 instructions each with
/// a digit loop and a UTF-8 check; `itoa`'s two digits at a time, inlined,
/// no longer shows in the profile).
pub(crate) fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// The longest text [`scratch_bytes`] keeps its thread's buffer for; a
/// longer one (an ack listing thousands of targets) gives it back.
const SCRATCH_KEEP: usize = 4096;

thread_local! {
    static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Text that `build` writes, as `Bytes` made with one allocation of the
/// exact size: `build` writes into a buffer this thread reuses, which is
/// then copied out. A `String` of its own turned into `Bytes` costs two
/// allocations (its buffer, and a shared header, because its capacity
/// rarely equals its length) — per ack and per v1 envelope.
pub(crate) fn scratch_bytes(build: impl FnOnce(&mut String)) -> Bytes {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            scratch.clear();
            build(&mut scratch);
            let bytes = Bytes::copy_from_slice(scratch.as_bytes());
            if scratch.capacity() > SCRATCH_KEEP {
                *scratch = String::new();
            }
            bytes
        }
        // Only if `build` itself asked for scratch text: not done, but
        // never a panic.
        Err(_) => {
            let mut own = String::new();
            build(&mut own);
            Bytes::from(own)
        }
    })
}

/// Appends `s` as a JSON string. Client IDs, topics and message ids are
/// plain ASCII by construction, so the escaping path is for safety only.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::from(s).to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(frame: &WireFrame) -> String {
        let mut out = Vec::new();
        for part in &frame.parts()[1..] {
            out.extend_from_slice(part);
        }
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn each_format_renders_the_same_payload() {
        let env = Envelope::json(Bytes::from_static(br#"{"a":[1,2]}"#))
            .from(Some(ClientId::new("alice").expect("id")))
            .mid(Some("m-1"));
        assert_eq!(
            text(&env.frame_for(Format::Plain, Some(3))),
            r#"{"a":[1,2]}"#
        );
        assert_eq!(text(&env.frame_for(Format::Text, None)), r#"{"a":[1,2]}"#);
        let v1 = env.frame_for(Format::V1, Some(3));
        assert_eq!(
            text(&v1),
            r#"{"type":"msg","seq":3,"from":"alice","mid":"m-1","payload":{"a":[1,2]}}"#
        );
        // The payload bytes are shared, not copied.
        assert_eq!(v1.body.as_ptr(), env.payload().as_ptr());
        let parsed: serde_json::Value = serde_json::from_str(&text(&v1)).expect("JSON");
        assert_eq!(parsed["payload"]["a"][1], 2);
    }

    #[test]
    fn topic_messages_are_pub_frames() {
        let env =
            Envelope::json(Bytes::from_static(b"7")).on_topic(Topic::new("room/1").expect("topic"));
        assert_eq!(
            text(&env.frame_for(Format::V1, None)),
            r#"{"type":"pub","topic":"room/1","payload":7}"#
        );
    }

    #[test]
    fn gaps_list_dropped_seqs_as_ranges_and_topics_as_counts() {
        use crate::runtime::mailbox::Tag;
        let mut gap = Gap::default();
        for seq in [1040, 1041, 1042, 1050] {
            gap.add(Tag::Seq(seq));
        }
        let room = Topic::new("room/42").expect("topic");
        gap.add(Tag::Topic(room.clone()));
        gap.add(Tag::Topic(room));
        gap.add_untagged();
        assert_eq!(
            text(&gap.frame()),
            r#"{"type":"gap","reason":"slow_consumer","ranges":[[1040,1042],[1050,1050]],"topics":{"room/42":2},"frames":7}"#
        );
        let mut many = Gap::default();
        for i in 0..40 {
            many.add(Tag::Seq(i * 10));
        }
        let json: serde_json::Value = serde_json::from_str(&text(&many.frame())).expect("JSON");
        assert_eq!(json["ranges"].as_array().map(Vec::len), Some(16));
        assert_eq!(json["ranges"][15][1], 390);
        assert_eq!(json["ranges_truncated"], true);
    }

    #[test]
    fn v1_errors_carry_the_request_id_when_there_is_one() {
        assert_eq!(
            v1_request_id(br#"{"type":"send","id":42,"targets":[1]}"#),
            Some(42)
        );
        assert_eq!(v1_request_id(br#"{"type":"send"}"#), None);
        assert_eq!(v1_request_id(b"not json"), None);
        let with: serde_json::Value =
            serde_json::from_str(&v1_error(Some(7), "rate_limited", "slow \"down\"", true))
                .expect("JSON");
        assert_eq!(with["type"], "ack");
        assert_eq!(with["id"], 7);
        assert_eq!(with["error"]["message"], "slow \"down\"");
        assert_eq!(with["error"]["temporary"], true);
        let without: serde_json::Value =
            serde_json::from_str(&v1_error(None, "x", "y", false)).expect("JSON");
        assert_eq!(without["type"], "error");
    }

    #[test]
    fn text_unwraps_json_strings() {
        let plain = Envelope::json(Bytes::from_static(br#""hello""#));
        let frame = plain.frame_for(Format::Text, None);
        assert_eq!(text(&frame), "hello");
        assert_eq!(frame.body.as_ptr(), plain.payload()[1..].as_ptr());
        let escaped = Envelope::json(Bytes::from_static(br#""say \"hi\"\n""#));
        assert_eq!(text(&escaped.frame_for(Format::Text, None)), "say \"hi\"\n");
        let number = Envelope::json(Bytes::from_static(b"42"));
        assert_eq!(text(&number.frame_for(Format::Text, None)), "42");
    }
}
