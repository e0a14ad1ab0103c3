//! `relay`: N clients on `/ws?id=i` sending to pseudo-random peers.
//!
//! Client `i` sends text frames
//! `{"targets":[j],"payload":{"t":<send ns>,"from":i,"seq":k}}`; the server
//! must deliver `{"t":…,"from":i,"seq":k}` (the JSON of the payload) to the
//! connection registered as `j`. The peer `j` is a hash of `(i, k)`, so the
//! receiver can check that a message reached the peer it was meant for.
//!
//! The loop is closed: each client has at most K messages in flight; a
//! delivery observed by the receiver returns a permit to the sender. Before
//! measuring, every client sends probe messages (sequence 0) to its neighbour
//! until one arrives, which proves that every client is registered. After the
//! window, senders stop and the tool waits (the drain period) until every sent
//! message has been delivered; whatever is missing then is reported as lost.
//!
//! Several `--url`s (the nodes of a cluster) spread the clients round-robin:
//! client i connects to URL `i mod nodes`. With 3 nodes about two thirds of
//! the messages then cross nodes; deliveries and latency are also reported
//! separately for messages whose sender and receiver are on different nodes.
//! `--server-pid` may be repeated (every node, and Redis): their CPU times
//! add up to the "server" CPU.
//!
//! `--rate R` opens the loop: instead of waiting for deliveries, the clients
//! send R messages per second in all, each client every `clients / R`
//! seconds on its own evenly spaced schedule (client i starts `i / R` s into
//! the window), whatever the server answers. A message carries the time it
//! was *due*, not the time it went out, so a load generator or server that
//! falls behind shows in the latency instead of hiding it (no coordinated
//! omission). `--inflight` is then unused; the window still bounds what is
//! sent (R × duration). `compare` uses it for the latency at half of each
//! server's maximum rate.
//!
//! `--protocol v1` runs the same exchange over `switchboard.v1`: each
//! client offers the subprotocol and says `hello`, sends
//! `{"type":"send","id":k,"targets":[j],"payload":…}` and reads an `ack`
//! per send besides the `msg` envelopes it receives, so the figure includes
//! the per-target report, the sequence number and the inbox every v1
//! message is retained in.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, watch};

use crate::common::{Phase, Progress, client_path, wait_until};
use crate::stats::{CpuUse, CpuWindow, Latency, Recorder, fmt_rate, now_ns};
use crate::ws::{self, FastRng, Message, WsUrl, splitmix};

/// Options of the `relay` workload.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct RelayArgs {
    /// Relay endpoint; client i connects to `<url>?id=i` (or substitutes
    /// `{i}` in the URL). Repeat it (or separate with commas) to spread the
    /// clients round-robin over several nodes.
    #[arg(
        long = "url",
        default_value = "ws://127.0.0.1:8080/ws",
        value_delimiter = ','
    )]
    pub(crate) urls: Vec<String>,
    /// Number of clients.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub(crate) clients: usize,
    /// Messages in flight per client (not yet delivered).
    #[arg(short = 'k', long, default_value_t = 4)]
    pub(crate) inflight: usize,
    /// Length of the measured window in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration: f64,
    /// Seconds to wait for in-flight messages after the window.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) drain: f64,
    /// PID of the server, to report deliveries per server CPU-second;
    /// repeat it for a server made of several processes (cluster nodes and
    /// Redis): their CPU times add up.
    #[arg(long = "server-pid", value_delimiter = ',')]
    pub(crate) server_pids: Vec<u32>,
    /// Concurrent handshakes while connecting.
    #[arg(long, default_value_t = 64)]
    pub(crate) connect_concurrency: usize,
    /// Open loop: send this many messages per second in all, evenly spread
    /// over the clients and over time, instead of keeping `--inflight`
    /// messages undelivered per client.
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// The client protocol: `plain` (the relay frame) or `v1`
    /// (`switchboard.v1`: hello, sends with ids, acks, envelopes).
    #[arg(long, value_enum, default_value_t = Protocol::Plain)]
    pub(crate) protocol: Protocol,
}

