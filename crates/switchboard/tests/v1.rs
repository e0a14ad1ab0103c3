//! The `switchboard.v1` protocol, black box: a real server, real clients
//! speaking raw v1 frames (docs/protocol-v1.md).

mod common;

use std::time::Duration;

use common::{
    Client, TestServer, WAIT, assert_silent, close_code, connect_v1, http_post_json, recv_close,
    recv_json, send_text,
};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use switchboard::{Limits, SlowConsumer, V1Limits};

/// Connects as `id` and says hello (resuming from `resume`); returns the
/// client and its welcome.
async fn hello(server: &TestServer, id: &str, resume: Option<Value>) -> (Client, Value) {
    let mut client = connect_v1(server, id).await;
    let mut frame = json!({"type": "hello", "id": 0});
    if let Some(resume) = resume {
        frame["resume"] = resume;
    }
    send_text(&mut client, &frame.to_string()).await;
    let welcome = recv_json(&mut client).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["id"], 0);
    (client, welcome)
}

fn resume_from(welcome: &Value, seq: u64) -> Value {
    json!({"epoch": welcome["inbox"]["epoch"], "seq": seq})
}

/// Sends with request id `id` and returns the ack.
async fn send(client: &mut Client, id: u64, targets: Value, payload: Value) -> Value {
    let frame = json!({"type": "send", "id": id, "targets": targets, "payload": payload});
    send_text(client, &frame.to_string()).await;
    next_of(client, "ack").await
}

/// The next frame of `kind`, skipping none: panics if another comes first.
async fn next_of(client: &mut Client, kind: &str) -> Value {
    let frame = recv_json(client).await;
    assert_eq!(frame["type"], kind, "expected a {kind}: {frame}");
    frame
}

/// Kills a client's TCP connection without a close handshake (RST).
fn kill(client: Client) {
    if let tokio_tungstenite::MaybeTlsStream::Plain(stream) = client.get_ref() {
        stream.set_zero_linger().expect("SO_LINGER 0");
    }
    drop(client);
}

