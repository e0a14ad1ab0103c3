//! Client IDs and topic names.
//!
//! IDs are strings, and JSON integers are accepted as their decimal form: a
//! client on `/ws?id=42` is reached by the target `42` and by `"42"`. Many
//! deployments number their users, others use UUIDs or e-mail-like handles;
//! one string type serves both without a flag, and the plain relay's wire
//! format (`"targets":[2,3]`) works unchanged.

use std::fmt;
use std::sync::Arc;

/// The longest client ID or topic, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A client ID: 1 to 128 ASCII letters, digits or `- _ . : @`.
///
/// Cloning is a reference count; the registry and the connection share one
/// allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(Arc<str>);

/// A topic name: 1 to 128 ASCII letters, digits or `- _ . : @ /`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

/// Why a client ID or topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name was empty.
    #[error("{kind} is empty: use 1 to {MAX_NAME_LEN} characters")]
    Empty {
        /// "client id" or "topic".
        kind: &'static str,
    },
    /// The name was longer than [`MAX_NAME_LEN`].
    #[error("{kind} is {len} bytes long: the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// "client id" or "topic".
        kind: &'static str,
        /// Its length.
        len: usize,
    },
    /// The name had a character outside the allowed set.
    #[error("{kind} {name:?} contains {bad:?}: use ASCII letters, digits or {allowed}")]
    BadChar {
        /// "client id" or "topic".
        kind: &'static str,
        /// The name, cut to 40 characters.
        name: String,
        /// The first character not allowed.
        bad: char,
        /// The punctuation that is allowed.
        allowed: &'static str,
    },
}

fn check(kind: &'static str, name: &str, allowed: &'static str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            kind,
            len: name.len(),
        });
    }
    if let Some(bad) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || allowed.contains(c)))
    {
        return Err(NameError::BadChar {
            kind,
            name: name.chars().take(40).collect(),
            bad,
            allowed,
        });
    }
    Ok(())
}

impl ClientId {
    /// Checks and wraps a client ID.
    pub fn new(id: &str) -> Result<Self, NameError> {
        check("client id", id, "-_.:@")?;
        Ok(Self(Arc::from(id)))
    }

    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<u64> for ClientId {
    fn from(n: u64) -> Self {
        let mut buf = [0u8; 20];
        Self(Arc::from(decimal(n, &mut buf)))
    }
}

impl From<i64> for ClientId {
    fn from(n: i64) -> Self {
        if n >= 0 {
            return Self::from(n as u64);
        }
        let mut buf = [0u8; 21];
        let digits = decimal(n.unsigned_abs(), &mut buf[1..]).len();
        let start = 20 - digits;
        buf[start] = b'-';
        Self(Arc::from(
            std::str::from_utf8(&buf[start..]).unwrap_or_default(),
        ))
    }
}

/// Writes `n` in decimal at the end of `buf` (at least 20 bytes) and
/// returns the digits: one allocation per ID (the `Arc`), not two as with
/// `to_string()`. Relay frames name targets by number, so this runs once per
/// target per message.
fn decimal(mut n: u64, buf: &mut [u8]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[at..]).unwrap_or_default()
}

impl Topic {
    /// Checks and wraps a topic name.
    pub fn new(topic: &str) -> Result<Self, NameError> {
        check("topic", topic, "-_.:@/")?;
        Ok(Self(Arc::from(topic)))
    }

    /// The topic as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_like {
    ($ty:ty) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}
string_like!(ClientId);
string_like!(Topic);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_their_strings_are_the_same_id() {
        assert_eq!(ClientId::from(42u64), ClientId::new("42").expect("valid"));
        assert_eq!(ClientId::from(-7i64), ClientId::new("-7").expect("valid"));
        for n in [0u64, 9, 10, 1234567890, u64::MAX] {
            assert_eq!(ClientId::from(n).as_str(), n.to_string());
        }
        for n in [i64::MIN, -1, 0, 5, i64::MAX] {
            assert_eq!(ClientId::from(n).as_str(), n.to_string());
        }
    }

    #[test]
    fn refuses_bad_names_with_the_reason() {
        assert!(matches!(ClientId::new(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            ClientId::new(&"x".repeat(129)),
            Err(NameError::TooLong { len: 129, .. })
        ));
        let err = ClientId::new("a b").expect_err("space");
        assert!(err.to_string().contains("' '"), "{err}");
        assert!(ClientId::new("a/b").is_err());
        assert!(Topic::new("room/42").is_ok());
        assert!(ClientId::new("user@example.com").is_ok());
    }
}
