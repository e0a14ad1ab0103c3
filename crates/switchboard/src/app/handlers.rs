//! The handlers behind the server's built-in endpoints: [`Relay`] on `/ws`,
//! [`Echo`] on `/echo` and [`Chat`] on `/chat`. They use only the public
//! [`Handler`] API, so they double as examples.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http::request::Parts;

use super::relay::{self, Request, RequestError};
use super::v1::V1;
use crate::auth::{Identity, Permissions, SUBPROTOCOL_PLAIN, SUBPROTOCOL_V1};
use crate::backend::RegisterError;
use crate::handler::{Closed, Conn, Handler, Outcome, Subprotocol};
use crate::http_error::HttpError;
use crate::hub::Hub;
use crate::id::{ClientId, Topic};
use crate::metrics::ErrorKind;
use crate::protocol::frame::WireFrame;
use crate::protocol::message::Message;
use crate::protocol::shared_copy::shared_copy;
use crate::runtime::delivery::{Envelope, Format, v1_error};

/// `/echo`: sends every text and binary message back unchanged (the
/// payload is shared, not copied).
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

impl Handler for Echo {
    const SUBPROTOCOLS: &'static [&'static str] = &[SUBPROTOCOL_PLAIN];

    type State = ();
    type Info = ();

    async fn connect(&self, _: &Parts, _: &mut Conn<()>) -> Result<(), HttpError> {
        Ok(())
    }

    async fn on_message(&self, _: &mut (), message: Message, _: &mut Conn<()>) -> Outcome {
        Outcome::Reply(message)
    }

    /// Every message is answered at once: no boxed future per message.
    fn on_message_now(
        &self,
        _: &mut (),
        message: Message,
        _: &mut Conn<()>,
    ) -> Result<Outcome, Message> {
        Ok(Outcome::Reply(message))
    }
}

/// The topic `/chat` clients share. Relay clients may subscribe to it and
/// `/api/publish` may publish to it.
pub const CHAT_TOPIC: &str = "chat";

