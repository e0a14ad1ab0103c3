//! HTTP: serving a router ([`serve()`] and friends: the accept loop, the
//! connection cap, graceful shutdown), upgrading requests to WebSockets
//! ([`ws`]: the handshake and the security checks that run before it),
//! JSON bodies for every HTTP error ([`json_errors()`]), and TLS.

pub(crate) mod deadline;
mod host;
mod json_errors;
mod serve;
#[cfg(feature = "tls")]
pub mod tls;
mod upgrade;

pub use json_errors::json_errors;
pub use serve::{DEFAULT_SHUTDOWN_TIMEOUT, ServeOptions, serve, serve_with, serve_with_options};
pub use upgrade::ws;
