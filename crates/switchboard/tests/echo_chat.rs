//! `/echo` sends every frame back unchanged; `/chat` broadcasts every text
//! frame to every `/chat` connection, shares its topic with relay clients
//! and with `/api/publish`.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt as _;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const QUIET: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------
// /echo
// ---------------------------------------------------------------------------

#[tokio::test]
async fn echo_returns_text_unchanged() {
    let server = TestServer::start().await;
    let mut echo = server.connect("/echo").await;

    for text in [
        "hello",
        "",
        "héllo wörld — 世界 🎉🦀",
        r#"{"targets":[1],"payload":"not relayed"}"#,
        "  leading and trailing spaces  ",
    ] {
        send_text(&mut echo, text).await;
        assert_eq!(recv_text(&mut echo).await, text, "text {text:?}");
    }
    assert_silent(&mut echo, QUIET).await;
}

#[tokio::test]
async fn echo_returns_an_empty_text_as_an_empty_text() {
    let server = TestServer::start().await;
    let mut echo = server.connect("/echo").await;
    send_text(&mut echo, "").await;
    match recv(&mut echo).await {
        WsMessage::Text(text) => assert_eq!(text.as_str(), ""),
        other => panic!("expected an empty text, got {other:?}"),
    }
}

#[tokio::test]
async fn echo_returns_binary_unchanged() {
    let server = TestServer::start().await;
    let mut echo = server.connect("/echo").await;

    let all_bytes: Vec<u8> = (0..=255u8).collect();
    send_binary(&mut echo, all_bytes.clone()).await;
    assert_eq!(recv_binary(&mut echo).await, all_bytes);

    // Not valid UTF-8, which binary frames may carry.
    send_binary(&mut echo, vec![0xFF, 0xFE, 0x00, 0xC3]).await;
    assert_eq!(recv_binary(&mut echo).await, vec![0xFF, 0xFE, 0x00, 0xC3]);

    send_binary(&mut echo, Vec::new()).await;
    assert_eq!(recv_binary(&mut echo).await, Vec::<u8>::new());
}

