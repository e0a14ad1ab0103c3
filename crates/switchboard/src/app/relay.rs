//! The relay wire protocol: what a client on `/ws?id=N` and the backend on
//! `/api/send` write, and the errors they get back.
//!
//! ```text
//! {"targets":[2,"alice"],"payload":X}        → the JSON text of X, to every connection of 2 and alice
//! {"type":"subscribe","topic":"news"}        → {"subscribed":"news"}
//! {"type":"unsubscribe","topic":"news"}      → {"unsubscribed":"news"}
//! {"type":"publish","topic":"news","payload":X} → the JSON text of X, to every subscriber of news
//! ```
//!
//! The payload is forwarded as the exact JSON text the sender wrote
//! (serde_json's `RawValue`): never re-serialized, encoded into one frame
//! shared by every recipient. Unknown fields are ignored, so clients can
//! add their own.

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use smallvec::SmallVec;

use crate::backend::{SendReport, TargetOutcomes};
use crate::id::{ClientId, Digits, NameError, Topic};
use crate::runtime::delivery::{push_json_str, push_u64};

#[cfg(test)]
mod differential;
pub(crate) mod fast;

/// A relay or API request that could not be used: a stable `code` and a
/// message that names what to fix. Sent to a WebSocket client as the text
/// frame `{"error":{"code":…,"message":…}}`, and to an API caller as HTTP
/// 400 with the same body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// A stable code, e.g. `"missing_targets"`.
    pub code: &'static str,
    /// What was wrong, for people.
    pub message: Cow<'static, str>,
    /// Retrying the same request later may succeed (`switchboard.v1`
    /// errors say so; the plain relay's error frames do not).
    pub temporary: bool,
}

impl RequestError {
    pub(crate) fn new(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            temporary: false,
        }
    }

    /// Marks the error as temporary.
    pub(crate) fn temporary(mut self) -> Self {
        self.temporary = true;
        self
    }

    /// The JSON error body.
    pub fn to_json(&self) -> String {
        serde_json::json!({"error": {"code": self.code, "message": self.message}}).to_string()
    }
}

/// How a target was written, so reports can echo it the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    Unsigned(u64),
    Signed(i64),
    String,
}

/// A target ID as a parse keeps it: a [`ClientId`], for callers that keep
/// the targets (`/api/send`, `switchboard.v1`, a backend that waits), or a
/// [`TargetName`], which the plain relay looks up at once without an
/// allocation.
pub(crate) trait TargetId<'de>: Clone + Eq + Hash + Sized {
    /// The ID a target written as a non-negative integer names.
    fn unsigned(n: u64) -> Self;
    /// The ID a negative integer names.
    fn signed(n: i64) -> Self;
    /// The ID a string names, checked.
    fn name(name: Cow<'de, str>) -> Result<Self, NameError>;
    /// The ID's text.
    fn text(&self) -> &str;
}

impl TargetId<'_> for ClientId {
    fn unsigned(n: u64) -> Self {
        Self::from(n)
    }
    fn signed(n: i64) -> Self {
        Self::from(n)
    }
    fn name(name: Cow<'_, str>) -> Result<Self, NameError> {
        Self::new(&name)
    }
    fn text(&self) -> &str {
        self.as_str()
    }
}

/// A checked client ID as the relay's hot path reads it from a frame:
/// borrowed from the frame, or a number's digits inline. Why: a
/// [`ClientId`] is an `Arc<str>`, one allocation per target per message
/// (heaptrack on `tests/allocations.rs`), while the in-memory backend finds
/// a connection by the ID's text alone.
#[derive(Clone)]
pub(crate) enum TargetName<'a> {
    /// A string target without escapes, as written.
    Text(&'a str),
    /// An integer target's decimal text.
    Number(Digits),
    /// A string target with escapes, decoded (rare: IDs are ASCII).
    Decoded(ClientId),
}

impl TargetName<'_> {
    /// The ID to keep, for a path that cannot deliver at once.
    pub(crate) fn to_client_id(&self) -> ClientId {
        match self {
            Self::Decoded(id) => id.clone(),
            other => ClientId::from_checked(other.text()),
        }
    }
}

impl<'de> TargetId<'de> for TargetName<'de> {
    fn unsigned(n: u64) -> Self {
        Self::Number(Digits::unsigned(n))
    }
    fn signed(n: i64) -> Self {
        Self::Number(Digits::signed(n))
    }
    fn name(name: Cow<'de, str>) -> Result<Self, NameError> {
        match name {
            Cow::Borrowed(text) => ClientId::check(text).map(|()| Self::Text(text)),
            Cow::Owned(text) => ClientId::new(&text).map(Self::Decoded),
        }
    }
    fn text(&self) -> &str {
        match self {
            Self::Text(text) => text,
            Self::Number(digits) => digits.as_str(),
            Self::Decoded(id) => id.as_str(),
        }
    }
}

