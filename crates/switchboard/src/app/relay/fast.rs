//! The relay frame read in one pass, without serde: the plain relay's hot
//! path (`{"targets":[…],"payload":X}`, and `"type":"send"` or
//! `"publish"` frames).
//!
//! [`parse`] answers `Some` only for a frame that serde_json reads to the
//! same request — every field valid, no duplicate known field — and `None`
//! for everything else, good or bad; the caller then reads the frame with
//! serde_json, which gives today's request or today's error. So this never
//! decides an error, and the shapes it leaves out cost only a second read:
//! a key or target written with escapes, a `type` other than `send` or
//! `publish`, an invalid target or topic, too many targets, nesting deeper
//! than [`MAX_DEPTH`](crate::app::json_scan::MAX_DEPTH).
//!
//! Measured (callgrind, `callgrind-hotpath.sh relay`): see docs/design.md
//! "Per-message costs".

use crate::app::json_scan::{plain_key, skip_ws, string_end, value_end};
use crate::id::{ClientId, Digits, Topic};

use super::{Request, TargetName, Targets, TargetsBuilder, Written};

/// Where a field's value sits in the frame.
type Span = (usize, usize);

/// Reads a relay frame, or answers `None` (see the module docs).
pub(super) fn parse(input: &str, max_targets: usize) -> Option<Request<'_>> {
    let bytes = input.as_bytes();
    let mut at = skip_ws(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    let (mut kind, mut payload, mut topic): (Option<Span>, Option<Span>, Option<Span>) =
        (None, None, None);
    let mut targets = None;
    at = skip_ws(bytes, at + 1);
    if bytes.get(at) == Some(&b'}') {
        // `{}`: no targets, an error serde_json names.
        return None;
    }
    loop {
        let (key, start) = plain_key(bytes, at)?;
        let mut ignored = None;
        let field = match key {
            b"type" => &mut kind,
            b"payload" => &mut payload,
            b"topic" => &mut topic,
            b"targets" => {
                if targets.is_some() {
                    // A duplicate field: serde_json refuses the frame.
                    return None;
                }
                // Read where it stands: a fan-out lists thousands.
                let (list, end) = parse_targets(input, start, max_targets)?;
                targets = Some(list);
                at = skip_ws(bytes, end);
                match bytes.get(at) {
                    Some(b',') => at = skip_ws(bytes, at + 1),
                    Some(b'}') => break,
                    _ => return None,
                }
                continue;
            }
            // Unknown fields are ignored, once checked to be JSON.
            _ => &mut ignored,
        };
        if field.is_some() {
            // A duplicate field: serde_json refuses the frame.
            return None;
        }
        let end = value_end(bytes, start)?;
        *field = Some((start, end));
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
    let text = |(start, end): Span| &input[start..end];
    let (payload_start, payload_end) = payload?;
    let payload = &input[payload_start..payload_end];
    match kind.map(text) {
        None | Some("\"send\"") => Some(Request::Send {
            targets: targets?,
            payload,
        }),
        Some("\"publish\"") => {
            let topic = plain_string(input, topic?)?;
            Some(Request::Publish {
                topic: Topic::new(topic).ok()?,
                payload,
            })
        }
        Some(_) => None,
    }
}

/// The text of a string value without escapes, quotes removed.
fn plain_string(input: &str, (start, end): Span) -> Option<&str> {
    let bytes = input.as_bytes();
    if bytes.get(start) != Some(&b'"') {
        return None;
    }
    let (string_end, escaped) = string_end(bytes, start + 1)?;
    (!escaped && string_end == end).then(|| &input[start + 1..end - 1])
}

/// The `targets` array starting at `start`, and the index after it: integers
/// that fit 64 bits and strings without escapes that are valid client
/// IDs, deduplicated as the serde path does ([`TargetsBuilder`]).
pub(crate) fn parse_targets(
    input: &str,
    start: usize,
    max: usize,
) -> Option<(Targets<TargetName<'_>>, usize)> {
    let bytes = input.as_bytes();
    if bytes.get(start) != Some(&b'[') {
        return None;
    }
    // The commas before the first `]`: one fewer than the targets, unless
    // a string target holds one (a hint only).
    let expected = bytes[start..]
        .iter()
        .take_while(|&&b| b != b']')
        .filter(|&&b| b == b',')
        .count()
        + 1;
    let mut out = TargetsBuilder::expecting(max, expected);
    let mut at = skip_ws(bytes, start + 1);
    if bytes.get(at) == Some(&b']') {
        return Some((out.targets, at + 1));
    }
    loop {
        let (id, written, next) = match *bytes.get(at)? {
            b'"' => {
                let (string_end, escaped) = string_end(bytes, at + 1)?;
                if escaped {
                    return None;
                }
                let name = &input[at + 1..string_end - 1];
                ClientId::check(name).ok()?;
                (TargetName::Text(name), Written::String, string_end)
            }
            b'-' => {
                let (magnitude, next) = integer(bytes, at + 1)?;
                // serde_json reads `-0` and anything below i64::MIN as a
                // float, which the serde path refuses.
                let n = 0i64.checked_sub_unsigned(magnitude).filter(|&n| n < 0)?;
                (
                    TargetName::Number(Digits::signed(n)),
                    Written::Signed(n),
                    next,
                )
            }
            b'0'..=b'9' => {
                let (n, next) = integer(bytes, at)?;
                (
                    TargetName::Number(Digits::unsigned(n)),
                    Written::Unsigned(n),
                    next,
                )
            }
            _ => return None,
        };
        out.push(id, written).ok()?;
        at = skip_ws(bytes, next);
        match bytes.get(at) {
            Some(b',') => at = skip_ws(bytes, at + 1),
            Some(b']') => return Some((out.targets, at + 1)),
            _ => return None,
        }
    }
}

/// A non-negative integer without fraction or exponent that fits a `u64`,
/// and the index after it; `None` for anything else (serde_json reads
/// those as floats).
pub(crate) fn integer(bytes: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut n: u64 = 0;
    let mut end = at;
    while let Some(&digit @ b'0'..=b'9') = bytes.get(end) {
        n = n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
        end += 1;
    }
    let leading_zero = bytes.get(at) == Some(&b'0') && end > at + 1;
    if end == at || leading_zero || matches!(bytes.get(end), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    Some((n, end))
}
