//! Hardening (issue 12): each test performs one attack on a real server on
//! 127.0.0.1 and checks the specific answer, while another client's `/echo`
//! keeps answering. The writer backlog bound is in `backpressure.rs` (it
//! measures the process's memory, so it runs alone); fail-fast UTF-8 inside
//! a frame is in `conformance_utf8.rs`.

mod common;
mod raw;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use http::request::Parts;
use raw::{RawWs, masked};
use switchboard::{Closed, Conn, ErrorKind, Handler, HttpError, Hub, Limits, Message, Outcome};
use tokio::io::AsyncWriteExt as _;

/// `/echo` on another connection still answers, promptly.
async fn echo_answers(echo: &mut Client, text: &str) {
    send_text(echo, text).await;
    assert_eq!(
        recv_text(echo).await,
        text,
        "/echo answers during the attack"
    );
}

// ---------------------------------------------------------------------------
// 1. Topics per connection
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_past_the_topic_limit_gets_too_many_topics() {
    const LIMIT: usize = 50;
    let server = TestServer::with_limits(Limits {
        max_topics_per_connection: LIMIT,
        ..Limits::default()
    })
    .await;
    let mut echo = server.connect("/echo").await;
    let mut client = server.connect("/ws?id=subscriber").await;
    let subscribe = |i: usize| format!(r#"{{"type":"subscribe","topic":"room/{i}"}}"#);

    for i in 0..LIMIT {
        send_text(&mut client, &subscribe(i)).await;
        assert_eq!(
            recv_json(&mut client).await["subscribed"],
            format!("room/{i}")
        );
    }
    echo_answers(&mut echo, "before").await;

    // One more is refused with an error frame naming the limit and its key.
    send_text(&mut client, &subscribe(LIMIT)).await;
    let refusal = recv_json(&mut client).await;
    assert_eq!(error_code_of(&refusal), "too_many_topics", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap_or_default();
    for part in ["50", "limits.max_topics_per_connection", "room/50"] {
        assert!(message.contains(part), "{part:?} missing from {message:?}");
    }
    echo_answers(&mut echo, "during").await;

    // The refused topic was not joined: a publish to it reaches nobody.
    let published = http_post_json(
        server.addr,
        "/api/publish",
        r#"{"topic":"room/50","payload":"anyone?"}"#,
    )
    .await;
    assert_eq!(published.json()["recipients"], 0);
    assert_eq!(
        server.hub.metrics().errors(ErrorKind::TooManyTopics),
        1,
        "the refusal is counted"
    );

    // The connection stays usable: a joined topic may be joined again, and
    // leaving one makes room for another.
    send_text(&mut client, &subscribe(0)).await;
    assert_eq!(recv_json(&mut client).await["subscribed"], "room/0");
    send_text(&mut client, r#"{"type":"unsubscribe","topic":"room/0"}"#).await;
    assert_eq!(recv_json(&mut client).await["unsubscribed"], "room/0");
    send_text(&mut client, &subscribe(LIMIT)).await;
    assert_eq!(recv_json(&mut client).await["subscribed"], "room/50");
    echo_answers(&mut echo, "after").await;
}

// ---------------------------------------------------------------------------
// 3. A closing connection cannot be held open
// ---------------------------------------------------------------------------

/// How long a raw client keeps streaming at most.
const STREAM_FOR: Duration = Duration::from_secs(10);

/// Streams pings as fast as the socket takes them, until the server stops
/// taking them or `STREAM_FOR` passes. A thread of its own with blocking
/// writes, so that the server's tasks cannot slow it down.
fn stream_pings(mut socket: std::net::TcpStream) {
    use std::io::Write as _;
    let pings: Vec<u8> = (0..10_000).flat_map(|_| masked(0x89, b"")).collect();
    let until = std::time::Instant::now() + STREAM_FOR;
    socket
        .set_write_timeout(Some(STREAM_FOR))
        .expect("write timeout");
    while std::time::Instant::now() < until {
        if socket.write_all(&pings).is_err() {
            return;
        }
    }
}

/// Reads and parses what the server sends until the connection ends (EOF
/// or reset) or `STREAM_FOR` passes; returns the close frame's code, if one
/// came, and when the connection ended.
fn read_until_end(mut socket: std::net::TcpStream) -> (Option<u16>, Option<std::time::Instant>) {
    use std::io::Read as _;
    let until = std::time::Instant::now() + STREAM_FOR;
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut buf = Vec::new();
    let mut close = None;
    let mut chunk = vec![0u8; 64 * 1024];
    while std::time::Instant::now() < until {
        match socket.read(&mut chunk) {
            Ok(0) => return (close, Some(std::time::Instant::now())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => return (close, Some(std::time::Instant::now())),
        }
        let mut used = 0;
        while let Some((frame, len)) = raw::parse_server_frame(&buf[used..]) {
            if frame.opcode == 0x8 && close.is_none() {
                close = Some(frame.close().0);
            }
            used += len;
        }
        buf.drain(..used);
    }
    (close, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_streaming_pings_after_our_close_is_cut_off_at_the_close_timeout() {
    const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
    let server = TestServer::with_limits(Limits {
        close_timeout: CLOSE_TIMEOUT,
        ..Limits::default()
    })
    .await;
    let mut echo = server.connect("/echo").await;
    let client = RawWs::connect(server.addr, "/ws?id=pinger").await;
    let socket = client.stream.into_std().expect("std socket");
    socket.set_nonblocking(false).expect("blocking socket");
    let write = socket.try_clone().expect("clone socket");
    let reader = std::thread::spawn(move || read_until_end(socket));
    let pinger = std::thread::spawn(move || stream_pings(write));
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo_answers(&mut echo, "while pinging").await;

    // The server closes it (4000); the client never answers and keeps the
    // server's read side busy with pings.
    let asked = std::time::Instant::now();
    let deleted = http_delete(server.addr, "/api/connections/pinger").await;
    assert_eq!(deleted.json()["closed"], 1);
    echo_answers(&mut echo, "after the close").await;

    let (close, ended) = tokio::task::spawn_blocking(move || reader.join())
        .await
        .expect("join the reader")
        .expect("reader thread");
    assert_eq!(close, Some(4000), "the server's close frame arrives first");
    let ended = ended.expect("the server ends the connection within 10 s");
    let took = ended - asked;
    assert!(
        took < CLOSE_TIMEOUT + Duration::from_millis(1500),
        "the connection ended {took:?} after the close, close_timeout is {CLOSE_TIMEOUT:?}"
    );
    // Its registration and its place under the limits are given back soon
    // after: the server lingers for a quiet moment (250 ms) at most, not
    // another close_timeout, for a client that let the deadline pass.
    let gone_by = asked + CLOSE_TIMEOUT + Duration::from_millis(900);
    while server.hub.live_connections() != 1 {
        assert!(
            std::time::Instant::now() < gone_by,
            "the connection still counts {:?} after the close",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let listed = http_get(server.addr, "/api/connections").await;
    assert_eq!(listed.json()["clients"], serde_json::json!([]));
    echo_answers(&mut echo, "after it ended").await;
    tokio::task::spawn_blocking(move || pinger.join())
        .await
        .expect("join the pinger")
        .expect("pinger thread");
}

// ---------------------------------------------------------------------------
// 4. A connection whose TCP connection ended takes no more messages
// ---------------------------------------------------------------------------

/// Registers `?id=`, and takes its time in `on_close`: it reports the ID on
/// `closing`, then waits for a permit of `release` (5 s at most).
struct SlowClose {
    closing: tokio::sync::mpsc::UnboundedSender<String>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Handler for SlowClose {
    type State = ();
    type Info = ();

    async fn connect(&self, request: &Parts, conn: &mut Conn<()>) -> Result<(), HttpError> {
        let id = switchboard::handlers::client_id_from_query(request)?;
        conn.register(id)
            .map_err(|err| HttpError::new(StatusCode::CONFLICT, "id_in_use", err.to_string()))
    }

    async fn on_message(&self, _: &mut (), _: Message, _: &mut Conn<()>) -> Outcome {
        Outcome::Continue
    }

    async fn on_close(&self, _: (), _: &Closed, conn: &mut Conn<()>) {
        let id = conn
            .client_id()
            .map(ToString::to_string)
            .unwrap_or_default();
        let _ = self.closing.send(id);
        let _ = tokio::time::timeout(WAIT, self.release.acquire()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_eof_or_reset_sends_are_reported_dropped_not_delivered() {
    let hub = Hub::new(Limits::default());
    let (closing, mut closed_ids) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = SlowClose {
        closing,
        release: release.clone(),
    };
    let router =
        switchboard::app(hub.clone()).route("/slow", switchboard::ws(hub.clone(), handler));
    let server = TestServer::with_router(hub, router).await;
    let mut echo = server.connect("/echo").await;

    // One client ends with a FIN (EOF), the other with a reset.
    let fin = RawWs::connect(server.addr, "/slow?id=gone-fin").await;
    let rst = RawWs::connect(server.addr, "/slow?id=gone-rst").await;
    let addr = server.addr;
    let send = |target: &str| {
        let body = format!(r#"{{"targets":["{target}"],"payload":"anyone there?"}}"#);
        async move { http_post_json(addr, "/api/send", &body).await.json() }
    };
    let report = send("gone-fin").await;
    assert_eq!(
        report["delivered"],
        serde_json::json!(["gone-fin"]),
        "{report}"
    );

    drop(fin);
    rst.stream.set_zero_linger().expect("SO_LINGER 0");
    drop(rst);
    let mut ended = Vec::new();
    for _ in 0..2 {
        let id = tokio::time::timeout(WAIT, closed_ids.recv())
            .await
            .expect("on_close starts within the timeout")
            .expect("the handler is alive");
        ended.push(id);
    }
    ended.sort();
    assert_eq!(ended, ["gone-fin", "gone-rst"]);

    // on_close is still running: the IDs are registered, but their
    // connections are over, so nothing is reported delivered to them.
    for id in ["gone-fin", "gone-rst"] {
        let report = send(id).await;
        assert_eq!(report["delivered"], serde_json::json!([]), "{id}: {report}");
        assert_eq!(report["dropped"], serde_json::json!([id]), "{id}: {report}");
    }
    echo_answers(&mut echo, "meanwhile").await;

    release.add_permits(2);
    wait_until("both connections ended", WAIT, || {
        server.hub.live_connections() == 1
    })
    .await;
    let report = send("gone-fin").await;
    assert_eq!(
        report["offline"],
        serde_json::json!(["gone-fin"]),
        "{report}"
    );
    echo_answers(&mut echo, "after").await;
}

// ---------------------------------------------------------------------------
// 5. An upgrade that completes after shutdown began is closed with 1001
// ---------------------------------------------------------------------------

/// Holds requests until released: reports each on `entered`, then waits for
/// a permit of `release` (5 s at most).
#[derive(Clone)]
struct Gate {
    entered: tokio::sync::mpsc::UnboundedSender<()>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Gate {
    async fn pass(&self) {
        let _ = self.entered.send(());
        let _ = tokio::time::timeout(WAIT, self.release.acquire()).await;
    }
}

/// Middleware: the request waits at the gate before it reaches the route.
async fn held(
    axum::extract::State(gate): axum::extract::State<Gate>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    gate.pass().await;
    next.run(request).await
}

/// Echo whose `connect` waits at the gate.
struct SlowConnect(Gate);

impl Handler for SlowConnect {
    type State = ();
    type Info = ();

    async fn connect(&self, _: &Parts, _: &mut Conn<()>) -> Result<(), HttpError> {
        self.0.pass().await;
        Ok(())
    }

    async fn on_message(&self, _: &mut (), message: Message, _: &mut Conn<()>) -> Outcome {
        Outcome::Reply(message)
    }
}

/// Starts an upgrade of `path`, lets it reach the gate, begins shutdown,
/// then lets it through: the client gets its 101 and then 1001, and `serve`
/// returns long before its shutdown timeout.
async fn upgrade_held_across_shutdown(path: &str) {
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
    let hub = Hub::new(Limits::default());
    let (entered, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let gate = Gate {
        entered,
        release: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let router = switchboard::app(hub.clone())
        .route(
            "/slow-connect",
            switchboard::ws(hub.clone(), SlowConnect(gate.clone())),
        )
        .merge(
            switchboard::Router::new()
                .route(
                    "/held",
                    switchboard::ws(hub.clone(), switchboard::handlers::Echo),
                )
                .layer(axum::middleware::from_fn_with_state(gate.clone(), held)),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(switchboard::serve_with(
        listener,
        router,
        hub.clone(),
        async {
            let _ = stopped.await;
        },
        SHUTDOWN_TIMEOUT,
    ));
    let (mut echo, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/echo"))
        .await
        .expect("connect /echo");
    echo_answers(&mut echo, "before").await;

    let mut upgrading = tokio::net::TcpStream::connect(addr).await.expect("connect");
    upgrading
        .write_all(raw::upgrade_request(addr, path, &[]).as_bytes())
        .await
        .expect("write the upgrade request");
    tokio::time::timeout(WAIT, arrivals.recv())
        .await
        .expect("the upgrade reaches the gate")
        .expect("gate open");

    let began = std::time::Instant::now();
    stop.send(()).expect("serve is running");
    assert_eq!(
        close_code(recv_close(&mut echo).await),
        1001,
        "the open connection"
    );
    drain_until_closed(&mut echo).await;
    gate.release.add_permits(1);

    let (status, _, rest) = raw::read_head(&mut upgrading).await;
    assert_eq!(
        status, 101,
        "the request accepted before shutdown is answered"
    );
    let mut ws = raw::RawWs::from_upgraded(upgrading, rest);
    let (code, reason) = ws.read_until_close().await.1;
    assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    ws.send(&masked(0x88, &raw::close_payload(1001, ""))).await;
    tokio::time::timeout(WAIT, serve)
        .await
        .expect("serve returns")
        .expect("serve task")
        .expect("serve result");
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "serve took {took:?} to shut down (timeout {SHUTDOWN_TIMEOUT:?})"
    );
    assert_eq!(hub.live_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_held_before_the_handler_when_shutdown_begins_gets_1001() {
    upgrade_held_across_shutdown("/held").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_held_in_connect_when_shutdown_begins_gets_1001() {
    upgrade_held_across_shutdown("/slow-connect").await;
}

// ---------------------------------------------------------------------------
// 6. A busy handler callback does not stop the connection's delivery
// ---------------------------------------------------------------------------

/// Registers `?id=`; on the text `wait` its `on_message` waits at the gate
/// (as `Relay::on_message` waits for a frozen node) and then replies `done`.
struct Busy(Gate);

impl Handler for Busy {
    type State = ();
    type Info = ();

    async fn connect(&self, request: &Parts, conn: &mut Conn<()>) -> Result<(), HttpError> {
        let id = switchboard::handlers::client_id_from_query(request)?;
        conn.register(id)
            .map_err(|err| HttpError::new(StatusCode::CONFLICT, "id_in_use", err.to_string()))
    }

    async fn on_message(&self, _: &mut (), message: Message, _: &mut Conn<()>) -> Outcome {
        if message.as_bytes() == b"wait" {
            self.0.pass().await;
            return Outcome::reply_text("done");
        }
        Outcome::Continue
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_callback_does_not_stop_frames_queued_to_its_connection() {
    const QUEUE: usize = 32;
    const SENT: usize = QUEUE * 6;
    let hub = Hub::new(Limits {
        max_queued_messages: QUEUE,
        ..Limits::default()
    });
    let (entered, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let gate = Gate {
        entered,
        release: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let router = switchboard::app(hub.clone())
        .route("/busy", switchboard::ws(hub.clone(), Busy(gate.clone())));
    let server = TestServer::with_router(hub, router).await;
    let mut echo = server.connect("/echo").await;
    let mut busy = server.connect("/busy?id=busy").await;
    let mut sender = server.connect("/ws?id=sender").await;

    send_text(&mut busy, "wait").await;
    tokio::time::timeout(WAIT, arrivals.recv())
        .await
        .expect("on_message starts")
        .expect("gate open");

    // While on_message waits, other clients send it six times its queue,
    // a few at a time; it reads them all before its callback returns.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < SENT {
            got.push(recv_json(&mut busy).await["n"].as_u64().unwrap_or(u64::MAX));
        }
        (busy, got)
    });
    for n in 0..SENT {
        send_text(
            &mut sender,
            &format!(r#"{{"targets":["busy"],"payload":{{"n":{n}}}}}"#),
        )
        .await;
        if n % 8 == 7 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    echo_answers(&mut echo, "meanwhile").await;
    let (mut busy, got) = tokio::time::timeout(WAIT, reader)
        .await
        .expect("every frame arrives while the callback waits")
        .expect("reader task");
    assert_eq!(
        got,
        (0..SENT as u64).collect::<Vec<_>>(),
        "all of them, in order"
    );
    assert_eq!(server.hub.metrics().errors(ErrorKind::QueueOverflow), 0);

    // The callback ends: its reply comes, and the connection is still fine.
    gate.release.add_permits(1);
    assert_eq!(recv_text(&mut busy).await, "done");
    send_text(&mut sender, r#"{"targets":["busy"],"payload":"later"}"#).await;
    assert_eq!(recv_text(&mut busy).await, r#""later""#);
    echo_answers(&mut echo, "after").await;
}
