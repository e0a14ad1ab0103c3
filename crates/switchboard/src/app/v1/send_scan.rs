//! The `switchboard.v1` send read without serde: the frame scanned once
//! with the plain relay's validating scanner (`app::json_scan`, and the
//! relay's own `targets` reader), the way the plain relay reads its frames.
//!
//! [`scan`] answers `Some` only for a send that [`send_frame::parse`]
//! (and so `request::parse`) reads to the same request, and `None` for
//! everything else, good or bad: the caller then tries `send_frame::parse`,
//! which falls back to `request::parse` in turn. So this never decides an
//! error; what it leaves out (a key or `mid` with escapes, a negative or
//! oversized `id`, nesting deeper than the scanner follows) costs only a
//! second read.
//!
//! Why: after the immediate path, serde_json's visitor machinery for the
//! send frame was ~3,300 instructions per relayed v1 delivery, a third of
//! the total (callgrind, `callgrind-hotpath.sh relay-v1`).
//!
//! [`send_frame::parse`]: super::send_frame::parse

use super::request::MAX_MID_LEN;
use crate::app::json_scan::{plain_key, skip_ws, string_end, value_end};
use crate::app::relay::fast::{integer, parse_targets};
use crate::app::relay::{TargetName, Targets};
use crate::runtime::delivery::MAX_REQUEST_ID;

/// A send as the scanner read it: every part borrowed from the frame.
pub(super) struct ScannedSend<'a> {
    pub(super) id: Option<u64>,
    pub(super) mid: Option<&'a str>,
    pub(super) targets: Targets<TargetName<'a>>,
    /// The payload's JSON text, validated.
    pub(super) payload: &'a str,
}

/// Where the frame must start: the field order docs/protocol-v1.md
/// writes (the same gate as `send_frame::parse`).
const SEND_START: &[u8] = br#"{"type":"send","#;

