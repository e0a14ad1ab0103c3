//! Reading Redis replies (RESP2 and RESP3 shapes alike).

use ::redis::Value;

pub(super) fn string(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) fn strings(value: Value) -> Vec<String> {
    match value {
        Value::Array(items) | Value::Set(items) => items.into_iter().filter_map(string).collect(),
        _ => Vec::new(),
    }
}

pub(super) fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Int(n) => Some(*n as f64),
        Value::Double(d) => Some(*d),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// `TIME` → milliseconds.
pub(super) fn time_ms(value: &Value) -> Option<u64> {
    let Value::Array(parts) = value else {
        return None;
    };
    let secs = number(parts.first()?)? as u64;
    let micros = number(parts.get(1)?)? as u64;
    Some(secs * 1000 + micros / 1000)
}

/// `ZRANGE … WITHSCORES`, RESP2 (flat) or RESP3 (pairs) → (member, score).
pub(super) fn scored(value: Value) -> Vec<(String, u64)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if items.iter().all(|v| matches!(v, Value::Array(_))) {
        for item in items {
            if let Value::Array(mut pair) = item
                && pair.len() == 2
            {
                let score = number(&pair[1]).unwrap_or(0.0) as u64;
                if let Some(member) = string(pair.swap_remove(0)) {
                    out.push((member, score));
                }
            }
        }
    } else {
        let mut iter = items.into_iter();
        while let (Some(member), Some(score)) = (iter.next(), iter.next()) {
            let score = number(&score).unwrap_or(0.0) as u64;
            if let Some(member) = string(member) {
                out.push((member, score));
            }
        }
    }
    out
}

/// `HSCAN` → (next cursor, fields and values).
pub(super) fn scan_reply(value: Value) -> (u64, Vec<String>) {
    let Value::Array(mut parts) = value else {
        return (0, Vec::new());
    };
    if parts.len() != 2 {
        return (0, Vec::new());
    }
    let items = strings(parts.pop().unwrap_or(Value::Nil));
    let cursor = parts.first().and_then(number).unwrap_or(0.0) as u64;
    (cursor, items)
}

pub(super) fn parse_presence(value: &str) -> Option<(usize, u64)> {
    let (count, since) = value.split_once(',')?;
    Some((count.parse().ok()?, since.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_resp2_and_resp3_scored_replies() {
        let flat = Value::Array(vec![
            Value::BulkString(b"a#1".to_vec()),
            Value::BulkString(b"1500".to_vec()),
        ]);
        assert_eq!(scored(flat), vec![("a#1".to_owned(), 1500)]);
        let pairs = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"b#2".to_vec()),
            Value::Double(2500.0),
        ])]);
        assert_eq!(scored(pairs), vec![("b#2".to_owned(), 2500)]);
        assert_eq!(
            parse_presence("3,1700000000000"),
            Some((3, 1_700_000_000_000))
        );
        assert_eq!(parse_presence("x"), None);
    }
}
