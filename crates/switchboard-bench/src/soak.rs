//! `soak`: keep N connections churning for a bounded time and check that the
//! server's memory returns to its baseline afterwards (issue #3).
//!
//! The N connections are N/2 *pairs*. Each pair runs cycles until the
//! deadline: connect `a` and `b` to `/ws?id=…` with fresh IDs
//! (`soak<pair>.<cycle>a` / `…b`), send M relay messages each way
//! (`{"targets":["<peer>"],"payload":{"p":pair,"c":cycle,"k":k,"s":"a"}}`),
//! check that each side received exactly its peer's M payloads, byte for
//! byte and in order, stay idle for a random time (uniform in 0 … 2 ×
//! `--idle-ms`), then close each side either politely (close frame 1000,
//! then read until the server's close frame and its FIN) or abruptly
//! (`SO_LINGER` 0 and drop: the kernel sends a RST), `--rst-percent` of the
//! sides abruptly. Then the pair starts its next cycle with new IDs.
//!
//! Before measuring, a warm-up round opens all N connections at once (every
//! pair connects, waits for all the others, then exchanges and closes), and
//! the tool waits until `GET /api/connections` shows `connections_open` 0:
//! the server's `VmRSS` then is the **baseline** (its allocator has already
//! grown to N connections). During the churn a sampler reads `VmRSS` every
//! second (the **peak** is the largest sample). After the deadline the pairs
//! finish their current cycle, the tool waits again for `connections_open`
//! 0, lets the server settle and reads the **end** RSS.
//!
//! Exit status 1 (correctness) when a message was lost, corrupted or
//! misdelivered, a connection failed or was closed by the server, a polite
//! close did not complete, or the server still counted open connections at
//! the end. Whether the end RSS is within `--rss-tolerance` percent of the
//! baseline is printed, never an exit status: memory is the figure to read.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

use crate::hold::source_addr;
use crate::stats::{CpuUse, CpuWindow, fmt_rate, process_rss, raise_nofile_limit};
use crate::ws::{self, FastRng, FrameReader, Message, WsUrl, splitmix};

/// Longest a polite close may take (close frame answered, FIN received).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of the `soak` workload.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct SoakArgs {
    /// Relay endpoint; IDs are added as `?id=…`.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub(crate) url: String,
    /// Connections kept churning (an even number: they work in pairs).
    #[arg(short = 'n', long, default_value_t = 2000)]
    pub(crate) connections: usize,
    /// Seconds of churn after the warm-up round.
    #[arg(long, default_value_t = 60.0)]
    pub(crate) duration: f64,
    /// Seconds of churn after the warm-up round and before the baseline is
    /// read (0: the baseline follows the warm-up round, when N connections
    /// were open at once); a baseline taken at the steady state of the
    /// churn itself.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) warmup_secs: f64,
    /// Relay messages each side of a pair sends to the other per cycle.
    #[arg(short = 'm', long, default_value_t = 3)]
    pub(crate) messages: usize,
    /// Mean idle time in ms between the exchange and the close (uniform in
    /// 0 … 2 × this), so that connections overlap.
    #[arg(long, default_value_t = 500)]
    pub(crate) idle_ms: u64,
    /// Percentage of connections closed abruptly (RST) instead of with a
    /// close handshake.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub(crate) rst_percent: u8,
    /// Handshakes in progress at once (keep it below the server's listen
    /// backlog, 128 for tokio).
    #[arg(long, default_value_t = 64)]
    pub(crate) connect_concurrency: usize,
    /// Source addresses to rotate through (127.0.0.2 upwards); 0 lets the
    /// kernel pick.
    #[arg(long, default_value_t = 8)]
    pub(crate) source_addrs: u8,
    /// Seconds a pair waits for its messages before counting them lost.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) exchange_timeout: f64,
    /// Seconds to wait for `connections_open` to reach 0 (after the warm-up
    /// and at the end).
    #[arg(long, default_value_t = 60.0)]
    pub(crate) drain_timeout: f64,
    /// Seconds to let the server settle before reading the baseline and the
    /// end RSS.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) settle: f64,
    /// How far (percent) above the baseline the end RSS may be and still
    /// count as "back to baseline" (printed only; not an exit status).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) rss_tolerance: f64,
    /// PID of the server, to sample its RSS and CPU time.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Bearer key for `GET /api/connections`, when the server requires one.
    #[arg(long, env = "SWITCHBOARD_BENCH_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
}

