//! Run with: cargo run -p switchboard --example echo [-- ADDR]
//! (from the repository root or any folder in it).
//!
//! Nova's echo tutorial: a [`Handler`] that replies `Echo: <msg>` to every
//! text message it receives. Connect with any WebSocket client, e.g. from the
//! console of a browser tab at <http://127.0.0.1:3000/> (a page from this
//! server: Chromium blocks `ws://127.0.0.1` from other sites):
//!
//! ```js
//! const ws = new WebSocket("ws://127.0.0.1:3000/echo");
//! ws.onmessage = (e) => console.log(e.data); // "Echo: hello"
//! ws.onopen = () => ws.send("hello");
//! ```
//!
//! The server listens on `127.0.0.1:3000`, or on the address given as the
//! first argument (`127.0.0.1:0` picks a free port), and stops on Ctrl-C.

use switchboard::{Conn, Handler, HttpError, Hub, Limits, Message, Outcome, Router, ws};

/// Replies `Echo: <msg>` to every text message; ignores binary ones.
struct Echo;

impl Handler for Echo {
    // Nothing to remember between messages.
    type State = ();
    // Nobody sends this connection typed messages.
    type Info = ();

    /// Runs before the upgrade: accept everyone.
    async fn connect(
        &self,
        _req: &http::request::Parts,
        _conn: &mut Conn<()>,
    ) -> Result<(), HttpError> {
        Ok(())
    }

    async fn on_message(&self, _state: &mut (), msg: Message, _conn: &mut Conn<()>) -> Outcome {
        match msg {
            Message::Text(text) => Outcome::reply_text(format!("Echo: {text}")),
            Message::Binary(_) => Outcome::Continue,
        }
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());

    let hub = Hub::new(Limits::default());
    let app = Router::new().route("/echo", ws(hub.clone(), Echo));

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    switchboard::serve(listener, app, hub, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
