//! The examples in `examples/`, run as their own processes (`cargo run
//! --example NAME -- 127.0.0.1:0`) and driven by a real WebSocket client.
#![allow(missing_docs)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a test waits for something that should happen at once.
const WAIT: Duration = Duration::from_secs(5);

/// How long an example may take to build and start: `cargo run` compiles it
/// if `cargo test` has not already, on a machine that may be busy.
const STARTUP: Duration = Duration::from_secs(600);

/// A running example. Dropping it kills the process, also when a test
/// panics, so no server is left behind.
struct Example {
    child: Child,
    addr: SocketAddr,
}

impl Example {
    /// Runs `cargo run --example NAME -- 127.0.0.1:0` and waits for the
    /// `listening on http://ADDR` line on its stdout.
    fn start(name: &str) -> Self {
        let mut command = Command::new(env!("CARGO"));
        command.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "run",
            "-q",
            "-p",
            "switchboard",
            "--example",
            name,
        ]);
        if !cfg!(debug_assertions) {
            command.arg("--release");
        }
        let mut child = command
            .args(["--", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn cargo run --example");
        let stdout = child.stdout.take().expect("piped stdout");
        // Guard first: from here on, a panic kills the child.
        let mut example = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };

        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Reads until the child exits, so its stdout never fills up.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    // Nobody listens any more; keep draining.
                    continue;
                }
            }
        });
        let deadline = std::time::Instant::now() + STARTUP;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match lines_rx.recv_timeout(left) {
                Ok(line) => line,
                Err(err) => panic!(
                    "example {name} did not print `listening on http://…` ({err}); stdout so far: {seen:?}"
                ),
            };
            if let Some(addr) = line.strip_prefix("listening on http://") {
                example.addr = addr
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
                assert_ne!(example.addr.port(), 0, "the bound port is printed");
                return example;
            }
            seen.push(line);
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    async fn connect(&self, path: &str) -> Client {
        let (client, response) =
            tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(self.url(path)))
                .await
                .expect("connect within the timeout")
                .unwrap_or_else(|e| panic!("connect to {path}: {e}"));
        assert_eq!(response.status(), 101);
        client
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next data message, skipping pings; panics on timeout or close.
async fn recv_text(client: &mut Client) -> String {
    loop {
        let next = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a message within the timeout")
            .expect("stream still open")
            .expect("no websocket error");
        match next {
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            WsMessage::Text(text) => return text.to_string(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

async fn send_text(client: &mut Client, text: &str) {
    tokio::time::timeout(WAIT, client.send(WsMessage::text(text.to_owned())))
        .await
        .expect("send within the timeout")
        .expect("send");
}

/// Asserts no data message arrives for `quiet`.
async fn assert_silent(client: &mut Client, quiet: Duration) {
    if let Ok(next) = tokio::time::timeout(quiet, client.next()).await {
        match next {
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn echo_example_replies_echo_colon_message() {
    let example = Example::start("echo");
    let mut client = example.connect("/echo").await;

    send_text(&mut client, "hello").await;
    assert_eq!(recv_text(&mut client).await, "Echo: hello");

    // Binary messages are ignored; the connection keeps working.
    client
        .send(WsMessage::binary(vec![1u8, 2, 3]))
        .await
        .expect("send binary");
    send_text(&mut client, "héllo again").await;
    assert_eq!(recv_text(&mut client).await, "Echo: héllo again");

    // Two clients are independent.
    let mut other = example.connect("/echo").await;
    send_text(&mut other, "second").await;
    assert_eq!(recv_text(&mut other).await, "Echo: second");
    assert_silent(&mut client, Duration::from_millis(200)).await;

    client.close(None).await.expect("close");
}

#[tokio::test]
async fn chat_example_broadcasts_to_everyone_sender_included() {
    let example = Example::start("chat");
    let mut alice = example.connect("/chat").await;
    let mut bob = example.connect("/chat").await;

    send_text(&mut alice, "hi from alice").await;
    assert_eq!(recv_text(&mut alice).await, "hi from alice");
    assert_eq!(recv_text(&mut bob).await, "hi from alice");

    send_text(&mut bob, "hi from bob").await;
    assert_eq!(recv_text(&mut alice).await, "hi from bob");
    assert_eq!(recv_text(&mut bob).await, "hi from bob");

    // A client that left gets nothing more and does not break the room.
    bob.close(None).await.expect("close bob");
    let mut carol = example.connect("/chat").await;
    send_text(&mut carol, "carol here").await;
    assert_eq!(recv_text(&mut alice).await, "carol here");
    assert_eq!(recv_text(&mut carol).await, "carol here");
}

#[tokio::test]
async fn relay_example_delivers_payload_to_targets_only() {
    let example = Example::start("relay");
    let mut one = example.connect("/ws?id=1").await;
    let mut two = example.connect("/ws?id=2").await;
    let mut two_again = example.connect("/ws?id=2").await; // a second tab
    let mut alice = example.connect("/ws?id=alice").await;

    // Integer and string targets; the payload's exact text is forwarded.
    send_text(
        &mut one,
        r#"{"targets":[2,"alice",99],"payload":{"hi": "from 1"}}"#,
    )
    .await;
    assert_eq!(recv_text(&mut two).await, r#"{"hi": "from 1"}"#);
    assert_eq!(recv_text(&mut two_again).await, r#"{"hi": "from 1"}"#);
    assert_eq!(recv_text(&mut alice).await, r#"{"hi": "from 1"}"#);
    assert_silent(&mut one, Duration::from_millis(200)).await;

    // A frame that is not an envelope gets an error reply; the connection
    // stays open and the next valid frame is delivered.
    for bad in [
        "not json",
        r#"{"payload":1}"#,
        r#"{"targets":[2]}"#,
        r#"{"targets":[true],"payload":1}"#,
    ] {
        send_text(&mut one, bad).await;
        let reply: serde_json::Value =
            serde_json::from_str(&recv_text(&mut one).await).expect("error reply is JSON");
        assert_eq!(
            reply["error"]["code"], "bad_request",
            "reply to {bad}: {reply}"
        );
    }
    send_text(&mut alice, r#"{"targets":[1],"payload":"back to you"}"#).await;
    assert_eq!(recv_text(&mut one).await, r#""back to you""#);
    assert_silent(&mut two, Duration::from_millis(200)).await;

    // After 2's connections end, 2 is offline: sends are ignored.
    two.close(None).await.expect("close two");
    two_again.close(None).await.expect("close two again");
    send_text(&mut one, r#"{"targets":[2,"alice"],"payload":[1,2]}"#).await;
    assert_eq!(recv_text(&mut alice).await, "[1,2]");

    // No `id`, or a bad one: refused with HTTP 400 before the upgrade.
    for path in ["/ws", "/ws?id=", "/ws?id=a%20b"] {
        match tokio_tungstenite::connect_async(example.url(path)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 400, "{path}");
            }
            other => panic!("{path}: expected HTTP 400, got {other:?}"),
        }
    }
}
