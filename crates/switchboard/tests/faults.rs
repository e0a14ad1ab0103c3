//! Connection lifecycle under faults: panicking handlers, abrupt resets,
//! dead and slow peers, the connection cap, and graceful shutdown.

mod common;
mod raw;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use http::request::Parts;
use switchboard::{
    ClientId, Conn, ErrorKind, Handler, HttpError, Hub, Limits, Message, Outcome, Router, ws,
};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;

/// Panics in `connect` when the query contains `boom`, and in `on_message`
/// on the text `panic`; otherwise replies `ok: <text>`.
struct Fragile {
    closes: Arc<Mutex<Vec<String>>>,
}

impl Handler for Fragile {
    type State = String;
    type Info = ();

    async fn connect(&self, request: &Parts, _conn: &mut Conn<()>) -> Result<String, HttpError> {
        let query = request.uri.query().unwrap_or("").to_owned();
        if query.contains("boom") {
            panic!("deliberate panic in connect");
        }
        Ok(query)
    }

    async fn on_message(&self, _name: &mut String, message: Message, _: &mut Conn<()>) -> Outcome {
        match message {
            Message::Text(text) if text.as_str() == "panic" => {
                panic!("deliberate panic in on_message")
            }
            Message::Text(text) => Outcome::reply_text(format!("ok: {text}")),
            Message::Binary(_) => Outcome::Continue,
        }
    }

    async fn on_close(&self, name: String, _closed: &switchboard::Closed, _: &mut Conn<()>) {
        self.closes.lock().expect("closes lock").push(name);
    }
}

async fn fragile_server() -> (TestServer, Arc<Mutex<Vec<String>>>) {
    let hub = Hub::new(Limits::default());
    let closes = Arc::new(Mutex::new(Vec::new()));
    let router = Router::new().route(
        "/fragile",
        ws(
            hub.clone(),
            Fragile {
                closes: Arc::clone(&closes),
            },
        ),
    );
    (TestServer::with_router(hub, router).await, closes)
}

async fn echoes(client: &mut Client, text: &str) {
    send_text(client, text).await;
    assert_eq!(recv_text(client).await, format!("ok: {text}"));
}

/// `Limits` is `#[non_exhaustive]`, so it cannot be built with a struct
/// literal outside its crate: start from the defaults and change fields.
fn limits_with(change: impl FnOnce(&mut Limits)) -> Limits {
    let mut limits = Limits::default();
    change(&mut limits);
    limits
}

#[tokio::test]
async fn a_panic_in_on_message_closes_only_that_connection_with_1011() {
    let (server, closes) = fragile_server().await;
    let mut a = server.connect("/fragile?a").await;
    let mut victim = server.connect("/fragile?victim").await;
    let mut c = server.connect("/fragile?c").await;
    echoes(&mut victim, "before").await;

    send_text(&mut victim, "panic").await;
    let frame = recv_close(&mut victim)
        .await
        .expect("close frame with a code");
    assert_eq!(frame.code, WsCloseCode::Error, "1011");
    assert_eq!(u16::from(frame.code), 1011);
    assert_eq!(
        frame.reason.as_str(),
        "internal error: the handler panicked"
    );
    // Keep polling so tungstenite answers the close and the handshake ends.
    drain_to_end(&mut victim).await;
    server
        .eventually("the panicked connection is gone", |hub| {
            hub.live_connections() == 2
        })
        .await;
    assert_eq!(server.hub.metrics().errors(ErrorKind::HandlerPanic), 1);

    // The other connections are unaffected, both ways.
    echoes(&mut a, "after the panic").await;
    echoes(&mut c, "me too").await;
    // The server keeps accepting.
    let mut d = server.connect("/fragile?d").await;
    echoes(&mut d, "new").await;
    assert_eq!(server.hub.live_connections(), 3);
    // on_close is skipped for the connection whose handler panicked (its
    // state may be broken), and nobody else has closed.
    assert!(closes.lock().expect("closes lock").is_empty());
    // Exactly one panic was counted.
    assert_eq!(server.hub.metrics().errors(ErrorKind::HandlerPanic), 1);
}

