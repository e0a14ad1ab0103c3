//! `fanout`: one publisher, N subscribers; every publish reaches all of them.
//!
//! Subscribers connect on `/ws?id=i` (i in `0..N`). The publisher sends M
//! publishes, each carrying the payload `{"t":<ns>,"seq":k,"pad":"…"}` padded
//! to `--size` bytes, by one of three routes:
//!
//! * `--via relay`: a relay frame `{"targets":[0,1,…,N-1],"payload":X}` on its
//!   own connection (`/ws?id=N`);
//! * `--via topic`: subscribers first send
//!   `{"type":"subscribe","topic":"bench"}`; the publisher sends
//!   `{"type":"publish","topic":"bench","payload":X}`;
//! * `--via api`: subscribers subscribe as for `topic`; the publisher sends
//!   `POST /api/publish` with `{"topic":"bench","payload":X}` over one
//!   keep-alive HTTP/1.1 connection; the reply `{"recipients":N}` is checked.
//!
//! At most `-k` publishes are outstanding (not yet received by every
//! subscriber). Probe publishes (sequence 0) are repeated before measuring
//! until every subscriber has seen one, so subscriptions are known to be in
//! place. The tool reports deliveries per second, the latency of every
//! delivery and the latency from publish to the last delivery of that publish.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Semaphore, watch};

use crate::common::{Phase, Progress, client_path, wait_until};
use crate::stats::{CpuUse, CpuWindow, Latency, Recorder, fmt_rate, new_histogram, now_ns};
use crate::ws::{self, FastRng, Message, WsUrl};

/// How the publisher reaches the subscribers.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Via {
    /// One relay frame listing every subscriber id as a target.
    Relay,
    /// Topic subscribe/publish frames on the WebSocket.
    Topic,
    /// `POST /api/publish`.
    Api,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Relay => "relay",
            Self::Topic => "topic",
            Self::Api => "api",
        })
    }
}

/// Options of the `fanout` workload.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct FanoutArgs {
    /// WebSocket endpoint; subscriber i connects to `<url>?id=i`. For
    /// `--via api` the same host and port receive `POST /api/publish`.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub(crate) url: String,
    /// Route of the publishes.
    #[arg(long, value_enum, default_value_t = Via::Relay)]
    pub(crate) via: Via,
    /// Number of subscribers.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub(crate) subscribers: usize,
    /// Number of measured publishes.
    #[arg(short = 'm', long, default_value_t = 100)]
    pub(crate) publishes: u32,
    /// Publishes outstanding at once (not yet delivered to everyone).
    #[arg(short = 'k', long, default_value_t = 1)]
    pub(crate) window: usize,
    /// Size of the payload JSON in bytes (padded).
    #[arg(short = 's', long, default_value_t = 100)]
    pub(crate) size: usize,
    /// Topic name for `--via topic` and `--via api`.
    #[arg(long, default_value = "bench")]
    pub(crate) topic: String,
    /// Seconds to wait for a stalled publish before moving on, and for the
    /// last deliveries at the end.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) drain: f64,
    /// PID of the server, to report deliveries per server CPU-second.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Concurrent handshakes while connecting.
    #[arg(long, default_value_t = 64)]
    pub(crate) connect_concurrency: usize,
}

/// Result of a `fanout` run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct FanoutReport {
    /// Always `"fanout"`.
    pub(crate) workload: String,
    /// Route of the publishes.
    pub(crate) via: Via,
    /// Subscribers requested.
    pub(crate) subscribers: usize,
    /// Connections that failed to open or broke during the run.
    pub(crate) connection_errors: usize,
    /// First error seen, if any.
    pub(crate) first_error: Option<String>,
    /// Measured publishes sent.
    pub(crate) publishes: u64,
    /// Payload size in bytes.
    pub(crate) size: usize,
    /// Deliveries expected (`publishes × subscribers`).
    pub(crate) expected: u64,
    /// Deliveries received.
    pub(crate) delivered: u64,
    /// `expected - delivered` after the drain period.
    pub(crate) lost: u64,
    /// Frames that could not be parsed or were duplicates.
    pub(crate) unexpected: u64,
    /// `/api/publish` replies whose `recipients` differed from N.
    pub(crate) recipient_mismatches: u64,
    /// Deliveries per second.
    pub(crate) deliveries_per_sec: f64,
    /// Deliveries per server CPU-second.
    pub(crate) deliveries_per_server_cpu_sec: Option<f64>,
    /// Latency of each delivery.
    pub(crate) latency: Latency,
    /// Latency from publish to its last delivery.
    pub(crate) last_delivery: Latency,
    /// CPU use in the window.
    pub(crate) cpu: CpuUse,
    /// True when every subscriber received every publish exactly once.
    pub(crate) ok: bool,
}

