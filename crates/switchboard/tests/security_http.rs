//! The backend API behind API keys, the origin allow-list, and the per-IP
//! limits (with `X-Forwarded-For` believed only from trusted proxies).

mod common;

use std::time::Duration;

use common::*;
use switchboard::auth::{AllowedHosts, AllowedOrigins, ApiKeys, TrustedProxies};
use switchboard::{ErrorKind, Hub, Limits, Security};

const KEY_1: &str = "key-one-0123456789abcdef";
const KEY_2: &str = "key-two-fedcba9876543210";

async fn start(limits: Limits, security: Security) -> TestServer {
    let hub = Hub::builder(limits).security(security).build();
    let app = switchboard::app(hub.clone());
    TestServer::with_router(hub, app).await
}

fn with_keys() -> Security {
    Security {
        api_keys: ApiKeys::new([KEY_1, KEY_2]).expect("keys"),
        ..Security::default()
    }
}

async fn get_with(server: &TestServer, path: &str, auth: Option<&str>) -> RawResponse {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    http_request(server.addr, "GET", path, &headers, b"").await
}

fn assert_api_401(response: &RawResponse, code: &str) {
    assert_eq!(response.status, 401, "{}", response.text());
    assert_eq!(response.error_code(), code);
    assert_eq!(
        response.header("www-authenticate"),
        Some("Bearer realm=\"switchboard-api\"")
    );
}

// ---------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------

#[tokio::test]
async fn api_needs_a_valid_key() {
    let server = start(Limits::default(), with_keys()).await;
    assert_api_401(
        &get_with(&server, "/api/connections", None).await,
        "missing_api_key",
    );
    assert_api_401(
        &get_with(
            &server,
            "/api/connections",
            Some("Bearer wrong-key-0123456789"),
        )
        .await,
        "invalid_api_key",
    );
    assert_api_401(
        &get_with(&server, "/api/connections", Some(&format!("Basic {KEY_1}"))).await,
        "missing_api_key",
    );
    // One character off, or a prefix, is wrong too.
    let near = &KEY_1[..KEY_1.len() - 1];
    assert_api_401(
        &get_with(&server, "/api/connections", Some(&format!("Bearer {near}"))).await,
        "invalid_api_key",
    );
    let post = http_request(
        server.addr,
        "POST",
        "/api/send",
        &[("Content-Type", "application/json")],
        br#"{"targets":[1],"payload":"x"}"#,
    )
    .await;
    assert_api_401(&post, "missing_api_key");
    let delete = http_delete(server.addr, "/api/connections/1").await;
    assert_api_401(&delete, "missing_api_key");

    // Both keys work (rotation), the scheme in any case.
    for auth in [
        format!("Bearer {KEY_1}"),
        format!("bearer {KEY_2}"),
        format!("BEARER  {KEY_1} "),
    ] {
        let response = get_with(&server, "/api/connections", Some(&auth)).await;
        assert_eq!(response.status, 200, "{auth}: {}", response.text());
    }
    let auth = format!("Bearer {KEY_2}");
    let post = http_request(
        server.addr,
        "POST",
        "/api/send",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
        ],
        br#"{"targets":[1],"payload":"x"}"#,
    )
    .await;
    assert_eq!(post.status, 200, "{}", post.text());
    assert_eq!(post.json()["offline"], serde_json::json!([1]));
}

