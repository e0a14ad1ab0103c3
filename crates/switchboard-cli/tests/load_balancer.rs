//! Three `switchboard` nodes sharing one real `redis-server`, behind a real
//! HAProxy run with the documented example configuration
//! (`examples/haproxy/haproxy.cfg`; only its lines marked `# test:` are
//! substituted: addresses, and faster health checks). Clients connect to
//! the balancer only: they spread over the nodes and still reach each other,
//! a draining node leaves rotation and its clients move, per-IP limits see
//! the client behind the balancer, and a rolling restart keeps traffic
//! flowing.
//!
//! `haproxy` and `redis-server` must be installed (`scripts/test` installs
//! both); without one every test here fails saying how to install it. Every
//! process is owned by a guard that kills it on drop; every wait is bounded.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use support::redis::Redis;
use support::{
    Guard, STARTUP, Server, TempFile, WAIT, free_port, http, switchboard, try_next, wait_for,
};

/// The documented example, read at build time: the file the docs show is
/// the file tested.
const TEMPLATE: &str = include_str!("../../../examples/haproxy/haproxy.cfg");

/// The health-check timings the tests substitute for the production ones
/// (`inter 2s fall 1 rise 2`): a check every 100 ms, so a draining node is
/// out within ~100 ms and a restarted one is back within ~100 ms.
const TEST_CHECKS: &str = "default-server inter 100ms fall 1 rise 1";
/// The longest a test waits for HAProxy to see a node change state: a few
/// check intervals on a busy 2-core machine.
const CHECK_WAIT: Duration = Duration::from_secs(3);

/// A client connected through the balancer.
type Ws = WebSocketStream<TcpStream>;

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// An executable from `PATH` (or `/usr/sbin`, where Debian puts daemons
/// and which a non-root `PATH` often lacks). Fails, never skips, when it is
/// missing: these tests are the only proof that the example works.
fn executable(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed (not in PATH nor /usr/sbin): the load-balancer tests \
                 run a real one. Install it with `sudo apt-get install -y {package}` \
                 (`scripts/test --deps` does this)."
            )
        })
}

/// Collects a child's stderr lines on a thread, into `log` and `tx`.
fn collect(
    pipe: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<Vec<String>>>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            log.lock().expect("log lock").push(line.clone());
            let _ = tx.send(line);
        }
    });
    rx
}

impl Redis {
    /// How many nodes subscribe to the topic's shard channel.
    fn topic_nodes(&self, topic: &str) -> u64 {
        let subscribers = self.shard_subscribers(&format!("sblb:t:{topic}"));
        u64::try_from(subscribers).expect("a count")
    }
}

/// One `switchboard` node on a fixed loopback port (the balancer's
/// configuration names it; a restart reuses it), trusting the balancer's
/// address (127.0.0.1) for `X-Forwarded-For`.
struct Node {
    name: String,
    port: u16,
    redis_url: String,
    extra: Vec<String>,
    server: Server,
}

impl Node {
    async fn start(redis: &Redis, name: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let extra: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        let server = Self::spawn(name, port, &redis.url(), &extra).await;
        Self {
            name: name.to_owned(),
            port,
            redis_url: redis.url(),
            extra,
            server,
        }
    }

    async fn spawn(name: &str, port: u16, redis_url: &str, extra: &[String]) -> Server {
        let mut command = switchboard();
        command.args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--backend",
            "redis",
            "--redis-url",
            redis_url,
            "--node-id",
            name,
            "--redis-key-prefix",
            "sblb",
            "--redis-presence-ttl",
            "2s",
            "--redis-request-timeout",
            "1s",
            // The balancer connects from 127.0.0.1; its X-Forwarded-For
            // names the client.
            "--trusted-proxies",
            "127.0.0.1",
            // A short drain, so a rolling restart takes seconds.
            "--drain-window",
            "1s",
            "--drain-grace",
            "1s",
            "--shutdown-timeout",
            "10s",
        ]);
        command.args(extra);
        let server = Server::spawn(command);
        let addr = server.addr;
        wait_for(&format!("node {name} ready"), STARTUP, || async move {
            (http(addr, "GET", "/ready", None).await.0 == 200).then_some(())
        })
        .await;
        server
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// The IDs this node holds connections of (`?scope=local`).
    async fn local_ids(&self) -> Vec<String> {
        let (status, body) = http(self.addr(), "GET", "/api/connections?scope=local", None).await;
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).expect("JSON");
        body["clients"]
            .as_array()
            .expect("clients")
            .iter()
            .map(|c| c["id"].as_str().expect("id").to_owned())
            .collect()
    }

    /// `POST /api/drain` (the node is on loopback: no API key needed).
    async fn drain(&self) -> Value {
        let (status, body) = http(self.addr(), "POST", "/api/drain", None).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    }

    /// Waits for the drained node to exit 0, then starts it again on the
    /// same port.
    async fn restart_after_drain(&mut self, limit: Duration) {
        let (status, lines) = self.server.wait_exit(limit);
        assert_eq!(status.code(), Some(0), "node {}: {lines:?}", self.name);
        self.server = Self::spawn(&self.name, self.port, &self.redis_url, &self.extra).await;
    }
}

/// HAProxy run in the foreground with the example configuration.
struct Balancer {
    _proc: Guard,
    _config: TempFile,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
}

/// `template` with `line` (which must be in it exactly once, so a change
/// to the documented file cannot leave the test running something else)
/// replaced by `with`.
fn substitute(template: &str, line: &str, with: &str) -> String {
    let found = template.matches(line).count();
    assert_eq!(
        found, 1,
        "examples/haproxy/haproxy.cfg should contain {line:?} once, found {found}: \
         keep the `# test:` lines as the test expects them"
    );
    template.replacen(line, with, 1)
}

impl Balancer {
    /// HAProxy in front of `nodes`, once it answers `/ready` itself.
    async fn start(nodes: &[&Node]) -> Self {
        Self::start_with(nodes, "60s").await
    }

