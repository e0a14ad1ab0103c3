//! The `switchboard.v1` protocol on `/ws` (docs/protocol-v1.md): a relay
//! client that opted in with the subprotocol `switchboard.v1` says hello,
//! resumes from its inbox, and gets exactly one answer per request.
//!
//! - [`request`]: the client's frames, parsed (the usual `send` first by
//!   `send_frame`, in one pass);
//! - [`reply`]: the server's answers, encoded;
//! - this module: what each request does, on the connection's own task.
//!
//! Messages *to* the client (`msg`, `pub`, `gap`) are written by the
//! runtime in the connection's v1 format (`runtime::delivery`), because they
//! are queued by other connections and never pass through this handler.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::app::relay::{RequestError, TargetName, Targets};
use crate::auth::Permissions;
use crate::backend::{Dedup, Immediate, PresenceMode, RegisterError, ResumePoint, TargetOutcomes};
use crate::handler::{Closed, Conn, Outcome};
use crate::hub::Hub;
use crate::id::{ClientId, Topic};
use crate::metrics::ErrorKind;
use crate::protocol::close::{CloseCode, CloseFrame};
use crate::protocol::frame::WireFrame;
use crate::runtime::delivery::{Envelope, Format, scratch_bytes, v1_error};

mod presence;
pub(crate) mod reply;
pub(crate) mod request;
mod send_frame;
mod send_scan;

use presence::Presence;
use request::{Kind, Request};

/// A v1 connection's state (boxed in the relay's state: plain connections
/// pay one pointer for it).
#[derive(Debug)]
pub(crate) struct V1 {
    client_id: ClientId,
    permissions: Arc<Permissions>,
    /// The hello was answered; until then only a hello is accepted.
    ready: bool,
    /// The client proved its ID with a token (so it may refresh it).
    authenticated: bool,
    presence: Presence,
}

impl V1 {
    /// Sets up a v1 connection in `connect`: writes in the v1 format and
    /// must say hello within `v1.hello_timeout`. It is not registered under
    /// its ID until then (the hello resumes its inbox first).
    pub(crate) fn connect(
        conn: &Conn<()>,
        client_id: ClientId,
        permissions: Arc<Permissions>,
        authenticated: bool,
        presence_meta: Option<Arc<str>>,
    ) -> Box<Self> {
        conn.set_format(Format::V1);
        let timeout = conn.hub().limits().v1.hello_timeout;
        conn.protocol_deadline(Some((
            tokio::time::Instant::now() + timeout,
            CloseFrame::new(
                CloseCode::BAD_HELLO,
                "no hello in time: a switchboard.v1 connection starts with {\"type\":\"hello\"}",
            ),
        )));
        Box::new(Self {
            presence: Presence::new(conn.hub(), client_id.clone(), conn.id(), presence_meta),
            client_id,
            permissions,
            ready: false,
            authenticated,
        })
    }

    /// The connection ended so: its presence memberships end now or after
    /// the leave delay (when this state is dropped).
    pub(crate) fn closed(&mut self, closed: &Closed) {
        self.presence.closed(closed);
    }

    /// Handles one text frame.
    pub(crate) async fn on_text(&mut self, text: &str, conn: &mut Conn<()>) -> Outcome {
        let hub = conn.hub();
        let max_targets = hub.limits().max_targets;
        let request = match send_frame::parse(text, max_targets)
            .map_or_else(|| request::parse(text, max_targets), Ok)
        {
            Ok(request) => request,
            Err(refused) if !self.ready => {
                return bad_hello(&format!(
                    "the first frame must be a valid hello: {}",
                    refused.error.message
                ));
            }
            Err(refused) => {
                hub.metrics().error(ErrorKind::BadRequest);
                return error(refused.id, &refused.error);
            }
        };
        let Request { id, kind } = request;
        if !self.ready {
            return match kind {
                Kind::Hello { resume } => self.hello(id, resume, conn).await,
                _ => bad_hello(
                    "the first frame of a switchboard.v1 connection must be {\"type\":\"hello\"}",
                ),
            };
        }
        match kind {
            Kind::Hello { .. } => bad_hello("hello was already answered on this connection"),
            Kind::Send {
                mid,
                targets,
                payload,
            } => self.send(id, mid.as_deref(), &targets, payload, conn).await,
            Kind::Publish { topic, payload } => self.publish(id, topic, payload, conn).await,
            Kind::Subscribe {
                topic,
                presence,
                meta,
            } => self.subscribe(id, topic, presence, meta, conn).await,
            Kind::Unsubscribe(topic) => {
                let was = conn.leave(&topic);
                self.presence.leave(&topic);
                ack(id, |out| reply::unsubscribed(out, &topic, was))
            }
            Kind::PresenceGet { topic, mode } => self.presence_get(id, topic, mode, conn).await,
            Kind::Replay { from, to } => self.replay(id, from, to, conn).await,
            Kind::Refresh { token } => self.refresh(id, &token, conn).await,
        }
    }

