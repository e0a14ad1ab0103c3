//! `hold`: open N idle WebSocket connections as fast as possible and measure
//! what they cost the server.
//!
//! Each client socket is bound, before connecting, to one of a rotating set of
//! loopback source addresses (127.0.0.2, 127.0.0.3, …), because one source
//! address only has about 28,000 ephemeral ports towards one server port. The
//! tool raises its own `RLIMIT_NOFILE` soft limit to the hard limit (note that
//! the server needs a limit above N as well).
//!
//! Reported: handshakes per second while opening, failures, the server's CPU
//! time per handshake, the server's `VmRSS` before and after (settled), hence
//! bytes per idle connection, and the kernel-side growth of TCP socket memory
//! and slab (both ends of each loopback connection live in the same kernel).
//!
//! With `--v1` every client offers `switchboard.v1` and says `hello`, and
//! waits for its `welcome` before counting as held: the figure is then the
//! cost of an idle v1 connection (its inbox included).
//!
//! With `--compression` every client offers permessage-deflate
//! (`permessage-deflate; client_max_window_bits`, so the server may choose
//! any window for our side) and the run fails unless the server agrees. With
//! `--exchange` as well (meant for `/echo`), each client then sends one
//! compressed text message of `--exchange-size` bytes (raw deflate, RSV1)
//! and checks its echo, so that the server creates its lazily allocated
//! inflater and (for an echo of at least the server's `min_size`, which it
//! compresses) its compressor; the client drops its own zlib state straight
//! away, and the connection then stays idle like the others. To tell the
//! two apart: `--exchange-uncompressed` sends the message uncompressed (only
//! the server's compressor is created, for the echo), and an
//! `--exchange-size` below the server's `min_size` gets an uncompressed
//! echo (only the inflater is created). The report counts the echoes that
//! came back compressed.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, watch};

use crate::common::{Progress, client_path};
use crate::stats::{CpuUse, CpuWindow, KernelMem, fmt_rate, process_rss, raise_nofile_limit};
use crate::ws::{self, FastRng, Message, WsUrl};

/// Options of the `hold` workload.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct HoldArgs {
    /// Endpoint; client i connects to `<url>?id=i` (or substitutes `{i}`
    /// in the URL).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub(crate) url: String,
    /// Number of connections to open and hold.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub(crate) connections: usize,
    /// Handshakes in progress at once. Keep it below the server's listen
    /// backlog (tokio's default is 128): a full accept queue drops the
    /// handshake's final ACK and the client retries only after a second.
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// Number of source addresses to rotate through (127.0.0.2 upwards);
    /// 0 lets the kernel pick the source address.
    #[arg(long, default_value_t = 8)]
    pub(crate) source_addrs: u8,
    /// Seconds to let the server settle before reading its memory.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) settle: f64,
    /// Seconds to keep the connections open after measuring.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) hold: f64,
    /// PID of the server, to read its RSS and CPU time.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Offer permessage-deflate in the handshake; fail when the server does
    /// not agree.
    #[arg(long)]
    pub(crate) compression: bool,
    /// Speak `switchboard.v1`: offer the subprotocol and say hello (so each
    /// held connection is attached, with its inbox) before idling.
    #[arg(long, conflicts_with = "compression")]
    pub(crate) v1: bool,
    /// With `--compression`: send one compressed message per connection and
    /// check its (compressed) echo before holding the connection; use an
    /// echo URL (`ws://…/echo`).
    #[arg(long, requires = "compression")]
    pub(crate) exchange: bool,
    /// Size of the exchanged message before compression (the server only
    /// compresses messages of at least its `compression.min_size`, 256 by
    /// default).
    #[arg(long, default_value_t = 1024)]
    pub(crate) exchange_size: usize,
    /// With `--exchange`: send the message uncompressed, so that only the
    /// server's compressor (for the echo) is created, not its inflater.
    #[arg(long, requires = "exchange")]
    pub(crate) exchange_uncompressed: bool,
}