    /// [`Self::start`] with `timeout tunnel` set to `tunnel` (the example
    /// says 60s).
    async fn start_with(nodes: &[&Node], tunnel: &str) -> Self {
        assert_eq!(nodes.len(), 3, "the example has three servers");
        let port = free_port();
        let mut config = substitute(
            TEMPLATE,
            "bind 0.0.0.0:8080  # test: the balancer's address",
            &format!("bind 127.0.0.1:{port}"),
        );
        config = substitute(
            &config,
            "default-server inter 2s fall 1 rise 2  # test: check timings",
            TEST_CHECKS,
        );
        config = substitute(
            &config,
            "timeout tunnel 60s  # test: tunnel timeout",
            &format!("timeout tunnel {tunnel}"),
        );
        for (i, node) in nodes.iter().enumerate() {
            let n = i + 1;
            config = substitute(
                &config,
                &format!("server node{n} 10.0.0.{n}:8080 check  # test: node {n}"),
                &format!("server {} 127.0.0.1:{} check", node.name, node.port),
            );
        }
        assert!(
            !config.contains("  # test:"),
            "an unsubstituted line:\n{config}"
        );
        let config = TempFile::new(".cfg", &config);
        let check = Command::new(executable("haproxy", "haproxy"))
            .args(["-c", "-q", "-f", config.path()])
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy -c rejects the example: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let mut child = Command::new(executable("haproxy", "haproxy"))
            .args(["-db", "-f", config.path()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn haproxy");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = collect(child.stderr.take().expect("piped stderr"), Arc::clone(&log));
        let balancer = Self {
            _proc: Guard(child),
            _config: config,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            lines,
        };
        let addr = balancer.addr;
        wait_for("haproxy answers /ready", STARTUP, || async move {
            let up = std::net::TcpStream::connect(addr).is_ok();
            (up && http(addr, "GET", "/ready", None).await.0 == 200).then_some(())
        })
        .await;
        balancer
    }

    fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits for HAProxy's `Server switchboard/NAME is STATE` line (it
    /// logs state changes on stderr in the foreground); returns it.
    fn wait_server(&self, name: &str, state: &str, limit: Duration) -> String {
        let text = format!("Server switchboard/{name} is {state}");
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(&text) => return line,
                Ok(_) => {}
                Err(err) => panic!("no {text:?} within {limit:?} ({err}):\n{}", self.log_text()),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// How an upgrade through the balancer went.
enum Upgrade {
    Open(Box<Ws>),
    /// Refused: the status and body.
    Refused(u16, String),
}

/// An upgrade to `ws://{addr}{path}` from the source address `from`
/// (any 127.x.y.z is local on Linux), with extra request `headers` and,
/// if `v1`, the `switchboard.v1` subprotocol.
async fn upgrade(
    addr: SocketAddr,
    from: Ipv4Addr,
    path: &str,
    v1: bool,
    headers: &[(&str, &str)],
) -> Upgrade {
    let attempt = async {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(IpAddr::V4(from), 0))
            .unwrap_or_else(|e| panic!("bind the client to {from}: {e}"));
        let stream = socket.connect(addr).await.expect("connect to the balancer");
        let mut request = format!("ws://{addr}{path}")
            .into_client_request()
            .expect("request");
        if v1 {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static("switchboard.v1"),
            );
        }
        for (name, value) in headers {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((ws, _)) => Upgrade::Open(Box::new(ws)),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Upgrade::Refused(response.status().as_u16(), body)
            }
            Err(err) => panic!("upgrade {path} through the balancer: {err}"),
        }
    };
    tokio::time::timeout(WAIT, attempt)
        .await
        .unwrap_or_else(|_| panic!("upgrade {path}: no answer within {WAIT:?}"))
}

/// A plain client `id` connected through the balancer from 127.0.0.1.
async fn plain(balancer: &Balancer, id: &str) -> Ws {
    match upgrade(
        balancer.addr,
        Ipv4Addr::LOCALHOST,
        &format!("/ws?id={id}"),
        false,
        &[],
    )
    .await
    {
        Upgrade::Open(ws) => *ws,
        Upgrade::Refused(status, body) => panic!("{id} refused {status}: {body}"),
    }
}

/// A v1 client `id` through the balancer, hello said: the client and the
/// node its welcome names.
async fn v1(balancer: &Balancer, id: &str) -> (Ws, String) {
    let mut ws = match upgrade(
        balancer.addr,
        Ipv4Addr::LOCALHOST,
        &format!("/ws?id={id}"),
        true,
        &[],
    )
    .await
    {
        Upgrade::Open(ws) => *ws,
        Upgrade::Refused(status, body) => panic!("v1 {id} refused {status}: {body}"),
    };
    ws.send(WsMessage::text(r#"{"type":"hello","id":0}"#))
        .await
        .expect("send hello");
    let welcome = next_json(&mut ws, WAIT).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let node = welcome["node"]
        .as_str()
        .expect("node in welcome")
        .to_owned();
    (ws, node)
}

/// The next text frame as JSON; panics on a close or after `limit`.
async fn next_json(ws: &mut Ws, limit: Duration) -> Value {
    match try_next(ws, limit).await {
        Some(WsMessage::Text(text)) => {
            serde_json::from_str(text.as_str()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
        }
        other => panic!("expected a text frame within {limit:?}, got {other:?}"),
    }
}

/// Which node holds each of `ids`, from the nodes' local listings.
async fn placement(nodes: &[&Node], ids: &[String]) -> BTreeMap<String, String> {
    wait_for("every client listed on a node", WAIT, || async {
        let mut found = BTreeMap::new();
        for node in nodes {
            for id in node.local_ids().await {
                found.insert(id, node.name.clone());
            }
        }
        ids.iter().all(|id| found.contains_key(id)).then(|| {
            found.retain(|id, _| ids.contains(id));
            found
        })
    })
    .await
}

async fn start_cluster(redis: &Redis, extra: &[&str]) -> (Node, Node, Node) {
    (
        Node::start(redis, "n1", extra).await,
        Node::start(redis, "n2", extra).await,
        Node::start(redis, "n3", extra).await,
    )
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Six plain clients through the balancer land two on each node
/// (`leastconn`), and reach each other by ID and by topic across nodes,
/// exactly once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_the_balancer_spread_over_the_nodes_and_reach_each_other() {
    let redis = Redis::start();
    let (n1, n2, n3) = start_cluster(&redis, &[]).await;
    let nodes = [&n1, &n2, &n3];
    let balancer = Balancer::start(&nodes).await;

    let ids: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    let mut clients = Vec::new();
    for id in &ids {
        clients.push(plain(&balancer, id).await);
    }
    let placed = placement(&nodes, &ids).await;
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for node in placed.values() {
        *per_node.entry(node).or_default() += 1;
    }
    assert_eq!(
        per_node,
        BTreeMap::from([("n1", 2), ("n2", 2), ("n3", 2)]),
        "leastconn spreads six clients two per node: {placed:?}"
    );

    // By ID: every client sends one frame to all the others.
    for (i, client) in clients.iter_mut().enumerate() {
        let targets: Vec<&String> = ids.iter().filter(|id| **id != ids[i]).collect();
        let frame = json!({"targets": targets, "payload": {"from": i}});
        client
            .send(WsMessage::text(frame.to_string()))
            .await
            .expect("send relay frame");
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let mut from = BTreeSet::new();
        for _ in 0..5 {
            let got = next_json(client, WAIT).await;
            let sender = got["from"].as_u64().expect("from");
            assert!(from.insert(sender), "c{i} got {sender} twice");
        }
        let expected: BTreeSet<u64> = (0..6).filter(|s| *s != i as u64).collect();
        assert_eq!(from, expected, "c{i} (on {})", placed[&ids[i]]);
    }

    // By topic: all join, one publishes, everyone (the sender too) gets it once.
    for client in &mut clients {
        let frame = json!({"type": "subscribe", "topic": "room"}).to_string();
        client
            .send(WsMessage::text(frame))
            .await
            .expect("subscribe");
        assert_eq!(next_json(client, WAIT).await, json!({"subscribed": "room"}));
    }
    wait_for("every node on the topic's channel", WAIT, || async {
        (redis.topic_nodes("room") == 3).then_some(())
    })
    .await;
    let frame = json!({"type": "publish", "topic": "room", "payload": {"hello": "room"}});
    clients[0]
        .send(WsMessage::text(frame.to_string()))
        .await
        .expect("publish");
    for (i, client) in clients.iter_mut().enumerate() {
        assert_eq!(
            next_json(client, WAIT).await,
            json!({"hello": "room"}),
            "c{i}"
        );
        assert!(
            try_next(client, Duration::from_millis(300)).await.is_none(),
            "c{i} got an extra message"
        );
    }
}

/// A draining node leaves rotation within the health-check interval: no
/// new connection reaches it (the upgrades that race the check are retried
/// on another node, so none is refused), its v1 clients get the drain
/// frame and reconnect through the balancer to the other nodes, where
/// they are reachable by ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_leaves_rotation_and_its_clients_move_to_the_others() {
    let redis = Redis::start();
    let (n1, mut n2, n3) = start_cluster(&redis, &[]).await;
    let balancer = Balancer::start(&[&n1, &n2, &n3]).await;

    // Nine v1 clients: three per node.
    let mut on_node: HashMap<String, Vec<(String, Ws)>> = HashMap::new();
    for i in 0..9 {
        let id = format!("v{i}");
        let (ws, node) = v1(&balancer, &id).await;
        on_node.entry(node).or_default().push((id, ws));
    }
    for node in ["n1", "n2", "n3"] {
        assert_eq!(on_node.get(node).map_or(0, Vec::len), 3, "node {node}");
    }

    let started = Instant::now();
    let report = n2.drain().await;
    assert_eq!(report["v1_connections"], 3, "{report}");
    // Upgrades right after the drain, before the check has seen it: the
    // ones HAProxy sends to n2 get 503 there and are retried elsewhere.
    let mut racing = Vec::new();
    for i in 0..10 {
        let (ws, node) = v1(&balancer, &format!("race{i}")).await;
        assert_ne!(node, "n2", "race{i} landed on the draining node");
        racing.push(ws);
    }
    let down = balancer.wait_server("n2", "DOWN", CHECK_WAIT);
    let out_after = started.elapsed();
    eprintln!("n2 out of rotation {out_after:?} after the drain: {down}");
    assert!(down.contains("503"), "{down}");
    // After it is marked down: 30 new connections, none on n2.
    let mut late = Vec::new();
    for i in 0..30 {
        let (ws, node) = v1(&balancer, &format!("late{i}")).await;
        assert_ne!(node, "n2", "late{i} landed on the drained node");
        late.push(ws);
    }

    // n2's clients get the drain frame, wait their turn and reconnect
    // through the balancer, landing on n1 or n3.
    let mut moved = Vec::new();
    for (id, mut old) in on_node.remove("n2").expect("clients on n2") {
        let hint = next_json(&mut old, WAIT).await;
        assert_eq!(hint["type"], "drain", "{id}: {hint}");
        let delay = hint["reconnect_in_ms"].as_u64().expect("reconnect_in_ms");
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let _ = old.close(None).await;
        let (ws, node) = v1(&balancer, &id).await;
        assert!(node == "n1" || node == "n3", "{id} reconnected to {node}");
        moved.push((id, ws));
    }
    // Reachable by ID from the HTTP API of a remaining node.
    for (id, ws) in &mut moved {
        let body = json!({"targets": [id.as_str()], "payload": {"to": id.as_str()}}).to_string();
        let (status, report) = http(n1.addr(), "POST", "/api/send", Some(&body)).await;
        assert_eq!(status, 200, "{report}");
        let frame = next_json(ws, WAIT).await;
        assert_eq!(frame["type"], "msg", "{frame}");
        assert_eq!(frame["payload"], json!({"to": id.as_str()}), "{frame}");
    }
    let (status, lines) = n2.server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{lines:?}");
}

/// With `max_connections_per_ip = 2` and the balancer in
/// `trusted_proxies`, the nodes count the client's address from
/// X-Forwarded-For: clients from 127.0.0.2 and 127.0.0.3 are counted
/// separately although all arrive from HAProxy's 127.0.0.1, and one more
/// from 127.0.0.2 than the nodes allow gets 429, a forged X-Forwarded-For
/// notwithstanding (HAProxy appends the real address; the node takes the
/// rightmost untrusted entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limits_count_the_client_behind_the_balancer() {
    let redis = Redis::start();
    let (n1, n2, n3) = start_cluster(&redis, &["--max-connections-per-ip", "2"]).await;
    let nodes = [&n1, &n2, &n3];
    let balancer = Balancer::start(&nodes).await;
    let a = Ipv4Addr::new(127, 0, 0, 2);
    let b = Ipv4Addr::new(127, 0, 0, 3);

    // The limit is per node: 2 per address on each of 3 nodes. leastconn
    // puts the six from 127.0.0.2 two on each node, then the six from
    // 127.0.0.3 the same way: twelve open, though the nodes see every
    // connection come from 127.0.0.1 (which alone would stop at six).
    let mut open = Vec::new();
    for (from, tag) in [(a, "a"), (b, "b")] {
        for i in 0..6 {
            let path = format!("/ws?id={tag}{i}");
            match upgrade(balancer.addr, from, &path, false, &[]).await {
                Upgrade::Open(ws) => open.push(ws),
                Upgrade::Refused(status, body) => {
                    panic!("{tag}{i} from {from} refused {status}: {body}")
                }
            }
        }
    }
    let ids: Vec<String> = ["a", "b"]
        .iter()
        .flat_map(|tag| (0..6).map(move |i| format!("{tag}{i}")))
        .collect();
    let placed = placement(&nodes, &ids).await;
    for node in ["n1", "n2", "n3"] {
        for tag in ["a", "b"] {
            let n = placed
                .iter()
                .filter(|(id, at)| id.starts_with(tag) && *at == node)
                .count();
            assert_eq!(n, 2, "{tag}* on {node}: {placed:?}");
        }
    }

    // A seventh from 127.0.0.2: whichever node gets it has two from that
    // address already. Its forged header does not help.
    let forged = [("x-forwarded-for", "10.9.9.9")];
    match upgrade(balancer.addr, a, "/ws?id=a6", false, &forged).await {
        Upgrade::Refused(status, body) => {
            assert_eq!(status, 429, "{body}");
            let body: Value = serde_json::from_str(&body).expect("JSON error body");
            assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
        }
        Upgrade::Open(_) => panic!("a seventh connection from 127.0.0.2 was accepted"),
    }
    // Another address still gets in.
    let c = Ipv4Addr::new(127, 0, 0, 4);
    assert!(
        matches!(
            upgrade(balancer.addr, c, "/ws?id=c0", false, &[]).await,
            Upgrade::Open(_)
        ),
        "127.0.0.4 refused"
    );
}

/// Messages counted by the rolling-restart load.
#[derive(Default)]
struct Tally {
    /// `/api/send` reports naming the target `delivered`.
    reported_delivered: AtomicU64,
    /// Messages received, by target ID, payload sequence numbers.
    received: Mutex<HashMap<String, Vec<u64>>>,
}

/// A plain relay client that keeps itself connected through the
/// balancer: on a close (a drain's 1001) it reconnects, retrying refused
/// upgrades, and records every message it receives.
async fn keep_connected(
    addr: SocketAddr,
    id: String,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    reconnects: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Relaxed) {
        let ws = match upgrade(
            addr,
            Ipv4Addr::LOCALHOST,
            &format!("/ws?id={id}"),
            false,
            &[],
        )
        .await
        {
            Upgrade::Open(ws) => *ws,
            Upgrade::Refused(_, _) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut ws = ws;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(WsMessage::Text(text)))) => {
                    let value: Value = serde_json::from_str(text.as_str()).expect("JSON payload");
                    let seq = value["seq"].as_u64().expect("seq");
                    tally
                        .received
                        .lock()
                        .expect("tally lock")
                        .entry(id.clone())
                        .or_default()
                        .push(seq);
                }
                Ok(Some(Ok(WsMessage::Close(_)) | Err(_)) | None) => break,
                Ok(Some(Ok(_))) => {}
            }
        }
        reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// A rolling restart through the balancer under relay load: each node in
