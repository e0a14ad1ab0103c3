//! Latency histograms, process accounting from `/proc`, and small helpers
//! shared by the workloads.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

/// Highest latency a histogram tracks (60 s, in nanoseconds); larger values
/// are clamped.
const MAX_NS: u64 = 60_000_000_000;

/// A fresh nanosecond histogram (3 significant figures).
pub(crate) fn new_histogram() -> Histogram<u64> {
    // Fixed, valid bounds: creation cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("static histogram bounds are valid")
}

/// The process-wide time origin: timestamps in payloads are nanoseconds since
/// this instant (the sender and the receiver are the same process).
pub(crate) fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    origin.elapsed().as_nanos() as u64
}

/// A few mutex-protected histograms that many tasks record into; each task
/// uses the shard picked by its index, keeping memory independent of the
/// number of connections.
#[derive(Debug)]
pub(crate) struct Recorder {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Recorder {
    /// A recorder with `n` shards.
    pub(crate) fn new(n: usize) -> Self {
        Self {
            shards: (0..n.max(1)).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }

    /// Records a batch of latencies into one shard.
    pub(crate) fn record_all(&self, idx: usize, values: &[u64]) {
        let mut h = self.shards[idx % self.shards.len()].lock();
        for &ns in values {
            h.saturating_record(ns.max(1));
        }
    }

    /// Merges all shards.
    pub(crate) fn merged(&self) -> Histogram<u64> {
        let mut out = new_histogram();
        for s in &self.shards {
            // Same bounds everywhere, so adding cannot fail.
            let _ = out.add(&*s.lock());
        }
        out
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub(crate) struct Latency {
    /// Number of samples.
    pub(crate) count: u64,
    /// Mean.
    pub(crate) mean_us: f64,
    /// Median.
    pub(crate) p50_us: f64,
    /// 75th percentile.
    pub(crate) p75_us: f64,
    /// 90th percentile.
    pub(crate) p90_us: f64,
    /// 99th percentile.
    pub(crate) p99_us: f64,
    /// 99.9th percentile.
    pub(crate) p999_us: f64,
    /// Largest sample.
    pub(crate) max_us: f64,
}

impl Latency {
    /// Summarises a nanosecond histogram.
    pub(crate) fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p75_us: us(h.value_at_quantile(0.75)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }

    /// One human-readable line.
    pub(crate) fn line(&self) -> String {
        format!(
            "n={} p50={} p90={} p99={} p99.9={} max={} (mean {})",
            self.count,
            fmt_us(self.p50_us),
            fmt_us(self.p90_us),
            fmt_us(self.p99_us),
            fmt_us(self.p999_us),
            fmt_us(self.max_us),
            fmt_us(self.mean_us),
        )
    }
}

/// Formats microseconds with a fitting unit.
pub(crate) fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2}s", us / 1_000_000.0)
    } else if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.0}µs")
    }
}

/// Formats a rate with thousands separators.
pub(crate) fn fmt_rate(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// CPU time (user + system) of a process, read from `/proc/PID/stat`.
pub(crate) fn process_cpu(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may contain spaces:
    // split after the last ')'. The rest starts at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected format of {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime is field 14, stime field 15 (1-based) => indices 11 and 12 here.
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .ok_or_else(|| anyhow!("{path} has too few fields"))?
            .parse::<u64>()
            .with_context(|| format!("parsing field {} of {path}", i + 3))
    };
    let ticks = field(11)? + field(12)?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_nanos(
        (u128::from(ticks) * 1_000_000_000 / u128::from(hz)) as u64,
    ))
}

/// Busy CPU time of the whole system (all CPUs): user, nice, system, irq,
/// softirq and steal from the first line of `/proc/stat`.
pub(crate) fn system_busy() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let ticks = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_nanos(
        (u128::from(ticks) * 1_000_000_000 / u128::from(hz)) as u64,
    ))
}

/// Resident set size of a process in bytes (`VmRSS` of `/proc/PID/status`).
pub(crate) fn process_rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS in {path}"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad VmRSS line {line:?}"))?
        .parse()
        .context("parsing VmRSS")?;
    Ok(kb * 1024)
}

/// Kernel-side memory figures from `/proc/net/sockstat` and `/proc/meminfo`.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
pub(crate) struct KernelMem {
    /// `TCP: mem` from sockstat: pages charged to TCP socket buffers.
    pub(crate) tcp_mem_bytes: u64,
    /// `Slab` from meminfo: kernel slab memory (socket structures, dentries…).
    pub(crate) slab_bytes: u64,
    /// `TCP: inuse` from sockstat.
    pub(crate) tcp_inuse: u64,
    /// `TcpExt: ListenOverflows` from netstat: connections dropped because
    /// a listener's accept queue was full (they are retried after 1 s).
    pub(crate) listen_overflows: u64,
}

