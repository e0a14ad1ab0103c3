//! A validating JSON scanner: finds where a JSON value ends and checks its
//! grammar on the way, without building anything.
//!
//! It accepts exactly what serde_json accepts when it reads a value it
//! skips or keeps as a `RawValue` (its `ignore_value`): RFC 8259's grammar
//! — literals, numbers (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`),
//! strings without control characters and with only the escapes `\" \\ \/
//! \b \f \n \r \t \uXXXX`, arrays and objects without trailing commas — on
//! text already known to be UTF-8. Like serde_json there, a `\uXXXX` escape
//! is not checked for lone surrogates: the value is forwarded, not decoded.
//!
//! Every function answers `None` for anything it does not accept, with no
//! reason: the caller then reads the input again with serde_json, whose
//! error it reports. The one thing this accepts less of than serde_json is
//! nesting deeper than [`MAX_DEPTH`] (serde_json has no limit for a skipped
//! value): such input goes to serde_json too.
//!
//! Why: the plain relay forwards a payload only if it is valid JSON, and
//! serde_json's general machinery (a deserializer, visitors, a field
//! struct) cost about 30% of a relayed message's instructions (callgrind).

/// The deepest nesting of arrays and objects the scanner follows (one bit
/// each of a `u128` on the stack); deeper values are left to serde_json.
pub(crate) const MAX_DEPTH: u32 = 128;

/// The index of the first byte at or after `at` that is not JSON
/// whitespace (space, tab, line feed, carriage return).
#[inline]
pub(crate) fn skip_ws(input: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = input.get(at) {
        at += 1;
    }
    at
}

/// A string's end: `at` is just after its opening quote. Returns the index
/// just after the closing quote and whether the string holds an escape.
#[inline]
pub(crate) fn string_end(input: &[u8], mut at: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        match *input.get(at)? {
            b'"' => return Some((at + 1, escaped)),
            b'\\' => {
                escaped = true;
                match *input.get(at + 1)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => at += 2,
                    b'u' => {
                        let hex = input.get(at + 2..at + 6)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        at += 6;
                    }
                    _ => return None,
                }
            }
            0x00..=0x1F => return None,
            _ => at += 1,
        }
    }
}

/// A number's end: `at` is at its first byte (`-` or a digit).
#[inline]
pub(crate) fn number_end(input: &[u8], mut at: usize) -> Option<usize> {
    if input.get(at) == Some(&b'-') {
        at += 1;
    }
    match *input.get(at)? {
        b'0' => at += 1,
        b'1'..=b'9' => at = digits_end(input, at + 1),
        _ => return None,
    }
    if input.get(at) == Some(&b'.') {
        let end = digits_end(input, at + 1);
        if end == at + 1 {
            return None;
        }
        at = end;
    }
    if let Some(b'e' | b'E') = input.get(at) {
        at += 1;
        if let Some(b'+' | b'-') = input.get(at) {
            at += 1;
        }
        let end = digits_end(input, at);
        if end == at {
            return None;
        }
        at = end;
    }
    Some(at)
}

fn digits_end(input: &[u8], mut at: usize) -> usize {
    while let Some(b'0'..=b'9') = input.get(at) {
        at += 1;
    }
    at
}

/// After an object's `{` or `,` (and whitespace): a key, its colon and
/// the whitespace before the value. Returns the index just after the key's
/// closing quote, whether the key holds an escape, and where the value
/// starts.
#[inline]
fn member(input: &[u8], at: usize) -> Option<(usize, bool, usize)> {
    if input.get(at) != Some(&b'"') {
        return None;
    }
    let (key_end, escaped) = string_end(input, at + 1)?;
    let colon = skip_ws(input, key_end);
    if input.get(colon) != Some(&b':') {
        return None;
    }
    Some((key_end, escaped, skip_ws(input, colon + 1)))
}

/// Where a member's value starts (see [`member`]), whatever its key.
#[inline]
fn member_value_start(input: &[u8], at: usize) -> Option<usize> {
    member(input, at).map(|(_, _, value)| value)
}

/// An object member's key without escapes: `at` is at the key's opening
/// quote. Returns the key's bytes and where the member's value starts. A
/// key with escapes answers `None`: it may spell a known field, which only
/// serde_json decodes.
#[inline]
pub(crate) fn plain_key(input: &[u8], at: usize) -> Option<(&[u8], usize)> {
    match member(input, at)? {
        (key_end, false, value) => Some((&input[at + 1..key_end - 1], value)),
        (_, true, _) => None,
    }
}