/// turn is drained (SIGTERM), exits 0, is restarted on its port and comes
/// back into rotation before the next. Plain clients reconnect through
/// the balancer each time; traffic continues after every step; and every
/// message an `/api/send` report called `delivered` was received, exactly
/// once, by its target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_the_balancer_keeps_traffic_flowing() {
    let redis = Redis::start();
    let (n1, n2, n3) = start_cluster(&redis, &[]).await;
    let balancer = Balancer::start(&[&n1, &n2, &n3]).await;
    let mut nodes = [n1, n2, n3];

    let ids: Vec<String> = (0..9).map(|i| format!("r{i}")).collect();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    // The sender stops first, so that the clients are still there to
    // receive its last messages.
    let stop_sending = Arc::new(AtomicBool::new(false));
    let reconnects = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in &ids {
        tasks.push(tokio::spawn(keep_connected(
            balancer.addr,
            id.clone(),
            Arc::clone(&tally),
            Arc::clone(&stop),
            Arc::clone(&reconnects),
        )));
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    placement(&refs, &ids).await;

    // The load: one /api/send through the balancer every 20 ms, to the
    // IDs in turn; each report says whether the target was delivered to.
    let sender = {
        let (tally, stop, addr, ids) = (
            Arc::clone(&tally),
            Arc::clone(&stop_sending),
            balancer.addr,
            ids.clone(),
        );
        tokio::spawn(async move {
            let mut delivered: Vec<(String, u64)> = Vec::new();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) && seq < 10_000 {
                let target = &ids[(seq as usize) % ids.len()];
                let body = json!({"targets": [target], "payload": {"seq": seq}}).to_string();
                let (status, report) = http(addr, "POST", "/api/send", Some(&body)).await;
                if status == 200 {
                    let report: Value = serde_json::from_str(&report).expect("JSON report");
                    let hit = report["delivered"]
                        .as_array()
                        .is_some_and(|d| d.iter().any(|t| t == target.as_str()));
                    if hit {
                        tally.reported_delivered.fetch_add(1, Ordering::Relaxed);
                        delivered.push((target.clone(), seq));
                    }
                }
                seq += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (delivered, seq)
        })
    };

    let received_total = |tally: &Tally| -> usize {
        tally
            .received
            .lock()
            .expect("tally lock")
            .values()
            .map(Vec::len)
            .sum()
    };
    let started = Instant::now();
    for node in &mut nodes {
        let before = received_total(&tally);
        node.server.terminate();
        balancer.wait_server(&node.name, "DOWN", CHECK_WAIT);
        node.restart_after_drain(Duration::from_secs(10)).await;
        balancer.wait_server(&node.name, "UP", CHECK_WAIT);
        // Traffic continues: more messages arrive after this step.
        wait_for(
            &format!("traffic after restarting {}", node.name),
            WAIT,
            || async { (received_total(&tally) > before + 50).then_some(()) },
        )
        .await;
        eprintln!(
            "{} restarted, {:?} into the roll",
            node.name,
            started.elapsed()
        );
    }
    stop_sending.store(true, Ordering::Relaxed);
    let (delivered, sent) = tokio::time::timeout(WAIT, sender)
        .await
        .expect("the sender stops")
        .expect("sender task");
    // Let the last messages arrive (bounded), then stop the clients.
    wait_for("the delivered messages received", WAIT, || async {
        let received = tally.received.lock().expect("tally lock");
        delivered
            .iter()
            .all(|(target, seq)| received.get(target).is_some_and(|s| s.contains(seq)))
            .then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        tokio::time::timeout(WAIT, task)
            .await
            .expect("a client stops")
            .expect("client task");
    }

    let received = tally.received.lock().expect("tally lock");
    let mut missing = Vec::new();
    for (target, seq) in &delivered {
        let got = received
            .get(target)
            .map_or(0, |s| s.iter().filter(|x| *x == seq).count());
        if got != 1 {
            missing.push((target.clone(), *seq, got));
        }
    }
    let reconnected = reconnects.load(Ordering::Relaxed);
    eprintln!(
        "rolling restart: {sent} sends, {} reported delivered, {} received, {reconnected} reconnects, {:?}",
        delivered.len(),
        received.values().map(Vec::len).sum::<usize>(),
        started.elapsed()
    );
    assert!(
        missing.is_empty(),
        "reported delivered but received other than once (target, seq, times): {missing:?}"
    );
    // Every client was on some node, and each node was restarted once.
    assert!(reconnected >= ids.len() as u64, "{reconnected} reconnects");
    // Three steps of more than 50 received each (a few sends made while
    // their target reconnects are reported offline, not delivered).
    assert!(delivered.len() > 120, "only {} delivered", delivered.len());
}

/// The node's pings keep an idle WebSocket open through the balancer's
/// `timeout tunnel`: with the tunnel timeout scaled down to 3 s and pings
/// every 1 s, a client idle for 5 s is still connected and reachable; with
/// pings off, the balancer cuts the same idle client after about 3 s. The
/// example's 60 s against the default 25 s ping interval is the same
/// relation, unscaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_idle_clients_open_through_the_tunnel_timeout() {
    const TUNNEL: Duration = Duration::from_secs(3);
    const IDLE: Duration = Duration::from_secs(5);
    for (ping_interval, kept) in [("1s", true), ("0", false)] {
        let redis = Redis::start();
        let (n1, n2, n3) = start_cluster(
            &redis,
            // A pong timeout under the interval (the next ping comes one
            // interval after the pong either way, since the keepalive is
            // re-armed on the read that answers a ping).
            &["--ping-interval", ping_interval, "--pong-timeout", "500ms"],
        )
        .await;
        let balancer = Balancer::start_with(&[&n1, &n2, &n3], "3s").await;
        let mut idle = plain(&balancer, "idle").await;
        let started = Instant::now();
        // Reading answers the node's pings (tungstenite pongs by itself)
        // and shows a close or the end of the stream when it comes.
        let mut pings = 0;
        let ended = loop {
            let left = IDLE.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, idle.next()).await {
                Err(_) => break None,
                Ok(Some(Ok(WsMessage::Ping(_)))) => {
                    // The pong is queued by the read: send it now.
                    idle.flush().await.expect("flush the pong");
                    pings += 1;
                }
                Ok(end) => break Some((started.elapsed(), format!("{end:?}"))),
            }
        };
        if kept {
            assert!(
                ended.is_none(),
                "pings every {ping_interval}: cut {ended:?} after {pings} pings"
            );
            let body = json!({"targets": ["idle"], "payload": {"still": "here"}}).to_string();
            let (status, report) = http(n1.addr(), "POST", "/api/send", Some(&body)).await;
            assert_eq!(status, 200, "{report}");
            assert_eq!(next_json(&mut idle, WAIT).await, json!({"still": "here"}));
        } else {
            let (after, end) = ended.expect("without pings the balancer cuts the idle client");
            eprintln!("no pings: cut after {after:?} ({end})");
            assert!(
                after >= TUNNEL - Duration::from_millis(200),
                "cut after {after:?}, before the tunnel timeout {TUNNEL:?}: {end}"
            );
        }
    }
}

