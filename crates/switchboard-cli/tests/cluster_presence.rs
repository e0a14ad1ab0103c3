//! Topic presence across three `switchboard` processes sharing one real
//! `redis-server` (docs/protocol-v1.md, "Presence"; the harness follows
//! tests/cluster.rs): snapshots list members from every node, a connection
//! killed and back within the leave delay causes no event on any node, one
//! that does not come back leaves exactly once, and a SIGKILLed node's
//! members leave once cluster-wide within the documented bound.
//!
//! `redis-server` (7 or later) must be installed; without it every test
//! here fails saying so. Every child process is owned by a guard that kills
//! it on drop, and every wait is bounded.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use support::redis::Redis;
use support::{Client, STARTUP, Server, TempFile, WAIT, http, switchboard};

/// The nodes' presence TTL.
const TTL: Duration = Duration::from_secs(2);
/// The leave delay the nodes run with (`[v1] presence_leave_delay`).
const LEAVE_DELAY: Duration = Duration::from_secs(2);
const TOPIC: &str = "room/7";

/// One `switchboard` process of the cluster.
struct Node {
    server: Server,
    _config: TempFile,
}

impl Node {
    async fn start(redis: &Redis, name: &str) -> Self {
        let config = TempFile::config(&format!(
            "[v1]\npresence_leave_delay = \"{}ms\"\n",
            LEAVE_DELAY.as_millis()
        ));
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
            "sbpres",
            "--redis-presence-ttl",
            &format!("{}ms", TTL.as_millis()),
            "--redis-request-timeout",
            "1000ms",
            "--shutdown-timeout",
            "5s",
            // Stopping a node closes its clients at once (no drain window):
            // these tests watch what presence does after a node goes.
            "--drain-window",
            "0s",
            "--drain-grace",
            "0s",
        ]);
        let node = Self {
            server: Server::spawn(command),
            _config: config,
        };
        let deadline = Instant::now() + STARTUP;
        loop {
            let (status, body) = http(node.server.addr, "GET", "/heartbeat", None).await;
            if status == 200 && body == r#"{"status":"ok"}"# {
                return node;
            }
            assert!(Instant::now() < deadline, "node {name} not healthy: {body}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A v1 connection as `id` that said hello.
    async fn hello(&self, id: &str) -> Client {
        let url = format!("ws://{}/ws?id={id}", self.server.addr);
        let mut request = url.into_client_request().expect("request");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("switchboard.v1"),
        );
        let (mut client, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect in time")
            .expect("connect");
        send(&mut client, json!({"type": "hello", "id": 0})).await;
        let welcome = recv(&mut client, WAIT).await.expect("a welcome");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client
    }

    /// `id` connected here and subscribed to `TOPIC` (a member).
    async fn member(&self, id: &str) -> Client {
        let mut client = self.hello(id).await;
        send(
            &mut client,
            json!({"type": "subscribe", "id": 1, "topic": TOPIC}),
        )
        .await;
        let ack = recv(&mut client, WAIT).await.expect("an ack");
        assert!(ack.get("error").is_none(), "{ack}");
        client
    }

    /// `id` connected here, subscribed with full presence; and its snapshot.
    async fn watcher(&self, id: &str) -> (Client, Value) {
        let mut client = self.hello(id).await;
        send(
            &mut client,
            json!({"type": "subscribe", "id": 1, "topic": TOPIC, "presence": "full"}),
        )
        .await;
        let ack = recv(&mut client, WAIT).await.expect("an ack");
        assert_eq!(ack["type"], "ack", "{ack}");
        assert!(ack["presence"].is_object(), "{ack}");
        (client, ack["presence"].clone())
    }

    fn kill(&self) {
        self.server.proc.signal("-KILL");
    }
}

async fn send(client: &mut Client, frame: Value) {
    client
        .send(WsMessage::text(frame.to_string()))
        .await
        .expect("send");
}

/// The next JSON text frame within `limit`, skipping pings; `None` on
/// timeout.
async fn recv(client: &mut Client, limit: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, client.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(WsMessage::Text(text)))) => {
                return Some(serde_json::from_str(&text).expect("JSON frame"));
            }
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => {}
            Ok(other) => panic!("connection ended: {other:?}"),
        }
    }
}

