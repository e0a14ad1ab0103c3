//! Shared test support: a real server on 127.0.0.1:0 and a real WebSocket
//! client (tokio-tungstenite).
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use switchboard::{Hub, Limits, Router};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(5);

/// A server started in this process on a free loopback port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub hub: Hub,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// The complete `switchboard` app with default limits.
    pub async fn start() -> Self {
        Self::with_limits(Limits::default()).await
    }

    pub async fn with_limits(limits: Limits) -> Self {
        let hub = Hub::new(limits);
        let app = switchboard::app(hub.clone());
        Self::with_router(hub, app).await
    }

    pub async fn with_router(hub: Hub, router: Router) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(switchboard::serve_with(
            listener,
            router,
            hub.clone(),
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        Self {
            addr,
            hub,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn connect(&self, path: &str) -> Client {
        let (client, response) = tokio_tungstenite::connect_async(self.url(path))
            .await
            .unwrap_or_else(|e| panic!("connect to {path}: {e}"));
        assert_eq!(response.status(), 101);
        client
    }

    /// Starts graceful shutdown and waits for `serve` to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("serve returns within its shutdown timeout")
                .expect("serve task")
                .expect("serve result");
        }
    }

    /// Waits until `cond` holds, polling; panics after `WAIT`.
    pub async fn eventually(&self, what: &str, mut cond: impl FnMut(&Hub) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond(&self.hub) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting: {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The next data message, skipping pings; panics on timeout or close.
pub async fn recv(client: &mut Client) -> WsMessage {
    loop {
        let next = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a message within the timeout")
            .expect("stream still open")
            .expect("no websocket error");
        match next {
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => return other,
        }
    }
}

pub async fn recv_text(client: &mut Client) -> String {
    match recv(client).await {
        WsMessage::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

pub async fn recv_json(client: &mut Client) -> serde_json::Value {
    let text = recv_text(client).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts nothing arrives for `quiet`.
pub async fn assert_silent(client: &mut Client, quiet: Duration) {
    match tokio::time::timeout(quiet, client.next()).await {
        Err(_) => {}
        Ok(other) => panic!("expected silence, got {other:?}"),
    }
}

/// Waits for the close frame and returns it.
pub async fn recv_close(client: &mut Client) -> Option<CloseFrame> {
    loop {
        let next = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a close within the timeout");
        match next {
            Some(Ok(WsMessage::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

pub async fn send_text(client: &mut Client, text: &str) {
    client
        .send(WsMessage::text(text.to_owned()))
        .await
        .expect("send");
}
