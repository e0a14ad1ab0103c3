//! The dashboard in a real headless Chromium (Debian's `chromium`, driven
//! by `playwright-core` from `scripts/check-dashboard.mjs`), against the
//! real `switchboard` binary: log in (a wrong key refused), a WebSocket
//! opened by the test listed within 2 s, the rate chart moving while the
//! test sends, the send form's delivery report, Disconnect closing that
//! client with 4000; and with three nodes on a real `redis-server`, every
//! node listed alive with its connections, and a client of another node in
//! the client list.
//!
//! Node, Chromium and playwright-core missing fail these tests (never
//! skip), in CI and out: `scripts/test --deps` installs them. With
//! `SB_SCREENSHOTS=docs/img` set, the script writes the README's
//! screenshots there.

mod support;

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Guard, STARTUP, Server, free_port, switchboard};

const KEY: &str = "dashboard-browser-key-0123456789abcdef";

/// One browser run's bound (~15 s here); a hang fails.
const RUN_LIMIT: Duration = Duration::from_secs(180);

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ci() -> &'static str {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        " (CI=true)"
    } else {
        ""
    }
}

/// Checks that node, chromium and playwright-core are there; panics with
/// the command that installs them otherwise.
fn require_browser_tools() {
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is not installed{}: run `scripts/test --deps` (apt-get install -y nodejs npm)",
        ci()
    );
    let chromium = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        chromium.is_file(),
        "chromium is not installed at {}{}: run `scripts/test --deps` (apt-get install -y chromium)",
        chromium.display(),
        ci()
    );
    let deps = std::env::var_os("SB_TEST_DEPS")
        .map_or_else(|| workspace().join("target/test-deps"), PathBuf::from);
    let playwright = deps.join("node/node_modules/playwright-core/package.json");
    assert!(
        playwright.is_file(),
        "playwright-core is not installed at {}{}: run `scripts/test --deps`",
        playwright.display(),
        ci()
    );
}

/// Runs `scripts/check-dashboard.mjs` with `args`, the screenshot folder
/// (`-` for none) and `extra`; panics with its output unless everything
/// passed.
fn check_dashboard(args: &[&str], extra: &[&str]) {
    require_browser_tools();
    let mut command = Command::new("node");
    command
        .arg(workspace().join("scripts/check-dashboard.mjs"))
        .args(args);
    match std::env::var_os("SB_SCREENSHOTS") {
        Some(dir) => {
            let dir = workspace().join(dir);
            std::fs::create_dir_all(&dir).expect("screenshot dir");
            command.arg(dir);
        }
        None => {
            command.arg("-");
        }
    }
    command.args(extra);
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    let mut guard = Guard(child);
    let readers: Vec<_> = [
        guard
            .0
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        guard
            .0
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut pipe| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    })
    .collect();
    let status = guard
        .wait_timeout(RUN_LIMIT)
        .unwrap_or_else(|| panic!("check-dashboard.mjs did not finish within {RUN_LIMIT:?}"));
    let output: Vec<String> = readers
        .into_iter()
        .map(|r| r.join().unwrap_or_default())
        .collect();
    let output = output.join("\n");
    eprintln!("{output}");
    assert!(
        status.success(),
        "the browser test failed ({status}):\n{output}"
    );
    assert!(output.contains(" passed, 0 failed"), "{output}");
}

#[test]
fn the_dashboard_works_in_a_real_browser() {
    let server = Server::start(&["--api-keys", KEY]);
    check_dashboard(&["single", &format!("http://{}", server.addr), KEY], &[]);
}

// ---------------------------------------------------------------------------
// Three nodes and a real Redis
// ---------------------------------------------------------------------------

/// A `redis-server` on a free loopback port, without persistence; killed
/// on drop.
struct Redis {
    _proc: Guard,
    port: u16,
}

impl Redis {
    fn start() -> Self {
        let binary = std::env::var_os("PATH")
            .and_then(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join("redis-server"))
                    .find(|candidate| candidate.is_file())
            })
            .unwrap_or_else(|| {
                panic!(
                    "redis-server is not installed{}: apt-get install -y redis-server (scripts/test --deps)",
                    ci()
                )
            });
        let port = free_port();
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let redis = Self {
            _proc: Guard(child),
            port,
        };
        let deadline = Instant::now() + STARTUP;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }
}

fn node(redis: &Redis, name: &str, prefix: &str) -> Server {
    let mut command = switchboard();
    command.args(["--listen", "127.0.0.1:0", "--backend", "redis"]);
    command.args(["--redis-url", &format!("redis://127.0.0.1:{}/", redis.port)]);
    command.args(["--node-id", name, "--redis-key-prefix", prefix]);
    command.args(["--redis-presence-ttl", "2s"]);
    Server::spawn(command)
}

#[test]
fn every_node_of_a_cluster_appears() {
    let redis = Redis::start();
    let prefix = format!("sbdash{}", std::process::id());
    let nodes: Vec<Server> = ["dash-a", "dash-b", "dash-c"]
        .iter()
        .map(|name| node(&redis, name, &prefix))
        .collect();
    // A client on node b, so its count is not only zeros.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _client = runtime.block_on(nodes[1].connect("/ws?id=on-node-b"));
    check_dashboard(
        &[
            "cluster",
            &format!("http://{}", nodes[0].addr),
            "dash-a=0,dash-b=1,dash-c=0",
        ],
        &["on-node-b"],
    );
}