/// One RSS sample taken during the churn.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct Sample {
    /// Seconds since the churn started.
    pub(crate) t: f64,
    /// Server `VmRSS`, bytes.
    pub(crate) rss: u64,
    /// Connections the load generator had open.
    pub(crate) client_open: u64,
    /// Connections opened so far in the churn.
    pub(crate) opened: u64,
}

/// Counters of one phase (warm-up or churn).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Counts {
    /// Completed cycles (both sides connected, exchanged and closed).
    pub(crate) cycles: u64,
    /// Connections opened (handshake completed).
    pub(crate) opened: u64,
    /// Failed connection attempts.
    pub(crate) connect_failures: u64,
    /// Relay messages sent.
    pub(crate) sent: u64,
    /// Relay messages received intact by their target.
    pub(crate) delivered: u64,
    /// Messages not received within the exchange timeout.
    pub(crate) lost: u64,
    /// Received frames that were not the expected next payload.
    pub(crate) corrupt: u64,
    /// Connections the server closed or broke during a cycle.
    pub(crate) broken: u64,
    /// Polite closes completed (close frame answered, FIN received).
    pub(crate) polite_closes: u64,
    /// Polite closes that did not complete within 10 s.
    pub(crate) polite_close_failures: u64,
    /// Abrupt closes (RST).
    pub(crate) resets: u64,
}

/// Result of a `soak` run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SoakReport {
    /// Always `"soak"`.
    pub(crate) workload: String,
    /// Connections kept churning.
    pub(crate) connections: usize,
    /// Relay messages per side and cycle.
    pub(crate) messages: usize,
    /// Mean idle time per connection, ms.
    pub(crate) idle_ms: u64,
    /// Share of abrupt closes requested, percent.
    pub(crate) rst_percent: u8,
    /// Seconds of warm-up churn before the baseline (0: the round only).
    #[serde(default)]
    pub(crate) warmup_secs: f64,
    /// Length of the churn, seconds (until the last cycle ended).
    pub(crate) churn_secs: f64,
    /// The warm-up round (and warm-up churn).
    pub(crate) warmup: Counts,
    /// The churn.
    pub(crate) churn: Counts,
    /// Connections opened per second during the churn.
    pub(crate) connections_per_sec: f64,
    /// Mean of the sampled client-side open connections during the churn.
    pub(crate) mean_client_open: f64,
    /// First error seen, if any.
    pub(crate) first_error: Option<String>,
    /// Pair tasks that did not finish in time and were aborted.
    pub(crate) aborted_pairs: usize,
    /// `connections_open` reported by the server at the end (0 when
    /// drained).
    pub(crate) server_connections_open_end: Option<u64>,
    /// Seconds after the last cycle until `connections_open` was 0.
    pub(crate) drain_secs: Option<f64>,
    /// Server RSS before the warm-up, bytes.
    pub(crate) rss_fresh: Option<u64>,
    /// Server RSS after the warm-up round, drained and settled: the
    /// baseline.
    pub(crate) rss_baseline: Option<u64>,
    /// Largest RSS sampled during the churn.
    pub(crate) rss_peak: Option<u64>,
    /// Server RSS after the churn, drained and settled.
    pub(crate) rss_end: Option<u64>,
    /// `rss_end - rss_baseline`, bytes (negative when below).
    pub(crate) rss_end_minus_baseline: Option<i64>,
    /// The tolerance, percent of the baseline.
    pub(crate) rss_tolerance_percent: f64,
    /// Whether the end RSS is at most baseline × (1 + tolerance).
    pub(crate) rss_back_to_baseline: Option<bool>,
    /// Least-squares slope of the sampled RSS against connections opened,
    /// over the second half of the churn, bytes per connection: ≈ 0 when
    /// memory is flat, positive when connections leave memory behind.
    #[serde(default)]
    pub(crate) rss_slope_second_half: Option<f64>,
    /// RSS samples, one a second.
    pub(crate) samples: Vec<Sample>,
    /// CPU use during the churn.
    pub(crate) cpu: CpuUse,
    /// True when no correctness check failed.
    pub(crate) ok: bool,
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1_048_576.0)
}

impl Counts {
    fn add(&mut self, o: &Self) {
        self.cycles += o.cycles;
        self.opened += o.opened;
        self.connect_failures += o.connect_failures;
        self.sent += o.sent;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.corrupt += o.corrupt;
        self.broken += o.broken;
        self.polite_closes += o.polite_closes;
        self.polite_close_failures += o.polite_close_failures;
        self.resets += o.resets;
    }

