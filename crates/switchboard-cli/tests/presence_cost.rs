//! What presence costs the server on subscribe/unsubscribe churn: a
//! `switchboard` process (memory backend) and 20 v1 clients that subscribe
//! to and unsubscribe from one topic, in three modes: `v1.presence` off,
//! on with nobody watching the topic's presence, on with one `full`
//! watcher (every join and leave is an event to coalesce and send).
//!
//! Two measurements, both by hand (their numbers are in
//! docs/protocol-v1.md and docs/benchmarks.md):
//!
//! - CPU time (`/proc/PID/stat`), ignored by default since it is timing:
//!   `PRESENCE_COST_ROUNDS=25000 PRESENCE_COST_REPEATS=5 cargo test
//!   --release -p switchboard-cli --test presence_cost -- --ignored
//!   --nocapture`. The three modes run interleaved, `REPEATS` times, each
//!   phase on a fresh server, so a load change on a shared machine hits
//!   every mode alike; it prints every phase, the median per mode and the
//!   spread of the per-repeat overheads.
//! - Instructions (callgrind), the stable number:
//!   `PRESENCE_COST_CALLGRIND=1` with the same command runs each mode once
//!   under `valgrind --tool=callgrind` and counts the server's instructions
//!   during the churn only (the counts are zeroed before it and dumped
//!   after it with `callgrind_control`). Needs `valgrind`. Set to a
//!   directory, it keeps the profiles there for `callgrind_annotate`.
//!
//! The CI guard of presence's cost counts operations, not time: hash calls
//! per subscribe+unsubscribe pair, in crates/switchboard/src/backend/
//! presence/table.rs. The test here that runs by default checks only that
//! the churn of every mode is answered (a short run, no timing).

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use support::{BIN, Client, Server, TempFile, WAIT};

const CLIENTS: usize = 20;
/// Subscribe/unsubscribe pairs per client per phase; `PRESENCE_COST_ROUNDS`
/// overrides. 25,000 (500,000 joins, about 1.3 CPU-seconds of a release
/// server) keeps the 10 ms tick of `/proc` CPU time under 1 % of a phase.
const ROUNDS: usize = 25_000;
/// Rounds of the by-default smoke run (a debug build).
const SMOKE_ROUNDS: usize = 200;
/// Rounds under callgrind (about 50 times slower): 10,000 pairs in all.
const CALLGRIND_ROUNDS: usize = 500;
/// How many times each mode runs; `PRESENCE_COST_REPEATS` overrides.
const REPEATS: usize = 5;
const BATCH: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Unwatched,
    Watched,
}

impl Mode {
    const ALL: [Self; 3] = [Self::Off, Self::Unwatched, Self::Watched];

    fn name(self) -> &'static str {
        match self {
            Self::Off => "presence off",
            Self::Unwatched => "presence, no watcher",
            Self::Watched => "presence, one full watcher",
        }
    }
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn whole_batches(rounds: usize) -> usize {
    rounds.max(BATCH) / BATCH * BATCH
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
    let out = Command::new("getconf")
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
    let welcome = next_json(&mut client, WAIT).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    client
}

async fn next_json(client: &mut Client, wait: Duration) -> Value {
    loop {
        let message = tokio::time::timeout(wait, client.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("no error");
        if let WsMessage::Text(text) = message {
            return serde_json::from_str(&text).expect("JSON");
        }
    }
}

/// One client's churn: `rounds` subscribes and unsubscribes of `room`, in
/// pipelined batches; every request acked without error.
async fn churn(mut client: Client, rounds: usize, wait: Duration) {
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
            let frame = next_json(&mut client, wait).await;
            if frame["type"] == "ack" {
                assert!(frame.get("error").is_none(), "{frame}");
                acked += 1;
            }
        }
    }
}

/// What one phase measured.
struct Phase {
    joins: usize,
    cpu_seconds: f64,
    /// Server instructions during the churn, under callgrind.
    instructions: Option<u64>,
    /// Presence frames the watcher got.
    frames: usize,
}

impl Phase {
    fn joins_per_cpu_second(&self) -> f64 {
        self.joins as f64 / self.cpu_seconds.max(0.001)
    }
}

