//! Entry points for fuzzers (`fuzz/`, run with `cargo +nightly fuzz`) and
//! for the corpus replay test. Not part of the public API: each function
//! feeds arbitrary bytes to one parser and panics only if the parser does.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};

use crate::protocol::deflate::{Compression, negotiate};
use crate::protocol::handshake::accept_key;

/// Feeds `data` to the frame reader, cut into chunks whose sizes come from
/// the first byte, with and without permessage-deflate agreed.
pub fn frames(data: &[u8]) {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    crate::runtime::reader::fuzz_reader(rest, usize::from(chunk).max(1));
}

/// Parses `data` as a relay frame and as `/api/send` and `/api/publish`
/// bodies.
pub fn relay(data: &[u8]) {
    let _ = crate::app::relay::parse(data, 100);
    let _ = crate::app::relay::parse_send(data, 100);
    let _ = crate::app::relay::parse_publish(data);
}

/// Parses `data` as an HTTP request head (httparse) and runs the upgrade
/// checks and the permessage-deflate negotiation on it.
pub fn handshake(data: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    if request.parse(data).is_err() {
        return;
    }
    let mut map = HeaderMap::new();
    for h in request.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            map.append(name, value);
        }
    }
    let method = request
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .unwrap_or(Method::GET);
    let version = if request.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let _ = accept_key(&method, version, &map);
    let on = Compression {
        enabled: true,
        ..Compression::default()
    };
    let _ = negotiate(
        &on,
        map.get_all(http::header::SEC_WEBSOCKET_EXTENSIONS).iter(),
    );
    let _ = Bytes::new();
}