impl FanoutReport {
    /// Prints the human-readable summary.
    pub(crate) fn print(&self) {
        println!(
            "fanout via {}: {} subscribers, {} publishes of {} B",
            self.via, self.subscribers, self.publishes, self.size
        );
        println!(
            "  expected {} delivered {} lost {} unexpected {} recipient mismatches {} connection errors {}",
            self.expected,
            self.delivered,
            self.lost,
            self.unexpected,
            self.recipient_mismatches,
            self.connection_errors
        );
        if let Some(e) = &self.first_error {
            println!("  first error: {e}");
        }
        println!("  {} deliveries/s", fmt_rate(self.deliveries_per_sec));
        if let Some(x) = self.deliveries_per_server_cpu_sec {
            println!("  {} deliveries per server CPU-second", fmt_rate(x));
        }
        println!("  each delivery: {}", self.latency.line());
        println!("  last delivery: {}", self.last_delivery.line());
        println!("  {}", self.cpu.line());
    }
}

#[derive(Deserialize)]
struct Payload {
    t: u64,
    seq: u64,
}

struct Shared {
    /// Deliveries still missing, per publish (index `seq - 1`).
    remaining: Vec<AtomicU32>,
    /// Per subscriber, per publish: received already (duplicate detection).
    seen: Vec<Vec<AtomicBool>>,
    probe_seen: Vec<AtomicBool>,
    probes_missing: AtomicUsize,
    delivered: AtomicU64,
    unexpected: AtomicU64,
    window: Semaphore,
    each: Recorder,
    last: Mutex<hdrhistogram::Histogram<u64>>,
}

/// Runs the workload.
pub(crate) async fn run(args: &FanoutArgs) -> Result<FanoutReport> {
    ensure!(args.subscribers > 0, "--subscribers must be at least 1");
    ensure!(args.window > 0, "--window must be at least 1");
    let url = WsUrl::parse(&args.url)?;
    let n = args.subscribers;
    let m = args.publishes as usize;
    let shared = Arc::new(Shared {
        remaining: (0..m).map(|_| AtomicU32::new(n as u32)).collect(),
        seen: (0..n)
            .map(|_| (0..m).map(|_| AtomicBool::new(false)).collect())
            .collect(),
        probe_seen: (0..n).map(|_| AtomicBool::new(false)).collect(),
        probes_missing: AtomicUsize::new(n),
        delivered: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        window: Semaphore::new(args.window),
        each: Recorder::new(8),
        last: Mutex::new(new_histogram()),
    });
    let progress = Arc::new(Progress::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let connect_limit = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let subscribe = (args.via != Via::Relay)
        .then(|| serde_json::json!({"type": "subscribe", "topic": args.topic}).to_string());

    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let url = url.with_path(&client_path(&url.path, i));
        let (shared, progress, phase_rx, connect_limit, subscribe) = (
            shared.clone(),
            progress.clone(),
            phase_rx.clone(),
            connect_limit.clone(),
            subscribe.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let conn = {
                let _permit = connect_limit.acquire().await;
                ws::connect(&url, None, 8 * 1024).await
            };
            let result = match conn {
                Ok((stream, reader)) => {
                    progress.connected();
                    subscriber(i, stream, reader, &shared, subscribe, phase_rx).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = &result {
                progress.failed(e);
            }
        }));
    }

    let (connected, failed) = progress.wait_for(n, Duration::from_secs(120)).await;
    let outcome = async {
        if connected < n {
            bail!(
                "only {connected} of {n} subscribers connected ({failed} failed): {}",
                progress.first_error().unwrap_or_default()
            );
        }
        let _ = phase_tx.send(Phase::Probe);
        let mut publisher = Publisher::connect(args, &url, n).await?;
        publish_loop(args, &mut publisher, &shared, &progress).await
    }
    .await;
    let _ = phase_tx.send(Phase::Shutdown);
    for t in tasks {
        let _ = t.await;
    }
    let (published, recipient_mismatches, cpu) = outcome?;

    let expected = published * n as u64;
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let unexpected = shared.unexpected.load(Ordering::Relaxed);
    let (_, errors) = progress.counts();
    let lost = expected.saturating_sub(delivered);
    let last = Latency::from_histogram(&shared.last.lock());
    Ok(FanoutReport {
        workload: "fanout".into(),
        via: args.via,
        subscribers: n,
        connection_errors: errors,
        first_error: progress.first_error(),
        publishes: published,
        size: args.size,
        expected,
        delivered,
        lost,
        unexpected,
        recipient_mismatches,
        deliveries_per_sec: delivered as f64 / cpu.wall_secs.max(1e-9),
        deliveries_per_server_cpu_sec: cpu.per_server_cpu_sec(delivered),
        latency: Latency::from_histogram(&shared.each.merged()),
        last_delivery: last,
        cpu,
        ok: errors == 0
            && lost == 0
            && unexpected == 0
            && recipient_mismatches == 0
            && published > 0,
    })
}