    /// [`on_text`](Self::on_text) for the frame that needs no await when
    /// the backend delivers at once (`immediate`, the in-memory backend):
    /// a `send`, once the hello is answered. Numbering, inbox, delivery,
    /// the `mid` lookup and the report happen in this one call, and the
    /// ack goes into the connection's own outgoing queue, so that the acks
    /// and deliveries of one read share its writes. `None`: anything else
    /// (another request, a frame `send_frame` does not take, no hello
    /// yet), for `on_text`.
    pub(crate) fn on_text_now(
        &mut self,
        text: &str,
        immediate: &dyn Immediate,
        conn: &Conn<()>,
    ) -> Option<Outcome> {
        if !self.ready {
            return None;
        }
        let hub = conn.hub();
        let max_targets = hub.limits().max_targets;
        // The scanner first (no serde); what it leaves, serde's one pass.
        let (id, mid, targets, payload) = match send_scan::scan(text, max_targets) {
            Some(send) => (
                send.id,
                send.mid.map(Cow::Borrowed),
                send.targets,
                send.payload,
            ),
            None => {
                let Request { id, kind } = send_frame::parse(text, max_targets)?;
                let Kind::Send {
                    mid,
                    targets,
                    payload,
                } = kind
                else {
                    return None;
                };
                (id, mid, targets, payload.get())
            }
        };
        let mid = mid.as_deref();
        if let Some(refusal) = forbidden_target(&self.permissions, &targets) {
            hub.metrics().error(ErrorKind::Forbidden);
            return Some(error(id, &refusal));
        }
        let mut pending = None;
        if let Some(mid) = mid {
            match immediate.dedup_now(&self.client_id, mid) {
                Dedup::New => pending = Some(DedupGuard::new(hub, &self.client_id, mid)),
                seen => return Some(not_new(id, mid, seen)),
            }
        }
        let message = self.message(mid, payload);
        let outcomes = hub.deliver_at_once(immediate, &targets.names(), &message);
        Some(sent(id, mid, &targets, &outcomes, pending))
    }

    /// The message of a send: the payload copied out of the read buffer,
    /// the sender, the `mid`.
    fn message(&self, mid: Option<&str>, payload: &str) -> Arc<Envelope> {
        Arc::new(
            Envelope::json(Bytes::copy_from_slice(payload.as_bytes()))
                .from(Some(self.client_id.clone()))
                .mid(mid),
        )
    }

    async fn hello(
        &mut self,
        id: Option<u64>,
        resume: Option<ResumePoint>,
        conn: &mut Conn<()>,
    ) -> Outcome {
        conn.protocol_deadline(None);
        let attached = match conn.attach(self.client_id.clone(), resume.as_ref()).await {
            Ok(attached) => attached,
            Err(RegisterError::AlreadyConnected(_)) => {
                return Outcome::Stop(CloseFrame::new(
                    CloseCode::ID_IN_USE,
                    "this client id is connected already and duplicate_ids is \"reject-new\"",
                ));
            }
            Err(RegisterError::Unavailable(_)) => {
                return Outcome::Stop(CloseFrame::new(
                    CloseCode::INBOX_UNAVAILABLE,
                    "the inbox store cannot be reached now: reconnect with backoff and resume",
                ));
            }
        };
        // The welcome and the replay go ahead of every live message that
        // reached the connection while they were read (its deliveries are
        // held until `release`).
        let mut front = Vec::with_capacity(1 + attached.replay.len());
        front.push(WireFrame::from_text(reply::welcome(
            id,
            &self.client_id,
            conn,
            &attached,
        )));
        front.extend(
            attached
                .replay
                .iter()
                .map(|r| r.envelope.frame_for(Format::V1, Some(r.seq))),
        );
        conn.release(front);
        self.ready = true;
        Outcome::Continue
    }

