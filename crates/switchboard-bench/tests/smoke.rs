//! Smoke test of the bench tool against its reference servers: short `echo`,
//! `relay` and `fanout` runs with small N, asserting correctness only (every
//! echo matched, nothing lost), never speed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// A reference server that is killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &str) -> Result<Server> {
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("listening on http://") else {
        let _ = child.kill();
        bail!("unexpected first line from {bin}: {line:?}");
    };
    Ok(Server {
        addr: addr.to_string(),
        child,
    })
}

/// Runs the bench tool and returns its final JSON line.
fn bench(args: &[&str]) -> Result<serde_json::Value> {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .context("running switchboard-bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "switchboard-bench {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    ensure!(
        started.elapsed() < Duration::from_secs(60),
        "run took too long"
    );
    let last = stdout.lines().last().context("no output")?;
    serde_json::from_str(last).with_context(|| format!("last line is not JSON: {last:?}"))
}

fn u(v: &serde_json::Value, key: &str) -> Result<u64> {
    v[key]
        .as_u64()
        .with_context(|| format!("{key} missing in {v}"))
}

fn check_server(bin: &str) -> Result<()> {
    let server = start(bin)?;
    let echo_url = format!("ws://{}/echo", server.addr);
    let relay_url = format!("ws://{}/ws", server.addr);
    let pid = server.child.id().to_string();

    for extra in [&[][..], &["--text", "-s", "300"][..]] {
        let mut args = vec![
            "echo",
            "--url",
            &echo_url,
            "-c",
            "4",
            "-k",
            "4",
            "--duration",
            "1",
            "--server-pid",
            &pid,
        ];
        args.extend_from_slice(extra);
        let echo = bench(&args)?;
        assert_eq!(echo["ok"], true, "{echo}");
        assert!(u(&echo, "sent")? > 0);
        assert_eq!(u(&echo, "received")?, u(&echo, "sent")?);
        assert_eq!(u(&echo, "mismatched")?, 0);
    }

    let relay = bench(&[
        "relay",
        "--url",
        &relay_url,
        "-n",
        "8",
        "--duration",
        "1",
        "--server-pid",
        &pid,
    ])?;
    assert_eq!(relay["ok"], true, "{relay}");
    assert!(u(&relay, "sent")? > 0);
    assert_eq!(u(&relay, "lost")?, 0);
    assert_eq!(u(&relay, "delivered")?, u(&relay, "sent")?);
    assert_eq!(u(&relay, "misdelivered")?, 0);

    let fanout = bench(&[
        "fanout", "--via", "relay", "--url", &relay_url, "-n", "20", "-m", "10",
    ])?;
    assert_eq!(fanout["ok"], true, "{fanout}");
    assert_eq!(u(&fanout, "delivered")?, 200);

    let hold = bench(&[
        "hold",
        "--url",
        &relay_url,
        "-n",
        "100",
        "--settle",
        "0.2",
        "--server-pid",
        &pid,
    ])?;
    assert_eq!(hold["ok"], true, "{hold}");
    assert_eq!(u(&hold, "opened")?, 100);
    Ok(())
}

#[test]
fn tungstenite_reference_echo_relay_fanout() -> Result<()> {
    check_server(env!("CARGO_BIN_EXE_ref-tungstenite"))
}

#[test]
fn fastwebsockets_reference_echo_relay_fanout() -> Result<()> {
    check_server(env!("CARGO_BIN_EXE_ref-fastwebsockets"))
}