    fn line(&self) -> String {
        format!(
            "{} cycles, {} connections opened ({} failed), {} messages sent, {} delivered, {} lost, {} corrupt, {} broken, closes: {} polite ({} incomplete), {} RST",
            self.cycles,
            self.opened,
            self.connect_failures,
            self.sent,
            self.delivered,
            self.lost,
            self.corrupt,
            self.broken,
            self.polite_closes,
            self.polite_close_failures,
            self.resets
        )
    }

    fn failures(&self) -> u64 {
        self.connect_failures + self.lost + self.corrupt + self.broken + self.polite_close_failures
    }
}

impl SoakReport {
    /// Prints the human-readable summary.
    pub(crate) fn print(&self) {
        println!(
            "soak: {} connections ({} pairs), {} messages each way per cycle, idle {} ms mean, {}% RST closes, {:.1}s of churn",
            self.connections,
            self.connections / 2,
            self.messages,
            self.idle_ms,
            self.rst_percent,
            self.churn_secs
        );
        println!(
            "  warm-up{}: {}",
            if self.warmup_secs > 0.0 {
                format!(" (round + {}s churn)", self.warmup_secs)
            } else {
                String::new()
            },
            self.warmup.line()
        );
        println!("  churn:   {}", self.churn.line());
        println!(
            "  {} connections/s, {:.0} open on average (client side)",
            fmt_rate(self.connections_per_sec),
            self.mean_client_open
        );
        if let Some(e) = &self.first_error {
            println!("  first error: {e}");
        }
        if self.aborted_pairs > 0 {
            println!(
                "  {} pairs did not finish and were aborted",
                self.aborted_pairs
            );
        }
        match (self.server_connections_open_end, self.drain_secs) {
            (Some(0), Some(s)) => {
                println!("  server connections_open reached 0 {s:.2}s after the last cycle")
            }
            (Some(n), _) => println!("  server still reports connections_open {n}"),
            (None, _) => println!("  server connections_open unknown"),
        }
        if let (Some(fresh), Some(base), Some(peak), Some(end)) = (
            self.rss_fresh,
            self.rss_baseline,
            self.rss_peak,
            self.rss_end,
        ) {
            let delta = end as i64 - base as i64;
            println!(
                "  server RSS: fresh {}, baseline (after warm-up) {}, peak {}, end {} ({}{} B, {:+.2}% of baseline)",
                mib(fresh),
                mib(base),
                mib(peak),
                mib(end),
                if delta >= 0 { "+" } else { "" },
                delta,
                delta as f64 * 100.0 / base.max(1) as f64
            );
            println!(
                "  end RSS {} the baseline + {}%",
                if self.rss_back_to_baseline == Some(true) {
                    "is within"
                } else {
                    "is ABOVE"
                },
                self.rss_tolerance_percent
            );
            if let Some(slope) = self.rss_slope_second_half {
                println!(
                    "  RSS over the second half of the churn: {slope:+.2} B per connection opened ({:+.0} KiB per 100,000 connections)",
                    slope * 100_000.0 / 1024.0
                );
            }
        } else {
            println!("  server RSS not measured (no --server-pid)");
        }
        if !self.samples.is_empty() {
            // About a dozen points, at least 5 s apart.
            let step = (self.samples.len() / 12).max(5);
            let mut line = format!("  RSS every {step} s (MiB / open):");
            for s in self.samples.iter().step_by(step) {
                let _ = write!(
                    line,
                    " {:.0}s {:.1}/{}",
                    s.t,
                    s.rss as f64 / 1_048_576.0,
                    s.client_open
                );
            }
            println!("{line}");
        }
        println!("  {}", self.cpu.line());
    }
}

/// Shared counters of a phase.
#[derive(Default)]
struct Tally {
    cycles: AtomicU64,
    opened: AtomicU64,
    connect_failures: AtomicU64,
    sent: AtomicU64,
    delivered: AtomicU64,
    lost: AtomicU64,
    corrupt: AtomicU64,
    broken: AtomicU64,
    polite: AtomicU64,
    polite_failures: AtomicU64,
    resets: AtomicU64,
}

impl Tally {
    fn counts(&self) -> Counts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            cycles: g(&self.cycles),
            opened: g(&self.opened),
            connect_failures: g(&self.connect_failures),
            sent: g(&self.sent),
            delivered: g(&self.delivered),
            lost: g(&self.lost),
            corrupt: g(&self.corrupt),
            broken: g(&self.broken),
            polite_closes: g(&self.polite),
            polite_close_failures: g(&self.polite_failures),
            resets: g(&self.resets),
        }
    }
}