#[tokio::test]
async fn metrics_protected_and_heartbeat_public_by_default() {
    let server = start(Limits::default(), with_keys()).await;
    assert_api_401(
        &get_with(&server, "/metrics", None).await,
        "missing_api_key",
    );
    let auth = format!("Bearer {KEY_1}");
    assert_eq!(get_with(&server, "/metrics", Some(&auth)).await.status, 200);
    assert_eq!(get_with(&server, "/heartbeat", None).await.status, 200);

    let server = start(
        Limits::default(),
        Security {
            protect_metrics: false,
            protect_heartbeat: true,
            ..with_keys()
        },
    )
    .await;
    assert_eq!(get_with(&server, "/metrics", None).await.status, 200);
    assert_api_401(
        &get_with(&server, "/heartbeat", None).await,
        "missing_api_key",
    );
    assert_eq!(
        get_with(&server, "/heartbeat", Some(&auth)).await.status,
        200
    );

    // WebSocket routes do not take API keys: clients have their own auth.
    let mut client = server.connect("/ws?id=1").await;
    send_text(&mut client, r#"{"type":"subscribe","topic":"t"}"#).await;
    assert_eq!(recv_json(&mut client).await["subscribed"], "t");
}

#[tokio::test]
async fn no_keys_leaves_the_api_open() {
    let server = TestServer::start().await;
    assert_eq!(
        get_with(&server, "/api/connections", None).await.status,
        200
    );
    assert_eq!(get_with(&server, "/metrics", None).await.status, 200);
}

// ---------------------------------------------------------------------------
// Origins
// ---------------------------------------------------------------------------

#[tokio::test]
async fn disallowed_origin_is_403_before_the_upgrade() {
    let security = Security {
        allowed_origins: Some(
            AllowedOrigins::new(["https://app.example.com", "https://*.example.org"])
                .expect("origins"),
        ),
        ..Security::default()
    };
    let server = start(Limits::default(), security).await;
    for (origin, status) in [
        (Some("https://app.example.com"), 101),
        (Some("https://chat.example.org"), 101),
        (Some("https://a.b.example.org"), 101),
        (None, 101),
        (Some("https://evil.example"), 403),
        (Some("http://app.example.com"), 403),
        (Some("https://example.org"), 403),
        (Some("https://app.example.com.evil.example"), 403),
        (Some("null"), 403),
    ] {
        let mut headers = upgrade_headers();
        if let Some(origin) = origin {
            headers.push(("Origin", origin));
        }
        for path in ["/ws?id=1", "/echo", "/chat"] {
            let response = http_upgrade(server.addr, path, &headers).await;
            assert_eq!(
                response.status,
                status,
                "{origin:?} on {path}: {}",
                response.text()
            );
            if status == 403 {
                assert_eq!(response.error_code(), "origin_not_allowed");
                assert!(
                    response.text().contains("allowed_origins"),
                    "{}",
                    response.text()
                );
            }
        }
    }
    assert_eq!(server.hub.metrics().errors(ErrorKind::Forbidden), 15);
    // The API takes the listed origins too, and refuses the others.
    for (origin, status) in [
        ("https://app.example.com", 200),
        ("https://evil.example", 403),
    ] {
        let api = http_request(
            server.addr,
            "GET",
            "/api/connections",
            &[("Origin", origin)],
            b"",
        )
        .await;
        assert_eq!(api.status, status, "{origin}: {}", api.text());
    }
}

// ---------------------------------------------------------------------------
// Per-IP limits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn concurrent_connections_per_ip_are_capped_with_429() {
    let limits = Limits {
        max_connections_per_ip: 2,
        ..Limits::default()
    };
    let server = start(limits, Security::default()).await;
    let first = server.connect("/ws?id=1").await;
    let _second = server.connect("/echo").await;
    let refused = http_upgrade(server.addr, "/ws?id=3", &upgrade_headers()).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.error_code(), "too_many_connections");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(refused.text().contains("127.0.0.1"), "{}", refused.text());
    assert_eq!(server.hub.metrics().errors(ErrorKind::IpLimited), 1);
    // Plain HTTP (the backend's API calls) is not counted.
    assert_eq!(http_get(server.addr, "/heartbeat").await.status, 200);

    // Closing one frees its place (once its task has ended).
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let response = http_upgrade(server.addr, "/ws?id=3", &upgrade_headers()).await;
        if response.status == 101 {
            break;
        }
        assert_eq!(response.status, 429, "{}", response.text());
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn new_connections_per_second_per_ip_are_limited_with_retry_after() {
    // One per second: the second attempt within the second is refused, on a
    // busy machine too.
    let limits = Limits {
        max_connection_rate_per_ip: 1,
        ..Limits::default()
    };
    let server = start(limits, Security::default()).await;
    let response = http_upgrade(server.addr, "/echo", &upgrade_headers()).await;
    assert_eq!(response.status, 101);
    let refused = http_upgrade(server.addr, "/ws?id=1", &upgrade_headers()).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.error_code(), "connection_rate_limited");
    let retry: u64 = refused
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert_eq!(retry, 1);
    assert_eq!(server.hub.metrics().errors(ErrorKind::IpLimited), 1);
    // The bucket refills at one per second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = http_upgrade(server.addr, "/echo", &upgrade_headers()).await;
    assert_eq!(response.status, 101);
}

