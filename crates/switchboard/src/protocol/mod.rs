//! The WebSocket wire protocol (RFC 6455): framing, close codes and the
//! opening handshake.

pub(crate) mod close;
pub(crate) mod deflate;
pub(crate) mod frame;
pub(crate) mod handshake;