    async fn send(
        &mut self,
        id: Option<u64>,
        mid: Option<&str>,
        targets: &Targets<TargetName<'_>>,
        payload: &RawValue,
        conn: &mut Conn<()>,
    ) -> Outcome {
        let hub = conn.hub();
        if let Some(refusal) = forbidden_target(&self.permissions, targets) {
            hub.metrics().error(ErrorKind::Forbidden);
            return error(id, &refusal);
        }
        let mut pending = None;
        if let Some(mid) = mid {
            match hub.backend().dedup(&self.client_id, mid).await {
                Dedup::New => pending = Some(DedupGuard::new(hub, &self.client_id, mid)),
                seen => return not_new(id, mid, seen),
            }
        }
        let ids = targets.client_ids();
        let report = hub.deliver(&ids, &self.message(mid, payload.get())).await;
        let outcomes = TargetOutcomes::from_report(&report, targets.ids.len());
        sent(id, mid, targets, &outcomes, pending)
    }

    async fn publish(
        &mut self,
        id: Option<u64>,
        topic: Topic,
        payload: &RawValue,
        conn: &mut Conn<()>,
    ) -> Outcome {
        let hub = conn.hub();
        if !self.permissions.may_publish(&topic) {
            hub.metrics().error(ErrorKind::Forbidden);
            return error(id, &forbidden_topic("sb_publish", &topic));
        }
        let message = Envelope::json(Bytes::copy_from_slice(payload.get().as_bytes()))
            .from(Some(self.client_id.clone()))
            .on_topic(topic);
        let recipients = hub.publish_message(&Arc::new(message)).await;
        ack(id, |out| reply::published(out, recipients))
    }

    /// Subscribes, counts the connection as part of its client ID's
    /// membership of the topic, and with `presence` starts sending the
    /// topic's presence frames, answering with the snapshot they follow.
    async fn subscribe(
        &mut self,
        id: Option<u64>,
        topic: Topic,
        presence: Option<PresenceMode>,
        meta: Option<&RawValue>,
        conn: &mut Conn<()>,
    ) -> Outcome {
        let hub = conn.hub().clone();
        if !self.permissions.may_subscribe(&topic) {
            hub.metrics().error(ErrorKind::Forbidden);
            return error(id, &forbidden_topic("sb_subscribe", &topic));
        }
        if !hub.limits().v1.presence {
            if presence.is_some() || meta.is_some() {
                hub.metrics().error(ErrorKind::BadRequest);
                return error(id, &presence_disabled());
            }
            if let Err(err) = conn.join(topic.clone()) {
                hub.metrics().error(ErrorKind::TooManyTopics);
                return error(id, &RequestError::new("too_many_topics", err.to_string()));
            }
            return ack(id, |out| reply::subscribed(out, &topic, None));
        }
        let meta = match meta {
            Some(_) if !hub.limits().v1.presence_client_meta => {
                hub.metrics().error(ErrorKind::BadRequest);
                return error(
                    id,
                    &RequestError::new(
                        "client_meta_not_allowed",
                        "this server takes presence meta from the token's sb_presence claim only (v1.presence_client_meta is false): leave `meta` out",
                    ),
                );
            }
            Some(meta) => Some(Arc::from(meta.get())),
            None => self.presence.token_meta.clone(),
        };
        if let Err(err) = conn.join(topic.clone()) {
            hub.metrics().error(ErrorKind::TooManyTopics);
            return error(id, &RequestError::new("too_many_topics", err.to_string()));
        }
        self.presence.join(&topic, meta).await;
        let Some(mode) = presence else {
            return ack(id, |out| reply::subscribed(out, &topic, None));
        };
        let watcher = conn.conn_ref();
        match hub.backend().presence_watch(&topic, &watcher, mode).await {
            Some(snapshot) => {
                self.presence.watching(&topic);
                ack(id, |out| {
                    reply::subscribed(out, &topic, Some((&snapshot, mode)));
                })
            }
            None => {
                conn.leave(&topic);
                self.presence.leave(&topic);
                error(id, &presence_unavailable())
            }
        }
    }

    /// A fresh snapshot of `topic`'s presence (after a revision jump).
    async fn presence_get(
        &mut self,
        id: Option<u64>,
        topic: Topic,
        mode: PresenceMode,
        conn: &mut Conn<()>,
    ) -> Outcome {
        let hub = conn.hub();
        if !self.permissions.may_subscribe(&topic) {
            hub.metrics().error(ErrorKind::Forbidden);
            return error(id, &forbidden_topic("sb_subscribe", &topic));
        }
        if !hub.limits().v1.presence {
            hub.metrics().error(ErrorKind::BadRequest);
            return error(id, &presence_disabled());
        }
        match hub.backend().presence(&topic, mode).await {
            Some(snapshot) => ack(id, |out| reply::presence(out, &topic, &snapshot, mode)),
            None => error(id, &presence_unavailable()),
        }
    }

