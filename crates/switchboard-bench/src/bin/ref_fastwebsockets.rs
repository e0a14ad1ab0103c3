//! Reference server built on `fastwebsockets` with the hyper 1 upgrade, in
//! the style of that crate's examples (`upgrade::upgrade`, a
//! `FragmentCollector` for echo, `split` + `FragmentCollectorRead` for the
//! relay, tasks spawned with `tokio::task::unconstrained`).
//!
//! Endpoints:
//! * `GET /echo` — echoes every text and binary message unchanged;
//! * `GET /ws?id=ID` — relay: a text message
//!   `{"targets":[ID, …],"payload":X}` is delivered as the JSON text of `X`
//!   to every connection registered under each target id (ids are integers or
//!   strings; `5` and `"5"` are the same id).
//!
//! Usage: `ref-fastwebsockets --listen 127.0.0.1:0`; prints
//! `listening on http://ADDR` once bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fastwebsockets::{
    FragmentCollector, FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError, upgrade,
};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

/// What a connection's writer task sends.
enum Out {
    /// A relayed text message.
    Text(Bytes),
    /// A control frame the reader is obliged to send (pong, close).
    Control(OpCode, Vec<u8>),
}

type Tx = UnboundedSender<Out>;
/// id → (connection number → sender).
type PeerMap = Arc<Mutex<HashMap<String, HashMap<u64, Tx>>>>;

#[derive(Deserialize)]
struct RelayFrame<'a> {
    #[serde(borrow)]
    targets: Vec<&'a RawValue>,
    payload: &'a RawValue,
}

/// A target id as a map key: strings without quotes, numbers as written.
fn id_key(raw: &RawValue) -> String {
    match serde_json::from_str::<String>(raw.get()) {
        Ok(s) => s,
        Err(_) => raw.get().to_string(),
    }
}

async fn echo(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = FragmentCollector::new(fut.await?);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
    Ok(())
}

async fn relay(
    fut: upgrade::UpgradeFut,
    peers: PeerMap,
    id: String,
    conn_no: u64,
) -> Result<(), WebSocketError> {
    let ws = fut.await?;
    let (rx, mut tx) = ws.split(tokio::io::split);
    let mut rx = FragmentCollectorRead::new(rx);
    let (out_tx, mut out_rx) = unbounded_channel::<Out>();
    peers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(id.clone())
        .or_default()
        .insert(conn_no, out_tx.clone());

    let writer = tokio::spawn(async move {
        while let Some(out) = out_rx.recv().await {
            let result = match out {
                Out::Text(bytes) => tx.write_frame(Frame::text(Payload::Borrowed(&bytes))).await,
                Out::Control(opcode, payload) => {
                    tx.write_frame(Frame::new(true, opcode, None, Payload::Owned(payload)))
                        .await
                }
            };
            if result.is_err() {
                break;
            }
        }
    });

    let result = async {
        loop {
            let obligated = out_tx.clone();
            let frame = rx
                .read_frame::<_, WebSocketError>(&mut move |frame: Frame<'_>| {
                    let sent = obligated.send(Out::Control(frame.opcode, frame.payload.to_vec()));
                    async move {
                        sent.map_err(|_| WebSocketError::ConnectionClosed)?;
                        Ok(())
                    }
                })
                .await?;
            match frame.opcode {
                OpCode::Close => break,
                OpCode::Text => {
                    let Ok(msg) = serde_json::from_slice::<RelayFrame<'_>>(&frame.payload) else {
                        continue;
                    };
                    let out = Bytes::copy_from_slice(msg.payload.get().as_bytes());
                    let peers = peers.lock().unwrap_or_else(|e| e.into_inner());
                    for target in msg.targets {
                        if let Some(conns) = peers.get(&id_key(target)) {
                            for tx in conns.values() {
                                let _ = tx.send(Out::Text(out.clone()));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok::<(), WebSocketError>(())
    }
    .await;

    {
        let mut map = peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conns) = map.get_mut(&id) {
            conns.remove(&conn_no);
            if conns.is_empty() {
                map.remove(&id);
            }
        }
    }
    drop(out_tx);
    let _ = writer.await;
    result
}

fn query_id(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("id="))
        .filter(|id| !id.is_empty())
        .map(str::to_string)
}

async fn server_upgrade(
    mut req: Request<Incoming>,
    peers: PeerMap,
    conn_no: u64,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let path = req.uri().path().to_string();
    let id = query_id(&req);
    let not_found = || {
        let mut r = Response::new(Empty::new());
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    };
    match (path.as_str(), id) {
        ("/echo", _) => {
            let (response, fut) = upgrade::upgrade(&mut req)?;
            tokio::task::spawn(async move {
                if let Err(e) = tokio::task::unconstrained(echo(fut)).await {
                    eprintln!("error in websocket connection: {e}");
                }
            });
            Ok(response)
        }
        ("/ws", Some(id)) => {
            let (response, fut) = upgrade::upgrade(&mut req)?;
            tokio::task::spawn(async move {
                if let Err(e) = tokio::task::unconstrained(relay(fut, peers, id, conn_no)).await {
                    eprintln!("error in websocket connection: {e}");
                }
            });
            Ok(response)
        }
        ("/heartbeat", _) => Ok(Response::new(Empty::new())),
        _ => Ok(not_found()),
    }
}

fn listen_addr() -> String {
    let mut args = std::env::args().skip(1);
    let mut addr = "127.0.0.1:8080".to_string();
    while let Some(a) = args.next() {
        if a == "--listen" {
            if let Some(v) = args.next() {
                addr = v;
            }
        } else if let Some(v) = a.strip_prefix("--listen=") {
            addr = v.to_string();
        }
    }
    addr
}

// A current-thread runtime, as in fastwebsockets' own examples
// (`examples/echo_server.rs`); `compare` pins every server to one CPU anyway.
// scripts/reference-check.sh holds this server against that example (issue
// #15, target 6): with TCP_NODELAY set on both, echo per server CPU-second
// came out 0.98-1.00x of the example's (busy machine, 3 rounds of 3 s).
// Without TCP_NODELAY (the example as published) Nagle's algorithm
// coalesces the 8 in-flight echoes of a connection into fewer segments,
// which made the example ~2.4x this server at 8 in flight (0.42x the other
// way) and ~1.15x at 1; every server compared here sets TCP_NODELAY
// (uWebSockets always does, Switchboard does), so this one keeps it.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let listener = TcpListener::bind(listen_addr()).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let peers = PeerMap::default();
    let counter = AtomicU64::new(0);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: keep serving.
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn_no = counter.fetch_add(1, Ordering::Relaxed);
        let peers = peers.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn_fut = http1::Builder::new()
                .serve_connection(
                    io,
                    service_fn(move |req| server_upgrade(req, peers.clone(), conn_no)),
                )
                .with_upgrades();
            if let Err(e) = conn_fut.await {
                eprintln!("connection error: {e:?}");
            }
        });
    }
}
