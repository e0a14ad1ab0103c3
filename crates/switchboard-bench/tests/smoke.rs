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
    start_with(bin, &[])
}

fn start_with(bin: &str, extra: &[&str]) -> Result<Server> {
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
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

    // Open loop: 400 messages per second in all for 1 s, whatever the
    // server answers (the window may overrun on a busy machine, hence the
    // loose upper bound).
    let paced = bench(&[
        "relay",
        "--url",
        &relay_url,
        "-n",
        "8",
        "--duration",
        "1",
        "--rate",
        "400",
        "--server-pid",
        &pid,
    ])?;
    assert_eq!(paced["ok"], true, "{paced}");
    assert_eq!(paced["offered_rate"], 400.0, "{paced}");
    let sent = u(&paced, "sent")?;
    assert!((300..=1200).contains(&sent), "sent {sent} at 400/s for 1 s");
    assert_eq!(u(&paced, "lost")?, 0);

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

/// Compiles `ref-uwebsockets` (C++) into a directory of its own with
/// `switchboard-bench build-uws`, as `compare` does; a missing compiler or
/// uWebSockets source fails the test.
fn build_uwebsockets() -> Result<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ref-uwebsockets-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("ref-uwebsockets");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .arg("build-uws")
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running switchboard-bench build-uws")?;
    // C++ with LTO: ~10 s of CPU, far more on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(600);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("build-uws took more than 600 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "build-uws failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(out.is_file(), "build-uws wrote no {}", out.display());
    Ok(out)
}

/// One HTTP/1.1 GET on a fresh connection; returns the status line.
fn http_status(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // One write: the request whole, as a client library sends it.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(request.as_bytes())?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next message, which must be text, within 5 s.
async fn next_text(ws: &mut Ws) -> Result<String> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => Ok(t.to_string()),
        other => bail!("expected a text message, got {other:?}"),
    }
}

/// The relay wire format of the C++ server in the cases the load generator
/// never sends: string and number ids (`5` and `"5"` are one id), escaped
/// ids, payloads of every JSON kind relayed byte for byte, frames that are
/// not relay frames ignored, an id held by two connections.
fn check_relay_format(addr: &str) -> Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let connect = |id: &str| {
            let url = format!("ws://{addr}/ws?id={id}");
            async move {
                let (ws, _) = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio_tungstenite::connect_async(url),
                )
                .await??;
                anyhow::Ok(ws)
            }
        };
        let mut a = connect("a").await?;
        let mut five = connect("5").await?;
        let mut five_again = connect("5").await?;
        let cases = [
            (
                r#"{"targets":["5"],"payload":{"x":[1,"y",null]}}"#,
                r#"{"x":[1,"y",null]}"#,
            ),
            (
                r#"{ "payload" : "s\"q\u00e9" , "targets" : [ 5 ] }"#,
                r#""s\"q\u00e9""#,
            ),
            (
                r#"{"targets":[5,"nobody"],"payload":-1.5e3,"extra":{"k":[]}}"#,
                "-1.5e3",
            ),
        ];
        for (frame, want) in cases {
            a.send(Message::text(frame)).await?;
            ensure!(
                next_text(&mut five).await? == want,
                "{frame}: first holder of id 5"
            );
            ensure!(
                next_text(&mut five_again).await? == want,
                "{frame}: second holder of id 5"
            );
        }
        // Not relay frames: ignored, the next valid frame still arrives.
        for bad in [
            r#"{"targets":[5],"payload":}"#,
            r#"{"targets":5,"payload":1}"#,
            r#"{"payload":1}"#,
            r#"{"targets":[5],"payload":1} trailing"#,
            "not json",
        ] {
            a.send(Message::text(bad)).await?;
        }
        // An escaped id: "\u0061" is "a".
        five.send(Message::text(r#"{"targets":["\u0061"],"payload":true}"#))
            .await?;
        ensure!(next_text(&mut a).await? == "true", "escaped target id");
        a.send(Message::text(r#"{"targets":[5],"payload":"after"}"#))
            .await?;
        ensure!(
            next_text(&mut five).await? == r#""after""#,
            "valid frame after bad ones"
        );
        anyhow::Ok(())
    })
}

#[test]
fn uwebsockets_reference_echo_relay_fanout() -> Result<()> {
    let bin = build_uwebsockets()?;
    let bin = bin.to_str().context("non-UTF-8 path")?.to_string();
    check_server(&bin)?;
    let server = start(&bin)?;
    assert!(
        http_status(&server.addr, "/ws")?.contains(" 404 "),
        "relay without ?id= must be refused"
    );
    assert!(http_status(&server.addr, "/heartbeat")?.contains(" 200 "));
    assert!(http_status(&server.addr, "/elsewhere")?.contains(" 404 "));
    check_relay_format(&server.addr)?;
    // The variant that sends to each target directly instead of publishing
    // to per-id topics.
    let direct = start_with(&bin, &["--direct"])?;
    check_relay_format(&direct.addr)
}