/// What every pair task shares.
struct Ctx {
    url: WsUrl,
    args: SoakArgs,
    tally: Tally,
    /// Connections the load generator has open right now.
    open: AtomicU64,
    /// Rotates the source address over all connections.
    next_source: AtomicUsize,
    connect_limit: Semaphore,
    first_error: Mutex<Option<String>>,
}

impl Ctx {
    fn error(&self, what: String) {
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(what);
        }
    }
}

/// One open connection of a pair.
struct Side {
    stream: TcpStream,
    reader: FrameReader,
    id: String,
}

/// The payload side `s` sends as its message `k`.
fn payload(pair: usize, cycle: u64, k: usize, s: char) -> String {
    format!(r#"{{"p":{pair},"c":{cycle},"k":{k},"s":"{s}"}}"#)
}

async fn open_side(ctx: &Ctx, id: String) -> Result<Side> {
    let url = ctx
        .url
        .with_path(&format!("{}?id={id}", ctx.url.path_only()));
    let source = source_addr(
        ctx.next_source.fetch_add(1, Ordering::Relaxed),
        ctx.args.source_addrs,
        url.addr.ip(),
    );
    let (stream, reader) = {
        let _permit = ctx.connect_limit.acquire().await?;
        tokio::time::timeout(Duration::from_secs(30), ws::connect(&url, source, 1024))
            .await
            .map_err(|_| anyhow!("handshake took more than 30 s"))??
    };
    ctx.tally.opened.fetch_add(1, Ordering::Relaxed);
    ctx.open.fetch_add(1, Ordering::Relaxed);
    Ok(Side { stream, reader, id })
}

/// Who talks to whom in one exchange.
struct Turn<'a> {
    pair: usize,
    cycle: u64,
    /// The peer's ID.
    peer: &'a str,
    /// This side's letter and the peer's (`'a'`, `'b'`).
    mine: char,
    theirs: char,
}

/// Sends this side's messages to its peer, then receives the peer's `m`
/// payloads; returns how many arrived intact (or that count and the error).
async fn exchange(
    ctx: &Ctx,
    side: &mut Side,
    turn: Turn<'_>,
    rng: &mut FastRng,
) -> Result<u64, (u64, anyhow::Error)> {
    let Turn {
        pair,
        cycle,
        peer,
        mine,
        theirs,
    } = turn;
    let m = ctx.args.messages;
    let mut out = Vec::with_capacity(m * 96);
    for k in 0..m {
        let text = format!(
            r#"{{"targets":["{peer}"],"payload":{}}}"#,
            payload(pair, cycle, k, mine)
        );
        ws::encode_frame(
            &mut out,
            ws::OP_TEXT,
            text.as_bytes(),
            rng.next_u64() as u32,
        );
    }
    if let Err(e) = side.stream.write_all(&out).await {
        return Err((0, anyhow!(e).context(format!("{} sending", side.id))));
    }
    ctx.tally.sent.fetch_add(m as u64, Ordering::Relaxed);
    out.clear();
    let mut got = 0u64;
    let deadline = Instant::now() + Duration::from_secs_f64(ctx.args.exchange_timeout);
    while (got as usize) < m {
        while let Some(msg) = side.reader.next_message().map_err(|e| (got, e))? {
            match msg {
                Message::Text(p) | Message::Binary(p) => {
                    if p == payload(pair, cycle, got as usize, theirs).as_bytes() {
                        got += 1;
                    } else {
                        ctx.tally.corrupt.fetch_add(1, Ordering::Relaxed);
                        ctx.error(format!(
                            "{} expected message {got} of its peer, got {:?}",
                            side.id,
                            String::from_utf8_lossy(&p[..p.len().min(200)])
                        ));
                    }
                }
                Message::Ping(p) => {
                    ws::encode_frame(&mut out, Message::PONG, p, rng.next_u64() as u32);
                }
                Message::Pong => {}
                Message::Close => {
                    return Err((
                        got,
                        anyhow!("{}: the server closed the connection", side.id),
                    ));
                }
            }
        }
        if !out.is_empty() {
            let _ = side.stream.write_all(&out).await;
            out.clear();
        }
        if (got as usize) >= m {
            break;
        }
        match tokio::time::timeout_at(deadline.into(), side.reader.fill(&mut side.stream)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err((got, e.context(side.id.clone()))),
            Err(_) => {
                return Err((
                    got,
                    anyhow!(
                        "{} received {got} of {m} messages within {} s",
                        side.id,
                        ctx.args.exchange_timeout
                    ),
                ));
            }
        }
    }
    Ok(got)
}