/// Compared and hashed as their text, like [`ClientId`]s: `1` and `"1"`
/// name one ID.
impl PartialEq for TargetName<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.text() == other.text()
    }
}

impl Eq for TargetName<'_> {}

impl Hash for TargetName<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.text().hash(state);
    }
}

impl fmt::Debug for TargetName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.text(), f)
    }
}

impl fmt::Display for TargetName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// Targets held inline: a relay message names a handful, so the lists
/// need no allocation (a fan-out to thousands spills to the heap).
const INLINE_TARGETS: usize = 4;

/// The parsed targets: each ID once (who gets the message), and every
/// target as it was listed (what a report echoes).
#[derive(Debug)]
pub(crate) struct Targets<T = ClientId> {
    /// Each ID once, in the order first listed: the message goes to each
    /// once, however often and however it was spelled (`1` and `"1"`).
    pub(crate) ids: SmallVec<[T; INLINE_TARGETS]>,
    /// Every element of `targets`, in order: how it was written and which
    /// of `ids` it names.
    listed: SmallVec<[(Written, usize); INLINE_TARGETS]>,
}

impl<T> Default for Targets<T> {
    fn default() -> Self {
        Self {
            ids: SmallVec::new(),
            listed: SmallVec::new(),
        }
    }
}

impl Targets<TargetName<'_>> {
    /// The IDs to keep, for a path that cannot deliver at once.
    pub(crate) fn client_ids(&self) -> Vec<ClientId> {
        self.ids.iter().map(TargetName::to_client_id).collect()
    }

    /// The IDs' texts, to look them up at once.
    pub(crate) fn names(&self) -> SmallVec<[&str; INLINE_TARGETS]> {
        self.ids.iter().map(TargetName::text).collect()
    }
}

impl<'de, T: TargetId<'de>> Targets<T> {
    /// Every listed target, in the order written: the index into
    /// [`ids`](Self::ids) of the ID it names, and the target as the client
    /// wrote it (integer or string), for reports.
    #[cfg(test)]
    pub(crate) fn listed(&self) -> impl Iterator<Item = (usize, serde_json::Value)> + '_ {
        self.listed.iter().map(|&(written, id)| {
            let json = match written {
                Written::Unsigned(n) => n.into(),
                Written::Signed(n) => n.into(),
                Written::String => self.ids[id].text().into(),
            };
            (id, json)
        })
    }

    /// The lists of a send's report, every target as the caller wrote it,
    /// in the order written, in the list of its ID's outcome, as JSON object
    /// members in key order: `"delivered":[…],"dropped":[…],"offline":[…]`,
    /// then `"retained"` and `"unconfirmed"` when not empty. `["1",1,"x"]`
    /// reports `"1"` and `1` both delivered, though client 1 got the message
    /// once. An ID the backend did not report (it always should) is not
    /// claimed delivered or offline: unconfirmed.
    pub(crate) fn report_lists(&self, report: &SendReport) -> String {
        let mut out = String::with_capacity(48 + 8 * self.listed.len());
        self.write_report_lists(report, &mut out);
        out
    }

    /// [`report_lists`](Self::report_lists), appended to `out` (a v1 ack
    /// writes them straight into its frame).
    pub(crate) fn write_report_lists(&self, report: &SendReport, out: &mut String) {
        self.write_outcome_lists(&TargetOutcomes::from_report(report, self.ids.len()), out);
    }

    /// [`report_lists`](Self::report_lists) from each ID's outcome, as a
    /// backend that delivers at once reports it.
    pub(crate) fn outcome_lists(&self, outcomes: &TargetOutcomes) -> String {
        let mut out = String::with_capacity(48 + 8 * self.listed.len());
        self.write_outcome_lists(outcomes, &mut out);
        out
    }

    /// [`outcome_lists`](Self::outcome_lists), appended to `out`. Written
    /// by hand from one byte of state per ID: a v1 relay sends one ack per
    /// message, and building each target as a `serde_json::Value` cost
    /// ~3,200 instructions per single-target ack (callgrind), over a third
    /// of what a v1 message cost beyond a plain one; ~620 so.
    pub(crate) fn write_outcome_lists(&self, outcomes: &TargetOutcomes, out: &mut String) {
        use crate::backend::TargetOutcome::{Delivered, Dropped, Offline, Unconfirmed};
        // Each list: its opening (the first, always written, without a
        // comma), which IDs are its members, and whether an empty one is
        // written (as its opening and `]`).
        let member = |list: usize, id: usize| match list {
            0 => outcomes.outcome(id) == Delivered,
            1 => outcomes.outcome(id) == Dropped,
            2 => outcomes.outcome(id) == Offline,
            3 => outcomes.retained(id),
            _ => outcomes.outcome(id) == Unconfirmed,
        };
        // A list known to be empty is written (or skipped) without a pass
        // over the targets: most acks have one or two non-empty lists.
        for (list, (open, always, count)) in [
            ("\"delivered\":[", true, outcomes.delivered()),
            (",\"dropped\":[", true, outcomes.dropped()),
            (",\"offline\":[", true, outcomes.offline()),
            (",\"retained\":[", false, outcomes.retained_count()),
            (",\"unconfirmed\":[", false, outcomes.unconfirmed()),
        ]
        .into_iter()
        .enumerate()
        {
            if count == 0 {
                if always {
                    out.push_str(open);
                    out.push(']');
                }
                continue;
            }
            let mut members = 0;
            for &(written, id) in &self.listed {
                if !member(list, id) {
                    continue;
                }
                out.push_str(if members == 0 { open } else { "," });
                members += 1;
                match written {
                    Written::Unsigned(n) => push_u64(out, n),
                    Written::Signed(n) => {
                        if n < 0 {
                            out.push('-');
                        }
                        push_u64(out, n.unsigned_abs());
                    }
                    Written::String => push_json_str(out, self.ids[id].text()),
                }
            }
            if members > 0 || always {
                if members == 0 {
                    out.push_str(open);
                }
                out.push(']');
            }
        }
    }

    /// The position in `targets` of the first listing of each ID, for
    /// messages that name `targets[i]`.
    pub(crate) fn position_of(&self, id: usize) -> usize {
        self.listed
            .iter()
            .position(|&(_, listed)| listed == id)
            .unwrap_or(id)
    }
}

