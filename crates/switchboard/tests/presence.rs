//! Presence on one node, black box: a real server, real clients speaking
//! raw `switchboard.v1` frames (docs/protocol-v1.md, "Presence"). Leave
//! delays are shortened (seconds) so that the timing bounds can be checked.

mod common;

use std::time::{Duration, Instant};

use common::{Client, TestServer, WAIT, assert_silent, http_get, recv_close, recv_json, send_text};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use switchboard::{Hub, Limits, V1Limits};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const TOPIC: &str = "room/1";

fn limits(leave_delay: Duration) -> Limits {
    Limits {
        v1: V1Limits {
            presence_leave_delay: leave_delay,
            ..V1Limits::default()
        },
        ..Limits::default()
    }
}

async fn start(leave_delay: Duration) -> TestServer {
    TestServer::with_limits(limits(leave_delay)).await
}

/// A v1 connection as `id` that said hello; `auth` adds a bearer token.
async fn hello(server: &TestServer, id: &str, auth: Option<&str>) -> Client {
    let path = if auth.is_some() {
        "/ws".to_owned()
    } else {
        format!("/ws?id={id}")
    };
    let mut request = server.url(&path).into_client_request().expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("switchboard.v1"),
    );
    if let Some(token) = auth {
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
    }
    let (mut client, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect in time")
        .expect("connect");
    send_text(&mut client, r#"{"type":"hello","id":0}"#).await;
    let welcome = recv_json(&mut client).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    client
}

/// Subscribes to `TOPIC` with `extra` fields; returns the ack.
async fn subscribe(client: &mut Client, extra: Value) -> Value {
    let mut frame = json!({"type": "subscribe", "id": 1, "topic": TOPIC});
    if let (Some(frame), Value::Object(extra)) = (frame.as_object_mut(), extra) {
        frame.extend(extra);
    }
    send_text(client, &frame.to_string()).await;
    let ack = recv_json(client).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ack
}

/// A member: connected as `id` and subscribed without presence.
async fn member(server: &TestServer, id: &str) -> Client {
    let mut client = hello(server, id, None).await;
    let ack = subscribe(&mut client, json!({})).await;
    assert!(ack.get("error").is_none(), "{ack}");
    assert!(ack.get("presence").is_none(), "no presence asked: {ack}");
    client
}

/// A watcher of `TOPIC`'s full presence, and its snapshot.
async fn watcher(server: &TestServer, id: &str) -> (Client, Value) {
    let mut client = hello(server, id, None).await;
    let ack = subscribe(&mut client, json!({"presence": "full"})).await;
    (client, ack["presence"].clone())
}

/// The next presence frame.
async fn next_presence(client: &mut Client, within: Duration) -> Value {
    let frame = tokio::time::timeout(within, recv_json(client))
        .await
        .expect("a presence frame in time");
    assert_eq!(frame["type"], "presence", "{frame}");
    frame
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|items| {
            items
                .iter()
                .map(|m| m["id"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills a client's TCP connection without a close handshake (RST).
fn kill(client: Client) {
    if let tokio_tungstenite::MaybeTlsStream::Plain(stream) = client.get_ref() {
        stream.set_zero_linger().expect("SO_LINGER 0");
    }
    drop(client);
}

async fn close_normally(mut client: Client) {
    client
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .expect("close");
    let _ = recv_close(&mut client).await;
}

#[tokio::test]
async fn the_snapshot_lists_members_with_their_connection_counts() {
    let server = start(Duration::from_secs(10)).await;
    let _alice1 = member(&server, "alice").await;
    let _alice2 = member(&server, "alice").await;
    let _bob = member(&server, "bob").await;
    let (_carol, snapshot) = watcher(&server, "carol").await;
    assert_eq!(snapshot["count"], 3, "{snapshot}");
    let members = snapshot["members"].as_array().expect("members");
    let conns: Vec<(String, u64)> = members
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or("?").to_owned(),
                m["conns"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        conns,
        vec![
            ("alice".to_owned(), 2),
            ("bob".to_owned(), 1),
            ("carol".to_owned(), 1)
        ]
    );
    assert!(members.iter().all(|m| m["since_ms"].as_u64() > Some(0)));
    assert!(snapshot["rev"].as_u64() > Some(0));
}

#[tokio::test]
async fn joins_reach_watchers_with_increasing_revisions() {
    let server = start(Duration::from_secs(10)).await;
    let (mut watch, snapshot) = watcher(&server, "w").await;
    let mut rev = snapshot["rev"].as_u64().expect("rev");
    let mut joined = Vec::new();
    let _members: Vec<Client> = {
        let mut members = Vec::new();
        for name in ["a", "b", "c"] {
            members.push(member(&server, name).await);
        }
        members
    };
    while joined.len() < 3 {
        let frame = next_presence(&mut watch, WAIT).await;
        assert!(frame["prev"].as_u64() >= Some(rev), "{frame}");
        assert!(frame["rev"].as_u64() > Some(rev), "{frame}");
        rev = frame["rev"].as_u64().expect("rev");
        assert_eq!(frame["leaves"], json!([]));
        joined.extend(ids(&frame["joins"]));
    }
    joined.sort();
    assert_eq!(joined, ["a", "b", "c"]);
}

#[tokio::test]
async fn a_killed_connection_back_within_the_delay_causes_no_event() {
    let delay = Duration::from_secs(2);
    let server = start(delay).await;
    let (mut watch, _) = watcher(&server, "w").await;
    let alice = member(&server, "alice").await;
    let join = next_presence(&mut watch, WAIT).await;
    assert_eq!(ids(&join["joins"]), ["alice"]);

    kill(alice);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _alice = member(&server, "alice").await;
    // Past the delay and a second more: nothing at all.
    assert_silent(&mut watch, delay + Duration::from_secs(1)).await;
    send_text(
        &mut watch,
        &json!({"type": "presence_get", "id": 9, "topic": TOPIC}).to_string(),
    )
    .await;
    let ack = recv_json(&mut watch).await;
    assert_eq!(ack["id"], 9, "{ack}");
    assert_eq!(ack["presence"]["count"], 2);
    assert_eq!(
        ack["presence"]["rev"], join["rev"],
        "no change since the join"
    );
}

#[tokio::test]
async fn a_killed_connection_not_back_leaves_once_between_the_delay_and_a_second_more() {
    let delay = Duration::from_secs(2);
    let server = start(delay).await;
    let (mut watch, _) = watcher(&server, "w").await;
    let alice = member(&server, "alice").await;
    next_presence(&mut watch, WAIT).await;

    let killed = Instant::now();
    kill(alice);
    let leave = next_presence(&mut watch, delay + Duration::from_secs(3)).await;
    let after = killed.elapsed();
    assert_eq!(ids(&leave["leaves"]), ["alice"], "{leave}");
    assert_eq!(leave["count"], 1);
    assert!(
        after >= delay && after <= delay + Duration::from_secs(1),
        "the leave came {after:?} after the kill; the delay is {delay:?}"
    );
    assert_silent(&mut watch, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn unsubscribe_and_a_normal_close_leave_within_a_second() {
    let server = start(Duration::from_secs(10)).await;
    let (mut watch, _) = watcher(&server, "w").await;
    let mut alice = member(&server, "alice").await;
    let bob = member(&server, "bob").await;
    let mut joined = 0;
    while joined < 2 {
        joined += ids(&next_presence(&mut watch, WAIT).await["joins"]).len();
    }

    send_text(
        &mut alice,
        &json!({"type": "unsubscribe", "id": 2, "topic": TOPIC}).to_string(),
    )
    .await;
    let left = Instant::now();
    let leave = next_presence(&mut watch, Duration::from_secs(1)).await;
    assert_eq!(ids(&leave["leaves"]), ["alice"], "{leave}");
    assert!(left.elapsed() < Duration::from_secs(1));

    let closed = Instant::now();
    close_normally(bob).await;
    let leave = next_presence(&mut watch, Duration::from_secs(1)).await;
    assert_eq!(ids(&leave["leaves"]), ["bob"], "{leave}");
    assert!(closed.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn closing_one_of_two_tabs_is_no_leave() {
    let server = start(Duration::from_secs(10)).await;
    let (mut watch, _) = watcher(&server, "w").await;
    let tab1 = member(&server, "alice").await;
    let _tab2 = member(&server, "alice").await;
    let join = next_presence(&mut watch, WAIT).await;
    assert_eq!(ids(&join["joins"]), ["alice"]);

    close_normally(tab1).await;
    assert_silent(&mut watch, Duration::from_secs(1)).await;
    send_text(
        &mut watch,
        &json!({"type": "presence_get", "id": 3, "topic": TOPIC}).to_string(),
    )
    .await;
    let ack = recv_json(&mut watch).await;
    let alice = ack["presence"]["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == "alice").cloned())
        .expect("alice is still a member");
    assert_eq!(alice["conns"], 1, "{ack}");
}

/// Reads every text frame of `client` as it arrives, with its arrival
/// time, until the client is dropped by the test's end.
fn record(mut client: Client) -> tokio::sync::mpsc::UnboundedReceiver<(Instant, Value)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = client.next().await {
            if let WsMessage::Text(text) = message {
                let value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if tx.send((Instant::now(), value)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// 500 members join (coalesced into frames a window apart), then all
/// reconnect within 5 s after their connections were killed: the watcher
/// gets no leave and no join for any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_members_reconnecting_cause_no_leave_join_pairs() {
    const N: usize = 500;
    let delay = Duration::from_secs(6);
    let window = V1Limits::default().presence_coalesce;
    let server = start(delay).await;
    let (watch, _) = watcher(&server, "w").await;
    let mut frames = record(watch);

    let mut members = Vec::with_capacity(N);
    for i in 0..N {
        members.push(member(&server, &format!("m{i}")).await);
    }
    // The joins arrive coalesced: at most one frame per window (measured
    // at the client as frames arrive, so with a little scheduling slack).
    let mut joined = 0;
    let mut last: Option<Instant> = None;
    let mut count = 0;
    while joined < N {
        let (at, frame) = tokio::time::timeout(WAIT, frames.recv())
            .await
            .expect("frames in time")
            .expect("watcher open");
        assert_eq!(frame["type"], "presence", "{frame}");
        if let Some(last) = last {
            assert!(
                at - last >= window - Duration::from_millis(50),
                "two presence frames {:?} apart; the window is {window:?}",
                at - last
            );
        }
        last = Some(at);
        count += 1;
        joined += ids(&frame["joins"]).len();
    }
    assert_eq!(joined, N);
    assert!(count < N / 4, "{count} frames for {N} joins");

    let killed = Instant::now();
    for client in members.drain(..) {
        kill(client);
    }
    // Back within 5 s (spread over 2 s here).
    for i in 0..N {
        members.push(member(&server, &format!("m{i}")).await);
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "{:?}",
        killed.elapsed()
    );
    // Until a second past the delay: no frame names any of them.
    let until = tokio::time::Instant::from_std(killed + delay + Duration::from_secs(1));
    if let Ok(Some((_, frame))) = tokio::time::timeout_at(until, frames.recv()).await {
        panic!("expected no presence frame after the reconnect, got {frame}");
    }
    assert_eq!(server.hub.live_connections(), N + 1);
}

#[tokio::test]
async fn count_mode_gets_counts_only() {
    let server = start(Duration::from_secs(10)).await;
    let _a = member(&server, "a").await;
    let mut watch = hello(&server, "w", None).await;
    let ack = subscribe(&mut watch, json!({"presence": "count"})).await;
    assert_eq!(ack["presence"]["count"], 2, "{ack}");
    assert!(ack["presence"].get("members").is_none(), "{ack}");
    let _b = member(&server, "b").await;
    let frame = next_presence(&mut watch, WAIT).await;
    assert_eq!(frame["count"], 3, "{frame}");
    assert!(frame.get("joins").is_none(), "{frame}");
}

#[tokio::test]
async fn above_the_member_limit_only_counts_are_sent() {
    let mut limits = limits(Duration::from_secs(10));
    limits.v1.presence_max_members = 3;
    let server = TestServer::with_limits(limits).await;
    let mut members = Vec::new();
    for name in ["a", "b", "c"] {
        members.push(member(&server, name).await);
    }
    let (mut watch, snapshot) = watcher(&server, "w").await;
    assert_eq!(snapshot["count"], 4, "{snapshot}");
    assert_eq!(snapshot["truncated"], true, "{snapshot}");
    assert!(snapshot.get("members").is_none(), "{snapshot}");
    members.push(member(&server, "d").await);
    let frame = next_presence(&mut watch, WAIT).await;
    assert_eq!(frame["count"], 5);
    assert_eq!(frame["truncated"], true, "{frame}");
    assert!(frame.get("joins").is_none(), "{frame}");
}

#[tokio::test]
async fn client_meta_is_refused_unless_configured_and_bounded() {
    let server = start(Duration::from_secs(10)).await;
    let mut client = hello(&server, "a", None).await;
    let ack = subscribe(&mut client, json!({"meta": {"name": "A"}})).await;
    assert_eq!(ack["error"]["code"], "client_meta_not_allowed", "{ack}");

    let mut limits = limits(Duration::from_secs(10));
    limits.v1.presence_client_meta = true;
    let server = TestServer::with_limits(limits).await;
    let mut client = hello(&server, "a", None).await;
    let big = "x".repeat(switchboard::MAX_META_BYTES);
    let ack = subscribe(&mut client, json!({"meta": big})).await;
    assert_eq!(ack["error"]["code"], "presence_meta_too_large", "{ack}");
    assert!(
        ack["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("1024")),
        "{ack}"
    );
    let ack = subscribe(
        &mut client,
        json!({"meta": {"name": "A"}, "presence": "full"}),
    )
    .await;
    assert_eq!(
        ack["presence"]["members"][0]["meta"],
        json!({"name": "A"}),
        "{ack}"
    );
}

#[tokio::test]
async fn bad_presence_requests_get_specific_errors() {
    let server = start(Duration::from_secs(10)).await;
    let mut client = hello(&server, "a", None).await;
    let ack = subscribe(&mut client, json!({"presence": "everything"})).await;
    assert_eq!(ack["error"]["code"], "invalid_presence", "{ack}");
    send_text(
        &mut client,
        r#"{"type":"presence_get","id":4,"topic":"bad topic"}"#,
    )
    .await;
    let ack = recv_json(&mut client).await;
    assert_eq!(ack["id"], 4);
    assert_eq!(ack["error"]["code"], "invalid_topic", "{ack}");
}

#[tokio::test]
async fn get_api_presence_lists_members_or_counts() {
    let server = start(Duration::from_secs(10)).await;
    let _a1 = member(&server, "a").await;
    let _a2 = member(&server, "a").await;
    let _b = member(&server, "b").await;
    let full = http_get(server.addr, "/api/presence/room/1").await;
    assert_eq!(full.status, 200, "{}", full.text());
    let body = full.json();
    assert_eq!(body["topic"], TOPIC);
    assert_eq!(body["count"], 2);
    assert_eq!(ids(&body["members"]), ["a", "b"]);
    assert_eq!(body["members"][0]["conns"], 2);

    let count = http_get(server.addr, "/api/presence/room/1?mode=count").await;
    assert_eq!(count.status, 200);
    assert_eq!(count.json()["count"], 2);
    assert!(count.json().get("members").is_none());

    let empty = http_get(server.addr, "/api/presence/nobody").await;
    assert_eq!(empty.json()["count"], 0, "{}", empty.text());

    let bad = http_get(server.addr, "/api/presence/bad%20topic").await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(bad.error_code(), "invalid_topic");
    let bad = http_get(server.addr, "/api/presence/room/1?mode=all").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.error_code(), "invalid_query");
}

#[tokio::test]
async fn the_api_key_guards_get_api_presence() {
    let security = switchboard::Security {
        api_keys: switchboard::auth::ApiKeys::new(["k-123456789012345678901234567890"])
            .expect("keys"),
        ..switchboard::Security::default()
    };
    let hub = Hub::builder(limits(Duration::from_secs(10)))
        .security(security)
        .build();
    let server = TestServer::with_router(hub.clone(), switchboard::app(hub)).await;
    let refused = http_get(server.addr, "/api/presence/room/1").await;
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert_eq!(refused.error_code(), "missing_api_key");
}

#[cfg(feature = "jwt")]
mod jwt {
    use std::sync::Arc;
    use std::time::{SystemTime, UNIX_EPOCH};

    use jsonwebtoken::{EncodingKey, Header};
    use switchboard::Security;
    use switchboard::auth::jwt::{JwtAuthenticator, JwtConfig, JwtKey};

    use super::*;

    const SECRET: &[u8] = b"test secret: at least thirty-two bytes long";

    fn token(sub: &str, presence: Value) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 3600;
        let claims = json!({"sub": sub, "exp": exp, "sb_presence": presence});
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("token")
    }

    async fn server() -> TestServer {
        let jwt =
            JwtAuthenticator::new(JwtConfig::new(JwtKey::Secret(SECRET.to_vec()))).expect("jwt");
        let security = Security {
            authenticator: Some(Arc::new(jwt)),
            ..Security::default()
        };
        let hub = Hub::builder(limits(Duration::from_secs(10)))
            .security(security)
            .build();
        TestServer::with_router(hub.clone(), switchboard::app(hub)).await
    }

    #[tokio::test]
    async fn meta_comes_from_the_sb_presence_claim() {
        let server = server().await;
        let ann = token("ann", json!({"name": "Ann", "color": "#f00"}));
        let mut client = hello(&server, "ann", Some(&ann)).await;
        let ack = subscribe(&mut client, json!({})).await;
        assert!(ack.get("error").is_none(), "{ack}");
        let w = token("w", json!(null));
        let mut watch = hello(&server, "w", Some(&w)).await;
        let ack = subscribe(&mut watch, json!({"presence": "full"})).await;
        let ann = ack["presence"]["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["id"] == "ann").cloned())
            .expect("ann is a member");
        assert_eq!(ann["meta"], json!({"name": "Ann", "color": "#f00"}));

        let bob = token("bob", json!({"name": "Bob"}));
        let _bob = {
            let mut bob = hello(&server, "bob", Some(&bob)).await;
            subscribe(&mut bob, json!({})).await;
            bob
        };
        let frame = next_presence(&mut watch, WAIT).await;
        assert_eq!(
            frame["joins"],
            json!([{"id": "bob", "meta": {"name": "Bob"}}])
        );
    }

    #[tokio::test]
    async fn an_oversize_sb_presence_claim_is_refused_at_the_upgrade() {
        let server = server().await;
        let big = token("ann", json!({"bio": "x".repeat(2000)}));
        let auth = format!("Bearer {big}");
        let mut headers = common::upgrade_headers();
        headers.push(("Authorization", &auth));
        headers.push(("Sec-WebSocket-Protocol", "switchboard.v1"));
        let response = common::http_upgrade(server.addr, "/ws", &headers).await;
        assert_eq!(response.status, 401, "{}", response.text());
        assert_eq!(response.error_code(), "presence_meta_too_large");
        assert!(
            response.text().contains("sb_presence"),
            "{}",
            response.text()
        );
    }
}

#[tokio::test]
async fn with_presence_off_subscribes_work_and_presence_requests_are_refused() {
    let mut limits = limits(Duration::from_secs(10));
    limits.v1.presence = false;
    let server = TestServer::with_limits(limits).await;
    let mut client = hello(&server, "a", None).await;
    let ack = subscribe(&mut client, json!({})).await;
    assert!(ack.get("error").is_none(), "{ack}");
    let ack = subscribe(&mut client, json!({"presence": "count"})).await;
    assert_eq!(ack["error"]["code"], "presence_disabled", "{ack}");
    let empty = http_get(server.addr, "/api/presence/room/1").await;
    assert_eq!(
        empty.json()["count"],
        0,
        "no member is kept: {}",
        empty.text()
    );
}

/// A drain or shutdown close (1012/1001 from the server) is an abnormal end:
/// the leave waits for the delay. A close by the API (4000) is for good:
/// the leave is at once.
#[tokio::test]
async fn server_drain_closes_delay_the_leave_and_api_closes_do_not() {
    use switchboard::{ClientId, CloseCode, CloseFrame};
    let delay = Duration::from_secs(2);
    let server = start(delay).await;
    let (mut watch, _) = watcher(&server, "w").await;
    // The members read (and so answer the server's close frame at once,
    // as a real client does).
    for name in ["alice", "bob"] {
        let mut client = member(&server, name).await;
        tokio::spawn(async move { while let Some(Ok(_)) = client.next().await {} });
    }
    let mut joined = 0;
    while joined < 2 {
        joined += ids(&next_presence(&mut watch, WAIT).await["joins"]).len();
    }
    let backend = server.hub.backend();

    let drained = Instant::now();
    let closed = backend
        .disconnect(
            &ClientId::new("alice").expect("id"),
            CloseFrame::new(CloseCode(1012), "draining: reconnect elsewhere"),
        )
        .await;
    assert_eq!(closed, 1);
    let leave = next_presence(&mut watch, delay + Duration::from_secs(2)).await;
    assert_eq!(ids(&leave["leaves"]), ["alice"], "{leave}");
    assert!(
        drained.elapsed() >= delay,
        "a drained member left after {:?}, before the delay",
        drained.elapsed()
    );

    let kicked = Instant::now();
    let closed = backend
        .disconnect(
            &ClientId::new("bob").expect("id"),
            CloseFrame::new(CloseCode::DISCONNECTED, "disconnected by the server's API"),
        )
        .await;
    assert_eq!(closed, 1);
    let leave = next_presence(&mut watch, Duration::from_secs(1)).await;
    assert_eq!(ids(&leave["leaves"]), ["bob"], "{leave}");
    assert!(kicked.elapsed() < Duration::from_secs(1));
}