/// Closes one side, politely or with a RST; returns whether a polite close
/// completed (always true for a RST).
async fn close_side(ctx: &Ctx, side: Side, rst: bool, rng: &mut FastRng) -> bool {
    let Side {
        mut stream,
        mut reader,
        id,
    } = side;
    let done = if rst {
        // SO_LINGER 0: close() discards the send queue and sends a RST.
        let _ = stream.set_zero_linger();
        drop(stream);
        ctx.tally.resets.fetch_add(1, Ordering::Relaxed);
        true
    } else {
        ws::send_close(&mut stream, rng).await;
        let polite = async {
            let mut saw_close = false;
            loop {
                while let Some(msg) = reader.next_message()? {
                    if matches!(msg, Message::Close) {
                        saw_close = true;
                    }
                }
                // After the close frame the server sends its FIN: fill()
                // fails with "server closed the connection".
                if reader.fill(&mut stream).await.is_err() {
                    return Ok::<bool, anyhow::Error>(saw_close);
                }
            }
        };
        let ok = matches!(
            tokio::time::timeout(CLOSE_TIMEOUT, polite).await,
            Ok(Ok(true))
        );
        drop(stream);
        if ok {
            ctx.tally.polite.fetch_add(1, Ordering::Relaxed);
        } else {
            ctx.tally.polite_failures.fetch_add(1, Ordering::Relaxed);
            ctx.error(format!(
                "{id}: the close handshake did not complete (close frame and FIN) within {} s",
                CLOSE_TIMEOUT.as_secs()
            ));
        }
        ok
    };
    ctx.open.fetch_sub(1, Ordering::Relaxed);
    done
}

/// One cycle of a pair (IDs `soak<phase><pair>.<cycle>a`/`b`). `gate`: in the warm-up, report being connected and
/// wait for the go signal before exchanging.
async fn cycle(
    ctx: &Ctx,
    phase: char,
    pair: usize,
    cycle: u64,
    rng: &mut FastRng,
    gate: Option<(&AtomicUsize, &mut watch::Receiver<bool>)>,
) {
    let ids = (
        format!("soak{phase}{pair}.{cycle}a"),
        format!("soak{phase}{pair}.{cycle}b"),
    );
    let (a, b) = tokio::join!(open_side(ctx, ids.0.clone()), open_side(ctx, ids.1.clone()));
    let (mut a, mut b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            for r in [a, b] {
                match r {
                    Ok(side) => {
                        close_side(ctx, side, true, rng).await;
                    }
                    Err(e) => {
                        ctx.tally.connect_failures.fetch_add(1, Ordering::Relaxed);
                        ctx.error(format!("connecting: {e:#}"));
                    }
                }
            }
            if let Some((ready, _)) = gate {
                ready.fetch_add(1, Ordering::Relaxed);
            }
            // Do not spin on a server that refuses connections.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
    };
    if let Some((ready, go)) = gate {
        ready.fetch_add(1, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(300), go.wait_for(|&g| g)).await;
    }
    let (mut rng_a, mut rng_b) = (FastRng::new(rng.next_u64()), FastRng::new(rng.next_u64()));
    let turn = |peer, mine, theirs| Turn {
        pair,
        cycle,
        peer,
        mine,
        theirs,
    };
    let (ra, rb) = tokio::join!(
        exchange(ctx, &mut a, turn(&ids.1, 'a', 'b'), &mut rng_a),
        exchange(ctx, &mut b, turn(&ids.0, 'b', 'a'), &mut rng_b),
    );
    let m = ctx.args.messages as u64;
    let mut intact = true;
    for r in [ra, rb] {
        match r {
            Ok(got) => {
                ctx.tally.delivered.fetch_add(got, Ordering::Relaxed);
            }
            Err((got, e)) => {
                intact = false;
                ctx.tally.delivered.fetch_add(got, Ordering::Relaxed);
                ctx.tally.lost.fetch_add(m - got, Ordering::Relaxed);
                ctx.tally.broken.fetch_add(1, Ordering::Relaxed);
                ctx.error(format!("{e:#}"));
            }
        }
    }
    if intact && ctx.args.idle_ms > 0 {
        let idle = rng.next_u64() % (2 * ctx.args.idle_ms + 1);
        tokio::time::sleep(Duration::from_millis(idle)).await;
    }
    let pct = u64::from(ctx.args.rst_percent);
    let rst_a = !intact || splitmix(rng.next_u64()) % 100 < pct;
    let rst_b = !intact || splitmix(rng.next_u64()) % 100 < pct;
    let (mut rng_a, mut rng_b) = (FastRng::new(rng.next_u64()), FastRng::new(rng.next_u64()));
    tokio::join!(
        close_side(ctx, a, rst_a, &mut rng_a),
        close_side(ctx, b, rst_b, &mut rng_b)
    );
    ctx.tally.cycles.fetch_add(1, Ordering::Relaxed);
}