/// Sends the probes, then the measured publishes; returns the number of
/// publishes, `/api/publish` recipient mismatches, and the CPU window.
async fn publish_loop(
    args: &FanoutArgs,
    publisher: &mut Publisher,
    shared: &Shared,
    progress: &Progress,
) -> Result<(u64, u64, CpuUse)> {
    let n = args.subscribers;
    let mut mismatches = 0u64;
    let probe_deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while shared.probes_missing.load(Ordering::Relaxed) > 0 {
        if tokio::time::Instant::now() >= probe_deadline {
            bail!(
                "{} of {n} subscribers never received a probe publish (via {}): does the server support it?",
                shared.probes_missing.load(Ordering::Relaxed),
                args.via
            );
        }
        if progress.counts().1 > 0 {
            bail!(
                "a subscriber failed: {}",
                progress.first_error().unwrap_or_default()
            );
        }
        publisher.publish(args, 0).await?;
        wait_until(Duration::from_millis(200), || {
            shared.probes_missing.load(Ordering::Relaxed) == 0
        })
        .await;
    }

    let window = CpuWindow::start(args.server_pid);
    let stall = Duration::from_secs_f64(args.drain);
    let mut published = 0u64;
    for seq in 1..=u64::from(args.publishes) {
        // When a publish is stalled (deliveries lost), move on without a
        // permit; the loss is reported at the end.
        if let Ok(Ok(p)) = tokio::time::timeout(stall, shared.window.acquire()).await {
            p.forget();
        }
        if let Some(recipients) = publisher.publish(args, seq).await?
            && recipients != n as u64
        {
            mismatches += 1;
        }
        published += 1;
        if progress.counts().1 > 0 {
            break;
        }
    }
    let expected = published * n as u64;
    wait_until(stall, || {
        shared.delivered.load(Ordering::Relaxed) >= expected || progress.counts().1 > 0
    })
    .await;
    Ok((published, mismatches, window.finish()))
}

