//! Run with: cargo run -p switchboard --example chat [-- ADDR]
//! (from the repository root or any folder in it).
//!
//! A chat room: every connection joins the topic `lobby` when it connects,
//! and every text message it sends is broadcast to the whole topic, the
//! sender included. Open two browser tabs at <http://127.0.0.1:3000/> (a
//! page from this server: Chromium blocks `ws://127.0.0.1` from other sites
//! and from `about:blank`) and paste into each console:
//!
//! ```js
//! const ws = new WebSocket("ws://127.0.0.1:3000/chat");
//! ws.onmessage = (e) => console.log(e.data);
//! ws.onopen = () => ws.send("hello, room");
//! ```
//!
//! The message is encoded once with [`Hub::encode_text`] and the same bytes
//! are queued to every member. Leaving the topic happens by itself when the
//! connection ends. The server listens on `127.0.0.1:3000`, or on the
//! address given as the first argument, and stops on Ctrl-C.

use switchboard::{Conn, Handler, HttpError, Hub, Limits, Message, Outcome, Router, Topic, ws};

/// Broadcasts every text message to everyone in `topic`.
struct Chat {
    topic: Topic,
}

impl Handler for Chat {
    type State = ();
    type Info = ();

    /// Join the room before the upgrade; messages published meanwhile are
    /// queued until the socket opens.
    async fn connect(
        &self,
        _req: &http::request::Parts,
        conn: &mut Conn<()>,
    ) -> Result<(), HttpError> {
        // Refused only past `limits.max_topics_per_connection`, which a new
        // connection cannot be.
        conn.join(self.topic.clone()).map_err(|err| {
            HttpError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "too_many_topics",
                err.to_string(),
            )
        })?;
        Ok(())
    }

    async fn on_message(&self, _state: &mut (), msg: Message, conn: &mut Conn<()>) -> Outcome {
        match msg {
            Message::Text(text) => {
                // Encode once; every member gets the same shared bytes.
                let frame = Hub::encode_text(text.into_bytes());
                conn.hub().publish(&self.topic, &frame).await;
                Outcome::Continue
            }
            Message::Binary(_) => Outcome::reply_text("this room takes text messages only"),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());

    let hub = Hub::new(Limits::default());
    let chat = Chat {
        topic: Topic::new("lobby")?,
    };
    let app = Router::new().route("/chat", ws(hub.clone(), chat));

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    switchboard::serve(listener, app, hub, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