/// Result of a `hold` run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct HoldReport {
    /// Always `"hold"`.
    pub(crate) workload: String,
    /// Connections requested.
    pub(crate) requested: usize,
    /// Connections opened (handshake completed).
    pub(crate) opened: usize,
    /// Failed attempts.
    pub(crate) failed: usize,
    /// Connections still open when memory was measured.
    pub(crate) alive_at_measure: usize,
    /// First error seen, if any.
    pub(crate) first_error: Option<String>,
    /// Soft open-file limit of the load generator after raising it.
    pub(crate) nofile_limit: u64,
    /// Seconds from the first connect to the last handshake.
    pub(crate) open_secs: f64,
    /// Handshakes per second while opening.
    pub(crate) handshakes_per_sec: f64,
    /// Server CPU microseconds per handshake.
    pub(crate) server_cpu_us_per_handshake: Option<f64>,
    /// CPU use while opening.
    pub(crate) cpu: CpuUse,
    /// Connections the kernel dropped from a full accept queue while
    /// opening (system-wide `ListenOverflows` delta).
    pub(crate) listen_overflows: u64,
    /// Server RSS before opening, bytes.
    pub(crate) server_rss_before: Option<u64>,
    /// Server RSS with all connections open, bytes.
    pub(crate) server_rss_after: Option<u64>,
    /// Server RSS growth per open connection, bytes.
    pub(crate) server_bytes_per_connection: Option<f64>,
    /// Growth of kernel TCP socket memory per connection (both ends), bytes.
    pub(crate) kernel_tcp_bytes_per_connection: f64,
    /// Growth of kernel slab per connection (both ends, noisy), bytes.
    pub(crate) kernel_slab_bytes_per_connection: f64,
    /// The server's `Sec-WebSocket-Extensions` answer (of the first
    /// connection) when `--compression` offered permessage-deflate.
    #[serde(default)]
    pub(crate) compression: Option<String>,
    /// Connections whose message came back intact (`--exchange`).
    #[serde(default)]
    pub(crate) exchanged: usize,
    /// Of those, echoes the server sent compressed.
    #[serde(default)]
    pub(crate) echoes_compressed: usize,
    /// True when every connection opened and stayed open.
    pub(crate) ok: bool,
}

impl HoldReport {
    /// Prints the human-readable summary.
    pub(crate) fn print(&self) {
        println!(
            "hold: {} of {} connections opened, {} failed ({} alive when measured), open-file limit {}",
            self.opened, self.requested, self.failed, self.alive_at_measure, self.nofile_limit
        );
        if let Some(e) = &self.first_error {
            println!("  first error: {e}");
        }
        println!(
            "  {} handshakes/s ({:.2}s to open)",
            fmt_rate(self.handshakes_per_sec),
            self.open_secs
        );
        if self.listen_overflows > 0 {
            println!(
                "  {} accept-queue overflows while opening (raise the server's backlog or lower --concurrency)",
                self.listen_overflows
            );
        }
        if let Some(us) = self.server_cpu_us_per_handshake {
            println!("  {us:.1} µs of server CPU per handshake");
        }
        if let (Some(b), Some(a)) = (self.server_rss_before, self.server_rss_after) {
            println!(
                "  server RSS {:.1} MiB -> {:.1} MiB",
                b as f64 / 1048576.0,
                a as f64 / 1048576.0
            );
        }
        if let Some(x) = self.server_bytes_per_connection {
            println!("  {x:.0} bytes of server RSS per idle connection");
        }
        if let Some(agreed) = &self.compression {
            println!("  extension agreed: {agreed}");
            if self.exchanged > 0 {
                println!(
                    "  {} connections exchanged one message; {} echoes came back compressed",
                    self.exchanged, self.echoes_compressed
                );
            }
        }
        println!(
            "  kernel per connection (both ends): TCP buffers {:.0} B, slab {:.0} B",
            self.kernel_tcp_bytes_per_connection, self.kernel_slab_bytes_per_connection
        );
        println!("  {}", self.cpu.line());
    }
}

/// The source address of connection `i`, if rotation applies.
pub(crate) fn source_addr(i: usize, count: u8, target: IpAddr) -> Option<IpAddr> {
    match target {
        IpAddr::V4(v4) if v4.is_loopback() && count > 0 => {
            let last = 2 + (i % usize::from(count)) as u8;
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        }
        _ => None,
    }
}

