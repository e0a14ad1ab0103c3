//! [`RedisConfig`]: how to reach Redis and how this node appears in the
//! cluster, and its validation.

use std::time::Duration;

/// The shortest presence TTL accepted.
pub const MIN_PRESENCE_TTL: Duration = Duration::from_secs(1);

/// How to reach Redis and how this node appears in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` for one Redis, or
    /// `redis+cluster://[user:password@]host:port[,host:port…]`: seed nodes
    /// of a Redis Cluster (any of its masters or replicas; the client
    /// learns the rest from them).
    pub url: String,
    /// Prefix of every key and channel, so several clusters can share one
    /// Redis. Default `switchboard`.
    pub key_prefix: String,
    /// This node's name, unique in the cluster: 1 to 64 ASCII letters,
    /// digits or `- _ . :`. Default: the host name, the process ID and a
    /// random suffix ([`default_node_id`]). A node that finds another
    /// running process with its node ID on the same Redis and key prefix
    /// stops ([`RedisBackend::failed`](super::RedisBackend::failed)).
    pub node_id: String,
    /// How long a node that stops refreshing its presence (it was killed, or
    /// lost Redis) is still reported as having its IDs. It refreshes every
    /// third of this. Default 10 s, at least 1 s.
    pub presence_ttl: Duration,
    /// The longest a Redis command, or a cross-node send waiting for the
    /// other nodes' answers, may take. Default 2 s.
    pub request_timeout: Duration,
    /// How many IDs' locations (`P:loc:<id>`, read from Redis) a node keeps
    /// between sends, until Redis says they changed (client-side caching,
    /// see docs/scaling.md "The location cache"). A send whose targets are
    /// all cached asks Redis nothing for them; one whose cached targets are
    /// all on this node (or nowhere) is delivered at once, like on the
    /// memory backend. When full, the cache is emptied and refills. An
    /// entry costs about 100 B (a map slot, the ID, the other nodes'
    /// members that have it, shared) plus, in Redis, one entry of its
    /// tracking table for this connection. Not used on a Redis Cluster.
    /// Default 100,000 (about 10 MB at most); 0 turns the cache off.
    pub location_cache_entries: usize,
}

impl RedisConfig {
    /// Defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: "switchboard".to_owned(),
            node_id: default_node_id(),
            presence_ttl: Duration::from_secs(10),
            request_timeout: Duration::from_secs(2),
            location_cache_entries: 100_000,
        }
    }

    /// Checks every field; the error names the one to fix.
    pub fn validate(&self) -> Result<(), RedisConfigError> {
        super::conn::RedisClient::open(&self.url)?;
        let node_ok = (1..=64).contains(&self.node_id.len())
            && self
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
        if !node_ok {
            return Err(RedisConfigError::NodeId(self.node_id.clone()));
        }
        let prefix_ok = (1..=64).contains(&self.key_prefix.len())
            && self.key_prefix.chars().all(|c| c.is_ascii_graphic());
        if !prefix_ok {
            return Err(RedisConfigError::KeyPrefix(self.key_prefix.clone()));
        }
        // On a cluster, a brace in the prefix would become every key's hash
        // tag: all keys in one slot, and the keys meant to share a slot
        // (`{P:ids:<member>}:gc` with its hash) in different ones.
        let cluster = self.url.starts_with(super::conn::CLUSTER_SCHEME);
        if cluster && self.key_prefix.contains(['{', '}']) {
            return Err(RedisConfigError::KeyPrefixHashTag(self.key_prefix.clone()));
        }
        if self.presence_ttl < MIN_PRESENCE_TTL {
            return Err(RedisConfigError::PresenceTtl(self.presence_ttl));
        }
        if self.request_timeout < Duration::from_millis(10) {
            return Err(RedisConfigError::RequestTimeout(self.request_timeout));
        }
        Ok(())
    }
}

/// `<host name>-<process ID>-<6 random hex digits>`, the default node ID.
/// The random part keeps it unique where host names and process IDs
/// repeat: containers, where every server is PID 1.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(40)
        .collect();
    let host = if host.is_empty() {
        "node".to_owned()
    } else {
        host
    };
    let random = super::link::random_u32() & 0x00ff_ffff;
    format!("{host}-{}-{random:06x}", std::process::id())
}

/// A [`RedisConfig`] field that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RedisConfigError {
    /// The URL does not parse.
    #[error("invalid redis url: {message}")]
    Url {
        /// What the Redis client said.
        message: String,
    },
    /// The node ID is empty, too long or has a character outside the set.
    #[error("invalid node id {0:?}: use 1 to 64 ASCII letters, digits or - _ . :")]
    NodeId(String),
    /// The key prefix is empty, too long, or has spaces or control characters.
    #[error("invalid key prefix {0:?}: use 1 to 64 printable ASCII characters, no spaces")]
    KeyPrefix(String),
    /// The key prefix has a brace while the URL names a Redis Cluster.
    #[error(
        "invalid key prefix {0:?} for a redis cluster: braces would make it every key's hash \
         tag (all keys in one slot); use a prefix without {{ or }}"
    )]
    KeyPrefixHashTag(String),
    /// The presence TTL is under [`MIN_PRESENCE_TTL`].
    #[error("presence ttl {0:?} is too short: use at least 1s")]
    PresenceTtl(Duration),
    /// The request timeout is under 10 ms.
    #[error("request timeout {0:?} is too short: use at least 10ms")]
    RequestTimeout(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_the_config() {
        let ok = RedisConfig::new("redis://127.0.0.1:6379/");
        assert_eq!(ok.validate(), Ok(()));
        let mut bad = ok.clone();
        bad.node_id = "a#b".to_owned();
        assert!(matches!(bad.validate(), Err(RedisConfigError::NodeId(_))));
        let mut bad = ok.clone();
        bad.url = "http://nope".to_owned();
        assert!(matches!(bad.validate(), Err(RedisConfigError::Url { .. })));
        let mut bad = ok.clone();
        bad.key_prefix = "a b".to_owned();
        assert!(matches!(
            bad.validate(),
            Err(RedisConfigError::KeyPrefix(_))
        ));
        let mut braces = RedisConfig::new("redis+cluster://127.0.0.1:7000");
        braces.key_prefix = "{sb}".to_owned();
        assert!(matches!(
            braces.validate(),
            Err(RedisConfigError::KeyPrefixHashTag(_))
        ));
        braces.url = "redis://127.0.0.1:6379/".to_owned();
        assert_eq!(braces.validate(), Ok(()), "one redis has no slots");
        let mut bad = ok;
        bad.presence_ttl = Duration::from_millis(500);
        assert!(matches!(
            bad.validate(),
            Err(RedisConfigError::PresenceTtl(_))
        ));
        let id = default_node_id();
        assert!(id.contains(&format!("-{}-", std::process::id())), "{id}");
        assert_ne!(id, default_node_id(), "the default is unique per call");
        let mut ok = RedisConfig::new("redis://127.0.0.1:6379/");
        ok.node_id = id;
        assert_eq!(ok.validate(), Ok(()));
    }
}