/// One parsed relay frame.
///
/// A send's targets are inline (about 240 B): the request lives on the
/// stack for one message, and boxing it would be the allocation the
/// inline lists avoid. A `payload` is the exact JSON text the sender wrote
/// (checked to be valid JSON, without whitespace around it).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Request<'a> {
    Send {
        targets: Targets<TargetName<'a>>,
        payload: &'a str,
    },
    Subscribe(Topic),
    Unsubscribe(Topic),
    Publish {
        topic: Topic,
        payload: &'a str,
    },
}

/// The top-level fields. `None` means absent; a JSON `null` is present
/// (`Some("null")`): `"payload": null` is a payload like any other, and
/// `"targets": null` is a wrong type, not a missing field.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    targets: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    topic: Option<&'a RawValue>,
}

/// A field that is there, whatever its value (serde's `Option` would read
/// `null` as absent).
pub(crate) fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// Parses a relay frame; `max_targets` bounds the target list.
pub(crate) fn parse(input: &[u8], max_targets: usize) -> Result<Request<'_>, RequestError> {
    parse_fields(fields(input)?, max_targets)
}

/// [`parse`] for a text frame, whose UTF-8 the reader has checked: read as
/// a `&str`, serde_json does not check it again (callgrind: `from_utf8`
/// was 5.7% of the relay's instructions, about 540 per message).
///
/// A send or publish is read first by the relay's own scanner ([`fast`]),
/// in one pass; anything it does not accept — every bad frame, and the
/// rare shapes it leaves out — is read again by serde_json
/// ([`parse_text_serde`]), whose answer (a request or an error) is the one
/// given. The two agree on every frame the scanner accepts
/// (`tests::the_scanner_agrees_with_serde_json`).
pub(crate) fn parse_text(input: &str, max_targets: usize) -> Result<Request<'_>, RequestError> {
    match fast::parse(input, max_targets) {
        Some(request) => Ok(request),
        None => parse_text_serde(input, max_targets),
    }
}

/// [`parse_text`] through serde_json only.
pub(crate) fn parse_text_serde(
    input: &str,
    max_targets: usize,
) -> Result<Request<'_>, RequestError> {
    let fields = object_str(input)?;
    parse_fields(fields, max_targets)
}

fn parse_fields(fields: Fields<'_>, max_targets: usize) -> Result<Request<'_>, RequestError> {
    let kind = match fields.kind {
        None => None,
        Some(raw) => Some(serde_json::from_str::<Cow<'_, str>>(raw.get()).map_err(|_| {
            RequestError::new(
                "invalid_type",
                "`type` must be a string: \"send\", \"subscribe\", \"unsubscribe\" or \"publish\"",
            )
        })?),
    };
    match kind.as_deref() {
        None | Some("send") => Ok(Request::Send {
            targets: parse_targets(fields.targets, max_targets)?,
            payload: require_payload(fields.payload)?.get(),
        }),
        Some("subscribe") => Ok(Request::Subscribe(parse_topic(fields.topic)?)),
        Some("unsubscribe") => Ok(Request::Unsubscribe(parse_topic(fields.topic)?)),
        Some("publish") => Ok(Request::Publish {
            topic: parse_topic(fields.topic)?,
            payload: require_payload(fields.payload)?.get(),
        }),
        Some(other) => Err(RequestError::new(
            "unknown_type",
            format!(
                "unknown `type` {:?}: use \"send\", \"subscribe\", \"unsubscribe\" or \"publish\"",
                truncate(other)
            ),
        )),
    }
}