#[tokio::test]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let limits = Limits {
        max_connections_per_ip: 1,
        ..Limits::default()
    };
    // Untrusted peer: the header is ignored, so a client cannot dodge the
    // limit by inventing addresses.
    let server = start(limits.clone(), Security::default()).await;
    let upgrade_from = |ip: &'static str| {
        let mut headers = upgrade_headers();
        headers.push(("X-Forwarded-For", ip));
        headers
    };
    let _held = connect_raw(&server, &upgrade_from("198.51.100.1")).await;
    let refused = http_upgrade(server.addr, "/echo", &upgrade_from("198.51.100.2")).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(refused.text().contains("127.0.0.1"), "{}", refused.text());

    // Behind a trusted proxy (here: loopback), each forwarded client has its
    // own budget.
    let security = Security {
        trusted_proxies: TrustedProxies::new(["127.0.0.0/8"]).expect("proxies"),
        ..Security::default()
    };
    let server = start(limits, security).await;
    let _a = connect_raw(&server, &upgrade_from("198.51.100.1")).await;
    let _b = connect_raw(&server, &upgrade_from("198.51.100.2")).await;
    let refused = http_upgrade(server.addr, "/echo", &upgrade_from("198.51.100.1")).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(
        refused.text().contains("198.51.100.1"),
        "{}",
        refused.text()
    );
    // The client's own entries to the left of the proxy's prove nothing.
    let spoofed = http_upgrade(
        server.addr,
        "/echo",
        &upgrade_from("203.0.113.77, 198.51.100.2"),
    )
    .await;
    assert_eq!(spoofed.status, 429, "{}", spoofed.text());
    let garbage = http_upgrade(server.addr, "/echo", &upgrade_from("not-an-address")).await;
    assert_eq!(garbage.status, 400);
    assert_eq!(garbage.error_code(), "invalid_forwarded_for");
}

/// Opens a WebSocket with raw `headers` and keeps the socket open.
async fn connect_raw(server: &TestServer, headers: &[(&str, &str)]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let mut request = format!("GET /echo HTTP/1.1\r\nHost: {}\r\n", server.addr);
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write upgrade");
    let response = read_http_response(&mut stream).await;
    assert_eq!(response.status, 101, "{}", response.text());
    stream
}

// ---------------------------------------------------------------------------
// Request bodies that do not arrive
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408_and_the_connection_closes() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // Room for the /echo client and the stalled request, not a third: the
    // stalled request holds a place under max_connections that /heartbeat
    // needs, until the body deadline frees it.
    let limits = Limits {
        body_timeout: Duration::from_millis(300),
        max_connections: 2,
        ..Limits::default()
    };
    let server = start(limits, Security::default()).await;
    let mut echo = server.connect("/echo").await;

    let mut stalled = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /api/send HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
        server.addr
    );
    stalled.write_all(head.as_bytes()).await.expect("head");
    stalled.write_all(b"{\"targets\"").await.expect("10 bytes");
    let started = tokio::time::Instant::now();
    assert_echo_answers(&mut echo, "while the body stalls").await;
    let busy = http_get(server.addr, "/heartbeat").await;
    assert_eq!(busy.status, 503, "{}", busy.text());

    let response = tokio::time::timeout(WAIT, read_http_response(&mut stalled))
        .await
        .expect("an answer once the body deadline passes");
    assert_eq!(response.status, 408, "{}", response.text());
    assert_eq!(response.error_code(), "body_timeout");
    assert!(
        response.text().contains("limits.body_timeout"),
        "{}",
        response.text()
    );
    assert_eq!(response.header("connection"), Some("close"));
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Then the server closes the connection.
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(WAIT, stalled.read(&mut rest))
        .await
        .expect("the connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&rest[..n]));

    // Its place is free again.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let response = http_get(server.addr, "/heartbeat").await;
        if response.status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "place not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_echo_answers(&mut echo, "after the timeout").await;

    // A body that arrives in time, slowly, is served.
    let mut slow = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let body = br#"{"targets":[1],"payload":2}"#;
    let head = format!(
        "POST /api/send HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        server.addr,
        body.len()
    );
    slow.write_all(head.as_bytes()).await.expect("head");
    for part in body.chunks(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        slow.write_all(part).await.expect("part");
    }
    let response = read_http_response(&mut slow).await;
    assert_eq!(response.status, 200, "{}", response.text());
}

