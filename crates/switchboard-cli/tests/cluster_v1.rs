//! `switchboard.v1` across nodes (docs/protocol-v1.md, "With Redis"): three
//! real `switchboard` nodes sharing one real `redis-server`, and real
//! clients speaking raw v1 frames — resume on another node, partial and
//! reset, pipelined sends, `mid` idempotency through another node, a target
//! node killed mid-send, and the sequence gate under three senders while
//! the nodes' Redis connections are killed.
//!
//! `redis-server` (version 7 or later) must be installed (`scripts/test`
//! installs it); without it every test here fails with a message saying
//! so. Every child process is owned by a guard that kills it on drop, and
//! every wait is bounded.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use support::redis::{Redis, Resp, command_at};
use support::{Client, STARTUP, Server, TempFile, WAIT, free_port, http, switchboard, wait_for};

/// The presence TTL and request timeout the nodes run with.
const PRESENCE_TTL: &str = "2000ms";
const REQUEST_TIMEOUT: &str = "1000ms";

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

impl Redis {
    /// The newest seq of `id`'s inbox (`s` of its meta hash).
    fn inbox_top(&self, id: &str) -> u64 {
        match self.command_ok(&["HGET", &format!("sbv1:{{id:{id}}}:meta"), "s"]) {
            Resp::Bulk(Some(s)) => s.parse().expect("a number"),
            other => panic!("no inbox meta for {id}: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

struct Node {
    name: String,
    server: Server,
}

impl Node {
    /// A node named `name` on `redis` with the `[v1]` table `v1`.
    async fn start(redis: &Redis, name: &str, config: &TempFile) -> Self {
        let mut command = switchboard();
        command.args([
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.path(),
            "--backend",
            "redis",
            "--redis-url",
            &redis.url(),
            "--node-id",
            name,
            "--redis-key-prefix",
            "sbv1",
            "--redis-presence-ttl",
            PRESENCE_TTL,
            "--redis-request-timeout",
            REQUEST_TIMEOUT,
        ]);
        let node = Self {
            name: name.to_owned(),
            server: Server::spawn(command),
        };
        let addr = node.addr();
        wait_for(&format!("{name} healthy"), STARTUP, || async move {
            let (status, body) = http(addr, "GET", "/heartbeat", None).await;
            (status == 200 && body == r#"{"status":"ok"}"#).then_some(())
        })
        .await;
        node
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Whether `id` is listed connected anywhere in the cluster.
    async fn lists(&self, id: &str) -> bool {
        let (status, body) = http(self.addr(), "GET", "/api/connections", None).await;
        assert_eq!(status, 200, "{}: {body}", self.name);
        let body: Value = serde_json::from_str(&body).expect("JSON");
        body["clients"]
            .as_array()
            .expect("clients")
            .iter()
            .any(|c| c["id"] == id)
    }
}

/// Three nodes, `a`, `b` and `c`, with the `[v1]` table `v1`.
async fn cluster(redis: &Redis, v1: &str) -> (TempFile, [Node; 3]) {
    let config = TempFile::config(&format!("[v1]\n{v1}"));
    let a = Node::start(redis, "a", &config).await;
    let b = Node::start(redis, "b", &config).await;
    let c = Node::start(redis, "c", &config).await;
    (config, [a, b, c])
}

// ---------------------------------------------------------------------------
// v1 clients
// ---------------------------------------------------------------------------

/// A v1 connection to `node` as `id`, no hello yet.
async fn connect_v1(node: &Node, id: &str) -> Client {
    let mut request = format!("ws://{}/ws?id={id}", node.addr())
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "switchboard.v1".parse().expect("header value"),
    );
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect in time")
        .expect("connect")
        .0
}

async fn send_frame(client: &mut Client, frame: &Value) {
    client
        .send(WsMessage::text(frame.to_string()))
        .await
        .expect("send a frame");
}

/// The next frame as JSON; panics on a close or after `WAIT`.
async fn recv(client: &mut Client) -> Value {
    loop {
        match tokio::time::timeout(WAIT, client.next()).await {
            Ok(Some(Ok(WsMessage::Text(text)))) => {
                return serde_json::from_str(&text).expect("a JSON frame");
            }
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => {}
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

/// The next frame, which must be of `kind`.
async fn next_of(client: &mut Client, kind: &str) -> Value {
    let frame = recv(client).await;
    assert_eq!(frame["type"], kind, "expected a {kind}: {frame}");
    frame
}

/// Connects to `node` as `id` and says hello (resuming from `resume`).
async fn hello(node: &Node, id: &str, resume: Option<Value>) -> (Client, Value) {
    let mut client = connect_v1(node, id).await;
    let mut frame = json!({"type": "hello", "id": 0});
    if let Some(resume) = resume {
        frame["resume"] = resume;
    }
    send_frame(&mut client, &frame).await;
    let welcome = next_of(&mut client, "welcome").await;
    assert_eq!(welcome["node"], node.name.as_str(), "{welcome}");
    (client, welcome)
}

fn resume_from(welcome: &Value, seq: u64) -> Value {
    json!({"epoch": welcome["inbox"]["epoch"], "seq": seq})
}

/// A send with request id `id` (and `mid`); returns its ack.
async fn send(
    client: &mut Client,
    id: u64,
    mid: Option<&str>,
    targets: Value,
    payload: Value,
) -> Value {
    let mut frame = json!({"type": "send", "id": id, "targets": targets, "payload": payload});
    if let Some(mid) = mid {
        frame["mid"] = json!(mid);
    }
    send_frame(client, &frame).await;
    let ack = next_of(client, "ack").await;
    assert_eq!(ack["id"], id, "{ack}");
    ack
}

/// Kills a client's TCP connection without a close handshake (RST).
fn kill(client: Client) {
    if let tokio_tungstenite::MaybeTlsStream::Plain(stream) = client.get_ref() {
        stream.set_zero_linger().expect("SO_LINGER 0");
    }
    drop(client);
}

/// Asserts that no frame arrives for a short while.
async fn assert_quiet(client: &mut Client, who: &str) {
    if let Ok(Some(frame)) = tokio::time::timeout(Duration::from_millis(400), client.next()).await {
        panic!("{who} got an unexpected frame: {frame:?}");
    }
}

/// Waits until no node lists `id` connected.
async fn wait_offline(node: &Node, id: &str) {
    wait_for(&format!("{id} offline"), WAIT, || async {
        (!node.lists(id).await).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_resumes_on_a_third_node_what_was_sent_through_a_second() {
    let redis = Redis::start();
    let (_config, [a, b, c]) = cluster(&redis, "inbox_ttl = \"60s\"\n").await;
    let (bob, welcome) = hello(&a, "bob", None).await;
    assert_eq!(welcome["resume"]["status"], "new");
    assert_eq!(welcome["inbox"]["seq"], 0);
    kill(bob);
    wait_offline(&b, "bob").await;

    let (mut alice, _) = hello(&b, "alice", None).await;
    for n in 1..=50 {
        let ack = send(&mut alice, n, None, json!(["bob"]), json!({"n": n})).await;
        assert_eq!(ack["offline"], json!(["bob"]), "{ack}");
        assert_eq!(ack["retained"], json!(["bob"]), "{ack}");
    }

    let (mut bob, welcome) = hello(&c, "bob", Some(resume_from(&welcome, 0))).await;
    assert_eq!(welcome["resume"]["status"], "recovered", "{welcome}");
    assert_eq!(welcome["resume"]["replayed"], 50, "{welcome}");
    assert_eq!(welcome["inbox"]["seq"], 50);
    for n in 1..=50u64 {
        let msg = next_of(&mut bob, "msg").await;
        assert_eq!(msg["seq"], n, "{msg}");
        assert_eq!(msg["from"], "alice");
        assert_eq!(msg["payload"], json!({"n": n}));
    }
    // Live continues after the replay, numbered on.
    let ack = send(&mut alice, 51, None, json!(["bob"]), json!({"n": 51})).await;
    assert_eq!(ack["delivered"], json!(["bob"]), "{ack}");
    let msg = next_of(&mut bob, "msg").await;
    assert_eq!(
        (msg["seq"].clone(), msg["payload"].clone()),
        (json!(51), json!({"n": 51}))
    );
    assert_quiet(&mut bob, "bob").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_while_messages_keep_coming_replays_strictly_before_live() {
    const TOTAL: u64 = 600;
    let redis = Redis::start();
    let (_config, [a, b, c]) = cluster(&redis, "inbox_size = 1000\ninbox_ttl = \"60s\"\n").await;
    let (bob, welcome) = hello(&a, "bob", None).await;
    kill(bob);
    wait_offline(&b, "bob").await;
    // alice sends all the time, from before bob is back to after.
    let (alice, _) = hello(&b, "alice", None).await;
    let sender = tokio::spawn(pipelined_sends(alice, 0, "bob", TOTAL, 8));
    wait_for("half sent", WAIT, || async {
        (redis.inbox_top("bob") >= TOTAL / 2).then_some(())
    })
    .await;
    let (mut bob, back) = hello(&c, "bob", Some(resume_from(&welcome, 0))).await;
    assert_eq!(back["resume"]["status"], "recovered", "{back}");
    let replayed = back["resume"]["replayed"].as_u64().expect("replayed");
    assert!((TOTAL / 2..TOTAL).contains(&replayed), "{back}");
    for n in 1..=TOTAL {
        let msg = next_of(&mut bob, "msg").await;
        assert_eq!(
            msg["seq"], n,
            "replay, then live, each seq once in order: {msg}"
        );
        assert_eq!(msg["payload"], format!("0-{n}"));
    }
    let retained = sender.await.expect("sender");
    assert_eq!(
        retained.len() as u64,
        TOTAL,
        "every ack listed bob as retained"
    );
    assert_quiet(&mut bob, "bob").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_the_inbox_size_resumes_partial_with_the_exact_lost_range() {
    let redis = Redis::start();
    let (_config, [a, b, c]) = cluster(&redis, "inbox_size = 10\ninbox_ttl = \"60s\"\n").await;
    let (bob, welcome) = hello(&a, "bob", None).await;
    drop(bob);
    wait_offline(&b, "bob").await;
    let (mut alice, _) = hello(&b, "alice", None).await;
    for n in 1..=25 {
        send(&mut alice, n, None, json!(["bob"]), json!(n)).await;
    }
    let (mut bob, welcome) = hello(&c, "bob", Some(resume_from(&welcome, 0))).await;
    assert_eq!(welcome["resume"]["status"], "partial", "{welcome}");
    assert_eq!(welcome["resume"]["lost"], json!([[1, 15]]), "{welcome}");
    for n in 16..=25u64 {
        let msg = next_of(&mut bob, "msg").await;
        assert_eq!(
            (msg["seq"].clone(), msg["payload"].clone()),
            (json!(n), json!(n))
        );
    }
    assert_quiet(&mut bob, "bob").await;
    // A replay of a trimmed range says what is gone.
    send_frame(
        &mut bob,
        &json!({"type": "replay", "id": 9, "from": 14, "to": 17}),
    )
    .await;
    assert_eq!(next_of(&mut bob, "msg").await["seq"], 16);
    assert_eq!(next_of(&mut bob, "msg").await["seq"], 17);
    let ack = next_of(&mut bob, "ack").await;
    assert_eq!(
        (ack["replayed"].clone(), ack["lost"].clone()),
        (json!(2), json!([[14, 15]])),
        "{ack}"
    );
    // Memory: the stream holds the 10 newest only.
    assert_eq!(
        redis.command_ok(&["XLEN", "sbv1:{id:bob}:inbox"]),
        Resp::Int(10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_sends_share_the_inbox_and_expired_messages_resume_as_lost() {
    let redis = Redis::start();
    let (_config, [a, b, c]) = cluster(&redis, "inbox_ttl = \"1500ms\"\n").await;
    let (bob, welcome) = hello(&a, "bob", None).await;
    drop(bob);
    wait_offline(&b, "bob").await;
    // /api/send on another node numbers into the same inbox.
    for n in 1..=3 {
        let body = json!({"targets": ["bob"], "payload": n}).to_string();
        let (status, answer) = http(b.addr(), "POST", "/api/send", Some(&body)).await;
        assert_eq!(status, 200, "{answer}");
        let answer: Value = serde_json::from_str(&answer).expect("JSON");
        assert_eq!(answer["retained"], json!(["bob"]), "{answer}");
    }
    let (mut bob, back) = hello(&c, "bob", Some(resume_from(&welcome, 0))).await;
    assert_eq!(back["resume"]["status"], "recovered", "{back}");
    for n in 1..=3u64 {
        let msg = next_of(&mut bob, "msg").await;
        assert_eq!(
            (msg["seq"].clone(), msg["payload"].clone()),
            (json!(n), json!(n))
        );
        assert_eq!(msg.get("from"), None, "an API message has no sender: {msg}");
    }
    drop(bob);
    wait_offline(&b, "bob").await;
    // Past the TTL: resuming from the top is `recovered` with nothing to
    // replay; from before, the expired messages are reported lost.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let (_bob, top) = hello(&b, "bob", Some(resume_from(&welcome, 3))).await;
    assert_eq!(
        (top["resume"]["status"].clone(), top["inbox"]["seq"].clone()),
        (json!("recovered"), json!(3)),
        "{top}"
    );
    let (mut bob, old) = hello(&c, "bob", Some(resume_from(&welcome, 0))).await;
    assert_eq!(old["resume"]["status"], "partial", "{old}");
    assert_eq!(old["resume"]["lost"], json!([[1, 3]]), "{old}");
    assert_quiet(&mut bob, "bob").await;
    // An ID that never had a v1 connection retains nothing.
    let body = json!({"targets": ["stranger"], "payload": 1}).to_string();
    let (_, answer) = http(a.addr(), "POST", "/api/send", Some(&body)).await;
    assert!(!answer.contains("retained"), "{answer}");
    assert_eq!(
        redis.command_ok(&["EXISTS", "sbv1:{id:stranger}:meta"]),
        Resp::Int(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_redis_resets_the_inbox_and_closes_live_v1_clients_4101() {
    let redis = Redis::start();
    // Refreshes every 250 ms (a quarter of the TTL).
    let (_config, [a, b, c]) = cluster(&redis, "inbox_ttl = \"1s\"\n").await;
    let (bob, bob_welcome) = hello(&a, "bob", None).await;
    drop(bob);
    let (mut carol, carol_welcome) = hello(&a, "carol", None).await;
    wait_offline(&b, "bob").await;
    let (mut alice, _) = hello(&b, "alice", None).await;
    let ack = send(
        &mut alice,
        1,
        None,
        json!(["bob", "carol"]),
        json!("before"),
    )
    .await;
    assert_eq!(ack["retained"], json!(["bob", "carol"]), "{ack}");
    assert_eq!(next_of(&mut carol, "msg").await["seq"], 1);

    assert_eq!(
        redis.command_ok(&["FLUSHALL"]),
        Resp::Simple("OK".to_owned())
    );
    // carol's node notices the lost inbox at its next refresh at the
    // latest: "reconnect and resume".
    let code = match tokio::time::timeout(WAIT, carol.next()).await {
        Ok(Some(Ok(WsMessage::Close(Some(frame))))) => u16::from(frame.code),
        other => panic!("expected close 4101, got {other:?}"),
    };
    assert_eq!(code, 4101);
    // Resuming, on any node, says the history is gone.
    let (_bob, welcome) = hello(&c, "bob", Some(resume_from(&bob_welcome, 1))).await;
    assert_eq!(welcome["resume"]["status"], "reset", "{welcome}");
    assert_ne!(welcome["inbox"]["epoch"], bob_welcome["inbox"]["epoch"]);
    assert_eq!(welcome["inbox"]["seq"], 0);
    let (_carol, welcome) = hello(&b, "carol", Some(resume_from(&carol_welcome, 1))).await;
    assert_eq!(welcome["resume"]["status"], "reset", "{welcome}");
}

/// Hellos while messages to those very IDs flow: a message numbered in the
/// moment between a receiver's registration and its inbox's creation
/// reaches it unnumbered (`"seq":null`) and closes nothing. (Found by
/// `switchboard-bench relay --protocol v1` on Redis: such a message used
/// to close the fresh connection with 4101 — 22 of 300 clients.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_while_messages_flow_to_those_ids_close_nothing() {
    const RECEIVERS: usize = 150;
    let redis = Redis::start();
    let (_config, nodes) = cluster(&redis, "").await;
    let (mut alice, _) = hello(&nodes[0], "alice", None).await;
    let targets: Vec<String> = (0..RECEIVERS).map(|i| format!("r{i}")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // Bounded: at most 4,000 sends (every 2 ms), no ids (no acks).
            for n in 0..4_000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let frame = json!({"type": "send", "targets": targets, "payload": n});
                send_frame(&mut alice, &frame).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            alice
        })
    };
    // Each receiver is read from its welcome on (answering pings), until
    // the sends stopped and it has been quiet for 300 ms.
    let mut readers = Vec::with_capacity(RECEIVERS);
    for i in 0..RECEIVERS {
        let (mut client, _) = hello(&nodes[i % 3], &format!("r{i}"), None).await;
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut got = 0u32;
            loop {
                match tokio::time::timeout(Duration::from_millis(300), client.next()).await {
                    Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => break,
                    Err(_) => {}
                    Ok(Some(Ok(WsMessage::Text(text)))) => {
                        let frame: Value = serde_json::from_str(&text).expect("a JSON frame");
                        assert_eq!(frame["type"], "msg", "r{i}: {frame}");
                        got += 1;
                    }
                    Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => {}
                    other => panic!("r{i} was closed or broke while messages flowed: {other:?}"),
                }
            }
            assert!(got > 0, "r{i} received nothing after its welcome");
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _alice = sender.await.expect("sender task");
    for reader in readers {
        reader
            .await
            .expect("every receiver stayed open and got messages");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_sends_get_a_thousand_acks_in_order() {
    let redis = Redis::start();
    let (_config, [a, b, _c]) = cluster(&redis, "").await;
    let (mut bob, _) = hello(&b, "bob", None).await;
    let (alice, _) = hello(&a, "alice", None).await;
    let (mut tx, mut rx) = alice.split();
    let writer = tokio::spawn(async move {
        for n in 1..=1000u64 {
            let frame = json!({"type": "send", "id": n, "targets": ["bob"], "payload": n});
            tx.send(WsMessage::text(frame.to_string()))
                .await
                .expect("send");
        }
        tx
    });
    for n in 1..=1000u64 {
        let ack = match tokio::time::timeout(WAIT, rx.next()).await {
            Ok(Some(Ok(WsMessage::Text(text)))) => {
                serde_json::from_str::<Value>(&text).expect("JSON")
            }
            other => panic!("ack {n}: {other:?}"),
        };
        assert_eq!(
            (ack["type"].clone(), ack["id"].clone()),
            (json!("ack"), json!(n)),
            "{ack}"
        );
        assert_eq!(ack["delivered"], json!(["bob"]), "{ack}");
    }
    let _tx = writer.await.expect("writer");
    for n in 1..=1000u64 {
        let msg = next_of(&mut bob, "msg").await;
        assert_eq!(
            (msg["seq"].clone(), msg["payload"].clone()),
            (json!(n), json!(n))
        );
    }
    assert_quiet(&mut bob, "bob").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mid_resent_through_another_node_is_delivered_once() {
    let redis = Redis::start();
    let (_config, [a, b, c]) = cluster(&redis, "").await;
    let (mut bob, _) = hello(&b, "bob", None).await;
    let (mut alice, _) = hello(&a, "alice", None).await;
    let first = send(
        &mut alice,
        1,
        Some("m-1"),
        json!(["bob", "nobody"]),
        json!("once"),
    )
    .await;
    assert_eq!(first["delivered"], json!(["bob"]), "{first}");
    assert_eq!(first["offline"], json!(["nobody"]), "{first}");
    assert_eq!(first.get("duplicate"), None, "{first}");
    drop(alice);
    let (mut alice, _) = hello(&c, "alice", None).await;
    let again = send(
        &mut alice,
        2,
        Some("m-1"),
        json!(["bob", "nobody"]),
        json!("once"),
    )
    .await;
    assert_eq!(again["duplicate"], true, "{again}");
    for list in ["delivered", "offline", "dropped", "retained"] {
        assert_eq!(again[list], first[list], "{list}: {again} vs {first}");
    }
    let msg = next_of(&mut bob, "msg").await;
    assert_eq!(
        (msg["seq"].clone(), msg["mid"].clone()),
        (json!(1), json!("m-1"))
    );
    assert_quiet(&mut bob, "bob").await;
    // Another mid is another message.
    let other = send(&mut alice, 3, Some("m-2"), json!(["bob"]), json!("twice")).await;
    assert_eq!(other["delivered"], json!(["bob"]), "{other}");
    assert_eq!(next_of(&mut bob, "msg").await["seq"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_targets_node_during_a_send_is_unconfirmed_and_the_inbox_keeps_it() {
    let redis = Redis::start();
    let (_config, [mut a, b, c]) = cluster(&redis, "inbox_ttl = \"60s\"\n").await;
    let (bob, welcome) = hello(&a, "bob", None).await;
    let (mut alice, _) = hello(&b, "alice", None).await;
    // Freeze bob's node so the send is surely in flight when it dies.
    a.server.proc.signal("-STOP");
    send_frame(
        &mut alice,
        &json!({"type": "send", "id": 1, "targets": ["bob"], "payload": "in flight"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.server.proc.signal("-KILL");
    a.server.proc.wait_timeout(WAIT).expect("node a exits");
    let ack = next_of(&mut alice, "ack").await;
    assert_eq!(
        ack["unconfirmed"],
        json!(["bob"]),
        "never a false delivered: {ack}"
    );
    assert_eq!(ack["delivered"], json!([]), "{ack}");
    assert_eq!(ack["retained"], json!(["bob"]), "{ack}");
    drop(bob);
    // The message was numbered before the node died: bob resumes it.
    let (mut bob, welcome) = hello(&c, "bob", Some(resume_from(&welcome, 0))).await;
    assert_eq!(welcome["resume"]["status"], "recovered", "{welcome}");
    let msg = next_of(&mut bob, "msg").await;
    assert_eq!(
        (msg["seq"].clone(), msg["payload"].clone()),
        (json!(1), json!("in flight"))
    );
}

/// Sends `count` messages to `target` from `client`, up to `window`
/// unacknowledged at a time; returns the payloads whose ack listed the
/// target as retained.
async fn pipelined_sends(
    client: Client,
    sender: u64,
    target: &str,
    count: u64,
    window: u64,
) -> HashSet<String> {
    let (mut tx, mut rx) = client.split();
    let mut retained = HashSet::new();
    let mut sent = 0u64;
    let mut acked = 0u64;
    while acked < count {
        while sent < count && sent - acked < window {
            sent += 1;
            let payload = format!("{sender}-{sent}");
            let frame =
                json!({"type": "send", "id": sent, "targets": [target], "payload": payload});
            tx.send(WsMessage::text(frame.to_string()))
                .await
                .expect("send");
        }
        let ack = match tokio::time::timeout(Duration::from_secs(30), rx.next()).await {
            Ok(Some(Ok(WsMessage::Text(text)))) => {
                serde_json::from_str::<Value>(&text).expect("JSON")
            }
            other => panic!("sender {sender}: ack {}: {other:?}", acked + 1),
        };
        acked += 1;
        assert_eq!(ack["id"], acked, "sender {sender}: acks in order: {ack}");
        if ack["retained"] == json!([target]) {
            retained.insert(format!("{sender}-{acked}"));
        }
    }
    retained
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_senders_on_three_nodes_reach_one_receiver_gap_free_while_redis_connections_are_killed()
 {
    const PER_SENDER: u64 = 10_000;
    let redis = Redis::start();
    // Refreshes (which also fill seqs lost with a connection) every second.
    let (_config, [a, b, c]) = cluster(&redis, "inbox_ttl = \"4s\"\ninbox_size = 100000\n").await;
    let (receiver, welcome) = hello(&a, "sink", None).await;
    let epoch = welcome["inbox"]["epoch"].clone();

    let mut senders = Vec::new();
    for (k, node) in [&a, &b, &c].into_iter().enumerate() {
        let (client, _) = hello(node, &format!("src{k}"), None).await;
        senders.push(tokio::spawn(pipelined_sends(
            client, k as u64, "sink", PER_SENDER, 64,
        )));
    }
    // Kill the nodes' Redis connections six times while they send.
    let killer = {
        let port = redis.port;
        tokio::task::spawn_blocking(move || {
            let mut killed = 0;
            for _ in 0..6 {
                std::thread::sleep(Duration::from_millis(700));
                // A node's one RESP3 connection carries commands and its
                // shard subscriptions: `pubsub` or `normal` finds it,
                // depending on the Redis version.
                for kind in ["pubsub", "normal"] {
                    if let Resp::Int(n) =
                        command_at(port, &["CLIENT", "KILL", "TYPE", kind]).expect("CLIENT KILL")
                    {
                        killed += n;
                    }
                }
            }
            killed
        })
    };

    // The receiver reads meanwhile: every seq once, in order; after any
    // close it reconnects and resumes where it left off.
    let mut receiver = Some(receiver);
    let mut seen: Vec<u64> = Vec::new();
    let mut payloads: BTreeMap<String, u64> = BTreeMap::new();
    let mut unnumbered = 0u64;
    let mut resumes = 0;
    let mut last = 0u64;
    let mut done_sending = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut retained_all = HashSet::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "the receiver did not get everything in time"
        );
        if done_sending.is_none() && senders.iter().all(|s| s.is_finished()) {
            for sender in senders.drain(..) {
                retained_all.extend(sender.await.expect("sender"));
            }
            done_sending = Some(Instant::now());
        }
        if let Some(since) = done_sending {
            let top = redis.inbox_top("sink");
            if last == top && since.elapsed() > Duration::from_millis(500) {
                break;
            }
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "after the senders finished, the receiver stayed at seq {last} of {top}"
            );
        }
        let client = receiver.as_mut().expect("a receiver");
        match tokio::time::timeout(Duration::from_millis(200), client.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(WsMessage::Text(text)))) => {
                let frame: Value = serde_json::from_str(&text).expect("JSON");
                assert_eq!(frame["type"], "msg", "{frame}");
                let payload = frame["payload"]
                    .as_str()
                    .expect("a string payload")
                    .to_owned();
                match frame["seq"].as_u64() {
                    Some(seq) => {
                        assert_eq!(
                            seq,
                            last + 1,
                            "seqs in order, no gap, no duplicate (after {last}): {frame}"
                        );
                        last = seq;
                        seen.push(seq);
                    }
                    // Sent by the receiver's node while it could not reach
                    // Redis: delivered, not numbered.
                    None => unnumbered += 1,
                }
                *payloads.entry(payload).or_default() += 1;
            }
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => {}
            other => {
                // Closed (4101/4102/1001, or the TCP dropped): resume.
                drop(receiver.take());
                resumes += 1;
                assert!(resumes < 20, "too many resumes; last: {other:?}");
                let mut client = connect_v1(&a, "sink").await;
                send_frame(
                    &mut client,
                    &json!({"type": "hello", "resume": {"epoch": epoch, "seq": last}}),
                )
                .await;
                let welcome = next_of(&mut client, "welcome").await;
                assert_eq!(welcome["resume"]["status"], "recovered", "{welcome}");
                receiver = Some(client);
            }
        }
    }
    let killed = killer.await.expect("killer");
    let top = redis.inbox_top("sink");
    assert_eq!(
        seen,
        (1..=top).collect::<Vec<_>>(),
        "every seq exactly once, in order"
    );
    let twice: Vec<_> = payloads.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "payloads delivered twice: {twice:?}");
    let missing: Vec<_> = retained_all
        .iter()
        .filter(|p| !payloads.contains_key(*p))
        .collect();
    assert!(
        missing.is_empty(),
        "retained but never received: {missing:?}"
    );
    assert!(
        killed >= 6 * 3 - 3,
        "every node's connection was killed six times: {killed}"
    );
    println!(
        "sequence gate under 6 Redis connection kills: {top} numbered messages received in order \
         ({} retained per the acks, {unnumbered} unnumbered, {resumes} resumes, {killed} connections killed)",
        retained_all.len()
    );
}

/// `cmdstat_<name>:calls=N,…` lines of `INFO commandstats` → name → calls.
fn command_counts(redis: &Redis) -> BTreeMap<String, u64> {
    let text = redis.command_ok(&["INFO", "commandstats"]).text();
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Commands (by name) and bytes in and out of Redis so far.
struct Snapshot {
    counts: BTreeMap<String, u64>,
    bytes_in: i64,
    bytes_out: i64,
}

impl Snapshot {
    fn take(redis: &Redis) -> Self {
        let bytes = |field| redis.info("stats", field).parse::<i64>().expect("bytes");
        Self {
            counts: command_counts(redis),
            bytes_in: bytes("total_net_input_bytes"),
            bytes_out: bytes("total_net_output_bytes"),
        }
    }

    /// Prints what happened since `self`, per message of `n`.
    fn print_since(&self, redis: &Redis, n: u64) {
        let now = Self::take(redis);
        for (name, calls) in &now.counts {
            let delta = calls - self.counts.get(name).copied().unwrap_or(0);
            if delta > 0 && !["info", "memory|usage", "xlen"].contains(&name.as_str())
                || name == "xlen" && delta >= n
            {
                println!("  {name}: {:.2} per message", delta as f64 / n as f64);
            }
        }
        println!(
            "  bytes into redis: {:.0} per message; out of redis: {:.0} per message",
            (now.bytes_in - self.bytes_in) as f64 / n as f64,
            (now.bytes_out - self.bytes_out) as f64 / n as f64
        );
    }
}

fn memory_usage(redis: &Redis, key: &str) -> i64 {
    match redis.command_ok(&["MEMORY", "USAGE", key, "SAMPLES", "0"]) {
        Resp::Int(n) => n,
        other => panic!("MEMORY USAGE {key}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/benchmarks.md; run by hand"]
async fn measure_redis_cost_per_v1_message() {
    const N: u64 = 2_000;
    let redis = Redis::start();
    let (_config, [a, b, _c]) = cluster(&redis, "").await;
    let payload = json!({"text": "x".repeat(100)});
    let payload_len = payload.to_string().len();

    // The plain relay first, while no ID of the cluster retains.
    let mut carol = support::ws_connect(b.addr(), "/ws?id=carol").await;
    let mut dave = support::ws_connect(a.addr(), "/ws?id=dave").await;
    wait_for("carol listed", WAIT, || async {
        a.lists("carol").await.then_some(())
    })
    .await;
    let before = Snapshot::take(&redis);
    for _ in 0..N {
        let frame = json!({"targets": ["carol"], "payload": payload});
        dave.send(WsMessage::text(frame.to_string()))
            .await
            .expect("send");
        support::next_text(&mut carol).await;
    }
    println!(
        "{N} plain relay messages (payload {payload_len} B), dave on a → carol on b, no v1 client in the cluster:"
    );
    before.print_since(&redis, N);

    let (mut bob, _) = hello(&b, "bob", None).await;
    let (mut alice, _) = hello(&a, "alice", None).await;
    // Warm up: scripts loaded, the inbox exists.
    send(&mut alice, 0, None, json!(["bob"]), json!({"text": "warm"})).await;
    next_of(&mut bob, "msg").await;
    let before = Snapshot::take(&redis);
    let stream = "sbv1:{id:bob}:inbox";
    let (mem_before, len_before) = (
        memory_usage(&redis, stream),
        redis.command_ok(&["XLEN", stream]),
    );
    let started = Instant::now();
    for n in 1..=N {
        send(&mut alice, n, None, json!(["bob"]), payload.clone()).await;
        next_of(&mut bob, "msg").await;
    }
    let elapsed = started.elapsed();
    println!(
        "{N} v1 messages (payload {payload_len} B), alice on a → bob on b, one at a time, {elapsed:?}:"
    );
    before.print_since(&redis, N);
    let (mem_after, len_after) = (
        memory_usage(&redis, stream),
        redis.command_ok(&["XLEN", stream]),
    );
    let (Resp::Int(len_before), Resp::Int(len_after)) = (len_before, len_after) else {
        panic!("XLEN")
    };
    println!(
        "  stream: {len_before} → {len_after} entries, {mem_before} → {mem_after} bytes: {:.0} bytes per retained message",
        (mem_after - mem_before) as f64 / (len_after - len_before).max(1) as f64
    );
    for key in ["sbv1:{id:bob}:meta", "sbv1:v1"] {
        println!("  {key}: {} bytes", memory_usage(&redis, key));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_v1_clients_sends_no_payload_to_redis_for_inboxes() {
    let redis = Redis::start();
    let (_config, [a, b, _c]) = cluster(&redis, "").await;
    let mut bob = support::ws_connect(b.addr(), "/ws?id=bob").await;
    let mut alice = support::ws_connect(a.addr(), "/ws?id=alice").await;
    wait_for("bob listed", WAIT, || async {
        b.lists("bob").await.then_some(())
    })
    .await;
    for n in 0..20 {
        let frame = json!({"targets": ["bob", "nobody"], "payload": n});
        alice
            .send(WsMessage::text(frame.to_string()))
            .await
            .expect("send");
        // The plain relay, byte for byte.
        assert_eq!(support::next_text(&mut bob).await, n.to_string());
    }
    let counts = command_counts(&redis);
    // The inbox scripts run as EVALSHA and append with XADD. (Plain EVAL
    // is the presence sweep, which runs every 250 ms whatever the clients:
    // counting it made this test flaky.)
    for script in ["evalsha", "xadd"] {
        assert_eq!(counts.get(script), None, "{script} was called: {counts:?}");
    }
    assert_eq!(redis.command_ok(&["EXISTS", "sbv1:v1"]), Resp::Int(0));
    // Once a v1 client says hello, messages to it are numbered.
    let (mut carol, _) = hello(&b, "carol", None).await;
    let frame = json!({"targets": ["carol"], "payload": "numbered"});
    alice
        .send(WsMessage::text(frame.to_string()))
        .await
        .expect("send");
    let msg = next_of(&mut carol, "msg").await;
    assert_eq!(
        (msg["seq"].clone(), msg["payload"].clone()),
        (json!(1), json!("numbered"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_hello_on_a_node_without_redis_is_closed_4102() {
    // Nothing listens on this port: the node runs degraded.
    let config = TempFile::config("[v1]\n");
    let mut command = switchboard();
    let url = format!("redis://127.0.0.1:{}/", free_port());
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--config",
        config.path(),
        "--backend",
        "redis",
        "--redis-url",
        &url,
        "--node-id",
        "lonely",
    ]);
    let node = Node {
        name: "lonely".to_owned(),
        server: Server::spawn(command),
    };
    let mut client = connect_v1(&node, "bob").await;
    send_frame(&mut client, &json!({"type": "hello", "id": 1})).await;
    match tokio::time::timeout(WAIT, client.next()).await {
        Ok(Some(Ok(WsMessage::Close(Some(frame))))) => {
            assert_eq!(u16::from(frame.code), 4102, "{frame:?}");
            assert!(frame.reason.contains("reconnect"), "{frame:?}");
        }
        other => panic!("expected close 4102, got {other:?}"),
    }
    // The plain relay still works locally.
    let mut plain = support::ws_connect(node.addr(), "/ws?id=carol").await;
    let frame = json!({"targets": ["carol"], "payload": "local"});
    plain
        .send(WsMessage::text(frame.to_string()))
        .await
        .expect("send");
    assert_eq!(support::next_text(&mut plain).await, r#""local""#);
}
