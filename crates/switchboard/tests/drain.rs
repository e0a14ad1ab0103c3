//! Graceful drain, black box: a real server, real clients
//! (docs/protocol-v1.md, "Drain"; docs/scaling.md, "Rolling restarts").

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    Client, TestServer, WAIT, close_code, http_get, http_post_json, http_request, http_upgrade,
    metric_value, recv_json, send_text, upgrade_headers,
};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use switchboard::auth::ApiKeys;
use switchboard::{DrainLimits, DuplicateIds, Hub, Limits, MemoryBackend, Security};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

fn limits(window_ms: u64, grace_ms: u64) -> Limits {
    Limits {
        drain: DrainLimits {
            window: Duration::from_millis(window_ms),
            grace: Duration::from_millis(grace_ms),
        },
        ..Limits::default()
    }
}

async fn server(window_ms: u64, grace_ms: u64) -> TestServer {
    TestServer::with_limits(limits(window_ms, grace_ms)).await
}

/// A v1 connection as client `id`, hello said, welcome read.
async fn v1_client(server: &TestServer, id: &str, resume: Option<Value>) -> (Client, Value) {
    let mut request = server
        .url(&format!("/ws?id={id}"))
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("switchboard.v1"),
    );
    let (mut client, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect v1");
    let mut hello = json!({"type": "hello", "id": 0});
    if let Some(resume) = resume {
        hello["resume"] = resume;
    }
    send_text(&mut client, &hello.to_string()).await;
    let welcome = recv_json(&mut client).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (client, welcome)
}