/// `connections_open` and `clients_total` from `GET /api/connections`.
async fn server_connections(addr: SocketAddr, host: &str, key: Option<&str>) -> Result<(u64, u64)> {
    let stream = TcpStream::connect(addr)
        .await
        .context("connecting for /api/connections")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = http::Request::get("/api/connections?scope=local").header("host", host);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new())?)
        .await
        .context("GET /api/connections")?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    driver.abort();
    ensure!(
        status.is_success(),
        "GET /api/connections: {status} {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    #[derive(Deserialize)]
    struct Answer {
        connections_open: u64,
        clients_total: u64,
    }
    let a: Answer = serde_json::from_slice(&body).context("parsing /api/connections")?;
    Ok((a.connections_open, a.clients_total))
}

/// Polls `/api/connections` until `connections_open` is 0 or the timeout
/// passes; returns the last count and the seconds it took.
async fn wait_drained(ctx: &Ctx, timeout: Duration) -> Result<(u64, f64)> {
    let started = Instant::now();
    loop {
        let (open, _) = server_connections(
            ctx.url.addr,
            &ctx.url.host_header,
            ctx.args.api_key.as_deref(),
        )
        .await?;
        if open == 0 || started.elapsed() >= timeout {
            return Ok((open, started.elapsed().as_secs_f64()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for spawned tasks until `timeout`, then aborts what is left;
/// returns how many were aborted.
async fn join_all(tasks: Vec<tokio::task::JoinHandle<()>>, timeout: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut aborted = 0;
    for mut t in tasks {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            t.abort();
            aborted += 1;
        }
    }
    aborted
}

/// What a churn phase produced.
struct Churned {
    counts: Counts,
    samples: Vec<Sample>,
    cpu: CpuUse,
    aborted: usize,
    secs: f64,
}

/// Every pair runs cycles until `secs` have passed (IDs `soak<phase>…`);
/// with a PID, the server's RSS is sampled every second.
async fn churn_phase(
    ctx: Arc<Ctx>,
    pairs: usize,
    secs: f64,
    phase: char,
    bound: Duration,
) -> Churned {
    let pid = ctx.args.server_pid;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let window = CpuWindow::start(pid);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let sampler = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            // Bounded by the phase's length plus the pairs' finishing time.
            for _ in 0..(secs as usize + bound.as_secs() as usize + 2) {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                let Some(pid) = pid else { break };
                let Ok(rss) = process_rss(pid) else { break };
                samples.push(Sample {
                    t: started.elapsed().as_secs_f64(),
                    rss,
                    client_open: ctx.open.load(Ordering::Relaxed),
                    opened: ctx.tally.opened.load(Ordering::Relaxed),
                });
            }
            samples
        })
    };
    let mut tasks = Vec::with_capacity(pairs);
    for pair in 0..pairs {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = FastRng::new(pair as u64 ^ u64::from(phase));
            let mut c = 1u64;
            while Instant::now() < deadline {
                cycle(&ctx, phase, pair, c, &mut rng, None).await;
                c += 1;
            }
        }));
    }
    let aborted = join_all(tasks, Duration::from_secs_f64(secs) + bound).await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = window.finish();
    let _ = stop_tx.send(true);
    let samples = sampler.await.unwrap_or_default();
    Churned {
        counts: ctx.tally.counts(),
        samples,
        cpu,
        aborted,
        secs,
    }
}