impl KernelMem {
    /// Reads the current values (zeros where unavailable).
    pub(crate) fn read() -> Self {
        let mut k = Self::default();
        let page = rustix::param::page_size() as u64;
        if let Ok(s) = std::fs::read_to_string("/proc/net/sockstat")
            && let Some(line) = s.lines().find(|l| l.starts_with("TCP:"))
        {
            let words: Vec<&str> = line.split_whitespace().collect();
            for pair in words[1..].chunks(2) {
                if let [name, value] = pair {
                    let v = value.parse::<u64>().unwrap_or(0);
                    match *name {
                        "mem" => k.tcp_mem_bytes = v * page,
                        "inuse" => k.tcp_inuse = v,
                        _ => {}
                    }
                }
            }
        }
        if let Ok(s) = std::fs::read_to_string("/proc/net/netstat") {
            // Pairs of lines: "TcpExt: Name1 Name2 …" then "TcpExt: v1 v2 …".
            let ext: Vec<&str> = s.lines().filter(|l| l.starts_with("TcpExt:")).collect();
            if let [names, values] = ext.as_slice()
                && let Some(i) = names
                    .split_whitespace()
                    .position(|n| n == "ListenOverflows")
            {
                k.listen_overflows = values
                    .split_whitespace()
                    .nth(i)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
        }
        if let Ok(s) = std::fs::read_to_string("/proc/meminfo")
            && let Some(line) = s.lines().find(|l| l.starts_with("Slab:"))
        {
            k.slab_bytes = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024;
        }
        k
    }
}

/// Samples a server's CPU time over a measured window (if a PID is known)
/// together with this process's own CPU time. Several server PIDs (the
/// nodes of a cluster, and its Redis) count as one server: their CPU times
/// add up.
#[derive(Debug)]
pub(crate) struct CpuWindow {
    server_pids: Vec<u32>,
    server_start: Vec<Option<Duration>>,
    client_start: Option<Duration>,
    system_start: Option<Duration>,
    wall_start: Instant,
}

/// CPU use over a window.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
pub(crate) struct CpuUse {
    /// Wall-clock length of the window in seconds.
    pub(crate) wall_secs: f64,
    /// Server user+system CPU seconds in the window, if the PID was known.
    pub(crate) server_cpu_secs: Option<f64>,
    /// This load generator's user+system CPU seconds in the window.
    pub(crate) client_cpu_secs: Option<f64>,
    /// CPU seconds all other processes used in the window (system-wide busy
    /// time from `/proc/stat` minus server and load generator): a measure
    /// of interference on a shared machine.
    #[serde(default)]
    pub(crate) other_cpu_secs: Option<f64>,
}

impl CpuWindow {
    /// Starts a window now.
    pub(crate) fn start(server_pid: Option<u32>) -> Self {
        Self::start_many(server_pid.into_iter().collect())
    }

    /// Starts a window now, for a server made of several processes.
    pub(crate) fn start_many(server_pids: Vec<u32>) -> Self {
        Self {
            server_start: server_pids.iter().map(|&p| process_cpu(p).ok()).collect(),
            server_pids,
            client_start: process_cpu(std::process::id()).ok(),
            system_start: system_busy().ok(),
            wall_start: Instant::now(),
        }
    }

    /// Ends the window.
    pub(crate) fn finish(&self) -> CpuUse {
        self.finish_by_pid().0
    }

    /// Ends the window; also returns each server PID's CPU seconds.
    pub(crate) fn finish_by_pid(&self) -> (CpuUse, Vec<(u32, f64)>) {
        let by_pid: Vec<Option<f64>> = self
            .server_pids
            .iter()
            .zip(&self.server_start)
            .map(|(&pid, start)| {
                let start = (*start)?;
                process_cpu(pid)
                    .ok()
                    .map(|end| end.saturating_sub(start).as_secs_f64())
            })
            .collect();
        // A figure only when every process could be read.
        let server = if by_pid.is_empty() {
            None
        } else {
            by_pid.iter().copied().sum::<Option<f64>>()
        };
        let client = self.client_start.and_then(|start| {
            process_cpu(std::process::id())
                .ok()
                .map(|end| end.saturating_sub(start).as_secs_f64())
        });
        let system = self.system_start.and_then(|start| {
            system_busy()
                .ok()
                .map(|end| end.saturating_sub(start).as_secs_f64())
        });
        let other =
            system.map(|busy| (busy - server.unwrap_or(0.0) - client.unwrap_or(0.0)).max(0.0));
        let cpu = CpuUse {
            wall_secs: self.wall_start.elapsed().as_secs_f64(),
            server_cpu_secs: server,
            client_cpu_secs: client,
            other_cpu_secs: other,
        };
        let by_pid = self
            .server_pids
            .iter()
            .zip(by_pid)
            .filter_map(|(&pid, secs)| Some((pid, secs?)))
            .collect();
        (cpu, by_pid)
    }
}

impl CpuUse {
    /// `count` per server CPU-second, when measurable (the clock has 10 ms
    /// resolution, so very short windows give no figure).
    pub(crate) fn per_server_cpu_sec(&self, count: u64) -> Option<f64> {
        self.server_cpu_secs
            .filter(|&s| s >= 0.01)
            .map(|s| count as f64 / s)
    }

    /// A human-readable line.
    pub(crate) fn line(&self) -> String {
        let f = |x: Option<f64>| x.map_or_else(|| "n/a".to_string(), |s| format!("{s:.2}s"));
        format!(
            "wall {:.2}s, server CPU {}, load-generator CPU {}, other processes {}",
            self.wall_secs,
            f(self.server_cpu_secs),
            f(self.client_cpu_secs),
            f(self.other_cpu_secs)
        )
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit and returns
/// the new soft limit.
pub(crate) fn raise_nofile_limit() -> Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")
}