/// `/chat`: every text message is broadcast to every `/chat` connection,
/// the sender included. Binary messages get an error frame.
///
/// The topic carries JSON, like every topic: a `/chat` client's text `T` is
/// published as the JSON string `"T"`, so relay subscribers of the topic
/// get valid JSON. `/chat` clients get text back: a JSON string published
/// to the topic (by `/chat`, a relay client or `/api/publish`) as its text,
/// any other JSON value as its JSON text.
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
    const SUBPROTOCOLS: &'static [&'static str] = &[SUBPROTOCOL_PLAIN];

    /// Whether the client may send (its token's `sb_publish` allows the
    /// topic).
    type State = bool;
    type Info = ();

    async fn connect(&self, request: &Parts, conn: &mut Conn<()>) -> Result<bool, HttpError> {
        let permissions = request
            .extensions
            .get::<Identity>()
            .map(|identity| &identity.permissions);
        if let Some(permissions) = permissions
            && !permissions.may_subscribe(&self.topic)
        {
            conn.hub().metrics().error(ErrorKind::Forbidden);
            return Err(HttpError::new(
                StatusCode::FORBIDDEN,
                "forbidden_topic",
                format!(
                    "the token's sb_subscribe claim does not allow the topic {:?}",
                    self.topic.as_str()
                ),
            ));
        }
        conn.set_format(Format::Text);
        // A new connection has joined nothing, so the topic limit cannot
        // refuse this; were it to, the upgrade is refused rather than the
        // client left outside the chat.
        conn.join(self.topic.clone()).map_err(|err| {
            conn.hub().metrics().error(ErrorKind::TooManyTopics);
            HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_topics",
                err.to_string(),
            )
        })?;
        Ok(permissions.is_none_or(|p| p.may_publish(&self.topic)))
    }

    async fn on_message(
        &self,
        may_publish: &mut bool,
        message: Message,
        conn: &mut Conn<()>,
    ) -> Outcome {
        match message {
            Message::Text(_) if !*may_publish => forbidden(
                conn.hub(),
                "forbidden_topic",
                format!(
                    "the token's sb_publish claim does not allow the topic {:?}",
                    self.topic.as_str()
                ),
            ),
            Message::Text(text) => {
                let json = serde_json::Value::from(text.as_str()).to_string();
                let message = Envelope::json(Bytes::from(json)).on_topic(self.topic.clone());
                conn.hub().publish_message(&Arc::new(message)).await;
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
/// [`relay`] for the protocol). Offline targets are ignored;
/// `/api/send` reports them.
///
/// With an authenticator on the hub the ID is the [`Identity`]'s (a JWT's
/// `sub`), never the client's choice: `?id=` may be left out; if given, it
/// must be the same ID, or the upgrade is refused with 403 `id_mismatch`.
/// The identity's [`Permissions`] then restrict targets and topics: a frame
/// they do not allow is answered with the error frame `forbidden_target`
/// or `forbidden_topic` and not handled.
#[derive(Debug, Clone, Copy, Default)]
pub struct Relay;

/// A relay connection's state: the client's permissions (shared by all
/// unrestricted clients), and for a `switchboard.v1` connection its
/// protocol state, boxed: 16 bytes per plain connection.
#[derive(Debug)]
pub struct RelayState {
    permissions: Arc<Permissions>,
    v1: Option<Box<V1>>,
}

impl RelayState {
    /// An unrestricted plain relay connection's state.
    #[cfg(test)]
    pub(crate) fn plain() -> Self {
        Self {
            permissions: Permissions::unrestricted(),
            v1: None,
        }
    }
}

impl Handler for Relay {
    /// `switchboard.v1` when offered, else the plain relay (also chosen
    /// explicitly with `switchboard.plain`, by browsers passing a token).
    const SUBPROTOCOLS: &'static [&'static str] = &[SUBPROTOCOL_V1, SUBPROTOCOL_PLAIN];

    type State = RelayState;
    type Info = ();

    async fn connect(
        &self,
        request: &Parts,
        conn: &mut Conn<()>,
    ) -> Result<Self::State, HttpError> {
        let identity = request.extensions.get::<Identity>();
        let id = match identity {
            Some(identity) => {
                if let Some(asked) = query_param(request, "id")?
                    && asked != identity.client_id.as_str()
                {
                    conn.hub().metrics().error(ErrorKind::Forbidden);
                    return Err(HttpError::new(
                        StatusCode::FORBIDDEN,
                        "id_mismatch",
                        format!(
                            "`id` {:?} is not the client id your token proves ({}): leave `id` out",
                            asked.chars().take(40).collect::<String>(),
                            identity.client_id
                        ),
                    ));
                }
                identity.client_id.clone()
            }
            None => client_id_from_query(request)?,
        };
        let permissions = match identity {
            Some(identity) if !identity.permissions.is_unrestricted() => {
                Arc::clone(&identity.permissions)
            }
            _ => Permissions::unrestricted(),
        };
        if request.extensions.get::<Subprotocol>() == Some(&Subprotocol(SUBPROTOCOL_V1)) {
            // Registered by its hello, which resumes its inbox first.
            let v1 = V1::connect(
                conn,
                id,
                Arc::clone(&permissions),
                identity.is_some(),
                identity.and_then(|identity| identity.presence_meta.clone()),
            );
            return Ok(RelayState {
                permissions,
                v1: Some(v1),
            });
        }
        conn.register_cluster_wide(id)
            .await
            .map_err(|err| match err {
                RegisterError::AlreadyConnected(_) => {
                    HttpError::new(StatusCode::CONFLICT, "id_in_use", err.to_string())
                }
                RegisterError::Unavailable(_) => HttpError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "backend_unavailable",
                    err.to_string(),
                ),
            })?;
        Ok(RelayState {
            permissions,
            v1: None,
        })
    }

    async fn on_message(
        &self,
        state: &mut Self::State,
        message: Message,
        conn: &mut Conn<()>,
    ) -> Outcome {
        if let Some(v1) = state.v1.as_mut() {
            return match message {
                Message::Text(text) => v1.on_text(text.as_str(), conn).await,
                Message::Binary(_) => {
                    conn.hub().metrics().error(ErrorKind::BadRequest);
                    Outcome::reply_text(v1_error(
                        None,
                        "binary_not_supported",
                        "switchboard.v1 frames are JSON text",
                        false,
                    ))
                }
            };
        }
        let request = match plain_request(&state.permissions, &message, conn.hub()) {
            Ok(request) => request,
            Err(refusal) => return refusal,
        };
        match request {
            Request::Send { targets, payload } => {
                // A backend that waits (Redis) keeps the IDs.
                conn.hub()
                    .send(&targets.client_ids(), &payload_frame(payload))
                    .await;
                Outcome::Continue
            }
            Request::Publish { topic, payload } => {
                conn.hub().publish(&topic, &payload_frame(payload)).await;
                Outcome::Continue
            }
            other => topic_request(other, conn),
        }
    }

    /// The relay when the backend can answer without waiting (the
    /// in-memory one; the Redis one for plain sends whose targets its
    /// location cache places on this node or nowhere): the whole frame is
    /// handled here, without `on_message`'s boxed future. Plain sends look
    /// their targets up by text (no `ClientId`s) and make no report;
    /// `switchboard.v1` sends on the in-memory backend are numbered,
    /// delivered and acknowledged in one call (`V1::on_text_now`). Other
    /// v1 requests, and every frame a backend must wait for, go to
    /// `on_message`.
    fn on_message_now(
        &self,
        state: &mut Self::State,
        message: Message,
        conn: &mut Conn<()>,
    ) -> Result<Outcome, Message> {
        if let Some(v1) = state.v1.as_mut() {
            let Some(immediate) = conn.hub().backend().immediate() else {
                return Err(message);
            };
            let Message::Text(text) = &message else {
                return Err(message);
            };
            return match v1.on_text_now(text.as_str(), immediate, conn) {
                Some(outcome) => Ok(outcome),
                None => Err(message),
            };
        }
        // `None`: a backend that may wait (Redis, when its location cache
        // does not answer for every target; its publishes) handles the
        // frame in `on_message`, which parses it again.
        let handled = {
            let hub = conn.hub();
            let request = match plain_request(&state.permissions, &message, hub) {
                Ok(request) => request,
                Err(refusal) => return Ok(refusal),
            };
            match request {
                Request::Send { targets, payload } => {
                    let names = targets.names();
                    hub.backend().immediate_send(&names).map(|immediate| {
                        hub.send_at_once(immediate, &names, payload_frame(payload));
                        Outcome::Continue
                    })
                }
                Request::Publish { topic, payload } => hub.backend().immediate().map(|immediate| {
                    hub.publish_at_once(immediate, &topic, payload_frame(payload));
                    Outcome::Continue
                }),
                other => Some(topic_request(other, conn)),
            }
        };
        handled.ok_or(message)
    }

    /// A v1 connection's presence memberships end now or after the leave
    /// delay, depending on how it closed (`V1::closed`); they end when the
    /// state is dropped, right after this.
    async fn on_close(&self, mut state: Self::State, closed: &Closed, _: &mut Conn<()>) {
        if let Some(v1) = state.v1.as_mut() {
            v1.closed(closed);
        }
    }
}

/// A plain relay frame, parsed and allowed; or the error frame that
/// answers it.
fn plain_request<'a>(
    permissions: &Permissions,
    message: &'a Message,
    hub: &Hub,
) -> Result<Request<'a>, Outcome> {
    let text = match message {
        Message::Text(text) => text,
        Message::Binary(_) => {
            return Err(error_reply(
                hub,
                &RequestError::new(
                    "binary_not_supported",
                    "/ws takes JSON text frames: {\"targets\":[…],\"payload\":…}",
                ),
            ));
        }
    };
    let request = relay::parse_text(text.as_str(), hub.limits().max_targets)
        .map_err(|err| error_reply(hub, &err))?;
    if !permissions.is_unrestricted()
        && let Some(refusal) = refuse(permissions, &request, hub)
    {
        return Err(refusal);
    }
    Ok(request)
}

