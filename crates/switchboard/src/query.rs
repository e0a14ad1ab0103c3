//! Reading the query parameters the server acts on (`id`, `token`,
//! `scope`): each at most once.
//!
//! Why strict: read through a map, `?id=a&id=b` means `b`; read as a list,
//! `a`. The server used to do both, depending on the parameter, and a proxy,
//! a log or an embedder's own middleware may pick either. Two readers of
//! one URL disagreeing on which value counts is how a check made by one is
//! slipped past the other, so a repeated parameter the server reads is a
//! 400 `invalid_query` that names it. Parameters the server does not read
//! are not looked at.

use http::{StatusCode, Uri};

use crate::http_error::HttpError;

/// The value of the query parameter `name` of `uri` (percent-decoded, `+`
/// as a space, invalid UTF-8 replaced by U+FFFD — the
/// `application/x-www-form-urlencoded` reading axum's `Query` uses), `None`
/// when absent; 400 `invalid_query` when `name` is given more than once.
///
/// Why not axum's `Query<Vec<(String, String)>>`: it allocates every key
/// and value of the query, and a WebSocket upgrade reads `id` and `token`
/// this way — ~2,400 instructions per handshake (callgrind) against a few
/// hundred here, where only the wanted value is copied.
pub(crate) fn param(uri: &Uri, name: &str) -> Result<Option<String>, HttpError> {
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    let mut values = form_urlencoded::parse(query.as_bytes()).filter(|(key, _)| key == name);
    let first = values.next().map(|(_, value)| value.into_owned());
    let more = values.count();
    if more > 0 {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!(
                "the query parameter `{name}` is given {} times: give it once",
                more + 1
            ),
        ));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(uri: &str, name: &str) -> Result<Option<String>, HttpError> {
        param(&uri.parse().expect("uri"), name)
    }

    #[test]
    fn once_or_not_at_all() {
        assert_eq!(
            get("/ws?id=a%20b&x=1", "id").expect("ok").as_deref(),
            Some("a b")
        );
        assert_eq!(get("/ws?x=1&x=2", "id").expect("ok"), None);
        assert_eq!(get("/ws", "id").expect("ok"), None);
        assert_eq!(get("/ws?", "id").expect("ok"), None);
        // Form decoding, as axum's `Query` reads it: `+` is a space, an
        // encoded key counts, a key without `=` has an empty value, bad
        // UTF-8 is replaced.
        assert_eq!(get("/ws?id=a+b", "id").expect("ok").as_deref(), Some("a b"));
        assert_eq!(get("/ws?i%64=7", "id").expect("ok").as_deref(), Some("7"));
        assert_eq!(get("/ws?x&id", "id").expect("ok").as_deref(), Some(""));
        assert_eq!(
            get("/ws?id=%FF", "id").expect("ok").as_deref(),
            Some("\u{FFFD}")
        );
        for uri in ["/ws?id=a&id=b", "/ws?id=a&x=1&id=a", "/ws?id&id=b"] {
            let err = get(uri, "id").expect_err(uri);
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.code, "invalid_query");
            assert!(
                err.message.contains("`id` is given 2 times"),
                "{}",
                err.message
            );
        }
    }
}
