//! `compare`: the same workloads against Switchboard and the reference
//! servers, one server at a time, with a results table and plots.
//!
//! For every (server, workload) pair a fresh server process is started on
//! `127.0.0.1:0` (pinned to CPU 0 with `taskset -c 0` when `taskset` exists
//! and the machine has two or more CPUs, while this process pins itself to
//! CPU 1 with `taskset -a -p -c 1`), its `listening on http://ADDR` line is
//! awaited on stdout or stderr, the workload runs with the server's PID so its
//! CPU time and memory can be read from `/proc`, and the server is stopped.
//! Fresh processes keep memory measurements (`hold`) free of what earlier
//! workloads left in the allocator and make CPU accounting per workload
//! trivially separate.
//!
//! Servers: `switchboard` (package `switchboard-cli`, skipped with a note if
//! it cannot be built or found), `ref-fastwebsockets` and `ref-tungstenite`
//! (binaries of this crate), `ref-uwebsockets` (C++ on uWebSockets, compiled
//! by [`crate::uws_build`]; skipped with a note if that fails), and `node-ws` (Node's `ws` package, installed
//! with npm under the target directory; skipped with a note if `node` or the
//! install is unavailable). The topic and HTTP-API fan-out routes exist only
//! in Switchboard, so they are run against it alone.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::echo::{self, EchoArgs};
use crate::fanout::{self, FanoutArgs, Via};
use crate::hold::{self, HoldArgs};
use crate::relay::{self, RelayArgs};
use crate::stats::{Latency, fmt_rate, fmt_us};
use crate::{plot, stats};

/// The marker lines between which `compare` writes its results into the doc.
const BEGIN_MARK: &str = "<!-- BEGIN switchboard-bench compare results -->";
const END_MARK: &str = "<!-- END switchboard-bench compare results -->";

/// Names of the servers `compare` knows.
const ALL_SERVERS: [&str; 5] = [
    "switchboard",
    "ref-fastwebsockets",
    "ref-tungstenite",
    "ref-uwebsockets",
    "node-ws",
];

/// The server every ratio is relative to.
const BASELINE: &str = "ref-fastwebsockets";

/// Options of `compare`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct CompareArgs {
    /// Smoke run of a few seconds with small sizes: checks correctness only
    /// (exit status 1 on a lost or mismatched message), never speed, and
    /// writes its table and plots under the target directory, not `docs/`.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Servers to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ALL_SERVERS.map(String::from))]
    pub(crate) servers: Vec<String>,
    /// Workloads to run, comma-separated (default: all). Names: echo-32,
    /// echo-1k, relay, relay-half, relay-v1, fanout-relay, fanout-topic, fanout-api,
    /// hold, hold-v1, sweep (relay-half needs relay's maximum and adds it).
    #[arg(long, value_delimiter = ',')]
    pub(crate) only: Vec<String>,
    /// Seconds of each echo and relay window.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration: f64,
    /// Seconds of each window of the connection-count sweep.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) sweep_duration: f64,
    /// Echo connections.
    #[arg(long, default_value_t = 100)]
    pub(crate) echo_connections: usize,
    /// Echo messages in flight per connection.
    #[arg(long, default_value_t = 8)]
    pub(crate) echo_inflight: usize,
    /// Connection counts of the echo (32 B) throughput sweep.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 10, 100, 1000])]
    pub(crate) sweep: Vec<usize>,
    /// Relay clients.
    #[arg(long, default_value_t = 1000)]
    pub(crate) relay_clients: usize,
    /// Relay messages in flight per client.
    #[arg(long, default_value_t = 4)]
    pub(crate) relay_inflight: usize,
    /// `relay-half`: the share of each server's maximum relay rate (its
    /// deliveries per second in the `relay` run) offered open loop, for the
    /// latency below saturation.
    #[arg(long, default_value_t = 0.5)]
    pub(crate) relay_load_share: f64,
    /// Subscribers of the fan-out through the relay (targets per frame).
    #[arg(long, default_value_t = 2000)]
    pub(crate) fanout_subscribers: usize,
    /// Subscribers of the topic and API fan-outs (Switchboard only).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) topic_subscribers: usize,
    /// Publishes per fan-out run.
    #[arg(long, default_value_t = 200)]
    pub(crate) fanout_publishes: u32,
    /// Outstanding publishes in the fan-out runs.
    #[arg(long, default_value_t = 1)]
    pub(crate) fanout_window: usize,
    /// Idle connections of the hold run (capped by the open-file limit).
    #[arg(long, default_value_t = 19_000)]
    pub(crate) hold_connections: usize,
    /// Repeat a workload (up to this many times) when other processes used
    /// more than `--disturbed-above` of a CPU during its window (not with
    /// `--quick`).
    #[arg(long, default_value_t = 2)]
    pub(crate) retries: u32,
    /// Share of one CPU used by other processes above which a workload
    /// counts as disturbed.
    #[arg(long, default_value_t = 0.25)]
    pub(crate) disturbed_above: f64,
    /// Do not run `cargo build --release` first.
    #[arg(long)]
    pub(crate) no_build: bool,
    /// Do not pin the server and the load generator to separate CPUs.
    #[arg(long)]
    pub(crate) no_pin: bool,
    /// Treat a server that cannot be built or found as a failure.
    #[arg(long)]
    pub(crate) require_all: bool,
    /// Workspace root (default: where this crate was built from).
    #[arg(long)]
    pub(crate) workspace: Option<PathBuf>,
    /// Markdown file to write the results into (between marker lines).
    #[arg(long)]
    pub(crate) doc: Option<PathBuf>,
    /// Directory for the SVG plots and `results.json`.
    #[arg(long)]
    pub(crate) plots: Option<PathBuf>,
    /// Path of the Switchboard binary (default: `<target>/release/switchboard`).
    #[arg(long)]
    pub(crate) switchboard_bin: Option<PathBuf>,
    /// Do not run anything: render the doc and plots again from a
    /// `results.json` written by an earlier run.
    #[arg(long)]
    pub(crate) render_from: Option<PathBuf>,
    /// Extra argument for the Switchboard server (repeatable; giving any
    /// replaces the default, which lifts Switchboard's per-client message
    /// rate limit because the reference servers have none).
    #[arg(
        long = "switchboard-arg",
        allow_hyphen_values = true,
        default_values_t = ["--max-message-rate".to_string(), "0".to_string()]
    )]
    pub(crate) switchboard_args: Vec<String>,
}

/// One workload's figures against one server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Measurement {
    /// Server name.
    pub(crate) server: String,
    /// Workload key (e.g. `echo-32B-c100`).
    pub(crate) workload: String,
    /// Messages (or deliveries, or handshakes) per second.
    pub(crate) rate: Option<f64>,
    /// The same per server CPU-second.
    pub(crate) per_server_cpu_sec: Option<f64>,
    /// Latency (round trip for echo, one way otherwise).
    pub(crate) latency: Option<Latency>,
    /// Publish-to-last-delivery latency (fan-out).
    pub(crate) last_delivery: Option<Latency>,
    /// Server RSS per idle connection (hold).
    pub(crate) bytes_per_connection: Option<f64>,
    /// Server CPU per handshake in µs (hold).
    pub(crate) cpu_us_per_handshake: Option<f64>,
    /// Correctness of the run.
    pub(crate) ok: bool,
    /// Which attempt this is (workloads disturbed by other processes are
    /// repeated, see `--retries`).
    #[serde(default)]
    pub(crate) attempts: u32,
    /// Error or remark.
    pub(crate) note: Option<String>,
    /// The workload's full report.
    pub(crate) report: serde_json::Value,
}