/// The next data frame or close, within `limit`: `Ok(text)` or `Err(close
/// code)`.
async fn next_event(client: &mut Client, limit: Duration) -> Result<String, u16> {
    loop {
        let next = tokio::time::timeout(limit, client.next())
            .await
            .expect("a frame or a close within the limit");
        match next {
            Some(Ok(WsMessage::Text(text))) => return Ok(text.to_string()),
            Some(Ok(WsMessage::Close(frame))) => return Err(close_code(frame)),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
            other => panic!("expected a text frame or a close, got {other:?}"),
        }
    }
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The number in `{"type":"drain","reconnect_in_ms":N,…}`, checked whole.
fn hint_delay(frame: &Value, window: Duration, grace: Duration) -> Duration {
    assert_eq!(frame["type"], "drain", "{frame}");
    let delay = frame["reconnect_in_ms"].as_u64().expect("reconnect_in_ms");
    assert_eq!(
        frame["close_in_ms"].as_u64(),
        Some(delay + grace.as_millis() as u64),
        "{frame}"
    );
    assert_eq!(
        frame["window_ms"].as_u64(),
        Some(window.as_millis() as u64),
        "{frame}"
    );
    assert!(
        u128::from(delay) < window.as_millis().max(1),
        "{delay} ms is outside the window: {frame}"
    );
    Duration::from_millis(delay)
}

/// Every error counter together.
fn errors(hub: &Hub) -> u64 {
    let text = hub.metrics().render(0);
    text.lines()
        .filter(|l| l.starts_with("switchboard_errors_total{"))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[tokio::test]
async fn upgrades_get_503_draining_with_retry_after_and_ready_heartbeat_and_metrics_flip() {
    let server = server(10_000, 1_000).await;
    // A client that stays, so the drain has someone to wait for.
    let _stays = server.connect("/ws?id=1").await;

    let ready = http_get(server.addr, "/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json(), json!({"status": "ready"}));
    let heartbeat = http_get(server.addr, "/heartbeat").await;
    assert_eq!(heartbeat.json(), json!({"status": "ok"}));
    let metrics = http_get(server.addr, "/metrics").await.text();
    assert_eq!(metric_value(&metrics, "switchboard_draining"), Some(0.0));
    let before = http_upgrade(server.addr, "/ws?id=2", &upgrade_headers()).await;
    assert_eq!(before.status, 101);
    // That one ends with its TCP connection; the first stays.
    server
        .eventually("one connection left", |hub| hub.live_connections() == 1)
        .await;

    let started = Instant::now();
    let answer = http_post_json(server.addr, "/api/drain", "").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let refused = http_upgrade(server.addr, "/ws?id=3", &upgrade_headers()).await;
    let took = started.elapsed();
    let body = answer.json();
    assert_eq!(body["draining"], true, "{body}");
    assert_eq!(body["started_now"], true, "{body}");
    assert_eq!(body["window_ms"], 10_000, "{body}");
    assert_eq!(body["grace_ms"], 1_000, "{body}");
    assert_eq!(body["plain_connections"], 1, "{body}");
    assert_eq!(body["v1_connections"], 0, "{body}");

    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.error_code(), "draining");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(
        took < Duration::from_millis(100),
        "the drain call and a refused upgrade took {took:?}"
    );
    // Every WebSocket route, every protocol.
    for path in ["/echo", "/chat", "/ws?id=4"] {
        let refused = http_upgrade(server.addr, path, &upgrade_headers()).await;
        assert_eq!(refused.status, 503, "{path}: {}", refused.text());
        assert_eq!(refused.error_code(), "draining", "{path}");
    }

    let ready = http_get(server.addr, "/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(ready.error_code(), "draining");
    assert_eq!(ready.header("retry-after"), Some("1"));
    let heartbeat = http_get(server.addr, "/heartbeat").await;
    assert_eq!(heartbeat.status, 200, "liveness stays up while draining");
    assert_eq!(heartbeat.json()["status"], "draining");
    let metrics = http_get(server.addr, "/metrics").await.text();
    assert_eq!(metric_value(&metrics, "switchboard_draining"), Some(1.0));

    // The API still works (deliveries to the clients still here).
    let sent = http_post_json(server.addr, "/api/send", r#"{"targets":[1],"payload":"x"}"#).await;
    assert_eq!(sent.json()["delivered"], json!([1]));

    // A second call reports the drain under way and changes nothing.
    let again = http_post_json(server.addr, "/api/drain", "").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["started_now"], false, "{}", again.text());
    assert_eq!(again.json()["plain_connections"], 0, "{}", again.text());
}

#[tokio::test]
async fn post_api_drain_needs_the_api_key() {
    const KEY: &str = "drain-test-key-0123456789abcdef";
    let hub = Hub::builder(limits(1_000, 0))
        .security(Security {
            api_keys: ApiKeys::new([KEY]).expect("key"),
            ..Security::default()
        })
        .build();
    let server = TestServer::with_router(hub.clone(), switchboard::app(hub.clone())).await;

    let missing = http_post_json(server.addr, "/api/drain", "").await;
    assert_eq!(missing.status, 401, "{}", missing.text());
    assert_eq!(missing.error_code(), "missing_api_key");
    let wrong = http_request(
        server.addr,
        "POST",
        "/api/drain",
        &[("Authorization", "Bearer not-the-key-0123456789")],
        b"",
    )
    .await;
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    assert_eq!(wrong.error_code(), "invalid_api_key");
    assert!(!hub.is_draining(), "a refused call must not drain");

    let auth = format!("Bearer {KEY}");
    let ok = http_request(
        server.addr,
        "POST",
        "/api/drain",
        &[("Authorization", auth.as_str())],
        b"",
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["started_now"], true);
    assert!(hub.is_draining());
    // A browser page of another site cannot drain a node either.
    let hub2 = Hub::new(limits(1_000, 0));
    let open = TestServer::with_router(hub2.clone(), switchboard::app(hub2.clone())).await;
    let cross_site = http_request(
        open.addr,
        "POST",
        "/api/drain",
        &[("Origin", "https://evil.example")],
        b"",
    )
    .await;
    assert_eq!(cross_site.status, 403, "{}", cross_site.text());
    assert!(!hub2.is_draining());
}

/// Every v1 client gets exactly one drain frame within 1 s; the 1012 comes
/// no earlier than its delay plus the grace, and not much later.
#[tokio::test]
async fn each_v1_client_gets_one_drain_frame_then_1012_after_its_delay_plus_grace() {
    const CLIENTS: usize = 20;
    let (window, grace) = (Duration::from_millis(2_000), Duration::from_millis(700));
    let server = server(2_000, 700).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(v1_client(&server, &format!("c{i}"), None).await.0);
    }
    let started = Instant::now();
    let report = server.hub.drain();
    assert_eq!(report.v1_connections, CLIENTS);
    assert_eq!(report.plain_connections, 0);

    let mut tasks = Vec::new();
    for mut client in clients {
        tasks.push(tokio::spawn(async move {
            let hint = next_event(&mut client, WAIT).await.expect("a drain frame");
            let hinted = started.elapsed();
            let delay = hint_delay(&parse(&hint), window, grace);
            // Then nothing but the close: one drain frame, not two.
            let close = next_event(&mut client, WAIT).await;
            let closed = started.elapsed();
            assert_eq!(close, Err(1012), "after {hint}");
            (hinted, delay, closed)
        }));
    }
    let mut delays = Vec::new();
    for task in tasks {
        let (hinted, delay, closed) = task.await.expect("client task");
        assert!(
            hinted < Duration::from_secs(1),
            "drain frame after {hinted:?}"
        );
        assert!(
            closed >= delay + grace,
            "1012 after {closed:?}, before its delay {delay:?} + grace {grace:?}"
        );
        assert!(
            closed < delay + grace + Duration::from_millis(500),
            "1012 after {closed:?}, long after its delay {delay:?} + grace {grace:?}"
        );
        delays.push(delay);
    }
    // Evenly spaced: one delay in each 1/20 of the window.
    let mut slots: Vec<u128> = delays
        .iter()
        .map(|d| d.as_millis() * CLIENTS as u128 / window.as_millis())
        .collect();
    slots.sort_unstable();
    assert_eq!(
        slots,
        (0..CLIENTS as u128).collect::<Vec<_>>(),
        "{delays:?}"
    );
    assert_eq!(server.hub.drain_hints_total(), CLIENTS as u64);
    tokio::time::timeout(WAIT, server.hub.drain_finished())
        .await
        .expect("the drain finishes once everyone is gone");
}

/// 1,000 v1 clients, a 10 s window: the assigned delays put no more than
/// twice its share (2 × 100) into any 1 s bucket, and the 1012 closes
/// arrive spread the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_are_spread_over_the_window() {
    const CLIENTS: usize = 1000;
    const BUCKETS: usize = 10;
    let (window, grace) = (Duration::from_secs(10), Duration::from_millis(500));
    let server = server(10_000, 500).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(v1_client(&server, &format!("m{i}"), None).await.0);
    }
    let started = Instant::now();
    let report = server.hub.drain();
    assert_eq!(report.v1_connections, CLIENTS);
    let mut tasks = Vec::new();
    for mut client in clients {
        tasks.push(tokio::spawn(async move {
            let hint = next_event(&mut client, WAIT).await.expect("a drain frame");
            let hinted = started.elapsed();
            let delay = hint_delay(&parse(&hint), window, grace);
            let close = next_event(&mut client, window + grace + WAIT).await;
            (hinted, delay, close, started.elapsed())
        }));
    }
    let mut assigned = [0usize; BUCKETS];
    let mut closes = [0usize; BUCKETS + 1];
    let mut latest_hint = Duration::ZERO;
    let mut worst_late = Duration::ZERO;
    for task in tasks {
        let (hinted, delay, close, closed) = task.await.expect("client task");
        latest_hint = latest_hint.max(hinted);
        assert_eq!(close, Err(1012));
        assert!(closed >= delay + grace, "{closed:?} < {delay:?} + grace");
        worst_late = worst_late.max(closed - delay - grace);
        assigned[delay.as_secs() as usize] += 1;
        let bucket = (closed.saturating_sub(grace).as_secs() as usize).min(BUCKETS);
        closes[bucket] += 1;
    }
    eprintln!(
        "assigned per 1 s: {assigned:?}; 1012s per 1 s (after the grace): {closes:?}; last drain frame {latest_hint:?} after the drain; latest 1012 {worst_late:?} after its time"
    );
    assert!(
        latest_hint < Duration::from_secs(1),
        "last drain frame {latest_hint:?} after the drain"
    );
    let share = CLIENTS / BUCKETS;
    for (second, n) in assigned.iter().enumerate() {
        assert!(
            *n <= 2 * share,
            "second {second} was assigned {n}: {assigned:?}"
        );
    }
    for (second, n) in closes.iter().enumerate() {
        assert!(
            *n <= 2 * share,
            "second {second} got {n} closes: {closes:?}"
        );
    }
    assert!(
        worst_late < Duration::from_secs(1),
        "a 1012 came {worst_late:?} after its time"
    );
}

