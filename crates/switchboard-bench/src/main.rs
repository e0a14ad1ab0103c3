//! `switchboard-bench`: load generator and side-by-side benchmarks for the
//! Switchboard WebSocket server.
//!
//! Every subcommand prints a human-readable summary followed by **one line of
//! JSON** (the last line on stdout) holding the same figures. The exit status
//! is 0 when the run was correct, 1 when a correctness check failed (a
//! mismatched echo, a lost or duplicated delivery, a failed connection) and 2
//! when the run could not be carried out at all. Speed never affects the exit
//! status.
//!
//! # Workloads
//!
//! * **`echo`** — N connections to `/echo`, each keeping K messages of S bytes
//!   in flight (closed loop). Every echo is checked byte for byte and in order;
//!   reports messages/s and round-trip latency percentiles (HdrHistogram).
//! * **`relay`** — N clients on `/ws?id=i` (spread round-robin over several
//!   `--url`s, e.g. the nodes of a cluster) send
//!   `{"targets":[j],"payload":{"t":…,"from":i,"seq":k}}` to pseudo-random
//!   peers j with at most K undelivered messages each; reports sent/s,
//!   delivered/s, lost (after a drain period), misdeliveries and one-way
//!   latency.
//! * **`fanout`** — N subscribers and one publisher; publishes go through a
//!   relay frame listing every subscriber, a topic (`subscribe`/`publish`
//!   frames), or `POST /api/publish`. Reports deliveries/s, the latency of each
//!   delivery and of the last delivery of each publish.
//! * **`hold`** — opens N idle connections as fast as possible from rotating
//!   source addresses 127.0.0.2, 127.0.0.3, …; reports handshakes/s, failures
//!   and, given `--server-pid`, the server's RSS growth per idle connection;
//!   `--compression` offers permessage-deflate, `--exchange` (on `/echo`)
//!   sends one compressed message per connection first.
//! * **`soak`** — keeps N connections churning for a bounded time (pairs
//!   that connect, exchange relay messages with each other, idle, close
//!   politely or with a RST, and start over with new IDs) while sampling the
//!   server's RSS every second; reports RSS after a warm-up round, at the
//!   peak and at the end (once `/api/connections` shows no open connection).
//! * **`compare`** — builds and starts Switchboard and the reference servers
//!   (`ref-tungstenite`, `ref-fastwebsockets`, Node's `ws` when available) one
//!   at a time, pinned to CPU 0 while the load generator runs on CPU 1, runs
//!   the same workloads against each, and writes a results table to
//!   `docs/benchmarks.md` plus SVG plots under `docs/bench/`. Each workload
//!   also reports the figure per **server CPU-second** (utime+stime from
//!   `/proc/PID/stat`), the figure to compare on a shared 2-core machine.
//!
//! All traffic goes to loopback addresses only; URLs that resolve elsewhere
//! are refused.

mod churn;
mod common;
mod compare;
mod echo;
mod fanout;
mod hold;
mod plot;
mod relay;
mod soak;
mod stats;
mod ws;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "switchboard-bench",
    version,
    about = "Load generator and benchmarks for Switchboard"
)]
struct Cli {
    /// Runtime worker threads of the load generator (default: one per CPU;
    /// `compare` defaults to 1 because it pins itself to one CPU).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Echo round trips over N connections with K messages in flight.
    Echo(echo::EchoArgs),
    /// Peer-to-peer relay between N clients.
    Relay(relay::RelayArgs),
    /// One publisher, N subscribers (via relay, topic or HTTP API).
    Fanout(fanout::FanoutArgs),
    /// Open and hold N idle connections; memory per connection.
    Hold(hold::HoldArgs),
    /// Open and close N connections; server CPU per upgrade and close.
    Churn(churn::ChurnArgs),
    /// Keep N connections churning; does the server's memory return to its
    /// baseline?
    Soak(soak::SoakArgs),
    /// Run all workloads against Switchboard and the reference servers.
    Compare(Box<compare::CompareArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Raise the open-file limit early so child servers inherit it too.
    if let Err(e) = stats::raise_nofile_limit() {
        eprintln!("warning: {e:#}");
    }
    let threads = cli.threads.unwrap_or(match cli.command {
        Command::Compare(_) => 1,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("FAILED: correctness check did not pass (see the summary above)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Prints the report's final JSON line and returns its `ok`.
fn finish<T: Serialize>(report: &T, ok: bool) -> Result<bool> {
    println!("{}", serde_json::to_string(report)?);
    Ok(ok)
}

async fn run(command: Command) -> Result<bool> {
    match command {
        Command::Echo(a) => {
            let r = echo::run(&a).await?;
            r.print();
            finish(&r, r.ok)
        }
        Command::Relay(a) => {
            let r = relay::run(&a).await?;
            r.print();
            finish(&r, r.ok)
        }
        Command::Fanout(a) => {
            let r = fanout::run(&a).await?;
            r.print();
            finish(&r, r.ok)
        }
        Command::Hold(a) => {
            let r = hold::run(&a).await?;
            r.print();
            finish(&r, r.ok)
        }
        Command::Churn(a) => {
            let r = churn::run(&a).await?;
            r.print();
            finish(&r, r.ok)
        }
        Command::Soak(a) => {
            let r = soak::run(&a).await?;
            r.print();
            finish(&r, r.ok)
        }
        Command::Compare(a) => {
            let r = compare::run(&a).await?;
            finish(&r.summary(), r.ok())
        }
    }
}