    async fn replay(
        &mut self,
        id: Option<u64>,
        from: u64,
        to: u64,
        conn: &mut Conn<()>,
    ) -> Outcome {
        let hub = conn.hub();
        let most = hub.limits().v1.inbox_size.max(1) as u64;
        if to - from >= most {
            hub.metrics().error(ErrorKind::BadRequest);
            return error(
                id,
                &RequestError::new(
                    "invalid_range",
                    format!(
                        "a replay covers at most {most} seqs (v1.inbox_size); split {from}..{to}"
                    ),
                ),
            );
        }
        let replay = hub.backend().replay(&self.client_id, from, to).await;
        let mut frames: Vec<WireFrame> = replay
            .messages
            .iter()
            .map(|r| r.envelope.frame_for(Format::V1, Some(r.seq)))
            .collect();
        let mut out = String::with_capacity(64);
        reply::ack_head(&mut out, id);
        reply::replayed(&mut out, replay.messages.len(), &replay.lost);
        frames.push(WireFrame::from_text(out));
        Outcome::SendMany(frames)
    }

    async fn refresh(&mut self, id: Option<u64>, token: &str, conn: &mut Conn<()>) -> Outcome {
        let hub = conn.hub();
        let security = hub.security();
        let Some(authenticator) = security
            .authenticator
            .as_ref()
            .filter(|_| self.authenticated)
        else {
            return error(
                id,
                &RequestError::new(
                    "refresh_not_supported",
                    "this connection did not authenticate with a token: there is nothing to refresh",
                ),
            );
        };
        let identity = match authenticator.refresh(token).await {
            Ok(identity) => identity,
            Err(refusal) => {
                hub.metrics().error(ErrorKind::Unauthorized);
                return error(id, &RequestError::new(refusal.code, refusal.message));
            }
        };
        if identity.client_id != self.client_id {
            hub.metrics().error(ErrorKind::Forbidden);
            return error(
                id,
                &RequestError::new(
                    "subject_mismatch",
                    format!(
                        "the new token is for {}, this connection is {}: a refresh keeps the same client id",
                        identity.client_id, self.client_id
                    ),
                ),
            );
        }
        let expires_at_ms = identity.expires_at.map(crate::backend::unix_ms);
        if let Some(expires_at) = identity.expires_at {
            let left = expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            conn.close_at(
                tokio::time::Instant::now() + left.saturating_add(security.expiry_grace),
                CloseFrame::new(
                    CloseCode::TOKEN_EXPIRED,
                    "token expired: reconnect with a new token",
                ),
            );
        }
        self.permissions = if identity.permissions.is_unrestricted() {
            Permissions::unrestricted()
        } else {
            Arc::clone(&identity.permissions)
        };
        ack(id, |out| reply::refreshed(out, expires_at_ms))
    }
}

/// An acknowledgement for request `id` whose fields `fields` writes; none
/// for a request without an id (it succeeded; nobody is waiting).
fn ack(id: Option<u64>, fields: impl FnOnce(&mut String)) -> Outcome {
    if id.is_none() {
        return Outcome::Continue;
    }
    Outcome::Send(WireFrame::text(scratch_bytes(|out| {
        reply::ack_head(out, id);
        fields(out);
        out.push('}');
    })))
}

/// A send's ack: the report's lists (recorded for its `mid` first, when
/// it has one). The usual send, without a `mid`, writes the lists straight
/// into the ack's frame.
fn sent(
    id: Option<u64>,
    mid: Option<&str>,
    targets: &Targets<TargetName<'_>>,
    outcomes: &TargetOutcomes,
    pending: Option<DedupGuard>,
) -> Outcome {
    if let Some(guard) = pending {
        let lists = targets.outcome_lists(outcomes);
        guard.done(&lists);
        return ack(id, |out| reply::sent(out, mid, &lists, false));
    }
    ack(id, |out| {
        reply::sent_head(out, mid);
        targets.write_outcome_lists(outcomes, out);
    })
}

