//! A real Redis Cluster on loopback: six `redis-server --cluster-enabled
//! yes` (3 masters, 3 replicas, made by `redis-cli --cluster create`), each
//! with its own free client port and cluster-bus port, in a temporary
//! folder removed on drop (every server is killed first). For
//! `redis_cluster.rs`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::{Resp, command_at, redis_server, redis_tool};
use super::{Guard, STARTUP, TempDir, WAIT, free_port};

/// `--cluster-node-timeout`: how long a master may be unreachable before
/// its replica is promoted. Small, so that a failover takes about 2 s.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// One server of the cluster.
pub struct ClusterServer {
    pub port: u16,
    pub proc: Option<Guard>,
}

/// Six servers forming one cluster; dropped: killed, their folder removed.
pub struct RedisCluster {
    pub servers: Vec<ClusterServer>,
    // Declared after `servers`: removed once they are killed.
    dir: TempDir,
}

impl RedisCluster {
    /// Starts 6 servers, makes them a cluster of 3 masters with one
    /// replica each, and waits until every server says `cluster_state:ok`
    /// and knows the 5 others.
    pub fn start() -> Self {
        let dir = TempDir::new();
        let servers: Vec<ClusterServer> = (0..6).map(|_| spawn_server(&dir)).collect();
        let cluster = Self { servers, dir };
        let addrs: Vec<String> = cluster
            .servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let output = Command::new(redis_tool("redis-cli"))
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_ok(STARTUP);
        cluster
    }