fn ids(list: &Value) -> Vec<String> {
    let mut ids: Vec<String> = list
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|m| m["id"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Reads presence frames until `joined` have joined (in any frames).
async fn wait_joins(watcher: &mut Client, joined: &[&str]) {
    let mut seen: Vec<String> = Vec::new();
    while !joined.iter().all(|id| seen.iter().any(|s| s == id)) {
        let frame = recv(watcher, WAIT)
            .await
            .unwrap_or_else(|| panic!("no join of {joined:?} in time (saw {seen:?})"));
        assert_eq!(frame["type"], "presence", "{frame}");
        seen.extend(ids(&frame["joins"]));
    }
}

/// Kills a client's TCP connection without a close handshake (RST).
fn kill(client: Client) {
    if let tokio_tungstenite::MaybeTlsStream::Plain(stream) = client.get_ref() {
        stream.set_zero_linger().expect("SO_LINGER 0");
    }
    drop(client);
}

fn conns_of(snapshot: &Value) -> Vec<(String, u64)> {
    let mut conns: Vec<(String, u64)> = snapshot["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or("?").to_owned(),
                m["conns"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    conns.sort();
    conns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_lists_members_from_every_node_with_their_counts() {
    let redis = Redis::start();
    let nodes = [
        Node::start(&redis, "pa").await,
        Node::start(&redis, "pb").await,
        Node::start(&redis, "pc").await,
    ];
    let _alice = [
        nodes[0].member("alice").await,
        nodes[0].member("alice").await,
        nodes[1].member("alice").await,
    ];
    let _bob = nodes[2].member("bob").await;
    let (_w, snapshot) = nodes[1].watcher("w").await;
    assert_eq!(snapshot["count"], 3, "{snapshot}");
    assert_eq!(
        conns_of(&snapshot),
        [
            ("alice".to_owned(), 3),
            ("bob".to_owned(), 1),
            ("w".to_owned(), 1)
        ]
    );
    // The HTTP API of any node answers for the cluster.
    let (status, body) = http(
        nodes[2].server.addr,
        "GET",
        &format!("/api/presence/{TOPIC}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(conns_of(&body), conns_of(&snapshot));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connection_back_within_the_delay_is_silent_on_every_node_else_leaves_once() {
    let redis = Redis::start();
    let nodes = [
        Node::start(&redis, "pa").await,
        Node::start(&redis, "pb").await,
        Node::start(&redis, "pc").await,
    ];
    let mut watchers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        watchers.push(node.watcher(&format!("w{i}")).await.0);
    }
    let alice = nodes[0].member("alice").await;
    for watcher in &mut watchers {
        wait_joins(watcher, &["alice"]).await;
    }
    // Other watchers' joins may still be in flight: let them settle.
    for watcher in &mut watchers {
        while recv(watcher, Duration::from_millis(600)).await.is_some() {}
    }

    // Killed on node a, back on node b 300 ms later: nothing anywhere.
    kill(alice);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alice = nodes[1].member("alice").await;
    let quiet_until = tokio::time::Instant::now() + LEAVE_DELAY + Duration::from_secs(1);
    for (i, watcher) in watchers.iter_mut().enumerate() {
        let left = quiet_until.saturating_duration_since(tokio::time::Instant::now());
        if let Some(frame) = recv(watcher, left).await {
            panic!("watcher on node {i} got {frame} for a connection back within the delay");
        }
    }

    // Killed again, not back: exactly one leave at every watcher, between
    // the delay and a second more.
    let killed = Instant::now();
    kill(alice);
    for (i, watcher) in watchers.iter_mut().enumerate() {
        let limit = (killed + LEAVE_DELAY + Duration::from_secs(1))
            .saturating_duration_since(Instant::now());
        let frame = recv(watcher, limit)
            .await
            .unwrap_or_else(|| panic!("no leave at the watcher on node {i} in time"));
        let after = killed.elapsed();
        assert_eq!(ids(&frame["leaves"]), ["alice"], "node {i}: {frame}");
        assert!(
            after >= LEAVE_DELAY,
            "node {i}: the leave came {after:?} after the kill, before the delay"
        );
    }
    for (i, watcher) in watchers.iter_mut().enumerate() {
        if let Some(frame) = recv(watcher, Duration::from_millis(700)).await {
            panic!("watcher on node {i} got a second frame: {frame}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_nodes_members_leave_once_cluster_wide_within_ttl_plus_delay() {
    let redis = Redis::start();
    let nodes = [
        Node::start(&redis, "pa").await,
        Node::start(&redis, "pb").await,
        Node::start(&redis, "pc").await,
    ];
    let (mut wa, _) = nodes[0].watcher("wa").await;
    let (mut wb, _) = nodes[1].watcher("wb").await;
    let _doomed = [
        nodes[2].member("x").await,
        nodes[2].member("y").await,
        nodes[2].member("y").await,
    ];
    // z has a connection on node c and one on node a: it stays.
    let _z = [nodes[2].member("z").await, nodes[0].member("z").await];
    for watcher in [&mut wa, &mut wb] {
        wait_joins(watcher, &["x", "y", "z"]).await;
        while recv(watcher, Duration::from_millis(600)).await.is_some() {}
    }

    let killed = Instant::now();
    nodes[2].kill();
    // The documented bound: presence_ttl + leave delay + one sweep (and the
    // first frame of a window goes out at once); a second of slack.
    let bound = TTL + LEAVE_DELAY + Duration::from_secs(1);
    for (name, watcher) in [("a", &mut wa), ("b", &mut wb)] {
        let mut left: Vec<String> = Vec::new();
        while left.len() < 2 {
            let limit = (killed + bound).saturating_duration_since(Instant::now());
            let frame = recv(watcher, limit).await.unwrap_or_else(|| {
                panic!("node {name}: only {left:?} left within {bound:?} of the SIGKILL")
            });
            assert_eq!(frame["joins"], json!([]), "{frame}");
            left.extend(ids(&frame["leaves"]));
        }
        left.sort();
        assert_eq!(left, ["x", "y"], "node {name}: one leave per member");
        if let Some(frame) = recv(watcher, Duration::from_millis(800)).await {
            panic!("node {name} got another frame after the leaves: {frame}");
        }
    }
    let (status, body) = http(
        nodes[0].server.addr,
        "GET",
        &format!("/api/presence/{TOPIC}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        conns_of(&body),
        [
            ("wa".to_owned(), 1),
            ("wb".to_owned(), 1),
            ("z".to_owned(), 1)
        ],
        "{body}"
    );
}

/// What a presence member costs in Redis: `used_memory` growth while 500
/// connected v1 clients (13-byte IDs, no meta) join one topic. The clients
/// say hello before the measurement, so what their IDs cost anyway (the
/// node's ID hash, each ID's `switchboard.v1` inbox meta) is not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_member_costs_a_few_hundred_bytes_in_redis() {
    const N: usize = 500;
    let redis = Redis::start();
    let node = Node::start(&redis, "pm").await;
    // The topic's keys exist before the measurement.
    let _first = node.member("member-first").await;
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        clients.push(node.hello(&format!("member-{i:06}")).await);
    }
    let before = redis.used_memory();
    for client in &mut clients {
        send(
            client,
            json!({"type": "subscribe", "id": 1, "topic": TOPIC}),
        )
        .await;
        let ack = recv(client, WAIT).await.expect("an ack");
        assert!(ack.get("error").is_none(), "{ack}");
    }
    let per_member = (redis.used_memory() - before) as f64 / N as f64;
    println!(
        "redis presence: {per_member:.0} bytes per member ({N} members of one topic, 13-byte IDs, no meta)"
    );
    assert!(per_member > 0.0, "the members are in redis");
    assert!(
        per_member < 400.0,
        "{per_member:.0} bytes per member in redis; docs/protocol-v1.md says about 140"
    );
}

/// Redis restarts empty: every node writes its members again, and the
/// snapshot is whole again, with the right counts, and watchers get frames
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_empty_each_node_writes_its_members_again() {
    let redis = Redis::start();
    let nodes = [
        Node::start(&redis, "pa").await,
        Node::start(&redis, "pb").await,
    ];
    let _alice = [
        nodes[0].member("alice").await,
        nodes[1].member("alice").await,
    ];
    let _bob = nodes[1].member("bob").await;
    let (mut watcher, _) = nodes[0].watcher("w").await;

    let redis = redis.restart();
    for node in &nodes {
        let deadline = Instant::now() + STARTUP;
        loop {
            let (status, body) = http(node.server.addr, "GET", "/heartbeat", None).await;
            if status == 200 && body == r#"{"status":"ok"}"# {
                break;
            }
            assert!(Instant::now() < deadline, "node not healthy again: {body}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let deadline = Instant::now() + WAIT;
    let want = [
        ("alice".to_owned(), 2),
        ("bob".to_owned(), 1),
        ("w".to_owned(), 1),
    ];
    loop {
        let (status, body) = http(
            nodes[1].server.addr,
            "GET",
            &format!("/api/presence/{TOPIC}"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).expect("JSON");
        if conns_of(&body) == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence not rewritten after the restart: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The watcher's channel is subscribed again: a new member reaches it.
    while recv(&mut watcher, Duration::from_millis(500))
        .await
        .is_some()
    {}
    let _carol = nodes[1].member("carol").await;
    wait_joins(&mut watcher, &["carol"]).await;
    drop(redis);
}