/// Plain clients get no hint: 1001, at delays spread over the window.
#[tokio::test]
async fn plain_clients_get_1001_spread_over_the_window() {
    const CLIENTS: usize = 100;
    const BUCKETS: usize = 10;
    let window = Duration::from_millis(2_000);
    let server = server(2_000, 5_000).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(server.connect(&format!("/ws?id=p{i}")).await);
    }
    let started = Instant::now();
    let report = server.hub.drain();
    assert_eq!(report.plain_connections, CLIENTS);
    let mut tasks = Vec::new();
    for mut client in clients {
        tasks.push(tokio::spawn(async move {
            let close = next_event(&mut client, window + WAIT).await;
            (close, started.elapsed())
        }));
    }
    let mut buckets = [0usize; BUCKETS + 1];
    let (mut first, mut last) = (Duration::MAX, Duration::ZERO);
    for task in tasks {
        let (close, at) = task.await.expect("client task");
        assert_eq!(close, Err(1001), "plain clients get no drain frame");
        first = first.min(at);
        last = last.max(at);
        let bucket = (at.as_millis() * BUCKETS as u128 / window.as_millis()) as usize;
        buckets[bucket.min(BUCKETS)] += 1;
    }
    eprintln!("1001s per 200 ms: {buckets:?}, first {first:?}, last {last:?}");
    // No grace for plain clients: all within the window (and a little).
    assert!(
        last < window + Duration::from_millis(300),
        "last 1001 at {last:?}"
    );
    assert!(
        first < Duration::from_millis(300),
        "first 1001 at {first:?}"
    );
    assert!(last > window * 3 / 4, "closed too early: last at {last:?}");
    let share = CLIENTS / BUCKETS;
    for (i, n) in buckets.iter().enumerate() {
        assert!(*n <= 2 * share, "bucket {i} got {n}: {buckets:?}");
    }
}