/// Which client protocol the relay clients speak.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Protocol {
    /// `{"targets":[j],"payload":…}` in, the payload's JSON out.
    #[default]
    Plain,
    /// `switchboard.v1`.
    V1,
}

/// Result of a `relay` run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RelayReport {
    /// Always `"relay"`.
    pub(crate) workload: String,
    /// The client protocol.
    #[serde(default)]
    pub(crate) protocol: Protocol,
    /// With `v1`: acks received (one per send is expected).
    #[serde(default)]
    pub(crate) acks: u64,
    /// Clients requested.
    pub(crate) clients: usize,
    /// Number of URLs (nodes) the clients were spread over.
    #[serde(default = "one")]
    pub(crate) nodes: usize,
    /// Connections that failed to open or broke during the run.
    pub(crate) connection_errors: usize,
    /// First error seen, if any.
    pub(crate) first_error: Option<String>,
    /// Messages in flight per client.
    pub(crate) inflight: usize,
    /// With `--rate`: the offered rate (messages per second, all clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) offered_rate: Option<f64>,
    /// Messages sent in the window.
    pub(crate) sent: u64,
    /// Messages delivered (by the end of the drain period).
    pub(crate) delivered: u64,
    /// `sent - delivered` after the drain period.
    pub(crate) lost: u64,
    /// Deliveries beyond what was sent (duplicates).
    pub(crate) duplicated: u64,
    /// Deliveries that reached a client other than the target.
    pub(crate) misdelivered: u64,
    /// Frames that could not be parsed as a relay payload.
    pub(crate) unparsable: u64,
    /// Messages sent per second.
    pub(crate) sent_per_sec: f64,
    /// Deliveries per second.
    pub(crate) delivered_per_sec: f64,
    /// Deliveries per server CPU-second.
    pub(crate) delivered_per_server_cpu_sec: Option<f64>,
    /// One-way latency (send to delivery).
    pub(crate) latency: Latency,
    /// With several nodes: deliveries whose sender was on another node.
    #[serde(default)]
    pub(crate) cross_node_delivered: u64,
    /// With several nodes: latency of the cross-node deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cross_node_latency: Option<Latency>,
    /// With several nodes: latency of deliveries within one node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) same_node_latency: Option<Latency>,
    /// CPU use in the window (including the drain).
    pub(crate) cpu: CpuUse,
    /// With several `--server-pid`s: each one's CPU seconds in the window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) server_cpu_secs_by_pid: Vec<(u32, f64)>,
    /// True when nothing was lost, duplicated or misdelivered and no
    /// connection failed.
    pub(crate) ok: bool,
}

fn one() -> usize {
    1
}

