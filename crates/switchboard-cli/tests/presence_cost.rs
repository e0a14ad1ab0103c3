//! What presence costs the server on subscribe/unsubscribe churn: a
//! `switchboard` process (memory backend) and 20 v1 clients that subscribe
//! to and unsubscribe from a topic with a watcher, 40,000 joins in all,
//! run with `v1.presence` on and off; the server's CPU time comes from
//! `/proc/PID/stat`. Prints joins per CPU-second both ways.
//!
//! A measurement of the debug build these tests run (the ratio is what
//! matters; docs/protocol-v1.md has the numbers). It fails if presence
//! more than doubles the cost of a subscribe, far past the ≤ 10 % target,
//! so that only a gross regression breaks it on a loaded machine.

mod support;

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use support::{Client, Server, TempFile, WAIT};

const CLIENTS: usize = 20;
/// Subscribe/unsubscribe pairs per client; `PRESENCE_COST_ROUNDS`
/// overrides (the figures in docs/protocol-v1.md: 10,000, with
/// `cargo test --release`).
const ROUNDS: usize = 2_000;
const BATCH: usize = 50;

fn rounds() -> usize {
    std::env::var("PRESENCE_COST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(ROUNDS, |n: usize| n.max(BATCH) / BATCH * BATCH)
}

/// User plus system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces, in parens).
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

fn clock_ticks_per_second() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("run getconf CLK_TCK");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK is a number")
}

async fn v1(server: &Server, id: &str) -> Client {
    let url = format!("ws://{}/ws?id={id}", server.addr);
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("switchboard.v1"),
    );
    let (mut client, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect in time")
        .expect("connect");
    client
        .send(WsMessage::text(r#"{"type":"hello","id":0}"#))
        .await
        .expect("send");
    let welcome = next_json(&mut client).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    client
}

async fn next_json(client: &mut Client) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("no error");
        if let WsMessage::Text(text) = message {
            return serde_json::from_str(&text).expect("JSON");
        }
    }
}

/// One client's churn: `ROUNDS` subscribes and unsubscribes of `room`, in
/// pipelined batches; every request acked.
async fn churn(mut client: Client, rounds: usize) {
    for batch in 0..rounds / BATCH {
        for i in 0..BATCH {
            let n = (batch * BATCH + i) as u64;
            let sub = json!({"type": "subscribe", "id": 2 * n, "topic": "room"});
            let unsub = json!({"type": "unsubscribe", "id": 2 * n + 1, "topic": "room"});
            client
                .feed(WsMessage::text(sub.to_string()))
                .await
                .expect("feed");
            client
                .feed(WsMessage::text(unsub.to_string()))
                .await
                .expect("feed");
        }
        client.flush().await.expect("flush");
        let mut acked = 0;
        while acked < 2 * BATCH {
            let frame = next_json(&mut client).await;
            if frame["type"] == "ack" {
                assert!(frame.get("error").is_none(), "{frame}");
                acked += 1;
            }
        }
    }
}

/// Joins per server CPU-second with `v1.presence` set to `presence`; with
/// `watch`, the watcher asks for the topic's full presence.
async fn joins_per_cpu_second(presence: bool, watch: bool) -> f64 {
    let config = TempFile::config(&format!("[v1]\npresence = {presence}\n"));
    // The message rate limit off: a long run (PRESENCE_COST_ROUNDS=50000)
    // sends faster than the default 10,000 a second and would measure
    // `rate_limited` answers instead of joins.
    let server = Server::start(&["--config", config.path(), "--max-message-rate", "0"]);
    // A watcher of the topic (with presence on): every join and leave is
    // an event to coalesce and send.
    let mut watcher = v1(&server, "watcher").await;
    let subscribe = if presence && watch {
        json!({"type": "subscribe", "id": 1, "topic": "room", "presence": "full"})
    } else {
        json!({"type": "subscribe", "id": 1, "topic": "room"})
    };
    watcher
        .send(WsMessage::text(subscribe.to_string()))
        .await
        .expect("send");
    assert_eq!(next_json(&mut watcher).await["type"], "ack");
    let reader = tokio::spawn(async move {
        // Keep reading so that the watcher is never a slow consumer.
        while let Some(Ok(_)) = watcher.next().await {}
    });
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        clients.push(v1(&server, &format!("c{i}")).await);
    }
    let pid = server.proc.pid();
    let before = cpu_ticks(pid);
    let rounds = rounds();
    let runs: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(churn(c, rounds)))
        .collect();
    for run in runs {
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("churn in time")
            .expect("churn task");
    }
    let ticks = cpu_ticks(pid) - before;
    reader.abort();
    let seconds = ticks as f64 / clock_ticks_per_second() as f64;
    (CLIENTS * rounds) as f64 / seconds.max(0.001)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_cost_on_subscribe_churn() {
    let without = joins_per_cpu_second(false, false).await;
    let unwatched = joins_per_cpu_second(true, false).await;
    let with = joins_per_cpu_second(true, true).await;
    let overhead = without / with - 1.0;
    println!(
        "subscribe+unsubscribe churn, {} joins: {without:.0} joins per CPU-second without presence, {unwatched:.0} with presence and no watcher ({:.1} % more CPU), {with:.0} with one full watcher ({:.1} % more CPU)",
        CLIENTS * rounds(),
        (without / unwatched - 1.0) * 100.0,
        overhead * 100.0
    );
    assert!(
        overhead < 1.0,
        "presence more than doubles the CPU of a subscribe: {without:.0} vs {with:.0} joins per CPU-second"
    );
}