#[tokio::test]
async fn echo_returns_a_60_kib_binary_unchanged() {
    let server = TestServer::start().await;
    let mut echo = server.connect("/echo").await;

    let big: Vec<u8> = (0..60 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    send_binary(&mut echo, big.clone()).await;
    let back = recv_binary(&mut echo).await;
    assert_eq!(back.len(), big.len());
    assert!(back == big, "the 60 KiB payload came back changed");
}

#[tokio::test]
async fn echo_returns_a_60_kib_text_unchanged() {
    let server = TestServer::start().await;
    let mut echo = server.connect("/echo").await;

    // 3-byte characters across the whole message.
    let big = "€".repeat(20 * 1024);
    assert_eq!(big.len(), 60 * 1024);
    send_text(&mut echo, &big).await;
    assert!(recv_text(&mut echo).await == big);
}

#[tokio::test]
async fn echo_keeps_the_order_and_the_type_of_mixed_frames() {
    let server = TestServer::start().await;
    let mut echo = server.connect("/echo").await;

    send_text(&mut echo, "one").await;
    send_binary(&mut echo, vec![2]).await;
    send_text(&mut echo, "three").await;
    assert_eq!(recv_text(&mut echo).await, "one");
    assert_eq!(recv_binary(&mut echo).await, vec![2]);
    assert_eq!(recv_text(&mut echo).await, "three");
}

#[tokio::test]
async fn echo_answers_only_the_sender() {
    let server = TestServer::start().await;
    let mut a = server.connect("/echo").await;
    let mut b = server.connect("/echo").await;

    send_text(&mut a, "for a").await;
    assert_eq!(recv_text(&mut a).await, "for a");
    assert_silent(&mut b, QUIET).await;
}

// ---------------------------------------------------------------------------
// /chat
// ---------------------------------------------------------------------------

#[tokio::test]
async fn chat_broadcasts_to_every_chat_client_including_the_sender() {
    let server = TestServer::start().await;
    let mut c1 = server.connect("/chat").await;
    let mut c2 = server.connect("/chat").await;
    let mut c3 = server.connect("/chat").await;
    let mut echo = server.connect("/echo").await;
    let mut relay = server.connect("/ws?id=1").await;

    send_text(&mut c1, "hi all").await;
    for client in [&mut c1, &mut c2, &mut c3] {
        assert_eq!(recv_text(client).await, "hi all");
    }

    // Multi-byte text is broadcast unchanged, and from any member.
    send_text(&mut c3, "grüße 🌍").await;
    for client in [&mut c1, &mut c2, &mut c3] {
        assert_eq!(recv_text(client).await, "grüße 🌍");
    }

    // Neither /echo nor an unsubscribed relay client hears the chat.
    assert_silent(&mut echo, QUIET).await;
    assert_silent(&mut relay, Duration::from_millis(20)).await;
    for client in [&mut c1, &mut c2, &mut c3] {
        assert_silent(client, Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn chat_messages_arrive_in_the_order_they_were_sent() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/chat").await;
    let mut listener = server.connect("/chat").await;

    for i in 0..50 {
        send_text(&mut sender, &format!("message {i}")).await;
    }
    for i in 0..50 {
        assert_eq!(recv_text(&mut listener).await, format!("message {i}"));
        assert_eq!(recv_text(&mut sender).await, format!("message {i}"));
    }
}

#[tokio::test]
async fn a_chat_client_that_left_gets_nothing_and_the_rest_carry_on() {
    let server = TestServer::start().await;
    let mut stays = server.connect("/chat").await;
    let mut leaves = server.connect("/chat").await;
    leaves.close(None).await.expect("close");
    drain_until_closed(&mut leaves).await;
    server
        .eventually("one chat client left", |hub| hub.live_connections() == 1)
        .await;

    send_text(&mut stays, "anyone?").await;
    assert_eq!(recv_text(&mut stays).await, "anyone?");
    let published = http_post_json(
        server.addr,
        "/api/publish",
        r#"{"topic":"chat","payload":"count"}"#,
    )
    .await;
    assert_eq!(published.status, 200);
    assert_eq!(published.json(), serde_json::json!({"recipients": 1}));
}

#[tokio::test]
async fn binary_on_chat_gets_an_error_frame_and_the_connection_stays_open() {
    let server = TestServer::start().await;
    let mut sender = server.connect("/chat").await;
    let mut other = server.connect("/chat").await;

    send_binary(&mut sender, vec![1, 2, 3]).await;
    assert_eq!(recv_error_code(&mut sender).await, "binary_not_supported");
    assert_silent(&mut other, QUIET).await;
    assert_silent(&mut sender, Duration::from_millis(20)).await;

    send_text(&mut sender, "text still works").await;
    assert_eq!(recv_text(&mut sender).await, "text still works");
    assert_eq!(recv_text(&mut other).await, "text still works");
}

// ---------------------------------------------------------------------------
// The chat topic, shared with the relay and the API
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_relay_client_subscribed_to_chat_receives_chat_messages() {
    let server = TestServer::start().await;
    let mut chat = server.connect("/chat").await;
    let mut relay = server.connect("/ws?id=watcher").await;

    send_text(&mut relay, r#"{"type":"subscribe","topic":"chat"}"#).await;
    assert_eq!(
        recv_json(&mut relay).await,
        serde_json::json!({"subscribed":"chat"})
    );

    // The topic carries JSON: relay subscribers get the chat text as a JSON
    // string, chat clients get text.
    send_text(&mut chat, "hello \"from\" chat").await;
    assert_eq!(recv_text(&mut chat).await, "hello \"from\" chat");
    assert_eq!(
        recv_json(&mut relay).await,
        serde_json::json!("hello \"from\" chat")
    );

    // And a relay publish to "chat" reaches the chat clients as JSON.
    send_text(
        &mut relay,
        r#"{"type":"publish","topic":"chat","payload":{"from":"relay"}}"#,
    )
    .await;
    assert_eq!(recv_text(&mut chat).await, r#"{"from":"relay"}"#);
    assert_eq!(recv_text(&mut relay).await, r#"{"from":"relay"}"#);

    // Unsubscribed, it hears the chat no more.
    send_text(&mut relay, r#"{"type":"unsubscribe","topic":"chat"}"#).await;
    assert_eq!(
        recv_json(&mut relay).await,
        serde_json::json!({"unsubscribed":"chat"})
    );
    send_text(&mut chat, "bye").await;
    assert_eq!(recv_text(&mut chat).await, "bye");
    assert_silent(&mut relay, QUIET).await;
}

#[tokio::test]
async fn api_publish_to_chat_reaches_the_chat_clients() {
    let server = TestServer::start().await;
    let mut c1 = server.connect("/chat").await;
    let mut c2 = server.connect("/chat").await;
    let mut echo = server.connect("/echo").await;

    let response = http_post_json(
        server.addr,
        "/api/publish",
        r#"{"topic":"chat","payload":{"from":"backend","n":[1,2]}}"#,
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json(), serde_json::json!({"recipients": 2}));
    for client in [&mut c1, &mut c2] {
        assert_eq!(recv_text(client).await, r#"{"from":"backend","n":[1,2]}"#);
    }
    assert_silent(&mut echo, QUIET).await;

    // A string payload arrives as its text, as a chat client's own message
    // does: JSON strings are what chat clients send into the topic.
    let response = http_post_json(
        server.addr,
        "/api/publish",
        r#"{"topic":"chat","payload":"plain é"}"#,
    )
    .await;
    assert_eq!(response.json(), serde_json::json!({"recipients": 2}));
    for client in [&mut c1, &mut c2] {
        assert_eq!(recv_text(client).await, "plain é");
    }
}

#[tokio::test]
async fn chat_clients_can_send_after_the_backend_and_relay_use_the_topic() {
    // The shared topic does not change what a chat client sees of its own
    // messages: still exactly one copy each.
    let server = TestServer::start().await;
    let mut chat = server.connect("/chat").await;
    let mut relay = server.connect("/ws?id=r").await;
    send_text(&mut relay, r#"{"type":"subscribe","topic":"chat"}"#).await;
    let _ack = recv_json(&mut relay).await;

    send_text(&mut chat, "x").await;
    assert_eq!(recv_text(&mut chat).await, "x");
    assert_eq!(recv_text(&mut relay).await, r#""x""#);
    assert_silent(&mut chat, QUIET).await;
    assert_silent(&mut relay, Duration::from_millis(20)).await;

    let mut silent = server.connect("/echo").await;
    silent.send(WsMessage::text("e")).await.expect("send");
    assert_eq!(recv_text(&mut silent).await, "e");
    assert_silent(&mut chat, QUIET).await;
}
