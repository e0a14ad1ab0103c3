//! `switchboard.v1` sends handled at once (the in-memory backend's
//! `Immediate` path, no await) against the same sends through the async
//! path (`Backend::send`): a real server of each kind, the same pipelined
//! burst of raw v1 frames, and every ack, delivery and resume compared.
//!
//! The async server's backend is the same `MemoryBackend` behind a wrapper
//! that offers no `immediate()`, so the only difference between the two
//! servers is the path a send takes. Each wrapper counts the sends that
//! went through `Backend::send`, which proves which path each server took.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Client, TestServer, connect_v1, recv_json, send_text};
use futures_util::SinkExt as _;
use serde_json::{Value, json};
use switchboard::{
    Attached, Backend, BoxFuture, ClientId, ClientInfo, ConnId, ConnRef, Dedup, Envelope, Hub,
    Immediate, Limits, MemoryBackend, Page, PageQuery, RegisterError, Replay, ResumePoint,
    SendReport, Topic, TopicInfo,
};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A `MemoryBackend` that offers its immediate path or not, and counts
/// the sends that went through `Backend::send`.
struct Switched {
    inner: MemoryBackend,
    at_once: bool,
    async_sends: AtomicUsize,
}

impl Backend for Switched {
    fn register(&self, id: &ClientId, conn: &ConnRef) -> Result<(), RegisterError> {
        self.inner.register(id, conn)
    }
    fn unregister(&self, id: &ClientId, conn: ConnId) {
        self.inner.unregister(id, conn);
    }
    fn subscribe(&self, topic: &Topic, conn: &ConnRef) {
        self.inner.subscribe(topic, conn);
    }
    fn unsubscribe(&self, topic: &Topic, conn: ConnId) {
        self.inner.unsubscribe(topic, conn);
    }
    fn send<'a>(
        &'a self,
        targets: &'a [ClientId],
        message: &'a Arc<Envelope>,
    ) -> BoxFuture<'a, SendReport> {
        self.async_sends.fetch_add(1, Ordering::Relaxed);
        self.inner.send(targets, message)
    }
    fn publish<'a>(&'a self, topic: &'a Topic, message: &'a Arc<Envelope>) -> BoxFuture<'a, usize> {
        self.inner.publish(topic, message)
    }
    fn immediate(&self) -> Option<&dyn Immediate> {
        if self.at_once {
            Some(&self.inner)
        } else {
            None
        }
    }
    fn clients(&self) -> BoxFuture<'_, Vec<ClientInfo>> {
        self.inner.clients()
    }
    fn disconnect<'a>(
        &'a self,
        id: &'a ClientId,
        frame: switchboard::CloseFrame,
    ) -> BoxFuture<'a, usize> {
        self.inner.disconnect(id, frame)
    }
    fn client_page<'a>(&'a self, query: &'a PageQuery) -> BoxFuture<'a, Page<ClientInfo>> {
        self.inner.client_page(query)
    }
    fn topic_page<'a>(&'a self, query: &'a PageQuery) -> BoxFuture<'a, Page<TopicInfo>> {
        self.inner.topic_page(query)
    }
    fn attach<'a>(
        &'a self,
        id: &'a ClientId,
        conn: &'a ConnRef,
        resume: Option<&'a ResumePoint>,
    ) -> BoxFuture<'a, Result<Attached, RegisterError>> {
        self.inner.attach(id, conn, resume)
    }
    fn replay<'a>(&'a self, id: &'a ClientId, from: u64, to: u64) -> BoxFuture<'a, Replay> {
        self.inner.replay(id, from, to)
    }
    fn dedup<'a>(&'a self, sender: &'a ClientId, mid: &'a str) -> BoxFuture<'a, Dedup> {
        self.inner.dedup(sender, mid)
    }
    fn dedup_done(&self, sender: &ClientId, mid: &str, report: Arc<str>) {
        self.inner.dedup_done(sender, mid, report);
    }
    fn dedup_abort(&self, sender: &ClientId, mid: &str) {
        self.inner.dedup_abort(sender, mid);
    }
}