/// The whole comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct CompareReport {
    /// When the run finished (UTC).
    pub(crate) date: String,
    /// Machine description.
    pub(crate) machine: Machine,
    /// Whether server and load generator were pinned to separate CPUs.
    pub(crate) pinned: bool,
    /// Whether this was a `--quick` smoke run.
    pub(crate) quick: bool,
    /// The command line that produced it.
    pub(crate) command: String,
    /// The sizes the workloads ran with.
    #[serde(default)]
    pub(crate) plan: Plan,
    /// The workspace's git revision when the servers were built.
    #[serde(default)]
    pub(crate) revision: Option<String>,
    /// All measurements.
    pub(crate) measurements: Vec<Measurement>,
    /// Servers not run, with the reason.
    pub(crate) skipped: Vec<(String, String)>,
    /// Problems that make the run fail (missing required servers…).
    pub(crate) failures: Vec<String>,
}

/// Machine facts for the doc.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Machine {
    /// CPU model name.
    pub(crate) cpu: String,
    /// Logical CPUs.
    pub(crate) cpus: usize,
    /// Memory in GiB.
    pub(crate) mem_gib: f64,
    /// Kernel release.
    pub(crate) kernel: String,
}

impl CompareReport {
    /// True when every measurement was correct and nothing required failed.
    pub(crate) fn ok(&self) -> bool {
        self.failures.is_empty() && self.measurements.iter().all(|m| m.ok)
    }

    /// A compact summary for the final JSON line.
    pub(crate) fn summary(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .measurements
            .iter()
            .map(|m| {
                serde_json::json!({
                    "server": m.server,
                    "workload": m.workload,
                    "rate": m.rate,
                    "per_server_cpu_sec": m.per_server_cpu_sec,
                    "p99_us": m.latency.as_ref().map(|l| l.p99_us),
                    "bytes_per_connection": m.bytes_per_connection,
                    "ok": m.ok,
                })
            })
            .collect();
        serde_json::json!({
            "workload": "compare",
            "quick": self.quick,
            "pinned": self.pinned,
            "ok": self.ok(),
            "skipped": self.skipped,
            "failures": self.failures,
            "results": rows,
        })
    }
}

/// A workload as `compare` runs it.
#[derive(Clone, Debug)]
enum Workload {
    Echo {
        size: usize,
        connections: usize,
        duration: f64,
    },
    Relay {
        protocol: relay::Protocol,
    },
    /// The plain relay, open loop, at `share` of the server's maximum rate
    /// (`rate`: filled in per server from its `relay` measurement).
    RelayAtRate {
        share: f64,
        rate: Option<f64>,
    },
    Fanout {
        via: Via,
        subscribers: usize,
    },
    Hold {
        v1: bool,
    },
}

impl Workload {
    fn key(&self, plan: &Plan) -> String {
        match self {
            Self::Echo {
                size, connections, ..
            } => format!("echo-{}-c{connections}", size_label(*size)),
            Self::Relay {
                protocol: relay::Protocol::Plain,
            } => format!("relay-n{}", plan.relay_clients),
            Self::Relay {
                protocol: relay::Protocol::V1,
            } => format!("relay-v1-n{}", plan.relay_clients),
            Self::RelayAtRate { share, .. } => rate_limited_key(plan.relay_clients, *share),
            Self::Fanout { via, subscribers } => format!("fanout-{via}-n{subscribers}"),
            Self::Hold { v1: false } => format!("hold-n{}", plan.hold_connections),
            Self::Hold { v1: true } => format!("hold-v1-n{}", plan.hold_connections),
        }
    }

    fn needs_switchboard(&self) -> bool {
        matches!(
            self,
            Self::Fanout {
                via: Via::Topic | Via::Api,
                ..
            } | Self::Relay {
                protocol: relay::Protocol::V1
            } | Self::Hold { v1: true }
        )
    }
}

/// The key of the open-loop relay at `share` of the maximum rate.
fn rate_limited_key(clients: usize, share: f64) -> String {
    format!("relay-n{clients}-at-{:.0}pct-of-max", share * 100.0)
}

/// Whether `key` names an open-loop relay run (reported in its own table).
fn is_rate_limited_key(key: &str) -> bool {
    key.starts_with("relay-") && key.ends_with("pct-of-max")
}

fn size_label(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{}KiB", size / 1024)
    } else {
        format!("{size}B")
    }
}

/// Sizes after applying `--quick` (stored in the report so that it can be
/// rendered again later).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Plan {
    duration: f64,
    #[serde(default)]
    echo_connections: usize,
    echo_inflight: usize,
    relay_clients: usize,
    relay_inflight: usize,
    /// Share of the maximum relay rate offered by `relay-half`.
    #[serde(default)]
    relay_load_share: f64,
    fanout_publishes: u32,
    fanout_window: usize,
    #[serde(default)]
    fanout_subscribers: usize,
    #[serde(default)]
    topic_subscribers: usize,
    hold_connections: usize,
    /// Repeats of a disturbed workload.
    #[serde(default)]
    retries: u32,
    /// Share of a CPU used by others above which a workload is repeated.
    #[serde(default)]
    disturbed_above: f64,
    #[serde(skip)]
    workloads: Vec<Workload>,
    /// Workload keys of the sweep, by connection count.
    sweep_keys: Vec<(usize, String)>,
    /// Keys run only for the sweep (no latency plot of their own).
    sweep_only: Vec<String>,
}

impl Plan {
    fn new(a: &CompareArgs) -> Self {
        let quick = a.quick;
        let duration = if quick { 1.0 } else { a.duration };
        let echo_connections = if quick { 10 } else { a.echo_connections };
        let fanout_subscribers = if quick { 50 } else { a.fanout_subscribers };
        let topic_subscribers = if quick { 50 } else { a.topic_subscribers };
        let mut p = Self {
            duration,
            echo_connections,
            fanout_subscribers,
            topic_subscribers,
            echo_inflight: if quick { 4 } else { a.echo_inflight },
            relay_clients: if quick { 20 } else { a.relay_clients },
            relay_inflight: a.relay_inflight,
            relay_load_share: a.relay_load_share,
            fanout_publishes: if quick { 20 } else { a.fanout_publishes },
            fanout_window: a.fanout_window,
            hold_connections: if quick { 200 } else { a.hold_connections },
            // The smoke run checks correctness only: no repeats.
            retries: if quick { 0 } else { a.retries },
            disturbed_above: a.disturbed_above,
            workloads: Vec::new(),
            sweep_keys: Vec::new(),
            sweep_only: Vec::new(),
        };
        let want = |name: &str| a.only.is_empty() || a.only.iter().any(|o| o == name);
        if want("echo-32") {
            p.workloads.push(Workload::Echo {
                size: 32,
                connections: echo_connections,
                duration,
            });
        }
        if want("echo-1k") {
            p.workloads.push(Workload::Echo {
                size: 1024,
                connections: echo_connections,
                duration,
            });
        }
        // relay-half offers a share of the rate the relay run reached, so it
        // brings that run along and follows it.
        if want("relay") || want("relay-half") {
            p.workloads.push(Workload::Relay {
                protocol: relay::Protocol::Plain,
            });
        }
        if want("relay-half") {
            p.workloads.push(Workload::RelayAtRate {
                share: a.relay_load_share,
                rate: None,
            });
        }
        if want("relay-v1") {
            p.workloads.push(Workload::Relay {
                protocol: relay::Protocol::V1,
            });
        }
        if want("fanout-relay") {
            p.workloads.push(Workload::Fanout {
                via: Via::Relay,
                subscribers: fanout_subscribers,
            });
        }
        // The same relay fan-out at the topic's subscriber count, so the
        // topic figure has a reference measured at its own size (more
        // sockets cost every server more per delivery).
        if want("fanout-relay") && topic_subscribers != fanout_subscribers {
            p.workloads.push(Workload::Fanout {
                via: Via::Relay,
                subscribers: topic_subscribers,
            });
        }
        if want("fanout-topic") {
            p.workloads.push(Workload::Fanout {
                via: Via::Topic,
                subscribers: topic_subscribers,
            });
        }
        if want("fanout-api") {
            p.workloads.push(Workload::Fanout {
                via: Via::Api,
                subscribers: fanout_subscribers,
            });
        }
        if want("hold") {
            p.workloads.push(Workload::Hold { v1: false });
        }
        if want("hold-v1") {
            p.workloads.push(Workload::Hold { v1: true });
        }
        if want("sweep") && !quick {
            for &c in &a.sweep {
                let w = Workload::Echo {
                    size: 32,
                    connections: c,
                    duration: a.sweep_duration,
                };
                let key = w.key(&p);
                if !p.workloads.iter().any(|x| x.key(&p) == key) {
                    p.workloads.push(w);
                    p.sweep_only.push(key.clone());
                }
                p.sweep_keys.push((c, key));
            }
        }
        p
    }
}