/// Where callgrind writes a server's counts: the temp directory, removed
/// after, or kept in the directory `PRESENCE_COST_CALLGRIND` names (for
/// `callgrind_annotate`).
struct CallgrindOut(PathBuf, bool);

impl CallgrindOut {
    fn new(mode: Mode) -> Self {
        let keep = std::env::var_os("PRESENCE_COST_CALLGRIND")
            .map(PathBuf::from)
            .filter(|dir| dir.is_dir());
        let name = format!(
            "presence-cost-callgrind-{}-{:?}-{}",
            std::process::id(),
            mode,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos()
        );
        match keep {
            Some(dir) => Self(dir.join(name), true),
            None => Self(std::env::temp_dir().join(name), false),
        }
    }

    /// The `summary:` of every dump made so far (one: the churn).
    fn instructions(&self) -> u64 {
        let dir = self.0.parent().expect("temp dir");
        let stem = self.0.file_name().expect("name").to_string_lossy();
        let mut total = 0;
        for entry in std::fs::read_dir(dir).expect("read temp dir") {
            let entry = entry.expect("dir entry");
            if !entry.file_name().to_string_lossy().starts_with(&*stem) {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).expect("read callgrind out");
            for line in text.lines() {
                if let Some(n) = line.strip_prefix("summary: ") {
                    total += n.trim().parse::<u64>().expect("totals is a number");
                }
            }
        }
        total
    }
}

