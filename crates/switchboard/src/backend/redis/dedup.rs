//! `mid` idempotency across nodes: a sender's message id lives in Redis
//! (`P:{id:<sender>}:mid:<mid>`, in the sender's slot), so a resend through
//! another node finds the first send's report.
//!
//! | value | meaning | expires |
//! |---|---|---|
//! | empty | the first send is being handled | after [`in_flight_ttl`](Shared::in_flight_ttl): a node that dies mid-send does not block the resend for long |
//! | the report | done | after `dedup_ttl` |
//!
//! One `SET … NX GET PX` both claims a new id and reads a known one. While
//! the node cannot reach Redis, ids are deduplicated on this node only.

use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::backend::{Backend as _, Dedup};
use crate::id::ClientId;

impl Shared {
    /// How long a claimed id stays "in flight" without its report: a send
    /// waits at most one request timeout for Redis and one for the other
    /// nodes, so three leave room for a slow one.
    fn in_flight_ttl(&self) -> Duration {
        (self.config.request_timeout * 3).max(Duration::from_secs(1))
    }

    pub(super) async fn dedup_begin(&self, sender: &ClientId, mid: &str) -> Dedup {
        let Some(link) = self.link() else {
            return self.local.dedup(sender, mid).await;
        };
        let mut conn = link.conn.clone();
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(self.keys.mid(sender.as_str(), mid))
            .arg("")
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(self.in_flight_ttl().as_millis() as u64);
        let claim = cmd.query_async::<Option<String>>(&mut conn);
        match tokio::time::timeout(self.config.request_timeout, claim).await {
            Ok(Ok(None)) => Dedup::New,
            Ok(Ok(Some(report))) if report.is_empty() => Dedup::InFlight,
            Ok(Ok(Some(report))) => Dedup::Done(Arc::from(report)),
            _ => self.local.dedup(sender, mid).await,
        }
    }

    pub(super) fn dedup_record(&self, sender: &ClientId, mid: &str, report: Option<Arc<str>>) {
        match &report {
            Some(report) => self.local.dedup_done(sender, mid, Arc::clone(report)),
            None => self.local.dedup_abort(sender, mid),
        }
        let Some(link) = self.link() else {
            return;
        };
        let key = self.keys.mid(sender.as_str(), mid);
        let ttl = self.dedup_ttl.as_millis() as u64;
        let timeout = self.config.request_timeout;
        tokio::spawn(async move {
            let mut conn = link.conn.clone();
            let cmd = match &report {
                Some(report) => {
                    let mut cmd = ::redis::cmd("SET");
                    cmd.arg(&key).arg(report.as_ref()).arg("PX").arg(ttl.max(1));
                    cmd
                }
                None => {
                    let mut cmd = ::redis::cmd("DEL");
                    cmd.arg(&key);
                    cmd
                }
            };
            let write = cmd.exec_async(&mut conn);
            if !matches!(tokio::time::timeout(timeout, write).await, Ok(Ok(()))) {
                tracing::warn!(%key, "could not record a mid in redis");
            }
        });
    }
}