/// Least-squares slope of RSS against connections opened over the second
/// half of the samples, in bytes per connection: about 0 when memory is
/// flat, positive when every connection leaves something behind.
fn second_half_slope(samples: &[Sample], secs: f64) -> Option<f64> {
    let half: Vec<&Sample> = samples.iter().filter(|s| s.t >= secs / 2.0).collect();
    if half.len() < 3 {
        return None;
    }
    let n = half.len() as f64;
    let mx = half.iter().map(|s| s.opened as f64).sum::<f64>() / n;
    let my = half.iter().map(|s| s.rss as f64).sum::<f64>() / n;
    let sxx: f64 = half.iter().map(|s| (s.opened as f64 - mx).powi(2)).sum();
    let sxy: f64 = half
        .iter()
        .map(|s| (s.opened as f64 - mx) * (s.rss as f64 - my))
        .sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Runs the workload.
pub(crate) async fn run(args: &SoakArgs) -> Result<SoakReport> {
    ensure!(
        args.connections >= 2 && args.connections.is_multiple_of(2),
        "--connections must be an even number of at least 2 (connections work in pairs)"
    );
    ensure!(args.messages >= 1, "--messages must be at least 1");
    for (name, secs) in [
        ("--duration", args.duration),
        ("--warmup-secs", args.warmup_secs),
    ] {
        ensure!(
            (0.0..=86_400.0).contains(&secs),
            "{name} must be between 0 and 86400 seconds"
        );
    }
    ensure!(args.duration > 0.0, "--duration must be above 0");
    ensure!(args.source_addrs < 250, "--source-addrs must be below 250");
    let nofile = raise_nofile_limit()?;
    if (nofile as usize) < args.connections + 64 {
        println!(
            "note: open-file limit {nofile} is below {} connections; expect failures",
            args.connections
        );
    }
    let url = WsUrl::parse(&args.url)?;
    let pairs = args.connections / 2;
    let rss = |pid: Option<u32>| pid.map(process_rss).transpose();
    let bound =
        Duration::from_secs_f64(args.exchange_timeout + 2.0 * args.idle_ms as f64 / 1000.0 + 60.0)
            + CLOSE_TIMEOUT;
    let drain_timeout = Duration::from_secs_f64(args.drain_timeout);
    let new_ctx = |url: WsUrl, next_source: usize, first_error| {
        Arc::new(Ctx {
            url,
            args: args.clone(),
            tally: Tally::default(),
            open: AtomicU64::new(0),
            next_source: AtomicUsize::new(next_source),
            connect_limit: Semaphore::new(args.connect_concurrency.max(1)),
            first_error: Mutex::new(first_error),
        })
    };
    let shared = new_ctx(url, 0, None);
    // Fail early (exit 2) when the API cannot be read.
    let (open_before, _) = server_connections(
        shared.url.addr,
        &shared.url.host_header,
        args.api_key.as_deref(),
    )
    .await
    .context("the soak needs GET /api/connections (pass --api-key if it is protected)")?;
    if open_before > 0 {
        println!("note: the server already has {open_before} open connections");
    }
    let rss_fresh = rss(args.server_pid)?;

    // Warm-up round: all N connections open at once, then exchange and close.
    let (go_tx, go_rx) = watch::channel(false);
    let ready = Arc::new(AtomicUsize::new(0));
    let warm_started = Instant::now();
    let mut tasks = Vec::with_capacity(pairs);
    for pair in 0..pairs {
        let (shared, ready, mut go) = (shared.clone(), ready.clone(), go_rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = FastRng::new(pair as u64);
            cycle(&shared, 'w', pair, 0, &mut rng, Some((&ready, &mut go))).await;
        }));
    }
    let all_ready = crate::common::wait_until(Duration::from_secs(300), || {
        ready.load(Ordering::Relaxed) >= pairs
    })
    .await;
    let warm_open = shared.open.load(Ordering::Relaxed);
    let rss_warm_open = rss(args.server_pid)?;
    let _ = go_tx.send(true);
    let mut aborted_pairs = join_all(tasks, bound).await;
    println!(
        "warm-up round: {} of {} connections were open at once ({}), round took {:.1}s{}",
        warm_open,
        args.connections,
        rss_warm_open.map_or_else(
            || "server RSS n/a".into(),
            |r| format!("server RSS {}", mib(r))
        ),
        warm_started.elapsed().as_secs_f64(),
        if all_ready {
            ""
        } else {
            "; not every pair connected within 300 s"
        }
    );
    let mut warmup = shared.tally.counts();
    let mut first_error = shared.first_error.lock().take();
    let mut next_source = shared.next_source.load(Ordering::Relaxed);
    drop(shared);
    if args.warmup_secs > 0.0 {
        let ctx = new_ctx(WsUrl::parse(&args.url)?, next_source, first_error);
        let w = churn_phase(ctx.clone(), pairs, args.warmup_secs, 'u', bound).await;
        println!(
            "warm-up churn: {:.1}s, {} connections, server RSS at its end {}",
            w.secs,
            w.counts.opened,
            w.samples
                .last()
                .map_or_else(|| "n/a".into(), |s| mib(s.rss))
        );
        warmup.add(&w.counts);
        aborted_pairs += w.aborted;
        first_error = ctx.first_error.lock().take();
        next_source = ctx.next_source.load(Ordering::Relaxed);
    }
    let ctx = new_ctx(WsUrl::parse(&args.url)?, next_source, first_error);
    let (warm_left, warm_drain) = wait_drained(&ctx, drain_timeout).await?;
    if warm_left > 0 {
        println!(
            "warm-up: the server still reports {warm_left} open connections after {warm_drain:.1}s"
        );
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let rss_baseline = rss(args.server_pid)?;
    if let Some(b) = rss_baseline {
        println!(
            "baseline: server RSS {} (connections_open 0 after {warm_drain:.2}s)",
            mib(b)
        );
    }

    // The churn.
    let churned = churn_phase(ctx.clone(), pairs, args.duration, 'c', bound).await;
    aborted_pairs += churned.aborted;
    let churn = churned.counts;
    let samples = churned.samples;
    let (open_end, drain_secs) = wait_drained(&ctx, drain_timeout).await?;
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let rss_end = rss(args.server_pid)?;
    let rss_peak = samples.iter().map(|s| s.rss).max();
    let mean_client_open = if samples.is_empty() {
        0.0
    } else {
        samples.iter().map(|s| s.client_open as f64).sum::<f64>() / samples.len() as f64
    };
    let delta = rss_baseline.zip(rss_end).map(|(b, e)| e as i64 - b as i64);
    let back = rss_baseline
        .zip(rss_end)
        .map(|(b, e)| e as f64 <= b as f64 * (1.0 + args.rss_tolerance / 100.0));
    let ok = warmup.failures() == 0
        && churn.failures() == 0
        && aborted_pairs == 0
        && open_end == 0
        && warm_left == 0
        && churn.cycles > 0;
    if churn.cycles == 0 {
        bail!(
            "no cycle completed: {}",
            ctx.first_error.lock().clone().unwrap_or_default()
        );
    }
    Ok(SoakReport {
        workload: "soak".into(),
        connections: args.connections,
        messages: args.messages,
        idle_ms: args.idle_ms,
        rst_percent: args.rst_percent,
        warmup_secs: args.warmup_secs,
        churn_secs: churned.secs,
        connections_per_sec: churn.opened as f64 / churned.secs.max(1e-9),
        warmup,
        churn,
        mean_client_open,
        first_error: ctx.first_error.lock().clone(),
        aborted_pairs,
        server_connections_open_end: Some(open_end),
        drain_secs: (open_end == 0).then_some(drain_secs),
        rss_fresh,
        rss_baseline,
        rss_peak,
        rss_end,
        rss_end_minus_baseline: delta,
        rss_tolerance_percent: args.rss_tolerance,
        rss_back_to_baseline: back,
        rss_slope_second_half: second_half_slope(&samples, churned.secs),
        samples,
        cpu: churned.cpu,
        ok,
    })
}

#[cfg(test)]
mod tests {
    use super::{Sample, payload, second_half_slope};

    #[test]
    fn payloads_name_pair_cycle_and_side() {
        assert_eq!(payload(3, 7, 1, 'a'), r#"{"p":3,"c":7,"k":1,"s":"a"}"#);
    }

    #[test]
    fn slope_tells_a_plateau_from_a_leak() {
        let series = |per_conn: f64| -> Vec<Sample> {
            (0..60)
                .map(|t| Sample {
                    t: f64::from(t),
                    rss: 10_000_000 + (per_conn * f64::from(t) * 4000.0) as u64,
                    client_open: 2000,
                    opened: u64::from(t as u32) * 4000,
                })
                .collect()
        };
        let flat = second_half_slope(&series(0.0), 60.0).unwrap_or(f64::NAN);
        assert!(flat.abs() < 1e-9);
        let leak = second_half_slope(&series(16.0), 60.0).unwrap_or(f64::NAN);
        assert!((leak - 16.0).abs() < 0.01);
        assert_eq!(second_half_slope(&series(1.0)[..2], 60.0), None);
    }
}
