//! Key and channel names: the whole Redis layout in one place.

use crate::id::Topic;

pub(super) struct Keys {
    prefix: String,
    topic_prefix: String,
    presence_prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            topic_prefix: format!("{prefix}:t:"),
            presence_prefix: format!("{prefix}:{{pr:"),
        }
    }
    pub(super) fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    pub(super) fn ids(&self, member: &str) -> String {
        format!("{}:ids:{member}", self.prefix)
    }
    pub(super) fn loc(&self, id: &str) -> String {
        format!("{}:loc:{id}", self.prefix)
    }
    /// The ID whose location key is `key` (`P:loc:<id>`), for the
    /// location cache's invalidations.
    pub(super) fn loc_id_of<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        std::str::from_utf8(rest.strip_prefix(b":loc:")?).ok()
    }
    /// Whether `key` is `P:v1`.
    pub(super) fn is_v1_flag(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.prefix.as_bytes()) == Some(b":v1")
    }
    pub(super) fn gc(&self, member: &str) -> String {
        format!("{}:gc:{member}", self.prefix)
    }
    /// Where a cleanup moves a dead member's hash (`RENAME`) before
    /// reading it: `{P:ids:<member>}:gc`, in the hash's slot on a cluster
    /// (the hash tag is the hash's own name, as long as the prefix has no
    /// braces).
    pub(super) fn gc_ids(&self, member: &str) -> String {
        format!("{{{}}}:gc", self.ids(member))
    }
    pub(super) fn node_channel(&self, member: &str) -> String {
        format!("{}:n:{member}", self.prefix)
    }
    pub(super) fn topic_channel(&self, topic: &Topic) -> String {
        format!("{}{topic}", self.topic_prefix)
    }
    /// `P:{id:<id>}:meta`: a `switchboard.v1` ID's inbox meta (epoch,
    /// newest seq, retained bytes, retain-until). Hash-tagged by the ID, so
    /// that it and the ID's stream (and its senders' `mid`s) share a slot of
    /// a Redis Cluster and one script can touch both.
    pub(super) fn inbox_meta(&self, id: &str) -> String {
        format!("{}:{{id:{id}}}:meta", self.prefix)
    }
    /// `P:{id:<id>}:inbox`: the ID's retained messages, a stream whose
    /// entry IDs are `<seq>-0`.
    pub(super) fn inbox_stream(&self, id: &str) -> String {
        format!("{}:{{id:{id}}}:inbox", self.prefix)
    }
    /// `P:{id:<id>}:stamp`: the stamp of the ID's newest connection under
    /// `duplicate_ids = "replace-oldest"` (`duplicates.rs`).
    pub(super) fn id_stamp(&self, id: &str) -> String {
        format!("{}:{{id:{id}}}:stamp", self.prefix)
    }
    /// `P:{id:<sender>}:mid:<mid>`: the report of sender's send `mid`.
    pub(super) fn mid(&self, sender: &str, mid: &str) -> String {
        format!("{}:{{id:{sender}}}:mid:{mid}", self.prefix)
    }
    /// `P:v1`: set while any ID of the cluster may retain messages, so
    /// that a cluster without `switchboard.v1` clients pays nothing for
    /// inboxes (see `inbox.rs`).
    pub(super) fn v1_flag(&self) -> String {
        format!("{}:v1", self.prefix)
    }
    /// A topic's presence keys and event channel share the hash tag
    /// `{pr:<topic>}` (topic names have no braces), so that one script
    /// changes them together on a Redis Cluster: `…:m` members (ID →
    /// `since_ms,meta`), `…:t` connections per member over all nodes,
    /// `…:c` connections per `<id>|<instance>`, `…:v` the revision, and
    /// the shard channel `…:e` its events.
    pub(super) fn presence_topic(&self, topic: &Topic) -> [String; 5] {
        let tag = format!("{}:{{pr:{topic}}}", self.prefix);
        [
            format!("{tag}:m"),
            format!("{tag}:t"),
            format!("{tag}:c"),
            format!("{tag}:v"),
            format!("{tag}:e"),
        ]
    }
    /// The topic of a presence event channel.
    pub(super) fn presence_topic_of(&self, channel: &[u8]) -> Option<Topic> {
        let name = channel
            .strip_prefix(self.presence_prefix.as_bytes())?
            .strip_suffix(b"}:e")?;
        Topic::new(std::str::from_utf8(name).ok()?).ok()
    }
    /// Pending leaves of every topic: sorted set `"<topic> <id>"` → when
    /// it is due (Redis time, ms).
    pub(super) fn presence_pending(&self) -> String {
        format!("{}:pl", self.prefix)
    }
    /// Live presence instances (`node_id#token`): sorted set → until when
    /// (Redis time, ms).
    pub(super) fn presence_instances(&self) -> String {
        format!("{}:pn", self.prefix)
    }
    /// The lock of a cleanup of a dead instance's topic presence.
    pub(super) fn presence_cleanup_lock(&self, instance: &str) -> String {
        format!("{}:pgc:{instance}", self.prefix)
    }
    /// The topics where an instance has connections (set).
    pub(super) fn presence_instance_topics(&self, instance: &str) -> String {
        format!("{}:pt:{instance}", self.prefix)
    }
    pub(super) fn topic_of(&self, channel: &[u8]) -> Option<Topic> {
        let name = channel.strip_prefix(self.topic_prefix.as_bytes())?;
        Topic::new(std::str::from_utf8(name).ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_channels_map_back_to_topics() {
        let keys = Keys::new("sb");
        let topic = Topic::new("room/1").expect("topic");
        let channel = keys.topic_channel(&topic);
        assert_eq!(channel, "sb:t:room/1");
        assert_eq!(keys.topic_of(channel.as_bytes()), Some(topic));
        assert_eq!(keys.topic_of(b"sb:n:x"), None);
    }

    #[test]
    fn an_ids_inbox_keys_share_one_hash_tag() {
        let keys = Keys::new("sb");
        assert_eq!(keys.inbox_meta("42"), "sb:{id:42}:meta");
        assert_eq!(keys.inbox_stream("42"), "sb:{id:42}:inbox");
        assert_eq!(keys.mid("42", "m-1"), "sb:{id:42}:mid:m-1");
    }

    #[test]
    fn presence_keys_share_the_topics_hash_tag() {
        let keys = Keys::new("sb");
        let topic = Topic::new("room/1").expect("topic");
        let all = keys.presence_topic(&topic);
        assert!(all.iter().all(|k| k.contains("{pr:room/1}")), "{all:?}");
        assert_eq!(keys.presence_topic_of(all[4].as_bytes()), Some(topic));
        assert_eq!(keys.presence_topic_of(b"sb:t:room/1"), None);
    }
}
