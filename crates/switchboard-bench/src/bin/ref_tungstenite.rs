//! Reference server built on `tokio-tungstenite` with default settings, in
//! the style of that crate's examples (`accept_hdr_async`, a split stream,
//! one unbounded channel per connection, a mutex-protected peer map).
//!
//! Endpoints:
//! * `GET /echo` — echoes every text and binary message unchanged;
//! * `GET /ws?id=ID` — relay: a text message
//!   `{"targets":[ID, …],"payload":X}` is delivered as the JSON text of `X`
//!   to every connection registered under each target id (ids are integers or
//!   strings; `5` and `"5"` are the same id).
//!
//! Usage: `ref-tungstenite --listen 127.0.0.1:0`; prints
//! `listening on http://ADDR` once bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

type Tx = UnboundedSender<Message>;
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

enum Route {
    Echo,
    Relay(String),
}

fn route_of(req: &Request) -> Option<Route> {
    match req.uri().path() {
        "/echo" => Some(Route::Echo),
        "/ws" => req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("id="))
            .filter(|id| !id.is_empty())
            .map(|id| Route::Relay(id.to_string())),
        _ => None,
    }
}

async fn accept_connection(peers: PeerMap, stream: TcpStream, conn_no: u64) {
    let mut route = None;
    // The error type is fixed by tungstenite's `Callback` trait.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, response: Response| {
        route = route_of(req);
        if route.is_some() {
            Ok(response)
        } else {
            let mut err = ErrorResponse::new(Some("unknown path or missing id".into()));
            *err.status_mut() = StatusCode::NOT_FOUND;
            Err(err)
        }
    };
    let ws_stream = match tokio_tungstenite::accept_hdr_async(stream, callback).await {
        Ok(ws) => ws,
        Err(e) => {
            eprintln!("handshake failed: {e}");
            return;
        }
    };
    match route {
        Some(Route::Echo) => {
            let mut ws_stream = ws_stream;
            while let Some(Ok(msg)) = ws_stream.next().await {
                if (msg.is_text() || msg.is_binary()) && ws_stream.send(msg).await.is_err() {
                    break;
                }
            }
        }
        Some(Route::Relay(id)) => {
            let (tx, mut rx) = unbounded_channel();
            peers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(id.clone())
                .or_default()
                .insert(conn_no, tx);
            let (mut outgoing, mut incoming) = ws_stream.split();
            let forward = async {
                while let Some(msg) = rx.recv().await {
                    if outgoing.send(msg).await.is_err() {
                        break;
                    }
                }
            };
            let receive = async {
                while let Some(Ok(msg)) = incoming.next().await {
                    let Message::Text(text) = msg else { continue };
                    let Ok(frame) = serde_json::from_str::<RelayFrame<'_>>(text.as_str()) else {
                        continue;
                    };
                    let out = Message::text(frame.payload.get());
                    let peers = peers.lock().unwrap_or_else(|e| e.into_inner());
                    for target in frame.targets {
                        if let Some(conns) = peers.get(&id_key(target)) {
                            for tx in conns.values() {
                                let _ = tx.send(out.clone());
                            }
                        }
                    }
                }
            };
            tokio::select! {
                _ = forward => {}
                _ = receive => {}
            }
            let mut map = peers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(conns) = map.get_mut(&id) {
                conns.remove(&conn_no);
                if conns.is_empty() {
                    map.remove(&id);
                }
            }
        }
        None => {}
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

#[tokio::main]
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
        tokio::spawn(accept_connection(peers.clone(), stream, conn_no));
    }
}
