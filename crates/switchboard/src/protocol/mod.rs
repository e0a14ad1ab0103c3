//! The WebSocket wire protocol (RFC 6455): framing, close codes and the
//! opening handshake.

pub(crate) mod close;
#[allow(dead_code, unreachable_pub)] // wired into the runtime in the next commit
pub(crate) mod deflate;
pub(crate) mod frame;
pub(crate) mod handshake;