/// The payload JSON of publish `seq`, padded to about `size` bytes.
fn payload_json(seq: u64, size: usize) -> String {
    let mut s = String::with_capacity(size + 16);
    let _ = write!(s, r#"{{"t":{},"seq":{seq},"pad":""#, now_ns());
    let pad = size.saturating_sub(s.len() + 2);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

enum Publisher {
    Ws {
        writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
        reader: tokio::task::JoinHandle<()>,
        rng: FastRng,
        targets: String,
    },
    Api {
        sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        host: String,
    },
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Self::Ws { reader, .. } = self {
            reader.abort();
        }
    }
}

impl Publisher {
    async fn connect(args: &FanoutArgs, url: &WsUrl, n: usize) -> Result<Self> {
        if args.via == Via::Api {
            let stream = TcpStream::connect(url.addr)
                .await
                .context("connecting for /api/publish")?;
            stream.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .context("HTTP handshake")?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return Ok(Self::Api {
                sender,
                host: url.host_header.clone(),
            });
        }
        let pub_url = url.with_path(&client_path(&url.path, n));
        let (stream, mut reader) = ws::connect(&pub_url, None, 4096)
            .await
            .context("connecting the publisher")?;
        let (mut rd, wr) = stream.into_split();
        let writer = Arc::new(tokio::sync::Mutex::new(wr));
        let pong_writer = writer.clone();
        // Discard whatever the server sends the publisher, answering pings.
        let reader = tokio::spawn(async move {
            let mut rng = FastRng::new(7);
            let mut out = Vec::new();
            while reader.fill(&mut rd).await.is_ok() {
                while let Ok(Some(msg)) = reader.next_message() {
                    if let Message::Ping(p) = msg {
                        ws::encode_frame(&mut out, Message::PONG, p, rng.next_u64() as u32);
                    }
                }
                if !out.is_empty() {
                    let _ = pong_writer.lock().await.write_all(&out).await;
                    out.clear();
                }
            }
        });
        let mut targets = String::with_capacity(n * 6);
        for i in 0..n {
            if i > 0 {
                targets.push(',');
            }
            let _ = write!(targets, "{i}");
        }
        Ok(Self::Ws {
            writer,
            reader,
            rng: FastRng::new(n as u64),
            targets,
        })
    }

    /// Publishes `seq`; for the API returns the reported recipient count.
    async fn publish(&mut self, args: &FanoutArgs, seq: u64) -> Result<Option<u64>> {
        let payload = payload_json(seq, args.size);
        match self {
            Self::Ws {
                writer,
                rng,
                targets,
                ..
            } => {
                let frame = match args.via {
                    Via::Relay => format!(r#"{{"targets":[{targets}],"payload":{payload}}}"#),
                    _ => format!(
                        r#"{{"type":"publish","topic":{},"payload":{payload}}}"#,
                        serde_json::to_string(&args.topic)?
                    ),
                };
                let mut out = Vec::with_capacity(frame.len() + 14);
                ws::encode_frame(
                    &mut out,
                    ws::OP_TEXT,
                    frame.as_bytes(),
                    rng.next_u64() as u32,
                );
                writer
                    .lock()
                    .await
                    .write_all(&out)
                    .await
                    .context("sending a publish")?;
                Ok(None)
            }
            Self::Api { sender, host } => {
                let body = format!(
                    r#"{{"topic":{},"payload":{payload}}}"#,
                    serde_json::to_string(&args.topic)?
                );
                let req = http::Request::post("/api/publish")
                    .header(http::header::HOST, host.as_str())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                sender.ready().await.context("HTTP connection closed")?;
                let resp = sender
                    .send_request(req)
                    .await
                    .context("POST /api/publish")?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                ensure!(
                    status.is_success(),
                    "POST /api/publish returned {status}: {}",
                    String::from_utf8_lossy(&body)
                );
                let v: serde_json::Value =
                    serde_json::from_slice(&body).context("parsing /api/publish reply")?;
                let recipients = v
                    .get("recipients")
                    .and_then(serde_json::Value::as_u64)
                    .ok_or_else(|| anyhow!("/api/publish reply lacks recipients: {v}"))?;
                Ok(Some(recipients))
            }
        }
    }
}

async fn subscriber(
    i: usize,
    mut stream: TcpStream,
    mut reader: ws::FrameReader,
    shared: &Shared,
    subscribe: Option<String>,
    mut phase_rx: watch::Receiver<Phase>,
) -> Result<()> {
    let mut rng = FastRng::new(i as u64);
    let mut out = Vec::with_capacity(256);
    let mut latencies = Vec::with_capacity(64);
    if let Some(frame) = &subscribe {
        ws::encode_frame(
            &mut out,
            ws::OP_TEXT,
            frame.as_bytes(),
            rng.next_u64() as u32,
        );
        stream.write_all(&out).await?;
        out.clear();
    }
    let seen = &shared.seen[i];
    loop {
        if *phase_rx.borrow_and_update() == Phase::Shutdown {
            break;
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
                    let Ok(p) = serde_json::from_slice::<Payload>(payload) else {
                        // Acknowledgements or other frames the server may send.
                        continue;
                    };
                    if p.seq == 0 {
                        if !shared.probe_seen[i].swap(true, Ordering::Relaxed) {
                            shared.probes_missing.fetch_sub(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    let idx = (p.seq - 1) as usize;
                    let Some(flag) = seen.get(idx) else {
                        shared.unexpected.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if flag.swap(true, Ordering::Relaxed) {
                        shared.unexpected.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
                    let latency = now.saturating_sub(p.t);
                    latencies.push(latency);
                    if shared.remaining[idx].fetch_sub(1, Ordering::AcqRel) == 1 {
                        shared.last.lock().saturating_record(latency.max(1));
                        shared.window.add_permits(1);
                    }
                }
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if latencies.len() >= 64 {
            shared.each.record_all(i, &latencies);
            latencies.clear();
        }
    }
    shared.each.record_all(i, &latencies);
    ws::send_close(&mut stream, &mut rng).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::payload_json;

    #[test]
    fn payload_is_padded_json() -> anyhow::Result<()> {
        let p = payload_json(5, 100);
        assert_eq!(p.len(), 100);
        let v: serde_json::Value = serde_json::from_str(&p)?;
        assert_eq!(v["seq"], 5);
        Ok(())
    }
}