// ---------------------------------------------------------------------------
// HTTP strictness
// ---------------------------------------------------------------------------

#[tokio::test]
async fn http_1_1_without_host_or_with_two_is_400() {
    let server = start(Limits::default(), Security::default()).await;
    let mut echo = server.connect("/echo").await;
    let host = format!("Host: {}\r\n", server.addr);
    for (request, code) in [
        (
            "GET /heartbeat HTTP/1.1\r\nConnection: close\r\n\r\n".to_owned(),
            "missing_host",
        ),
        (
            "POST /api/send HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                .to_owned(),
            "missing_host",
        ),
        (
            format!("GET /heartbeat HTTP/1.1\r\n{host}{host}Connection: close\r\n\r\n"),
            "invalid_host",
        ),
        (
            "GET /heartbeat HTTP/1.1\r\nHost: user@127.0.0.1\r\nConnection: close\r\n\r\n"
                .to_owned(),
            "invalid_host",
        ),
        (
            "GET /heartbeat HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n".to_owned(),
            "invalid_host",
        ),
    ] {
        let response = http_raw(server.addr, request.as_bytes()).await;
        assert_eq!(response.status, 400, "{request:?}: {}", response.text());
        assert_eq!(response.error_code(), code, "{request:?}");
        assert!(response.text().contains("RFC 9112"), "{}", response.text());
        assert_eq!(response.header("connection"), Some("close"), "{request:?}");
        assert_echo_answers(&mut echo, &request).await;
    }
    // The WebSocket routes too, before the upgrade.
    let mut upgrade = String::from("GET /echo HTTP/1.1\r\n");
    for (name, value) in upgrade_headers() {
        upgrade.push_str(&format!("{name}: {value}\r\n"));
    }
    upgrade.push_str("\r\n");
    let response = http_raw(server.addr, upgrade.as_bytes()).await;
    assert_eq!(response.status, 400, "{}", response.text());
    assert_eq!(response.error_code(), "missing_host");
    // HTTP/1.0 needs no Host.
    let response = http_raw(server.addr, b"GET /heartbeat HTTP/1.0\r\n\r\n").await;
    assert_eq!(response.status, 200, "{}", response.text());
}

/// RFC 9112 §2.2 lets a recipient accept a bare LF as a line terminator,
/// and hyper's parser (httparse) always does, with no switch to refuse it;
/// hyper does require CRLF in chunked framing. Pinned here so that a change
/// of that behaviour is noticed (docs/security.md, "HTTP parsing").
#[tokio::test]
async fn bare_lf_line_endings_in_the_head_are_accepted() {
    let server = start(Limits::default(), Security::default()).await;
    let request = format!(
        "GET /heartbeat HTTP/1.1\nHost: {}\nConnection: close\n\n",
        server.addr
    );
    let response = http_raw(server.addr, request.as_bytes()).await;
    assert_eq!(response.status, 200, "{}", response.text());
    // A chunk-size line ended by a bare LF is refused by hyper.
    let request = format!(
        "POST /api/send HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\n{{}}\r\n0\r\n\r\n",
        server.addr
    );
    let response = http_raw(server.addr, request.as_bytes()).await;
    assert_eq!(response.status, 400, "{}", response.text());
    assert_eq!(response.error_code(), "invalid_body");
}