impl RelayReport {
    /// Prints the human-readable summary.
    pub(crate) fn print(&self) {
        println!(
            "relay{}: {} clients{}, {} in flight each",
            if self.protocol == Protocol::V1 {
                " (switchboard.v1)"
            } else {
                ""
            },
            self.clients,
            if self.nodes > 1 {
                format!(" spread over {} nodes", self.nodes)
            } else {
                String::new()
            },
            self.inflight
        );
        if let Some(rate) = self.offered_rate {
            println!("  open loop: {} messages/s offered", fmt_rate(rate));
        }
        println!(
            "  sent {} delivered {} lost {} duplicated {} misdelivered {} unparsable {} connection errors {}",
            self.sent,
            self.delivered,
            self.lost,
            self.duplicated,
            self.misdelivered,
            self.unparsable,
            self.connection_errors
        );
        if let Some(e) = &self.first_error {
            println!("  first error: {e}");
        }
        if self.protocol == Protocol::V1 {
            println!("  acks {}", self.acks);
        }
        println!(
            "  {} sent/s, {} delivered/s",
            fmt_rate(self.sent_per_sec),
            fmt_rate(self.delivered_per_sec)
        );
        if let Some(x) = self.delivered_per_server_cpu_sec {
            println!("  {} deliveries per server CPU-second", fmt_rate(x));
        }
        println!("  one way: {}", self.latency.line());
        if let (Some(cross), Some(same)) = (&self.cross_node_latency, &self.same_node_latency) {
            println!(
                "  cross-node deliveries {} ({:.0}%)",
                self.cross_node_delivered,
                self.cross_node_delivered as f64 * 100.0 / self.delivered.max(1) as f64
            );
            println!("  one way, cross-node: {}", cross.line());
            println!("  one way, same node:  {}", same.line());
        }
        println!("  {}", self.cpu.line());
        if self.server_cpu_secs_by_pid.len() > 1 {
            let parts: Vec<String> = self
                .server_cpu_secs_by_pid
                .iter()
                .map(|(pid, secs)| format!("pid {pid} {secs:.2}s"))
                .collect();
            println!("  server CPU by process: {}", parts.join(", "));
        }
    }
}

/// The payload the server delivers.
#[derive(Deserialize)]
struct Delivery {
    t: u64,
    from: usize,
    seq: u64,
}

/// A `switchboard.v1` frame from the server: a `msg` envelope carries the
/// payload; `welcome` and `ack` are counted or skipped.
#[derive(Deserialize)]
struct V1Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    payload: Option<Delivery>,
}

struct Shared {
    clients: usize,
    nodes: usize,
    permits: Vec<Semaphore>,
    probe_seen: Vec<AtomicBool>,
    probes_missing: AtomicUsize,
    sent: AtomicU64,
    delivered: AtomicU64,
    misdelivered: AtomicU64,
    unparsable: AtomicU64,
    cross_node: AtomicU64,
    acks: AtomicU64,
    protocol: Protocol,
    /// With `--rate`: seconds between two sends of one client.
    send_interval: Option<Duration>,
    recorder: Recorder,
    /// With several nodes: cross-node and same-node latencies.
    cross_recorder: Recorder,
    same_recorder: Recorder,
}

/// The peer that message `seq` of client `from` goes to (never `from` itself
/// when there are at least two clients).
fn target_of(from: usize, seq: u64, clients: usize) -> usize {
    if clients < 2 {
        return 0;
    }
    let h = splitmix(((from as u64) << 32) ^ seq);
    let j = (h % (clients as u64 - 1)) as usize;
    if j >= from { j + 1 } else { j }
}

