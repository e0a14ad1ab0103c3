//! The handlers behind the server's built-in endpoints: [`Relay`] on `/ws`,
//! [`Echo`] on `/echo` and [`Chat`] on `/chat`. They use only the public
//! [`Handler`] API, so they double as examples.

use std::collections::HashMap;

use axum::extract::Query;
use bytes::Bytes;
use http::StatusCode;
use http::request::Parts;

use crate::conn::Conn;
use crate::handler::Handler;
use crate::http_error::HttpError;
use crate::hub::{Hub, RegisterError};
use crate::id::{ClientId, Topic};
use crate::message::{Message, Outcome};
use crate::metrics::ErrorKind;
use crate::relay::{self, Request, RequestError};

/// `/echo`: sends every text and binary message back unchanged (the
/// payload is shared, not copied).
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

impl Handler for Echo {
    type State = ();
    type Info = ();

    async fn connect(&self, _: &Parts, _: &mut Conn<()>) -> Result<(), HttpError> {
        Ok(())
    }

    async fn on_message(&self, _: &mut (), message: Message, _: &mut Conn<()>) -> Outcome {
        Outcome::Reply(message)
    }
}

/// The topic `/chat` clients share. Relay clients may subscribe to it and
/// `/api/publish` may publish to it.
pub const CHAT_TOPIC: &str = "chat";

/// `/chat`: every text message is broadcast to every `/chat` connection,
/// the sender included. Binary messages get an error frame.
#[derive(Debug, Clone)]
pub struct Chat {
    topic: Topic,
}

impl Default for Chat {
    fn default() -> Self {
        Self::new(CHAT_TOPIC)
    }
}

impl Chat {
    /// A chat over `topic`.
    ///
    /// # Panics
    /// If `topic` is not a valid topic name; it is a constant in code.
    pub fn new(topic: &str) -> Self {
        #[allow(clippy::expect_used)]
        let topic = Topic::new(topic).expect("chat topic must be a valid topic name");
        Self { topic }
    }
}

impl Handler for Chat {
    type State = ();
    type Info = ();

    async fn connect(&self, _: &Parts, conn: &mut Conn<()>) -> Result<(), HttpError> {
        conn.join(self.topic.clone());
        Ok(())
    }

    async fn on_message(&self, _: &mut (), message: Message, conn: &mut Conn<()>) -> Outcome {
        match message {
            Message::Text(text) => {
                let frame = Hub::encode_text(text.into_bytes());
                conn.hub().publish(&self.topic, &frame).await;
                Outcome::Continue
            }
            Message::Binary(_) => error_reply(
                conn.hub(),
                &RequestError::new(
                    "binary_not_supported",
                    "/chat broadcasts text frames only; send text",
                ),
            ),
        }
    }
}

/// `/ws?id=N`: the relay. Registers the connection under `N`; delivers
/// `{"targets":[…],"payload":X}` as the JSON text of `X` to every
/// connection of each target, and handles topic frames (see
/// [`relay`](crate::relay) for the protocol). Offline targets are ignored;
/// `/api/send` reports them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Relay;

impl Handler for Relay {
    type State = ();
    type Info = ();

    async fn connect(&self, request: &Parts, conn: &mut Conn<()>) -> Result<(), HttpError> {
        let id = client_id_from_query(request)?;
        conn.register(id).map_err(|err| match err {
            RegisterError::AlreadyConnected(_) => {
                HttpError::new(StatusCode::CONFLICT, "id_in_use", err.to_string())
            }
        })
    }

    async fn on_message(&self, _: &mut (), message: Message, conn: &mut Conn<()>) -> Outcome {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return error_reply(
                    conn.hub(),
                    &RequestError::new(
                        "binary_not_supported",
                        "/ws takes JSON text frames: {\"targets\":[…],\"payload\":…}",
                    ),
                );
            }
        };
        let request = match relay::parse(text.as_bytes(), conn.hub().limits().max_targets) {
            Ok(request) => request,
            Err(err) => return error_reply(conn.hub(), &err),
        };
        match request {
            Request::Send { targets, payload } => {
                let frame = Hub::encode_text(Bytes::copy_from_slice(payload.get().as_bytes()));
                conn.hub().send(&targets.ids, &frame).await;
                Outcome::Continue
            }
            Request::Publish { topic, payload } => {
                let frame = Hub::encode_text(Bytes::copy_from_slice(payload.get().as_bytes()));
                conn.hub().publish(&topic, &frame).await;
                Outcome::Continue
            }
            Request::Subscribe(topic) => {
                let ack = serde_json::json!({ "subscribed": topic.as_str() }).to_string();
                conn.join(topic);
                Outcome::reply_text(ack)
            }
            Request::Unsubscribe(topic) => {
                conn.leave(&topic);
                let ack = serde_json::json!({ "unsubscribed": topic.as_str() }).to_string();
                Outcome::reply_text(ack)
            }
        }
    }
}

/// Reads and checks `?id=` of an upgrade request.
pub fn client_id_from_query(request: &Parts) -> Result<ClientId, HttpError> {
    let query: Query<HashMap<String, String>> =
        Query::try_from_uri(&request.uri).map_err(|err| {
            HttpError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!(
                    "the query string could not be read ({err}): connect to /ws?id=<client id>"
                ),
            )
        })?;
    let raw = query.get("id").ok_or_else(|| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            "missing_id",
            "`id` is missing: connect to /ws?id=<client id>",
        )
    })?;
    ClientId::new(raw).map_err(|err| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("invalid `id`: {err}"),
        )
    })
}

fn error_reply(hub: &Hub, err: &RequestError) -> Outcome {
    hub.metrics().error(ErrorKind::BadRequest);
    Outcome::reply_text(err.to_json())
}
