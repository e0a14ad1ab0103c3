//! The opening handshake of `/ws` (and the other WebSocket routes): every
//! wrong request gets an exact status and a JSON error before any upgrade,
//! and the duplicate-ID policies.

mod common;

use std::time::Duration;

use common::*;
use switchboard::{DuplicateIds, Limits};

const QUIET: Duration = Duration::from_millis(200);

/// Upgrade headers with `name` replaced by `value`, or removed when `value`
/// is `None`.
fn headers_with(name: &str, value: Option<&'static str>) -> Vec<(&'static str, &'static str)> {
    let mut headers: Vec<_> = upgrade_headers()
        .into_iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case(name))
        .collect();
    if let Some(value) = value {
        let name = upgrade_headers()
            .into_iter()
            .map(|(n, _)| n)
            .find(|n| n.eq_ignore_ascii_case(name))
            .unwrap_or_else(|| panic!("unknown header {name}"));
        headers.push((name, value));
    }
    headers
}

/// Asserts a JSON error response and that nothing was upgraded or
/// registered.
async fn assert_refused(server: &TestServer, response: &RawResponse, status: u16, code: &str) {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(response.error_code(), code, "{response:?}");
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{response:?}"
    );
    assert!(response.header("sec-websocket-accept").is_none());
    assert_eq!(server.hub.live_connections(), 0);
    let clients = http_get(server.addr, "/api/connections").await.json();
    assert_eq!(clients["clients"], serde_json::json!([]), "{clients}");
}

// ---------------------------------------------------------------------------
// The `id` query parameter
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ws_without_id_is_400_missing_id() {
    let server = TestServer::start().await;
    let response = http_upgrade(server.addr, "/ws", &upgrade_headers()).await;
    assert_refused(&server, &response, 400, "missing_id").await;

    // Other query parameters are not an id.
    let response = http_upgrade(server.addr, "/ws?user=1", &upgrade_headers()).await;
    assert_refused(&server, &response, 400, "missing_id").await;
}

#[tokio::test]
async fn ws_with_an_empty_id_is_400_invalid_id() {
    let server = TestServer::start().await;
    let response = http_upgrade(server.addr, "/ws?id=", &upgrade_headers()).await;
    assert_refused(&server, &response, 400, "invalid_id").await;
}

#[tokio::test]
async fn ws_with_a_space_in_the_id_is_400_invalid_id() {
    let server = TestServer::start().await;
    let response = http_upgrade(server.addr, "/ws?id=a%20b", &upgrade_headers()).await;
    assert_refused(&server, &response, 400, "invalid_id").await;
}

#[tokio::test]
async fn ws_with_a_slash_in_the_id_is_400_invalid_id() {
    let server = TestServer::start().await;
    let response = http_upgrade(server.addr, "/ws?id=a%2Fb", &upgrade_headers()).await;
    assert_refused(&server, &response, 400, "invalid_id").await;
}

#[tokio::test]
async fn ws_with_a_129_character_id_is_400_invalid_id() {
    let server = TestServer::start().await;
    let target = format!("/ws?id={}", "x".repeat(129));
    let response = http_upgrade(server.addr, &target, &upgrade_headers()).await;
    assert_refused(&server, &response, 400, "invalid_id").await;
}