/// A server whose sends take the immediate path (`at_once`) or the async
/// one; and its backend.
async fn server(at_once: bool) -> (TestServer, Arc<Switched>) {
    let limits = Limits::default();
    let backend = Arc::new(Switched {
        inner: MemoryBackend::with_v1(limits.duplicate_ids, &limits.v1),
        at_once,
        async_sends: AtomicUsize::new(0),
    });
    let hub = Hub::with_backend(limits, Arc::clone(&backend) as Arc<dyn Backend>);
    let app = switchboard::app(hub.clone());
    (TestServer::with_router(hub, app).await, backend)
}

async fn hello(server: &TestServer, id: &str, resume: Option<Value>) -> (Client, Value) {
    let mut client = connect_v1(server, id).await;
    let mut frame = json!({"type": "hello", "id": 0});
    if let Some(resume) = resume {
        frame["resume"] = resume;
    }
    send_text(&mut client, &frame.to_string()).await;
    let welcome = recv_json(&mut client).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (client, welcome)
}

/// Sends per burst.
const BURST: u64 = 1000;

/// Send `n` of the burst: its targets mix an online v1 client (`bob`,
/// sometimes twice, as a number-like string and a string), an online plain
/// client (`carol`), a v1 client that is offline but retained (`dave`) and
/// an ID never seen (`eve`, `7`); every third send has a `mid`, and every
/// ninth resends the `mid` of the send three before it (a duplicate).
fn burst_frame(n: u64) -> String {
    let targets = match n % 5 {
        0 => json!(["bob"]),
        1 => json!(["bob", "carol", "dave", "bob"]),
        2 => json!(["eve", 7, "dave"]),
        3 => json!(["carol", "eve"]),
        _ => json!(["dave", "bob", 7, "carol"]),
    };
    let mid = if n % 9 == 8 {
        format!(r#","mid":"m-{}""#, n - 3)
    } else if n % 3 == 2 {
        format!(r#","mid":"m-{n}""#)
    } else {
        String::new()
    };
    // Written by hand in the documented field order (`json!` sorts keys):
    // the order the one-pass parser takes. Every 50th frame is in another
    // order, which only `request::parse` reads: such a send takes the
    // async path on both servers, mixed into the burst.
    if n % 50 == 49 {
        return format!(
            r#"{{"id":{n},"type":"send"{mid},"targets":{targets},"payload":{{"n":{n}}}}}"#
        );
    }
    format!(r#"{{"type":"send","id":{n}{mid},"targets":{targets},"payload":{{"n":{n}}}}}"#)
}

/// What one server did with the burst: alice's acks in order, bob's and
/// carol's deliveries in order, dave's resume after it.
#[derive(Debug, PartialEq)]
struct Seen {
    acks: Vec<Value>,
    bob: Vec<Value>,
    carol: Vec<Value>,
    dave_welcome_resume: Value,
    dave_replay: Vec<Value>,
}

async fn run_burst(server: &TestServer, backend: &Switched) -> Seen {
    let (mut alice, _) = hello(server, "alice", None).await;
    let (mut bob, _) = hello(server, "bob", None).await;
    let mut carol = server.connect("/ws?id=carol").await;
    // dave had a v1 connection: his inbox retains while he is away.
    let (dave, dave_welcome) = hello(server, "dave", None).await;
    drop(dave);
    server
        .eventually("dave's connection to be unregistered", |_| {
            backend.inner.client_count() == 3
        })
        .await;

    // The whole burst in one flush: the server reads it in a few large
    // reads and handles each read's sends back to back.
    for n in 0..BURST {
        alice
            .feed(WsMessage::text(burst_frame(n)))
            .await
            .expect("feed");
    }
    alice.flush().await.expect("flush");

    let mut acks = Vec::new();
    for _ in 0..BURST {
        acks.push(recv_json(&mut alice).await);
    }
    // Deliveries: one per send that named them and was not a duplicate.
    let mut bob_msgs = Vec::new();
    let mut carol_msgs = Vec::new();
    let delivered = |acks: &[Value], who: &str| {
        acks.iter()
            .filter(|ack| ack.get("duplicate").is_none())
            .filter(|ack| {
                ack["delivered"]
                    .as_array()
                    .is_some_and(|list| list.iter().any(|t| t == who))
            })
            .count()
    };
    for _ in 0..delivered(&acks, "bob") {
        bob_msgs.push(recv_json(&mut bob).await);
    }
    for _ in 0..delivered(&acks, "carol") {
        carol_msgs.push(recv_json(&mut carol).await);
    }
    let (mut dave, back) = hello(
        server,
        "dave",
        Some(json!({"epoch": dave_welcome["inbox"]["epoch"], "seq": 0})),
    )
    .await;
    let replayed = back["resume"]["replayed"].as_u64().expect("replayed");
    let mut dave_replay = Vec::new();
    for _ in 0..replayed {
        dave_replay.push(recv_json(&mut dave).await);
    }
    Seen {
        acks,
        bob: bob_msgs,
        carol: carol_msgs,
        dave_welcome_resume: back["resume"].clone(),
        dave_replay,
    }
}

/// The same burst on both paths gives the same acks (ids in order, the
/// same lists, the same duplicates), the same deliveries (seqs, `mid`s,
/// payloads, in order) and the same resume; and each server took the path
/// it was meant to.
#[tokio::test]
async fn sends_at_once_answer_exactly_as_the_async_path() {
    let (fast, fast_backend) = server(true).await;
    let (slow, slow_backend) = server(false).await;
    let at_once = run_burst(&fast, &fast_backend).await;
    let awaited = run_burst(&slow, &slow_backend).await;

    // Sanity of the burst itself, so that the comparison covers what it
    // claims: every category and duplicates occur.
    for (n, ack) in at_once.acks.iter().enumerate() {
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["id"], n as u64, "acks in order: {ack}");
        assert!(ack.get("error").is_none(), "{ack}");
    }
    let has = |key: &str, value: Value| {
        at_once
            .acks
            .iter()
            .any(|ack| ack[key].as_array().is_some_and(|l| l.contains(&value)))
    };
    assert!(has("delivered", json!("bob")) && has("delivered", json!("carol")));
    assert!(has("offline", json!("dave")) && has("retained", json!("dave")));
    assert!(has("offline", json!(7)) && has("offline", json!("eve")));
    let duplicates = at_once
        .acks
        .iter()
        .filter(|ack| ack["duplicate"] == true)
        .count();
    assert_eq!(duplicates, (0..BURST).filter(|n| n % 9 == 8).count());
    // dave was sent more than his inbox keeps (256): the oldest are lost.
    assert_eq!(at_once.dave_welcome_resume["status"], "partial");
    assert_eq!(at_once.dave_replay.len(), 256);
    // bob's seqs run 1, 2, 3, … with no hole.
    for (i, msg) in at_once.bob.iter().enumerate() {
        assert_eq!(msg["seq"], i as u64 + 1, "{msg}");
    }

    for (what, a, b) in [
        ("ack", &at_once.acks, &awaited.acks),
        ("bob's delivery", &at_once.bob, &awaited.bob),
        ("carol's delivery", &at_once.carol, &awaited.carol),
    ] {
        assert_eq!(a.len(), b.len(), "{what}s: as many on both paths");
        // The first difference only: a whole burst is too long to read.
        if let Some((i, (a, b))) = a.iter().zip(b).enumerate().find(|(_, (a, b))| a != b) {
            panic!("{what} {i} differs: at once {a}, awaited {b}");
        }
    }
    assert_eq!(at_once.dave_welcome_resume, awaited.dave_welcome_resume);
    assert_eq!(at_once.dave_replay, awaited.dave_replay);

    // Only the frames in another field order (not taken by the one-pass
    // parser) went the async way on the fast server; every send did on the
    // other.
    let reordered = (0..BURST).filter(|n| n % 50 == 49 && n % 9 != 8).count();
    assert_eq!(fast_backend.async_sends.load(Ordering::Relaxed), reordered);
    let not_duplicates = (0..BURST).filter(|n| n % 9 != 8).count();
    assert_eq!(
        slow_backend.async_sends.load(Ordering::Relaxed),
        not_duplicates
    );
}
