//! Configurable limits: message rate, slow-consumer policy, request head
//! size and the handshake timeout (slowloris).

mod common;
mod raw;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use raw::{RawWs, masked};
use switchboard::{ErrorKind, Limits, SlowConsumer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test]
async fn messages_over_the_rate_get_an_error_frame_and_sustained_abuse_is_closed_1008() {
    let server = TestServer::with_limits(Limits {
        max_message_rate: 10,
        message_burst: 5,
        ..Limits::default()
    })
    .await;
    let mut ws = RawWs::connect(server.addr, "/echo").await;
    // The bucket holds 5: all five are echoed.
    for i in 0..5u8 {
        ws.send(&masked(0x81, &[b'0' + i])).await;
    }
    for i in 0..5u8 {
        assert_eq!(ws.read_frame().await.payload, [b'0' + i]);
    }
    // The sixth is refused with an error frame; the connection stays open.
    ws.send(&masked(0x81, b"6")).await;
    let refused = ws.read_frame().await;
    let json: serde_json::Value = serde_json::from_slice(&refused.payload).expect("JSON");
    assert_eq!(json["error"]["code"], "rate_limited", "{json}");
    // Keep sending: once refused messages fill a second bucket, 1008.
    let burst: Vec<u8> = (0..10).flat_map(|_| masked(0x81, b"x")).collect();
    ws.send(&burst).await;
    let (frames, (code, reason)) = ws.read_until_close().await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("rate"), "{reason}");
    assert!(
        frames.iter().all(|f| f.payload.starts_with(b"{\"error\"")),
        "{frames:?}"
    );
    assert!(server.hub.metrics().errors(ErrorKind::RateLimited) >= 5);

    // Another client is unaffected.
    let mut other = server.connect("/echo").await;
    send_text(&mut other, "still fine").await;
    assert_eq!(recv_text(&mut other).await, "still fine");
}

#[tokio::test]
async fn the_rate_limit_refills_over_time() {
    let server = TestServer::with_limits(Limits {
        max_message_rate: 50,
        message_burst: 2,
        ..Limits::default()
    })
    .await;
    let mut client = server.connect("/echo").await;
    // 2 per burst, 50 a second: one message every 40 ms is always allowed.
    for i in 0..10 {
        send_text(&mut client, &format!("m{i}")).await;
        assert_eq!(recv_text(&mut client).await, format!("m{i}"));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_the_newest_messages_and_tells_the_client_how_many_it_lost() {
    let server = TestServer::with_limits(Limits {
        slow_consumer: SlowConsumer::DropOldest,
        max_queued_messages: 8,
        ..Limits::default()
    })
    .await;
    // The slow client connects, then does not read for a while.
    let mut slow = server.connect("/ws?id=slow").await;
    let mut sender = server.connect("/ws?id=sender").await;
    server
        .eventually("two connections", |hub| hub.live_connections() == 2)
        .await;
    const N: usize = 6_000;
    let filler = "y".repeat(2_000);
    for seq in 0..N {
        let frame = format!(r#"{{"targets":["slow"],"payload":{{"seq":{seq},"f":"{filler}"}}}}"#);
        sender.feed(WsMessage::text(frame)).await.expect("feed");
    }
    sender.flush().await.expect("flush");
    server
        .eventually("some frames dropped", |hub| {
            hub.metrics().dropped_messages.get() > 0
        })
        .await;

    // Now read everything: a drop notice came, the newest message arrived,
    // and the connection was never closed.
    let mut warned = 0u64;
    let mut last_seq = None;
    while last_seq != Some(N as u64 - 1) {
        let text = recv_text(&mut slow).await;
        let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        if json["warning"]["code"] == "messages_dropped" {
            warned += json["warning"]["count"].as_u64().expect("count");
        } else {
            last_seq = json["seq"].as_u64();
        }
    }
    assert!(warned > 0, "no messages_dropped notice");
    assert_eq!(warned, server.hub.metrics().dropped_messages.get());
    assert_eq!(server.hub.metrics().errors(ErrorKind::QueueOverflow), 0);
    send_text(
        &mut slow,
        r#"{"targets":["sender"],"payload":"still here"}"#,
    )
    .await;
    assert_eq!(recv_text(&mut sender).await, r#""still here""#);
}

#[tokio::test]
async fn a_request_head_over_the_limit_gets_431() {
    let server = TestServer::start().await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let big = "a".repeat(20 * 1024);
    let request = format!("GET /heartbeat HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    // The server may answer before it has read everything; ignore a write
    // error from the reset that follows.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(WAIT, stream.read(&mut head))
        .await
        .expect("an answer in time")
        .expect("read");
    let status_line = String::from_utf8_lossy(&head[..n]);
    assert!(status_line.starts_with("HTTP/1.1 431"), "{status_line}");

    // The server still serves everyone else.
    let mut client = server.connect("/echo").await;
    send_text(&mut client, "ok").await;
    assert_eq!(recv_text(&mut client).await, "ok");
}

#[tokio::test]
async fn a_client_sending_its_headers_too_slowly_is_dropped() {
    let server = TestServer::with_limits(Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let started = tokio::time::Instant::now();
    // One byte every 100 ms (the request is 33 bytes, so the loop is
    // bounded): a slowloris client.
    let request = b"GET /echo HTTP/1.1\r\nHost: slow\r\n";
    let mut closed = false;
    for &byte in request {
        if stream.write_all(&[byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                // EOF, an error, or a 408 answer: the server gave up on us.
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "the slow client was never dropped");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "dropped only after {:?}",
        started.elapsed()
    );
    let mut client = server.connect("/echo").await;
    client.send(WsMessage::text("ok")).await.expect("send");
    assert!(matches!(client.next().await, Some(Ok(WsMessage::Text(_)))));
}
