//! What a retained `switchboard.v1` message costs in memory on one node
//! (docs/protocol-v1.md, "Per-ID inbox", "Memory"): the resident size this
//! process grows by while 1,000 IDs whose v1 clients went away each retain
//! 256 messages sent through `/api/send`. Alone in its test binary, so that
//! no other test allocates meanwhile.
//!
//! Each `/api/send` lists all 1,000 IDs, so one payload is shared by the
//! 1,000 inbox entries it makes (as it is by the frames that deliver it):
//! the figure is the bookkeeping per retained message, beyond the payload.
//! A payload sent to one ID costs its own bytes on top (counted against
//! `inbox_max_bytes` and `inbox_total_bytes`).

mod common;

use common::{TestServer, connect_v1, http_post_json, recv_json, send_text};
use serde_json::json;

const IDS: usize = 1_000;
const PER_ID: usize = 256;

/// This process's resident memory, in bytes.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_costs_its_bookkeeping_beyond_the_shared_payload() {
    let server = TestServer::start().await;
    // Each ID says hello once (which gives it an inbox), then goes away:
    // what is sent to it from now on is retained for `inbox_ttl` (120 s).
    for i in 0..IDS {
        let mut client = connect_v1(&server, &format!("r{i}")).await;
        send_text(&mut client, r#"{"type":"hello","id":0}"#).await;
        let welcome = recv_json(&mut client).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client.close(None).await.expect("close");
    }
    server
        .eventually("every client gone", |hub| hub.live_connections() == 0)
        .await;
    let targets: Vec<String> = (0..IDS).map(|i| format!("r{i}")).collect();
    let body = |n: usize| {
        json!({"targets": targets, "payload": {"n": n, "text": "x".repeat(64)}}).to_string()
    };
    // One round first, so that buffers that grow once (the HTTP path's,
    // each inbox's first allocation) are not counted per message.
    let warm = http_post_json(server.addr, "/api/send", &body(0)).await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let before = vm_rss();
    for n in 1..PER_ID {
        let answer = http_post_json(server.addr, "/api/send", &body(n)).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let report = answer.json();
        assert_eq!(
            report["retained"].as_array().map(Vec::len),
            Some(IDS),
            "every ID retains: {report}"
        );
    }
    let grown = vm_rss().saturating_sub(before);
    let messages = IDS * (PER_ID - 1);
    let per_message = grown as f64 / messages as f64;
    println!(
        "in-memory inbox: {per_message:.1} bytes per retained message beyond its shared payload \
         (RSS growth {grown} B over {messages} messages, {IDS} IDs × {PER_ID})"
    );
    // A gross-regression bound, not the figure (which docs/protocol-v1.md
    // gives): an entry is a sequence number, a timestamp and a pointer to
    // the shared payload.
    assert!(
        per_message < 200.0,
        "{per_message:.1} bytes per retained message; docs/protocol-v1.md gives the measured figure"
    );
    server.shutdown().await;
}