/// Runs the workload.
pub(crate) async fn run(args: &RelayArgs) -> Result<RelayReport> {
    if args.clients == 0 || args.inflight == 0 {
        bail!("--clients and --inflight must be at least 1");
    }
    if args.urls.is_empty() {
        bail!("give at least one --url");
    }
    let send_interval = match args.rate {
        Some(rate) if !(rate.is_finite() && rate > 0.0) => {
            bail!("--rate {rate}: give a positive number of messages per second")
        }
        Some(rate) => Some(Duration::from_secs_f64(args.clients as f64 / rate)),
        None => None,
    };
    let urls = args
        .urls
        .iter()
        .map(|u| WsUrl::parse(u))
        .collect::<Result<Vec<_>>>()?;
    let nodes = urls.len();
    let n = args.clients;
    let shared = Arc::new(Shared {
        clients: n,
        nodes,
        permits: (0..n).map(|_| Semaphore::new(args.inflight)).collect(),
        probe_seen: (0..n).map(|_| AtomicBool::new(false)).collect(),
        probes_missing: AtomicUsize::new(n),
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        misdelivered: AtomicU64::new(0),
        unparsable: AtomicU64::new(0),
        cross_node: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        protocol: args.protocol,
        send_interval,
        recorder: Recorder::new(8),
        cross_recorder: Recorder::new(8),
        same_recorder: Recorder::new(8),
    });
    let progress = Arc::new(Progress::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let connect_limit = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));

    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let node = &urls[i % nodes];
        let url = node.with_path(&client_path(&node.path, i));
        let (shared, progress, phase_rx, connect_limit) = (
            shared.clone(),
            progress.clone(),
            phase_rx.clone(),
            connect_limit.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let conn = {
                let _permit = connect_limit.acquire().await;
                match shared.protocol {
                    Protocol::Plain => ws::connect(&url, None, 16 * 1024).await,
                    Protocol::V1 => {
                        let offer = ws::Offer {
                            protocol: Some("switchboard.v1"),
                            ..ws::Offer::default()
                        };
                        ws::connect_with(&url, None, 16 * 1024, offer)
                            .await
                            .map(|(stream, reader, _)| (stream, reader))
                    }
                }
            };
            let result = match conn {
                Ok((stream, reader)) => {
                    progress.connected();
                    client(i, stream, reader, &shared, phase_rx).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = &result {
                progress.failed(e);
            }
        }));
    }

    let (connected, failed) = progress.wait_for(n, Duration::from_secs(60)).await;
    if connected < n {
        let _ = phase_tx.send(Phase::Shutdown);
        bail!(
            "only {connected} of {n} clients connected ({failed} failed): {}",
            progress.first_error().unwrap_or_default()
        );
    }
    let _ = phase_tx.send(Phase::Probe);
    let probed = wait_until(Duration::from_secs(15), || {
        shared.probes_missing.load(Ordering::Relaxed) == 0
    })
    .await;
    if !probed {
        let _ = phase_tx.send(Phase::Shutdown);
        bail!(
            "{} of {n} clients never received a probe message: does the server relay on {}?",
            shared.probes_missing.load(Ordering::Relaxed),
            urls[0].path_only()
        );
    }

    let window = CpuWindow::start_many(args.server_pids.clone());
    let _ = phase_tx.send(Phase::Run);
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let _ = phase_tx.send(Phase::Drain);
    let send_window = window.finish().wall_secs;
    wait_until(Duration::from_secs_f64(args.drain), || {
        shared.delivered.load(Ordering::Relaxed) >= shared.sent.load(Ordering::Relaxed)
            || progress.counts().1 > 0
    })
    .await;
    let (cpu, server_cpu_secs_by_pid) = window.finish_by_pid();
    let _ = phase_tx.send(Phase::Shutdown);
    for t in tasks {
        let _ = t.await;
    }

    let sent = shared.sent.load(Ordering::Relaxed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let misdelivered = shared.misdelivered.load(Ordering::Relaxed);
    let unparsable = shared.unparsable.load(Ordering::Relaxed);
    let split = |r: &Recorder| (nodes > 1).then(|| Latency::from_histogram(&r.merged()));
    let (_, errors) = progress.counts();
    let lost = sent.saturating_sub(delivered);
    let duplicated = delivered.saturating_sub(sent);
    Ok(RelayReport {
        workload: "relay".into(),
        protocol: args.protocol,
        acks: shared.acks.load(Ordering::Relaxed),
        clients: n,
        nodes,
        connection_errors: errors,
        first_error: progress.first_error(),
        inflight: args.inflight,
        offered_rate: args.rate,
        sent,
        delivered,
        lost,
        duplicated,
        misdelivered,
        unparsable,
        sent_per_sec: sent as f64 / send_window.max(1e-9),
        delivered_per_sec: delivered as f64 / cpu.wall_secs.max(1e-9),
        delivered_per_server_cpu_sec: cpu.per_server_cpu_sec(delivered),
        latency: Latency::from_histogram(&shared.recorder.merged()),
        cross_node_delivered: shared.cross_node.load(Ordering::Relaxed),
        cross_node_latency: split(&shared.cross_recorder),
        same_node_latency: split(&shared.same_recorder),
        cpu,
        server_cpu_secs_by_pid,
        ok: errors == 0
            && (args.protocol == Protocol::Plain || shared.acks.load(Ordering::Relaxed) >= sent)
            && lost == 0
            && duplicated == 0
            && misdelivered == 0
            && unparsable == 0
            && sent > 0,
    })
}

