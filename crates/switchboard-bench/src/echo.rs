//! `echo`: N connections to an echo endpoint, K messages in flight on each.
//!
//! Every connection first sends K messages, then answers each echo with a new
//! message until the deadline (a closed loop), then waits for the last echoes.
//! Messages carry their sequence number in the first bytes (8 bytes
//! little-endian for binary, 16 hex digits for text) followed by a
//! per-connection pattern, and every echo is compared byte for byte with what
//! was sent, in order. Round-trip latency is measured from the moment a
//! message was queued to the moment its echo was decoded.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, watch};

use crate::common::{Phase, Progress};
use crate::stats::{CpuUse, CpuWindow, Latency, Recorder, fmt_rate, now_ns};
use crate::ws::{self, FastRng, Message, WsUrl};

/// Options of the `echo` workload.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct EchoArgs {
    /// Echo endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/echo")]
    pub(crate) url: String,
    /// Number of connections.
    #[arg(short = 'c', long, default_value_t = 100)]
    pub(crate) connections: usize,
    /// Message size in bytes.
    #[arg(short = 's', long, default_value_t = 32)]
    pub(crate) size: usize,
    /// Messages in flight per connection.
    #[arg(short = 'k', long, default_value_t = 8)]
    pub(crate) inflight: usize,
    /// Length of the measured window in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration: f64,
    /// Send text frames instead of binary frames.
    #[arg(long)]
    pub(crate) text: bool,
    /// PID of the server, to report messages per server CPU-second.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Concurrent handshakes while connecting.
    #[arg(long, default_value_t = 64)]
    pub(crate) connect_concurrency: usize,
    /// Seconds to wait for the last echoes after the window.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) drain: f64,
}

/// Result of an `echo` run.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub(crate) struct EchoReport {
    /// Always `"echo"`.
    pub(crate) workload: String,
    /// Connections requested.
    pub(crate) connections: usize,
    /// Connections that failed to open or broke during the run.
    pub(crate) connection_errors: usize,
    /// First error seen, if any.
    pub(crate) first_error: Option<String>,
    /// Message size in bytes.
    pub(crate) size: usize,
    /// Messages in flight per connection.
    pub(crate) inflight: usize,
    /// Whether text frames were used.
    pub(crate) text: bool,
    /// Messages sent.
    pub(crate) sent: u64,
    /// Echoes received.
    pub(crate) received: u64,
    /// Echoes that did not match what was sent (content, order or type).
    pub(crate) mismatched: u64,
    /// Echoes per second of wall time.
    pub(crate) msgs_per_sec: f64,
    /// Echoes per server CPU-second (user+system), when the PID was given.
    pub(crate) msgs_per_server_cpu_sec: Option<f64>,
    /// Round-trip latency.
    pub(crate) latency: Latency,
    /// CPU use in the window.
    pub(crate) cpu: CpuUse,
    /// True when every message was echoed intact and no connection failed.
    pub(crate) ok: bool,
}

impl EchoReport {
    /// Prints the human-readable summary.
    pub(crate) fn print(&self) {
        println!(
            "echo: {} connections, {} B {}, {} in flight each",
            self.connections,
            self.size,
            if self.text { "text" } else { "binary" },
            self.inflight
        );
        println!(
            "  sent {} received {} mismatched {} connection errors {}",
            self.sent, self.received, self.mismatched, self.connection_errors
        );
        if let Some(e) = &self.first_error {
            println!("  first error: {e}");
        }
        println!("  {} msgs/s", fmt_rate(self.msgs_per_sec));
        if let Some(x) = self.msgs_per_server_cpu_sec {
            println!("  {} msgs per server CPU-second", fmt_rate(x));
        }
        println!("  round trip: {}", self.latency.line());
        println!("  {}", self.cpu.line());
    }
}

#[derive(Debug, Default)]
struct ConnStats {
    sent: u64,
    received: u64,
    mismatched: u64,
}

/// Runs the workload.
pub(crate) async fn run(args: &EchoArgs) -> Result<EchoReport> {
    if args.connections == 0 || args.inflight == 0 {
        bail!("--connections and --inflight must be at least 1");
    }
    let url = WsUrl::parse(&args.url)?;
    let progress = Arc::new(Progress::default());
    let recorder = Arc::new(Recorder::new(8));
    let (phase_tx, phase_rx) = watch::channel((Phase::Connect, Instant::now()));
    let connect_limit = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let drain = Duration::from_secs_f64(args.drain);

    let mut tasks = Vec::with_capacity(args.connections);
    for idx in 0..args.connections {
        let url = url.clone();
        let progress = progress.clone();
        let recorder = recorder.clone();
        let phase_rx = phase_rx.clone();
        let connect_limit = connect_limit.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let conn = {
                let _permit = connect_limit.acquire().await;
                ws::connect(&url, None, 64 * 1024).await
            };
            match conn {
                Ok((stream, reader)) => {
                    progress.connected();
                    let mut stats = ConnStats::default();
                    let result = connection(
                        idx, stream, reader, &args, phase_rx, &recorder, drain, &mut stats,
                    )
                    .await;
                    if let Err(e) = &result {
                        progress.failed(e);
                    }
                    stats
                }
                Err(e) => {
                    progress.failed(&e);
                    ConnStats::default()
                }
            }
        }));
    }

    let (connected, failed) = progress
        .wait_for(args.connections, Duration::from_secs(60))
        .await;
    if connected == 0 {
        bail!(
            "no connection could be opened ({failed} failed): {}",
            progress.first_error().unwrap_or_default()
        );
    }
    let window = CpuWindow::start(args.server_pid);
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let _ = phase_tx.send((Phase::Run, deadline));

    let mut total = ConnStats::default();
    for t in tasks {
        if let Ok(s) = t.await {
            total.sent += s.sent;
            total.received += s.received;
            total.mismatched += s.mismatched;
        }
    }
    let cpu = window.finish();
    let (_, errors) = progress.counts();
    let latency = Latency::from_histogram(&recorder.merged());
    let ok = errors == 0 && total.mismatched == 0 && total.sent == total.received && total.sent > 0;
    Ok(EchoReport {
        workload: "echo".into(),
        connections: args.connections,
        connection_errors: errors,
        first_error: progress.first_error(),
        size: args.size,
        inflight: args.inflight,
        text: args.text,
        sent: total.sent,
        received: total.received,
        mismatched: total.mismatched,
        msgs_per_sec: total.received as f64 / cpu.wall_secs.max(1e-9),
        msgs_per_server_cpu_sec: cpu.per_server_cpu_sec(total.received),
        latency,
        cpu,
        ok,
    })
}