/// A value's end: `at` is at its first byte (after any whitespace).
/// Returns the index just after the value.
pub(crate) fn value_end(input: &[u8], mut at: usize) -> Option<usize> {
    // The open containers, innermost in the low bit: 1 an object, 0 an
    // array.
    let mut open: u128 = 0;
    let mut depth: u32 = 0;
    loop {
        // One value starts at `at`.
        match *input.get(at)? {
            b'"' => at = string_end(input, at + 1)?.0,
            b'-' | b'0'..=b'9' => at = number_end(input, at)?,
            b't' => at = literal_end(input, at, b"true")?,
            b'f' => at = literal_end(input, at, b"false")?,
            b'n' => at = literal_end(input, at, b"null")?,
            bracket @ (b'[' | b'{') => {
                let inside = skip_ws(input, at + 1);
                let close = if bracket == b'[' { b']' } else { b'}' };
                if input.get(inside) == Some(&close) {
                    at = inside + 1;
                } else {
                    if depth == MAX_DEPTH {
                        return None;
                    }
                    depth += 1;
                    open = (open << 1) | u128::from(bracket == b'{');
                    at = if bracket == b'{' {
                        member_value_start(input, inside)?
                    } else {
                        inside
                    };
                    continue;
                }
            }
            _ => return None,
        }
        // After a value: a comma before the next one, or closings.
        loop {
            if depth == 0 {
                return Some(at);
            }
            at = skip_ws(input, at);
            let in_object = open & 1 == 1;
            match (*input.get(at)?, in_object) {
                (b',', true) => {
                    at = member_value_start(input, skip_ws(input, at + 1))?;
                    break;
                }
                (b',', false) => {
                    at = skip_ws(input, at + 1);
                    break;
                }
                (b'}', true) | (b']', false) => {
                    at += 1;
                    open >>= 1;
                    depth -= 1;
                }
                _ => return None,
            }
        }
    }
}

fn literal_end(input: &[u8], at: usize, literal: &[u8]) -> Option<usize> {
    let end = at + literal.len();
    (input.get(at..end)? == literal).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(text: &str) -> bool {
        let bytes = text.as_bytes();
        let start = skip_ws(bytes, 0);
        value_end(bytes, start).is_some_and(|end| skip_ws(bytes, end) == bytes.len())
    }

    #[test]
    fn accepts_what_rfc_8259_allows() {
        for ok in [
            "0",
            "-0",
            "1.5e+10",
            "-12.25E-3",
            "1e5",
            "true",
            "false",
            "null",
            r#""a\"\\\/\b\f\n\r\t\u00e9\uD800z""#,
            "\"é 漢 😀\"",
            "[]",
            "{}",
            " [ 1 , { \"a\" : [ ] , \"b\" : { } } , \"x\" ] ",
            r#"{"a":1,"a":2}"#,
        ] {
            assert!(whole(ok), "{ok:?} refused");
        }
    }

    #[test]
    fn refuses_what_rfc_8259_does_not() {
        for bad in [
            "",
            "-",
            "01",
            "1.",
            ".5",
            "1e",
            "1e+",
            "+1",
            "tru",
            "nul",
            "True",
            "[1,]",
            "[,1]",
            "{\"a\":1,}",
            "{\"a\"}",
            "{\"a\" 1}",
            "{1:2}",
            "[1 2]",
            "\"\\x\"",
            "\"\\u12g4\"",
            "\"\\u12\"",
            "\"a\tb\"",
            "\"a\u{1}b\"",
            "\"open",
            "[",
            "{",
            "[1}",
            "{\"a\":1]",
            "'a'",
            "NaN",
            "Infinity",
        ] {
            assert!(!whole(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn nesting_beyond_the_limit_is_left_to_serde() {
        let depth = MAX_DEPTH as usize;
        let at_limit = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(whole(&at_limit));
        let nested_at_limit = format!("{}0{}", "[".repeat(depth), "]".repeat(depth));
        assert!(whole(&nested_at_limit));
        let beyond = format!("{}0{}", "[".repeat(depth + 1), "]".repeat(depth + 1));
        assert!(!whole(&beyond));
    }
}
