//! The `switchboard` binary's drain, run as a real process: SIGTERM drains
//! (503 `draining` at once, a drain frame per v1 client, 1012 after the
//! delay plus the grace, exit 0), a second signal closes everyone at once,
//! `POST /api/drain` drains and exits, and the `[drain]` settings are
//! checked against `shutdown_timeout`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use support::{Client, Server, TempFile, WAIT, http, run_to_exit, switchboard};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// A v1 client as `id`, hello said and welcome read.
async fn v1_client(addr: SocketAddr, id: &str) -> Client {
    let mut request = format!("ws://{addr}/ws?id={id}")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("switchboard.v1"),
    );
    let (mut client, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect within the timeout")
        .expect("connect v1");
    client
        .send(WsMessage::text(r#"{"type":"hello","id":0}"#))
        .await
        .expect("send hello");
    let welcome = next_event(&mut client, WAIT).await.expect("welcome");
    assert!(welcome.contains(r#""type":"welcome""#), "{welcome}");
    client
}

/// The next text frame (`Ok`) or close code (`Err`), within `limit`.
async fn next_event(client: &mut Client, limit: Duration) -> Result<String, u16> {
    loop {
        let next = tokio::time::timeout(limit, client.next())
            .await
            .expect("a frame or a close within the limit");
        match next {
            Some(Ok(WsMessage::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(WsMessage::Close(frame))) => {
                return Err(frame.map_or(1005, |f| u16::from(f.code)));
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
            other => panic!("expected a text frame or a close, got {other:?}"),
        }
    }
}

/// A raw upgrade request's status line and headers, lower-cased, and body.
async fn upgrade(addr: SocketAddr) -> (u16, String, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET /ws?id=late HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write upgrade");
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        // The connection stays open (a 101, or keep-alive): stop after the
        // head of a 101, or after `content-length` bytes of body.
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            response.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&response).to_ascii_lowercase();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                assert!(n > 0, "the connection ended inside the head: {text:?}");
                continue;
            };
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if n == 0 || head.starts_with("http/1.1 101") || length.is_some_and(|l| body.len() >= l)
            {
                break;
            }
        }
        String::from_utf8(response).expect("UTF-8")
    };
    let text = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("an answer to the upgrade");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// SIGTERM: within 100 ms new upgrades get 503 `draining` with
/// `Retry-After` and `/ready` answers 503; the v1 client gets one drain
/// frame within 1 s and 1012 no earlier than its delay plus the grace; the
/// process exits 0 once everyone is gone.
#[tokio::test]
async fn sigterm_drains_then_exits_0() {
    let mut server = Server::start(&["--drain-window", "2s", "--drain-grace", "1s"]);
    let addr = server.addr;
    let (status, body) = http(addr, "GET", "/ready", None).await;
    assert_eq!((status, parse(&body)), (200, json!({"status": "ready"})));
    let mut client = v1_client(addr, "alice").await;
    let mut plain = support::ws_connect(addr, "/ws?id=bob").await;

    let signalled = Instant::now();
    server.terminate();
    // Poll the upgrade until refused: the first refusal within 100 ms.
    let refused_after = loop {
        let (status, head, body) = upgrade(addr).await;
        if status == 503 {
            assert_eq!(parse(&body)["error"]["code"], "draining", "{body}");
            assert!(head.contains("\r\nretry-after: 1"), "{head}");
            break signalled.elapsed();
        }
        assert_eq!(status, 101, "{head}");
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "upgrades still accepted 1 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!("first refused upgrade {refused_after:?} after SIGTERM");
    assert!(
        refused_after < Duration::from_millis(100),
        "refused only {refused_after:?} after SIGTERM"
    );
    let (status, body) = http(addr, "GET", "/ready", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(parse(&body)["error"]["code"], "draining");

    let hint = parse(&next_event(&mut client, WAIT).await.expect("drain frame"));
    let hinted = signalled.elapsed();
    assert!(
        hinted < Duration::from_secs(1),
        "drain frame {hinted:?} after SIGTERM"
    );
    assert_eq!(hint["type"], "drain", "{hint}");
    let delay = Duration::from_millis(hint["reconnect_in_ms"].as_u64().expect("delay"));
    assert!(delay < Duration::from_secs(2), "{hint}");
    assert_eq!(next_event(&mut client, WAIT).await, Err(1012));
    let closed = signalled.elapsed();
    assert!(
        closed >= delay + Duration::from_secs(1),
        "1012 {closed:?} after SIGTERM, before delay {delay:?} + grace 1 s"
    );
    support::drain(&mut client).await;
    assert_eq!(next_event(&mut plain, WAIT).await, Err(1001));
    support::drain(&mut plain).await;

    let (status, lines) = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{lines:?}");
    let log = lines.join("\n");
    assert!(log.contains("received SIGTERM: draining"), "{log}");
    assert!(log.contains("drain finished"), "{log}");
    assert!(
        signalled.elapsed() < Duration::from_secs(2 + 1 + 5),
        "exit took {:?}",
        signalled.elapsed()
    );
}

/// A second SIGTERM, or Ctrl-C, during a drain closes every connection at
/// once with 1001 and exits 0, long before the window ends.
#[tokio::test]
async fn a_second_signal_during_a_drain_closes_everyone_at_once() {
    for second in ["TERM", "INT"] {
        let mut server = Server::start(&["--drain-window", "20s", "--drain-grace", "5s"]);
        let addr = server.addr;
        let mut v1 = v1_client(addr, "v").await;
        let mut plains = Vec::new();
        for i in 0..5 {
            plains.push(support::ws_connect(addr, &format!("/ws?id=p{i}")).await);
        }
        server.terminate();
        server.wait_for_log("received SIGTERM: draining");
        let hint = parse(&next_event(&mut v1, WAIT).await.expect("drain frame"));
        assert_eq!(hint["type"], "drain", "{hint}");
        let signalled = Instant::now();
        server.signal(second);
        assert_eq!(
            next_event(&mut v1, WAIT).await,
            Err(1001),
            "{second}: v1 closed at once"
        );
        for plain in &mut plains {
            assert_eq!(next_event(plain, WAIT).await, Err(1001), "{second}");
        }
        let took = signalled.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "{second}: closes took {took:?}"
        );
        support::drain(&mut v1).await;
        for plain in &mut plains {
            support::drain(plain).await;
        }
        let (status, lines) = server.wait_exit(WAIT);
        assert_eq!(status.code(), Some(0), "{second}: {lines:?}");
        let log = lines.join("\n");
        assert!(
            log.contains("during the drain: closing every connection now"),
            "{second}: {log}"
        );
    }
}

/// Ctrl-C outside a drain stops at once, as before (1001 to everyone).
#[tokio::test]
async fn ctrl_c_stops_without_a_drain() {
    let mut server = Server::start(&["--drain-window", "20s"]);
    let mut plain = support::ws_connect(server.addr, "/ws?id=1").await;
    let signalled = Instant::now();
    server.signal("INT");
    assert_eq!(next_event(&mut plain, WAIT).await, Err(1001));
    assert!(signalled.elapsed() < Duration::from_secs(2));
    support::drain(&mut plain).await;
    let (status, lines) = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{lines:?}");
    assert!(!lines.join("\n").contains("draining"), "{lines:?}");
}

/// `POST /api/drain` drains like SIGTERM, and the process exits when done.
#[tokio::test]
async fn post_api_drain_drains_and_exits() {
    let mut server = Server::start(&["--drain-window", "1s", "--drain-grace", "500ms"]);
    let mut client = v1_client(server.addr, "a").await;
    let (status, body) = http(server.addr, "POST", "/api/drain", None).await;
    assert_eq!(status, 200, "{body}");
    let body = parse(&body);
    assert_eq!(body["started_now"], true, "{body}");
    assert_eq!(body["v1_connections"], 1, "{body}");
    assert_eq!(body["window_ms"], 1000, "{body}");
    let hint = parse(&next_event(&mut client, WAIT).await.expect("drain frame"));
    assert_eq!(hint["type"], "drain", "{hint}");
    // The client moves on by itself after its delay.
    let delay = hint["reconnect_in_ms"].as_u64().expect("delay");
    tokio::time::sleep(Duration::from_millis(delay)).await;
    client.close(None).await.expect("close");
    support::drain(&mut client).await;
    let (status, lines) = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{lines:?}");
    assert!(lines.join("\n").contains("drain finished"), "{lines:?}");
}

fn refused(args: &[&str], toml: Option<&str>) -> String {
    let file = toml.map(TempFile::config);
    let mut command = switchboard();
    command.args(["--listen", "127.0.0.1:0"]).args(args);
    if let Some(file) = &file {
        command.args(["--config", file.path()]);
    }
    let run = run_to_exit(command);
    assert_eq!(run.code(), Some(2), "{args:?}: stderr:\n{}", run.stderr);
    run.stderr
}

#[test]
fn a_drain_longer_than_the_shutdown_timeout_is_refused_naming_values_and_fix() {
    // The old default shutdown timeout with the default drain.
    let stderr = refused(&["--shutdown-timeout", "10s"], None);
    for part in [
        "drain",
        "window (20s) + grace (5s) = 25s",
        "shutdown_timeout (10s)",
        "at least 25s",
        "--drain-window",
    ] {
        assert!(stderr.contains(part), "no {part:?} in:\n{stderr}");
    }
    // From the file's [drain] table.
    let stderr = refused(&[], Some("[drain]\nwindow = \"40s\"\n"));
    assert!(
        stderr.contains("window (40s) + grace (5s) = 45s"),
        "{stderr}"
    );
    assert!(stderr.contains("shutdown_timeout (30s)"), "{stderr}");
    // A flag over the file.
    let stderr = refused(
        &["--drain-grace", "15s"],
        Some("shutdown_timeout = \"30s\"\n[drain]\nwindow = \"20s\"\n"),
    );
    assert!(stderr.contains("grace (15s)"), "{stderr}");
    // Unknown keys and bad values in [drain] name themselves.
    let stderr = refused(&[], Some("[drain]\nwindw = \"1s\"\n"));
    assert!(stderr.contains("windw"), "{stderr}");
    let stderr = refused(&[], Some("[drain]\ngrace = \"5\"\n"));
    assert!(stderr.contains("no unit"), "{stderr}");
    let stderr = refused(&["--drain-window", "soon"], None);
    assert!(stderr.contains("--drain-window"), "{stderr}");
}

#[tokio::test]
async fn the_drain_table_is_read_from_the_file() {
    let file =
        TempFile::config("shutdown_timeout = \"5s\"\n[drain]\nwindow = \"1s\"\ngrace = \"0s\"\n");
    let mut command = switchboard();
    command.args(["--listen", "127.0.0.1:0", "--config", file.path()]);
    let mut server = Server::spawn(command);
    let mut client = v1_client(server.addr, "f").await;
    server.terminate();
    let hint = parse(&next_event(&mut client, WAIT).await.expect("drain frame"));
    assert_eq!(hint["window_ms"], 1000, "{hint}");
    assert_eq!(hint["close_in_ms"], hint["reconnect_in_ms"], "{hint}");
    assert_eq!(next_event(&mut client, WAIT).await, Err(1012));
    support::drain(&mut client).await;
    let (status, lines) = server.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{lines:?}");
}