/// A client that leaves on its own after its drain frame: no error counted,
/// and the drain finishes as soon as nobody is left, not at window + grace.
#[tokio::test]
async fn a_client_that_leaves_after_the_drain_frame_causes_no_error() {
    let server = server(10_000, 5_000).await;
    let (mut client, _) = v1_client(&server, "leaver", None).await;
    let errors_before = errors(&server.hub);
    let started = Instant::now();
    server.hub.drain();
    let hint = next_event(&mut client, WAIT).await.expect("a drain frame");
    assert_eq!(parse(&hint)["type"], "drain");
    client
        .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: 1000.into(),
            reason: "moving on".into(),
        }))
        .await
        .expect("client close");
    // The server answers the close; nothing else comes.
    let echoed = tokio::time::timeout(WAIT, async {
        loop {
            match client.next().await {
                Some(Ok(WsMessage::Close(_))) | None => return,
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                other => panic!("expected the close echo, got {other:?}"),
            }
        }
    })
    .await;
    assert!(echoed.is_ok(), "no close echo");
    tokio::time::timeout(WAIT, server.hub.drain_finished())
        .await
        .expect("the drain finishes once nobody is left");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drain waited {:?} for nobody",
        started.elapsed()
    );
    server
        .eventually("the connection is gone", |hub| hub.live_connections() == 0)
        .await;
    assert_eq!(
        errors(&server.hub),
        errors_before,
        "{}",
        server.hub.metrics().render(0)
    );
}

/// Two servers sharing one backend (as nodes share Redis): a client drained
/// from A reconnects to B with its resume position and gets `recovered`,
/// with the messages sent to it while it moved.
#[tokio::test]
async fn a_drained_client_resumes_on_another_server_with_what_was_sent_meanwhile() {
    let limits = limits(500, 300);
    let backend = Arc::new(MemoryBackend::with_v1(DuplicateIds::Allow, &limits.v1));
    let hub_a = Hub::with_backend(limits.clone(), backend.clone());
    let hub_b = Hub::with_backend(limits, backend);
    let a = TestServer::with_router(hub_a.clone(), switchboard::app(hub_a.clone())).await;
    let b = TestServer::with_router(hub_b.clone(), switchboard::app(hub_b.clone())).await;

    let (mut bob, welcome) = v1_client(&a, "bob", None).await;
    let sent = http_post_json(
        b.addr,
        "/api/send",
        r#"{"targets":["bob"],"payload":"before"}"#,
    )
    .await;
    assert_eq!(sent.json()["delivered"], json!(["bob"]), "{}", sent.text());
    let msg = parse(&next_event(&mut bob, WAIT).await.expect("msg"));
    assert_eq!(msg["payload"], "before", "{msg}");
    let seen = msg["seq"].as_u64().expect("seq");

    hub_a.drain();
    let hint = parse(&next_event(&mut bob, WAIT).await.expect("drain frame"));
    assert_eq!(hint["type"], "drain", "{hint}");
    // Bob stays until the 1012 (the worst case: no early move).
    assert_eq!(next_event(&mut bob, WAIT).await, Err(1012));
    // Reading on sends tungstenite's answer to the close.
    while let Ok(Some(_)) = tokio::time::timeout(WAIT, bob.next()).await {}
    a.eventually("bob's connection on A is gone", |hub| {
        hub.live_connections() == 0
    })
    .await;

    // Sent while bob is between nodes: offline, but retained.
    let sent = http_post_json(
        b.addr,
        "/api/send",
        r#"{"targets":["bob"],"payload":"moving"}"#,
    )
    .await;
    let report = sent.json();
    assert_eq!(report["offline"], json!(["bob"]), "{report}");
    assert_eq!(report["retained"], json!(["bob"]), "{report}");

    let resume = json!({"epoch": welcome["inbox"]["epoch"], "seq": seen});
    let (mut bob, welcome) = v1_client(&b, "bob", Some(resume)).await;
    assert_eq!(welcome["resume"]["status"], "recovered", "{welcome}");
    assert_eq!(welcome["resume"]["replayed"], 1, "{welcome}");
    let replayed = parse(&next_event(&mut bob, WAIT).await.expect("replayed msg"));
    assert_eq!(replayed["payload"], "moving", "{replayed}");
    assert_eq!(replayed["seq"].as_u64(), Some(seen + 1), "{replayed}");
    // B is not draining: bob stays.
    assert!(!hub_b.is_draining());
    bob.send(WsMessage::Close(None)).await.expect("close");
}