/// Parses a `/api/publish` body: `{"topic":…,"payload":…}`.
pub(crate) fn parse_publish(input: &[u8]) -> Result<(Topic, &RawValue), RequestError> {
    let fields = fields(input)?;
    Ok((parse_topic(fields.topic)?, require_payload(fields.payload)?))
}

/// Parses a `/api/send` body: `{"targets":[…],"payload":…}`.
pub(crate) fn parse_send(
    input: &[u8],
    max_targets: usize,
) -> Result<(Targets, &RawValue), RequestError> {
    let fields = fields(input)?;
    Ok((
        parse_targets(fields.targets, max_targets)?,
        require_payload(fields.payload)?,
    ))
}

fn fields(input: &[u8]) -> Result<Fields<'_>, RequestError> {
    object(input)
}

/// Parses a top-level JSON object into `T`. serde's derived structs also
/// accept a JSON array (as a tuple of fields), so anything not starting
/// with `{` is refused first.
pub(crate) fn object<'a, T: Deserialize<'a>>(input: &'a [u8]) -> Result<T, RequestError> {
    starts_an_object(input)?;
    serde_json::from_slice(input).map_err(|err| classify(input, &err))
}

/// [`object`] for text known to be UTF-8 (a text frame): serde_json then
/// does not check each string and raw value for UTF-8 again (callgrind:
/// ~600 instructions less per switchboard.v1 send).
pub(crate) fn object_str<'a, T: Deserialize<'a>>(input: &'a str) -> Result<T, RequestError> {
    starts_an_object(input.as_bytes())?;
    serde_json::from_str(input).map_err(|err| classify(input.as_bytes(), &err))
}

fn starts_an_object(input: &[u8]) -> Result<(), RequestError> {
    let first = input.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        return Ok(());
    }
    Err(match serde_json::from_slice::<&RawValue>(input) {
        Ok(_) => not_an_object(),
        Err(err) => invalid_json(&err),
    })
}

fn not_an_object() -> RequestError {
    RequestError::new(
        "not_an_object",
        "the message must be a JSON object like {\"targets\":[2,3],\"payload\":…}",
    )
}

fn invalid_json(err: &serde_json::Error) -> RequestError {
    RequestError::new(
        "invalid_json",
        format!("the message is not valid JSON ({err}): send {{\"targets\":[…],\"payload\":…}}"),
    )
}

/// Names a parse failure of an object: broken JSON, or valid JSON with a
/// problem inside (a duplicate field). The fast path parses once; only a
/// failure pays for this second look.
fn classify(input: &[u8], err: &serde_json::Error) -> RequestError {
    match serde_json::from_slice::<&RawValue>(input) {
        Err(_) => invalid_json(err),
        Ok(_) => RequestError::new("invalid_json", format!("invalid message: {err}")),
    }
}

pub(crate) fn require_payload(payload: Option<&RawValue>) -> Result<&RawValue, RequestError> {
    payload.ok_or_else(|| {
        RequestError::new(
            "missing_payload",
            "`payload` is missing: add \"payload\": <any JSON value>",
        )
    })
}

pub(crate) fn parse_topic(topic: Option<&RawValue>) -> Result<Topic, RequestError> {
    let raw = topic.ok_or_else(|| {
        RequestError::new(
            "missing_topic",
            "`topic` is missing: add \"topic\": \"<name>\"",
        )
    })?;
    let name: Cow<'_, str> = serde_json::from_str(raw.get())
        .map_err(|_| RequestError::new("invalid_topic", "`topic` must be a string"))?;
    Topic::new(&name).map_err(|e| RequestError::new("invalid_topic", e.to_string()))
}

