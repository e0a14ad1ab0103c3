//! The opening handshake (RFC 6455 §4.2): checking a client's upgrade
//! request and computing `Sec-WebSocket-Accept`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use sha1::{Digest, Sha1};

use crate::http_error::HttpError;

/// The GUID every server appends to the client's key (RFC 6455 §1.3).
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Checks that a request is a valid WebSocket upgrade and returns the
/// `Sec-WebSocket-Accept` value to answer it with.
///
/// The order of the checks decides which error a client sees: a plain
/// HTTP request (no `Upgrade: websocket`) gets 426 and the headers that say
/// how to upgrade; a WebSocket request with a missing or broken field gets a
/// 400 that names the field.
pub(crate) fn accept_key(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<HeaderValue, HttpError> {
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err(HttpError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket only: send a GET with `Upgrade: websocket` (RFC 6455 §4.1)",
        )
        .with_header(header::UPGRADE, HeaderValue::from_static("websocket"))
        .with_header(header::CONNECTION, HeaderValue::from_static("Upgrade")));
    }
    if method != Method::GET {
        return Err(HttpError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("a WebSocket upgrade must use GET, not {method} (RFC 6455 §4.1)"),
        ));
    }
    if version < Version::HTTP_11 {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "bad_handshake",
            format!("a WebSocket upgrade needs HTTP/1.1 or later, got {version:?} (RFC 6455 §4.1)"),
        ));
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "bad_handshake",
            "the `Connection` header must contain `Upgrade` (RFC 6455 §4.1)",
        ));
    }
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"13");
    if !version_ok {
        return Err(HttpError::new(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_version",
            "`Sec-WebSocket-Version` must be 13 (RFC 6455 §4.4)",
        )
        .with_header(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|v| v.as_bytes().trim_ascii())
        .ok_or_else(|| {
            HttpError::new(
                StatusCode::BAD_REQUEST,
                "bad_handshake",
                "missing `Sec-WebSocket-Key` header (RFC 6455 §4.1)",
            )
        })?;
    let decodes_to_16 = BASE64.decode(key).is_ok_and(|raw| raw.len() == 16);
    if !decodes_to_16 {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "bad_handshake",
            "`Sec-WebSocket-Key` must be 16 bytes in base64 (RFC 6455 §4.1)",
        ));
    }
    Ok(accept_value(key))
}

/// `base64(SHA-1(key ++ GUID))` (RFC 6455 §4.2.2).
pub(crate) fn accept_value(key: &[u8]) -> HeaderValue {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    let encoded = BASE64.encode(sha.finalize());
    // Base64 output is always a valid header value.
    HeaderValue::from_str(&encoded).unwrap_or(HeaderValue::from_static(""))
}

/// Whether a comma-separated header contains `token`, ignoring case.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h
    }

    #[test]
    fn computes_the_rfc_example_accept_value() {
        let accept = accept_key(&Method::GET, Version::HTTP_11, &upgrade_headers()).expect("valid");
        // The example of RFC 6455 §1.3.
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn names_what_is_wrong() {
        let mut plain = upgrade_headers();
        plain.remove(header::UPGRADE);
        let err = accept_key(&Method::GET, Version::HTTP_11, &plain).expect_err("plain GET");
        assert_eq!(err.status, StatusCode::UPGRADE_REQUIRED);

        let mut bad_key = upgrade_headers();
        bad_key.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("c2hvcnQ="),
        );
        let err = accept_key(&Method::GET, Version::HTTP_11, &bad_key).expect_err("short key");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);

        let mut old = upgrade_headers();
        old.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        let err = accept_key(&Method::GET, Version::HTTP_11, &old).expect_err("version 8");
        assert_eq!(err.code, "unsupported_version");

        let err =
            accept_key(&Method::POST, Version::HTTP_11, &upgrade_headers()).expect_err("POST");
        assert_eq!(err.status, StatusCode::METHOD_NOT_ALLOWED);
    }
}