    /// `redis+cluster://` with every master's and replica's address.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The ports of the servers still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.servers
            .iter()
            .filter(|s| s.proc.is_some())
            .map(|s| s.port)
            .collect()
    }

    /// A command to the server on `port`.
    pub fn command(&self, port: u16, args: &[&str]) -> Resp {
        command_at(port, args).unwrap_or_else(|e| panic!("redis :{port} {args:?}: {e}"))
    }

    /// A command to any running server (keyless: `CLUSTER KEYSLOT`, say).
    pub fn any(&self, args: &[&str]) -> Resp {
        let port = *self.live_ports().first().expect("a running server");
        self.command(port, args)
    }

    /// Waits until every running server says `cluster_state:ok`, knows
    /// every server of the cluster, and all agree on which are masters.
    pub fn wait_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ok = self.live_ports().into_iter().all(|port| {
                command_at(port, &["CLUSTER", "INFO"]).is_ok_and(|info| {
                    let info = info.text();
                    info.contains("cluster_state:ok")
                        && info.contains(&format!("cluster_known_nodes:{}", self.servers.len()))
                })
            }) && self.masters_agree()
                && self.replicas_synced();
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the redis cluster is not ok after {limit:?}: {:?}",
                self.live_ports()
                    .iter()
                    .map(|p| command_at(*p, &["CLUSTER", "INFO"]).map(|r| r.text()).ok())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether every running server sees the same running masters
    /// covering all slots.
    fn masters_agree(&self) -> bool {
        let views: Vec<Vec<u16>> = self
            .live_ports()
            .into_iter()
            .map(|port| {
                let mut masters = self.masters_seen_by(port);
                masters.sort_unstable();
                masters
            })
            .collect();
        let live = self.live_ports();
        views.windows(2).all(|w| w[0] == w[1])
            && views
                .first()
                .is_some_and(|v| v.len() == 3 && v.iter().all(|m| live.contains(m)))
    }

    /// Whether every running replica has finished its sync with its
    /// master (a replica that never synced cannot be promoted).
    fn replicas_synced(&self) -> bool {
        self.live_ports().into_iter().all(|port| {
            command_at(port, &["INFO", "replication"]).is_ok_and(|info| {
                let info = info.text();
                info.contains("role:master") || info.contains("master_link_status:up")
            })
        })
    }

    /// The ports of the masters (with slots, not failed) that the server
    /// on `port` knows.
    pub fn masters_seen_by(&self, port: u16) -> Vec<u16> {
        let Ok(nodes) = command_at(port, &["CLUSTER", "NODES"]) else {
            return Vec::new();
        };
        parse_nodes(&nodes.text())
            .into_iter()
            .filter(|n| n.master && !n.failed && n.slots > 0)
            .map(|n| n.port)
            .collect()
    }

    /// The running master that owns `slot`.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        let nodes = self.any(&["CLUSTER", "NODES"]).text();
        parse_nodes(&nodes)
            .into_iter()
            .find(|n| n.master && !n.failed && n.ranges.iter().any(|r| r.contains(&slot)))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no master owns slot {slot}:\n{nodes}"))
    }

    /// The slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        let slot = self.any(&["CLUSTER", "KEYSLOT", key]).int();
        u16::try_from(slot).expect("a slot")
    }

    /// The cluster node ID of the server on `port`.
    pub fn node_id(&self, port: u16) -> String {
        self.command(port, &["CLUSTER", "MYID"]).text()
    }

    /// SIGKILLs the server on `port` (no goodbye to its clients).
    pub fn kill(&mut self, port: u16) {
        let server = self
            .servers
            .iter_mut()
            .find(|s| s.port == port)
            .unwrap_or_else(|| panic!("no server on port {port}"));
        if let Some(mut proc) = server.proc.take() {
            proc.signal("-KILL");
            proc.wait_timeout(WAIT).expect("redis-server exits");
        }
    }

    /// Moves `count` slots from the master on `from` to the master on `to`
    /// with `redis-cli --cluster reshard` (keys migrated with `MIGRATE`,
    /// clients redirected with `ASK`/`MOVED` meanwhile).
    pub fn reshard(&self, from: u16, to: u16, count: u32) -> String {
        let output = Command::new(redis_tool("redis-cli"))
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &self.node_id(from)])
            .args(["--cluster-to", &self.node_id(to)])
            .args(["--cluster-slots", &count.to_string(), "--cluster-yes"])
            .args(["--cluster-pipeline", "100"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster reshard");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "redis-cli --cluster reshard failed: {text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text
    }
}

impl RedisCluster {
    /// Moves `slot` (and its keys) to the master on `to`, step by step as
    /// `redis-cli --cluster reshard` does: `IMPORTING` on the target,
    /// `MIGRATING` on the source, `MIGRATE` of the keys, then `SETSLOT
    /// NODE` on both and on every other master. Clients meanwhile get
    /// `ASK` for keys already moved, then `MOVED`.
    pub fn migrate_slot(&self, slot: u16, to: u16) {
        let from = self.master_of_slot(slot);
        if from == to {
            return;
        }
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let slot_text = slot.to_string();
        let ok = |port: u16, args: &[&str]| {
            let reply = self.command(port, args);
            assert!(
                !matches!(reply, Resp::Error(_)),
                ":{port} {args:?}: {reply:?}"
            );
            reply
        };
        ok(
            to,
            &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id],
        );
        ok(
            from,
            &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id],
        );
        for _ in 0..10_000 {
            let Resp::Array(keys) = ok(from, &["CLUSTER", "GETKEYSINSLOT", &slot_text, "100"])
            else {
                panic!("GETKEYSINSLOT")
            };
            if keys.is_empty() {
                break;
            }
            let keys: Vec<String> = keys.iter().map(Resp::text).collect();
            let to_port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            ok(from, &args);
        }
        for port in [to, from] {
            ok(port, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
        }
        for port in self.live_ports() {
            if port != to && port != from && self.masters_seen_by(port).contains(&port) {
                let _ = self.command(port, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
            }
        }
    }
}

fn spawn_server(dir: &TempDir) -> ClusterServer {
    let port = free_port();
    let bus = free_port();
    let child = Command::new(redis_server())
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-port", &bus.to_string()])
        .args([
            "--cluster-config-file",
            &dir.join(&format!("nodes-{port}.conf")),
        ])
        .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        // A replica's first sync at once (the default waits 5 s for
        // other replicas to share the transfer).
        .args(["--repl-diskless-sync-delay", "0"])
        .args(["--dir", &dir.join("")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server --cluster-enabled yes");
    let mut proc = Guard(child);
    let deadline = Instant::now() + STARTUP;
    while command_at(port, &["PING"]).is_err() {
        if let Some(status) = proc.wait_timeout(Duration::ZERO) {
            panic!("redis-server (cluster) on port {port} exited at startup: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "redis-server (cluster) on port {port} did not answer PING"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ClusterServer {
        port,
        proc: Some(proc),
    }
}

/// One line of `CLUSTER NODES`.
struct NodeLine {
    port: u16,
    master: bool,
    failed: bool,
    slots: usize,
    ranges: Vec<std::ops::RangeInclusive<u16>>,
}

/// `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let addr = fields.get(1)?;
            let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = fields.get(2)?;
            let ranges: Vec<std::ops::RangeInclusive<u16>> = fields
                .iter()
                .skip(8)
                .filter(|f| !f.starts_with('['))
                .filter_map(|f| match f.split_once('-') {
                    Some((a, b)) => Some(a.parse().ok()?..=b.parse().ok()?),
                    None => {
                        let s = f.parse().ok()?;
                        Some(s..=s)
                    }
                })
                .collect();
            Some(NodeLine {
                port,
                master: flags.contains("master"),
                failed: flags.contains("fail") && !flags.contains("fail?")
                    || flags.contains("noaddr"),
                slots: ranges.iter().map(|r| r.clone().count()).sum(),
                ranges,
            })
        })
        .collect()
}