/// One message a v1 sender sent: (target, sender index, number).
type Sent = (String, u64, u64);

/// What the v1 receivers saw: per ID, every `msg` as (sender, number), in
/// order, and how many times each client connected and resumed.
#[derive(Default)]
struct Inboxes {
    received: Mutex<HashMap<String, Vec<(u64, u64)>>>,
    connects: AtomicU64,
    recovered: AtomicU64,
    /// Messages the resumes replayed (the welcome's `replayed`).
    replayed: AtomicU64,
}

/// The topic the rolling-restart receivers are members of, whose presence
/// the watchers follow.
const MEMBERS_TOPIC: &str = "members";

/// A v1 receiver `id` that stays connected through the balancer: on a
/// `drain` frame it keeps reading until its `reconnect_in_ms`, then
/// closes and reconnects 300 ms later; on any close it reconnects. Every hello after
/// the first resumes from the last seq it received, and must be
/// `recovered`; seqs must follow each other with no gap. After every
/// welcome it subscribes to [`MEMBERS_TOPIC`] again (a resume restores the
/// inbox, not subscriptions), so it stays a presence member there.
async fn v1_receiver(addr: SocketAddr, id: String, inboxes: Arc<Inboxes>, stop: Arc<AtomicBool>) {
    let mut resume: Option<(Value, u64)> = None;
    while !stop.load(Ordering::Relaxed) {
        if resume.is_some() {
            // Stay away a while after leaving a node, so that messages
            // sent meanwhile are retained (`offline`) and replayed.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let mut ws = match upgrade(
            addr,
            Ipv4Addr::LOCALHOST,
            &format!("/ws?id={id}"),
            true,
            &[],
        )
        .await
        {
            Upgrade::Open(ws) => *ws,
            Upgrade::Refused(_, _) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut hello = json!({"type": "hello", "id": 0});
        if let Some((epoch, seq)) = &resume {
            hello["resume"] = json!({"epoch": epoch, "seq": seq});
        }
        if ws.send(WsMessage::text(hello.to_string())).await.is_err() {
            continue;
        }
        let mut leave_at: Option<tokio::time::Instant> = None;
        let mut welcomed = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if leave_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
                // Our turn after a drain: close, reading what comes first.
                let _ = ws.close(None).await;
                while let Ok(Some(Ok(message))) = tokio::time::timeout(WAIT, ws.next()).await {
                    if let WsMessage::Text(text) = message {
                        record(&id, text.as_str(), &mut resume, &inboxes);
                    }
                }
                break;
            }
            let frame = match tokio::time::timeout(Duration::from_millis(50), ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(WsMessage::Text(text)))) => text,
                Ok(Some(Ok(WsMessage::Close(_)) | Err(_)) | None) => break,
                Ok(Some(Ok(_))) => continue,
            };
            let value: Value = serde_json::from_str(frame.as_str()).expect("a JSON frame");
            match value["type"].as_str() {
                Some("welcome") => {
                    let status = value["resume"]["status"].as_str().unwrap_or_default();
                    match &resume {
                        None => assert_eq!(status, "new", "{id}: {value}"),
                        Some(_) => {
                            assert_eq!(status, "recovered", "{id}: {value}");
                            inboxes.recovered.fetch_add(1, Ordering::Relaxed);
                            let replayed = value["resume"]["replayed"].as_u64().unwrap_or(0);
                            inboxes.replayed.fetch_add(replayed, Ordering::Relaxed);
                        }
                    }
                    let epoch = value["inbox"]["epoch"].clone();
                    let seq = resume.as_ref().map_or(0, |(_, seq)| *seq);
                    resume = Some((epoch, seq));
                    inboxes.connects.fetch_add(1, Ordering::Relaxed);
                    welcomed = true;
                    let subscribe = json!({"type": "subscribe", "id": 1, "topic": MEMBERS_TOPIC});
                    if ws
                        .send(WsMessage::text(subscribe.to_string()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Some("ack") => assert!(value.get("error").is_none(), "{id}: {value}"),
                Some("drain") => {
                    let delay = value["reconnect_in_ms"].as_u64().expect("reconnect_in_ms");
                    leave_at = Some(tokio::time::Instant::now() + Duration::from_millis(delay));
                }
                Some("msg") => {
                    assert!(welcomed, "{id}: a msg before the welcome: {value}");
                    record(&id, frame.as_str(), &mut resume, &inboxes);
                }
                _ => panic!("{id}: unexpected frame {value}"),
            }
        }
    }
}