/// `input` as a send, or `None` (see the module docs).
pub(super) fn scan(input: &str, max_targets: usize) -> Option<ScannedSend<'_>> {
    let bytes = input.as_bytes();
    if !bytes.starts_with(SEND_START) {
        return None;
    }
    let mut id = None;
    let mut mid = None;
    let mut targets = None;
    let mut payload = None;
    let mut at = skip_ws(bytes, SEND_START.len());
    loop {
        let (key, start) = plain_key(bytes, at)?;
        let end = match key {
            b"id" if id.is_none() => {
                // Non-negative integers only: serde's other readings of
                // an `id` (`-0`, errors) are left to it.
                let (n, end) = integer(bytes, start)?;
                if n > MAX_REQUEST_ID {
                    return None;
                }
                id = Some(n);
                end
            }
            b"mid" if mid.is_none() => {
                if bytes.get(start) != Some(&b'"') {
                    return None;
                }
                let (end, escaped) = string_end(bytes, start + 1)?;
                let text = &input[start + 1..end - 1];
                let valid = (1..=MAX_MID_LEN).contains(&text.len())
                    && text.bytes().all(|b| b.is_ascii_graphic());
                if escaped || !valid {
                    return None;
                }
                mid = Some(text);
                end
            }
            b"targets" if targets.is_none() => {
                let (list, end) = parse_targets(input, start, max_targets)?;
                targets = Some(list);
                end
            }
            b"payload" if payload.is_none() => {
                let end = value_end(bytes, start)?;
                payload = Some(&input[start..end]);
                end
            }
            // A duplicate, or a field of another request: `send_frame`
            // refuses these, and so does this.
            b"type" | b"id" | b"mid" | b"targets" | b"payload" | b"topic" | b"resume" | b"from"
            | b"to" | b"token" | b"presence" | b"meta" => return None,
            // Unknown fields are ignored, once checked to be JSON.
            _ => value_end(bytes, start)?,
        };
        at = skip_ws(bytes, end);
        match bytes.get(at) {
            Some(b',') => at = skip_ws(bytes, at + 1),
            Some(b'}') => break,
            _ => return None,
        }
    }
    if skip_ws(bytes, at + 1) != bytes.len() {
        return None;
    }
    Some(ScannedSend {
        id,
        mid,
        targets: targets?,
        payload: payload?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::relay::TargetId as _;
    use crate::app::v1::request::Kind;
    use crate::app::v1::send_frame;

    fn summary_of_scan(send: &ScannedSend<'_>) -> String {
        format!(
            "send id={:?} mid={:?} ids={:?} payload={}",
            send.id,
            send.mid,
            send.targets
                .ids
                .iter()
                .map(|id| id.text().to_owned())
                .collect::<Vec<_>>(),
            send.payload
        )
    }

    fn summary_of_serde(input: &str) -> Option<String> {
        let request = send_frame::parse(input, 10)?;
        let Kind::Send {
            mid,
            targets,
            payload,
        } = &request.kind
        else {
            return None;
        };
        Some(format!(
            "send id={:?} mid={:?} ids={:?} payload={}",
            request.id,
            mid.as_deref(),
            targets
                .ids
                .iter()
                .map(|id| id.text().to_owned())
                .collect::<Vec<_>>(),
            payload.get()
        ))
    }

    #[test]
    fn reads_sends_as_the_serde_path_does() {
        for input in [
            r#"{"type":"send","id":1,"targets":[2],"payload":{"t":1,"s":"x"}}"#,
            r#"{"type":"send","payload":[1,2],"targets":["a","b",3,"a"],"mid":"m-1"}"#,
            r#"{"type":"send", "targets" : [ 1 ] , "payload" : null , "extra" : {"x":[1]} } "#,
            r#"{"type":"send","id":9007199254740991,"targets":[1],"payload":0}"#,
            r#"{"type":"send","id":0,"targets":[-5, "x"],"payload":"\u00e9"}"#,
        ] {
            let scanned = scan(input, 10).unwrap_or_else(|| panic!("not taken: {input}"));
            assert_eq!(
                Some(summary_of_scan(&scanned)),
                summary_of_serde(input),
                "{input}"
            );
        }
    }

    #[test]
    fn leaves_the_rest_to_the_serde_path() {
        for input in [
            // Taken by serde (escapes), left here.
            r#"{"type":"send","mid":"m\u002d2","targets":[-5],"payload":1}"#,
            r#"{"type":"send","t\u0061rgets":[1],"payload":1}"#,
            // Refused by both.
            r#"{"type":"hello"}"#,
            r#"{"type":"send","targets":[1]}"#,
            r#"{"type":"send","payload":1}"#,
            r#"{"id":1,"type":"send","targets":[1],"payload":1}"#,
            r#" {"type":"send","targets":[1],"payload":1}"#,
            r#"{"type":"send","type":"send","targets":[1],"payload":1}"#,
            r#"{"type":"send","targets":[1],"payload":1,"payload":2}"#,
            r#"{"type":"send","id":-1,"targets":[1],"payload":1}"#,
            r#"{"type":"send","id":9007199254740992,"targets":[1],"payload":1}"#,
            r#"{"type":"send","id":1.0,"targets":[1],"payload":1}"#,
            r#"{"type":"send","id":"1","targets":[1],"payload":1}"#,
            r#"{"type":"send","mid":"","targets":[1],"payload":1}"#,
            r#"{"type":"send","mid":"a b","targets":[1],"payload":1}"#,
            r#"{"type":"send","targets":null,"payload":1}"#,
            r#"{"type":"send","targets":[1.5],"payload":1}"#,
            r#"{"type":"send","targets":[1,2,3,4,5,6,7,8,9,10,11],"payload":1}"#,
            r#"{"type":"send","topic":"t","targets":[1],"payload":1}"#,
            r#"{"type":"send","targets":[1],"payload":1} x"#,
            r#"{"type":"send","targets":[1],"payload":1"#,
            r#"{"type":"send","targets":[1],"payload":[1,}"#,
            r#"{"type":"send","targets":[1],"payload":1,"x":tru}"#,
        ] {
            assert!(scan(input, 10).is_none(), "taken: {input}");
        }
    }
}