/// `DrainLimits::immediate()`: every client closed at once; a v1 client
/// still gets its drain frame first (delay 0).
#[tokio::test]
async fn an_immediate_drain_closes_everyone_at_once() {
    let server = TestServer::with_limits(Limits {
        drain: DrainLimits::immediate(),
        ..Limits::default()
    })
    .await;
    let (mut v1, _) = v1_client(&server, "v", None).await;
    let mut plain = server.connect("/ws?id=p").await;
    let started = Instant::now();
    server.hub.drain();
    let hint = parse(&next_event(&mut v1, WAIT).await.expect("drain frame"));
    assert_eq!(hint["reconnect_in_ms"], 0, "{hint}");
    assert_eq!(hint["close_in_ms"], 0, "{hint}");
    assert_eq!(next_event(&mut v1, WAIT).await, Err(1012));
    assert_eq!(next_event(&mut plain, WAIT).await, Err(1001));
    assert!(started.elapsed() < Duration::from_millis(500));
    tokio::time::timeout(WAIT, server.hub.drain_finished())
        .await
        .expect("finished");
}

/// A v1 connection that has not said hello when the drain starts gets its
/// drain frame right after its welcome (its deliveries wait for the hello).
#[tokio::test]
async fn a_v1_client_still_before_its_hello_gets_the_drain_frame_after_its_welcome() {
    // A grace longer than the wait for the hello: no 1012 before it.
    let server = server(2_000, 1_000).await;
    let mut request = server
        .url("/ws?id=late")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("switchboard.v1"),
    );
    let (mut client, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect v1");
    server
        .eventually("connected", |hub| hub.live_connections() == 1)
        .await;
    let report = server.hub.drain();
    assert_eq!(report.v1_connections, 1);
    // The hello comes 300 ms into the drain.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_text(&mut client, r#"{"type":"hello","id":0}"#).await;
    let welcome = parse(&next_event(&mut client, WAIT).await.expect("welcome"));
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let hint = parse(&next_event(&mut client, WAIT).await.expect("drain frame"));
    let hinted = Instant::now();
    assert_eq!(hint["type"], "drain", "{hint}");
    // Counted from when it was sent, not from the drain's start: the
    // delay left, and the close a grace later (or sooner, when the delay
    // has run out while the client had not said hello).
    let reconnect_in = hint["reconnect_in_ms"].as_u64().expect("reconnect_in_ms");
    let close_in = Duration::from_millis(hint["close_in_ms"].as_u64().expect("close_in_ms"));
    assert!(reconnect_in < 1_700, "{hint}");
    assert!(close_in <= Duration::from_millis(2_700), "{hint}");
    assert!(
        reconnect_in == 0 || close_in == Duration::from_millis(reconnect_in + 1_000),
        "{hint}"
    );
    assert_eq!(next_event(&mut client, WAIT).await, Err(1012));
    let closed_after = hinted.elapsed();
    assert!(
        closed_after + Duration::from_millis(50) >= close_in
            && closed_after < close_in + Duration::from_millis(500),
        "1012 {closed_after:?} after the drain frame that said {close_in:?}"
    );
}
