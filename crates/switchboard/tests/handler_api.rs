//! The library API: a custom `Handler` mounted with `switchboard::ws` on an
//! axum `Router` next to ordinary HTTP routes — refusal in `connect`, state
//! per connection, every `Outcome`, `on_open`, `on_info` through a
//! `ConnHandle`, `on_close` with how the connection ended — plus route
//! groups with a guard and the JSON error bodies of `json_errors`.

mod common;
mod raw;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use http::StatusCode;
use http::request::Parts;
use http_body_util::BodyExt as _;
use switchboard::{
    CloseCode, CloseFrame, Closed, Conn, ConnHandle, Handler, HttpError, Hub, Limits, Message,
    Outcome, PushError, Router, ws,
};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as WsCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tower::ServiceExt as _;

/// What the program sends to one connection through its `ConnHandle`.
#[derive(Debug)]
enum Info {
    /// Reply `info: <text>`.
    Say(String),
    /// Stop with this code and reason.
    Stop(u16, String),
}

type Handles = Arc<Mutex<Vec<(String, ConnHandle<Info>)>>>;
type Closes = Arc<Mutex<Vec<(String, Closed)>>>;

/// A handler that records everything it sees.
#[derive(Clone)]
struct Probe {
    /// Which mount this is ("root" or "v1").
    mount: &'static str,
    handles: Handles,
    closes: Closes,
}

/// Per-connection state.
struct Session {
    name: String,
    messages: u32,
}

fn stop_frame(code: u16, reason: impl Into<String>) -> CloseFrame {
    CloseFrame {
        code: CloseCode(code),
        reason: Cow::Owned(reason.into()),
    }
}

impl Handler for Probe {
    type State = Session;
    type Info = Info;

    async fn connect(&self, request: &Parts, conn: &mut Conn<Info>) -> Result<Session, HttpError> {
        let query: Query<HashMap<String, String>> = Query::try_from_uri(&request.uri)
            .map_err(|_| HttpError::new(StatusCode::BAD_REQUEST, "bad_query", "bad query"))?;
        let Some(name) = query.get("name").cloned() else {
            return Err(HttpError::new(
                StatusCode::FORBIDDEN,
                "name_required",
                "connect with ?name=<who you are>",
            ));
        };
        if query.contains_key("early") {
            // Queued before the socket exists; delivered after on_open.
            conn.handle()
                .send(Info::Say("queued in connect".to_owned()))
                .map_err(|_| HttpError::new(StatusCode::CONFLICT, "closed", "closed"))?;
        }
        self.handles
            .lock()
            .expect("handles lock")
            .push((name.clone(), conn.handle()));
        Ok(Session { name, messages: 0 })
    }

    async fn on_open(&self, state: &mut Session, _conn: &mut Conn<Info>) -> Outcome {
        Outcome::reply_text(format!("welcome {} via {}", state.name, self.mount))
    }

    async fn on_message(
        &self,
        state: &mut Session,
        message: Message,
        _conn: &mut Conn<Info>,
    ) -> Outcome {
        state.messages += 1;
        let n = state.messages;
        let text = match message {
            Message::Text(text) => text.to_string(),
            Message::Binary(bytes) => {
                let mut reversed = bytes.to_vec();
                reversed.reverse();
                return Outcome::Reply(Message::binary(reversed));
            }
        };
        match text.as_str() {
            "many" => Outcome::ReplyMany(vec![
                Message::text(format!("many 1 of {n}")),
                Message::text("many 2"),
                Message::binary(vec![3u8]),
                Message::text("many 4"),
                Message::text("many 5"),
            ]),
            "stop" => Outcome::Stop(stop_frame(4123, format!("stopped after {n}"))),
            "none" => Outcome::Continue,
            _ => Outcome::reply_text(format!("{}#{n}: {text}", state.name)),
        }
    }

    async fn on_info(&self, state: &mut Session, info: Info, _conn: &mut Conn<Info>) -> Outcome {
        match info {
            Info::Say(text) => Outcome::reply_text(format!("info for {}: {text}", state.name)),
            Info::Stop(code, reason) => Outcome::Stop(stop_frame(code, reason)),
        }
    }