/// How to start one server.
#[derive(Clone, Debug)]
struct ServerSpec {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Runs the comparison.
pub(crate) async fn run(args: &CompareArgs) -> Result<CompareReport> {
    let workspace = match &args.workspace {
        Some(w) => w.clone(),
        None => default_workspace()?,
    };
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace.join(p)
            }
        })
        .unwrap_or_else(|| workspace.join("target"));
    let release_dir = target_dir.join("release");
    let out_root = target_dir.join("switchboard-bench");
    let (doc_path, plot_dir) = if args.quick {
        (
            args.doc
                .clone()
                .unwrap_or_else(|| out_root.join("quick").join("benchmarks.md")),
            args.plots
                .clone()
                .unwrap_or_else(|| out_root.join("quick").join("bench")),
        )
    } else {
        (
            args.doc
                .clone()
                .unwrap_or_else(|| workspace.join("docs").join("benchmarks.md")),
            args.plots
                .clone()
                .unwrap_or_else(|| workspace.join("docs").join("bench")),
        )
    };
    if let Some(path) = &args.render_from {
        let text = tokio::fs::read_to_string(path)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        let report: CompareReport =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        write_outputs(&report, &doc_path, &plot_dir).await?;
        return Ok(report);
    }
    let log_dir = out_root.join("logs");
    tokio::fs::create_dir_all(&log_dir).await?;

    if !(args.relay_load_share.is_finite()
        && args.relay_load_share > 0.0
        && args.relay_load_share <= 1.0)
    {
        bail!(
            "--relay-load-share {}: give a share of the maximum rate above 0 and at most 1 (e.g. 0.5)",
            args.relay_load_share
        );
    }
    let mut plan = Plan::new(args);
    // Both ends of every held connection need a descriptor: this process
    // holds the client sockets, the server (which inherits the limit) the
    // others. Leave room for pipes, logs and listeners.
    let nofile = stats::raise_nofile_limit().unwrap_or(1024);
    let max_hold = usize::try_from(nofile)
        .unwrap_or(usize::MAX)
        .saturating_sub(256);
    if plan.hold_connections > max_hold {
        println!(
            "note: holding {max_hold} instead of {} connections (open-file limit {nofile})",
            plan.hold_connections
        );
        plan.hold_connections = max_hold;
    }
    let mut skipped: Vec<(String, String)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();

    let revision = git_revision(&workspace).await;
    // Build before pinning, so that cargo may use every CPU.
    let mut build_failed: BTreeMap<String, String> = BTreeMap::new();
    if !args.no_build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        println!(
            "building the reference servers (cargo build --release -p switchboard-bench --bins)"
        );
        if let Err(e) =
            cargo_build(&cargo, &workspace, &["-p", "switchboard-bench", "--bins"]).await
        {
            bail!("building switchboard-bench failed: {e:#}");
        }
        if args.servers.iter().any(|s| s == "ref-uwebsockets") {
            println!(
                "building ref-uwebsockets (C++, uWebSockets from the libuwebsockets-sys package)"
            );
            match crate::uws_build::build(
                &workspace,
                &release_dir.join("ref-uwebsockets"),
                &crate::uws_build::work_dir(&target_dir),
            )
            .await
            {
                Ok(source) => println!("  from {}", source.display()),
                Err(e) => {
                    build_failed.insert("ref-uwebsockets".into(), format!("{e:#}"));
                }
            }
        }
        if args.servers.iter().any(|s| s == "switchboard") && args.switchboard_bin.is_none() {
            println!("building Switchboard (cargo build --release -p switchboard-cli)");
            if let Err(e) = cargo_build(&cargo, &workspace, &["-p", "switchboard-cli"]).await {
                build_failed.insert("switchboard".into(), format!("{e:#}"));
            }
        }
    }

    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let find_bin = |name: &str| -> Option<PathBuf> {
        let mut dirs = vec![release_dir.clone()];
        if args.no_build
            && let Some(d) = &exe_dir
        {
            dirs.insert(0, d.clone());
        }
        dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
    };

    let mut specs: Vec<ServerSpec> = Vec::new();
    for name in &args.servers {
        let spec = match name.as_str() {
            "switchboard" => {
                // A failed build must not silently fall back to an older
                // binary left in the target directory.
                let bin = match build_failed.get("switchboard") {
                    Some(_) => None,
                    None => args
                        .switchboard_bin
                        .clone()
                        .or_else(|| find_bin("switchboard")),
                };
                match bin {
                    Some(program) => {
                        let mut a = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
                        a.extend(args.switchboard_args.iter().cloned());
                        Ok(ServerSpec {
                            name: name.clone(),
                            program,
                            args: a,
                            env: Vec::new(),
                        })
                    }
                    None => Err(match build_failed.get("switchboard") {
                        Some(e) => format!(
                            "the Switchboard binary could not be built ({e}); an older binary, if any, was not used"
                        ),
                        None => format!(
                            "no Switchboard binary at {}",
                            release_dir.join("switchboard").display()
                        ),
                    }),
                }
            }
            "ref-fastwebsockets" | "ref-tungstenite" => match find_bin(name) {
                Some(program) => Ok(ServerSpec {
                    name: name.clone(),
                    program,
                    args: vec!["--listen".into(), "127.0.0.1:0".into()],
                    env: Vec::new(),
                }),
                None => Err(format!(
                    "binary {name} not found in {}",
                    release_dir.display()
                )),
            },
            // A failed build must not fall back to an older binary.
            "ref-uwebsockets" => match (build_failed.get(name.as_str()), find_bin(name)) {
                (Some(e), _) => Err(format!("it could not be built: {e}")),
                (None, Some(program)) => Ok(ServerSpec {
                    name: name.clone(),
                    program,
                    args: vec!["--listen".into(), "127.0.0.1:0".into()],
                    env: Vec::new(),
                }),
                (None, None) => Err(format!(
                    "binary {name} not found in {} (built by compare without --no-build, or by `switchboard-bench build-uws`)",
                    release_dir.display()
                )),
            },
            "node-ws" => prepare_node(&workspace, &out_root).await,
            other => Err(format!(
                "unknown server {other:?} (known: {})",
                ALL_SERVERS.join(", ")
            )),
        };
        match spec {
            Ok(s) => specs.push(s),
            Err(reason) => {
                println!("skipping {name}: {reason}");
                if args.require_all {
                    failures.push(format!("{name}: {reason}"));
                }
                skipped.push((name.clone(), reason));
            }
        }
    }

    // Read before pinning: the CPU count follows this process's affinity.
    let machine = machine_info();
    let pinned = !args.no_pin && pin_self_to_cpu1().await;
    if pinned {
        println!("pinned: servers on CPU 0 (taskset -c 0), load generator on CPU 1");
    } else {
        println!("not pinned: servers and load generator share all CPUs");
    }

    let mut measurements = Vec::new();
    // Servers take turns on each workload, so that whatever else the machine
    // is doing at some moment affects the servers being compared alike.
    for w in &plan.workloads {
        for spec in &specs {
            if w.needs_switchboard() && spec.name != "switchboard" {
                continue;
            }
            let key = w.key(&plan);
            println!("\n=== {}: {key} ===", spec.name);
            let w = &match w {
                Workload::RelayAtRate { share, .. } => Workload::RelayAtRate {
                    share: *share,
                    rate: max_relay_rate(&measurements, &spec.name, &plan).map(|r| r * share),
                },
                other => other.clone(),
            };
            let mut attempt = 1;
            let m = loop {
                let mut m = match run_one(spec, w, &plan, pinned, &log_dir).await {
                    Ok(m) => m,
                    Err(e) => {
                        println!("  error: {e:#}");
                        let mut m = empty_measurement(serde_json::Value::Null);
                        m.server = spec.name.clone();
                        m.workload = key.clone();
                        m.note = Some(format!("{e:#}"));
                        m
                    }
                };
                m.attempts = attempt;
                // Let the kernel finish tearing down the previous connections.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let other = share_of_cpu(&m, "other_cpu_secs");
                match other {
                    Some(o) if o > args.disturbed_above && attempt <= plan.retries => {
                        println!(
                            "  disturbed: other processes used {:.0}% of a CPU during the window; \
                             repeating in 5 s ({attempt}/{})",
                            o * 100.0,
                            plan.retries
                        );
                        attempt += 1;
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    _ => break m,
                }
            };
            measurements.push(m);
        }
    }

    let report = CompareReport {
        date: utc_now(),
        machine,
        pinned,
        quick: args.quick,
        command: command_line(),
        plan,
        revision,
        measurements,
        skipped,
        failures,
    };
    write_outputs(&report, &doc_path, &plot_dir).await?;
    Ok(report)
}