#[tokio::test]
async fn repeated_query_parameters_the_server_reads_are_400_invalid_query() {
    let server = start(Limits::default(), Security::default()).await;
    let mut echo = server.connect("/echo").await;
    for (target, name) in [
        ("/ws?id=a&id=b", "id"),
        ("/ws?id=a&other=1&id=a", "id"),
        ("/ws?id=&id=b", "id"),
    ] {
        let response = http_upgrade(server.addr, target, &upgrade_headers()).await;
        assert_eq!(response.status, 400, "{target}: {}", response.text());
        assert_eq!(response.error_code(), "invalid_query", "{target}");
        let message = error_message_of(&response.json());
        assert!(
            message.contains(&format!("`{name}` is given 2 times")),
            "{message}"
        );
        assert_echo_answers(&mut echo, target).await;
    }
    assert!(server.hub.backend().clients().await.is_empty());
    let response = http_get(server.addr, "/api/connections?scope=local&scope=cluster").await;
    assert_eq!(response.status, 400, "{}", response.text());
    assert_eq!(response.error_code(), "invalid_query");
    assert!(
        error_message_of(&response.json()).contains("`scope` is given 2 times"),
        "{}",
        response.text()
    );
    // Parameters the server does not read may repeat.
    let response = http_upgrade(server.addr, "/ws?id=a&x=1&x=2", &upgrade_headers()).await;
    assert_eq!(response.status, 101, "{}", response.text());
}

// ---------------------------------------------------------------------------
// Browsers and the open development API
// ---------------------------------------------------------------------------