/// Runs the workload.
pub(crate) async fn run(args: &HoldArgs) -> Result<HoldReport> {
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(args.source_addrs < 250, "--source-addrs must be below 250");
    let nofile_limit = raise_nofile_limit()?;
    if (nofile_limit as usize) < args.connections + 32 {
        println!(
            "note: open-file limit {nofile_limit} is below {} connections; expect failures",
            args.connections
        );
    }
    let url = WsUrl::parse(&args.url)?;
    let rss_before = match args.server_pid {
        Some(pid) => Some(process_rss(pid)?),
        None => None,
    };
    let kernel_before = KernelMem::read();
    let progress = Arc::new(Progress::default());
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let alive = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let exchanged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let echoes_compressed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let compress_sent = !args.exchange_uncompressed;
    let agreed_first: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let offer = ws::Offer {
        extensions: args
            .compression
            .then_some("permessage-deflate; client_max_window_bits"),
        protocol: args.v1.then_some("switchboard.v1"),
    };
    let v1 = args.v1;
    let exchange = args.exchange.then(|| exchange_text(args.exchange_size));

    let window = CpuWindow::start(args.server_pid);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let permit = limit.clone().acquire_owned().await?;
        let url = url.with_path(&client_path(&url.path, i));
        let source = source_addr(i, args.source_addrs, url.addr.ip());
        let progress = progress.clone();
        let mut stop_rx = stop_rx.clone();
        let alive = alive.clone();
        let (exchanged, echoes_compressed, agreed_first, exchange) = (
            exchanged.clone(),
            echoes_compressed.clone(),
            agreed_first.clone(),
            exchange.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let conn = async {
                let (mut stream, mut reader, agreed) =
                    ws::connect_with(&url, source, 256, offer).await?;
                if v1 {
                    ws::v1_hello(&mut stream, &mut reader, &mut FastRng::new(i as u64)).await?;
                }
                if offer.extensions.is_some() {
                    let Some(agreed) = agreed else {
                        bail!("the server did not agree to permessage-deflate");
                    };
                    if let Some(text) = &exchange {
                        let compressed = exchange_message(
                            &mut stream,
                            &mut reader,
                            &agreed,
                            text,
                            compress_sent,
                            i,
                        )
                        .await?;
                        exchanged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if compressed {
                            echoes_compressed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    agreed_first.lock().get_or_insert(agreed);
                }
                Ok((stream, reader))
            }
            .await;
            drop(permit);
            let (mut stream, mut reader) = match conn {
                Ok(c) => c,
                Err(e) => {
                    progress.failed(&e);
                    return;
                }
            };
            progress.connected();
            alive.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut rng = FastRng::new(i as u64);
            let mut out = Vec::new();
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    r = reader.fill(&mut stream) => {
                        if r.is_err() {
                            break;
                        }
                        let mut closed = false;
                        while let Ok(Some(msg)) = reader.next_message() {
                            match msg {
                                Message::Ping(p) => ws::encode_frame(
                                    &mut out, Message::PONG, p, rng.next_u64() as u32),
                                Message::Close => closed = true,
                                _ => {}
                            }
                        }
                        if !out.is_empty() {
                            let _ = stream.write_all(&out).await;
                            out.clear();
                        }
                        if closed {
                            break;
                        }
                    }
                }
            }
            alive.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }));
    }
    let (opened, failed) = progress
        .wait_for(args.connections, Duration::from_secs(300))
        .await;
    let open_secs = started.elapsed().as_secs_f64();
    let cpu = window.finish();
    let listen_overflows = KernelMem::read()
        .listen_overflows
        .saturating_sub(kernel_before.listen_overflows);
    if opened == 0 {
        let _ = stop_tx.send(true);
        bail!(
            "no connection could be opened: {}",
            progress.first_error().unwrap_or_default()
        );
    }

    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let rss_after = match args.server_pid {
        Some(pid) => Some(process_rss(pid)?),
        None => None,
    };
    let kernel_after = KernelMem::read();
    let alive_at_measure = alive.load(std::sync::atomic::Ordering::Relaxed);
    if args.hold > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }

    let per_conn = |before: u64, after: u64| (after as f64 - before as f64) / opened as f64;
    Ok(HoldReport {
        workload: "hold".into(),
        requested: args.connections,
        opened,
        failed,
        alive_at_measure,
        first_error: progress.first_error(),
        nofile_limit,
        open_secs,
        handshakes_per_sec: opened as f64 / open_secs.max(1e-9),
        // Below 5 clock ticks the figure would be mostly rounding.
        server_cpu_us_per_handshake: cpu
            .server_cpu_secs
            .filter(|&s| s >= 0.05)
            .map(|s| s * 1e6 / opened as f64),
        cpu,
        listen_overflows,
        server_rss_before: rss_before,
        server_rss_after: rss_after,
        server_bytes_per_connection: rss_before.zip(rss_after).map(|(b, a)| per_conn(b, a)),
        kernel_tcp_bytes_per_connection: per_conn(
            kernel_before.tcp_mem_bytes,
            kernel_after.tcp_mem_bytes,
        ),
        kernel_slab_bytes_per_connection: per_conn(
            kernel_before.slab_bytes,
            kernel_after.slab_bytes,
        ),
        compression: agreed_first.lock().clone(),
        exchanged: exchanged.load(std::sync::atomic::Ordering::Relaxed),
        echoes_compressed: echoes_compressed.load(std::sync::atomic::Ordering::Relaxed),
        ok: failed == 0 && alive_at_measure == args.connections,
    })
}

