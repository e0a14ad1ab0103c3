//! Graceful shutdown under load: every client receives the frames queued to
//! it before shutdown began, then close 1001; nothing accepted is dropped
//! silently. (The `switchboard` binary maps SIGTERM to the same path: see
//! crates/switchboard-cli/tests/cli.rs.)

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use switchboard::Limits;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const CLIENTS: usize = 200;
const FRAMES: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_gets_its_queued_frames_then_1001() {
    let server = TestServer::with_limits(Limits {
        max_queued_messages: 10_000,
        max_queued_bytes: 64 << 20,
        ..Limits::default()
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(server.connect(&format!("/ws?id=c{i}")).await);
    }
    let mut sender = server.connect("/ws?id=sender").await;
    server
        .eventually("all connected", |hub| hub.live_connections() == CLIENTS + 1)
        .await;

    // Queue FRAMES frames of 1 KiB to every client while none of them reads.
    let targets: Vec<String> = (0..CLIENTS).map(|i| format!("\"c{i}\"")).collect();
    let filler = "q".repeat(1024);
    for seq in 0..FRAMES {
        let frame = format!(
            r#"{{"targets":[{}],"payload":{{"seq":{seq},"f":"{filler}"}}}}"#,
            targets.join(",")
        );
        sender.feed(WsMessage::text(frame)).await.expect("feed");
    }
    // A marker back to the sender: once it arrives, every frame above has
    // been queued (a connection handles its frames in order).
    sender
        .feed(WsMessage::text(
            r#"{"targets":["sender"],"payload":"marker"}"#,
        ))
        .await
        .expect("feed marker");
    sender.flush().await.expect("flush");
    assert_eq!(recv_text(&mut sender).await, r#""marker""#);

    let deliveries_before = server.hub.metrics().deliveries.get();
    assert!(deliveries_before >= (CLIENTS * FRAMES) as u64);

    // Shut down while everything is still queued, and read concurrently.
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            tokio::spawn(async move {
                let mut next = 0u64;
                loop {
                    let message = tokio::time::timeout(Duration::from_secs(20), client.next())
                        .await
                        .map_err(|_| format!("c{i}: silence after {next} frames"))?;
                    match message {
                        Some(Ok(WsMessage::Text(text))) => {
                            let json: serde_json::Value =
                                serde_json::from_str(text.as_str()).expect("JSON");
                            if json["seq"].as_u64() != Some(next) {
                                return Err(format!("c{i}: frame {next} missing or out of order"));
                            }
                            next += 1;
                        }
                        Some(Ok(WsMessage::Close(Some(frame)))) => {
                            if next != FRAMES as u64 {
                                return Err(format!("c{i}: close after only {next} frames"));
                            }
                            if frame.code != CloseCode::Away {
                                return Err(format!("c{i}: close code {:?}", frame.code));
                            }
                            return Ok(frame.reason.to_string());
                        }
                        Some(Ok(_)) => {}
                        other => return Err(format!("c{i}: {other:?} after {next} frames")),
                    }
                }
            })
        })
        .collect();
    let sender_close = tokio::spawn(async move { recv_close(&mut sender).await });
    let hub = server.hub.clone();
    server.shutdown().await;
    let sender_close = sender_close
        .await
        .expect("sender task")
        .expect("a close frame");
    assert_eq!(sender_close.code, CloseCode::Away);

    for reader in readers {
        let reason = reader
            .await
            .expect("reader task")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reason, "server shutting down");
    }
    assert_eq!(hub.live_connections(), 0);
    assert_eq!(
        hub.metrics().dropped_messages.get(),
        0,
        "a queued frame was dropped"
    );
}
