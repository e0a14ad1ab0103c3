//! The relay on `/ws?id=N`: delivery by ID, in the exact wire format.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use switchboard::Limits;
use tokio::sync::{Barrier, Semaphore};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(200);

#[tokio::test]
async fn delivers_the_payload_json_to_every_connection_of_each_target() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two_a = server.connect("/ws?id=2").await;
    let mut two_b = server.connect("/ws?id=2").await;
    let mut three = server.connect("/ws?id=3").await;
    let mut bystander = server.connect("/ws?id=4").await;
    server
        .eventually("five connections registered", |hub| {
            hub.live_connections() == 5
        })
        .await;

    send_text(
        &mut sender,
        r#"{"targets":[2,3],"payload":{"hello":"world","n":[1,2]}}"#,
    )
    .await;

    for client in [&mut two_a, &mut two_b, &mut three] {
        assert_eq!(recv_text(client).await, r#"{"hello":"world","n":[1,2]}"#);
    }
    assert_silent(&mut bystander, Duration::from_millis(200)).await;
    assert_silent(&mut sender, Duration::from_millis(50)).await;
}

// ---------------------------------------------------------------------------
// IDs and targets
// ---------------------------------------------------------------------------

#[tokio::test]
async fn string_ids_are_addressed_by_their_name() {
    let server = TestServer::start().await;
    let mut alice = server.connect("/ws?id=alice").await;
    let mut bob = server.connect("/ws?id=bob").await;

    send_text(&mut bob, r#"{"targets":["alice"],"payload":"hi alice"}"#).await;
    assert_eq!(recv_text(&mut alice).await, r#""hi alice""#);

    send_text(
        &mut alice,
        r#"{"targets":["bob"],"payload":{"re":"hi bob"}}"#,
    )
    .await;
    assert_eq!(recv_text(&mut bob).await, r#"{"re":"hi bob"}"#);

    assert_silent(&mut alice, QUIET).await;
    assert_silent(&mut bob, QUIET).await;
}

#[tokio::test]
async fn string_ids_with_punctuation_work() {
    let server = TestServer::start().await;
    let mut mail = server.connect("/ws?id=user@example.com").await;
    let mut sender = server.connect("/ws?id=a-b_c.d:e").await;

    send_text(
        &mut sender,
        r#"{"targets":["user@example.com"],"payload":[1,2,3]}"#,
    )
    .await;
    assert_eq!(recv_text(&mut mail).await, "[1,2,3]");

    send_text(&mut mail, r#"{"targets":["a-b_c.d:e"],"payload":true}"#).await;
    assert_eq!(recv_text(&mut sender).await, "true");
}

#[tokio::test]
async fn integer_and_string_forms_of_an_id_reach_the_same_client() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two = server.connect("/ws?id=2").await;

    send_text(&mut sender, r#"{"targets":[2],"payload":"as integer"}"#).await;
    assert_eq!(recv_text(&mut two).await, r#""as integer""#);

    send_text(&mut sender, r#"{"targets":["2"],"payload":"as string"}"#).await;
    assert_eq!(recv_text(&mut two).await, r#""as string""#);

    // Both forms in one frame are one target: delivered once.
    send_text(&mut sender, r#"{"targets":[2,"2"],"payload":"both"}"#).await;
    assert_eq!(recv_text(&mut two).await, r#""both""#);
    assert_silent(&mut two, QUIET).await;
    assert_silent(&mut sender, QUIET).await;
}

#[tokio::test]
async fn negative_integer_ids_work() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut minus = server.connect("/ws?id=-7").await;

    send_text(&mut sender, r#"{"targets":[-7],"payload":"neg"}"#).await;
    assert_eq!(recv_text(&mut minus).await, r#""neg""#);
}

#[tokio::test]
async fn a_target_listed_twice_gets_the_message_once() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two = server.connect("/ws?id=2").await;
    let mut three = server.connect("/ws?id=3").await;

    send_text(
        &mut sender,
        r#"{"targets":[2,3,2,"2",3],"payload":{"once":true}}"#,
    )
    .await;
    assert_eq!(recv_text(&mut two).await, r#"{"once":true}"#);
    assert_eq!(recv_text(&mut three).await, r#"{"once":true}"#);
    assert_silent(&mut two, QUIET).await;
    assert_silent(&mut three, QUIET).await;
}

#[tokio::test]
async fn offline_targets_are_ignored_and_the_others_still_get_theirs() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two = server.connect("/ws?id=2").await;

    send_text(
        &mut sender,
        r#"{"targets":[99,2,"nobody"],"payload":"to two"}"#,
    )
    .await;
    assert_eq!(recv_text(&mut two).await, r#""to two""#);
    // The plain relay says nothing about offline targets.
    assert_silent(&mut sender, QUIET).await;

    // Only offline targets: still nothing, and the connection keeps working.
    send_text(&mut sender, r#"{"targets":[99],"payload":"lost"}"#).await;
    assert_silent(&mut sender, QUIET).await;
    assert_silent(&mut two, Duration::from_millis(50)).await;
    send_text(&mut sender, r#"{"targets":[2],"payload":"after"}"#).await;
    assert_eq!(recv_text(&mut two).await, r#""after""#);
    assert_eq!(server.hub.metrics().offline_targets.get(), 3);
}

#[tokio::test]
async fn an_empty_target_list_delivers_nothing() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two = server.connect("/ws?id=2").await;

    send_text(&mut sender, r#"{"targets":[],"payload":"nobody"}"#).await;
    assert_silent(&mut sender, QUIET).await;
    assert_silent(&mut two, Duration::from_millis(50)).await;
    send_text(&mut sender, r#"{"targets":[2],"payload":"after"}"#).await;
    assert_eq!(recv_text(&mut two).await, r#""after""#);
}

#[tokio::test]
async fn a_client_can_send_to_itself() {
    let server = TestServer::start().await;
    let mut me = server.connect("/ws?id=me").await;

    send_text(
        &mut me,
        r#"{"targets":["me"],"payload":{"note":"to self"}}"#,
    )
    .await;
    assert_eq!(recv_text(&mut me).await, r#"{"note":"to self"}"#);
    assert_silent(&mut me, QUIET).await;
}

#[tokio::test]
async fn a_user_with_two_tabs_gets_each_message_in_both() {
    let server = TestServer::start().await;
    let mut tab_a = server.connect("/ws?id=carol").await;
    let mut tab_b = server.connect("/ws?id=carol").await;
    let mut sender = server.connect("/ws?id=dave").await;

    send_text(&mut sender, r#"{"targets":["carol"],"payload":1}"#).await;
    send_text(&mut sender, r#"{"targets":["carol"],"payload":2}"#).await;
    for tab in [&mut tab_a, &mut tab_b] {
        assert_eq!(recv_text(tab).await, "1");
        assert_eq!(recv_text(tab).await, "2");
        assert_silent(tab, QUIET).await;
    }

    // One tab sending to its own ID reaches both tabs.
    send_text(&mut tab_a, r#"{"targets":["carol"],"payload":"sync"}"#).await;
    assert_eq!(recv_text(&mut tab_a).await, r#""sync""#);
    assert_eq!(recv_text(&mut tab_b).await, r#""sync""#);

    // After one tab closes, the other still gets messages.
    tab_a.close(None).await.expect("close tab a");
    server
        .eventually("tab a gone", |hub| hub.live_connections() == 2)
        .await;
    send_text(&mut sender, r#"{"targets":["carol"],"payload":3}"#).await;
    assert_eq!(recv_text(&mut tab_b).await, "3");
}

#[tokio::test]
async fn the_payload_is_forwarded_as_json_for_every_json_type() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two = server.connect("/ws?id=2").await;

    for payload in [
        r#"{"a":{"b":[1,2,{"c":null}]}}"#,
        "[]",
        r#""text with \"quotes\" and ünïcödé""#,
        "-12.5e3",
        "0",
        "false",
    ] {
        send_text(
            &mut sender,
            &format!(r#"{{"targets":[2],"payload":{payload}}}"#),
        )
        .await;
        assert_eq!(recv_text(&mut two).await, payload, "payload {payload}");
    }
    // Unknown fields are ignored.
    send_text(
        &mut sender,
        r#"{"targets":[2],"payload":"x","extra":{"ignored":1}}"#,
    )
    .await;
    assert_eq!(recv_text(&mut two).await, r#""x""#);
    assert_silent(&mut sender, QUIET).await;
}

#[tokio::test]
async fn a_null_payload_is_delivered_as_null() {
    // `null` is a JSON value like any other: "payload": null is present,
    // not missing.
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two = server.connect("/ws?id=2").await;

    send_text(&mut sender, r#"{"targets":[2],"payload":null}"#).await;
    // No error frame to the sender…
    assert_silent(&mut sender, QUIET).await;
    // …and the target gets `null`.
    assert_eq!(recv_text(&mut two).await, "null");
}

// ---------------------------------------------------------------------------
// Topics
// ---------------------------------------------------------------------------

#[tokio::test]
async fn subscribe_publish_unsubscribe() {
    let server = TestServer::start().await;
    let mut sub_a = server.connect("/ws?id=a").await;
    let mut sub_b = server.connect("/ws?id=b").await;
    let mut publisher = server.connect("/ws?id=p").await;

    for sub in [&mut sub_a, &mut sub_b] {
        send_text(sub, r#"{"type":"subscribe","topic":"news"}"#).await;
        assert_eq!(
            recv_json(sub).await,
            serde_json::json!({"subscribed":"news"})
        );
    }

    // A connection that is not subscribed publishes: every subscriber gets
    // the JSON of the payload, the publisher nothing.
    send_text(
        &mut publisher,
        r#"{"type":"publish","topic":"news","payload":{"headline":"x","n":1}}"#,
    )
    .await;
    for sub in [&mut sub_a, &mut sub_b] {
        assert_eq!(recv_text(sub).await, r#"{"headline":"x","n":1}"#);
    }
    assert_silent(&mut publisher, QUIET).await;

    // A subscriber publishing gets its own message too.
    send_text(
        &mut sub_a,
        r#"{"type":"publish","topic":"news","payload":"from a"}"#,
    )
    .await;
    assert_eq!(recv_text(&mut sub_a).await, r#""from a""#);
    assert_eq!(recv_text(&mut sub_b).await, r#""from a""#);

    // Other topics do not leak into "news".
    send_text(
        &mut publisher,
        r#"{"type":"publish","topic":"sports","payload":"goal"}"#,
    )
    .await;
    assert_silent(&mut sub_a, QUIET).await;
    assert_silent(&mut sub_b, Duration::from_millis(20)).await;

    // Unsubscribe: an ack, then no more deliveries.
    send_text(&mut sub_a, r#"{"type":"unsubscribe","topic":"news"}"#).await;
    assert_eq!(
        recv_json(&mut sub_a).await,
        serde_json::json!({"unsubscribed":"news"})
    );
    send_text(
        &mut publisher,
        r#"{"type":"publish","topic":"news","payload":"later"}"#,
    )
    .await;
    assert_eq!(recv_text(&mut sub_b).await, r#""later""#);
    assert_silent(&mut sub_a, QUIET).await;

    // Subscribing twice acks twice and still delivers once.
    for _ in 0..2 {
        send_text(&mut sub_b, r#"{"type":"subscribe","topic":"news"}"#).await;
        assert_eq!(
            recv_json(&mut sub_b).await,
            serde_json::json!({"subscribed":"news"})
        );
    }
    send_text(
        &mut publisher,
        r#"{"type":"publish","topic":"news","payload":"once"}"#,
    )
    .await;
    assert_eq!(recv_text(&mut sub_b).await, r#""once""#);
    assert_silent(&mut sub_b, QUIET).await;
}

#[tokio::test]
async fn a_topic_reaches_every_connection_of_a_subscriber_that_subscribed() {
    // Subscriptions are per connection: only the tab that subscribed gets
    // topic messages, while both tabs get messages sent to the ID.
    let server = TestServer::start().await;
    let mut tab_a = server.connect("/ws?id=u").await;
    let mut tab_b = server.connect("/ws?id=u").await;
    let mut publisher = server.connect("/ws?id=p").await;

    send_text(&mut tab_a, r#"{"type":"subscribe","topic":"room/1"}"#).await;
    assert_eq!(
        recv_json(&mut tab_a).await,
        serde_json::json!({"subscribed":"room/1"})
    );
    send_text(
        &mut publisher,
        r#"{"type":"publish","topic":"room/1","payload":7}"#,
    )
    .await;
    assert_eq!(recv_text(&mut tab_a).await, "7");
    assert_silent(&mut tab_b, QUIET).await;
}

// ---------------------------------------------------------------------------
// Bad input: an error frame, and the connection keeps working
// ---------------------------------------------------------------------------

/// Sends `frame` from client 1, expects the error frame with `code`, then
/// checks that client 1's next valid frame still reaches client 2.
async fn bad_frame_gets_error_and_connection_stays_open(frame: WsMessage, code: &str) {
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut target = server.connect("/ws?id=2").await;

    let shown = format!("{frame:?}");
    sender.send(frame).await.expect("send bad frame");
    assert_eq!(recv_error_code(&mut sender).await, code, "for {shown}");
    assert_silent(&mut sender, Duration::from_millis(50)).await;
    assert_silent(&mut target, Duration::from_millis(50)).await;

    send_text(&mut sender, r#"{"targets":[2],"payload":"next"}"#).await;
    assert_eq!(recv_text(&mut target).await, r#""next""#, "after {shown}");
    assert_silent(&mut sender, QUIET).await;
    assert_eq!(server.hub.live_connections(), 2);
}

async fn bad_text(text: &str, code: &str) {
    bad_frame_gets_error_and_connection_stays_open(WsMessage::text(text.to_owned()), code).await;
}

#[tokio::test]
async fn bad_input_not_json() {
    bad_text("hello", "invalid_json").await;
}

#[tokio::test]
async fn bad_input_truncated_json() {
    bad_text(r#"{"targets":[2],"payload":"#, "invalid_json").await;
}

#[tokio::test]
async fn bad_input_empty_text() {
    bad_text("", "invalid_json").await;
}

#[tokio::test]
async fn bad_input_array_is_not_an_object() {
    bad_text("[1]", "not_an_object").await;
}

#[tokio::test]
async fn bad_input_number_is_not_an_object() {
    bad_text("42", "not_an_object").await;
}

#[tokio::test]
async fn bad_input_string_is_not_an_object() {
    bad_text(r#""targets""#, "not_an_object").await;
}

#[tokio::test]
async fn bad_input_missing_targets() {
    bad_text(r#"{"payload":"x"}"#, "missing_targets").await;
}

#[tokio::test]
async fn bad_input_targets_is_a_number() {
    bad_text(r#"{"targets":2,"payload":"x"}"#, "invalid_targets").await;
}

#[tokio::test]
async fn bad_input_targets_is_a_string() {
    bad_text(r#"{"targets":"2","payload":"x"}"#, "invalid_targets").await;
}

#[tokio::test]
async fn bad_input_targets_is_an_object() {
    bad_text(r#"{"targets":{"id":2},"payload":"x"}"#, "invalid_targets").await;
}

#[tokio::test]
async fn bad_input_target_is_a_float() {
    bad_text(r#"{"targets":[1.5],"payload":"x"}"#, "invalid_target").await;
}

#[tokio::test]
async fn bad_input_target_is_a_bool() {
    bad_text(r#"{"targets":[true],"payload":"x"}"#, "invalid_target").await;
}

#[tokio::test]
async fn bad_input_target_is_an_object() {
    bad_text(r#"{"targets":[{}],"payload":"x"}"#, "invalid_target").await;
}

#[tokio::test]
async fn bad_input_target_is_an_empty_string() {
    bad_text(r#"{"targets":[""],"payload":"x"}"#, "invalid_target").await;
}

#[tokio::test]
async fn bad_input_target_has_a_space() {
    bad_text(r#"{"targets":["a b"],"payload":"x"}"#, "invalid_target").await;
}

#[tokio::test]
async fn bad_input_target_is_null() {
    bad_text(r#"{"targets":[null],"payload":"x"}"#, "invalid_target").await;
}

#[tokio::test]
async fn bad_input_target_is_too_long() {
    let long = "x".repeat(129);
    bad_text(
        &format!(r#"{{"targets":["{long}"],"payload":"x"}}"#),
        "invalid_target",
    )
    .await;
}

#[tokio::test]
async fn bad_input_a_bad_target_among_good_ones_delivers_nothing() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two = server.connect("/ws?id=2").await;

    send_text(&mut sender, r#"{"targets":[2,true],"payload":"x"}"#).await;
    assert_eq!(recv_error_code(&mut sender).await, "invalid_target");
    assert_silent(&mut two, QUIET).await;
}

#[tokio::test]
async fn bad_input_missing_payload() {
    bad_text(r#"{"targets":[2]}"#, "missing_payload").await;
}

#[tokio::test]
async fn bad_input_unknown_type() {
    bad_text(
        r#"{"type":"dance","targets":[2],"payload":"x"}"#,
        "unknown_type",
    )
    .await;
}

#[tokio::test]
async fn bad_input_type_is_not_a_string() {
    bad_text(r#"{"type":7,"targets":[2],"payload":"x"}"#, "invalid_type").await;
}

#[tokio::test]
async fn bad_input_subscribe_without_topic() {
    bad_text(r#"{"type":"subscribe"}"#, "missing_topic").await;
}

#[tokio::test]
async fn bad_input_subscribe_to_an_invalid_topic() {
    bad_text(r#"{"type":"subscribe","topic":"a b"}"#, "invalid_topic").await;
}

#[tokio::test]
async fn bad_input_publish_without_payload() {
    bad_text(r#"{"type":"publish","topic":"news"}"#, "missing_payload").await;
}

#[tokio::test]
async fn bad_input_binary_frame() {
    bad_frame_gets_error_and_connection_stays_open(
        WsMessage::binary(br#"{"targets":[2],"payload":"x"}"#.to_vec()),
        "binary_not_supported",
    )
    .await;
}

#[tokio::test]
async fn bad_input_too_many_targets() {
    let limits = Limits {
        max_targets: 3,
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two = server.connect("/ws?id=2").await;

    send_text(&mut sender, r#"{"targets":[2,3,4,5],"payload":"x"}"#).await;
    assert_eq!(recv_error_code(&mut sender).await, "too_many_targets");
    assert_silent(&mut two, QUIET).await;

    // Repeats do not count against the limit.
    send_text(&mut sender, r#"{"targets":[2,3,4,2,"2"],"payload":"y"}"#).await;
    assert_eq!(recv_text(&mut two).await, r#""y""#);
    assert_silent(&mut sender, QUIET).await;
}

#[tokio::test]
async fn many_bad_frames_in_a_row_each_get_an_error_and_nothing_else_breaks() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two = server.connect("/ws?id=2").await;

    let cases = [
        ("nope", "invalid_json"),
        ("[1]", "not_an_object"),
        (r#"{"payload":1}"#, "missing_targets"),
        (r#"{"targets":3,"payload":1}"#, "invalid_targets"),
        (r#"{"targets":[1.5],"payload":1}"#, "invalid_target"),
        (r#"{"targets":[2]}"#, "missing_payload"),
        (r#"{"type":"x"}"#, "unknown_type"),
    ];
    for (frame, _) in cases {
        send_text(&mut sender, frame).await;
    }
    send_text(&mut sender, r#"{"targets":[2],"payload":"ok"}"#).await;
    // The errors come back in order.
    for (frame, code) in cases {
        assert_eq!(recv_error_code(&mut sender).await, code, "for {frame}");
    }
    assert_eq!(recv_text(&mut two).await, r#""ok""#);
    assert_silent(&mut sender, QUIET).await;
}

// ---------------------------------------------------------------------------
// Size limit
// ---------------------------------------------------------------------------

fn small_limits() -> Limits {
    Limits {
        max_message_size: 1024,
        max_frame_size: 1024,
        ..Limits::default()
    }
}

/// A relay frame to `target` of exactly `len` bytes.
fn relay_frame_of_len(target: u32, len: usize) -> String {
    let empty = format!(r#"{{"targets":[{target}],"payload":""}}"#);
    let pad = "x".repeat(len - empty.len());
    let frame = format!(r#"{{"targets":[{target}],"payload":"{pad}"}}"#);
    assert_eq!(frame.len(), len);
    frame
}

#[tokio::test]
async fn a_message_over_the_size_limit_closes_with_1009_and_others_keep_working() {
    let server = TestServer::with_limits(small_limits()).await;
    let mut big = server.connect("/ws?id=big").await;
    let mut two = server.connect("/ws?id=2").await;
    let mut three = server.connect("/ws?id=3").await;

    // Exactly at the limit is fine.
    let at_limit = relay_frame_of_len(2, 1024);
    send_text(&mut big, &at_limit).await;
    let got = recv_text(&mut two).await;
    assert_eq!(got.len(), 1024 - r#"{"targets":[2],"payload":}"#.len());

    // One byte over: closed with 1009.
    send_text(&mut big, &relay_frame_of_len(2, 1025)).await;
    assert_eq!(close_code(recv_close(&mut big).await), 1009);
    drain_until_closed(&mut big).await;
    assert_silent(&mut two, Duration::from_millis(50)).await;

    server
        .eventually("the big client is gone", |hub| hub.live_connections() == 2)
        .await;

    // The others keep working.
    send_text(&mut two, r#"{"targets":[3],"payload":"still here"}"#).await;
    assert_eq!(recv_text(&mut three).await, r#""still here""#);
    send_text(&mut three, r#"{"targets":[2,"big"],"payload":"back"}"#).await;
    assert_eq!(recv_text(&mut two).await, r#""back""#);
    assert_eq!(server.hub.metrics().offline_targets.get(), 1);
}

#[tokio::test]
async fn a_fragmented_message_over_the_size_limit_closes_with_1009() {
    let server = TestServer::with_limits(small_limits()).await;
    let mut big = server.connect("/ws?id=big").await;
    let mut two = server.connect("/ws?id=2").await;

    // Each fragment fits max_frame_size; together they are over
    // max_message_size.
    let first = Frame::message(vec![b'a'; 800], OpCode::Data(Data::Text), false);
    let rest = Frame::message(vec![b'b'; 800], OpCode::Data(Data::Continue), true);
    big.send(WsMessage::Frame(first)).await.expect("first");
    big.send(WsMessage::Frame(rest)).await.expect("rest");
    assert_eq!(close_code(recv_close(&mut big).await), 1009);

    let mut three = server.connect("/ws?id=3").await;
    send_text(&mut two, r#"{"targets":[3],"payload":1}"#).await;
    assert_eq!(recv_text(&mut three).await, "1");
}

#[tokio::test]
async fn a_fragmented_message_within_the_limit_is_delivered() {
    let server = TestServer::with_limits(small_limits()).await;
    let mut sender = server.connect("/ws?id=1").await;
    let mut two = server.connect("/ws?id=2").await;

    let frame = relay_frame_of_len(2, 1000);
    let (a, b) = frame.as_bytes().split_at(600);
    let first = Frame::message(a.to_vec(), OpCode::Data(Data::Text), false);
    let rest = Frame::message(b.to_vec(), OpCode::Data(Data::Continue), true);
    sender.send(WsMessage::Frame(first)).await.expect("first");
    sender.send(WsMessage::Frame(rest)).await.expect("rest");
    let got = recv_text(&mut two).await;
    assert_eq!(got.len(), 1000 - r#"{"targets":[2],"payload":}"#.len());
}

// ---------------------------------------------------------------------------
// 1,000 concurrent clients: every message to a connected target arrives
// exactly once
// ---------------------------------------------------------------------------

/// xorshift64: deterministic, dependency-free randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_clients_get_every_message_exactly_once() {
    const CLIENTS: u64 = 1_000;
    /// IDs in CLIENTS..OFFLINE_END are never connected.
    const OFFLINE_END: u64 = 1_100;
    const MESSAGES_PER_CLIENT: u64 = 5;
    const DEADLINE: Duration = Duration::from_secs(30);

    let started = std::time::Instant::now();
    let server = TestServer::start().await;
    let addr = server.addr;

    // Connect everyone, at most 64 handshakes in flight.
    let gate = Arc::new(Semaphore::new(64));
    let mut connecting = Vec::new();
    for id in 0..CLIENTS {
        let gate = Arc::clone(&gate);
        connecting.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            let url = format!("ws://{addr}/ws?id={id}");
            let (client, response) =
                tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
                    .await
                    .expect("connect within the deadline")
                    .unwrap_or_else(|e| panic!("client {id} connect: {e}"));
            assert_eq!(response.status(), 101);
            (id, client)
        }));
    }
    let mut clients = Vec::new();
    for task in connecting {
        clients.push(task.await.expect("connect task"));
    }
    wait_until("1,000 connections open", DEADLINE, || {
        server.hub.live_connections() == CLIENTS as usize
    })
    .await;
    let connected_after = started.elapsed();

    // The plan: each client sends a few messages to random peers (itself,
    // duplicates and offline IDs included), each with a unique payload.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut outgoing: HashMap<u64, Vec<String>> = HashMap::new();
    let mut expected: HashMap<u64, Vec<String>> = HashMap::new();
    let mut expected_deliveries = 0u64;
    let mut expected_offline = 0u64;
    for from in 0..CLIENTS {
        for seq in 0..MESSAGES_PER_CLIENT {
            let count = 1 + rng.below(4);
            let mut targets: Vec<u64> = (0..count).map(|_| rng.below(OFFLINE_END)).collect();
            if rng.below(5) == 0 {
                // List one target twice.
                targets.push(targets[0]);
            }
            let payload = format!(r#"{{"from":{from},"seq":{seq}}}"#);
            let mut seen = Vec::new();
            for &t in &targets {
                if seen.contains(&t) {
                    continue;
                }
                seen.push(t);
                if t < CLIENTS {
                    expected.entry(t).or_default().push(payload.clone());
                    expected_deliveries += 1;
                } else {
                    expected_offline += 1;
                }
            }
            let list: Vec<String> = targets.iter().map(u64::to_string).collect();
            outgoing.entry(from).or_default().push(format!(
                r#"{{"targets":[{}],"payload":{payload}}}"#,
                list.join(",")
            ));
        }
    }

    // Everyone sends, then reads until it has what it expects; after all
    // have, everyone watches for extras (duplicates) for a moment.
    let barrier = Arc::new(Barrier::new(CLIENTS as usize));
    let mut running = Vec::new();
    for (id, mut client) in clients {
        let to_send = outgoing.remove(&id).unwrap_or_default();
        let want = expected.get(&id).map_or(0, Vec::len);
        let barrier = Arc::clone(&barrier);
        running.push(tokio::spawn(async move {
            for frame in to_send {
                client
                    .send(WsMessage::text(frame))
                    .await
                    .unwrap_or_else(|e| panic!("client {id} send: {e}"));
            }
            let mut got = Vec::with_capacity(want);
            let deadline = tokio::time::Instant::now() + DEADLINE;
            while got.len() < want {
                let next = tokio::time::timeout_at(deadline, client.next())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("client {id}: timed out with {} of {want}", got.len())
                    });
                match next {
                    Some(Ok(WsMessage::Text(text))) => got.push(text.to_string()),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                    other => panic!("client {id}: unexpected {other:?}"),
                }
            }
            barrier.wait().await;
            // Anything more is a duplicate or a misdelivery.
            let extra = tokio::time::timeout(Duration::from_millis(500), client.next()).await;
            match extra {
                Err(_) => {}
                Ok(Some(Ok(WsMessage::Text(text)))) => got.push(text.to_string()),
                Ok(other) => panic!("client {id}: unexpected {other:?} after all messages"),
            }
            (id, got)
        }));
    }

    let mut delivered = 0u64;
    for task in running {
        let (id, mut got) = task.await.expect("client task");
        let mut want = expected.remove(&id).unwrap_or_default();
        got.sort();
        want.sort();
        assert_eq!(got, want, "client {id} received the wrong messages");
        delivered += got.len() as u64;
    }
    assert_eq!(delivered, expected_deliveries);
    let metrics = server.hub.metrics();
    assert_eq!(metrics.deliveries.get(), expected_deliveries);
    assert_eq!(metrics.offline_targets.get(), expected_offline);
    assert_eq!(metrics.dropped_messages.get(), 0);
    assert_eq!(metrics.frames_in.get(), CLIENTS * MESSAGES_PER_CLIENT);
    eprintln!(
        "1,000 clients: connected in {connected_after:?}, {expected_deliveries} deliveries checked in {:?}",
        started.elapsed()
    );
}