/// The deliveries per second of `server`'s correct plain relay run, if any:
/// the maximum rate `relay-half` takes its share of.
fn max_relay_rate(measurements: &[Measurement], server: &str, plan: &Plan) -> Option<f64> {
    let key = format!("relay-n{}", plan.relay_clients);
    measurements
        .iter()
        .find(|m| m.server == server && m.workload == key && m.ok)
        .and_then(|m| m.rate)
        .filter(|r| *r > 0.0)
}

/// Writes `results.json`, the plots and the doc section of a report.
async fn write_outputs(report: &CompareReport, doc_path: &Path, plot_dir: &Path) -> Result<()> {
    tokio::fs::create_dir_all(plot_dir).await?;
    let plots = plot::write_all(
        report,
        &report.plan.sweep_keys,
        &report.plan.sweep_only,
        plot_dir,
    )?;
    tokio::fs::write(
        plot_dir.join("results.json"),
        serde_json::to_string_pretty(report)? + "\n",
    )
    .await?;
    let doc_dir = doc_path.parent().unwrap_or(Path::new("."));
    let section = render_markdown(report, &plots, doc_dir);
    write_doc(doc_path, &section).await?;
    println!("\n{section}");
    println!(
        "wrote {} and plots in {}",
        doc_path.display(),
        plot_dir.display()
    );
    Ok(())
}

/// `git rev-parse --short HEAD`, noting uncommitted changes to the servers'
/// sources; `None` outside a git checkout.
async fn git_revision(workspace: &Path) -> Option<String> {
    let head = Command::new("git")
        .arg("-C")
        .arg(workspace)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .await
        .ok()
        .filter(|o| o.status.success())?;
    let rev = String::from_utf8_lossy(&head.stdout).trim().to_string();
    let dirty = Command::new("git")
        .arg("-C")
        .arg(workspace)
        .args([
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "crates",
            "Cargo.toml",
            "Cargo.lock",
        ])
        .output()
        .await
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    Some(if dirty {
        format!("{rev} with uncommitted changes")
    } else {
        rev
    })
}

fn default_workspace() -> Result<PathBuf> {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("cannot derive the workspace root; pass --workspace"))
}

async fn cargo_build(cargo: &std::ffi::OsStr, workspace: &Path, extra: &[&str]) -> Result<()> {
    let status = Command::new(cargo)
        .arg("build")
        .arg("--release")
        .args(extra)
        .current_dir(workspace)
        .status()
        .await
        .context("running cargo")?;
    if !status.success() {
        bail!(
            "cargo build --release {} exited with {status}",
            extra.join(" ")
        );
    }
    Ok(())
}

/// Finds `node`, installs the `ws` package under the target directory if
/// needed, and returns how to start the Node server.
async fn prepare_node(
    workspace: &Path,
    out_root: &Path,
) -> std::result::Result<ServerSpec, String> {
    let version = Command::new("node")
        .arg("--version")
        .output()
        .await
        .map_err(|_| "node is not installed".to_string())?;
    if !version.status.success() {
        return Err("node --version failed".into());
    }
    let script = workspace
        .join("crates")
        .join("switchboard-bench")
        .join("node")
        .join("ws-server.js");
    if !script.is_file() {
        return Err(format!("{} is missing", script.display()));
    }
    let prefix = out_root.join("node");
    let modules = prefix.join("node_modules");
    if !modules.join("ws").join("package.json").is_file() {
        println!("installing the npm package ws into {}", prefix.display());
        std::fs::create_dir_all(&prefix).map_err(|e| e.to_string())?;
        let status = Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--prefix",
            ])
            .arg(&prefix)
            .arg("ws@8")
            .stdout(Stdio::null())
            .status()
            .await
            .map_err(|e| format!("npm could not run: {e}"))?;
        if !status.success() {
            return Err(format!("npm install ws failed ({status})"));
        }
    }
    Ok(ServerSpec {
        name: "node-ws".into(),
        program: PathBuf::from("node"),
        args: vec![
            script.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
        env: vec![("NODE_PATH".into(), modules.display().to_string())],
    })
}

/// Pins every thread of this process to CPU 1 with `taskset`; false if that
/// is not possible (fewer than 2 CPUs, no taskset).
async fn pin_self_to_cpu1() -> bool {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return false;
    }
    let pid = std::process::id().to_string();
    match Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &pid])
        .stdout(Stdio::null())
        .status()
        .await
    {
        Ok(s) => s.success(),
        Err(_) => false,
    }
}

/// A started server.
struct RunningServer {
    child: Child,
    pid: u32,
    addr: SocketAddr,
}

