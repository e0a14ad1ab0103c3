//! `churn`: open and close connections as fast as possible and measure the
//! server's CPU per connection, handshake and close together (issue #15,
//! target 5: ≤ 20 µs of server CPU per upgrade).
//!
//! Each of `--concurrency` workers loops: connect to `<url>?id=i`
//! (WebSocket upgrade, source addresses rotated as in `hold`), send a close
//! frame (1000), read until the server's close frame and its FIN, close.
//! `hold` measures the opening alone and keeps every connection; this
//! workload keeps nothing, so it also counts what a connection costs to
//! set up and tear down (registration, its task, the timer wheel entry)
//! and shows whether that stays flat over many connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::common::{Progress, client_path};
use crate::hold::source_addr;
use crate::stats::{CpuUse, CpuWindow, fmt_rate, raise_nofile_limit};
use crate::ws::{self, Message, WsUrl};

/// Options of the `churn` workload.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct ChurnArgs {
    /// Endpoint; connection i connects to `<url>?id=i` (or substitutes
    /// `{i}` in the URL).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub(crate) url: String,
    /// Connections to open and close in all.
    #[arg(short = 'n', long, default_value_t = 20_000)]
    pub(crate) connections: usize,
    /// Connections in progress at once (below the listen backlog, 128).
    #[arg(long, default_value_t = 32)]
    pub(crate) concurrency: usize,
    /// Number of source addresses to rotate through (127.0.0.2 upwards):
    /// closed connections leave their ports in TIME_WAIT for a minute, and
    /// one source address has ~28,000 of them.
    #[arg(long, default_value_t = 8)]
    pub(crate) source_addrs: u8,
    /// PID of the server, to read its CPU time.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
}

/// Result of a `churn` run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ChurnReport {
    /// Always `"churn"`.
    pub(crate) workload: String,
    /// Connections requested.
    pub(crate) requested: usize,
    /// Connections opened and closed politely (close frame both ways, FIN).
    pub(crate) completed: usize,
    /// Connections that failed at any step.
    pub(crate) failed: usize,
    /// First error seen, if any.
    pub(crate) first_error: Option<String>,
    /// Connections opened and closed per second.
    pub(crate) connections_per_sec: f64,
    /// Server CPU microseconds per connection (upgrade and close).
    pub(crate) server_cpu_us_per_connection: Option<f64>,
    /// CPU use over the run.
    pub(crate) cpu: CpuUse,
    /// Every connection completed.
    pub(crate) ok: bool,
}

impl ChurnReport {
    /// Prints the human-readable summary.
    pub(crate) fn print(&self) {
        println!(
            "churn: {} of {} connections opened and closed, {} failed",
            self.completed, self.requested, self.failed
        );
        if let Some(err) = &self.first_error {
            println!("  first error: {err}");
        }
        println!("  {} connections/s", fmt_rate(self.connections_per_sec));
        if let Some(us) = self.server_cpu_us_per_connection {
            println!("  {us:.1} µs of server CPU per connection (upgrade + close)");
        }
        println!("  {}", self.cpu.line());
    }
}

/// One connection's life: upgrade, close frame, the server's close and FIN.
async fn one(url: &WsUrl, i: usize, source_addrs: u8) -> Result<()> {
    let url = url.with_path(&client_path(&url.path, i));
    let source = source_addr(i, source_addrs, url.addr.ip());
    let (mut stream, mut reader) = ws::connect(&url, source, 256).await?;
    let mut out = Vec::with_capacity(16);
    ws::encode_frame(&mut out, ws::OP_CLOSE, &1000u16.to_be_bytes(), i as u32);
    stream.write_all(&out).await?;
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        let mut closed = false;
        loop {
            // `fill` reports EOF as an error: after the close frame it is
            // the FIN we wait for.
            if let Err(err) = reader.fill(&mut stream).await {
                if closed {
                    return Ok(());
                }
                return Err(err.context("before the server's close frame"));
            }
            while let Some(message) = reader.next_message()? {
                if let Message::Close = message {
                    closed = true;
                }
            }
        }
    })
    .await;
    match waited {
        Ok(result) => result,
        Err(_) => bail!("no close frame and FIN from the server within 10 s"),
    }
}

/// Runs the workload.
pub(crate) async fn run(args: &ChurnArgs) -> Result<ChurnReport> {
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.source_addrs < 250, "--source-addrs must be below 250");
    raise_nofile_limit()?;
    let url = Arc::new(WsUrl::parse(&args.url)?);
    let progress = Arc::new(Progress::default());
    let next = Arc::new(AtomicUsize::new(0));
    let window = CpuWindow::start(args.server_pid);
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency.min(args.connections))
        .map(|_| {
            let (url, progress, next) = (url.clone(), progress.clone(), next.clone());
            let (total, source_addrs) = (args.connections, args.source_addrs);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    match one(&url, i, source_addrs).await {
                        Ok(()) => progress.connected(),
                        Err(err) => progress.failed(&err),
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = window.finish();
    let (completed, failed) = progress.counts();
    Ok(ChurnReport {
        workload: "churn".into(),
        requested: args.connections,
        completed,
        failed,
        first_error: progress.first_error(),
        connections_per_sec: completed as f64 / elapsed.max(1e-9),
        server_cpu_us_per_connection: cpu
            .server_cpu_secs
            .filter(|_| completed > 0)
            .map(|secs| secs * 1e6 / completed as f64),
        cpu,
        ok: failed == 0 && completed == args.connections,
    })
}