/// The answer to a send whose `mid` was seen before: still in flight (a
/// temporary error), or done (its stored report, marked duplicate).
fn not_new(id: Option<u64>, mid: &str, seen: Dedup) -> Outcome {
    match seen {
        Dedup::Done(report) => ack(id, |out| reply::sent(out, Some(mid), &report, true)),
        // `New` is the caller's; were it to get here, "in flight" is the
        // answer that makes the client retry rather than lose its send.
        Dedup::InFlight | Dedup::New => error(
            id,
            &RequestError::new(
                "in_flight",
                "a send with this mid is being handled: wait for its ack",
            )
            .temporary(),
        ),
    }
}

/// A refused request: an ack with the error for a request with an id, an
/// `error` frame otherwise.
fn error(id: Option<u64>, error: &RequestError) -> Outcome {
    Outcome::reply_text(v1_error(id, error.code, &error.message, error.temporary))
}

fn bad_hello(reason: &str) -> Outcome {
    // A close reason is at most 123 bytes; `CloseFrame` cuts longer ones.
    Outcome::Stop(CloseFrame {
        code: CloseCode::BAD_HELLO,
        reason: std::borrow::Cow::Owned(reason.to_owned()),
    })
}

/// The first target the client's token does not allow, as the refusal.
fn forbidden_target(
    permissions: &Permissions,
    targets: &Targets<TargetName<'_>>,
) -> Option<RequestError> {
    if permissions.is_unrestricted() {
        return None;
    }
    let (i, target) = targets
        .ids
        .iter()
        .enumerate()
        .find(|(_, id)| !permissions.may_send_to(&id.to_client_id()))?;
    Some(RequestError::new(
        "forbidden_target",
        format!(
            "targets[{}] ({target}) is not allowed by the token's sb_targets claim; nothing was sent",
            targets.position_of(i)
        ),
    ))
}

fn presence_disabled() -> RequestError {
    RequestError::new(
        "presence_disabled",
        "this server keeps no presence (v1.presence is false): subscribe without `presence` and `meta`",
    )
}

fn presence_unavailable() -> RequestError {
    RequestError::new(
        "presence_unavailable",
        "the server cannot read presence now (its backend has none, or lost its backplane): retry later",
    )
    .temporary()
}

fn forbidden_topic(claim: &str, topic: &Topic) -> RequestError {
    RequestError::new(
        "forbidden_topic",
        format!(
            "the token's {claim} claim does not allow the topic {:?}",
            topic.as_str()
        ),
    )
}

/// Marks a send with a message id in flight until it is done; if the
/// connection ends first (the task dropped mid-send), the id is forgotten so
/// that the client's resend is not refused as in flight for `dedup_ttl`.
struct DedupGuard {
    hub: Hub,
    sender: ClientId,
    mid: Box<str>,
    armed: bool,
}

impl DedupGuard {
    fn new(hub: &Hub, sender: &ClientId, mid: &str) -> Self {
        Self {
            hub: hub.clone(),
            sender: sender.clone(),
            mid: Box::from(mid),
            armed: true,
        }
    }

    fn done(mut self, lists: &str) {
        self.hub
            .backend()
            .dedup_done(&self.sender, &self.mid, Arc::from(lists));
        self.armed = false;
    }
}

impl Drop for DedupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.hub.backend().dedup_abort(&self.sender, &self.mid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::NamePattern;

    /// Targets named by their text (numbers as digits) are checked against
    /// `sb_targets` as the IDs they name, and the refusal points at the
    /// first listing of the first forbidden one.
    #[test]
    fn forbidden_targets_are_found_by_their_text() {
        let patterns = ["bob", "team-*", "7"].map(|p| NamePattern::new(p).expect("pattern"));
        let permissions = Permissions {
            targets: Some(patterns.to_vec()),
            ..Permissions::default()
        };
        let allowed = send_frame::parse(
            r#"{"type":"send","targets":["bob",7,"team-a","7"],"payload":1}"#,
            10,
        )
        .expect("send");
        let Kind::Send { targets, .. } = allowed.kind else {
            panic!("not a send");
        };
        assert!(forbidden_target(&permissions, &targets).is_none());
        let refused = send_frame::parse(
            r#"{"type":"send","targets":["bob",8,"carol",8],"payload":1}"#,
            10,
        )
        .expect("send");
        let Kind::Send { targets, .. } = refused.kind else {
            panic!("not a send");
        };
        let error = forbidden_target(&permissions, &targets).expect("refused");
        assert_eq!(error.code, "forbidden_target");
        assert!(
            error.message.starts_with("targets[1] (8)"),
            "{}",
            error.message
        );
    }
}
