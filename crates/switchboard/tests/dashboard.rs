//! The dashboard's HTTP side over real HTTP/1.1: the embedded page, the
//! JSON endpoints behind it (`/api/ids`, `/api/topics`, `/api/stats`), the
//! event stream and its tickets, their auth and errors, shutdown with a
//! stream open, and the OpenAPI document. (Paging through 100,000 IDs is
//! `app::browse`'s unit test; the page in a real browser is
//! `crates/switchboard-cli/tests/dashboard_browser.rs`.)

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use switchboard::auth::ApiKeys;
use switchboard::{Hub, Limits, Security};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const KEY: &str = "dashboard-test-key-0123456789abcdef";

async fn keyed_server() -> TestServer {
    let hub = Hub::builder(Limits::default())
        .security(Security {
            api_keys: ApiKeys::new([KEY]).expect("key"),
            ..Security::default()
        })
        .build();
    TestServer::with_router(hub.clone(), switchboard::app(hub)).await
}

fn bearer() -> String {
    format!("Bearer {KEY}")
}

async fn get_with(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> RawResponse {
    http_request(addr, "GET", target, headers, b"").await
}

async fn ticket(addr: SocketAddr) -> String {
    let auth = bearer();
    let response = http_request(
        addr,
        "POST",
        "/api/stats/ticket",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    let body = response.json();
    assert_eq!(body["expires_in_ms"], 30_000);
    body["ticket"].as_str().expect("ticket").to_owned()
}

/// An open event stream: the socket after a 200's headers.
struct EventStream {
    stream: TcpStream,
    buffered: Vec<u8>,
}

impl EventStream {
    /// Opens `target`; returns the stream, or the error response.
    async fn open(
        addr: SocketAddr,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, RawResponse> {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("Accept: text/event-stream\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut buffered = Vec::new();
        let head_end = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(at) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                    return at + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.expect("read");
                assert!(n > 0, "closed before the headers");
                buffered.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("headers in time");
        let head = String::from_utf8_lossy(&buffered[..head_end]).to_string();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        if status != 200 {
            // Not a stream: read the rest as a normal response.
            let mut rest = buffered.clone();
            let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
            let text = String::from_utf8_lossy(&rest).to_string();
            let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
            let json_start = body.find('{').unwrap_or(0);
            let json_end = body.rfind('}').map_or(body.len(), |e| e + 1);
            return Err(RawResponse {
                status,
                headers: Vec::new(),
                body: body.as_bytes()[json_start..json_end].to_vec(),
            });
        }
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{head}"
        );
        buffered.drain(..head_end);
        Ok(Self { stream, buffered })
    }

    /// The next `stats` event's data, parsed; `None` when the stream ended.
    async fn next_stats(&mut self, limit: Duration) -> Option<Value> {
        tokio::time::timeout(limit, async {
            loop {
                let text = String::from_utf8_lossy(&self.buffered).to_string();
                if let Some(start) = text.find("event: stats\ndata: ")
                    && let Some(len) = text[start..].find("\n\n")
                {
                    let data = &text[start + "event: stats\ndata: ".len()..start + len];
                    // Chunked framing may split a line: events here are
                    // one chunk each.
                    let value: Value = serde_json::from_str(data).expect("stats JSON");
                    let consumed = text[..start + len + 2].len();
                    self.buffered.drain(..consumed);
                    return Some(value);
                }
                let mut chunk = [0u8; 8192];
                let n = self.stream.read(&mut chunk).await.expect("read");
                if n == 0 {
                    return None;
                }
                self.buffered.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("an event or the end in time")
    }
}

// ---------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_page_and_its_files_are_embedded_and_load_nothing_from_elsewhere() {
    let server = TestServer::start().await;
    let page = http_get(server.addr, "/dashboard").await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html"))
    );
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let html = page.text();
    // Every file the page names is the server's own, and is served.
    let mut named = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let target = part.split('"').next().expect("closing quote");
            // `data:,` is the empty icon (no request; CSP allows data:
            // images only).
            assert!(
                target.starts_with('/') || target.starts_with('#') || target == "data:,",
                "the page loads {target} from elsewhere"
            );
            named.push(target.to_owned());
        }
    }
    for file in named.iter().filter(|t| t.starts_with("/dashboard/")) {
        let response = http_get(server.addr, file).await;
        assert_eq!(response.status, 200, "{file}");
        let body = response.text();
        assert!(
            !body.contains("http://") || file.contains("uPlot"),
            "{file} names an http:// address"
        );
    }
    assert!(named.iter().any(|t| t == "/dashboard/uPlot.iife.min.js"));
    assert!(named.iter().any(|t| t == "/dashboard/app.js"));
    let missing = http_get(server.addr, "/dashboard/secrets.txt").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error_code(), "not_found");
}

// ---------------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_dashboard_api_needs_the_key_when_keys_are_set() {
    let server = keyed_server().await;
    let auth = bearer();
    for target in ["/api/ids", "/api/topics", "/api/stats"] {
        let none = http_get(server.addr, target).await;
        assert_eq!(none.status, 401, "{target}");
        assert_eq!(none.error_code(), "missing_api_key", "{target}");
        let wrong = get_with(
            server.addr,
            target,
            &[("Authorization", "Bearer not-the-key-0123456789")],
        )
        .await;
        assert_eq!(wrong.status, 401, "{target}");
        assert_eq!(wrong.error_code(), "invalid_api_key", "{target}");
        let right = get_with(server.addr, target, &[("Authorization", &auth)]).await;
        assert_eq!(right.status, 200, "{target}: {right:?}");
    }
    let no_ticket = http_request(server.addr, "POST", "/api/stats/ticket", &[], b"").await;
    assert_eq!(no_ticket.status, 401);
    // The page itself holds no data and needs no key.
    assert_eq!(http_get(server.addr, "/dashboard").await.status, 200);
    // The OpenAPI document describes, it holds no data: open too.
    assert_eq!(http_get(server.addr, "/api/openapi.json").await.status, 200);
}

