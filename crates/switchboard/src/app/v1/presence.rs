//! What a v1 connection takes part in of presence (docs/protocol-v1.md,
//! "Presence"): the topics it counts as a member of, the topics whose
//! presence frames it watches, and how it left — undone when the
//! connection's state is dropped, however the connection ended (a
//! callback that panicked skips `on_close`, not this).

use std::collections::HashSet;
use std::sync::Arc;

use crate::backend::Departure;
use crate::handler::Closed;
use crate::hub::Hub;
use crate::id::{ClientId, Topic};
use crate::protocol::close::CloseCode;
use crate::runtime::mailbox::ConnId;

/// A v1 connection's part in presence.
#[derive(Debug)]
pub(crate) struct Presence {
    hub: Hub,
    client: ClientId,
    conn: ConnId,
    /// The meta of the client's token (`sb_presence`), if any.
    pub(crate) token_meta: Option<Arc<str>>,
    member_of: TopicSet,
    watching: TopicSet,
    /// How the connection's memberships end when it is dropped: delayed
    /// unless `on_close` saw a close that means "gone for good".
    departure: Departure,
}

impl Presence {
    pub(crate) fn new(
        hub: &Hub,
        client: ClientId,
        conn: ConnId,
        token_meta: Option<Arc<str>>,
    ) -> Self {
        Self {
            hub: hub.clone(),
            client,
            conn,
            token_meta,
            member_of: TopicSet::default(),
            watching: TopicSet::default(),
            departure: Departure::Delayed,
        }
    }

    /// Counts the connection as part of the member in `topic`.
    pub(crate) async fn join(&mut self, topic: &Topic, meta: Option<Arc<str>>) {
        if self.member_of.insert(topic) {
            self.hub
                .backend()
                .presence_join(topic, &self.client, meta)
                .await;
        }
    }

    /// Records that the connection watches `topic` (the backend was told).
    pub(crate) fn watching(&mut self, topic: &Topic) {
        self.watching.insert(topic);
    }

    /// The connection left `topic` on purpose: its membership ends now.
    pub(crate) fn leave(&mut self, topic: &Topic) {
        let backend = self.hub.backend();
        if self.watching.remove(topic) {
            backend.presence_unwatch(topic, self.conn);
        }
        if self.member_of.remove(topic) {
            backend.presence_leave(topic, &self.client, Departure::Now);
        }
    }

    /// Sets how the connection's memberships end, from how it closed.
    pub(crate) fn closed(&mut self, closed: &Closed) {
        self.departure = departure(closed);
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        let backend = self.hub.backend();
        for topic in self.watching.iter() {
            backend.presence_unwatch(topic, self.conn);
        }
        for topic in self.member_of.iter() {
            backend.presence_leave(topic, &self.client, self.departure);
        }
    }
}

/// A connection's topics (of membership or watching): a list searched by
/// comparing names while it holds at most [`FEW_TOPICS`], a hash set
/// beyond. Most connections are in a few topics, and comparing a few short
/// names costs less than one SipHash of one (callgrind, subscribe churn:
/// the set's hashing was 150 of presence's 2,770 instructions per
/// subscribe+unsubscribe pair).
#[derive(Debug, Default)]
struct TopicSet {
    few: Vec<Topic>,
    /// All the topics, once there were more than `FEW_TOPICS` (`few` is
    /// empty then).
    many: Option<HashSet<Topic>>,
}

/// Up to how many topics a [`TopicSet`] is a list.
const FEW_TOPICS: usize = 8;

impl TopicSet {
    /// Adds `topic`; returns whether it was not there.
    fn insert(&mut self, topic: &Topic) -> bool {
        if let Some(many) = &mut self.many {
            return many.insert(topic.clone());
        }
        if self.few.contains(topic) {
            return false;
        }
        if self.few.len() < FEW_TOPICS {
            self.few.push(topic.clone());
            return true;
        }
        let mut many: HashSet<Topic> = self.few.drain(..).collect();
        many.insert(topic.clone());
        self.many = Some(many);
        true
    }

    /// Removes `topic`; returns whether it was there.
    fn remove(&mut self, topic: &Topic) -> bool {
        if let Some(many) = &mut self.many {
            return many.remove(topic);
        }
        match self.few.iter().position(|t| t == topic) {
            Some(at) => {
                self.few.swap_remove(at);
                true
            }
            None => false,
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Topic> + '_ {
        self.few.iter().chain(self.many.iter().flatten())
    }
}

/// How a connection that ended so leaves presence: at once when the client
/// said it is done (close 1000) or the server put it out for good (4000 by
/// the API, 4400–4499 "do not reconnect unchanged"); after the leave delay
/// for everything else — resets, EOF without a close, keepalive timeouts,
/// slow-consumer closes (4100), server shutdown and drain (1001, 1012),
/// a replaced connection (4001), an expired token (4002), a browser's page
/// reload (1001 from the client).
pub(crate) fn departure(closed: &Closed) -> Departure {
    match closed {
        Closed::ByClient(Some(frame)) if frame.code == CloseCode::NORMAL => Departure::Now,
        Closed::ByServer(frame)
            if frame.code == CloseCode::DISCONNECTED || (4400..=4499).contains(&frame.code.0) =>
        {
            Departure::Now
        }
        _ => Departure::Delayed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::close::CloseFrame;

    #[test]
    fn a_topic_set_is_a_set_below_and_above_its_list_size() {
        let mut set = TopicSet::default();
        let topics: Vec<Topic> = (0..FEW_TOPICS * 2)
            .map(|i| Topic::new(&format!("t{i}")).expect("topic"))
            .collect();
        for (i, topic) in topics.iter().enumerate() {
            assert!(set.insert(topic), "{topic:?} is new");
            assert!(!set.insert(topic), "{topic:?} is there");
            assert_eq!(set.iter().count(), i + 1);
        }
        assert!(set.many.is_some() && set.few.is_empty());
        for topic in &topics {
            assert!(set.remove(topic));
            assert!(!set.remove(topic));
        }
        assert_eq!(set.iter().count(), 0);
        let mut small = TopicSet::default();
        small.insert(&topics[0]);
        small.insert(&topics[1]);
        assert!(small.remove(&topics[0]) && !small.remove(&topics[0]));
        assert_eq!(small.iter().collect::<Vec<_>>(), vec![&topics[1]]);
    }

    #[test]
    fn only_a_deliberate_end_leaves_at_once() {
        let client = |code| Closed::ByClient(Some(CloseFrame::new(CloseCode(code), "")));
        let server = |code| Closed::ByServer(CloseFrame::new(CloseCode(code), ""));
        assert_eq!(departure(&client(1000)), Departure::Now);
        assert_eq!(departure(&server(4000)), Departure::Now);
        assert_eq!(departure(&server(4400)), Departure::Now);
        for delayed in [
            client(1001),
            Closed::ByClient(None),
            server(1001),
            server(1012),
            server(4100),
            server(4001),
            server(4002),
            server(1011),
            Closed::Abnormal("reset".to_owned()),
        ] {
            assert_eq!(departure(&delayed), Departure::Delayed, "{delayed}");
        }
    }
}