pub(crate) fn parse_targets<'a, T: TargetId<'a>>(
    raw: Option<&'a RawValue>,
    max: usize,
) -> Result<Targets<T>, RequestError> {
    let raw = raw.ok_or_else(|| {
        RequestError::new(
            "missing_targets",
            "`targets` is missing: add \"targets\": [<client id>, …]",
        )
    })?;
    if !raw.get().starts_with('[') {
        return Err(RequestError::new(
            "invalid_targets",
            "`targets` must be an array of client ids (integers or strings)",
        ));
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let visitor = TargetsVisitor {
        max,
        ids: PhantomData,
    };
    let parsed = de.deserialize_seq(visitor).map_err(|e| {
        // Our visitor's messages are complete sentences; drop serde's
        // position suffix, which points into the array, not the message.
        let text = e.to_string();
        let text = text.split(" at line ").next().unwrap_or(&text).to_owned();
        if text.starts_with("too many") {
            RequestError::new("too_many_targets", text)
        } else {
            RequestError::new("invalid_target", text)
        }
    })?;
    Ok(parsed)
}

/// `targets` read where it stands by a caller's own deserializer (the
/// switchboard.v1 `send` fast path), with [`parse_targets`]' checks; its
/// errors are serde's, so the caller falls back to [`parse_targets`] for
/// the message.
pub(crate) struct TargetsSeed<T> {
    pub(crate) max: usize,
    pub(crate) ids: PhantomData<T>,
}

impl<'de, T: TargetId<'de>> de::DeserializeSeed<'de> for TargetsSeed<T> {
    type Value = Targets<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Targets<T>, D::Error> {
        d.deserialize_seq(TargetsVisitor::<T> {
            max: self.max,
            ids: PhantomData,
        })
    }
}

struct TargetsVisitor<T> {
    max: usize,
    ids: PhantomData<T>,
}

impl<'de, T: TargetId<'de>> Visitor<'de> for TargetsVisitor<T> {
    type Value = Targets<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of client ids")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Targets<T>, A::Error> {
        let mut out = TargetsBuilder::new(self.max);
        let mut index = 0usize;
        while let Some(target) = seq.next_element::<Target<'de>>().map_err(|e| {
            de::Error::custom(format!(
                "targets[{index}] must be a client id (an integer or a string): {e}"
            ))
        })? {
            let (id, written) = match target {
                Target::Unsigned(n) => (T::unsigned(n), Written::Unsigned(n)),
                Target::Signed(n) => (T::signed(n), Written::Signed(n)),
                Target::Name(s) => (
                    T::name(s).map_err(|e| de::Error::custom(format!("targets[{index}]: {e}")))?,
                    Written::String,
                ),
                Target::Float(n) => return Err(de::Error::custom(not_an_id_number(index, n))),
            };
            index += 1;
            out.push(id, written).map_err(|TooManyTargets| {
                de::Error::custom(format!(
                    "too many targets: the limit is {} (limits.max_targets)",
                    self.max
                ))
            })?;
        }
        Ok(out.targets)
    }
}

/// More distinct targets than `limits.max_targets`.
pub(crate) struct TooManyTargets;

/// Builds [`Targets`] one listed target at a time: the serde visitor and
/// the relay's own scanner ([`fast`]) share it, so both deduplicate alike.
pub(crate) struct TargetsBuilder<T> {
    pub(crate) targets: Targets<T>,
    max: usize,
    /// The IDs' positions, once there are too many for a linear scan.
    seen: std::collections::HashMap<T, usize>,
    /// How many targets the list is expected to hold, to size the lists
    /// and the map once.
    expected: usize,
}

impl<T: Clone + Eq + Hash> TargetsBuilder<T> {
    pub(crate) fn new(max: usize) -> Self {
        Self::expecting(max, 0)
    }

    /// A builder for a list of about `expected` targets (a hint: more or
    /// fewer work too). Why: a fan-out's list grew its two lists and its
    /// map a dozen times, and each growth of the map hashed every ID
    /// again; with 2,000 targets each ID was hashed ~3.8 times
    /// (callgrind).
    pub(crate) fn expecting(max: usize, expected: usize) -> Self {
        let expected = expected.min(max.saturating_add(1));
        let mut targets = Targets::default();
        if expected > INLINE_TARGETS {
            targets.ids.reserve_exact(expected);
            targets.listed.reserve_exact(expected);
        }
        Self {
            targets,
            max,
            seen: std::collections::HashMap::new(),
            expected,
        }
    }

    /// Adds the next listed target.
    pub(crate) fn push(&mut self, id: T, written: Written) -> Result<(), TooManyTargets> {
        let out = &mut self.targets;
        // Each ID gets a message once, however often it is listed; a
        // repeat is only remembered for the report. A linear scan is
        // fastest for the usual handful of targets; a fan-out to
        // thousands switches to a map (a scan would cost n²/2
        // comparisons: 2 million for 2,000 targets).
        let known = if out.ids.len() < 16 {
            out.ids.iter().position(|known| *known == id)
        } else {
            if self.seen.is_empty() {
                self.seen.reserve(self.expected.max(2 * out.ids.len()));
                self.seen.extend(out.ids.iter().cloned().zip(0..));
            }
            self.seen.get(&id).copied()
        };
        if let Some(at) = known {
            out.listed.push((written, at));
            return Ok(());
        }
        if out.ids.len() == self.max {
            return Err(TooManyTargets);
        }
        if !self.seen.is_empty() {
            self.seen.insert(id.clone(), out.ids.len());
        }
        out.listed.push((written, out.ids.len()));
        out.ids.push(id);
        Ok(())
    }
}

