//! Refused WebSocket upgrades are explained in the server's log: once each,
//! with route, status, code, client address and request id, never the
//! token, and rate-limited under a flood (the suppressed ones counted).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use support::{Server, WAIT, switchboard};

const SECRET: &str = "0123456789abcdef0123456789abcdef-refusals";

/// Sends a WebSocket upgrade request for `path` with `extra` header lines;
/// returns the raw response head.
async fn upgrade(addr: SocketAddr, path: &str, extra: &str) -> String {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = vec![0u8; 4096];
        let mut len = 0;
        while !response[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut response[len..]).await.expect("read");
            assert!(n > 0, "connection closed before a response head");
            len += n;
        }
        String::from_utf8_lossy(&response[..len]).into_owned()
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .expect("an answer in time")
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn json_lines(server: &Server) -> Vec<serde_json::Value> {
    server
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn refusal_lines(server: &Server) -> Vec<serde_json::Value> {
    json_lines(server)
        .into_iter()
        .filter(|line| {
            line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("connection refused"))
        })
        .collect()
}

#[tokio::test]
async fn every_refusal_is_logged_once_with_its_code_and_request_id() {
    let server = Server::start(&["--log-format", "json"]);
    let addr = server.http_url();

    let head = upgrade(addr, "/ws", "x-request-id: trace-42\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(header(&head, "x-request-id"), Some("trace-42"));
    let head = upgrade(addr, "/ws?id=a%20b", "").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let made_up = header(&head, "x-request-id")
        .expect("a request id is made up when none is sent")
        .to_owned();

    // Both lines are written before the responses; give the log reader a
    // moment to collect them.
    server.wait_for_log(&made_up);
    let lines = refusal_lines(&server);
    assert_eq!(lines.len(), 2, "one line per refusal: {lines:#?}");
    let first = &lines[0];
    assert_eq!(first["level"], "INFO");
    assert_eq!(first["fields"]["route"], "/ws");
    assert_eq!(first["fields"]["status"], 400);
    assert_eq!(first["fields"]["code"], "missing_id");
    assert_eq!(first["fields"]["client"], "127.0.0.1");
    assert_eq!(first["fields"]["request_id"], "trace-42");
    assert_eq!(lines[1]["fields"]["code"], "invalid_id");
    assert_eq!(lines[1]["fields"]["request_id"], made_up.as_str());
    // The route is the path alone: the query string may carry a token.
    assert_eq!(lines[1]["fields"]["route"], "/ws");
}

#[tokio::test]
async fn authentication_failures_are_warnings_without_the_token() {
    let mut command = switchboard();
    command
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--auth-mode", "jwt"])
        .env("SWITCHBOARD_AUTH_JWT_SECRET", SECRET);
    let server = Server::spawn(command);
    let addr = server.http_url();
    let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.bm90LWEtc2lnbmF0dXJl";

    let head = upgrade(addr, &format!("/ws?token={token}"), "").await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let head = upgrade(
        addr,
        "/ws",
        &format!("sec-websocket-protocol: switchboard.v1, bearer.{token}\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let request_id = header(&head, "x-request-id")
        .expect("request id")
        .to_owned();
    server.wait_for_log(&request_id);

    let lines = refusal_lines(&server);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for line in &lines {
        assert_eq!(line["level"], "WARN", "{line}");
        assert_eq!(line["fields"]["status"], 401);
    }
    let log = server.log_text();
    assert!(!log.contains(token), "the token was logged:\n{log}");
    assert!(!log.contains("bm90LWEtc2lnbmF0dXJl"), "{log}");
}

#[tokio::test]
async fn a_flood_of_refusals_is_rate_limited_and_the_rest_counted() {
    let server = Server::start(&["--log-format", "json"]);
    let addr = server.http_url();
    const FLOOD: usize = 300;
    for _ in 0..FLOOD {
        let head = upgrade(addr, "/ws", "").await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    }
    let logged = refusal_lines(&server).len();
    // A burst of 50 lines, then 10 a second: the flood above takes well
    // under the 25 s it would need to be logged whole.
    assert!(
        (50..FLOOD).contains(&logged),
        "{logged} of {FLOOD} refusals logged"
    );
    // Once the bucket has refilled, the next line says how many were left out.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let head = upgrade(addr, "/ws", "x-request-id: after-the-flood\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let line = server.wait_for_log("after-the-flood");
    let line: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert!(
        line["fields"]["suppressed"].as_u64().expect("a count") > 0,
        "{line}"
    );
    // Each refusal is either a line of its own or counted in the
    // `suppressed` field of the next line that got through.
    let lines = refusal_lines(&server);
    let suppressed: u64 = lines
        .iter()
        .map(|l| l["fields"]["suppressed"].as_u64().expect("a count"))
        .sum();
    assert_eq!(lines.len() as u64 + suppressed, FLOOD as u64 + 1);

    // /metrics counts them all.
    let (status, metrics) = support::http(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!("switchboard_refusals_total {}", FLOOD + 1)),
        "{metrics}"
    );
}