/// A compressible text of `size` bytes (JSON-like, repetitive, as chat
/// traffic is), at least 1 byte.
fn exchange_text(size: usize) -> Arc<Vec<u8>> {
    let mut s = String::with_capacity(size + 64);
    let mut k = 0u32;
    while s.len() < size.max(1) {
        let _ = std::fmt::Write::write_fmt(
            &mut s,
            format_args!(
                r#"{{"user":"u{}","text":"hello from the hold workload","n":{k}}} "#,
                k % 7
            ),
        );
        k += 1;
    }
    s.truncate(size.max(1));
    Arc::new(s.into_bytes())
}

/// Sends `text` as one message (compressed unless `!compress`) and checks
/// that the echo is the same text; returns whether the echo was compressed.
/// Bounded by 10 s.
async fn exchange_message(
    stream: &mut tokio::net::TcpStream,
    reader: &mut ws::FrameReader,
    agreed: &str,
    text: &[u8],
    compress: bool,
    i: usize,
) -> Result<bool> {
    let mut out = Vec::with_capacity(text.len() + 14);
    let mut rng = FastRng::new(i as u64);
    if compress {
        let window = ws::deflate_param(agreed, "client_max_window_bits").unwrap_or(15);
        let compressed = ws::deflate_message(text, window)?;
        ws::encode_frame_rsv(
            &mut out,
            ws::OP_TEXT,
            true,
            &compressed,
            rng.next_u64() as u32,
        );
    } else {
        ws::encode_frame(&mut out, ws::OP_TEXT, text, rng.next_u64() as u32);
    }
    stream.write_all(&out).await?;
    let echo = async {
        loop {
            reader.fill(stream).await?;
            if let Some(msg) = reader.next_message()? {
                let Message::Text(payload) = msg else {
                    bail!("expected the echo of the message, got {msg:?}");
                };
                let payload = payload.to_vec();
                let compressed = reader.last_compressed;
                let echoed = if compressed {
                    ws::inflate_message(&payload, text.len() + 1)?
                } else {
                    payload
                };
                ensure!(echoed == text, "the echo differs from the message sent");
                return Ok(compressed);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), echo)
        .await
        .map_err(|_| anyhow::anyhow!("no echo of the message within 10 s"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_loopback_sources() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(
            source_addr(0, 3, lo),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        );
        assert_eq!(
            source_addr(5, 3, lo),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)))
        );
        assert_eq!(source_addr(5, 0, lo), None);
    }
}