/// The message body pattern of one connection: header bytes are overwritten
/// with the sequence number for each message.
fn template(idx: usize, size: usize, text: bool) -> Vec<u8> {
    (0..size)
        .map(|i| {
            let x = (i + idx * 7) % 26;
            if text {
                b'a' + x as u8
            } else {
                (x * 9 + idx) as u8
            }
        })
        .collect()
}

/// Writes the sequence-number header of a message into `buf`.
fn stamp(buf: &mut [u8], seq: u64, text: bool) {
    if text {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in buf.iter_mut().take(16).enumerate() {
            *b = HEX[((seq >> (60 - 4 * i)) & 0xF) as usize];
        }
    } else {
        for (b, s) in buf.iter_mut().zip(seq.to_le_bytes()) {
            *b = s;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    idx: usize,
    mut stream: tokio::net::TcpStream,
    mut reader: ws::FrameReader,
    args: &EchoArgs,
    mut phase_rx: watch::Receiver<(Phase, Instant)>,
    recorder: &Recorder,
    drain: Duration,
    stats: &mut ConnStats,
) -> Result<()> {
    let text = args.text;
    let opcode = if text { ws::OP_TEXT } else { ws::OP_BINARY };
    let base = template(idx, args.size, text);
    let mut scratch = base.clone();
    let mut expect = base.clone();
    let mut rng = FastRng::new(idx as u64);
    let mut out = Vec::with_capacity(args.inflight * (args.size + 14));
    let mut fifo: VecDeque<(u64, u64)> = VecDeque::with_capacity(args.inflight);
    let mut latencies = Vec::with_capacity(256);
    let mut seq = 0u64;

    let deadline = {
        let r = phase_rx.wait_for(|(p, _)| *p == Phase::Run).await?;
        r.1
    };
    let hard_deadline = deadline + drain;

    for _ in 0..args.inflight {
        stamp(&mut scratch, seq, text);
        ws::encode_frame(&mut out, opcode, &scratch, rng.next_u64() as u32);
        fifo.push_back((seq, now_ns()));
        seq += 1;
        stats.sent += 1;
    }
    stream.write_all(&out).await?;
    out.clear();

    let mut sending = true;
    while !fifo.is_empty() {
        match tokio::time::timeout_at(hard_deadline.into(), reader.fill(&mut stream)).await {
            Ok(r) => {
                r?;
            }
            Err(_) => bail!("{} echoes still missing after the drain period", fifo.len()),
        }
        let now = now_ns();
        sending = sending && Instant::now() < deadline;
        while let Some(msg) = reader.next_message()? {
            let (payload, op) = match msg {
                Message::Text(p) => (p, ws::OP_TEXT),
                Message::Binary(p) => (p, ws::OP_BINARY),
                Message::Ping(p) => {
                    ws::encode_frame(&mut out, Message::PONG, p, rng.next_u64() as u32);
                    continue;
                }
                Message::Pong => continue,
                Message::Close => bail!("server closed the connection"),
            };
            let Some((sent_seq, sent_at)) = fifo.pop_front() else {
                stats.mismatched += 1;
                continue;
            };
            stats.received += 1;
            stamp(&mut expect, sent_seq, text);
            if op != opcode || payload != expect.as_slice() {
                stats.mismatched += 1;
            }
            latencies.push(now.saturating_sub(sent_at));
            if sending {
                stamp(&mut scratch, seq, text);
                ws::encode_frame(&mut out, opcode, &scratch, rng.next_u64() as u32);
                fifo.push_back((seq, now_ns()));
                seq += 1;
                stats.sent += 1;
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if latencies.len() >= 256 {
            recorder.record_all(idx, &latencies);
            latencies.clear();
        }
    }
    recorder.record_all(idx, &latencies);
    ws::send_close(&mut stream, &mut rng).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_distinct_and_text_is_ascii() {
        let mut a = template(3, 32, true);
        let mut b = a.clone();
        stamp(&mut a, 1, true);
        stamp(&mut b, 2, true);
        assert_ne!(a, b);
        assert!(a.is_ascii());
        let mut short = template(0, 4, false);
        stamp(&mut short, u64::MAX, false);
        assert_eq!(short, [0xFF; 4]);
    }
}