#[tokio::test]
async fn hello_welcomes_with_the_inbox_position() {
    let server = TestServer::start().await;
    let (_bob, welcome) = hello(&server, "bob", None).await;
    assert_eq!(welcome["client"], "bob");
    assert_eq!(welcome["resume"]["status"], "new");
    assert_eq!(welcome["inbox"]["seq"], 0);
    assert!(
        welcome["inbox"]["epoch"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
    );
    assert_eq!(welcome["node"], Value::Null);
    assert_eq!(welcome["limits"]["inbox_size"], 256);
}

#[tokio::test]
async fn a_send_is_acked_with_a_report_and_delivered_as_a_numbered_msg() {
    let server = TestServer::start().await;
    let (mut alice, _) = hello(&server, "alice", None).await;
    let (mut bob, _) = hello(&server, "bob", None).await;
    let mut plain = server.connect("/ws?id=carol").await;

    let ack = send(
        &mut alice,
        17,
        json!(["bob", "carol", "dave", "bob"]),
        json!({"hi": 1}),
    )
    .await;
    assert_eq!(ack["id"], 17);
    assert_eq!(ack["delivered"], json!(["bob", "carol", "bob"]));
    assert_eq!(ack["offline"], json!(["dave"]));
    assert_eq!(ack["dropped"], json!([]));
    // bob has an inbox (a v1 client); carol and dave do not.
    assert_eq!(ack["retained"], json!(["bob", "bob"]));

    let msg = next_of(&mut bob, "msg").await;
    assert_eq!(
        msg,
        json!({"type": "msg", "seq": 1, "from": "alice", "payload": {"hi": 1}})
    );
    // The plain client gets the payload as it always did.
    assert_eq!(recv_json(&mut plain).await, json!({"hi": 1}));
}

#[tokio::test]
async fn requests_without_an_id_get_no_ack_and_errors_are_tied_to_ids() {
    let server = TestServer::start().await;
    let (mut alice, _) = hello(&server, "alice", None).await;
    send_text(
        &mut alice,
        r#"{"type":"send","targets":["nobody"],"payload":1}"#,
    )
    .await;
    assert_silent(&mut alice, Duration::from_millis(200)).await;
    send_text(&mut alice, r#"{"type":"send","id":5,"payload":1}"#).await;
    let ack = next_of(&mut alice, "ack").await;
    assert_eq!(ack["id"], 5);
    assert_eq!(ack["error"]["code"], "missing_targets");
    assert_eq!(ack["error"]["temporary"], false);
    send_text(&mut alice, r#"{"type":"send","payload":1}"#).await;
    let error = next_of(&mut alice, "error").await;
    assert_eq!(error["error"]["code"], "missing_targets");
    send_text(&mut alice, "not json").await;
    assert_eq!(
        next_of(&mut alice, "error").await["error"]["code"],
        "invalid_json"
    );
}

#[tokio::test]
async fn a_thousand_pipelined_sends_get_a_thousand_acks_in_order() {
    let server = TestServer::start().await;
    let (mut alice, _) = hello(&server, "alice", None).await;
    let (mut bob, _) = hello(&server, "bob", None).await;
    let mut frames = String::new();
    for id in 0..1000 {
        frames.clear();
        frames.push_str(
            &json!({"type": "send", "id": id, "targets": ["bob"], "payload": id}).to_string(),
        );
        send_text(&mut alice, &frames).await;
    }
    for id in 0..1000u64 {
        let ack = next_of(&mut alice, "ack").await;
        assert_eq!(ack["id"], id);
        assert_eq!(ack["delivered"], json!(["bob"]));
    }
    for seq in 1..=1000u64 {
        let msg = next_of(&mut bob, "msg").await;
        assert_eq!(msg["seq"], seq);
        assert_eq!(msg["payload"], seq - 1);
    }
}

#[tokio::test]
async fn a_receiver_that_drops_resumes_with_exactly_what_it_missed() {
    let server = TestServer::start().await;
    let (mut alice, _) = hello(&server, "alice", None).await;
    let (mut bob, welcome) = hello(&server, "bob", None).await;
    send(&mut alice, 1, json!(["bob"]), json!("before")).await;
    let first = next_of(&mut bob, "msg").await;
    let seen = first["seq"].as_u64().expect("seq");
    kill(bob);
    server
        .eventually("bob's connection is gone", |hub| {
            hub.live_connections() == 1
        })
        .await;
    for n in 0..50 {
        let ack = send(&mut alice, 100 + n, json!(["bob"]), json!(n)).await;
        assert_eq!(ack["offline"], json!(["bob"]), "{ack}");
        assert_eq!(ack["retained"], json!(["bob"]), "{ack}");
    }
    let (mut bob, back) = hello(&server, "bob", Some(resume_from(&welcome, seen))).await;
    assert_eq!(back["resume"]["status"], "recovered", "{back}");
    assert_eq!(back["resume"]["replayed"], 50);
    assert_eq!(back["inbox"]["epoch"], welcome["inbox"]["epoch"]);
    for n in 0..50u64 {
        let msg = next_of(&mut bob, "msg").await;
        assert_eq!(msg["seq"], seen + 1 + n);
        assert_eq!(msg["payload"], n);
    }
    // Live continues after the replay, numbered on.
    send(&mut alice, 999, json!(["bob"]), json!("live")).await;
    let live = next_of(&mut bob, "msg").await;
    assert_eq!(live["seq"], seen + 51);
    assert_eq!(live["payload"], "live");
}

#[tokio::test]
async fn a_client_that_never_received_anything_resumes_from_its_welcome() {
    let server = TestServer::start().await;
    let (bob, welcome) = hello(&server, "bob", None).await;
    let start = welcome["inbox"]["seq"].as_u64().expect("seq");
    kill(bob);
    server
        .eventually("bob gone", |hub| hub.live_connections() == 0)
        .await;
    let (_api_status, body) = {
        let response = http_post_json(
            server.addr,
            "/api/send",
            r#"{"targets":["bob"],"payload":"while away"}"#,
        )
        .await;
        (response.status, response.json())
    };
    assert_eq!(body["offline"], json!(["bob"]));
    assert_eq!(body["retained"], json!(["bob"]));
    let (mut bob, back) = hello(&server, "bob", Some(resume_from(&welcome, start))).await;
    assert_eq!(back["resume"]["status"], "recovered");
    let msg = next_of(&mut bob, "msg").await;
    assert_eq!(msg["payload"], "while away");
    // Sent through the API: no sender.
    assert!(msg.get("from").is_none(), "{msg}");
}

#[tokio::test]
async fn nothing_missed_resumes_recovered_with_nothing_replayed() {
    let server = TestServer::start().await;
    let (bob, welcome) = hello(&server, "bob", None).await;
    kill(bob);
    let (mut bob, back) = hello(&server, "bob", Some(resume_from(&welcome, 0))).await;
    assert_eq!(back["resume"]["status"], "recovered");
    assert_eq!(back["resume"]["replayed"], 0);
    assert_silent(&mut bob, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn over_the_inbox_size_resume_is_partial_with_the_exact_lost_range() {
    let limits = Limits {
        v1: V1Limits {
            inbox_size: 256,
            ..V1Limits::default()
        },
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let (bob, welcome) = hello(&server, "bob", None).await;
    kill(bob);
    server
        .eventually("bob gone", |hub| hub.live_connections() == 0)
        .await;
    let (mut alice, _) = hello(&server, "alice", None).await;
    for n in 0..300u64 {
        send(&mut alice, n, json!(["bob"]), json!(n)).await;
    }
    let (mut bob, back) = hello(&server, "bob", Some(resume_from(&welcome, 0))).await;
    assert_eq!(back["resume"]["status"], "partial", "{back}");
    assert_eq!(back["resume"]["lost"], json!([[1, 44]]));
    assert_eq!(back["resume"]["replayed"], 256);
    for seq in 45..=300u64 {
        assert_eq!(next_of(&mut bob, "msg").await["seq"], seq);
    }
}

#[tokio::test]
async fn an_unknown_epoch_resumes_reset() {
    let server = TestServer::start().await;
    let (_bob, back) = hello(
        &server,
        "bob",
        Some(json!({"epoch": "from-another-server", "seq": 12})),
    )
    .await;
    assert_eq!(back["resume"]["status"], "reset");
    assert_eq!(back["resume"]["replayed"], 0);
}

#[tokio::test]
async fn a_resent_mid_is_delivered_once_and_acked_as_a_duplicate() {
    let server = TestServer::start().await;
    let (mut bob, _) = hello(&server, "bob", None).await;
    let (mut alice, _) = hello(&server, "alice", None).await;
    let frame =
        json!({"type": "send", "id": 1, "mid": "a-991", "targets": ["bob", 7], "payload": "once"});
    send_text(&mut alice, &frame.to_string()).await;
    let first = next_of(&mut alice, "ack").await;
    assert_eq!(first["mid"], "a-991");
    assert!(first.get("duplicate").is_none());
    assert_eq!(next_of(&mut bob, "msg").await["mid"], "a-991");
    // Alice reconnects and resends: nothing new is delivered.
    kill(alice);
    let (mut alice, _) = hello(&server, "alice", None).await;
    let mut again = frame.clone();
    again["id"] = json!(2);
    send_text(&mut alice, &again.to_string()).await;
    let second = next_of(&mut alice, "ack").await;
    assert_eq!(second["id"], 2);
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["delivered"], first["delivered"]);
    assert_eq!(second["offline"], first["offline"]);
    assert_silent(&mut bob, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn the_first_frame_must_be_hello() {
    let server = TestServer::start().await;
    let mut client = connect_v1(&server, "x").await;
    send_text(&mut client, r#"{"type":"send","targets":[1],"payload":1}"#).await;
    assert_eq!(close_code(recv_close(&mut client).await), 4400);

    let mut client = connect_v1(&server, "y").await;
    send_text(&mut client, "{").await;
    assert_eq!(close_code(recv_close(&mut client).await), 4400);

    let (mut client, _) = hello(&server, "z", None).await;
    send_text(&mut client, r#"{"type":"hello"}"#).await;
    assert_eq!(close_code(recv_close(&mut client).await), 4400);
}

#[tokio::test]
async fn no_hello_in_time_is_closed_4400() {
    let limits = Limits {
        v1: V1Limits {
            hello_timeout: Duration::from_millis(300),
            ..V1Limits::default()
        },
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let mut client = connect_v1(&server, "slow").await;
    let started = tokio::time::Instant::now();
    assert_eq!(close_code(recv_close(&mut client).await), 4400);
    assert!(started.elapsed() < WAIT);
}

#[tokio::test]
async fn messages_before_the_hello_wait_in_the_inbox() {
    let server = TestServer::start().await;
    let (bob, welcome) = hello(&server, "bob", None).await;
    kill(bob);
    server
        .eventually("bob gone", |hub| hub.live_connections() == 0)
        .await;
    // Connected but not yet said hello: not registered, so offline, and
    // retained.
    let mut bob = connect_v1(&server, "bob").await;
    let response = http_post_json(
        server.addr,
        "/api/send",
        r#"{"targets":["bob"],"payload":1}"#,
    )
    .await;
    assert_eq!(response.json()["offline"], json!(["bob"]));
    assert_eq!(response.json()["retained"], json!(["bob"]));
    send_text(
        &mut bob,
        &json!({"type": "hello", "resume": resume_from(&welcome, 0)}).to_string(),
    )
    .await;
    let back = next_of(&mut bob, "welcome").await;
    assert_eq!(back["resume"]["status"], "recovered");
    assert_eq!(next_of(&mut bob, "msg").await["payload"], 1);
}

#[tokio::test]
async fn a_stalled_reader_under_drop_oldest_is_told_exactly_what_it_lost() {
    // An inbox large enough to still hold the first gap, to replay it.
    let limits = Limits {
        slow_consumer: SlowConsumer::DropOldest,
        max_queued_messages: 64,
        v1: V1Limits {
            inbox_size: 10_000,
            inbox_max_bytes: 64 << 20,
            ..V1Limits::default()
        },
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let (mut bob, _) = hello(&server, "bob", None).await;
    let (mut alice, _) = hello(&server, "alice", None).await;
    // Bob stops reading; the kernel buffers fill, then his queue, then the
    // oldest are dropped.
    const SENT: u64 = 5000;
    // 10 MB in all: more than loopback's socket buffers absorb.
    let payload = "x".repeat(2000);
    for n in 0..SENT {
        let frame = json!({"type": "send", "targets": ["bob"], "payload": payload});
        send_text(&mut alice, &frame.to_string()).await;
        if n % 500 == 0 {
            // Let bob's task run so frames pile up at the socket first.
            tokio::task::yield_now().await;
        }
    }
    // A last request with an id: once acked, every send before it was handled.
    let ack = send(&mut alice, 1, json!(["bob"]), json!("last")).await;
    assert!(ack.get("error").is_none(), "{ack}");
    let total = SENT + 1;
    let mut delivered = Vec::new();
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    let mut gap_frames = 0;
    while (delivered.len() as u64) + gaps.iter().map(|(a, b)| b - a + 1).sum::<u64>() < total {
        let frame = next_of_any(&mut bob).await;
        match frame["type"].as_str() {
            Some("msg") => {
                let seq = frame["seq"].as_u64().expect("seq");
                // A gap is announced before the first message after it.
                if let Some(&(_, end)) = gaps.last() {
                    assert!(seq > end, "msg {seq} after a gap ending {end}");
                }
                delivered.push(seq);
            }
            Some("gap") => {
                gap_frames += 1;
                assert_eq!(frame["reason"], "slow_consumer");
                for range in frame["ranges"].as_array().expect("ranges") {
                    gaps.push((
                        range[0].as_u64().expect("from"),
                        range[1].as_u64().expect("to"),
                    ));
                }
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    assert!(
        gap_frames > 0,
        "nothing was dropped: the test did not stall bob"
    );
    // Delivered seqs and gap ranges cover 1..=total exactly once.
    let mut covered = vec![0u8; total as usize + 1];
    for seq in &delivered {
        covered[*seq as usize] += 1;
    }
    for (a, b) in &gaps {
        for seq in *a..=*b {
            covered[seq as usize] += 1;
        }
    }
    assert!(
        covered[1..].iter().all(|&c| c == 1),
        "every seq exactly once, delivered or in a gap"
    );
    // A dropped range that is still retained can be replayed.
    let (from, to) = gaps[0];
    let to = to.min(from + 9);
    send_text(
        &mut bob,
        &json!({"type": "replay", "id": 9, "from": from, "to": to}).to_string(),
    )
    .await;
    for seq in from..=to {
        let msg = next_of(&mut bob, "msg").await;
        assert_eq!(msg["seq"], seq);
    }
    let ack = next_of(&mut bob, "ack").await;
    assert_eq!(ack["replayed"], to - from + 1);
}

async fn next_of_any(client: &mut Client) -> Value {
    recv_json(client).await
}

#[tokio::test]
async fn under_the_close_policy_a_v1_slow_consumer_gets_4100_and_recovers() {
    // An inbox large enough for everything the socket buffers absorb
    // before bob's queue overflows.
    let limits = Limits {
        max_queued_messages: 32,
        v1: V1Limits {
            inbox_size: 10_000,
            inbox_max_bytes: 128 << 20,
            ..V1Limits::default()
        },
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let (bob, welcome) = hello(&server, "bob", None).await;
    let (mut alice, _) = hello(&server, "alice", None).await;
    let payload = "y".repeat(8000);
    let mut sent = 0u64;
    let mut dropped = false;
    while !dropped && sent < 20_000 {
        sent += 1;
        let ack = send(&mut alice, sent, json!(["bob"]), json!(payload)).await;
        dropped = ack["dropped"] == json!(["bob"]) || ack["offline"] == json!(["bob"]);
        assert_eq!(ack["retained"], json!(["bob"]), "{ack}");
    }
    assert!(dropped, "bob's queue never overflowed");
    let (_write, mut read) = bob.split();
    // Bob reads what was queued, then the close.
    let mut code = None;
    while code.is_none() {
        match tokio::time::timeout(WAIT, read.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame)))) => {
                code = Some(close_code(frame));
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no close: {other:?}"),
        }
    }
    assert_eq!(code, Some(4100));
    // Bob resumes from before everything: all retained, all recovered.
    let (_bob, back) = hello(&server, "bob", Some(resume_from(&welcome, 0))).await;
    assert_eq!(back["resume"]["status"], "recovered", "{back}");
    assert_eq!(back["resume"]["replayed"], sent);
}

#[tokio::test]
async fn topics_deliver_pub_frames_and_acks_count_recipients() {
    let server = TestServer::start().await;
    let (mut alice, _) = hello(&server, "alice", None).await;
    let (mut bob, _) = hello(&server, "bob", None).await;
    let mut plain = server.connect("/ws?id=p").await;
    send_text(&mut plain, r#"{"type":"subscribe","topic":"news"}"#).await;
    assert_eq!(recv_json(&mut plain).await, json!({"subscribed": "news"}));
    send_text(&mut bob, r#"{"type":"subscribe","id":1,"topic":"news"}"#).await;
    assert_eq!(
        next_of(&mut bob, "ack").await,
        json!({"type": "ack", "id": 1, "topic": "news"})
    );
    send_text(
        &mut alice,
        r#"{"type":"publish","id":2,"topic":"news","payload":{"n":1}}"#,
    )
    .await;
    assert_eq!(next_of(&mut alice, "ack").await["recipients"], 2);
    assert_eq!(
        next_of(&mut bob, "pub").await,
        json!({"type": "pub", "topic": "news", "from": "alice", "payload": {"n": 1}})
    );
    assert_eq!(recv_json(&mut plain).await, json!({"n": 1}));
    send_text(&mut bob, r#"{"type":"unsubscribe","id":3,"topic":"news"}"#).await;
    assert_eq!(next_of(&mut bob, "ack").await["was_subscribed"], true);
}

#[tokio::test]
async fn refresh_without_token_authentication_is_refused() {
    let server = TestServer::start().await;
    let (mut alice, _) = hello(&server, "alice", None).await;
    send_text(&mut alice, r#"{"type":"refresh","id":4,"token":"abc"}"#).await;
    let ack = next_of(&mut alice, "ack").await;
    assert_eq!(ack["error"]["code"], "refresh_not_supported");
}

#[tokio::test]
async fn v1_is_offered_only_where_it_is_spoken() {
    let server = TestServer::start().await;
    let with = |protocol| {
        let mut headers = common::upgrade_headers();
        headers.push(("Sec-WebSocket-Protocol", protocol));
        headers
    };
    for path in ["/chat", "/echo"] {
        let response =
            common::http_upgrade(server.addr, path, &with("switchboard.v1, bearer.x")).await;
        assert_eq!(response.status, 400, "{path}");
        assert_eq!(response.error_code(), "unsupported_subprotocol");
    }
    // The plain protocol by name: answered, and plain.
    let response = common::http_upgrade(server.addr, "/ws?id=1", &with("switchboard.plain")).await;
    assert_eq!(response.status, 101);
    assert_eq!(
        response.header("sec-websocket-protocol"),
        Some("switchboard.plain")
    );
}

#[tokio::test]
async fn subscribing_past_the_topic_limit_is_an_error_tied_to_the_request() {
    let limits = Limits {
        max_topics_per_connection: 2,
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let (mut bob, _) = hello(&server, "bob", None).await;
    for (id, topic) in [(1, "a"), (2, "b")] {
        let frame = json!({"type": "subscribe", "id": id, "topic": topic});
        send_text(&mut bob, &frame.to_string()).await;
        assert!(next_of(&mut bob, "ack").await.get("error").is_none());
    }
    send_text(&mut bob, r#"{"type":"subscribe","id":3,"topic":"c"}"#).await;
    let ack = next_of(&mut bob, "ack").await;
    assert_eq!(ack["id"], 3);
    assert_eq!(ack["error"]["code"], "too_many_topics");
}