#[tokio::test]
async fn a_panic_in_connect_answers_500_json_and_the_server_keeps_accepting() {
    let (server, _closes) = fragile_server().await;
    let (response, _ws) = raw::try_upgrade(server.addr, "/fragile?boom", &[]).await;
    assert_eq!(response.status, 500, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.error_code(), "internal_error");
    assert_eq!(server.hub.metrics().errors(ErrorKind::HandlerPanic), 1);
    assert_eq!(server.hub.live_connections(), 0);

    let mut ok = server.connect("/fragile?fine").await;
    echoes(&mut ok, "hello").await;
}

/// Polls `client` until its stream ends (tungstenite sends its answer to
/// the server's close frame while being polled).
async fn drain_to_end(client: &mut Client) {
    for _ in 0..100 {
        match tokio::time::timeout(WAIT, client.next()).await {
            Ok(None) | Ok(Some(Err(_))) => return,
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("the connection did not end"),
        }
    }
    panic!("more than 100 messages while waiting for the end");
}

/// One connect/disconnect cycle on the relay: connect as `id`, prove the
/// registration by sending to itself, then close politely or reset.
async fn cycle(server: &TestServer, id: u32, polite: bool) {
    let stream = TcpStream::connect(server.addr).await.expect("connect");
    if !polite {
        // SO_LINGER 0: dropping the socket sends RST instead of FIN.
        stream.set_zero_linger().expect("SO_LINGER 0");
    }
    let (mut client, response) = tokio_tungstenite::client_async(
        server.url(&format!("/ws?id={id}")),
        MaybeTlsStream::Plain(stream),
    )
    .await
    .expect("handshake");
    assert_eq!(response.status(), 101);
    send_text(
        &mut client,
        &format!(r#"{{"targets":[{id}],"payload":{id}}}"#),
    )
    .await;
    assert_eq!(recv_text(&mut client).await, id.to_string());
    if polite {
        client.close(None).await.expect("send close");
        drain_to_end(&mut client).await;
        return;
    }
    drop(client);
}

#[tokio::test]
async fn the_registry_is_empty_after_many_polite_and_abrupt_disconnects() {
    const WORKERS: u32 = 6;
    const PER_WORKER: u32 = 50;
    let server = Arc::new(TestServer::start().await);
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let server = Arc::clone(&server);
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_WORKER {
                cycle(&server, w * 1000 + i, i % 2 == 0).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    assert_eq!(
        server.hub.metrics().connections_total.get(),
        u64::from(WORKERS * PER_WORKER)
    );
    server
        .eventually("every connection ended", |hub| hub.live_connections() == 0)
        .await;
    // The abrupt half really reset: the server saw socket errors, not FINs.
    let resets = server.hub.metrics().errors(ErrorKind::Io);
    assert!(
        resets >= u64::from(WORKERS * PER_WORKER / 4),
        "only {resets} socket errors for {} reset connections",
        WORKERS * PER_WORKER / 2
    );

    let listing = raw::http_get(server.addr, "/api/connections").await;
    assert_eq!(listing.status, 200);
    assert_eq!(
        listing.json(),
        serde_json::json!({"clients": [], "clients_total": 0, "connections_open": 0})
    );
    // Sending to any of them now finds nobody.
    let report = raw::http(
        server.addr,
        "POST",
        "/api/send",
        &[("content-type", "application/json")],
        br#"{"targets":[0,1,1049,5049],"payload":1}"#,
    )
    .await;
    assert_eq!(
        report.json(),
        serde_json::json!({"delivered": [], "offline": [0, 1, 1049, 5049], "dropped": []})
    );
}

fn keepalive_limits() -> Limits {
    limits_with(|limits| {
        limits.ping_interval = Duration::from_millis(200);
        limits.pong_timeout = Duration::from_millis(200);
    })
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let server = TestServer::with_limits(keepalive_limits()).await;
    let mut client = server.connect("/echo").await;
    let start = Instant::now();
    let hold = Duration::from_millis(1500);
    let mut pings = 0;
    // Polling the stream lets tungstenite answer each ping with a pong.
    while let Some(left) = hold.checked_sub(start.elapsed()) {
        match tokio::time::timeout(left, client.next()).await {
            Err(_) => break,
            Ok(Some(Ok(WsMessage::Ping(payload)))) => {
                assert!(payload.is_empty());
                pings += 1;
            }
            Ok(other) => panic!("unexpected while idle: {other:?}"),
        }
    }
    assert!(
        pings >= 3,
        "only {pings} pings in 1.5 s at a 200 ms interval"
    );
    send_text(&mut client, "still here").await;
    assert_eq!(recv_text(&mut client).await, "still here");
    assert_eq!(server.hub.live_connections(), 1);
    assert_eq!(server.hub.metrics().errors(ErrorKind::KeepaliveTimeout), 0);
}

#[tokio::test]
async fn a_client_that_never_answers_is_dropped_by_keepalive() {
    let server = TestServer::with_limits(keepalive_limits()).await;
    let mut silent = raw::RawWs::connect(server.addr, "/echo").await;
    server
        .eventually("the connection is open", |hub| hub.live_connections() == 1)
        .await;
    let start = Instant::now();
    while server.hub.live_connections() != 0 {
        assert!(
            start.elapsed() < Duration::from_millis(1200),
            "a silent client was not dropped within 1.2 s (ping 200 ms + pong timeout 200 ms)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.hub.metrics().errors(ErrorKind::KeepaliveTimeout), 1);

    // What the server sent meanwhile: a ping, then a close, then EOF.
    let ping = silent.read_frame().await;
    assert_eq!((ping.opcode, ping.payload.len()), (0x9, 0));
    let (code, reason) = silent.expect_close().await;
    assert_eq!(code, 1001);
    assert_eq!(reason, "keepalive timeout: no pong in time");
}

/// After a pong the next ping comes `ping_interval` after the client was
/// last heard from, even with a pong timeout longer than the interval.
/// Before the keepalive deadline was re-armed on the read that answered a
/// ping, it stayed at "ping sent + pong timeout", so the next ping came
/// max(ping_interval, pong_timeout) later: here 2 s instead of 200 ms.
#[tokio::test]
async fn after_a_pong_the_next_ping_comes_one_interval_later() {
    let interval = Duration::from_millis(200);
    let server = TestServer::with_limits(limits_with(|limits| {
        limits.ping_interval = interval;
        limits.pong_timeout = Duration::from_secs(2);
    }))
    .await;
    let mut client = raw::RawWs::connect(server.addr, "/echo").await;
    let mut pings = Vec::new();
    for _ in 0..3 {
        let ping = client
            .try_read_frame(Duration::from_secs(5))
            .await
            .expect("a ping");
        assert_eq!((ping.opcode, ping.payload.len()), (0x9, 0));
        pings.push(Instant::now());
        client.send(&raw::masked(0x8A, b"")).await;
    }
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap < interval + Duration::from_millis(600),
            "the next ping came {gap:?} after the previous one was answered at once (ping_interval 200 ms, pong_timeout 2 s)"
        );
    }
    assert_eq!(server.hub.metrics().errors(ErrorKind::KeepaliveTimeout), 0);
}

/// The client IDs `GET /api/connections` lists.
async fn client_ids(server: &TestServer) -> Vec<String> {
    let listing = raw::http_get(server.addr, "/api/connections").await;
    assert_eq!(listing.status, 200);
    listing.json()["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| c["id"].as_str().expect("id").to_owned())
        .collect()
}

/// Waits (bounded by `within`) until `id` is no longer registered.
async fn wait_unregistered(server: &TestServer, id: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !client_ids(server).await.iter().any(|i| i == id) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Reads text messages until `expected` `{"seq":n}` payloads arrived or the
/// stream does something else; returns the seqs seen and how it ended.
async fn collect_seqs(client: &mut Client, expected: usize) -> (Vec<u64>, String) {
    let mut seen = Vec::with_capacity(expected);
    while seen.len() < expected {
        match tokio::time::timeout(WAIT, client.next()).await {
            Ok(Some(Ok(WsMessage::Text(text)))) => {
                let json: serde_json::Value =
                    serde_json::from_str(text.as_str()).expect("JSON payload");
                seen.push(json["seq"].as_u64().expect("seq"));
            }
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => {}
            Ok(other) => return (seen, format!("{other:?}")),
            Err(_) => return (seen, "silence for 5 s".to_owned()),
        }
    }
    (seen, "complete".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_disconnected_while_a_healthy_client_gets_everything() {
    const FLOOD: usize = 20_000;
    const EVERY: usize = 100;
    let limits = limits_with(|limits| {
        limits.max_queued_messages = 16;
        limits.close_timeout = Duration::from_millis(500);
    });
    let server = TestServer::with_limits(limits).await;
    // Never read from: its socket buffers fill, then its queue.
    let _slow = server.connect("/ws?id=slow").await;
    let mut healthy = server.connect("/ws?id=healthy").await;
    let mut sender = server.connect("/ws?id=sender").await;
    server
        .eventually("three connections", |hub| hub.live_connections() == 3)
        .await;

    let expected = FLOOD / EVERY;
    // The task hands the client back so it stays connected to the end.
    let reader = tokio::spawn(async move {
        let result = collect_seqs(&mut healthy, expected).await;
        (result, healthy)
    });

    let flood = WsMessage::text(format!(
        r#"{{"targets":["slow"],"payload":"{}"}}"#,
        "x".repeat(1024)
    ));
    for i in 0..FLOOD {
        sender.feed(flood.clone()).await.expect("feed");
        if i % EVERY == 0 {
            let seq = i / EVERY;
            sender
                .feed(WsMessage::text(format!(
                    r#"{{"targets":["healthy"],"payload":{{"seq":{seq}}}}}"#
                )))
                .await
                .expect("feed");
            sender.flush().await.expect("flush");
        }
    }
    sender.flush().await.expect("flush");

    assert!(
        wait_unregistered(&server, "slow", WAIT).await,
        "the slow client is still connected 5 s after the flood (overflows counted: {})",
        server.hub.metrics().errors(ErrorKind::QueueOverflow)
    );
    let metrics = server.hub.metrics();
    assert!(metrics.dropped_messages.get() > 0, "no dropped messages");
    assert!(metrics.errors(ErrorKind::QueueOverflow) >= 1);

    let ((seen, ending), _healthy) = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the healthy reader finishes")
        .expect("reader task");
    assert_eq!(
        seen.len(),
        expected,
        "the healthy client got {} of {expected} messages, then: {ending}",
        seen.len()
    );
    assert_eq!(seen, (0..expected as u64).collect::<Vec<_>>());
    // The healthy client and the sender are both still connected.
    assert_eq!(client_ids(&server).await, ["healthy", "sender"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_once_its_queue_overflows() {
    // Default queue limits; the sender is paced (a few frames per
    // millisecond, Nagle off) so the server drains the slow client's queue
    // into its socket until the socket buffers and the write backlog are
    // full — the way a real slow consumer fills up.
    let limits = limits_with(|limits| {
        limits.close_timeout = Duration::from_millis(500);
    });
    let server = TestServer::with_limits(limits).await;
    let _slow = server.connect("/ws?id=slow").await;
    let stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let (mut sender, _) =
        tokio_tungstenite::client_async(server.url("/ws?id=sender"), MaybeTlsStream::Plain(stream))
            .await
            .expect("handshake");
    let flood = WsMessage::text(format!(
        r#"{{"targets":["slow"],"payload":"{}"}}"#,
        "x".repeat(1024)
    ));
    let metrics = server.hub.metrics();
    let mut sent = 0;
    while metrics.dropped_messages.get() == 0 {
        assert!(
            sent < 20_000,
            "20,000 frames of 1 KiB to a client that never reads, and no message was dropped"
        );
        for _ in 0..4 {
            sender.send(flood.clone()).await.expect("send");
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The queue is full: the server has decided the client is too slow.
    let overflowed_at = Instant::now();
    let gone = wait_unregistered(&server, "slow", Duration::from_secs(3)).await;
    assert!(
        gone,
        "the slow client is still registered {:?} after its queue overflowed \
         ({sent} frames sent, {} dropped, {} queue overflows counted)",
        overflowed_at.elapsed(),
        metrics.dropped_messages.get(),
        metrics.errors(ErrorKind::QueueOverflow)
    );
    assert_eq!(metrics.errors(ErrorKind::QueueOverflow), 1);
    assert_eq!(client_ids(&server).await, ["sender"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_relay_frames_to_a_reading_client_is_delivered_whole() {
    // 1,500 small relay frames (about 50 KB) in one write: the server reads
    // them in one go. The target reads as fast as it can, so nothing about
    // it is slow and all 1,500 must arrive (default limits: a queue of
    // 1,024 messages, 1 MiB).
    const BURST: usize = 1500;
    let server = TestServer::start().await;
    let mut target = server.connect("/ws?id=2").await;
    let mut sender = server.connect("/ws?id=1").await;
    server
        .eventually("two connections", |hub| hub.live_connections() == 2)
        .await;
    // The task hands the client back so it stays connected to the end.
    let reader = tokio::spawn(async move {
        let result = collect_seqs(&mut target, BURST).await;
        (result, target)
    });
    for seq in 0..BURST {
        sender
            .feed(WsMessage::text(format!(
                r#"{{"targets":[2],"payload":{{"seq":{seq}}}}}"#
            )))
            .await
            .expect("feed");
    }
    sender.flush().await.expect("flush");
    let ((seen, ending), _target) = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the reader finishes")
        .expect("reader task");
    assert_eq!(
        seen.len(),
        BURST,
        "a reading client got {} of {BURST} relayed messages, then: {ending}",
        seen.len()
    );
    assert_eq!(seen, (0..BURST as u64).collect::<Vec<_>>());
    assert_eq!(server.hub.metrics().errors(ErrorKind::QueueOverflow), 0);
    assert_eq!(server.hub.live_connections(), 2);
}

#[tokio::test]
async fn over_max_connections_is_refused_with_503_until_a_slot_frees() {
    let limits = limits_with(|limits| {
        limits.max_connections = 3;
    });
    let server = TestServer::with_limits(limits).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(server.connect("/echo").await);
    }
    server
        .eventually("three connections", |hub| hub.live_connections() == 3)
        .await;

    // The 4th TCP connection is answered at once, without a request.
    let refused = over_capacity(&server).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.error_code(), "over_capacity");
    // An HTTP request is refused the same way: the cap counts every TCP
    // connection.
    assert!(
        tokio_tungstenite::connect_async(server.url("/echo"))
            .await
            .is_err()
    );

    // Close one client; its slot frees and a new connection gets in.
    let mut first = clients.remove(0);
    first.close(None).await.expect("close");
    drain_to_end(&mut first).await;
    server
        .eventually("two connections", |hub| hub.live_connections() == 2)
        .await;
    let mut replacement = None;
    for _ in 0..40 {
        // The slot is released just after the connection leaves the count.
        if let Ok((client, _)) = tokio_tungstenite::connect_async(server.url("/echo")).await {
            replacement = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut replacement = replacement.expect("a connection after a slot freed");
    replacement.send(WsMessage::text("in")).await.expect("send");
    assert_eq!(recv_text(&mut replacement).await, "in");
    // Full again.
    assert_eq!(over_capacity(&server).await.status, 503);
}

/// Opens a TCP connection and reads what the server answers without
/// sending anything (a request the server never reads could turn its
/// close into a reset).
async fn over_capacity(server: &TestServer) -> raw::HttpResponse {
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    raw::read_response(&mut stream).await
}

#[tokio::test]
async fn shutdown_flushes_queued_frames_then_closes_with_1001() {
    const QUEUED: usize = 50;
    let server = TestServer::start().await;
    let hub = server.hub.clone();
    let addr = server.addr;
    let mut client = server.connect("/ws?id=7").await;
    server
        .eventually("connected", |hub| hub.live_connections() == 1)
        .await;

    let target = [ClientId::new("7").expect("id")];
    for n in 0..QUEUED {
        let report = hub
            .send(&target, &Hub::encode_text(format!(r#"{{"n":{n}}}"#)))
            .await;
        assert_eq!(report.delivered, [0]);
    }
    let started = Instant::now();
    let shutdown = tokio::spawn(server.shutdown());

    for n in 0..QUEUED {
        assert_eq!(
            recv_json(&mut client).await,
            serde_json::json!({ "n": n }),
            "frame {n} before the close"
        );
    }
    let frame = recv_close(&mut client).await.expect("close with a code");
    assert_eq!(frame.code, WsCloseCode::Away);
    assert_eq!(u16::from(frame.code), 1001);
    assert_eq!(frame.reason.as_str(), "server shutting down");
    // Nothing follows the close; polling lets tungstenite answer it.
    match tokio::time::timeout(WAIT, client.next()).await {
        Ok(None) | Ok(Some(Err(_))) => {}
        Ok(Some(Ok(other))) => panic!("after the close: {other:?}"),
        Err(_) => panic!("the server did not end the connection"),
    }
    tokio::time::timeout(Duration::from_secs(6), shutdown)
        .await
        .expect("shutdown returns")
        .expect("shutdown task");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}: it waited for its timeout instead of the close handshake",
        started.elapsed()
    );
    assert_eq!(hub.live_connections(), 0);
    assert_eq!(hub.metrics().dropped_messages.get(), 0);
    // The listener is gone: new connections are refused.
    assert!(TcpStream::connect(addr).await.is_err());
}
