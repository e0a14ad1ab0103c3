//! Backpressure inside one read (issue 12): clients that stop reading and
//! flood frames that each provoke a reply cannot make the server queue more
//! than the writer's bound (256 KiB) for them. The server runs in this
//! process, so its memory is this process's RSS; this file holds one test
//! so that nothing else runs beside it.

mod common;
mod raw;

use std::time::Duration;

use common::*;
use raw::{MASK, RawWs, masked};
use tokio::io::AsyncWriteExt as _;

const FLOODERS: usize = 20;
/// Empty text frames per flooder: 6 bytes each (header and mask), 60,000
/// bytes in all, which one 64 KiB read takes at once. Each is answered with
/// an `invalid_json` error frame of ~100 bytes.
const FRAMES: usize = 10_000;

fn vm_rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .expect("VmRSS in /proc/self/status")
}

/// Waits until the server has handled no new frame for 300 ms (bounded).
async fn until_frames_settle(server: &TestServer) -> u64 {
    let mut last = server.hub.metrics().frames_in.get();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = server.hub.metrics().frames_in.get();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the server kept handling frames for 15 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_flooding_without_reading_hold_a_bounded_backlog() {
    let server = TestServer::start().await;
    let mut echo = server.connect("/echo").await;
    send_text(&mut echo, "warm").await;
    assert_eq!(recv_text(&mut echo).await, "warm");

    // Clients that never read, with a small receive buffer so that the
    // kernel takes little of what the server writes.
    let mut flooders = Vec::new();
    for i in 0..FLOODERS {
        let path = format!("/ws?id=flood{i}");
        flooders.push(RawWs::connect_with_recv_buffer(server.addr, &path, 4096).await);
    }
    server
        .eventually("all connected", |hub| {
            hub.live_connections() == FLOODERS + 1
        })
        .await;
    let frames_before = server.hub.metrics().frames_in.get();
    let rss_before = vm_rss();

    let flood: Vec<u8> = (0..FRAMES).flat_map(|_| masked(0x81, b"")).collect();
    assert_eq!(flood.len(), FRAMES * (2 + MASK.len()));
    for flooder in &mut flooders {
        tokio::time::timeout(WAIT, flooder.stream.write_all(&flood))
            .await
            .expect("the kernel takes 60 KB at once")
            .expect("write the flood");
    }
    let handled = until_frames_settle(&server).await - frames_before;
    let grown = vm_rss().saturating_sub(rss_before);
    let per_connection = grown / FLOODERS;
    println!(
        "{FLOODERS} flooders sent {} frames, the server handled {handled}; RSS grew {grown} B, {per_connection} B per flooder",
        FLOODERS * FRAMES
    );
    // Without the bound inside a read, each connection answered all of one
    // read (~10,000 error frames, ~1.8 MB) before looking at its writer.
    assert!(
        per_connection < 1024 * 1024,
        "{per_connection} B per flooding connection: the writer backlog is not bounded within a read"
    );
    send_text(&mut echo, "still answering").await;
    assert_eq!(recv_text(&mut echo).await, "still answering");

    // A flooder that starts reading gets an answer to every frame it sent,
    // in order: the frames left unhandled were kept, not dropped, and the
    // connection resumed once its writer drained.
    let mut reader = flooders.swap_remove(0);
    for i in 0..FRAMES {
        let frame = tokio::time::timeout(WAIT, reader.read_frame())
            .await
            .unwrap_or_else(|_| panic!("answer {i} of {FRAMES} within the timeout"));
        let json: serde_json::Value = serde_json::from_slice(&frame.payload)
            .unwrap_or_else(|e| panic!("answer {i} is not JSON ({e}): {frame:?}"));
        assert_eq!(error_code_of(&json), "invalid_json", "answer {i}");
    }
    reader.close_normally().await;
    send_text(&mut echo, "after").await;
    assert_eq!(recv_text(&mut echo).await, "after");
}