/// What the presence watchers of the rolling restart saw.
#[derive(Default)]
struct Watched {
    /// Joins and leaves of the receivers, and snapshots that lacked one:
    /// each a flap the leave delay should have hidden.
    flaps: Mutex<Vec<String>>,
    /// Snapshots received (one per subscribe, so per (re)connect).
    snapshots: AtomicU64,
    /// `presence` frames received.
    frames: AtomicU64,
}

/// A presence watcher connected to one node directly (not through the
/// balancer), so that while one node restarts the others' watchers keep
/// watching: after every (re)connect it subscribes to [`MEMBERS_TOPIC`]
/// with full presence and records every join or leave of a `receivers` ID,
/// and every snapshot that lacks one, until `stop`. Reconnects (to the
/// same address, which its node comes back on) after a drain or a close.
async fn presence_watcher(
    addr: SocketAddr,
    name: String,
    receivers: Vec<String>,
    watched: Arc<Watched>,
    stop: Arc<AtomicBool>,
) {
    let is_receiver = |id: &Value| receivers.iter().any(|r| id == r.as_str());
    while !stop.load(Ordering::Relaxed) {
        let mut request = format!("ws://{addr}/ws?id={name}")
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("switchboard.v1"),
        );
        let mut ws =
            match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request)).await {
                Ok(Ok((ws, _))) => ws,
                // The node is down (restarting) or refusing (draining).
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
        let hello = r#"{"type":"hello","id":0}"#;
        let subscribe =
            json!({"type": "subscribe", "id": 1, "topic": MEMBERS_TOPIC, "presence": "full"});
        if ws.send(WsMessage::text(hello)).await.is_err()
            || ws
                .send(WsMessage::text(subscribe.to_string()))
                .await
                .is_err()
        {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            let text = match tokio::time::timeout(Duration::from_millis(50), ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(WsMessage::Text(text)))) => text,
                Ok(Some(Ok(WsMessage::Close(_)) | Err(_)) | None) => break,
                Ok(Some(Ok(_))) => continue,
            };
            let value: Value = serde_json::from_str(text.as_str()).expect("a JSON frame");
            match value["type"].as_str() {
                Some("ack") if value["id"] == 1 => {
                    let members = value["presence"]["members"]
                        .as_array()
                        .unwrap_or_else(|| panic!("{name}: a snapshot: {value}"));
                    let missing: Vec<&String> = receivers
                        .iter()
                        .filter(|r| !members.iter().any(|m| m["id"] == r.as_str()))
                        .collect();
                    if !missing.is_empty() {
                        watched.flaps.lock().expect("flaps lock").push(format!(
                            "{name}: snapshot at rev {} lacks {missing:?}",
                            value["presence"]["rev"]
                        ));
                    }
                    watched.snapshots.fetch_add(1, Ordering::Relaxed);
                }
                Some("presence") => {
                    watched.frames.fetch_add(1, Ordering::Relaxed);
                    for list in ["joins", "leaves"] {
                        for member in value[list].as_array().into_iter().flatten() {
                            if is_receiver(&member["id"]) {
                                watched.flaps.lock().expect("flaps lock").push(format!(
                                    "{name}: {list} {} at rev {}",
                                    member["id"], value["rev"]
                                ));
                            }
                        }
                    }
                }
                Some("welcome" | "drain" | "ack") => {}
                _ => panic!("{name}: unexpected frame {value}"),
            }
        }
    }
}

