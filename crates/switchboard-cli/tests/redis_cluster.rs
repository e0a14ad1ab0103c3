//! Switchboard on a real Redis Cluster: 3 masters and 3 replicas
//! (`redis-server --cluster-enabled yes`, `redis-cli --cluster create`)
//! on loopback, and 3 real `switchboard` nodes given the cluster's seed
//! nodes (`redis+cluster://…`). The cross-node suite (relay by ID, topics,
//! `/api/send` reports, listings, DELETE, `switchboard.v1` inbox and
//! resume, topic presence), then faults under relay load: a master killed
//! (its replica takes over) and slots migrated; in both, every message
//! reported delivered arrives exactly once, none arrives twice, and the
//! nodes recover without a restart.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use support::redis::Resp;
use support::redis_cluster::RedisCluster;
use support::{
    Client, STARTUP, Server, TempFile, WAIT, http, next_text, try_next, wait_for, ws_connect,
};

/// The key prefix of these tests.
const PREFIX: &str = "sbrc";

/// One `switchboard` node on the cluster.
struct Node {
    name: String,
    server: Server,
    _config: TempFile,
}

impl Node {
    async fn start(url: &str, name: &str) -> Self {
        Self::start_with(url, name, &[]).await
    }

    /// [`Self::start`] with `extra` command-line arguments.
    async fn start_with(url: &str, name: &str, extra: &[&str]) -> Self {
        let config =
            TempFile::config("[v1]\ninbox_ttl = \"60s\"\npresence_leave_delay = \"300ms\"\n");
        let node = Self {
            name: name.to_owned(),
            server: Server::spawn({
                let mut command = Self::command(url, name, &config);
                command.args(extra);
                command
            }),
            _config: config,
        };
        node.wait_healthy(STARTUP).await;
        node
    }

