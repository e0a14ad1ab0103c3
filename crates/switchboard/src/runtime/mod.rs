//! The connection runtime: the parts of a WebSocket connection that know
//! nothing of client IDs, topics or handlers.
//!
//! - [`mailbox`]: a connection's bounded outgoing queue and the handles
//!   that reach it ([`ConnRef`](mailbox::ConnRef) for backends,
//!   [`ConnHandle`](mailbox::ConnHandle) for typed `Info` messages);
//! - [`reader`]: bytes in → messages and control frames, with the size
//!   limits, UTF-8 checks and inflation;
//! - [`writer`]: queued frames → as few system calls as possible;
//! - [`rate`]: the per-connection message rate limit;
//! - [`wakes`]: wake-ups of recipients deferred to the end of a sender's
//!   batch;
//! - [`wheel`]: one coarse timer wheel for every connection's keepalive.
//!
//! The task that runs a connection with these parts and calls its handler
//! is one layer up, in `handler::session`, because it needs the hub.

pub(crate) mod delivery;
pub(crate) mod mailbox;
pub(crate) mod rate;
pub(crate) mod reader;
pub(crate) mod wakes;
pub(crate) mod wheel;
pub(crate) mod writer;