async fn start_server(spec: &ServerSpec, pinned: bool, log_dir: &Path) -> Result<RunningServer> {
    let mut cmd = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(&spec.program);
        c
    } else {
        Command::new(&spec.program)
    };
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", spec.program.display()))?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow!("{} exited immediately", spec.name))?;
    let log_path = log_dir.join(format!("{}.log", spec.name));
    let log = std::sync::Arc::new(tokio::sync::Mutex::new(
        tokio::fs::File::create(&log_path).await?,
    ));
    let (addr_tx, mut addr_rx) = mpsc::unbounded_channel::<SocketAddr>();
    let stdout = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    let stderr = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    for pipe in [stdout, stderr].into_iter().flatten() {
        let (log, addr_tx) = (log.clone(), addr_tx.clone());
        // Keep draining the pipe for the server's whole life so it never
        // blocks on a full pipe.
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = parse_listening(&line) {
                    let _ = addr_tx.send(addr);
                }
                let mut f = log.lock().await;
                let _ = f.write_all(line.as_bytes()).await;
                let _ = f.write_all(b"\n").await;
            }
        });
    }
    drop(addr_tx);
    let addr = tokio::time::timeout(Duration::from_secs(20), addr_rx.recv()).await;
    match addr {
        Ok(Some(addr)) => Ok(RunningServer { child, pid, addr }),
        _ => {
            let _ = child.kill().await;
            let tail = tokio::fs::read_to_string(&log_path)
                .await
                .unwrap_or_default()
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            bail!(
                "{} did not print \"listening on http://ADDR\" within 20 s; log tail:\n{tail}",
                spec.name
            )
        }
    }
}

