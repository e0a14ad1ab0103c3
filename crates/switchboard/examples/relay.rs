//! Run with: cargo run -p switchboard --example relay [-- ADDR]
//! (from the repository root or any folder in it).
//!
//! The ID relay in a few lines. A client connects to `/ws?id=N` and is
//! registered under `N`; a text frame
//!
//! ```json
//! {"targets":[2,3],"payload":{"hi":"there"}}
//! ```
//!
//! delivers the JSON text of `payload` (`{"hi":"there"}`) to every
//! connection of clients 2 and 3. Offline targets are ignored; a frame that
//! cannot be read gets an `{"error":…}` reply and the connection stays open.
//!
//! The payload is never re-serialized: serde_json's `RawValue` keeps the
//! exact text the sender wrote, and it is encoded into one frame shared by
//! every recipient. The built-in `switchboard::handlers::Relay` is the
//! full version (topics, target limits, detailed error codes).
//!
//! The server listens on `127.0.0.1:3000`, or on the address given as the
//! first argument, and stops on Ctrl-C.

use http::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;
use switchboard::{ClientId, Conn, Handler, HttpError, Hub, Limits, Message, Outcome, Router, ws};

/// `{"targets":[…],"payload":X}`; targets are numbers or strings.
#[derive(Deserialize)]
struct Envelope<'a> {
    targets: Vec<serde_json::Value>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

struct Relay;

impl Handler for Relay {
    type State = ();
    type Info = ();

    /// Reads `?id=N` and registers the connection under it; a request
    /// without a valid ID is refused with HTTP 400 before the upgrade.
    async fn connect(
        &self,
        req: &http::request::Parts,
        conn: &mut Conn<()>,
    ) -> Result<(), HttpError> {
        let id = req
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|pair| pair.strip_prefix("id="))
            .ok_or_else(|| {
                HttpError::new(StatusCode::BAD_REQUEST, "missing_id", "connect to /ws?id=N")
            })?;
        let id = ClientId::new(id).map_err(|err| {
            HttpError::new(StatusCode::BAD_REQUEST, "invalid_id", err.to_string())
        })?;
        conn.register(id)
            .map_err(|err| HttpError::new(StatusCode::CONFLICT, "id_in_use", err.to_string()))
        // The registration is undone by itself when the connection ends.
    }

    async fn on_message(&self, _state: &mut (), msg: Message, conn: &mut Conn<()>) -> Outcome {
        let Message::Text(text) = msg else {
            return error("send JSON text frames");
        };
        let envelope: Envelope<'_> = match serde_json::from_str(text.as_str()) {
            Ok(envelope) => envelope,
            Err(err) => {
                return error(&format!(
                    "expected {{\"targets\":[…],\"payload\":…}}: {err}"
                ));
            }
        };
        let mut targets = Vec::with_capacity(envelope.targets.len());
        for target in &envelope.targets {
            let id = match target {
                serde_json::Value::Number(n) => ClientId::new(&n.to_string()),
                serde_json::Value::String(s) => ClientId::new(s),
                _ => return error("each target is a number or a string"),
            };
            match id {
                Ok(id) => targets.push(id),
                Err(err) => return error(&err.to_string()),
            }
        }
        // Encode once; every connection of every target gets the same bytes.
        let frame = Hub::encode_text(envelope.payload.get().to_owned());
        conn.hub().send(&targets, &frame).await;
        Outcome::Continue
    }
}

/// The error frame a sender gets back: `{"error":{"code":…,"message":…}}`.
fn error(message: &str) -> Outcome {
    let body = serde_json::json!({"error": {"code": "bad_request", "message": message}});
    Outcome::reply_text(body.to_string())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());

    let hub = Hub::new(Limits::default());
    let app = Router::new().route("/ws", ws(hub.clone(), Relay));

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    switchboard::serve(listener, app, hub, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