#[tokio::test]
async fn browsers_of_other_origins_are_refused() {
    let server = TestServer::start().await;
    let other = get_with(
        server.addr,
        "/api/ids",
        &[("Origin", "http://evil.example")],
    )
    .await;
    assert_eq!(other.status, 403);
    assert_eq!(other.error_code(), "origin_not_allowed");
    let origin = format!("http://{}", server.addr);
    let own = get_with(server.addr, "/api/stats", &[("Origin", &origin)]).await;
    assert_eq!(own.status, 200, "{own:?}");
}

#[tokio::test]
async fn the_stream_opens_with_a_ticket_once_or_with_the_key() {
    let server = keyed_server().await;
    let refused = EventStream::open(server.addr, "/api/stats/stream", &[])
        .await
        .err()
        .expect("refused without credentials");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.error_code(), "missing_api_key");
    let refused = EventStream::open(server.addr, "/api/stats/stream?ticket=guess", &[])
        .await
        .err()
        .expect("refused with a made-up ticket");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.error_code(), "invalid_ticket");
    let wrong_key = EventStream::open(
        server.addr,
        "/api/stats/stream",
        &[("Authorization", "Bearer not-the-key-0123456789")],
    )
    .await
    .err()
    .expect("refused with a wrong key");
    assert_eq!(wrong_key.error_code(), "invalid_api_key");

    let ticket = ticket(server.addr).await;
    let target = format!("/api/stats/stream?ticket={ticket}");
    let mut stream = EventStream::open(server.addr, &target, &[])
        .await
        .unwrap_or_else(|r| panic!("a fresh ticket opens the stream: {r:?}"));
    let first = stream
        .next_stats(Duration::from_millis(1500))
        .await
        .expect("a first sample at once");
    assert_eq!(first["backend"]["backend"], "memory");
    assert!(first["errors"]["protocol"].is_u64(), "{first}");
    let spent = EventStream::open(server.addr, &target, &[])
        .await
        .err()
        .expect("a spent ticket opens nothing");
    assert_eq!(spent.error_code(), "invalid_ticket");

    let auth = bearer();
    let mut with_key = EventStream::open(
        server.addr,
        "/api/stats/stream",
        &[("Authorization", &auth)],
    )
    .await
    .unwrap_or_else(|r| panic!("the key opens the stream: {r:?}"));
    assert!(
        with_key
            .next_stats(Duration::from_millis(1500))
            .await
            .is_some()
    );
}

// ---------------------------------------------------------------------------
// Live data
// ---------------------------------------------------------------------------