fn push_message(
    out: &mut Vec<u8>,
    text: &mut String,
    rng: &mut FastRng,
    protocol: Protocol,
    (i, seq, n): (usize, u64, usize),
    sent_at_ns: u64,
) {
    let j = if seq == 0 {
        (i + 1) % n
    } else {
        target_of(i, seq, n)
    };
    text.clear();
    if protocol == Protocol::V1 {
        let _ = write!(text, r#"{{"type":"send","id":{seq},"#);
    } else {
        text.push('{');
    }
    let _ = write!(
        text,
        r#""targets":[{j}],"payload":{{"t":{sent_at_ns},"from":{i},"seq":{seq}}}}}"#
    );
    ws::encode_frame(out, ws::OP_TEXT, text.as_bytes(), rng.next_u64() as u32);
}

async fn client(
    i: usize,
    mut stream: tokio::net::TcpStream,
    mut reader: ws::FrameReader,
    shared: &Shared,
    mut phase_rx: watch::Receiver<Phase>,
) -> Result<()> {
    let n = shared.clients;
    let mut rng = FastRng::new(i as u64);
    let mut out = Vec::with_capacity(1024);
    let mut text = String::with_capacity(128);
    let mut latencies = Vec::with_capacity(256);
    // With several nodes: (cross-node, same-node) latencies.
    let mut split = (Vec::with_capacity(256), Vec::with_capacity(256));
    let nodes = shared.nodes;
    let mut seq = 0u64;
    let mut next_probe = Instant::now();
    let permits = &shared.permits[i];
    let protocol = shared.protocol;
    let interval = shared.send_interval;
    // The open loop's schedule starts when the window opens; client i is
    // offset by i/n of an interval so that sends spread evenly.
    let mut next_send = Instant::now();
    let mut schedule_started = false;
    if protocol == Protocol::V1 {
        ws::encode_frame(
            &mut out,
            ws::OP_TEXT,
            br#"{"type":"hello"}"#,
            rng.next_u64() as u32,
        );
    }

    loop {
        let phase = *phase_rx.borrow_and_update();
        if phase == Phase::Shutdown {
            break;
        }
        let probing = phase == Phase::Probe && !shared.probe_seen[i].load(Ordering::Relaxed);
        let running = phase == Phase::Run;
        if running
            && !schedule_started
            && let Some(interval) = interval
        {
            schedule_started = true;
            next_send = Instant::now() + interval.mul_f64(i as f64 / n as f64);
        }
        tokio::select! {
            biased;
            changed = phase_rx.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            r = reader.fill(&mut stream) => {
                r?;
                let now = now_ns();
                while let Some(msg) = reader.next_message()? {
                    let payload = match msg {
                        Message::Text(p) | Message::Binary(p) => p,
                        Message::Ping(p) => {
                            ws::encode_frame(&mut out, Message::PONG, p, rng.next_u64() as u32);
                            continue;
                        }
                        Message::Pong => continue,
                        Message::Close => bail!("server closed the connection"),
                    };
                    let parsed = match protocol {
                        Protocol::Plain => serde_json::from_slice::<Delivery>(payload).ok(),
                        Protocol::V1 => match serde_json::from_slice::<V1Frame<'_>>(payload) {
                            Ok(V1Frame { kind: "msg", payload }) => payload,
                            Ok(V1Frame { kind: "ack", .. }) => {
                                shared.acks.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Ok(V1Frame { kind: "welcome", .. }) => continue,
                            _ => None,
                        },
                    };
                    let Some(d) = parsed else {
                        shared.unparsable.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if d.from >= n {
                        shared.unparsable.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if d.seq == 0 {
                        if !shared.probe_seen[d.from].swap(true, Ordering::Relaxed) {
                            shared.probes_missing.fetch_sub(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    if target_of(d.from, d.seq, n) != i {
                        shared.misdelivered.fetch_add(1, Ordering::Relaxed);
                    }
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
                    let latency = now.saturating_sub(d.t);
                    latencies.push(latency);
                    if nodes > 1 {
                        if d.from % nodes == i % nodes {
                            split.1.push(latency);
                        } else {
                            shared.cross_node.fetch_add(1, Ordering::Relaxed);
                            split.0.push(latency);
                        }
                    }
                    if shared.send_interval.is_none() {
                        shared.permits[d.from].add_permits(1);
                    }
                }
            }
            _ = tokio::time::sleep_until(next_send.into()), if running && interval.is_some() => {
                // Open loop: every message that is due by now, each stamped
                // with the time it was due.
                let interval = interval.unwrap_or(Duration::MAX);
                let now = Instant::now();
                let mut batch = 0;
                while next_send <= now {
                    seq += 1;
                    let late_ns = now.duration_since(next_send).as_nanos() as u64;
                    let due_ns = now_ns().saturating_sub(late_ns);
                    push_message(&mut out, &mut text, &mut rng, protocol, (i, seq, n), due_ns);
                    next_send += interval;
                    batch += 1;
                }
                shared.sent.fetch_add(batch, Ordering::Relaxed);
            }
            permit = permits.acquire(), if running && interval.is_none() => {
                if let Ok(p) = permit {
                    p.forget();
                    let mut batch = 1;
                    while let Ok(p) = permits.try_acquire() {
                        p.forget();
                        batch += 1;
                    }
                    for _ in 0..batch {
                        seq += 1;
                        push_message(&mut out, &mut text, &mut rng, protocol, (i, seq, n), now_ns());
                    }
                    shared.sent.fetch_add(batch, Ordering::Relaxed);
                }
            }
            _ = tokio::time::sleep_until(next_probe.into()), if probing => {
                push_message(&mut out, &mut text, &mut rng, protocol, (i, 0, n), now_ns());
                next_probe = Instant::now() + Duration::from_millis(100);
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if latencies.len() >= 256 {
            shared.recorder.record_all(i, &latencies);
            latencies.clear();
            shared.cross_recorder.record_all(i, &split.0);
            split.0.clear();
            shared.same_recorder.record_all(i, &split.1);
            split.1.clear();
        }
    }
    shared.recorder.record_all(i, &latencies);
    shared.cross_recorder.record_all(i, &split.0);
    shared.same_recorder.record_all(i, &split.1);
    ws::send_close(&mut stream, &mut rng).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Protocol, RelayArgs, run, target_of};

    #[test]
    fn refuses_a_rate_that_is_not_positive() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for rate in [0.0, -5.0, f64::NAN, f64::INFINITY] {
            let args = RelayArgs {
                urls: vec!["ws://127.0.0.1:9/ws".into()],
                clients: 2,
                inflight: 1,
                duration: 0.1,
                drain: 0.1,
                server_pids: Vec::new(),
                connect_concurrency: 1,
                rate: Some(rate),
                protocol: Protocol::Plain,
            };
            let err = rt.block_on(run(&args)).err().map(|e| e.to_string());
            let err = err.unwrap_or_default();
            assert!(
                err.contains("--rate") && err.contains("positive number of messages per second"),
                "rate {rate}: {err}"
            );
        }
    }

    #[test]
    fn targets_are_peers_and_spread() {
        let mut hits = [0u32; 10];
        for seq in 1..10_000 {
            let j = target_of(3, seq, 10);
            assert_ne!(j, 3);
            hits[j] += 1;
        }
        assert_eq!(hits[3], 0);
        assert!(hits.iter().enumerate().all(|(j, &h)| j == 3 || h > 900));
    }
}