enum Target<'a> {
    Unsigned(u64),
    Signed(i64),
    Name(Cow<'a, str>),
    /// A number that is neither a `u64` nor an `i64`: written with a
    /// fraction or an exponent, or an integer beyond 64 bits (serde_json
    /// reads those as `f64`). Refused by the caller, who knows its index.
    Float(f64),
}

/// The message for a target number that is not a 64-bit integer.
///
/// Why not serde's own: an integer beyond 64 bits reaches the visitor as
/// an `f64`, so serde would describe `123456789012345678901234567890` as
/// "floating point `1.2345678901234568e29`" — true of the parser, not of
/// what the client wrote.
fn not_an_id_number(index: usize, n: f64) -> String {
    // 2^64 and -2^63, exactly representable as f64. An integer literal
    // just below i64::MIN rounds to -2^63 itself, hence `<=`: i64::MIN
    // written as an integer never gets here (it is an i64).
    const ABOVE_U64: f64 = 18_446_744_073_709_551_616.0;
    const I64_MIN: f64 = -9_223_372_036_854_775_808.0;
    if n >= ABOVE_U64 || n <= I64_MIN {
        format!(
            "targets[{index}] is an integer out of range: client ids written as numbers must fit in 64 bits ({} to {}); write large ids as strings",
            i64::MIN,
            u64::MAX
        )
    } else {
        format!(
            "targets[{index}] is not an integer ({n}): client ids written as numbers are whole numbers without a fraction or exponent, such as 42; write other ids as strings"
        )
    }
}