#[tokio::test]
async fn ws_with_a_128_character_id_is_accepted() {
    let server = TestServer::start().await;
    let id = "x".repeat(128);
    let mut long = server.connect(&format!("/ws?id={id}")).await;
    let mut sender = server.connect("/ws?id=1").await;
    send_text(
        &mut sender,
        &format!(r#"{{"targets":["{id}"],"payload":"ok"}}"#),
    )
    .await;
    assert_eq!(recv_text(&mut long).await, r#""ok""#);
}

#[tokio::test]
async fn the_id_check_comes_after_the_upgrade_check() {
    // A plain GET to /ws without an id is told to upgrade, not about the id.
    let server = TestServer::start().await;
    let response = http_get(server.addr, "/ws").await;
    assert_refused(&server, &response, 426, "upgrade_required").await;
}

// ---------------------------------------------------------------------------
// The upgrade request itself
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_plain_get_is_426_upgrade_required_with_the_upgrade_header() {
    let server = TestServer::start().await;
    for path in ["/ws?id=1", "/echo", "/chat"] {
        let response = http_get(server.addr, path).await;
        assert_eq!(response.status, 426, "{path}: {response:?}");
        assert_eq!(response.error_code(), "upgrade_required", "{path}");
        assert_eq!(response.header("upgrade"), Some("websocket"), "{path}");
    }
    assert_eq!(server.hub.live_connections(), 0);
}

#[tokio::test]
async fn a_post_with_upgrade_headers_is_405_method_not_allowed() {
    let server = TestServer::start().await;
    let response = http_request(server.addr, "POST", "/ws?id=1", &upgrade_headers(), b"").await;
    assert_refused(&server, &response, 405, "method_not_allowed").await;

    let response = http_request(server.addr, "PUT", "/echo", &upgrade_headers(), b"").await;
    assert_eq!(response.status, 405, "{response:?}");
    assert_eq!(response.error_code(), "method_not_allowed");
}

#[tokio::test]
async fn a_short_key_is_400_bad_handshake() {
    let server = TestServer::start().await;
    // Valid base64, but 5 bytes, not 16.
    let headers = headers_with("Sec-WebSocket-Key", Some("c2hvcnQ="));
    let response = http_upgrade(server.addr, "/ws?id=1", &headers).await;
    assert_refused(&server, &response, 400, "bad_handshake").await;
}

#[tokio::test]
async fn a_key_that_is_not_base64_is_400_bad_handshake() {
    let server = TestServer::start().await;
    let headers = headers_with("Sec-WebSocket-Key", Some("!!!!not-base64!!!!!!!!=="));
    let response = http_upgrade(server.addr, "/ws?id=1", &headers).await;
    assert_refused(&server, &response, 400, "bad_handshake").await;
}

#[tokio::test]
async fn a_missing_key_is_400_bad_handshake() {
    let server = TestServer::start().await;
    let headers = headers_with("Sec-WebSocket-Key", None);
    let response = http_upgrade(server.addr, "/ws?id=1", &headers).await;
    assert_refused(&server, &response, 400, "bad_handshake").await;
}

#[tokio::test]
async fn a_connection_header_without_upgrade_is_400_bad_handshake() {
    let server = TestServer::start().await;
    let headers = headers_with("Connection", Some("keep-alive"));
    let response = http_upgrade(server.addr, "/ws?id=1", &headers).await;
    assert_refused(&server, &response, 400, "bad_handshake").await;
}

#[tokio::test]
async fn a_missing_connection_header_is_400_bad_handshake() {
    let server = TestServer::start().await;
    let headers = headers_with("Connection", None);
    let response = http_upgrade(server.addr, "/ws?id=1", &headers).await;
    assert_refused(&server, &response, 400, "bad_handshake").await;
}

#[tokio::test]
async fn version_8_is_426_unsupported_version_naming_13() {
    let server = TestServer::start().await;
    let headers = headers_with("Sec-WebSocket-Version", Some("8"));
    let response = http_upgrade(server.addr, "/ws?id=1", &headers).await;
    assert_refused(&server, &response, 426, "unsupported_version").await;
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
}

#[tokio::test]
async fn a_missing_version_is_426_unsupported_version_naming_13() {
    let server = TestServer::start().await;
    let headers = headers_with("Sec-WebSocket-Version", None);
    let response = http_upgrade(server.addr, "/ws?id=1", &headers).await;
    assert_refused(&server, &response, 426, "unsupported_version").await;
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
}

#[tokio::test]
async fn http_1_0_upgrade_is_400_bad_handshake() {
    let server = TestServer::start().await;
    let request = format!(
        "GET /ws?id=1 HTTP/1.0\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {RFC_KEY}\r\n\r\n",
        server.addr
    );
    let response = http_raw(server.addr, request.as_bytes()).await;
    assert_refused(&server, &response, 400, "bad_handshake").await;
}

#[tokio::test]
async fn the_accept_value_for_the_rfc_key_is_correct() {
    let server = TestServer::start().await;
    for path in ["/ws?id=1", "/echo", "/chat"] {
        let response = http_upgrade(server.addr, path, &upgrade_headers()).await;
        assert_eq!(response.status, 101, "{path}: {response:?}");
        assert_eq!(
            response.header("sec-websocket-accept"),
            Some(RFC_ACCEPT),
            "{path}"
        );
        assert!(
            response
                .header("upgrade")
                .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
            "{path}: {response:?}"
        );
        assert!(
            response
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
            "{path}: {response:?}"
        );
    }
}

#[tokio::test]
async fn header_tokens_are_matched_case_insensitively_and_in_lists() {
    // Firefox sends `Connection: keep-alive, Upgrade`; some clients write
    // `Upgrade: WebSocket`.
    let server = TestServer::start().await;
    let headers = vec![
        ("Upgrade", "WebSocket"),
        ("Connection", "keep-alive, Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", RFC_KEY),
    ];
    let response = http_upgrade(server.addr, "/ws?id=1", &headers).await;
    assert_eq!(response.status, 101, "{response:?}");
    assert_eq!(response.header("sec-websocket-accept"), Some(RFC_ACCEPT));
}

#[tokio::test]
async fn refused_handshakes_are_counted_and_the_server_keeps_working() {
    let server = TestServer::start().await;
    let _ = http_get(server.addr, "/echo").await;
    let _ = http_upgrade(
        server.addr,
        "/echo",
        &headers_with("Sec-WebSocket-Version", Some("8")),
    )
    .await;
    assert_eq!(
        server
            .hub
            .metrics()
            .errors(switchboard::ErrorKind::Handshake),
        2
    );
    let mut echo = server.connect("/echo").await;
    send_text(&mut echo, "still up").await;
    assert_eq!(recv_text(&mut echo).await, "still up");
}

// ---------------------------------------------------------------------------
// Duplicate IDs
// ---------------------------------------------------------------------------

fn limits_with(policy: DuplicateIds) -> Limits {
    Limits {
        duplicate_ids: policy,
        ..Limits::default()
    }
}

#[tokio::test]
async fn duplicate_ids_allow_keeps_both_connections() {
    let server = TestServer::with_limits(limits_with(DuplicateIds::Allow)).await;
    let mut first = server.connect("/ws?id=7").await;
    let mut second = server.connect("/ws?id=7").await;
    let mut sender = server.connect("/ws?id=1").await;

    send_text(&mut sender, r#"{"targets":[7],"payload":"both"}"#).await;
    assert_eq!(recv_text(&mut first).await, r#""both""#);
    assert_eq!(recv_text(&mut second).await, r#""both""#);

    let listing = http_get(server.addr, "/api/connections").await.json();
    let seven = listing["clients"]
        .as_array()
        .expect("clients array")
        .iter()
        .find(|c| c["id"] == "7")
        .cloned()
        .expect("id 7 listed");
    assert_eq!(seven["connections"], 2, "{listing}");
}

#[tokio::test]
async fn duplicate_ids_replace_oldest_closes_the_old_connection_with_4001() {
    let server = TestServer::with_limits(limits_with(DuplicateIds::ReplaceOldest)).await;
    let mut old = server.connect("/ws?id=7").await;
    let mut new = server.connect("/ws?id=7").await;

    assert_eq!(close_code(recv_close(&mut old).await), 4001);
    drain_until_closed(&mut old).await;
    server
        .eventually("the old connection is gone", |hub| {
            hub.live_connections() == 1
        })
        .await;

    let mut sender = server.connect("/ws?id=1").await;
    send_text(&mut sender, r#"{"targets":[7],"payload":"to new"}"#).await;
    assert_eq!(recv_text(&mut new).await, r#""to new""#);
    assert_silent(&mut new, QUIET).await;

    let listing = http_get(server.addr, "/api/connections").await.json();
    let seven = listing["clients"]
        .as_array()
        .expect("clients array")
        .iter()
        .find(|c| c["id"] == "7")
        .cloned()
        .expect("id 7 listed");
    assert_eq!(seven["connections"], 1, "{listing}");

    // A third connection replaces the second in turn.
    let mut third = server.connect("/ws?id=7").await;
    assert_eq!(close_code(recv_close(&mut new).await), 4001);
    drain_until_closed(&mut new).await;
    send_text(&mut sender, r#"{"targets":[7],"payload":"to third"}"#).await;
    assert_eq!(recv_text(&mut third).await, r#""to third""#);
}

#[tokio::test]
async fn duplicate_ids_replace_oldest_does_not_touch_other_ids() {
    let server = TestServer::with_limits(limits_with(DuplicateIds::ReplaceOldest)).await;
    let mut other = server.connect("/ws?id=8").await;
    let _old = server.connect("/ws?id=7").await;
    let _new = server.connect("/ws?id=7").await;
    assert_silent(&mut other, QUIET).await;
    let mut sender = server.connect("/ws?id=1").await;
    send_text(&mut sender, r#"{"targets":[8],"payload":"fine"}"#).await;
    assert_eq!(recv_text(&mut other).await, r#""fine""#);
}

#[tokio::test]
async fn duplicate_ids_reject_new_answers_409_id_in_use() {
    let server = TestServer::with_limits(limits_with(DuplicateIds::RejectNew)).await;
    let mut first = server.connect("/ws?id=7").await;

    let response = http_upgrade(server.addr, "/ws?id=7", &upgrade_headers()).await;
    assert_eq!(response.status, 409, "{response:?}");
    assert_eq!(response.error_code(), "id_in_use");
    assert!(response.header("sec-websocket-accept").is_none());

    // A real client is refused too.
    let refused = tokio_tungstenite::connect_async(server.url("/ws?id=7")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 409);
        }
        other => panic!("expected HTTP 409, got {other:?}"),
    }

    // The first connection still works and is the only one for the ID.
    let mut sender = server.connect("/ws?id=1").await;
    send_text(&mut sender, r#"{"targets":[7],"payload":"first"}"#).await;
    assert_eq!(recv_text(&mut first).await, r#""first""#);
    assert_eq!(server.hub.live_connections(), 2);

    // Once it is gone, the ID can connect again.
    first.close(None).await.expect("close first");
    server
        .eventually("the first connection is gone", |hub| {
            hub.live_connections() == 1
        })
        .await;
    let mut again = server.connect("/ws?id=7").await;
    send_text(&mut sender, r#"{"targets":[7],"payload":"again"}"#).await;
    assert_eq!(recv_text(&mut again).await, r#""again""#);
}
