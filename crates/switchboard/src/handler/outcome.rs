//! [`Outcome`]: what a handler callback returns.

use crate::protocol::close::CloseFrame;
use crate::protocol::frame::WireFrame;
use crate::protocol::message::{Message, Text};

/// What a handler callback asks the connection to do next.
///
/// This is the `{:ok, state}` / `{:reply, frames, state}` /
/// `{:stop, reason, state}` of `cowboy_websocket` and `WebSock`, with the
/// state kept by `&mut` instead of returned.
#[derive(Debug)]
#[must_use = "an outcome does nothing unless returned to the connection"]
pub enum Outcome {
    /// Keep going; send nothing.
    Continue,
    /// Send one message to this client.
    Reply(Message),
    /// Send several messages, in order.
    ReplyMany(Vec<Message>),
    /// Send an already-encoded frame (see [`crate::Hub::encode_text`]).
    Send(WireFrame),
    /// Send several already-encoded frames, in order.
    SendMany(Vec<WireFrame>),
    /// Send the close frame and end the connection (RFC 6455 §7.1.2).
    Stop(CloseFrame),
}

impl Outcome {
    /// Replies with a text message.
    pub fn reply_text(text: impl Into<Text>) -> Self {
        Self::Reply(Message::text(text))
    }
}