/// Records a `msg` frame (other frames are ignored) and checks its seq
/// follows the last one.
fn record(id: &str, frame: &str, resume: &mut Option<(Value, u64)>, inboxes: &Inboxes) {
    let value: Value = serde_json::from_str(frame).expect("a JSON frame");
    if value["type"] != "msg" {
        return;
    }
    let seq = value["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("{id}: a msg without seq: {value}"));
    let (_, last) = resume.as_mut().expect("a msg after a welcome");
    assert_eq!(seq, *last + 1, "{id}: seq {seq} after {last}: {value}");
    *last = seq;
    let sender = value["payload"]["s"].as_u64().expect("s");
    let n = value["payload"]["n"].as_u64().expect("n");
    inboxes
        .received
        .lock()
        .expect("inboxes lock")
        .entry(id.to_owned())
        .or_default()
        .push((sender, n));
}

/// A v1 sender through the balancer: one `send` at a time to the
/// `targets` in turn, every 20 ms, until `stop`; reconnects after a drain
/// or a close. Returns what its acks reported `delivered` or `retained`.
async fn v1_sender(
    addr: SocketAddr,
    index: u64,
    targets: Vec<String>,
    stop: Arc<AtomicBool>,
) -> (Vec<Sent>, u64) {
    let id = format!("sender{index}");
    let mut acked = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && n < 10_000 {
        let mut ws = match upgrade(
            addr,
            Ipv4Addr::LOCALHOST,
            &format!("/ws?id={id}"),
            true,
            &[],
        )
        .await
        {
            Upgrade::Open(ws) => *ws,
            Upgrade::Refused(_, _) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if ws
            .send(WsMessage::text(r#"{"type":"hello","id":0}"#))
            .await
            .is_err()
        {
            continue;
        }
        let mut leave_at: Option<tokio::time::Instant> = None;
        let mut waiting: Option<(u64, String)> = None;
        'connection: loop {
            if leave_at.is_some_and(|at| tokio::time::Instant::now() >= at) && waiting.is_none() {
                let _ = ws.close(None).await;
                while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
                break;
            }
            if waiting.is_none() {
                if stop.load(Ordering::Relaxed) || n >= 10_000 {
                    break;
                }
                n += 1;
                let target = targets[(n as usize) % targets.len()].clone();
                let frame = json!({"type": "send", "id": n, "targets": [&target], "payload": {"s": index, "n": n}});
                if ws.send(WsMessage::text(frame.to_string())).await.is_err() {
                    break;
                }
                waiting = Some((n, target));
            }
            loop {
                let frame = match tokio::time::timeout(WAIT, ws.next()).await {
                    Ok(Some(Ok(WsMessage::Text(text)))) => text,
                    Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
                    _ => break 'connection,
                };
                let value: Value = serde_json::from_str(frame.as_str()).expect("a JSON frame");
                match value["type"].as_str() {
                    Some("welcome" | "msg") => {}
                    Some("drain") => {
                        let delay = value["reconnect_in_ms"].as_u64().expect("reconnect_in_ms");
                        leave_at = Some(tokio::time::Instant::now() + Duration::from_millis(delay));
                    }
                    Some("ack") => {
                        let (request, target) = waiting.take().expect("an ack for a send");
                        assert_eq!(value["id"], request, "{id}: {value}");
                        let listed = |list: &str| {
                            value[list]
                                .as_array()
                                .is_some_and(|l| l.iter().any(|t| *t == target.as_str()))
                        };
                        if listed("delivered") || listed("retained") {
                            acked.push((target, index, request));
                        }
                        break;
                    }
                    _ => panic!("{id}: unexpected frame {value}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (acked, n)
}

/// The strict rolling restart, with `switchboard.v1` and its inbox in
/// Redis: receivers resume from their last seq wherever the balancer puts
/// them, and every message whose ack said `delivered` or `retained` is
/// received exactly once, live or replayed, with no gap in the seqs and
/// every resume `recovered`. The receivers are presence members of a
/// topic watched on every node, and their drains and moves cause no
/// presence join or leave there (the leave delay hides them: with
/// `presence_leave_delay = "0s"` this check fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_no_acked_v1_message() {
    let redis = Redis::start();
    let v1 = TempFile::config("[v1]\ninbox_ttl = \"60s\"\n");
    let (n1, n2, n3) = start_cluster(&redis, &["--config", v1.path()]).await;
    let balancer = Balancer::start(&[&n1, &n2, &n3]).await;
    let mut nodes = [n1, n2, n3];

    let receivers: Vec<String> = (0..6).map(|i| format!("inbox{i}")).collect();
    let inboxes = Arc::new(Inboxes::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut receiving = Vec::new();
    for id in &receivers {
        receiving.push(tokio::spawn(v1_receiver(
            balancer.addr,
            id.clone(),
            Arc::clone(&inboxes),
            Arc::clone(&stop),
        )));
    }
    wait_for("every receiver welcomed", WAIT, || async {
        (inboxes.connects.load(Ordering::Relaxed) >= receivers.len() as u64).then_some(())
    })
    .await;
    let presence_path = format!("/api/presence/{MEMBERS_TOPIC}");
    wait_for("every receiver a presence member", WAIT, || async {
        let (status, body) = http(nodes[0].addr(), "GET", &presence_path, None).await;
        let body: Value = serde_json::from_str(&body).expect("JSON");
        (status == 200 && body["count"].as_u64() >= Some(receivers.len() as u64)).then_some(())
    })
    .await;
    // One watcher per node, connected to it directly: while a node
    // restarts, the other two watch (and its own reconnects).
    let watched = Arc::new(Watched::default());
    let stop_watching = Arc::new(AtomicBool::new(false));
    let mut watching = Vec::new();
    for node in &nodes {
        watching.push(tokio::spawn(presence_watcher(
            node.addr(),
            format!("watch-{}", node.name),
            receivers.clone(),
            Arc::clone(&watched),
            Arc::clone(&stop_watching),
        )));
    }
    wait_for("a snapshot at every watcher", WAIT, || async {
        (watched.snapshots.load(Ordering::Relaxed) >= nodes.len() as u64).then_some(())
    })
    .await;
    // The senders stop first, so that the receivers are still there to
    // receive (or resume) their last messages.
    let stop_sending = Arc::new(AtomicBool::new(false));
    let mut sending = Vec::new();
    for index in 0..3 {
        sending.push(tokio::spawn(v1_sender(
            balancer.addr,
            index,
            receivers.clone(),
            Arc::clone(&stop_sending),
        )));
    }

    let received_total = |inboxes: &Inboxes| -> usize {
        inboxes
            .received
            .lock()
            .expect("inboxes lock")
            .values()
            .map(Vec::len)
            .sum()
    };
    let started = Instant::now();
    for node in &mut nodes {
        let before = received_total(&inboxes);
        node.server.terminate();
        balancer.wait_server(&node.name, "DOWN", CHECK_WAIT);
        node.restart_after_drain(Duration::from_secs(10)).await;
        balancer.wait_server(&node.name, "UP", CHECK_WAIT);
        wait_for(
            &format!("traffic after restarting {}", node.name),
            WAIT,
            || async { (received_total(&inboxes) > before + 50).then_some(()) },
        )
        .await;
        eprintln!(
            "{} restarted, {:?} into the roll",
            node.name,
            started.elapsed()
        );
    }
    stop_sending.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut sent = 0;
    for task in sending {
        let (mut some, n) = tokio::time::timeout(WAIT, task)
            .await
            .expect("a sender stops")
            .expect("sender task");
        acked.append(&mut some);
        sent += n;
    }
    // Whatever was acked arrives live shortly, or by a resume: let the
    // receivers read it (bounded: what is missing then is reported
    // below), then stop them.
    let all_received = || {
        let received = inboxes.received.lock().expect("inboxes lock");
        acked.iter().all(|(id, sender, n)| {
            received
                .get(id)
                .is_some_and(|got| got.contains(&(*sender, *n)))
        })
    };
    let deadline = Instant::now() + WAIT;
    while !all_received() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The watching ends before the receivers stop (their ends are leaves).
    stop_watching.store(true, Ordering::Relaxed);
    for task in watching {
        tokio::time::timeout(WAIT, task)
            .await
            .expect("a watcher stops")
            .expect("watcher task");
    }
    stop.store(true, Ordering::Relaxed);
    for task in receiving {
        tokio::time::timeout(WAIT, task)
            .await
            .expect("a receiver stops")
            .expect("receiver task");
    }

    let received = inboxes.received.lock().expect("inboxes lock");
    let mut counts: HashMap<(String, u64, u64), usize> = HashMap::new();
    for (id, messages) in received.iter() {
        for (sender, n) in messages {
            *counts.entry((id.clone(), *sender, *n)).or_default() += 1;
        }
    }
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "received more than once: {twice:?}");
    let lost: Vec<&Sent> = acked.iter().filter(|m| !counts.contains_key(*m)).collect();
    let recovered = inboxes.recovered.load(Ordering::Relaxed);
    let replayed = inboxes.replayed.load(Ordering::Relaxed);
    eprintln!(
        "v1 rolling restart: {sent} sends, {} acked delivered or retained, {} received, {} lost, \
         {recovered} resumes recovered replaying {replayed}, {:?}",
        acked.len(),
        counts.len(),
        lost.len(),
        started.elapsed()
    );
    assert!(lost.is_empty(), "acked but never received: {lost:?}");
    assert!(
        recovered >= receivers.len() as u64,
        "only {recovered} resumes"
    );
    let flaps = watched.flaps.lock().expect("flaps lock");
    eprintln!(
        "presence over the roll: {} snapshots and {} presence frames at the watchers, {} flaps of drained receivers",
        watched.snapshots.load(Ordering::Relaxed),
        watched.frames.load(Ordering::Relaxed),
        flaps.len()
    );
    assert!(
        flaps.is_empty(),
        "drained receivers showed in presence as leaving or joining: {flaps:?}"
    );
    assert!(acked.len() > 150, "only {} acked", acked.len());
    assert!(
        replayed > 0,
        "no resume replayed anything: the retained path went untested"
    );
}