    async fn on_close(&self, state: Session, closed: &Closed, _conn: &mut Conn<Info>) {
        self.closes
            .lock()
            .expect("closes lock")
            .push((state.name, closed.clone()));
    }
}

/// Route-group guard: requires `x-api-key: let-me-in`.
async fn guard(request: Request, next: Next) -> Response {
    let ok = request
        .headers()
        .get("x-api-key")
        .is_some_and(|v| v == "let-me-in");
    if ok {
        next.run(request).await
    } else {
        HttpError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send x-api-key to use /v1",
        )
        .into_response()
    }
}

/// `POST /notify/{name}` with a text body: sends `Info::Say(body)` to every
/// connection named `name`; answers `{"sent":N}`.
async fn notify(
    State(handles): State<Handles>,
    Path(name): Path<String>,
    body: String,
) -> Response {
    let targets: Vec<ConnHandle<Info>> = handles
        .lock()
        .expect("handles lock")
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, h)| h.clone())
        .collect();
    let sent = targets
        .iter()
        .filter(|h| h.send(Info::Say(body.clone())).is_ok())
        .count();
    axum::Json(serde_json::json!({ "sent": sent })).into_response()
}

async fn boom() -> &'static str {
    panic!("deliberate panic in an HTTP handler");
}

struct Fixture {
    server: TestServer,
    handles: Handles,
    closes: Closes,
}

fn router(hub: &Hub, handles: &Handles, closes: &Closes) -> Router {
    let probe = |mount| Probe {
        mount,
        handles: Arc::clone(handles),
        closes: Arc::clone(closes),
    };
    let v1 = Router::new()
        .route("/probe", ws(hub.clone(), probe("v1")))
        .route("/whoami", get(|| async { "v1 caller" }))
        .route_layer(middleware::from_fn(guard));
    Router::new()
        .route("/probe", ws(hub.clone(), probe("root")))
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/notify/{name}",
            post(notify).with_state(Arc::clone(handles)),
        )
        .route("/boom", get(boom))
        .nest("/v1", v1)
}

async fn fixture() -> Fixture {
    let hub = Hub::new(Limits::default());
    let handles: Handles = Arc::default();
    let closes: Closes = Arc::default();
    let app = router(&hub, &handles, &closes);
    let server = TestServer::with_router(hub, app).await;
    Fixture {
        server,
        handles,
        closes,
    }
}

impl Fixture {
    /// Connects as `name` and takes the welcome message.
    async fn join(&self, name: &str) -> Client {
        let mut client = self.server.connect(&format!("/probe?name={name}")).await;
        assert_eq!(
            recv_text(&mut client).await,
            format!("welcome {name} via root")
        );
        client
    }

    fn handle(&self, name: &str) -> ConnHandle<Info> {
        self.handles
            .lock()
            .expect("handles lock")
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.clone())
            .unwrap_or_else(|| panic!("no handle for {name}"))
    }

    /// Waits for `on_close` of `name` and returns how it was told the
    /// connection ended.
    async fn closed(&self, name: &str) -> Closed {
        for _ in 0..500 {
            let found = self
                .closes
                .lock()
                .expect("closes lock")
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| c.clone());
            if let Some(closed) = found {
                return closed;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("on_close was not called for {name}");
    }

    fn close_count(&self, name: &str) -> usize {
        self.closes
            .lock()
            .expect("closes lock")
            .iter()
            .filter(|(n, _)| n == name)
            .count()
    }
}

/// Reads messages until the stream ends (answering the server's close).
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

