//! The frame a `switchboard.v1` client sends most, a `send`, read in one
//! pass: each field deserialized where it stands, strings borrowed from the
//! frame. [`request::parse`](super::request::parse) reads every field as
//! raw JSON first and then parses `type`, `id`, `mid` and `targets` again
//! (allocating `type` and `mid`); for a send that cost ~1,300 instructions
//! more than the plain relay's parse (callgrind, relay over v1).
//!
//! It takes frames that start `{"type":"send",` (as the docs and the
//! benchmark write them). Anything this path does not take — another type,
//! other field orders, a field a send does not
//! have, a duplicate, a bad value — is left to `request::parse`, which
//! reads the frame again and names the problem: this path never refuses,
//! so both paths accept the same frames and errors stay as they were.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::request::{Kind, MAX_MID_LEN, Request};
use crate::app::relay::{TargetName, Targets, TargetsSeed};
use crate::runtime::delivery::MAX_REQUEST_ID;

/// How a send this path takes starts: the order docs/protocol-v1.md
/// writes it in. Other frames go straight to `request::parse`: finding out
/// here that a frame is not a send cost a serde error, ~2,400 instructions
/// per subscribe (callgrind, tests/presence_cost.rs), more than it saves.
const SEND_START: &str = r#"{"type":"send","#;

/// `input` as a `send` request, or `None` when it is anything else or
/// anything is wrong with it (for `request::parse` to answer).
pub(crate) fn parse(input: &str, max_targets: usize) -> Option<Request<'_>> {
    if !input.starts_with(SEND_START) {
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(input);
    let send = de.deserialize_map(SendVisitor { max_targets }).ok()?;
    de.end().ok()?;
    Some(send)
}

struct SendVisitor {
    max_targets: usize,
}

/// Why the fast path gave up; never shown (the slow path names it).
fn not_taken<E: de::Error>() -> E {
    E::custom("left to request::parse")
}

impl<'de> Visitor<'de> for SendVisitor {
    type Value = Request<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a switchboard.v1 send")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Request<'de>, A::Error> {
        let mut is_send = false;
        let mut id: Option<u64> = None;
        let mut mid: Option<Cow<'de, str>> = None;
        let mut targets: Option<Targets<TargetName<'de>>> = None;
        let mut payload: Option<&'de RawValue> = None;
        while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
            match key.as_ref() {
                "type" if !is_send => {
                    let Str(kind) = map.next_value::<Str<'de>>()?;
                    if kind != "send" {
                        return Err(not_taken());
                    }
                    is_send = true;
                }
                "id" if id.is_none() => id = Some(map.next_value::<u64>()?),
                "mid" if mid.is_none() => mid = Some(map.next_value::<Str<'de>>()?.0),
                "targets" if targets.is_none() => {
                    let max = self.max_targets;
                    targets = Some(map.next_value_seed(TargetsSeed {
                        max,
                        ids: std::marker::PhantomData,
                    })?);
                }
                "payload" if payload.is_none() => payload = Some(map.next_value()?),
                // A duplicate, or a field of another request (which
                // `request::parse` reads, and a send ignores, only there).
                "type" | "id" | "mid" | "targets" | "payload" | "topic" | "resume" | "from"
                | "to" | "token" | "presence" | "meta" => return Err(not_taken()),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let id_ok = id.is_none_or(|id| id <= MAX_REQUEST_ID);
        let mid_ok = mid.as_deref().is_none_or(|mid| {
            (1..=MAX_MID_LEN).contains(&mid.len()) && mid.bytes().all(|b| b.is_ascii_graphic())
        });
        match (is_send && id_ok && mid_ok, targets, payload) {
            (true, Some(targets), Some(payload)) => Ok(Request {
                id,
                kind: Kind::Send {
                    mid,
                    targets,
                    payload,
                },
            }),
            _ => Err(not_taken()),
        }
    }
}

/// A JSON string, borrowed from the frame unless it has escapes (serde's
/// own `Cow<str>` always allocates).
struct Str<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = Str<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(StrVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::relay::TargetId as _;
    use crate::app::v1::request;

    /// What a parsed request says, to compare the two paths.
    fn summary(request: &Request<'_>) -> String {
        match &request.kind {
            Kind::Send {
                mid,
                targets,
                payload,
            } => format!(
                "send id={:?} mid={:?} ids={:?} payload={}",
                request.id,
                mid,
                targets
                    .ids
                    .iter()
                    .map(|id| id.text().to_owned())
                    .collect::<Vec<_>>(),
                payload.get()
            ),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn takes_sends_as_the_full_parser_reads_them() {
        for input in [
            r#"{"type":"send","id":1,"targets":[2],"payload":{"t":1,"s":"x"}}"#,
            r#"{"type":"send","payload":[1,2],"targets":["a","b",3,"a"],"mid":"m-1"}"#,
            r#"{"type":"send", "targets" : [ 1 ] , "payload" : null , "extra" : {"x":[1]} } "#,
            r#"{"type":"send","mid":"m\u002d2","targets":[-5],"payload":"\u00e9"}"#,
            r#"{"type":"send","id":9007199254740991,"targets":[1],"payload":0}"#,
        ] {
            let fast = parse(input, 10).unwrap_or_else(|| panic!("not taken: {input}"));
            let full = request::parse(input, 10).expect(input);
            assert_eq!(summary(&fast), summary(&full), "{input}");
        }
    }

    #[test]
    fn leaves_everything_else_to_the_full_parser() {
        for input in [
            r#"{"type":"hello"}"#,
            r#"{"type":"publish","topic":"t","payload":1}"#,
            r#"{"type":"send","targets":[1]}"#,
            r#"{"type":"send","payload":1}"#,
            r#"{"targets":[1],"payload":1}"#,
            r#"{"id":1,"type":"send","targets":[1],"payload":1}"#,
            r#" {"type":"send","targets":[1],"payload":1}"#,
            r#"{"type":"send","type":"send","targets":[1],"payload":1}"#,
            r#"{"type":"send","targets":[1],"payload":1,"payload":2}"#,
            r#"{"type":"send","id":-1,"targets":[1],"payload":1}"#,
            r#"{"type":"send","id":9007199254740992,"targets":[1],"payload":1}"#,
            r#"{"type":"send","id":"1","targets":[1],"payload":1}"#,
            r#"{"type":"send","mid":"","targets":[1],"payload":1}"#,
            r#"{"type":"send","mid":"a b","targets":[1],"payload":1}"#,
            r#"{"type":"send","targets":null,"payload":1}"#,
            r#"{"type":"send","targets":[1.5],"payload":1}"#,
            r#"{"type":"send","targets":[1,2,3,4,5,6,7,8,9,10,11],"payload":1}"#,
            r#"{"type":"send","topic":"t","targets":[1],"payload":1}"#,
            r#"{"type":"send","targets":[1],"payload":1} x"#,
            r#"{"type":"send","targets":[1],"payload":1"#,
            r#"[{"type":"send"}]"#,
            r#"{"type":7,"targets":[1],"payload":1}"#,
        ] {
            assert!(parse(input, 10).is_none(), "taken: {input}");
        }
    }
}