#[tokio::test]
async fn api_refuses_browser_requests_from_other_origins() {
    // The development defaults: no API key, no allowed_origins.
    let server = start(Limits::default(), Security::default()).await;
    let mut echo = server.connect("/echo").await;
    let mut one = server.connect("/ws?id=1").await;
    for origin in ["http://evil.example", "null", "http://localhost:1"] {
        let response = send_from(server.addr, Some(origin)).await;
        assert_eq!(response.status, 403, "{origin}: {}", response.text());
        assert_eq!(response.error_code(), "origin_not_allowed");
        assert!(
            response.text().contains("allowed_origins"),
            "{}",
            response.text()
        );
        assert_silent(&mut one, Duration::from_millis(50)).await;
        assert_echo_answers(&mut echo, origin).await;
    }
    for (method, path) in [
        ("GET", "/api/connections"),
        ("DELETE", "/api/connections/1"),
    ] {
        let response = http_request(
            server.addr,
            method,
            path,
            &[("Origin", "http://evil.example")],
            b"",
        )
        .await;
        assert_eq!(response.status, 403, "{method} {path}: {}", response.text());
        assert_eq!(response.error_code(), "origin_not_allowed");
    }
    assert_eq!(server.hub.metrics().errors(ErrorKind::Forbidden), 5);

    // Not a browser (no Origin), or a page of the server itself: served.
    let response = send_from(server.addr, None).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(recv_text(&mut one).await, r#""from a page""#);
    let own = format!("http://{}", server.addr);
    let response = send_from(server.addr, Some(&own)).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(recv_text(&mut one).await, r#""from a page""#);
}

/// `POST /api/send` to client 1, as a browser page of `origin` would.
async fn send_from(addr: std::net::SocketAddr, origin: Option<&str>) -> RawResponse {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(origin) = origin {
        headers.push(("Origin", origin));
    }
    http_request(
        addr,
        "POST",
        "/api/send",
        &headers,
        br#"{"targets":[1],"payload":"from a page"}"#,
    )
    .await
}

#[tokio::test]
async fn api_bodies_must_be_sent_as_application_json() {
    let server = start(Limits::default(), Security::default()).await;
    let mut echo = server.connect("/echo").await;
    let mut one = server.connect("/ws?id=1").await;
    let body = br#"{"targets":[1],"payload":1}"#;
    // What a cross-site form or fetch can send without a preflight.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonp"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = content_type
            .map(|t| ("Content-Type", t))
            .into_iter()
            .collect();
        for path in ["/api/send", "/api/publish"] {
            let response = http_request(server.addr, "POST", path, &headers, body).await;
            assert_eq!(
                response.status,
                415,
                "{content_type:?} {path}: {}",
                response.text()
            );
            assert_eq!(response.error_code(), "unsupported_media_type");
            assert!(
                response.text().contains("Content-Type: application/json"),
                "{}",
                response.text()
            );
        }
        assert_silent(&mut one, Duration::from_millis(50)).await;
        assert_echo_answers(&mut echo, "still here").await;
    }
    for content_type in ["application/json", "Application/JSON; charset=utf-8"] {
        let response = http_request(
            server.addr,
            "POST",
            "/api/send",
            &[("Content-Type", content_type)],
            body,
        )
        .await;
        assert_eq!(response.status, 200, "{content_type}: {}", response.text());
        assert_eq!(recv_text(&mut one).await, "1");
    }
}

/// `Host: <name>` on a raw request to `server`, for `path`.
async fn get_for_host(server: &TestServer, path: &str, host: &str) -> RawResponse {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    http_raw(server.addr, request.as_bytes()).await
}

#[tokio::test]
async fn a_loopback_server_answers_only_loopback_host_names() {
    let server = start(Limits::default(), Security::default()).await;
    let mut echo = server.connect("/echo").await;
    let port = server.addr.port();
    // A page whose own DNS name now points at 127.0.0.1 (DNS rebinding).
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_owned(),
        format!("localhost.evil.example:{port}"),
        format!("0.0.0.0:{port}"),
        format!("192.168.1.10:{port}"),
    ] {
        let response = get_for_host(&server, "/heartbeat", &host).await;
        assert_eq!(response.status, 421, "{host}: {}", response.text());
        assert_eq!(response.error_code(), "host_not_allowed");
        assert!(
            response.text().contains("allowed_hosts"),
            "{}",
            response.text()
        );
        assert_eq!(response.header("connection"), Some("close"));
        assert_echo_answers(&mut echo, &host).await;
    }
    let post = format!(
        "POST /api/send HTTP/1.1\r\nHost: evil.example:{port}\r\nOrigin: http://evil.example:{port}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let response = http_raw(server.addr, post.as_bytes()).await;
    assert_eq!(response.status, 421, "{}", response.text());
    let mut upgrade = format!("GET /echo HTTP/1.1\r\nHost: evil.example:{port}\r\n");
    for (name, value) in upgrade_headers() {
        upgrade.push_str(&format!("{name}: {value}\r\n"));
    }
    upgrade.push_str("\r\n");
    let response = http_raw(server.addr, upgrade.as_bytes()).await;
    assert_eq!(response.status, 421, "{}", response.text());
    // The absolute form names the host too.
    let absolute = format!(
        "GET http://evil.example:{port}/heartbeat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    let response = http_raw(server.addr, absolute.as_bytes()).await;
    assert_eq!(response.status, 421, "{}", response.text());
    assert_eq!(server.hub.metrics().errors(ErrorKind::Forbidden), 8);

    for host in [
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        format!("app.localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("127.0.0.2:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_owned(),
    ] {
        let response = get_for_host(&server, "/heartbeat", &host).await;
        assert_eq!(response.status, 200, "{host}: {}", response.text());
    }
    // HTTP/1.0 without Host is no browser.
    let response = http_raw(server.addr, b"GET /heartbeat HTTP/1.0\r\n\r\n").await;
    assert_eq!(response.status, 200, "{}", response.text());
}

#[tokio::test]
async fn allowed_hosts_adds_names_a_loopback_server_answers_to() {
    let security = Security {
        allowed_hosts: Some(AllowedHosts::new(["rt.example.com", "*.example.org"]).expect("hosts")),
        ..Security::default()
    };
    let server = start(Limits::default(), security).await;
    for (host, status) in [
        ("rt.example.com", 200),
        ("rt.example.com:443", 200),
        ("a.example.org", 200),
        ("localhost", 200),
        ("example.org", 421),
        ("evil.example", 421),
    ] {
        let response = get_for_host(&server, "/heartbeat", host).await;
        assert_eq!(response.status, status, "{host}: {}", response.text());
    }
    let security = Security {
        allowed_hosts: Some(AllowedHosts::new(["*"]).expect("any")),
        ..Security::default()
    };
    let server = start(Limits::default(), security).await;
    let response = get_for_host(&server, "/heartbeat", "anything.example").await;
    assert_eq!(response.status, 200, "{}", response.text());
}