#[tokio::test]
async fn connect_can_refuse_with_an_http_error() {
    let f = fixture().await;
    let (response, _stream) = raw::try_upgrade(f.server.addr, "/probe", &[]).await;
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(
        response.json(),
        serde_json::json!({"error": {"code": "name_required", "message": "connect with ?name=<who you are>"}})
    );
    // The refused connection left nothing behind.
    assert_eq!(f.server.hub.live_connections(), 0);
    assert!(f.handles.lock().expect("handles lock").is_empty());
    assert!(f.closes.lock().expect("closes lock").is_empty());

    // A tungstenite client sees the refusal as an HTTP error, not a socket.
    let err = tokio_tungstenite::connect_async(f.server.url("/probe"))
        .await
        .expect_err("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!("expected an HTTP error, got {other:?}"),
    }

    // The same route accepts a valid client; ordinary routes work next to it.
    let _ok = f.join("ada").await;
    let hello = raw::http_get(f.server.addr, "/hello").await;
    assert_eq!((hello.status, hello.text().as_str()), (200, "hello"));
}

#[tokio::test]
async fn state_is_kept_per_connection() {
    let f = fixture().await;
    let mut a = f.join("a").await;
    let mut b = f.join("b").await;
    send_text(&mut a, "x").await;
    assert_eq!(recv_text(&mut a).await, "a#1: x");
    send_text(&mut a, "y").await;
    assert_eq!(recv_text(&mut a).await, "a#2: y");
    send_text(&mut b, "z").await;
    assert_eq!(recv_text(&mut b).await, "b#1: z");
    send_text(&mut a, "none").await; // counted, no reply
    send_text(&mut a, "w").await;
    assert_eq!(recv_text(&mut a).await, "a#4: w");
    send_text(&mut b, "v").await;
    assert_eq!(recv_text(&mut b).await, "b#2: v");
    // A second connection with the same name has its own state.
    let mut a2 = f.join("a").await;
    send_text(&mut a2, "fresh").await;
    assert_eq!(recv_text(&mut a2).await, "a#1: fresh");
    assert_silent(&mut a, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn reply_many_keeps_order_and_binary_replies_work() {
    let f = fixture().await;
    let mut c = f.join("m").await;
    send_text(&mut c, "hi").await;
    send_text(&mut c, "many").await;
    send_text(&mut c, "bye").await;
    assert_eq!(recv_text(&mut c).await, "m#1: hi");
    assert_eq!(recv_text(&mut c).await, "many 1 of 2");
    assert_eq!(recv_text(&mut c).await, "many 2");
    assert_eq!(recv(&mut c).await, WsMessage::binary(vec![3u8]));
    assert_eq!(recv_text(&mut c).await, "many 4");
    assert_eq!(recv_text(&mut c).await, "many 5");
    assert_eq!(recv_text(&mut c).await, "m#3: bye");

    c.send(WsMessage::binary(vec![1u8, 2, 3, 4]))
        .await
        .expect("send binary");
    assert_eq!(recv(&mut c).await, WsMessage::binary(vec![4u8, 3, 2, 1]));
    assert_silent(&mut c, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn stop_closes_with_the_exact_code_and_reason_and_on_close_sees_by_server() {
    let f = fixture().await;
    let mut c = f.join("s").await;
    send_text(&mut c, "one").await;
    assert_eq!(recv_text(&mut c).await, "s#1: one");
    send_text(&mut c, "stop").await;
    let frame = recv_close(&mut c).await.expect("a close frame with a code");
    assert_eq!(frame.code, WsCloseCode::from(4123));
    assert_eq!(frame.reason.as_str(), "stopped after 2");
    drain_to_end(&mut c).await;

    assert_eq!(
        f.closed("s").await,
        Closed::ByServer(stop_frame(4123, "stopped after 2"))
    );
    f.server
        .eventually("connection gone", |hub| hub.live_connections() == 0)
        .await;
    assert_eq!(f.close_count("s"), 1, "on_close runs once");
}

#[tokio::test]
async fn on_close_sees_the_clients_close_frame() {
    let f = fixture().await;
    let mut c = f.join("polite").await;
    c.close(Some(WsCloseFrame {
        code: WsCloseCode::Normal,
        reason: "done here".into(),
    }))
    .await
    .expect("send close");
    // The server answers with the same code.
    let echoed = recv_close(&mut c).await.expect("close frame with a code");
    assert_eq!(echoed.code, WsCloseCode::Normal);
    drain_to_end(&mut c).await;

    assert_eq!(
        f.closed("polite").await,
        Closed::ByClient(Some(stop_frame(1000, "done here")))
    );
    assert_eq!(f.close_count("polite"), 1);
    f.server
        .eventually("connection gone", |hub| hub.live_connections() == 0)
        .await;
}

#[tokio::test]
async fn on_close_sees_an_abnormal_end_when_tcp_just_closes() {
    let f = fixture().await;
    let c = f.join("vanishes").await;
    drop(c);
    assert!(
        matches!(f.closed("vanishes").await, Closed::Abnormal(_)),
        "{:?}",
        f.closed("vanishes").await
    );
}

#[tokio::test]
async fn on_info_replies_to_a_message_sent_through_a_conn_handle_from_an_http_route() {
    let f = fixture().await;
    let mut ann = f.join("ann").await;
    let mut bob = f.join("bob").await;

    let response = raw::http(f.server.addr, "POST", "/notify/ann", &[], b"you have mail").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json(), serde_json::json!({"sent": 1}));
    assert_eq!(recv_text(&mut ann).await, "info for ann: you have mail");
    assert_silent(&mut bob, Duration::from_millis(100)).await;

    // Info messages and client messages share the connection's order and state.
    send_text(&mut bob, "first").await;
    assert_eq!(recv_text(&mut bob).await, "bob#1: first");
    let handle = f.handle("bob");
    for i in 0..5 {
        handle
            .send(Info::Say(format!("n{i}")))
            .map_err(|(e, _)| e)
            .expect("queued");
    }
    for i in 0..5 {
        assert_eq!(recv_text(&mut bob).await, format!("info for bob: n{i}"));
    }
    send_text(&mut bob, "second").await;
    assert_eq!(recv_text(&mut bob).await, "bob#2: second");
}

#[tokio::test]
async fn on_info_can_stop_the_connection_and_the_handle_then_reports_closed() {
    let f = fixture().await;
    let mut c = f.join("target").await;
    let handle = f.handle("target");
    assert!(!handle.is_closed());
    handle
        .send(Info::Stop(4321, "stopped through a handle".to_owned()))
        .map_err(|(e, _)| e)
        .expect("queued");
    let frame = recv_close(&mut c).await.expect("close frame with a code");
    assert_eq!(frame.code, WsCloseCode::from(4321));
    assert_eq!(frame.reason.as_str(), "stopped through a handle");
    drain_to_end(&mut c).await;

    assert_eq!(
        f.closed("target").await,
        Closed::ByServer(stop_frame(4321, "stopped through a handle"))
    );
    for _ in 0..500 {
        if handle.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(handle.is_closed());
    match handle.send(Info::Say("too late".to_owned())) {
        Err((PushError::Closed, Info::Say(text))) => assert_eq!(text, "too late"),
        other => panic!("expected Closed with the message handed back, got {other:?}"),
    }
    let response = raw::http(f.server.addr, "POST", "/notify/target", &[], b"late").await;
    assert_eq!(response.json(), serde_json::json!({"sent": 0}));
}

#[tokio::test]
async fn info_sent_before_the_socket_opens_is_delivered_after_the_welcome() {
    // `connect` stores the handle before the upgrade; anything sent to it
    // is queued until the socket is open, and on_open's reply goes first.
    let f = fixture().await;
    let (response, mut ws) =
        raw::try_upgrade(f.server.addr, "/probe?name=early&early=1", &[]).await;
    assert_eq!(response.status, 101);
    f.handle("early")
        .send(Info::Say("queued early".to_owned()))
        .map_err(|(e, _)| e)
        .expect("queued");
    let first = ws.read_frame().await;
    assert_eq!(first.payload, b"welcome early via root".to_vec());
    let second = ws.read_frame().await;
    assert_eq!(
        second.payload,
        b"info for early: queued in connect".to_vec()
    );
    let third = ws.read_frame().await;
    assert_eq!(third.payload, b"info for early: queued early".to_vec());
}

#[tokio::test]
async fn a_guarded_route_group_refuses_without_the_header_and_connects_with_it() {
    let f = fixture().await;
    let addr = f.server.addr;

    // Upgrade without the header: refused by the guard before the handler.
    let (response, _stream) = raw::try_upgrade(addr, "/v1/probe?name=eve", &[]).await;
    assert_eq!(response.status, 401, "{}", response.text());
    assert_eq!(response.error_code(), "unauthorized");
    assert!(f.handles.lock().expect("handles lock").is_empty());
    assert_eq!(f.server.hub.live_connections(), 0);

    // A wrong key is refused too.
    let (response, _stream) =
        raw::try_upgrade(addr, "/v1/probe?name=eve", &[("x-api-key", "guess")]).await;
    assert_eq!(response.status, 401);

    // With the header: the upgrade goes through to the v1 mount.
    let mut request = f
        .server
        .url("/v1/probe?name=kay")
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("x-api-key", http::HeaderValue::from_static("let-me-in"));
    let (mut client, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("guarded upgrade with the key");
    assert_eq!(response.status(), 101);
    assert_eq!(recv_text(&mut client).await, "welcome kay via v1");
    send_text(&mut client, "hi").await;
    assert_eq!(recv_text(&mut client).await, "kay#1: hi");

    // Plain HTTP routes in the group are guarded the same way.
    let denied = raw::http_get(addr, "/v1/whoami").await;
    assert_eq!(denied.status, 401);
    assert_eq!(denied.error_code(), "unauthorized");
    let allowed = raw::http(
        addr,
        "GET",
        "/v1/whoami",
        &[("x-api-key", "let-me-in")],
        b"",
    )
    .await;
    assert_eq!(
        (allowed.status, allowed.text().as_str()),
        (200, "v1 caller")
    );

    // The unguarded root mount needs no header.
    let _root = f.join("root-user").await;
}

#[tokio::test]
async fn serve_answers_404_405_and_handler_panics_with_json_and_keeps_serving() {
    let f = fixture().await;
    let addr = f.server.addr;

    let missing = raw::http_get(addr, "/nope").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("content-type"), Some("application/json"));
    assert_eq!(missing.error_code(), "not_found");

    let missing_nested =
        raw::http(addr, "GET", "/v1/nope", &[("x-api-key", "let-me-in")], b"").await;
    assert_eq!(missing_nested.status, 404);
    assert_eq!(missing_nested.error_code(), "not_found");

    let wrong_method = raw::http(addr, "POST", "/hello", &[], b"").await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.error_code(), "method_not_allowed");

    let panicked = raw::http_get(addr, "/boom").await;
    assert_eq!(panicked.status, 500);
    assert_eq!(panicked.header("content-type"), Some("application/json"));
    assert_eq!(panicked.error_code(), "internal_error");

    // The server is still serving, HTTP and WebSocket alike.
    let hello = raw::http_get(addr, "/hello").await;
    assert_eq!((hello.status, hello.text().as_str()), (200, "hello"));
    let again = raw::http_get(addr, "/boom").await;
    assert_eq!(again.status, 500);
    let mut c = f.join("after-panic").await;
    send_text(&mut c, "still").await;
    assert_eq!(recv_text(&mut c).await, "after-panic#1: still");
}

async fn oneshot(router: Router, method: &str, path: &str) -> (StatusCode, serde_json::Value) {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .body(axum::body::Body::empty())
        .expect("request");
    let response = router.oneshot(request).await.expect("infallible");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, json)
}

#[tokio::test]
async fn json_errors_works_on_a_router_served_without_switchboard() {
    let router = || {
        switchboard::json_errors(
            Router::new()
                .route("/hello", get(|| async { "hello" }))
                .route("/boom", get(boom)),
        )
    };
    let (status, body) = oneshot(router(), "GET", "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(body["error"]["message"], "no route for GET /nope");

    let (status, body) = oneshot(router(), "DELETE", "/hello").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"]["code"], "method_not_allowed");

    let (status, body) = oneshot(router(), "GET", "/boom").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["error"]["code"], "internal_error");
    assert!(body["error"]["message"].is_string());
}
