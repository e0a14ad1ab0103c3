//! Hardening (issue 12): each test performs one attack on a real server on
//! 127.0.0.1 and checks the specific answer, while another client's `/echo`
//! keeps answering. The writer backlog bound is in `backpressure.rs` (it
//! measures the process's memory, so it runs alone); fail-fast UTF-8 inside
//! a frame is in `conformance_utf8.rs`.

mod common;
mod raw;

use common::*;
use switchboard::{ErrorKind, Limits};

/// `/echo` on another connection still answers, promptly.
async fn echo_answers(echo: &mut Client, text: &str) {
    send_text(echo, text).await;
    assert_eq!(
        recv_text(echo).await,
        text,
        "/echo answers during the attack"
    );
}

// ---------------------------------------------------------------------------
// 1. Topics per connection
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_past_the_topic_limit_gets_too_many_topics() {
    const LIMIT: usize = 50;
    let server = TestServer::with_limits(Limits {
        max_topics_per_connection: LIMIT,
        ..Limits::default()
    })
    .await;
    let mut echo = server.connect("/echo").await;
    let mut client = server.connect("/ws?id=subscriber").await;
    let subscribe = |i: usize| format!(r#"{{"type":"subscribe","topic":"room/{i}"}}"#);

    for i in 0..LIMIT {
        send_text(&mut client, &subscribe(i)).await;
        assert_eq!(
            recv_json(&mut client).await["subscribed"],
            format!("room/{i}")
        );
    }
    echo_answers(&mut echo, "before").await;

    // One more is refused with an error frame naming the limit and its key.
    send_text(&mut client, &subscribe(LIMIT)).await;
    let refusal = recv_json(&mut client).await;
    assert_eq!(error_code_of(&refusal), "too_many_topics", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap_or_default();
    for part in ["50", "limits.max_topics_per_connection", "room/50"] {
        assert!(message.contains(part), "{part:?} missing from {message:?}");
    }
    echo_answers(&mut echo, "during").await;

    // The refused topic was not joined: a publish to it reaches nobody.
    let published = http_post_json(
        server.addr,
        "/api/publish",
        r#"{"topic":"room/50","payload":"anyone?"}"#,
    )
    .await;
    assert_eq!(published.json()["recipients"], 0);
    assert_eq!(
        server.hub.metrics().errors(ErrorKind::TooManyTopics),
        1,
        "the refusal is counted"
    );

    // The connection stays usable: a joined topic may be joined again, and
    // leaving one makes room for another.
    send_text(&mut client, &subscribe(0)).await;
    assert_eq!(recv_json(&mut client).await["subscribed"], "room/0");
    send_text(&mut client, r#"{"type":"unsubscribe","topic":"room/0"}"#).await;
    assert_eq!(recv_json(&mut client).await["unsubscribed"], "room/0");
    send_text(&mut client, &subscribe(LIMIT)).await;
    assert_eq!(recv_json(&mut client).await["subscribed"], "room/50");
    echo_answers(&mut echo, "after").await;
}
