//! The WebSocket wire protocol: framing (RFC 6455 §5), close codes (§7),
//! the opening handshake (§4), permessage-deflate (RFC 7692), and the
//! complete messages handlers see. The lowest layer: it imports nothing
//! else from the crate except the JSON error type of a refused handshake.

pub(crate) mod close;
pub(crate) mod deflate;
pub(crate) mod frame;
pub(crate) mod handshake;
pub(crate) mod message;
pub(crate) mod shared_copy;
