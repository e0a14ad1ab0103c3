//! Key and channel names: the whole Redis layout in one place.

use crate::id::Topic;

pub(super) struct Keys {
    prefix: String,
    topic_prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            topic_prefix: format!("{prefix}:t:"),
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
}
