//! Slow consumers at scale: 1,000 healthy clients keep receiving while 10
//! clients stop reading. The 10 are cut off once their bounded queues
//! overflow (close 1008, messages reported dropped); the healthy ones get
//! every message, in order; what the server holds for the slow ones is
//! bounded by `max_queued_bytes` + the writer's high-water mark each.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use switchboard::{ErrorKind, Limits};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const HEALTHY: usize = 1000;
const SLOW: usize = 10;
const PER_HEALTHY: usize = 20;

/// A client that never reads, with a small receive buffer so that the
/// kernel absorbs little and the server-side bound is what is exercised.
async fn stalled_client(
    server: &TestServer,
    id: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(server.addr).await.expect("connect");
    let (client, _) = tokio_tungstenite::client_async(server.url(&format!("/ws?id={id}")), stream)
        .await
        .expect("upgrade");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_healthy_clients_keep_receiving_while_ten_stop_reading() {
    let server = TestServer::with_limits(Limits {
        max_queued_bytes: 256 * 1024,
        // A cut-off client that does not read cannot answer our close: it
        // is dropped when this runs out.
        close_timeout: Duration::from_millis(500),
        ..Limits::default()
    })
    .await;
    let mut slow = Vec::new();
    for i in 0..SLOW {
        slow.push(stalled_client(&server, &format!("slow{i}")).await);
    }
    let mut healthy = Vec::new();
    for i in 0..HEALTHY {
        healthy.push(server.connect(&format!("/ws?id=h{i}")).await);
    }
    let mut sender = server.connect("/ws?id=sender").await;
    server
        .eventually("all connected", |hub| {
            hub.live_connections() == HEALTHY + SLOW + 1
        })
        .await;

    // Readers for the healthy clients, each expecting PER_HEALTHY messages
    // in order.
    let readers: Vec<_> = healthy
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut next = 0u64;
                while next < PER_HEALTHY as u64 {
                    match tokio::time::timeout(Duration::from_secs(20), client.next()).await {
                        Ok(Some(Ok(WsMessage::Text(text)))) => {
                            let json: serde_json::Value =
                                serde_json::from_str(text.as_str()).expect("JSON");
                            assert_eq!(json["seq"].as_u64(), Some(next), "out of order");
                            next += 1;
                        }
                        Ok(Some(Ok(_))) => {}
                        other => return Err(format!("after {next} messages: {other:?}")),
                    }
                }
                Ok(client)
            })
        })
        .collect();

    // Interleave: a flood for every slow client (8 MiB each: more than the
    // kernel's autotuned send buffer, up to 4 MiB, plus its 256 KiB queue),
    // and PER_HEALTHY rounds to every healthy client.
    let filler = "z".repeat(4096);
    let slow_targets: Vec<String> = (0..SLOW).map(|i| format!("\"slow{i}\"")).collect();
    let flood = WsMessage::text(format!(
        r#"{{"targets":[{}],"payload":"{filler}"}}"#,
        slow_targets.join(",")
    ));
    let healthy_targets: Vec<String> = (0..HEALTHY).map(|i| format!("\"h{i}\"")).collect();
    for seq in 0..PER_HEALTHY {
        for _ in 0..(2048 / PER_HEALTHY) {
            sender.feed(flood.clone()).await.expect("feed flood");
        }
        let round = format!(
            r#"{{"targets":[{}],"payload":{{"seq":{seq}}}}}"#,
            healthy_targets.join(",")
        );
        sender
            .feed(WsMessage::text(round))
            .await
            .expect("feed round");
        sender.flush().await.expect("flush");
    }

    // Keep every healthy client connected to the end.
    let mut kept = Vec::with_capacity(HEALTHY);
    for (i, reader) in readers.into_iter().enumerate() {
        let result = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("reader finishes")
            .expect("reader task");
        match result {
            Ok(client) => kept.push(client),
            Err(problem) => panic!("healthy client h{i}: {problem}"),
        }
    }
    let metrics = server.hub.metrics();
    server
        .eventually("the ten slow clients are cut off", |hub| {
            hub.live_connections() == HEALTHY + 1
        })
        .await;
    assert_eq!(metrics.errors(ErrorKind::QueueOverflow), SLOW as u64);
    assert!(metrics.dropped_messages.get() >= SLOW as u64);
    // The sender and the healthy clients are all still there.
    assert_eq!(server.hub.live_connections(), HEALTHY + 1);
    drop((slow, kept));
}
