//! The [`Handler`] trait: what a WebSocket endpoint does, as callbacks that
//! return an [`Outcome`].
//!
//! ```
//! use switchboard::{Conn, Handler, HttpError, Message, Outcome};
//!
//! /// Nova's echo handler: replies `Echo: <msg>` to every text.
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type State = ();
//!     type Info = ();
//!
//!     async fn connect(&self, _req: &http::request::Parts, _conn: &mut Conn<()>) -> Result<(), HttpError> {
//!         Ok(())
//!     }
//!
//!     async fn on_message(&self, _state: &mut (), msg: Message, _conn: &mut Conn<()>) -> Outcome {
//!         match msg {
//!             Message::Text(text) => Outcome::reply_text(format!("Echo: {text}")),
//!             Message::Binary(_) => Outcome::Continue,
//!         }
//!     }
//! }
//! ```
//!
//! # Lifecycle
//!
//! 1. [`connect`](Handler::connect) runs on the HTTP request, before the
//!    upgrade. Return the connection's state, or an [`HttpError`] to refuse
//!    the client with that status and a JSON body. The connection's
//!    mailbox exists already, so it may register an ID or join topics here;
//!    messages sent to it are queued until the socket opens.
//! 2. [`on_open`](Handler::on_open) runs once the socket is open.
//! 3. [`on_message`](Handler::on_message) runs for every text or binary
//!    message, [`on_info`](Handler::on_info) for every message sent through
//!    a [`ConnHandle`](crate::ConnHandle), one at a time and in order, on the
//!    connection's own task.
//! 4. [`on_close`](Handler::on_close) runs once when the connection ends,
//!    unless a callback panicked. Registrations are undone after it.
//!
//! A callback that panics closes only its own connection, with 1011.

use std::future::Future;

use crate::http_error::HttpError;
use crate::protocol::close::CloseFrame;
use crate::protocol::message::Message;

mod conn;
mod outcome;
pub(crate) mod session;

pub use conn::{Conn, TooManyTopics};
pub use outcome::Outcome;

/// How a connection ended, as told to [`Handler::on_close`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Closed {
    /// The client sent a close frame (its code and reason, if it sent one).
    ByClient(Option<CloseFrame>),
    /// The server closed it with this frame: a handler `Stop`, a protocol
    /// error, shutdown, the API, or a full queue.
    ByServer(CloseFrame),
    /// The TCP connection ended without a close handshake (reset, EOF,
    /// keepalive timeout).
    Abnormal(String),
}

/// The subprotocol the upgrade agreed on, one of the handler's
/// [`SUBPROTOCOLS`](Handler::SUBPROTOCOLS); in the request's extensions
/// when one was agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subprotocol(pub &'static str);

impl std::fmt::Display for Closed {
    /// `by client: 1000 "bye"`, `by server: 1001 "server shutting down"`,
    /// `abnormally: <why>`: what a log line should say.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ByClient(Some(frame)) => {
                write!(f, "by client: {} {:?}", frame.code.0, frame.reason)
            }
            Self::ByClient(None) => f.write_str("by client, without a status code"),
            Self::ByServer(frame) => {
                write!(f, "by server: {} {:?}", frame.code.0, frame.reason)
            }
            Self::Abnormal(why) => write!(f, "abnormally: {why}"),
        }
    }
}

/// A WebSocket endpoint's behaviour.
///
/// Mount one with [`ws`](crate::ws) on any axum route. Callbacks are
/// `async fn`s in your `impl`; each returns an [`Outcome`].
pub trait Handler: Send + Sync + 'static {
    /// The WebSocket subprotocols this endpoint speaks, most preferred
    /// first. The upgrade answers with the first one the client offered and
    /// tells `connect` which (the [`Subprotocol`] in the request's
    /// extensions). Default: none. A browser passing its token as a
    /// `bearer.<jwt>` subprotocol needs one to be answered with.
    const SUBPROTOCOLS: &'static [&'static str] = &[];

    /// Per-connection state, owned by the connection's task.
    type State: Send + 'static;
    /// Messages other parts of the program send to one connection through
    /// its [`ConnHandle`](crate::ConnHandle).
    type Info: Send + 'static;

    /// Accepts (returning the state) or refuses the upgrade request.
    fn connect(
        &self,
        request: &http::request::Parts,
        conn: &mut Conn<Self::Info>,
    ) -> impl Future<Output = Result<Self::State, HttpError>> + Send;

    /// The socket is open. Default: nothing.
    fn on_open(
        &self,
        state: &mut Self::State,
        conn: &mut Conn<Self::Info>,
    ) -> impl Future<Output = Outcome> + Send {
        let _ = (state, conn);
        async { Outcome::Continue }
    }

    /// A complete text or binary message arrived.
    fn on_message(
        &self,
        state: &mut Self::State,
        message: Message,
        conn: &mut Conn<Self::Info>,
    ) -> impl Future<Output = Outcome> + Send;

    /// The fast path of [`on_message`](Self::on_message), for a handler
    /// that can often answer without awaiting anything: handles `message`
    /// at once and returns `Ok(outcome)`, or hands it back unhandled as
    /// `Err(message)`, and then `on_message` gets it. The default hands
    /// every message back.
    ///
    /// Why: `on_message`'s future is boxed, so that the connection's task
    /// stays small while idle — one allocation and a round of polling per
    /// message. A message handled here costs neither, and the connection
    /// wakes the connections it queued frames to once per read instead of
    /// once per message (measured on the relay: 9.24 → 2.24 allocations
    /// per relayed message, see `tests/allocations.rs`).
    ///
    /// Must do what `on_message` would, in the same order: the connection
    /// calls exactly one of the two for each message.
    fn on_message_now(
        &self,
        state: &mut Self::State,
        message: Message,
        conn: &mut Conn<Self::Info>,
    ) -> Result<Outcome, Message> {
        let _ = (state, conn);
        Err(message)
    }

    /// A message arrived through a [`ConnHandle`](crate::ConnHandle).
    /// Default: nothing.
    fn on_info(
        &self,
        state: &mut Self::State,
        info: Self::Info,
        conn: &mut Conn<Self::Info>,
    ) -> impl Future<Output = Outcome> + Send {
        let _ = (state, info, conn);
        async { Outcome::Continue }
    }

    /// The connection ended. Default: nothing.
    fn on_close(
        &self,
        state: Self::State,
        closed: &Closed,
        conn: &mut Conn<Self::Info>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (state, closed, conn);
        async {}
    }
}