#[tokio::test]
async fn samples_come_every_second_and_follow_the_traffic() {
    let server = TestServer::start().await;
    let mut stream = EventStream::open(server.addr, "/api/stats/stream", &[])
        .await
        .unwrap_or_else(|r| panic!("open without keys: {r:?}"));
    let first = stream.next_stats(WAIT).await.expect("first");
    assert_eq!(first["connections_open"], 0);

    let mut alice = server.connect("/ws?id=alice").await;
    let _bob = server.connect("/ws?id=bob").await;
    send_text(&mut alice, r#"{"targets":["bob"],"payload":1}"#).await;
    let started = Instant::now();
    let mut last = first;
    let mut samples = 0;
    while last["connections_open"] != 2 || last["deliveries"] != 1 {
        last = stream.next_stats(WAIT).await.expect("a sample");
        samples += 1;
        assert!(samples < 5, "the sample never showed the traffic: {last}");
    }
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert_eq!(last["frames_in"], 1);
    assert!(last["at_unix_ms"].as_u64() > Some(0));
    // Samples are a second apart (the interval; a little slack for load).
    let a = stream.next_stats(WAIT).await.expect("a");
    let b = stream.next_stats(WAIT).await.expect("b");
    let gap = b["at_unix_ms"].as_u64().expect("ms") - a["at_unix_ms"].as_u64().expect("ms");
    assert!((800..=1600).contains(&gap), "samples {gap} ms apart");

    let ids = http_get(server.addr, "/api/ids").await.json();
    let listed: Vec<&str> = ids["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(listed, ["alice", "bob"]);
}

#[tokio::test]
async fn refusals_and_errors_appear_in_the_sample() {
    let server = TestServer::start().await;
    // A WebSocket upgrade without an ID is refused and logged.
    let refused = http_upgrade(server.addr, "/ws", &upgrade_headers()).await;
    assert_eq!(refused.status, 400);
    let stats = http_get(server.addr, "/api/stats").await.json();
    assert_eq!(stats["refusals_total"], 1);
    assert_eq!(stats["recent_refusals"][0]["route"], "/ws");
    assert_eq!(stats["recent_refusals"][0]["code"], "missing_id");
    assert_eq!(stats["errors"]["bad_request"], 0, "{stats}");
    // An API request that cannot be parsed counts as `bad_request`.
    let bad = http_post_json(server.addr, "/api/send", "{").await;
    assert_eq!(bad.status, 400);
    let stats = http_get(server.addr, "/api/stats").await.json();
    assert_eq!(stats["errors"]["bad_request"], 1, "{stats}");
}

#[tokio::test]
async fn shutdown_ends_open_streams_at_once() {
    let server = TestServer::start().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = EventStream::open(server.addr, "/api/stats/stream", &[])
            .await
            .unwrap_or_else(|r| panic!("open: {r:?}"));
        stream.next_stats(WAIT).await.expect("first");
        streams.push(stream);
    }
    let started = Instant::now();
    // The server's shutdown timeout is 5 s: a stream that held the drain
    // would take that long.
    server.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?} with streams open",
        started.elapsed()
    );
    for mut stream in streams {
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(WAIT, stream.stream.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "the stream did not end");
    }
}

// ---------------------------------------------------------------------------
// OpenAPI
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_openapi_document_describes_every_route_and_its_errors() {
    let server = TestServer::start().await;
    let response = http_get(server.addr, "/api/openapi.json").await;
    assert_eq!(response.status, 200);
    let doc = response.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    let expected = [
        ("/ws", "get"),
        ("/echo", "get"),
        ("/chat", "get"),
        ("/heartbeat", "get"),
        ("/metrics", "get"),
        ("/ready", "get"),
        ("/api/send", "post"),
        ("/api/publish", "post"),
        ("/api/connections", "get"),
        ("/api/connections/{id}", "delete"),
        ("/api/drain", "post"),
        ("/api/presence/{topic}", "get"),
        ("/api/ids", "get"),
        ("/api/topics", "get"),
        ("/api/stats", "get"),
        ("/api/stats/ticket", "post"),
        ("/api/stats/stream", "get"),
        ("/api/openapi.json", "get"),
        ("/dashboard", "get"),
        ("/dashboard/{file}", "get"),
    ];
    assert_eq!(paths.len(), expected.len(), "{:?}", paths.keys());
    for (path, method) in expected {
        let op = &paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not described"))[method];
        let responses = op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{path}"));
        assert!(
            responses.contains_key("200") || responses.contains_key("101"),
            "{path}: {responses:?}"
        );
        // Every error answer has the one error shape.
        for (status, answer) in responses {
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    answer["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{path} {status}"
                );
            }
        }
        if path.starts_with("/api/") && path != "/api/openapi.json" {
            assert!(responses.contains_key("401"), "{path} documents no 401");
        }
    }
    // The documented paths are the served ones: each answers something
    // other than the router's 404 (the endless stream is opened by the
    // tests above).
    for (path, method) in expected {
        if path == "/api/stats/stream" {
            continue;
        }
        let concrete = path.replace("{id}", "nobody").replace("{file}", "app.css");
        let response = http_request(server.addr, &method.to_uppercase(), &concrete, &[], b"").await;
        assert!(
            response.status != 404 || concrete.contains("nobody"),
            "{method} {concrete} is described but not served"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );
}