/// Extracts the address from a line containing `listening on http://ADDR`
/// (ANSI colour codes and trailing punctuation are ignored).
fn parse_listening(line: &str) -> Option<SocketAddr> {
    let clean = strip_ansi(line);
    let start = clean.find("listening on http://")? + "listening on http://".len();
    let rest = &clean[start..];
    let end = rest
        .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '/' | ')'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn stop_server(mut server: RunningServer) {
    if let Ok(pid) = i32::try_from(server.pid)
        && let Some(pid) = rustix::process::Pid::from_raw(pid)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(Duration::from_secs(3), server.child.wait())
        .await
        .is_err()
    {
        let _ = server.child.kill().await;
    }
}

async fn run_one(
    spec: &ServerSpec,
    w: &Workload,
    plan: &Plan,
    pinned: bool,
    log_dir: &Path,
) -> Result<Measurement> {
    let server = start_server(spec, pinned, log_dir).await?;
    let result = run_workload(&server, w, plan).await;
    let exited = server.child.id().is_none();
    stop_server(server).await;
    let (mut m, ok) = result?;
    m.server = spec.name.clone();
    m.workload = w.key(plan);
    m.ok = ok;
    if exited {
        m.ok = false;
        m.note = Some("server exited during the run".into());
    }
    Ok(m)
}

fn empty_measurement(report: serde_json::Value) -> Measurement {
    Measurement {
        server: String::new(),
        workload: String::new(),
        rate: None,
        per_server_cpu_sec: None,
        latency: None,
        last_delivery: None,
        bytes_per_connection: None,
        cpu_us_per_handshake: None,
        ok: false,
        attempts: 1,
        note: None,
        report,
    }
}

async fn run_workload(
    server: &RunningServer,
    w: &Workload,
    plan: &Plan,
) -> Result<(Measurement, bool)> {
    let addr = server.addr;
    let pid = Some(server.pid);
    Ok(match w {
        Workload::Echo {
            size,
            connections,
            duration,
        } => {
            let r = echo::run(&EchoArgs {
                url: format!("ws://{addr}/echo"),
                connections: *connections,
                size: *size,
                inflight: plan.echo_inflight,
                duration: *duration,
                text: false,
                server_pid: pid,
                connect_concurrency: 64,
                drain: 5.0,
            })
            .await?;
            r.print();
            let mut m = empty_measurement(serde_json::to_value(&r)?);
            m.rate = Some(r.msgs_per_sec);
            m.per_server_cpu_sec = r.msgs_per_server_cpu_sec;
            m.latency = Some(r.latency.clone());
            m.note = r.first_error.clone();
            (m, r.ok)
        }
        Workload::RelayAtRate { rate, .. } => {
            let Some(rate) = *rate else {
                bail!(
                    "no maximum rate to take a share of: this server's relay run did not \
                     complete correctly"
                );
            };
            let r = relay::run(&RelayArgs {
                protocol: relay::Protocol::Plain,
                urls: vec![format!("ws://{addr}/ws")],
                clients: plan.relay_clients,
                inflight: plan.relay_inflight,
                duration: plan.duration,
                drain: 3.0,
                server_pids: pid.into_iter().collect(),
                connect_concurrency: 64,
                rate: Some(rate),
            })
            .await?;
            r.print();
            let mut m = empty_measurement(serde_json::to_value(&r)?);
            m.rate = Some(r.delivered_per_sec);
            m.per_server_cpu_sec = r.delivered_per_server_cpu_sec;
            m.latency = Some(r.latency.clone());
            m.note = r
                .first_error
                .clone()
                .or_else(|| (r.lost > 0).then(|| format!("{} lost", r.lost)));
            (m, r.ok)
        }
        Workload::Relay { protocol } => {
            let r = relay::run(&RelayArgs {
                rate: None,
                protocol: *protocol,
                urls: vec![format!("ws://{addr}/ws")],
                clients: plan.relay_clients,
                inflight: plan.relay_inflight,
                duration: plan.duration,
                drain: 3.0,
                server_pids: pid.into_iter().collect(),
                connect_concurrency: 64,
            })
            .await?;
            r.print();
            let mut m = empty_measurement(serde_json::to_value(&r)?);
            m.rate = Some(r.delivered_per_sec);
            m.per_server_cpu_sec = r.delivered_per_server_cpu_sec;
            m.latency = Some(r.latency.clone());
            m.note = r
                .first_error
                .clone()
                .or_else(|| (r.lost > 0).then(|| format!("{} lost", r.lost)));
            (m, r.ok)
        }
        Workload::Fanout { via, subscribers } => {
            let r = fanout::run(&FanoutArgs {
                url: format!("ws://{addr}/ws"),
                via: *via,
                subscribers: *subscribers,
                publishes: plan.fanout_publishes,
                window: plan.fanout_window,
                size: 100,
                topic: "bench".into(),
                drain: 5.0,
                server_pid: pid,
                connect_concurrency: 64,
            })
            .await?;
            r.print();
            let mut m = empty_measurement(serde_json::to_value(&r)?);
            m.rate = Some(r.deliveries_per_sec);
            m.per_server_cpu_sec = r.deliveries_per_server_cpu_sec;
            m.latency = Some(r.latency.clone());
            m.last_delivery = Some(r.last_delivery.clone());
            m.note = r
                .first_error
                .clone()
                .or_else(|| (r.lost > 0).then(|| format!("{} lost", r.lost)));
            (m, r.ok)
        }
        Workload::Hold { v1 } => {
            let r = hold::run(&HoldArgs {
                url: format!("ws://{addr}/ws"),
                connections: plan.hold_connections,
                concurrency: 64,
                source_addrs: 8,
                settle: 2.0,
                hold: 0.0,
                server_pid: pid,
                v1: *v1,
                compression: false,
                exchange: false,
                exchange_size: 1024,
                exchange_uncompressed: false,
            })
            .await?;
            r.print();
            let mut m = empty_measurement(serde_json::to_value(&r)?);
            m.rate = Some(r.handshakes_per_sec);
            m.per_server_cpu_sec = r
                .server_cpu_us_per_handshake
                .filter(|&us| us > 0.0)
                .map(|us| 1e6 / us);
            m.bytes_per_connection = r.server_bytes_per_connection;
            m.cpu_us_per_handshake = r.server_cpu_us_per_handshake;
            m.note = r.first_error.clone();
            (m, r.ok)
        }
    })
}

fn machine_info() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown CPU".to_string(), |(_, v)| v.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mem_gib: mem_kb / 1024.0 / 1024.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("switchboard-bench {}", args.join(" "))
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

fn ratio(x: Option<f64>, base: Option<f64>) -> String {
    match (x, base) {
        (Some(x), Some(b)) if b > 0.0 => format!("{:.2}×", x / b),
        _ => "–".into(),
    }
}

fn opt_rate(x: Option<f64>) -> String {
    x.map_or_else(|| "–".into(), fmt_rate)
}

fn describe(w: &str, plan: &Plan) -> String {
    if let Some(rest) = w.strip_prefix("echo-") {
        format!(
            "echo {} ({} in flight per connection), messages",
            rest.replace("-c", ", connections "),
            plan.echo_inflight
        )
    } else if w.starts_with("relay-") {
        format!(
            "relay{}, {} clients, {} in flight each, deliveries",
            if w.starts_with("relay-v1-") {
                " over switchboard.v1 (acks, inbox)"
            } else {
                ""
            },
            plan.relay_clients,
            plan.relay_inflight
        )
    } else if let Some(rest) = w.strip_prefix("fanout-") {
        let (via, n) = rest.split_once("-n").unwrap_or((rest, "?"));
        format!(
            "fan-out via {via}, {n} subscribers, {} publishes of 100 B, deliveries",
            plan.fanout_publishes
        )
    } else {
        w.to_string()
    }
}

fn render_markdown(report: &CompareReport, plots: &[PathBuf], doc_dir: &Path) -> String {
    use std::fmt::Write as _;
    let plan = &report.plan;
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN_MARK}");
    let _ = writeln!(
        s,
        "## Results{}\n",
        if report.quick {
            " (quick smoke run — not a benchmark)"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "Generated by `{}` on {}.\n", report.command, report.date);
    let _ = writeln!(
        s,
        "Machine: {}, {} CPUs, {:.0} GiB RAM, Linux {}. {}\n",
        report.machine.cpu,
        report.machine.cpus,
        report.machine.mem_gib,
        report.machine.kernel,
        if report.pinned {
            "Servers pinned to CPU 0 (`taskset -c 0`), load generator pinned to CPU 1 (`taskset -a -p -c 1`)."
        } else {
            "Not pinned: servers and the load generator shared all CPUs."
        }
    );
    if let Some(rev) = &report.revision {
        let _ = writeln!(s, "Servers built from the workspace at commit {rev}.\n");
    }
    for (name, reason) in &report.skipped {
        let _ = writeln!(s, "- Skipped **{name}**: {reason}");
    }
    if !report.skipped.is_empty() {
        s.push('\n');
    }

    let mut workloads: Vec<&str> = Vec::new();
    for m in &report.measurements {
        if !workloads.contains(&m.workload.as_str()) {
            workloads.push(&m.workload);
        }
    }
    let find = |server: &str, w: &str| {
        report
            .measurements
            .iter()
            .find(|m| m.server == server && m.workload == w)
    };

    let _ = writeln!(
        s,
        "### Throughput and latency\n\n\
         \"per server CPU-s\" divides the count by the server's user+system CPU time over the \
         measured window (`/proc/PID/stat`); it is the figure to compare, because the load \
         generator competes for the same two cores. \"server CPU\" and \"load-gen CPU\" are the \
         CPU time of each side as a share of one core over the window: a server below ~100% \
         was waiting for the load generator. \"other CPU\" is what every other process on \
         the machine used meanwhile (system busy time from `/proc/stat` minus both sides): \
         above a few percent, the per-second figures of that row were disturbed (per-CPU-second \
         figures much less so); a workload during which other processes used more than {:.0}% \
         of a CPU was repeated, up to {} times (\"try N\"). Ratios are relative to {BASELINE} \
         (higher is better). Latency is round trip for echo and one way (send → delivery) \
         otherwise; \"last\" is publish → last subscriber.\n",
        plan.disturbed_above * 100.0,
        plan.retries
    );
    let _ = writeln!(
        s,
        "| workload | server | per second | per server CPU-s | vs {BASELINE} (per CPU-s) | server CPU | load-gen CPU | other CPU | p50 | p99 | p99.9 | max | correct |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for w in &workloads {
        if w.starts_with("hold-") || is_rate_limited_key(w) {
            continue;
        }
        let base = find(BASELINE, w).and_then(|m| m.per_server_cpu_sec);
        for m in report.measurements.iter().filter(|m| m.workload == *w) {
            let lat = |f: fn(&Latency) -> f64| {
                m.latency
                    .as_ref()
                    .filter(|l| l.count > 0)
                    .map_or_else(|| "–".into(), |l| fmt_us(f(l)))
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                describe(w, plan),
                m.server,
                opt_rate(m.rate),
                opt_rate(m.per_server_cpu_sec),
                ratio(m.per_server_cpu_sec, base),
                utilisation(m, "server_cpu_secs"),
                utilisation(m, "client_cpu_secs"),
                other_cell(m),
                lat(|l| l.p50_us),
                lat(|l| l.p99_us),
                lat(|l| l.p999_us),
                lat(|l| l.max_us),
                verdict(m)
            );
            if let Some(last) = m.last_delivery.as_ref().filter(|l| l.count > 0) {
                let _ = writeln!(
                    s,
                    "| ↳ last delivery of each publish | {} | | | | | | | {} | {} | {} | {} | |",
                    m.server,
                    fmt_us(last.p50_us),
                    fmt_us(last.p99_us),
                    fmt_us(last.p999_us),
                    fmt_us(last.max_us)
                );
            }
        }
    }

    s.push_str(&rate_limited_section(report, &workloads));

    if let Some(w) = workloads
        .iter()
        .find(|w| w.starts_with("hold-") && !w.starts_with("hold-v1-"))
    {
        let base = find(BASELINE, w).and_then(|m| m.bytes_per_connection);
        let _ = writeln!(
            s,
            "\n### Idle connections ({} held, `hold`)\n\n\
             RSS growth of the server process divided by the connections opened (read from \
             `VmRSS` before opening and 2 s after the last handshake); ratio: lower is leaner. \
             Kernel memory is not in the RSS: the kernel column is the system-wide growth of TCP \
             socket buffer pages (`/proc/net/sockstat`) and of slab (`/proc/meminfo`, noisy) per \
             connection, for both the client and the server socket of each loopback connection.\n",
            plan.hold_connections
        );
        let _ = writeln!(
            s,
            "| server | opened | handshakes/s | server CPU per handshake | RSS per idle connection | vs {BASELINE} | kernel per connection (both ends: TCP buffers + slab) | other CPU while opening | correct |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
        // Plain connections of every server, then Switchboard's v1 ones.
        let held = report
            .measurements
            .iter()
            .filter(|m| m.workload == *w || m.workload.starts_with("hold-v1-"));
        for m in held {
            let server = if m.workload.starts_with("hold-v1-") {
                format!("{} (switchboard.v1, after hello)", m.server)
            } else {
                m.server.clone()
            };
            let opened = m
                .report
                .get("opened")
                .and_then(serde_json::Value::as_u64)
                .map_or_else(|| "–".into(), |n| n.to_string());
            let kernel = match (
                m.report
                    .get("kernel_tcp_bytes_per_connection")
                    .and_then(serde_json::Value::as_f64),
                m.report
                    .get("kernel_slab_bytes_per_connection")
                    .and_then(serde_json::Value::as_f64),
            ) {
                (Some(t), Some(sl)) => format!("{:.1} KiB + {:.1} KiB", t / 1024.0, sl / 1024.0),
                _ => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {kernel} | {} | {} |",
                server,
                opened,
                opt_rate(m.rate),
                m.cpu_us_per_handshake
                    .map_or_else(|| "–".into(), |us| format!("{us:.1} µs")),
                m.bytes_per_connection
                    .map_or_else(|| "–".into(), |b| format!("{:.1} KiB", b / 1024.0)),
                ratio(m.bytes_per_connection, base),
                other_cell(m),
                verdict(m)
            );
        }
    }

    s.push_str(&targets_section(report));

    if !plots.is_empty() {
        let _ = writeln!(s, "\n### Plots\n");
        for p in plots {
            let rel = relative_path(p, doc_dir);
            let name = p
                .file_stem()
                .map(|n| n.to_string_lossy().replace('-', " "))
                .unwrap_or_default();
            let _ = writeln!(s, "![{name}]({rel})\n");
        }
    }
    let _ = writeln!(s, "{END_MARK}");
    s
}

/// The open-loop relay runs (`relay-half`): each server at a share of its
/// own maximum relay rate, with the latency percentiles (issue #15, "Also").
fn rate_limited_section(report: &CompareReport, workloads: &[&str]) -> String {
    use std::fmt::Write as _;
    let plan = &report.plan;
    let mut s = String::new();
    for w in workloads.iter().filter(|w| is_rate_limited_key(w)) {
        let _ = writeln!(
            s,
            "\n### Relay latency at {:.0}% of each server's maximum rate\n\n\
             The relay of the table above ({} clients), open loop: the clients send \
             {:.0}% of the deliveries per second that server reached there (\"max\"), \
             evenly spread over clients and time, for {} s, whatever the server answers; \
             latency is one way, from when each message was due to its delivery (a late \
             sender does not hide delay).\n",
            plan.relay_load_share * 100.0,
            plan.relay_clients,
            plan.relay_load_share * 100.0,
            plan.duration
        );
        let _ = writeln!(
            s,
            "| server | max (closed loop) | offered | delivered per second | server CPU | load-gen CPU | other CPU | p50 | p99 | p99.9 | max latency | lost | correct |"
        );
        let _ = writeln!(
            s,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for m in report.measurements.iter().filter(|m| m.workload == *w) {
            let max = max_relay_rate(&report.measurements, &m.server, plan);
            let offered = m.report["offered_rate"].as_f64();
            let lat = |f: fn(&Latency) -> f64| {
                m.latency
                    .as_ref()
                    .filter(|l| l.count > 0)
                    .map_or_else(|| "–".into(), |l| fmt_us(f(l)))
            };
            let lost = m.report["lost"]
                .as_u64()
                .map_or_else(|| "–".into(), |l| l.to_string());
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {lost} | {} |",
                m.server,
                opt_rate(max),
                opt_rate(offered),
                opt_rate(m.rate),
                utilisation(m, "server_cpu_secs"),
                utilisation(m, "client_cpu_secs"),
                other_cell(m),
                lat(|l| l.p50_us),
                lat(|l| l.p99_us),
                lat(|l| l.p999_us),
                lat(|l| l.max_us),
                verdict(m)
            );
        }
    }
    s
}

/// (target, measured, goal, floor, goal met, floor met)
type TargetRow = (String, String, String, String, Option<bool>, Option<bool>);

/// The targets of issue #4, checked against this run's Switchboard figures
/// (empty when Switchboard was not measured).
fn targets_section(report: &CompareReport) -> String {
    use std::fmt::Write as _;
    const SB: &str = "switchboard";
    let plan = &report.plan;
    let get = |server: &str, key: &str| {
        report
            .measurements
            .iter()
            .find(|m| m.server == server && m.workload == key && m.ok)
    };
    if !report.measurements.iter().any(|m| m.server == SB) {
        return String::new();
    }
    let per_cpu = |server: &str, key: &str| get(server, key).and_then(|m| m.per_server_cpu_sec);
    // (target, measured, goal, floor, goal met, floor met)
    let mut rows: Vec<TargetRow> = Vec::new();
    let ratio_row = |what: String, key: String, goal: f64, floor: f64| {
        let r = per_cpu(SB, &key)
            .zip(per_cpu(BASELINE, &key))
            .map(|(a, b)| a / b);
        (
            what,
            r.map_or_else(|| "–".into(), |r| format!("{r:.2}×")),
            format!("≥ {goal}×"),
            format!("≥ {floor}×"),
            r.map(|r| r >= goal),
            r.map(|r| r >= floor),
        )
    };
    let c = plan.echo_connections;
    rows.push(ratio_row(
        format!("echo 32 B, {c} connections: per server CPU-s vs {BASELINE}"),
        format!("echo-32B-c{c}"),
        1.2,
        1.0,
    ));
    rows.push(ratio_row(
        format!("echo 1 KiB, {c} connections: per server CPU-s vs {BASELINE}"),
        format!("echo-1KiB-c{c}"),
        1.2,
        1.0,
    ));
    let relay_key = format!("relay-n{}", plan.relay_clients);
    let mut relay = ratio_row(
        format!(
            "relay, {} clients: deliveries per server CPU-s vs {BASELINE}, zero lost",
            plan.relay_clients
        ),
        relay_key.clone(),
        2.0,
        1.0,
    );
    if let Some(m) = get(SB, &relay_key) {
        let lost = m.report["lost"].as_u64().unwrap_or(0);
        relay.1 = format!("{}, {lost} lost", relay.1);
        relay.4 = relay.4.map(|ok| ok && lost == 0);
        relay.5 = relay.5.map(|ok| ok && lost == 0);
    }
    rows.push(relay);
    // Issue #13: v1 (an ack per send, a seq and an inbox entry per
    // delivery) against the plain relay, both Switchboard, same run.
    let v1_key = format!("relay-v1-n{}", plan.relay_clients);
    let v1 = per_cpu(SB, &v1_key)
        .zip(per_cpu(SB, &relay_key))
        .map(|(v1, plain)| v1 / plain);
    if get(SB, &v1_key).is_some() {
        rows.push((
            format!(
                "relay over switchboard.v1, {} clients: per server CPU-s vs Switchboard's plain relay",
                plan.relay_clients
            ),
            v1.map_or_else(|| "–".into(), |r| format!("{r:.2}×")),
            "≥ 0.7×".into(),
            "≥ 0.7×".into(),
            v1.map(|r| r >= 0.7),
            v1.map(|r| r >= 0.7),
        ));
    }
    // Each fan-out is held against the tokio-tungstenite relay fan-out to
    // the same number of subscribers.
    for (key, subscribers) in [
        (
            format!("fanout-topic-n{}", plan.topic_subscribers),
            plan.topic_subscribers,
        ),
        (
            format!("fanout-relay-n{}", plan.fanout_subscribers),
            plan.fanout_subscribers,
        ),
    ] {
        let x = per_cpu(SB, &key);
        let tung_fanout = per_cpu("ref-tungstenite", &format!("fanout-relay-n{subscribers}"));
        rows.push((
            format!("{key}: deliveries per server CPU-s"),
            x.map_or_else(|| "–".into(), fmt_rate),
            "≥ 1,000,000".into(),
            tung_fanout.map_or_else(
                || "2× ref-tungstenite (not measured)".into(),
                |t| {
                    format!(
                        "≥ {} (2× ref-tungstenite relay fan-out, {subscribers} subscribers)",
                        fmt_rate(2.0 * t)
                    )
                },
            ),
            x.map(|x| x >= 1_000_000.0),
            x.zip(tung_fanout).map(|(x, t)| x >= 2.0 * t),
        ));
    }
    let last_key = format!("fanout-relay-n{}", plan.fanout_subscribers);
    let last = get(SB, &last_key)
        .and_then(|m| m.last_delivery.as_ref())
        .map(|l| l.p99_us);
    rows.push((
        format!(
            "fan-out to {} subscribers (relay): p99 publish → last delivery",
            plan.fanout_subscribers
        ),
        last.map_or_else(|| "–".into(), fmt_us),
        "≤ 50ms".into(),
        "≤ 50ms".into(),
        last.map(|us| us <= 50_000.0),
        last.map(|us| us <= 50_000.0),
    ));
    let hold_key = format!("hold-n{}", plan.hold_connections);
    let bytes = get(SB, &hold_key).and_then(|m| m.bytes_per_connection);
    rows.push((
        format!(
            "server RSS per idle connection ({} held)",
            plan.hold_connections
        ),
        bytes.map_or_else(|| "–".into(), |b| format!("{b:.0} B")),
        "≤ 1,024 B".into(),
        "≤ 4,096 B".into(),
        bytes.map(|b| b <= 1024.0),
        bytes.map(|b| b <= 4096.0),
    ));
    // Issue #13: what an idle v1 connection (attached, with its inbox)
    // costs beyond a plain one, both held in this run.
    let v1_bytes = get(SB, &format!("hold-v1-n{}", plan.hold_connections))
        .and_then(|m| m.bytes_per_connection);
    if let Some(v1_bytes) = v1_bytes {
        let extra = bytes.map(|plain| v1_bytes - plain);
        rows.push((
            "idle switchboard.v1 connection: RSS beyond an idle plain one".into(),
            extra.map_or_else(|| "–".into(), |x| format!("{x:+.0} B")),
            "≤ 256 B".into(),
            "≤ 256 B".into(),
            extra.map(|x| x <= 256.0),
            extra.map(|x| x <= 256.0),
        ));
    }
    let hs = get(SB, &hold_key);
    let rate = hs.and_then(|m| m.rate);
    let cost = hs.and_then(|m| m.cpu_us_per_handshake);
    rows.push((
        "new connections per second (or server CPU per handshake ≤ 33.3 µs)".into(),
        match (rate, cost) {
            (Some(r), Some(c)) => format!("{}/s, {c:.1} µs", fmt_rate(r)),
            (Some(r), None) => format!("{}/s", fmt_rate(r)),
            _ => "–".into(),
        },
        "≥ 30,000/s".into(),
        "≥ 30,000/s".into(),
        rate.map(|r| r >= 30_000.0 || cost.is_some_and(|c| c <= 1e6 / 30_000.0)),
        rate.map(|r| r >= 30_000.0 || cost.is_some_and(|c| c <= 1e6 / 30_000.0)),
    ));

    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### Against the targets of issue #4 (this run)\n\n\
         Computed from the rows above; a target not measured in this run shows \"–\".\n"
    );
    let _ = writeln!(s, "| target | measured | goal | floor | verdict |");
    let _ = writeln!(s, "|---|---:|---:|---:|---|");
    for (what, measured, goal, floor, goal_met, floor_met) in rows {
        let verdict = match (goal_met, floor_met) {
            (Some(true), _) => "met",
            (Some(false), Some(true)) => "floor met, goal missed",
            (Some(false), Some(false)) | (None, Some(false)) => "**missed**",
            _ => "–",
        };
        let _ = writeln!(s, "| {what} | {measured} | {goal} | {floor} | {verdict} |");
    }
    s
}

/// CPU seconds of the window (`which`: `server_cpu_secs`,
/// `client_cpu_secs` or `other_cpu_secs`) as a share of one CPU.
fn share_of_cpu(m: &Measurement, which: &str) -> Option<f64> {
    let cpu = &m.report["cpu"];
    match (cpu[which].as_f64(), cpu["wall_secs"].as_f64()) {
        (Some(c), Some(w)) if w > 0.0 => Some(c / w),
        _ => None,
    }
}

/// [`share_of_cpu`] as a percentage.
fn utilisation(m: &Measurement, which: &str) -> String {
    share_of_cpu(m, which).map_or_else(|| "–".into(), |x| format!("{:.0}%", 100.0 * x))
}

/// The "other CPU" cell: the share, and the attempt when repeated.
fn other_cell(m: &Measurement) -> String {
    let share = utilisation(m, "other_cpu_secs");
    if m.attempts > 1 {
        format!("{share} (try {})", m.attempts)
    } else {
        share
    }
}

fn verdict(m: &Measurement) -> String {
    match (&m.note, m.ok) {
        (None, true) => "yes".into(),
        (Some(n), true) => format!("yes ({n})"),
        (None, false) => "**no**".into(),
        (Some(n), false) => {
            let short: String = n.chars().take(120).collect();
            format!("**no**: {}", short.replace('|', "/").replace('\n', " "))
        }
    }
}

fn relative_path(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.display().to_string())
}

