//! The backend's HTTP API (`/api/…`), `/heartbeat`, `/metrics` and the
//! JSON 404/405 fallbacks, over real HTTP/1.1.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;
use switchboard::Limits;

const QUIET: Duration = Duration::from_millis(200);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

fn assert_json_content_type(response: &RawResponse) {
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{response:?}"
    );
}

// ---------------------------------------------------------------------------
// POST /api/send
// ---------------------------------------------------------------------------

#[tokio::test]
async fn send_reports_delivered_and_offline_targets_as_written() {
    let server = TestServer::start().await;
    let mut one = server.connect("/ws?id=1").await;
    let mut bob = server.connect("/ws?id=bob").await;
    let mut bystander = server.connect("/ws?id=2").await;

    let response = http_post_json(
        server.addr,
        "/api/send",
        r#"{"targets":[1,"bob",99],"payload":{"x":1}}"#,
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_json_content_type(&response);
    assert_eq!(
        response.json(),
        json!({"delivered":[1,"bob"],"offline":[99],"dropped":[]})
    );
    assert_eq!(recv_text(&mut one).await, r#"{"x":1}"#);
    assert_eq!(recv_text(&mut bob).await, r#"{"x":1}"#);
    assert_silent(&mut bystander, QUIET).await;
    assert_silent(&mut one, Duration::from_millis(20)).await;
    assert_silent(&mut bob, Duration::from_millis(20)).await;
}

#[tokio::test]
async fn send_echoes_each_target_the_way_it_was_written() {
    let server = TestServer::start().await;
    let mut one = server.connect("/ws?id=1").await;
    let mut minus = server.connect("/ws?id=-3").await;

    // "1" written as a string is reported as a string; a repeated target
    // is reported as often as it is written, but delivered once.
    let response = http_post_json(
        server.addr,
        "/api/send",
        r#"{"targets":["1",-3,1,"ghost",-4],"payload":"hi"}"#,
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.json(),
        json!({"delivered":["1",-3,1],"offline":["ghost",-4],"dropped":[]})
    );
    assert_eq!(recv_text(&mut one).await, r#""hi""#);
    assert_eq!(recv_text(&mut minus).await, r#""hi""#);
    assert_silent(&mut one, QUIET).await;
}

#[tokio::test]
async fn send_reports_every_target_as_written_in_the_list_of_its_id() {
    let server = TestServer::start().await;
    let mut echo = server.connect("/echo").await;
    let mut one = server.connect("/ws?id=1").await;

    let response = http_post_json(
        server.addr,
        "/api/send",
        r#"{"targets":["1",1,"x"],"payload":"once"}"#,
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.json(),
        json!({"delivered":["1",1],"offline":["x"],"dropped":[]})
    );
    // Delivered once per ID, however often it is listed.
    assert_eq!(recv_text(&mut one).await, r#""once""#);
    assert_silent(&mut one, QUIET).await;
    assert_echo_answers(&mut echo, "still here").await;

    // In the order written, repeats included, each in one list.
    let response = http_post_json(
        server.addr,
        "/api/send",
        r#"{"targets":["x",1,"x","1",1,"y"],"payload":2}"#,
    )
    .await;
    assert_eq!(
        response.json(),
        json!({"delivered":[1,"1",1],"offline":["x","x","y"],"dropped":[]})
    );
    assert_eq!(recv_text(&mut one).await, "2");
    assert_silent(&mut one, QUIET).await;
}

#[tokio::test]
async fn send_reaches_every_connection_of_a_target() {
    let server = TestServer::start().await;
    let mut tab_a = server.connect("/ws?id=u").await;
    let mut tab_b = server.connect("/ws?id=u").await;

    let response =
        http_post_json(server.addr, "/api/send", r#"{"targets":["u"],"payload":5}"#).await;
    assert_eq!(
        response.json(),
        json!({"delivered":["u"],"offline":[],"dropped":[]})
    );
    assert_eq!(recv_text(&mut tab_a).await, "5");
    assert_eq!(recv_text(&mut tab_b).await, "5");
}

#[tokio::test]
async fn send_with_no_targets_reports_empty_lists() {
    let server = TestServer::start().await;
    let response = http_post_json(server.addr, "/api/send", r#"{"targets":[],"payload":1}"#).await;
    assert_eq!(response.status, 200);
    assert_eq!(
        response.json(),
        json!({"delivered":[],"offline":[],"dropped":[]})
    );
}

#[tokio::test]
async fn send_to_a_connection_that_is_closing_reports_it_dropped() {
    let server = TestServer::start().await;
    let mut closing = server.connect("/ws?id=c").await;

    // The API closes it; until the client answers the close frame the
    // connection is still registered, but takes no more messages.
    let deleted = http_delete(server.addr, "/api/connections/c").await;
    assert_eq!(deleted.json(), json!({"closed": 1}));
    let response =
        http_post_json(server.addr, "/api/send", r#"{"targets":["c"],"payload":1}"#).await;
    assert_eq!(response.status, 200);
    assert_eq!(
        response.json(),
        json!({"delivered":[],"offline":[],"dropped":["c"]})
    );
    assert_eq!(server.hub.metrics().dropped_messages.get(), 1);
    assert_eq!(close_code(recv_close(&mut closing).await), 4000);
}

#[tokio::test]
async fn send_with_a_null_payload_delivers_null() {
    // `null` is a JSON value: "payload": null is present, not missing.
    let server = TestServer::start().await;
    let mut one = server.connect("/ws?id=1").await;
    let response = http_post_json(
        server.addr,
        "/api/send",
        r#"{"targets":[1],"payload":null}"#,
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.json(),
        json!({"delivered":[1],"offline":[],"dropped":[]})
    );
    assert_eq!(recv_text(&mut one).await, "null");
}

// ---------------------------------------------------------------------------
// POST /api/publish
// ---------------------------------------------------------------------------

#[tokio::test]
async fn publish_reports_the_number_of_recipients() {
    let server = TestServer::start().await;
    let mut a = server.connect("/ws?id=a").await;
    let mut b = server.connect("/ws?id=b").await;
    let mut b2 = server.connect("/ws?id=b").await;
    let mut elsewhere = server.connect("/ws?id=e").await;
    for (client, topic) in [
        (&mut a, "news"),
        (&mut b, "news"),
        (&mut b2, "news"),
        (&mut elsewhere, "other"),
    ] {
        send_text(
            client,
            &format!(r#"{{"type":"subscribe","topic":"{topic}"}}"#),
        )
        .await;
        assert_eq!(recv_json(client).await, json!({ "subscribed": topic }));
    }

    let response = http_post_json(
        server.addr,
        "/api/publish",
        r#"{"topic":"news","payload":[1,{"k":"v"}]}"#,
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_json_content_type(&response);
    assert_eq!(response.json(), json!({"recipients": 3}));
    for client in [&mut a, &mut b, &mut b2] {
        assert_eq!(recv_text(client).await, r#"[1,{"k":"v"}]"#);
    }
    assert_silent(&mut elsewhere, QUIET).await;

    let response = http_post_json(
        server.addr,
        "/api/publish",
        r#"{"topic":"nobody-here","payload":1}"#,
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.json(), json!({"recipients": 0}));
    assert_eq!(server.hub.metrics().publish_deliveries.get(), 3);
}

// ---------------------------------------------------------------------------
// GET /api/connections
// ---------------------------------------------------------------------------

#[tokio::test]
async fn connections_is_empty_on_a_fresh_server() {
    let server = TestServer::start().await;
    let response = http_get(server.addr, "/api/connections").await;
    assert_eq!(response.status, 200);
    assert_json_content_type(&response);
    assert_eq!(
        response.json(),
        json!({"clients":[],"clients_total":0,"connections_open":0})
    );
}

#[tokio::test]
async fn connections_lists_ids_counts_and_connected_since() {
    let server = TestServer::start().await;
    let before = now_ms();
    let _one_a = server.connect("/ws?id=1").await;
    let between = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _one_b = server.connect("/ws?id=1").await;
    let _bob = server.connect("/ws?id=bob").await;
    // Connections without an ID are open but not listed as clients.
    let _echo = server.connect("/echo").await;
    let after = now_ms();

    let response = http_get(server.addr, "/api/connections").await;
    assert_eq!(response.status, 200);
    let body = response.json();
    assert_eq!(body["clients_total"], 2, "{body}");
    assert_eq!(body["connections_open"], 4, "{body}");
    let clients = body["clients"].as_array().expect("clients array");
    assert_eq!(clients.len(), 2, "{body}");

    let one = clients
        .iter()
        .find(|c| c["id"] == "1")
        .unwrap_or_else(|| panic!("id 1 listed: {body}"));
    assert_eq!(one["connections"], 2, "{body}");
    let since = one["connected_since_unix_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("connected_since_unix_ms is an integer: {body}"));
    // The oldest connection's time.
    assert!(
        (before..=between).contains(&since),
        "{before} <= {since} <= {between}"
    );

    let bob = clients
        .iter()
        .find(|c| c["id"] == "bob")
        .unwrap_or_else(|| panic!("bob listed: {body}"));
    assert_eq!(bob["connections"], 1, "{body}");
    let since = bob["connected_since_unix_ms"].as_u64().expect("integer");
    assert!(
        (between..=after).contains(&since),
        "{between} <= {since} <= {after}"
    );
}

#[tokio::test]
async fn connections_forgets_clients_that_left() {
    let server = TestServer::start().await;
    let mut gone = server.connect("/ws?id=gone").await;
    let _stays = server.connect("/ws?id=stays").await;
    gone.close(None).await.expect("close");
    drain_until_closed(&mut gone).await;
    server
        .eventually("one connection left", |hub| hub.live_connections() == 1)
        .await;

    let body = http_get(server.addr, "/api/connections").await.json();
    assert_eq!(body["clients_total"], 1, "{body}");
    assert_eq!(body["connections_open"], 1, "{body}");
    assert_eq!(body["clients"][0]["id"], "stays", "{body}");
}

// ---------------------------------------------------------------------------
// DELETE /api/connections/{id}
// ---------------------------------------------------------------------------

#[tokio::test]
async fn delete_closes_every_connection_of_the_id_with_4000() {
    let server = TestServer::start().await;
    let mut one_a = server.connect("/ws?id=1").await;
    let mut one_b = server.connect("/ws?id=1").await;
    let mut bob = server.connect("/ws?id=bob").await;

    let response = http_delete(server.addr, "/api/connections/1").await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_json_content_type(&response);
    assert_eq!(response.json(), json!({"closed": 2}));

    for client in [&mut one_a, &mut one_b] {
        assert_eq!(close_code(recv_close(client).await), 4000);
        drain_until_closed(client).await;
    }
    server
        .eventually("id 1's connections are gone", |hub| {
            hub.live_connections() == 1
        })
        .await;

    // bob was not touched and still works.
    assert_silent(&mut bob, QUIET).await;
    let response = http_post_json(
        server.addr,
        "/api/send",
        r#"{"targets":["bob",1],"payload":"ok"}"#,
    )
    .await;
    assert_eq!(
        response.json(),
        json!({"delivered":["bob"],"offline":[1],"dropped":[]})
    );
    assert_eq!(recv_text(&mut bob).await, r#""ok""#);

    let listing = http_get(server.addr, "/api/connections").await.json();
    assert_eq!(listing["clients_total"], 1, "{listing}");
    assert_eq!(listing["clients"][0]["id"], "bob", "{listing}");

    // Now that it is gone, deleting it again is a 404.
    let again = http_delete(server.addr, "/api/connections/1").await;
    assert_eq!(again.status, 404, "{again:?}");
    assert_eq!(again.error_code(), "not_found");
}

#[tokio::test]
async fn delete_of_an_unknown_id_is_404_not_found() {
    let server = TestServer::start().await;
    let _other = server.connect("/ws?id=other").await;
    let response = http_delete(server.addr, "/api/connections/nobody").await;
    assert_eq!(response.status, 404, "{response:?}");
    assert_json_content_type(&response);
    assert_eq!(response.error_code(), "not_found");
    assert_eq!(server.hub.live_connections(), 1);
}

#[tokio::test]
async fn delete_of_an_invalid_id_is_400_invalid_id() {
    let server = TestServer::start().await;
    for path in [
        "/api/connections/a%20b".to_owned(),
        "/api/connections/a!b".to_owned(),
        format!("/api/connections/{}", "x".repeat(129)),
    ] {
        let response = http_delete(server.addr, &path).await;
        assert_eq!(response.status, 400, "{path}: {response:?}");
        assert_eq!(response.error_code(), "invalid_id", "{path}");
    }
}

#[tokio::test]
async fn send_target_beyond_64_bits_is_an_integer_out_of_range() {
    let server = TestServer::start().await;
    let mut echo = server.connect("/echo").await;
    for (targets, says) in [
        (
            "[123456789012345678901234567890]",
            "targets[0] is an integer out of range",
        ),
        (
            "[1,18446744073709551616]",
            "targets[1] is an integer out of range",
        ),
        (
            "[-9223372036854775809]",
            "targets[0] is an integer out of range",
        ),
        ("[2.5]", "targets[0] is not an integer"),
    ] {
        let body = format!(r#"{{"targets":{targets},"payload":1}}"#);
        let response = http_post_json(server.addr, "/api/send", &body).await;
        assert_eq!(response.status, 400, "{body}: {response:?}");
        assert_eq!(response.error_code(), "invalid_target", "{body}");
        let message = error_message_of(&response.json());
        assert!(message.starts_with(says), "{body}: {message}");
        assert!(!message.contains("floating"), "{body}: {message}");
        assert_echo_answers(&mut echo, &body).await;
    }
    let message = error_message_of(
        &http_post_json(
            server.addr,
            "/api/send",
            r#"{"targets":[99999999999999999999],"payload":1}"#,
        )
        .await
        .json(),
    );
    assert!(message.contains("must fit in 64 bits"), "{message}");
    assert!(message.contains("write large ids as strings"), "{message}");

    // The relay says the same in its error frame.
    let mut one = server.connect("/ws?id=1").await;
    send_text(
        &mut one,
        r#"{"targets":[123456789012345678901234567890],"payload":1}"#,
    )
    .await;
    let frame = recv_json(&mut one).await;
    assert_eq!(error_code_of(&frame), "invalid_target");
    assert!(
        error_message_of(&frame).starts_with("targets[0] is an integer out of range"),
        "{frame}"
    );
}

// ---------------------------------------------------------------------------
// Bad bodies: 400 with the relay's codes
// ---------------------------------------------------------------------------

/// POSTs `body` to `path` and asserts 400 with `code`; no client gets
/// anything.
async fn bad_body(path: &str, body: &str, code: &str) {
    let server = TestServer::start().await;
    let mut one = server.connect("/ws?id=1").await;
    send_text(&mut one, r#"{"type":"subscribe","topic":"news"}"#).await;
    let _ack = recv_json(&mut one).await;

    let response = http_post_json(server.addr, path, body).await;
    assert_eq!(response.status, 400, "{path} {body}: {response:?}");
    assert_json_content_type(&response);
    assert_eq!(response.error_code(), code, "{path} {body}");
    assert_silent(&mut one, Duration::from_millis(100)).await;
    assert_eq!(
        server
            .hub
            .metrics()
            .errors(switchboard::ErrorKind::BadRequest),
        1
    );
}

#[tokio::test]
async fn send_body_not_json() {
    bad_body("/api/send", "targets=1", "invalid_json").await;
}

#[tokio::test]
async fn send_body_empty() {
    bad_body("/api/send", "", "invalid_json").await;
}

#[tokio::test]
async fn send_body_not_an_object() {
    bad_body("/api/send", "[1]", "not_an_object").await;
}

#[tokio::test]
async fn send_body_number_not_an_object() {
    bad_body("/api/send", "42", "not_an_object").await;
}

#[tokio::test]
async fn send_body_missing_targets() {
    bad_body("/api/send", r#"{"payload":1}"#, "missing_targets").await;
}

#[tokio::test]
async fn send_body_targets_not_an_array() {
    bad_body(
        "/api/send",
        r#"{"targets":1,"payload":1}"#,
        "invalid_targets",
    )
    .await;
}

#[tokio::test]
async fn send_body_target_a_float() {
    bad_body(
        "/api/send",
        r#"{"targets":[1.5],"payload":1}"#,
        "invalid_target",
    )
    .await;
}

#[tokio::test]
async fn send_body_target_a_bool() {
    bad_body(
        "/api/send",
        r#"{"targets":[true],"payload":1}"#,
        "invalid_target",
    )
    .await;
}

#[tokio::test]
async fn send_body_target_with_a_space() {
    bad_body(
        "/api/send",
        r#"{"targets":["a b"],"payload":1}"#,
        "invalid_target",
    )
    .await;
}

#[tokio::test]
async fn send_body_missing_payload() {
    bad_body("/api/send", r#"{"targets":[1]}"#, "missing_payload").await;
}

#[tokio::test]
async fn publish_body_not_json() {
    bad_body("/api/publish", "{", "invalid_json").await;
}

#[tokio::test]
async fn publish_body_not_an_object() {
    bad_body("/api/publish", r#""news""#, "not_an_object").await;
}

#[tokio::test]
async fn publish_body_missing_topic() {
    bad_body("/api/publish", r#"{"payload":1}"#, "missing_topic").await;
}

#[tokio::test]
async fn publish_body_topic_not_a_string() {
    bad_body(
        "/api/publish",
        r#"{"topic":5,"payload":1}"#,
        "invalid_topic",
    )
    .await;
}

#[tokio::test]
async fn publish_body_topic_with_a_space() {
    bad_body(
        "/api/publish",
        r#"{"topic":"a b","payload":1}"#,
        "invalid_topic",
    )
    .await;
}

#[tokio::test]
async fn publish_body_empty_topic() {
    bad_body(
        "/api/publish",
        r#"{"topic":"","payload":1}"#,
        "invalid_topic",
    )
    .await;
}

#[tokio::test]
async fn publish_body_missing_payload() {
    bad_body("/api/publish", r#"{"topic":"news"}"#, "missing_payload").await;
}

#[tokio::test]
async fn send_over_max_targets_is_400_too_many_targets() {
    let limits = Limits {
        max_targets: 3,
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let mut one = server.connect("/ws?id=1").await;

    let response = http_post_json(
        server.addr,
        "/api/send",
        r#"{"targets":[1,2,3,4],"payload":1}"#,
    )
    .await;
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(response.error_code(), "too_many_targets");
    assert_silent(&mut one, QUIET).await;

    // Repeats do not count against the limit.
    let response = http_post_json(
        server.addr,
        "/api/send",
        r#"{"targets":[1,2,3,1,"1",2],"payload":1}"#,
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.json(),
        json!({"delivered":[1,1,"1"],"offline":[2,3,2],"dropped":[]})
    );
    assert_eq!(recv_text(&mut one).await, "1");
}

fn small_limits() -> Limits {
    Limits {
        max_message_size: 1024,
        max_frame_size: 1024,
        ..Limits::default()
    }
}

/// A send body to id 1 of exactly `len` bytes.
fn send_body_of_len(len: usize) -> String {
    let empty = r#"{"targets":[1],"payload":""}"#;
    let body = format!(
        r#"{{"targets":[1],"payload":"{}"}}"#,
        "y".repeat(len - empty.len())
    );
    assert_eq!(body.len(), len);
    body
}

#[tokio::test]
async fn a_body_over_max_message_size_is_413_body_too_large() {
    let server = TestServer::with_limits(small_limits()).await;
    let mut one = server.connect("/ws?id=1").await;

    let response = http_post_json(server.addr, "/api/send", &send_body_of_len(1025)).await;
    assert_eq!(response.status, 413, "{response:?}");
    assert_json_content_type(&response);
    assert_eq!(response.error_code(), "body_too_large");
    let response = http_post_json(
        server.addr,
        "/api/publish",
        &format!(r#"{{"topic":"t","payload":"{}"}}"#, "z".repeat(2000)),
    )
    .await;
    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(response.error_code(), "body_too_large");
    assert_silent(&mut one, QUIET).await;

    // Exactly at the limit is accepted.
    let response = http_post_json(server.addr, "/api/send", &send_body_of_len(1024)).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.json(),
        json!({"delivered":[1],"offline":[],"dropped":[]})
    );
    let got = recv_text(&mut one).await;
    assert_eq!(got.len(), 1024 - r#"{"targets":[1],"payload":}"#.len());
}

#[tokio::test]
async fn a_chunked_body_over_max_message_size_is_413_body_too_large() {
    let server = TestServer::with_limits(small_limits()).await;
    let body = send_body_of_len(1500);
    let (a, b) = body.split_at(700);
    let request = format!(
        "POST /api/send HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        server.addr,
        a.len(),
        b.len()
    );
    let response = http_raw(server.addr, request.as_bytes()).await;
    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(response.error_code(), "body_too_large");
}

// ---------------------------------------------------------------------------
// /heartbeat, /metrics, fallbacks
// ---------------------------------------------------------------------------

#[tokio::test]
async fn heartbeat_is_200_status_ok() {
    let server = TestServer::start().await;
    let response = http_get(server.addr, "/heartbeat").await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_json_content_type(&response);
    assert_eq!(response.json(), json!({"status":"ok"}));
}

#[tokio::test]
async fn wrong_method_on_heartbeat_is_405_json() {
    let server = TestServer::start().await;
    for method in ["POST", "DELETE", "PUT"] {
        let response = http_request(server.addr, method, "/heartbeat", &[], b"").await;
        assert_eq!(response.status, 405, "{method}: {response:?}");
        assert_json_content_type(&response);
        assert_eq!(response.error_code(), "method_not_allowed", "{method}");
    }
}

#[tokio::test]
async fn wrong_method_on_api_routes_is_405_json() {
    let server = TestServer::start().await;
    for (method, path) in [
        ("GET", "/api/send"),
        ("GET", "/api/publish"),
        ("POST", "/api/connections"),
        ("GET", "/api/connections/1"),
        ("POST", "/metrics"),
    ] {
        let response = http_request(server.addr, method, path, &[], b"").await;
        assert_eq!(response.status, 405, "{method} {path}: {response:?}");
        assert_eq!(
            response.error_code(),
            "method_not_allowed",
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn unknown_paths_are_404_json() {
    let server = TestServer::start().await;
    for (method, path) in [
        ("GET", "/nope"),
        ("GET", "/"),
        ("POST", "/api/nope"),
        ("GET", "/api"),
        ("DELETE", "/api/connections/1/extra"),
    ] {
        let response = http_request(server.addr, method, path, &[], b"").await;
        assert_eq!(response.status, 404, "{method} {path}: {response:?}");
        assert_json_content_type(&response);
        assert_eq!(response.error_code(), "not_found", "{method} {path}");
    }
}

#[tokio::test]
async fn metrics_is_prometheus_text_with_the_open_connections() {
    let server = TestServer::start().await;
    let response = http_get(server.addr, "/metrics").await;
    assert_eq!(response.status, 200, "{response:?}");
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{response:?}"
    );
    let text = response.text();
    assert!(
        text.contains("# TYPE switchboard_connections_open gauge"),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "switchboard_connections_open"),
        Some(0.0)
    );

    let _a = server.connect("/ws?id=a").await;
    let _b = server.connect("/echo").await;
    let text = http_get(server.addr, "/metrics").await.text();
    assert_eq!(
        metric_value(&text, "switchboard_connections_open"),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&text, "switchboard_connections_total"),
        Some(2.0)
    );
}

#[tokio::test]
async fn metrics_count_relay_traffic_and_offline_targets() {
    let server = TestServer::start().await;
    let before = http_get(server.addr, "/metrics").await.text();
    for name in [
        "switchboard_relay_deliveries_total",
        "switchboard_frames_in_total",
        "switchboard_offline_targets_total",
    ] {
        assert_eq!(metric_value(&before, name), Some(0.0), "{name}");
    }

    let mut one = server.connect("/ws?id=1").await;
    let mut two = server.connect("/ws?id=2").await;
    for i in 0..3 {
        send_text(
            &mut one,
            &format!(r#"{{"targets":[2,98,"x99"],"payload":{i}}}"#),
        )
        .await;
        assert_eq!(recv_text(&mut two).await, i.to_string());
    }
    let response = http_post_json(
        server.addr,
        "/api/send",
        r#"{"targets":[2,97],"payload":"api"}"#,
    )
    .await;
    assert_eq!(
        response.json(),
        json!({"delivered":[2],"offline":[97],"dropped":[]})
    );
    assert_eq!(recv_text(&mut two).await, r#""api""#);

    let text = http_get(server.addr, "/metrics").await.text();
    // 3 relay frames to one connected target, 1 API send.
    assert_eq!(
        metric_value(&text, "switchboard_relay_deliveries_total"),
        Some(4.0),
        "{text}"
    );
    // 2 offline targets per relay frame, 1 in the API call.
    assert_eq!(
        metric_value(&text, "switchboard_offline_targets_total"),
        Some(7.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "switchboard_frames_in_total"),
        Some(3.0),
        "{text}"
    );
    let frames_out = metric_value(&text, "switchboard_frames_out_total").expect("frames out");
    assert!(frames_out >= 4.0, "{text}");
    let bytes_in = metric_value(&text, "switchboard_bytes_in_total").expect("bytes in");
    assert!(bytes_in > 0.0, "{text}");
    assert!(
        text.contains("switchboard_errors_total{kind=\"bad_request\"} 0"),
        "{text}"
    );

    // A bad frame is counted by kind.
    send_text(&mut one, "not json").await;
    assert_eq!(recv_error_code(&mut one).await, "invalid_json");
    let text = http_get(server.addr, "/metrics").await.text();
    assert!(
        text.contains("switchboard_errors_total{kind=\"bad_request\"} 1"),
        "{text}"
    );
}