/// The frame of a relayed payload: the sender's exact JSON text, copied
/// out of the read buffer (sharing it would keep the whole read alive for
/// as long as the slowest recipient holds the frame), in one allocation
/// that every recipient's frame shares (`shared_copy`).
fn payload_frame(payload: &str) -> WireFrame {
    Hub::encode_text(shared_copy(payload.as_bytes()))
}

/// A subscribe or unsubscribe frame, answered.
fn topic_request(request: Request<'_>, conn: &mut Conn<()>) -> Outcome {
    match request {
        Request::Subscribe(topic) => match conn.join(topic.clone()) {
            Ok(_) => {
                Outcome::reply_text(serde_json::json!({ "subscribed": topic.as_str() }).to_string())
            }
            Err(err) => {
                conn.hub().metrics().error(ErrorKind::TooManyTopics);
                Outcome::reply_text(RequestError::new("too_many_topics", err.to_string()).to_json())
            }
        },
        Request::Unsubscribe(topic) => {
            conn.leave(&topic);
            let ack = serde_json::json!({ "unsubscribed": topic.as_str() }).to_string();
            Outcome::reply_text(ack)
        }
        // Sends and publishes are the callers' own.
        Request::Send { .. } | Request::Publish { .. } => Outcome::Continue,
    }
}