    /// The command line of node `name` on the cluster at `url`.
    fn command(url: &str, name: &str, config: &TempFile) -> std::process::Command {
        let mut command = support::switchboard();
        command.args([
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.path(),
            "--backend",
            "redis",
            "--redis-url",
            url,
            "--node-id",
            name,
            "--redis-key-prefix",
            PREFIX,
            "--redis-presence-ttl",
            "3s",
            "--redis-request-timeout",
            "1000ms",
            "--drain-window",
            "0s",
            "--drain-grace",
            "0s",
        ]);
        command
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Waits until `/heartbeat` says ok; panics with the node's logs.
    async fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let (status, body) = http(self.addr(), "GET", "/heartbeat", None).await;
            if status == 200 && body == r#"{"status":"ok"}"# {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} not healthy after {limit:?}: {body}\n{}",
                self.name,
                self.server.log.lock().expect("log").join("\n")
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn send(&self, targets: Value, payload: Value) -> Value {
        let body = json!({ "targets": targets, "payload": payload }).to_string();
        let (status, body) = http(self.addr(), "POST", "/api/send", Some(&body)).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("JSON body")
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = http(self.addr(), "GET", path, None).await;
        assert_eq!(status, 200, "GET {path} on {}: {body}", self.name);
        serde_json::from_str(&body).expect("JSON body")
    }

    /// The IDs listed cluster-wide, with their connection counts.
    async fn listed(&self) -> BTreeMap<String, u64> {
        let body = self.get("/api/connections").await;
        body["clients"]
            .as_array()
            .expect("a clients array")
            .iter()
            .map(|c| {
                (
                    c["id"].as_str().expect("id").to_owned(),
                    c["connections"].as_u64().expect("connections"),
                )
            })
            .collect()
    }

    async fn wait_listed(&self, ids: &[(&str, u64)]) {
        wait_for(&format!("{} lists {ids:?}", self.name), WAIT, || async {
            let listed = self.listed().await;
            ids.iter()
                .all(|(id, n)| listed.get(*id) == Some(n))
                .then_some(())
        })
        .await;
    }

    /// A `switchboard.v1` connection as `id` that said hello (resuming
    /// from `resume`), and its welcome.
    async fn hello(&self, id: &str, resume: Option<Value>) -> (Client, Value) {
        let mut request = format!("ws://{}/ws?id={id}", self.addr())
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "switchboard.v1".parse().expect("header value"),
        );
        let (mut client, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect in time")
            .expect("connect");
        let mut frame = json!({"type": "hello", "id": 0});
        if let Some(resume) = resume {
            frame["resume"] = resume;
        }
        send_frame(&mut client, &frame).await;
        let welcome = next_frame(&mut client).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (client, welcome)
    }
}

/// The cluster and three nodes on it.
async fn start() -> (RedisCluster, [Node; 3]) {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let nodes = [
        Node::start(&url, "a").await,
        Node::start(&url, "b").await,
        Node::start(&url, "c").await,
    ];
    (cluster, nodes)
}

async fn send_frame(client: &mut Client, frame: &Value) {
    client
        .send(WsMessage::text(frame.to_string()))
        .await
        .expect("send a frame");
}

/// The next JSON frame; panics on a close or after `WAIT`.
async fn next_frame(client: &mut Client) -> Value {
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

async fn assert_quiet(client: &mut Client, who: &str) {
    if let Some(extra) = try_next(client, Duration::from_millis(300)).await {
        panic!("{who} got an unexpected extra message: {extra:?}");
    }
}

/// The masters that hold at least one key of these tests: proof that the
/// keys are spread over the cluster, not on one node.
fn masters_with_keys(cluster: &RedisCluster) -> BTreeSet<u16> {
    let mut masters = BTreeSet::new();
    for port in cluster.live_ports() {
        let Resp::Array(parts) =
            cluster.command(port, &["SCAN", "0", "MATCH", "sbrc*", "COUNT", "10000"])
        else {
            panic!("SCAN")
        };
        let found = matches!(parts.get(1), Some(Resp::Array(keys)) if !keys.is_empty());
        let role = cluster.command(port, &["ROLE"]);
        let is_master = matches!(&role, Resp::Array(items) if items.first().map(Resp::text).as_deref() == Some("master"));
        if found && is_master {
            masters.insert(port);
        }
    }
    masters
}

// ---------------------------------------------------------------------------
// The cross-node suite
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cross_node_suite_runs_on_a_redis_cluster() {
    let (cluster, [a, b, c]) = start().await;

    let mut alice = ws_connect(a.addr(), "/ws?id=alice").await;
    let mut bob_b = ws_connect(b.addr(), "/ws?id=bob").await;
    let mut bob_c = ws_connect(c.addr(), "/ws?id=bob").await;
    let mut carol = ws_connect(c.addr(), "/ws?id=carol").await;
    for node in [&a, &b, &c] {
        node.wait_listed(&[("alice", 1), ("bob", 2), ("carol", 1)])
            .await;
    }

    // Relay by ID: every connection of every target, once.
    let frame = json!({"targets": ["bob", "carol", "nobody"], "payload": {"n": 1}});
    alice
        .send(WsMessage::text(frame.to_string()))
        .await
        .expect("send relay frame");
    for (client, who) in [
        (&mut bob_b, "bob on b"),
        (&mut bob_c, "bob on c"),
        (&mut carol, "carol on c"),
    ] {
        assert_eq!(next_text(client).await, r#"{"n":1}"#, "{who}");
        assert_quiet(client, who).await;
    }

    // /api/send reports.
    let report = b.send(json!(["alice", "bob", 404]), json!("hi")).await;
    assert_eq!(
        report,
        json!({"delivered": ["alice", "bob"], "offline": [404], "dropped": []})
    );
    assert_eq!(next_text(&mut alice).await, r#""hi""#);
    assert_eq!(next_text(&mut bob_b).await, r#""hi""#);
    assert_eq!(next_text(&mut bob_c).await, r#""hi""#);
    // The location cache (client-side caching) is not used on a cluster:
    // every send reads the locations from the shards.
    let (status, metrics) = http(b.addr(), "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l == "switchboard_redis_location_cache_entries 0"),
        "{metrics}"
    );

    // Topics: subscribers on every node, publishes from any node.
    for client in [&mut alice, &mut bob_b, &mut carol] {
        let frame = json!({"type": "subscribe", "topic": "news"}).to_string();
        client.send(WsMessage::text(frame)).await.expect("send");
        assert_eq!(
            next_text(client).await,
            json!({"subscribed": "news"}).to_string()
        );
    }
    let channel = format!("{PREFIX}:t:news");
    let owner = cluster.master_of_slot(cluster.slot_of(&channel));
    wait_for("3 nodes on the topic's shard channel", WAIT, || async {
        (support::redis::command_at(owner, &["PUBSUB", "SHARDNUMSUB", &channel])
            .ok()
            .and_then(|r| match r {
                Resp::Array(items) => items.get(1).map(Resp::int),
                _ => None,
            })
            == Some(3))
        .then_some(())
    })
    .await;
    let body = json!({"topic": "news", "payload": "extra"}).to_string();
    let (status, answer) = http(c.addr(), "POST", "/api/publish", Some(&body)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        serde_json::from_str::<Value>(&answer).expect("JSON"),
        json!({"recipients": 3})
    );
    for (client, who) in [
        (&mut alice, "alice"),
        (&mut bob_b, "bob on b"),
        (&mut carol, "carol"),
    ] {
        assert_eq!(next_text(client).await, r#""extra""#, "{who}");
        assert_quiet(client, who).await;
    }
    assert_quiet(&mut bob_c, "bob on c (not subscribed)").await;

    // Listings: cluster-wide, from any node.
    let body = a.get("/api/connections").await;
    assert_eq!(body["scope"], "cluster", "{body}");
    assert_eq!(body["clients_total"], 3, "{body}");
    let ids = b.get("/api/ids?limit=10").await;
    let ids: Vec<&str> = ids["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|i| i["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["alice", "bob", "carol"]);

    // DELETE on a closes bob on b and on c.
    let (status, answer) = http(a.addr(), "DELETE", "/api/connections/bob", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        serde_json::from_str::<Value>(&answer).expect("JSON"),
        json!({"closed": 2})
    );
    for client in [&mut bob_b, &mut bob_c] {
        match support::next_message(client).await {
            WsMessage::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4000),
            other => panic!("expected close 4000, got {other:?}"),
        }
        // Answer the close, so the server can finish the connection.
        support::drain(client).await;
    }
    wait_for("bob offline everywhere", WAIT, || async {
        let report = c.send(json!(["bob"]), json!(0)).await;
        (report["offline"] == json!(["bob"])).then_some(())
    })
    .await;

    // switchboard.v1: an inbox filled through b while its ID is away,
    // resumed on c.
    let (dave, welcome) = a.hello("dave", None).await;
    assert_eq!(welcome["resume"]["status"], "new", "{welcome}");
    drop(dave);
    wait_for("dave offline", WAIT, || async {
        (!b.listed().await.contains_key("dave")).then_some(())
    })
    .await;
    let (mut erin, _) = b.hello("erin", None).await;
    for n in 1..=20u64 {
        send_frame(
            &mut erin,
            &json!({"type": "send", "id": n, "targets": ["dave"], "payload": n}),
        )
        .await;
        let ack = next_frame(&mut erin).await;
        assert_eq!(ack["retained"], json!(["dave"]), "{ack}");
    }
    let resume = json!({"epoch": welcome["inbox"]["epoch"], "seq": 0});
    let (mut dave, back) = c.hello("dave", Some(resume)).await;
    assert_eq!(back["resume"]["status"], "recovered", "{back}");
    assert_eq!(back["resume"]["replayed"], 20, "{back}");
    for n in 1..=20u64 {
        let msg = next_frame(&mut dave).await;
        assert_eq!(
            (msg["seq"].clone(), msg["payload"].clone()),
            (json!(n), json!(n)),
            "{msg}"
        );
    }

    // Topic presence across nodes: members on a and c, a watcher on b.
    for (node, id) in [(&a, "pm1"), (&c, "pm2")] {
        let (mut member, _) = node.hello(id, None).await;
        send_frame(
            &mut member,
            &json!({"type": "subscribe", "id": 1, "topic": "room"}),
        )
        .await;
        let ack = next_frame(&mut member).await;
        assert!(ack.get("error").is_none(), "{ack}");
        std::mem::forget(member);
    }
    let (mut watcher, _) = b.hello("watcher", None).await;
    send_frame(
        &mut watcher,
        &json!({"type": "subscribe", "id": 1, "topic": "room", "presence": "full"}),
    )
    .await;
    let ack = next_frame(&mut watcher).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let members: BTreeSet<String> = ack["presence"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(
        members,
        ["pm1", "pm2", "watcher"].map(str::to_owned).into(),
        "{ack}"
    );
    // A join on c reaches the watcher on b (the event is published by the
    // script, on the topic's shard channel).
    let (mut pm3, _) = c.hello("pm3", None).await;
    send_frame(
        &mut pm3,
        &json!({"type": "subscribe", "id": 1, "topic": "room"}),
    )
    .await;
    next_frame(&mut pm3).await;
    let event = next_frame(&mut watcher).await;
    assert_eq!(event["type"], "presence", "{event}");
    assert_eq!(event["joins"][0]["id"], "pm3", "{event}");

    // The keys are spread over the masters, not on one.
    let masters = masters_with_keys(&cluster);
    assert!(masters.len() >= 2, "keys on masters {masters:?} only");
}

// ---------------------------------------------------------------------------
// Faults under load
// ---------------------------------------------------------------------------

/// Receivers on b and c, `/api/send` from a to all of them in turn, each
/// send's report kept; what each receiver got, kept.
struct Load {
    receivers: Vec<String>,
    reports: Arc<Mutex<Vec<(u64, Value)>>>,
    received: Arc<Mutex<BTreeMap<String, Vec<u64>>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// At most `limit` sends, one every 5 ms, until stopped.
    async fn start(a: &Node, b: &Node, c: &Node, limit: u64) -> Self {
        let receivers: Vec<String> = (0..6).map(|i| format!("r{i}")).collect();
        let received: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (i, id) in receivers.iter().enumerate() {
            let node = if i % 2 == 0 { b } else { c };
            let mut client = ws_connect(node.addr(), &format!("/ws?id={id}")).await;
            let (received, stop, id) = (received.clone(), stop.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    match tokio::time::timeout(Duration::from_millis(1000), client.next()).await {
                        Err(_) if stop.load(Ordering::Relaxed) => return,
                        Err(_) => {}
                        Ok(Some(Ok(WsMessage::Text(text)))) => {
                            let n: u64 = text.parse().expect("a number payload");
                            received
                                .lock()
                                .expect("lock")
                                .entry(id.clone())
                                .or_default()
                                .push(n);
                        }
                        Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => {}
                        other => panic!("receiver {id} broke: {other:?}"),
                    }
                }
            }));
        }
        for node in [a, b, c] {
            let ids: Vec<(&str, u64)> = receivers.iter().map(|r| (r.as_str(), 1)).collect();
            node.wait_listed(&ids).await;
        }
        let reports: Arc<Mutex<Vec<(u64, Value)>>> = Arc::default();
        {
            let (reports, stop, addr, targets) =
                (reports.clone(), stop.clone(), a.addr(), receivers.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0..limit {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let body = json!({"targets": targets, "payload": n}).to_string();
                    let (status, answer) = http(addr, "POST", "/api/send", Some(&body)).await;
                    let report = if status == 200 {
                        serde_json::from_str(&answer).expect("JSON")
                    } else {
                        json!({"status": status, "body": answer})
                    };
                    reports.lock().expect("lock").push((n, report));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        Self {
            receivers,
            reports,
            received,
            stop,
            tasks,
        }
    }

    fn sent(&self) -> usize {
        self.reports.lock().expect("lock").len()
    }

    /// Waits until the last `n` sends were delivered to every receiver.
    async fn wait_all_delivered(&self, n: usize, limit: Duration) {
        let all: Value = json!(self.receivers);
        wait_for("sends delivered to every receiver again", limit, || async {
            let reports = self.reports.lock().expect("lock");
            (reports.len() >= n
                && reports[reports.len() - n..]
                    .iter()
                    .all(|(_, r)| r["delivered"] == all))
            .then_some(())
        })
        .await;
    }

    /// Stops, then checks: every delivery a report claims arrived exactly
    /// once; nothing arrived twice. Returns (sends, targets reported
    /// delivered, reported otherwise).
    async fn finish(self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("load task");
        }
        let reports = self.reports.lock().expect("lock");
        let received = self.received.lock().expect("lock");
        let mut counts: BTreeMap<(&str, u64), usize> = BTreeMap::new();
        for (id, got) in received.iter() {
            for n in got {
                *counts.entry((id.as_str(), *n)).or_default() += 1;
            }
        }
        let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
        assert!(twice.is_empty(), "delivered twice: {twice:?}");
        let (mut delivered, mut other) = (0, 0);
        for (n, report) in reports.iter() {
            for id in &self.receivers {
                let claimed = report["delivered"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|x| x == id.as_str()));
                if claimed {
                    delivered += 1;
                    assert_eq!(
                        counts.get(&(id.as_str(), *n)),
                        Some(&1),
                        "send {n} reported delivered to {id} but not received: {report}"
                    );
                } else {
                    other += 1;
                }
            }
        }
        (reports.len(), delivered, other)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_fails_over_and_relay_recovers_without_false_deliveries() {
    let (mut cluster, [a, b, c]) = start().await;
    let load = Load::start(&a, &b, &c, 20_000).await;
    load.wait_all_delivered(20, WAIT).await;

    // The master holding node b's inbox channel: sends to b's receivers
    // cross it.
    let nodes_key = format!("{PREFIX}:nodes");
    let owner = cluster.master_of_slot(cluster.slot_of(&nodes_key));
    let Resp::Array(members) = cluster.command(owner, &["ZRANGE", &nodes_key, "0", "-1"]) else {
        panic!("ZRANGE")
    };
    let member_b = members
        .iter()
        .map(Resp::text)
        .find(|m| m.starts_with("b#"))
        .expect("node b's member");
    let victim = cluster.master_of_slot(cluster.slot_of(&format!("{PREFIX}:n:{member_b}")));
    let before = load.sent();
    let killed_at = Instant::now();
    cluster.kill(victim);

    // The replica is promoted; the nodes follow without a restart.
    cluster.wait_ok(Duration::from_secs(30));
    let failover = killed_at.elapsed();
    for node in [&a, &b, &c] {
        node.wait_healthy(Duration::from_secs(30)).await;
    }
    load.wait_all_delivered(50, Duration::from_secs(30)).await;
    let recovered = killed_at.elapsed();
    let (sent, delivered, other) = load.finish().await;
    println!(
        "failover: cluster ok {failover:?} after the kill, relay recovered after {recovered:?}; \
         {sent} sends ({} during the fault window), {delivered} deliveries reported and received \
         once, {other} reported unconfirmed/offline",
        sent - before
    );
    assert!(
        other > 0,
        "sends during the failover must not all be reported delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_slots_under_load_loses_nothing() {
    let (cluster, [a, b, c]) = start().await;
    let load = Load::start(&a, &b, &c, 20_000).await;
    load.wait_all_delivered(20, WAIT).await;

    // Move the slots that matter (every node's inbox channel, the node
    // list, the receivers' location sets) to another master, one by one.
    let nodes_key = format!("{PREFIX}:nodes");
    let owner = cluster.master_of_slot(cluster.slot_of(&nodes_key));
    let Resp::Array(members) = cluster.command(owner, &["ZRANGE", &nodes_key, "0", "-1"]) else {
        panic!("ZRANGE")
    };
    let mut keys: Vec<String> = members
        .iter()
        .map(|m| format!("{PREFIX}:n:{}", m.text()))
        .collect();
    keys.push(nodes_key);
    keys.extend((0..6).map(|i| format!("{PREFIX}:loc:r{i}")));
    let masters = cluster.masters_seen_by(owner);
    let mut moved = 0;
    let before = load.sent();
    for key in &keys {
        let slot = cluster.slot_of(key);
        let from = cluster.master_of_slot(slot);
        let to = *masters
            .iter()
            .find(|m| **m != from)
            .expect("another master");
        cluster.migrate_slot(slot, to);
        moved += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And a bulk reshard by redis-cli.
    let from = cluster.master_of_slot(0);
    let to = *masters
        .iter()
        .find(|m| **m != from)
        .expect("another master");
    cluster.reshard(from, to, 300);
    cluster.wait_ok(Duration::from_secs(30));
    for node in [&a, &b, &c] {
        node.wait_healthy(Duration::from_secs(30)).await;
    }
    let during = load.sent() - before;
    load.wait_all_delivered(50, Duration::from_secs(30)).await;
    // Every node's inbox channel has its listener on the slot's new owner.
    for key in keys.iter().filter(|k| k.contains(":n:")) {
        let owner = cluster.master_of_slot(cluster.slot_of(key));
        let listeners = support::redis::command_at(owner, &["PUBSUB", "SHARDNUMSUB", key])
            .expect("PUBSUB SHARDNUMSUB");
        assert!(
            matches!(&listeners, Resp::Array(items) if items.get(1) == Some(&Resp::Int(1))),
            "{key} on :{owner}: {listeners:?}"
        );
    }
    let count_logs = |text: &str| -> Vec<usize> {
        [&a, &b, &c]
            .iter()
            .map(|n| {
                let log = n.server.log.lock().expect("log");
                log.iter().filter(|l| l.contains(text)).count()
            })
            .collect()
    };
    let reconnects = count_logs("connected to redis");
    let resubscribed = count_logs("subscribed again");
    let (sent, delivered, other) = load.finish().await;
    println!(
        "{moved} slots migrated one by one and 300 resharded under load: {sent} sends \
         ({during} during the migrations), {delivered} deliveries reported and received once, \
         {other} reported otherwise; connections to the cluster per node: {reconnects:?}, \
         shard channels subscribed again per node: {resubscribed:?}"
    );
    // Each node's inbox channel moved at least once: each node followed.
    assert!(
        resubscribed.iter().all(|n| *n >= 1),
        "every node subscribed its moved inbox channel again: {resubscribed:?}"
    );
    assert!(
        during >= 10,
        "the load ran during the migrations: {during} sends"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_node_id_in_use_on_the_cluster_refuses_to_start() {
    let (cluster, [a, _b, _c]) = start().await;
    let config = TempFile::config("");
    let twin = Node::command(&cluster.url(), "a", &config);
    let finished = tokio::task::spawn_blocking(move || support::run_to_exit(twin))
        .await
        .expect("the twin ran");
    assert_eq!(
        finished.code(),
        Some(2),
        "the second \"a\" must refuse to run; stderr:\n{}",
        finished.stderr
    );
    assert!(
        finished.stderr.contains("node id \"a\""),
        "{}",
        finished.stderr
    );
    a.wait_healthy(WAIT).await;
}

#[test]
fn a_bad_cluster_url_exits_2_naming_redis_url_and_the_fix() {
    for (url, why) in [
        (
            "redis+cluster://127.0.0.1:7000,,127.0.0.1:7001",
            "a seed node is empty",
        ),
        (
            "redis+cluster://127.0.0.1",
            "seed node \"127.0.0.1\" needs host:port",
        ),
        ("redis+cluster://127.0.0.1:7000/2", "only database 0"),
        ("redis+cluster://user:secret@127.0.0.1:x", "needs host:port"),
    ] {
        let mut command = support::switchboard();
        command.args([
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "redis",
            "--redis-url",
            url,
        ]);
        let finished = support::run_to_exit(command);
        assert_eq!(finished.code(), Some(2), "{url}: {}", finished.stderr);
        assert!(
            finished.stderr.contains("redis.url")
                && finished.stderr.contains(why)
                && finished
                    .stderr
                    .contains("redis+cluster://[user:password@]host:port[,host:port"),
            "{url}: {}",
            finished.stderr
        );
        assert!(
            !finished.stderr.contains("secret"),
            "no password in errors: {}",
            finished.stderr
        );
    }
    let mut command = support::switchboard();
    command.args(["--listen", "127.0.0.1:0", "--backend", "redis"]);
    command.args(["--redis-url", "redis+cluster://127.0.0.1:7000"]);
    command.args(["--redis-key-prefix", "{sb}"]);
    let finished = support::run_to_exit(command);
    assert_eq!(finished.code(), Some(2), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("redis.key_prefix") && finished.stderr.contains("without {"),
        "{}",
        finished.stderr
    );
}

// ---------------------------------------------------------------------------
// Cost
// ---------------------------------------------------------------------------

/// Per-command call counts, `used_memory` and network bytes summed over
/// the Redis servers on `ports`.
#[derive(Default)]
struct Usage {
    calls: BTreeMap<String, u64>,
    memory: i64,
    bytes_in: i64,
    bytes_out: i64,
}

impl Usage {
    fn of(ports: &[u16]) -> Self {
        let mut usage = Self::default();
        for port in ports {
            let info = |section: &str| {
                support::redis::command_at(*port, &["INFO", section])
                    .expect("INFO")
                    .text()
            };
            let field = |text: &str, name: &str| -> i64 {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0)
            };
            let (memory, stats) = (info("memory"), info("stats"));
            usage.memory += field(&memory, "used_memory");
            usage.bytes_in += field(&stats, "total_net_input_bytes");
            usage.bytes_out += field(&stats, "total_net_output_bytes");
            for line in info("commandstats").lines() {
                let Some((name, rest)) = line
                    .strip_prefix("cmdstat_")
                    .and_then(|l| l.split_once(':'))
                else {
                    continue;
                };
                let calls: u64 = rest
                    .strip_prefix("calls=")
                    .and_then(|r| r.split(',').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                *usage.calls.entry(name.to_owned()).or_default() += calls;
            }
        }
        usage
    }

    /// Commands per `n` since `before` (the test's own INFO left out).
    fn calls_since(&self, before: &Self, n: usize) -> String {
        self.calls
            .iter()
            .filter(|(name, _)| !["info", "cluster|info", "cluster|nodes"].contains(&name.as_str()))
            .filter_map(|(name, calls)| {
                let delta = calls - before.calls.get(name).copied().unwrap_or(0);
                (delta > 0).then(|| format!("{name} {:.2}", delta as f64 / n as f64))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Memory per connected ID, and commands, bytes and round-trip time per
/// relayed message, for nodes a and b on `url`; Redis counted on `ports`.
async fn measure(url: &str, ports: &[u16], label: &str) {
    const IDS: usize = 2000;
    const MESSAGES: usize = 1000;
    let a = Node::start(url, "a").await;
    let b = Node::start(url, "b").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = Usage::of(ports);
    let mut clients = Vec::with_capacity(IDS);
    for i in 0..IDS {
        clients.push(ws_connect(a.addr(), &format!("/ws?id=user-{i:06}")).await);
    }
    wait_for("every ID listed", Duration::from_secs(30), || async {
        let body = b.get("/api/ids?prefix=user-&limit=1").await;
        (body["ids"].as_array().is_some_and(|i| !i.is_empty())).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = Usage::of(ports);
    println!(
        "{label}: {IDS} IDs connected: {:.0} B of Redis memory per ID; commands per ID: {}",
        (after.memory - before.memory) as f64 / IDS as f64,
        after.calls_since(&before, IDS)
    );
    let mut sender = ws_connect(a.addr(), "/ws?id=sender").await;
    let mut receiver = ws_connect(b.addr(), "/ws?id=receiver").await;
    a.wait_listed(&[("receiver", 1)]).await;
    let before = Usage::of(ports);
    let started = Instant::now();
    for n in 0..MESSAGES {
        let frame = json!({"targets": ["receiver"], "payload": n});
        sender
            .send(WsMessage::text(frame.to_string()))
            .await
            .expect("send");
        assert_eq!(next_text(&mut receiver).await, n.to_string());
    }
    let elapsed = started.elapsed();
    let after = Usage::of(ports);
    println!(
        "{label}: {MESSAGES} relay messages a → b one at a time: {:.0} µs per round trip; \
         commands per message: {}; {:.0} B into and {:.0} B out of Redis per message",
        elapsed.as_micros() as f64 / MESSAGES as f64,
        after.calls_since(&before, MESSAGES),
        (after.bytes_in - before.bytes_in) as f64 / MESSAGES as f64,
        (after.bytes_out - before.bytes_out) as f64 / MESSAGES as f64,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/scaling.md; run by hand"]
async fn measure_cost_per_connection_and_message_single_vs_cluster() {
    let single = support::redis::Redis::start();
    measure(&single.url(), &[single.port], "one redis").await;
    drop(single);
    let cluster = RedisCluster::start();
    let masters = cluster.masters_seen_by(cluster.live_ports()[0]);
    measure(&cluster.url(), &masters, "cluster (3 masters, counted)").await;
}

/// The close code that ends `client` within `WAIT` (read to the end).
async fn close_code(client: &mut Client) -> u16 {
    match support::next_message(client).await {
        WsMessage::Close(Some(frame)) => {
            support::drain(client).await;
            u16::from(frame.code)
        }
        other => panic!("expected a close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_id_policies_hold_across_nodes_on_a_cluster() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    // replace-oldest: a newer connection on b closes the one on a (4001).
    let (a, b) = tokio::join!(
        Node::start_with(&url, "a", &["--duplicate-ids", "replace-oldest"]),
        Node::start_with(&url, "b", &["--duplicate-ids", "replace-oldest"])
    );
    let mut old = ws_connect(a.addr(), "/ws?id=8").await;
    a.wait_listed(&[("8", 1)]).await;
    let mut new = ws_connect(b.addr(), "/ws?id=8").await;
    assert_eq!(close_code(&mut old).await, 4001);
    b.wait_listed(&[("8", 1)]).await;
    let report = a.send(json!(["8"]), json!("newest")).await;
    assert_eq!(report["delivered"], json!(["8"]), "{report}");
    assert_eq!(next_text(&mut new).await, r#""newest""#);
    drop((a, b));
    // reject-new: an ID connected on c is refused on d (409).
    let (c, d) = tokio::join!(
        Node::start_with(&url, "c", &["--duplicate-ids", "reject-new"]),
        Node::start_with(&url, "d", &["--duplicate-ids", "reject-new"])
    );
    let _first = ws_connect(c.addr(), "/ws?id=7").await;
    d.wait_listed(&[("7", 1)]).await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/ws?id=7", d.addr())).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 409);
        }
        other => panic!("expected 409, got {other:?}"),
    }
}