impl<'de> Deserialize<'de> for Target<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Target<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Target<'de>, E> {
                Ok(Target::Unsigned(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Target<'de>, E> {
                Ok(Target::Signed(n))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Target<'de>, E> {
                Ok(Target::Float(n))
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Target<'de>, E> {
                Ok(Target::Name(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Target<'de>, E> {
                Ok(Target::Name(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_any(V)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error code of a bad frame, the same as a text frame (through
    /// the relay's scanner) and as bytes (serde_json only).
    fn code(input: &str) -> &'static str {
        let err = parse(input.as_bytes(), 10).expect_err(input);
        assert_eq!(parse_text(input, 10).expect_err(input), err, "{input}");
        err.code
    }

    #[test]
    fn parses_the_plain_relay_frame() {
        let Ok(Request::Send { targets, payload }) = parse(
            br#"{"targets":[2,"alice",2,-3],"payload":{"a": [1, 2]}}"#,
            10,
        ) else {
            panic!("expected a send");
        };
        let ids: Vec<&str> = targets.ids.iter().map(TargetId::text).collect();
        assert_eq!(ids, ["2", "alice", "-3"]);
        assert_eq!(payload, r#"{"a": [1, 2]}"#);
        let listed: Vec<(usize, serde_json::Value)> = targets.listed().collect();
        assert_eq!(
            listed,
            [
                (0, serde_json::json!(2)),
                (1, serde_json::json!("alice")),
                (0, serde_json::json!(2)),
                (2, serde_json::json!(-3)),
            ]
        );
    }

    #[test]
    fn every_spelling_is_listed_and_each_id_sent_once() {
        // Past 16 IDs the lookup switches to a map: both paths.
        for filler in [0, 30] {
            let mut listed: Vec<String> = (100..100 + filler).map(|i| i.to_string()).collect();
            listed.extend(["\"1\"", "1", "\"x\"", "\"1\"", "-1", "\"-1\""].map(String::from));
            let frame = format!(r#"{{"targets":[{}],"payload":1}}"#, listed.join(","));
            let Ok(Request::Send { targets, .. }) = parse(frame.as_bytes(), 100) else {
                panic!("not a send: {frame}");
            };
            let ids: Vec<&str> = targets.ids[filler..].iter().map(TargetId::text).collect();
            assert_eq!(ids, ["1", "x", "-1"]);
            let tail: Vec<(usize, serde_json::Value)> = targets.listed().skip(filler).collect();
            assert_eq!(
                tail,
                [
                    (filler, serde_json::json!("1")),
                    (filler, serde_json::json!(1)),
                    (filler + 1, serde_json::json!("x")),
                    (filler, serde_json::json!("1")),
                    (filler + 2, serde_json::json!(-1)),
                    (filler + 2, serde_json::json!("-1")),
                ]
            );
            assert_eq!(targets.position_of(filler + 2), filler + 4);
        }
    }

    #[test]
    fn names_each_bad_input() {
        assert_eq!(code("not json"), "invalid_json");
        assert_eq!(code(r#"{"targets":[1],"payload":1"#), "invalid_json");
        assert_eq!(code("[1,2]"), "not_an_object");
        assert_eq!(code("42"), "not_an_object");
        assert_eq!(code(r#"{"payload":1}"#), "missing_targets");
        assert_eq!(code(r#"{"targets":3,"payload":1}"#), "invalid_targets");
        assert_eq!(code(r#"{"targets":[1.5],"payload":1}"#), "invalid_target");
        assert_eq!(code(r#"{"targets":[true],"payload":1}"#), "invalid_target");
        assert_eq!(code(r#"{"targets":[""],"payload":1}"#), "invalid_target");
        assert_eq!(code(r#"{"targets":[1]}"#), "missing_payload");
        assert_eq!(code(r#"{"targets":null,"payload":1}"#), "invalid_targets");
        assert_eq!(code(r#"{"type":null}"#), "invalid_type");
        assert_eq!(
            code(r#"{"type":"subscribe","topic":null}"#),
            "invalid_topic"
        );
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":7}"#), "invalid_type");
        assert_eq!(code(r#"{"type":"subscribe"}"#), "missing_topic");
        assert_eq!(
            code(r#"{"type":"subscribe","topic":"a b"}"#),
            "invalid_topic"
        );
        let many = format!(
            r#"{{"targets":[{}],"payload":1}}"#,
            (0..11).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
        );
        assert_eq!(code(&many), "too_many_targets");
    }

    #[test]
    fn long_target_lists_are_deduplicated_in_order() {
        let mut listed: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        listed.extend((0..40).rev().map(|i| format!("\"{i}\"")));
        listed.insert(20, "3".to_owned());
        let frame = format!(r#"{{"targets":[{}],"payload":1}}"#, listed.join(","));
        let Ok(Request::Send { targets, .. }) = parse(frame.as_bytes(), 100) else {
            panic!("not a send");
        };
        let ids: Vec<&str> = targets.ids.iter().map(TargetId::text).collect();
        let expected: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        assert_eq!(ids, expected);
    }

    #[test]
    fn report_lists_echo_every_target_as_written_in_one_list() {
        let (targets, _) =
            parse_send(br#"{"targets":["1",1,"x",2,"2","y"],"payload":0}"#, 10).expect("parse");
        // ids: "1", "x", "2", "y"; "y" is left out of the report.
        let report = SendReport {
            delivered: vec![0],
            offline: vec![1],
            dropped: vec![2],
            retained: vec![1, 2],
            ..SendReport::default()
        };
        assert_eq!(
            targets.report_lists(&report),
            r#""delivered":["1",1],"dropped":[2,"2"],"offline":["x"],"retained":["x",2,"2"],"unconfirmed":["y"]"#
        );
    }

    /// The lists as the earlier `serde_json::Value` code wrote them: the
    /// hand-written writer must match it byte for byte.
    fn reference_lists(targets: &Targets, report: &SendReport) -> String {
        let of = |i: usize| {
            [
                (&report.unconfirmed, "unconfirmed"),
                (&report.dropped, "dropped"),
                (&report.offline, "offline"),
                (&report.delivered, "delivered"),
            ]
            .into_iter()
            .find(|(list, _)| list.contains(&i))
            .map_or("unconfirmed", |(_, name)| name)
        };
        let mut members = Vec::new();
        for (name, always) in [
            ("delivered", true),
            ("dropped", true),
            ("offline", true),
            ("retained", false),
            ("unconfirmed", false),
        ] {
            let listed: Vec<String> = targets
                .listed()
                .filter(|&(id, _)| match name {
                    "retained" => report.retained.contains(&id),
                    _ => of(id) == name,
                })
                .map(|(_, written)| written.to_string())
                .collect();
            if always || !listed.is_empty() {
                members.push(format!("\"{name}\":[{}]", listed.join(",")));
            }
        }
        members.join(",")
    }

    #[test]
    fn report_lists_match_the_json_of_each_target_on_both_paths() {
        // 5 IDs (state on the stack) and 40 (on the heap); integers at the
        // edges of their ranges, negative ones, strings, repeats.
        for extra in [0u64, 35] {
            let mut listed: Vec<String> = (0..extra).map(|i| (1000 + i).to_string()).collect();
            listed.extend(
                [
                    "18446744073709551615",
                    "-9223372036854775808",
                    "\"a.b@c\"",
                    "-7",
                    "0",
                    "\"0\"",
                    "-7",
                ]
                .map(String::from),
            );
            let body = format!(r#"{{"targets":[{}],"payload":0}}"#, listed.join(","));
            let (targets, _) = parse_send(body.as_bytes(), 100).expect("parse");
            let n = targets.ids.len();
            let reports = [
                SendReport::default(),
                SendReport {
                    delivered: (0..n).collect(),
                    retained: (0..n).collect(),
                    ..SendReport::default()
                },
                SendReport {
                    delivered: (0..n).step_by(3).collect(),
                    offline: (1..n).step_by(3).collect(),
                    dropped: vec![2],
                    unconfirmed: vec![n - 1],
                    retained: (0..n).step_by(2).collect(),
                    connections: 1,
                },
            ];
            for report in &reports {
                let expected = reference_lists(&targets, report);
                assert_eq!(targets.report_lists(report), expected);
                let mut appended = String::from("{\"mid\":\"m\",");
                targets.write_report_lists(report, &mut appended);
                assert_eq!(appended, format!("{{\"mid\":\"m\",{expected}"));
            }
        }
    }

    #[test]
    fn a_null_payload_is_a_payload() {
        let Ok(Request::Send { payload, .. }) = parse(br#"{"targets":[1],"payload":null}"#, 10)
        else {
            panic!("null payload refused");
        };
        assert_eq!(payload, "null");
    }

    #[test]
    fn numbers_beyond_64_bits_are_out_of_range_not_floating_point() {
        for (input, says) in [
            (
                r#"{"targets":[123456789012345678901234567890],"payload":1}"#,
                "targets[0] is an integer out of range",
            ),
            (
                r#"{"targets":[1,18446744073709551616],"payload":1}"#,
                "targets[1] is an integer out of range",
            ),
            (
                r#"{"targets":[-9223372036854775809],"payload":1}"#,
                "targets[0] is an integer out of range",
            ),
            (
                r#"{"targets":[1.5],"payload":1}"#,
                "targets[0] is not an integer (1.5)",
            ),
        ] {
            let err = parse(input.as_bytes(), 10).expect_err(input);
            assert_eq!(err.code, "invalid_target");
            assert!(err.message.starts_with(says), "{input}: {}", err.message);
            assert!(!err.message.contains("floating"), "{}", err.message);
        }
        // The edges of the ranges still parse.
        let Ok(Request::Send { targets, .. }) = parse(
            br#"{"targets":[18446744073709551615,-9223372036854775808],"payload":1}"#,
            10,
        ) else {
            panic!("u64::MAX and i64::MIN are ids");
        };
        let ids: Vec<&str> = targets.ids.iter().map(TargetId::text).collect();
        assert_eq!(ids, ["18446744073709551615", "-9223372036854775808"]);
    }

    #[test]
    fn error_messages_point_at_the_bad_target() {
        let err = parse(br#"{"targets":[1,{"x":1}],"payload":1}"#, 10).expect_err("object");
        assert!(err.message.contains("targets[1]"), "{}", err.message);
    }

    #[test]
    fn parses_topic_frames() {
        assert!(matches!(
            parse(br#"{"type":"subscribe","topic":"news"}"#, 10),
            Ok(Request::Subscribe(t)) if t.as_str() == "news"
        ));
        assert!(matches!(
            parse(br#"{"type":"publish","topic":"news","payload":"hi"}"#, 10),
            Ok(Request::Publish { payload, .. }) if payload == "\"hi\""
        ));
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever a client sends, the parser answers Ok or a coded error.
        #[test]
        fn arbitrary_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Err(err) = parse(&input, 100) {
                prop_assert!(!err.code.is_empty());
            }
        }

        #[test]
        fn arbitrary_json_like_input_never_panics(input in r#"\{("[a-z]{1,8}":(\[[0-9a-z",\-]{0,20}\]|[0-9]{1,3}|"[a-z ]{0,5}"|\{\}|null),?){0,4}\}"#) {
            if let Err(err) = parse(input.as_bytes(), 100) {
                prop_assert!(!err.code.is_empty());
            }
        }

        /// Valid frames round-trip: the payload text is forwarded exactly.
        #[test]
        fn payload_is_forwarded_verbatim(ids in proptest::collection::vec(0u64..1000, 1..20), payload in r#"\{"[a-z]{1,5}": ?\[(([1-9][0-9]{0,2}|0)(, ?([1-9][0-9]{0,2}|0)){0,3})?\]\}"#) {
            let targets: Vec<String> = ids.iter().map(u64::to_string).collect();
            let frame = format!(r#"{{"targets":[{}],"payload":{payload}}}"#, targets.join(","));
            let Ok(Request::Send { targets: parsed, payload: raw }) = parse(frame.as_bytes(), 100) else {
                return Err(TestCaseError::fail(format!("not a send: {frame}")));
            };
            prop_assert_eq!(raw, payload.as_str());
            let mut unique = ids.clone();
            unique.dedup_by(|a, b| a == b);
            let mut seen = std::collections::HashSet::new();
            let expected: Vec<String> = ids.iter().filter(|i| seen.insert(**i)).map(u64::to_string).collect();
            let got: Vec<String> = parsed.ids.iter().map(|id| id.text().to_owned()).collect();
            prop_assert_eq!(got, expected);
        }
    }
}
