//! Topics across nodes: one shard channel per topic, subscribed while this
//! node has a local subscriber.

use std::borrow::Cow;

use super::wire::{Header, Kind};
use super::{BATCH, Session, Shared};
use crate::id::Topic;
use crate::runtime::delivery::Envelope;

impl Shared {
    pub(super) async fn publish_remote(&self, topic: &Topic, message: &Envelope) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let link = self.link()?;
        let (request, mut rx, _guard) = self.register_request();
        let mut header = Header::new(Kind::Pub, request, &link.member);
        header.b = message.is_binary();
        header.s = message.sender().map(|s| Cow::Borrowed(s.as_str()));
        header.m = message.message_id().map(Cow::Borrowed);
        let message = header.encode(message.payload());
        self.count_published(Kind::Pub, 1);
        let mut conn = link.conn.clone();
        let mut command = ::redis::cmd("SPUBLISH");
        command.arg(self.keys.topic_channel(topic)).arg(message);
        let publish = command.query_async::<i64>(&mut conn);
        let receivers = tokio::time::timeout_at(deadline, publish)
            .await
            .ok()?
            .ok()?;
        let expected = usize::try_from(receivers).unwrap_or(0);
        let replies = self.collect(&mut rx, expected, deadline).await;
        if replies.len() < expected {
            self.stats.unconfirmed_publishes.add(1);
        }
        Some(replies.iter().map(|r| r.count).sum())
    }
}

/// Makes the topic subscriptions match the local subscribers of `topics`.
/// One channel per `SSUBSCRIBE`, so that each command has one answer.
pub(super) async fn subscribe_topics(
    shared: &Shared,
    session: &mut Session,
    topics: Vec<Topic>,
) -> Result<(), ::redis::RedisError> {
    let mut conn = session.link.conn.clone();
    for chunk in topics.chunks(BATCH) {
        let mut pipe = ::redis::pipe();
        let mut changes = Vec::new();
        for topic in chunk {
            let want = shared.local.has_topic(topic);
            let have = session.subscribed.contains(topic);
            if want != have {
                let command = if want { "SSUBSCRIBE" } else { "SUNSUBSCRIBE" };
                pipe.cmd(command)
                    .arg(shared.keys.topic_channel(topic))
                    .ignore();
                changes.push((topic.clone(), want));
            }
        }
        if changes.is_empty() {
            continue;
        }
        pipe.exec_async(&mut conn).await?;
        for (topic, subscribed) in changes {
            if subscribed {
                session.subscribed.insert(topic);
            } else {
                session.subscribed.remove(&topic);
            }
        }
    }
    Ok(())
}