impl Drop for CallgrindOut {
    fn drop(&mut self) {
        if self.1 {
            return;
        }
        let (Some(dir), Some(stem)) = (self.0.parent(), self.0.file_name()) else {
            return;
        };
        let stem = stem.to_string_lossy();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&*stem) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

fn callgrind_control(args: &[&str]) {
    let status = Command::new("callgrind_control")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run callgrind_control (install valgrind)");
    assert!(status.success(), "callgrind_control {args:?}: {status}");
}

/// One phase on a fresh server: `rounds` pairs per client in `mode`.
async fn phase(mode: Mode, rounds: usize, callgrind: bool) -> Phase {
    let presence = mode != Mode::Off;
    let config = TempFile::config(&format!("[v1]\npresence = {presence}\n"));
    // The message rate limit off: a long run sends faster than the
    // default 10,000 a second and would measure `rate_limited` answers
    // instead of joins.
    let args = ["--config", config.path(), "--max-message-rate", "0"];
    let out = CallgrindOut::new(mode);
    let server = if callgrind {
        let mut command = Command::new("valgrind");
        command
            .args(["-q", "--tool=callgrind"])
            .arg(format!("--callgrind-out-file={}", out.0.display()))
            .args([BIN, "--listen", "127.0.0.1:0"])
            .args(args);
        Server::spawn(command)
    } else {
        Server::start(&args)
    };
    let wait = if callgrind { WAIT * 20 } else { WAIT };
    // The watcher is subscribed in every mode (so the topic always has a
    // subscriber and, with presence, a member); it asks for presence
    // frames in `Watched` mode only.
    let mut watcher = v1(&server, "watcher").await;
    let subscribe = if mode == Mode::Watched {
        json!({"type": "subscribe", "id": 1, "topic": "room", "presence": "full"})
    } else {
        json!({"type": "subscribe", "id": 1, "topic": "room"})
    };
    watcher
        .send(WsMessage::text(subscribe.to_string()))
        .await
        .expect("send");
    assert_eq!(next_json(&mut watcher, wait).await["type"], "ack");
    let reader = tokio::spawn(async move {
        // Keep reading so that the watcher is never a slow consumer.
        let mut frames = 0;
        while let Some(Ok(message)) = watcher.next().await {
            if let WsMessage::Text(text) = message
                && text.contains(r#""type":"presence""#)
            {
                frames += 1;
            }
        }
        frames
    });
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        clients.push(v1(&server, &format!("c{i}")).await);
    }
    let pid = server.proc.pid();
    if callgrind {
        // Counts from here: the start and the connections are the same
        // in every mode.
        callgrind_control(&["-z", &pid.to_string()]);
    }
    let before = cpu_ticks(pid);
    let runs: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(churn(c, rounds, wait)))
        .collect();
    for run in runs {
        tokio::time::timeout(Duration::from_secs(600), run)
            .await
            .expect("churn in time")
            .expect("churn task");
    }
    let ticks = cpu_ticks(pid) - before;
    let instructions = callgrind.then(|| {
        callgrind_control(&["-d", &pid.to_string()]);
        out.instructions()
    });
    // The last window's frame is at most one coalescing window away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(server);
    let frames = tokio::time::timeout(WAIT, reader)
        .await
        .expect("watcher ends with the server")
        .expect("watcher task");
    Phase {
        joins: CLIENTS * rounds,
        cpu_seconds: ticks as f64 / clock_ticks_per_second() as f64,
        instructions,
        frames,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The by-default run: every mode's churn is answered, and only the
/// watched mode sends presence frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_is_answered_in_every_mode() {
    for mode in Mode::ALL {
        let phase = phase(mode, SMOKE_ROUNDS, false).await;
        assert_eq!(phase.joins, CLIENTS * SMOKE_ROUNDS);
        if mode == Mode::Watched {
            assert!(phase.frames > 0, "the watcher got no presence frame");
        } else {
            assert_eq!(phase.frames, 0, "{}: presence frames unasked", mode.name());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: see the module doc for how to run it"]
async fn presence_cost_on_subscribe_churn() {
    if std::env::var_os("PRESENCE_COST_CALLGRIND").is_some() {
        let rounds = whole_batches(env_number("PRESENCE_COST_ROUNDS", CALLGRIND_ROUNDS));
        let mut counted = Vec::new();
        for mode in Mode::ALL {
            let phase = phase(mode, rounds, true).await;
            let instructions = phase.instructions.expect("callgrind counts");
            let per_pair = instructions as f64 / phase.joins as f64;
            println!(
                "{}: {instructions} instructions for {} pairs, {per_pair:.0} per pair, {} presence frames",
                mode.name(),
                phase.joins,
                phase.frames
            );
            counted.push(per_pair);
        }
        println!(
            "instructions over presence off: no watcher {:+.1} %, one full watcher {:+.1} %",
            (counted[1] / counted[0] - 1.0) * 100.0,
            (counted[2] / counted[0] - 1.0) * 100.0
        );
        return;
    }
    let rounds = whole_batches(env_number("PRESENCE_COST_ROUNDS", ROUNDS));
    let repeats = env_number("PRESENCE_COST_REPEATS", REPEATS).max(1);
    // rates[mode][repeat], joins per server CPU-second.
    let mut rates = [vec![], vec![], vec![]];
    for repeat in 0..repeats {
        // The order rotates so that no mode always runs first (after the
        // previous phase's server has just exited).
        for k in 0..3 {
            let m = (repeat + k) % 3;
            let phase = phase(Mode::ALL[m], rounds, false).await;
            let rate = phase.joins_per_cpu_second();
            println!(
                "repeat {repeat}: {:<28} {:>8.0} joins per CPU-second ({:.2} CPU-s, {} frames)",
                Mode::ALL[m].name(),
                rate,
                phase.cpu_seconds,
                phase.frames
            );
            rates[m].push(rate);
        }
    }
    // Overhead within each repeat (the phases of one repeat ran close in
    // time, under about the same load), then the median and spread.
    let overheads = |m: usize| -> Vec<f64> {
        (0..repeats)
            .map(|r| (rates[0][r] / rates[m][r] - 1.0) * 100.0)
            .collect()
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{} joins per phase, {repeats} repeats, load average now {}",
        CLIENTS * rounds,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    for m in 0..3 {
        let mut r = rates[m].clone();
        println!(
            "{:<28} median {:>8.0} joins per CPU-second (min {:.0}, max {:.0})",
            Mode::ALL[m].name(),
            median(&mut r),
            r[0],
            r[r.len() - 1]
        );
    }
    for m in 1..3 {
        let mut o = overheads(m);
        let mut medians = [rates[0].clone(), rates[m].clone()];
        let of_medians = (median(&mut medians[0]) / median(&mut medians[1]) - 1.0) * 100.0;
        println!(
            "{:<28} {:+.1} % CPU (median of per-repeat overheads; spread {:+.1} … {:+.1} %); ratio of medians {:+.1} %",
            Mode::ALL[m].name(),
            median(&mut o),
            o[0],
            o[o.len() - 1],
            of_medians
        );
    }
}