/// Replaces the marked section of the doc (or appends it).
async fn write_doc(path: &Path, section: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let old = tokio::fs::read_to_string(path).await.unwrap_or_default();
    tokio::fs::write(path, splice_doc(&old, section))
        .await
        .with_context(|| format!("writing {}", path.display()))
}

/// The doc `old` with its marked section replaced by `section`.
fn splice_doc(old: &str, section: &str) -> String {
    match (old.find(BEGIN_MARK), old.find(END_MARK)) {
        (Some(b), Some(e)) if e > b => {
            format!(
                "{}{}{}",
                &old[..b],
                section.trim_end(),
                &old[e + END_MARK.len()..]
            )
        }
        _ if old.is_empty() => format!("# Benchmarks\n\n{section}"),
        _ => format!("{}\n\n{section}", old.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_load_share_outside_0_to_1() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: CompareArgs,
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = std::env::temp_dir().join(format!("sb-share-{}", std::process::id()));
        for share in ["0", "1.5", "-0.5", "NaN"] {
            let cli = <Cli as clap::Parser>::try_parse_from([
                "compare",
                "--no-build",
                &format!("--relay-load-share={share}"),
                "--workspace",
                dir.to_str().expect("utf-8 temp dir"),
            ])
            .expect("parses");
            let err = rt
                .block_on(run(&cli.args))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains(&format!(
                    "--relay-load-share {}",
                    share.parse::<f64>().unwrap_or(0.0)
                )) || err.contains("--relay-load-share NaN"),
                "{share}: {err}"
            );
            assert!(err.contains("above 0 and at most 1"), "{share}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rate_limited_keys_are_recognised() {
        let key = rate_limited_key(1000, 0.5);
        assert_eq!(key, "relay-n1000-at-50pct-of-max");
        assert!(is_rate_limited_key(&key));
        assert!(!is_rate_limited_key("relay-n1000"));
        assert!(!is_rate_limited_key("relay-v1-n1000"));
    }

    #[test]
    fn finds_listening_address() {
        let line = "\u{1b}[2m2025-01-01T00:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m switchboard: listening on http://127.0.0.1:41234";
        assert_eq!(
            parse_listening(line),
            Some(SocketAddr::from(([127, 0, 0, 1], 41234)))
        );
        assert_eq!(
            parse_listening(r#"{"msg":"listening on http://127.0.0.1:80/"}"#),
            Some(SocketAddr::from(([127, 0, 0, 1], 80)))
        );
        assert_eq!(parse_listening("nothing here"), None);
    }

    #[test]
    fn formats_dates() {
        let d = utc_now();
        assert_eq!(d.len(), "2025-01-01 00:00 UTC".len());
        assert!(d.starts_with("20"));
    }

    #[test]
    fn keeps_text_around_markers() {
        let old = format!("intro\n{BEGIN_MARK}\nold\n{END_MARK}\noutro\n");
        let section = format!("{BEGIN_MARK}\nNEW\n{END_MARK}\n");
        assert_eq!(
            splice_doc(&old, &section),
            format!("intro\n{BEGIN_MARK}\nNEW\n{END_MARK}\noutro\n")
        );
        assert!(splice_doc("intro", &section).ends_with(&section));
    }
}
