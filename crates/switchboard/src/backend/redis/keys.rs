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
}