/// The first error frame the client's permissions call for, if any.
fn refuse(permissions: &Permissions, request: &Request<'_>, hub: &Hub) -> Option<Outcome> {
    let (code, message) = match request {
        Request::Send { targets, .. } => {
            let (i, target) = targets
                .ids
                .iter()
                .enumerate()
                .find(|(_, id)| !permissions.may_send_to(&id.to_client_id()))?;
            let i = targets.position_of(i);
            (
                "forbidden_target",
                format!(
                    "targets[{i}] ({target}) is not allowed by the token's sb_targets claim; nothing was sent"
                ),
            )
        }
        Request::Subscribe(topic) if !permissions.may_subscribe(topic) => (
            "forbidden_topic",
            format!(
                "the token's sb_subscribe claim does not allow the topic {:?}",
                topic.as_str()
            ),
        ),
        Request::Publish { topic, .. } if !permissions.may_publish(topic) => (
            "forbidden_topic",
            format!(
                "the token's sb_publish claim does not allow the topic {:?}",
                topic.as_str()
            ),
        ),
        _ => return None,
    };
    Some(forbidden(hub, code, message))
}

fn forbidden(hub: &Hub, code: &'static str, message: String) -> Outcome {
    hub.metrics().error(ErrorKind::Forbidden);
    Outcome::reply_text(
        serde_json::json!({"error": {"code": code, "message": message}}).to_string(),
    )
}

/// The value of query parameter `name`, if present; 400 `invalid_query`
/// if it is given twice.
fn query_param(request: &Parts, name: &str) -> Result<Option<String>, HttpError> {
    crate::query::param(&request.uri, name)
}

/// Reads and checks `?id=` of an upgrade request: 400 `missing_id`,
/// `invalid_id`, or `invalid_query` (`id` given twice, or a query string
/// that cannot be decoded).
pub fn client_id_from_query(request: &Parts) -> Result<ClientId, HttpError> {
    let raw = query_param(request, "id")?.ok_or_else(|| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            "missing_id",
            "`id` is missing: connect to /ws?id=<client id>",
        )
    })?;
    ClientId::new(&raw).map_err(|err| {
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
