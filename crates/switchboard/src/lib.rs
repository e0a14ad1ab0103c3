//! # Switchboard
//!
//! Real-time WebSocket messaging for Rust: write a [`Handler`] whose
//! callbacks return an [`Outcome`], mount it on an axum [`Router`] next to
//! your HTTP routes, and reach any connection from anywhere through the
//! [`Hub`]: by client ID, by topic, or by a typed [`ConnHandle`].
//!
//! ## Quickstart
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use switchboard::{Conn, Handler, HttpError, Hub, Limits, Message, Outcome, ws};
//!
//! /// Replies `Echo: <msg>` to every text message.
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type State = u64; // messages seen on this connection
//!     type Info = ();
//!
//!     async fn connect(&self, _req: &http::request::Parts, _conn: &mut Conn<()>) -> Result<u64, HttpError> {
//!         Ok(0)
//!     }
//!
//!     async fn on_message(&self, seen: &mut u64, msg: Message, _conn: &mut Conn<()>) -> Outcome {
//!         *seen += 1;
//!         match msg {
//!             Message::Text(text) => Outcome::reply_text(format!("Echo: {text}")),
//!             Message::Binary(_) => Outcome::Continue,
//!         }
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::io::Result<()> {
//!     let hub = Hub::new(Limits::default());
//!     let app = Router::new()
//!         .route("/echo", ws(hub.clone(), Echo))
//!         .route("/", get(|| async { "hello" }));
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     switchboard::serve(listener, app, hub, async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await
//! }
//! ```
//!
//! ## The pieces
//!
//! - [`Handler`] — `connect` (accept with state, or refuse with an
//!   [`HttpError`]), `on_open`, `on_message`, `on_info`, `on_close`; each
//!   returns an [`Outcome`]: continue, reply, or stop with a [`CloseFrame`].
//! - [`Conn`] — the connection as its handler sees it: [`Conn::register`]
//!   an ID, [`Conn::join`] a topic, hand out a [`ConnHandle`] for `Info`
//!   messages. Everything is undone when the connection ends.
//! - [`Hub`] — shared by all connections: [`Hub::send`] to IDs,
//!   [`Hub::publish`] to topics, metrics, limits; behind it a [`Backend`]
//!   ([`MemoryBackend`] by default).
//! - [`ws`] mounts a handler on a route; [`serve`] runs a router with a
//!   connection cap and graceful shutdown ([`serve_with_options`] adds
//!   TLS, see [`tls`]); [`app()`] is the complete `switchboard` server
//!   (relay, echo, chat, API, metrics).
//! - [`Security`] (set with [`Hub::builder`]) — client authentication
//!   ([`auth::Authenticator`], JWT built in), origin allow-list, API keys,
//!   trusted proxies: see [`auth`].
//!
//! ## Limits and close codes
//!
//! Every limit is a field of [`Limits`], documented with its default and
//! memory cost. Close codes are listed on [`CloseCode`].

// The layers, bottom up (docs/architecture.md): each module imports only
// from the ones above it in this list.
mod app;
pub mod auth;
mod backend;
#[doc(hidden)]
pub mod fuzzing;
pub mod handler;
mod http;
mod http_error;
mod hub;
mod id;
mod limits;
mod metrics;
mod protocol;
mod query;
mod runtime;

pub use app::{api, app, handlers, openapi, relay};
pub use auth::Security;
#[cfg(feature = "redis")]
pub use backend::redis::{self, RedisBackend, RedisConfig};
pub use backend::{
    Attached, Backend, BackendHealth, ClientInfo, DEFAULT_PAGE_LIMIT, Dedup, Departure, Immediate,
    MAX_META_BYTES, MAX_PAGE_LIMIT, NodeInfo, Page, PageQuery, PresenceMember, PresenceMode,
    PresenceSnapshot, RegisterError, Replay, ResumePoint, ResumeStatus, Retained, SendCounts,
    SendReport, TargetOutcome, TargetOutcomes, TopicInfo, memory::MemoryBackend,
};
pub use handler::{Closed, Conn, Handler, Outcome, Subprotocol, TooManyTopics};
#[cfg(feature = "tls")]
pub use http::tls;
pub use http::{
    DEFAULT_SHUTDOWN_TIMEOUT, ServeOptions, json_errors, serve, serve_with, serve_with_options, ws,
};
pub use http_error::HttpError;
pub use hub::refusals::Refusal;
pub use hub::{DrainReport, Hub, HubBuilder};
pub use id::{ClientId, MAX_NAME_LEN, NameError, Topic};
pub use limits::{DrainLimits, DuplicateIds, Limits, SlowConsumer, V1Limits, duration};
pub use metrics::{Counter, ErrorKind, Metrics};
pub use protocol::close::{CloseCode, CloseFrame};
pub use protocol::deflate::Compression;
pub use protocol::frame::WireFrame;
pub use protocol::message::{Message, Text};
pub use runtime::delivery::Envelope;
pub use runtime::mailbox::{ConnHandle, ConnId, ConnRef, PushError};

/// A boxed future, as returned by [`Backend`]'s and
/// [`Authenticator`](auth::Authenticator)'s asynchronous methods.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

#[doc(no_inline)]
pub use axum::Router;

/// The README's Rust examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
