//! The location cache: what this node last read of `P:loc:<id>` (the
//! other nodes' members that have the ID) and whether `P:v1` was absent,
//! kept until Redis says the key changed.
//!
//! Redis client-side caching (`CLIENT TRACKING ON OPTIN`, RESP3): a read
//! sent right after `CLIENT CACHING YES` makes Redis remember that this
//! connection holds the key, and the first write to it afterwards pushes
//! an `invalidate` message for it on the same connection. Redis writes the
//! push to the connection before the reply of any command that runs after
//! the write, and the client hands pushes and replies over in the order
//! they arrive, so an entry is dropped before this node can see any
//! later state of the key by any other read.
//!
//! The one race is a fill: the reply of a read and an invalidation that
//! follows it may both be handled before the task that sent the read
//! stores what it read. So a read first marks its key *filling* with a
//! token; an invalidation (or a flush) removes the mark, and the value is
//! stored only if the mark with its token is still there.
//!
//! The cache lives and dies with one Redis connection: a new connection
//! (whose tracking starts empty), a lost one, and an `invalidate` without
//! keys (`FLUSHALL`, Redis's tracking table overflowing) empty it. It is
//! not used on a Redis Cluster, where the client opens and replaces its
//! connections to the shards on its own (tracking would have to follow
//! each of them).
//!
//! Its size is bounded by [`RedisConfig::location_cache_entries`]
//! (super::RedisConfig::location_cache_entries): when full, it is emptied
//! (the next sends read their targets again).

use std::collections::HashMap;
use std::sync::Arc;

use ::redis::Value;
use parking_lot::RwLock;

/// The other nodes' members that have an ID (this process's members are
/// left out: its own connections are in its `MemoryBackend`).
pub(super) type Members = Arc<[Arc<str>]>;

enum Entry {
    /// A read is on its way (its token).
    Filling(u64),
    Known(Members),
}

/// The `P:v1` flag as far as the cache knows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flag {
    Unknown,
    Filling(u64),
    /// Absent when read, and not written since.
    Absent,
}

struct Inner {
    /// Tracking is on for the current connection (whose generation is
    /// `generation`).
    active: bool,
    generation: u64,
    next_token: u64,
    ids: HashMap<Box<str>, Entry>,
    flag: Flag,
}

/// See the module documentation.
pub(super) struct LocCache {
    inner: RwLock<Inner>,
    capacity: usize,
}

/// A read to store once answered: the ID and its token.
pub(super) struct Fill {
    token: u64,
}

impl LocCache {
    /// A cache of at most `capacity` IDs (0: no cache).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            inner: RwLock::new(Inner {
                active: false,
                generation: 0,
                next_token: 1,
                ids: HashMap::new(),
                flag: Flag::Unknown,
            }),
            capacity,
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// A new connection with tracking on: starts empty; returns its
    /// generation (for [`deactivate`](Self::deactivate) and
    /// [`begin`](Self::begin)).
    pub(super) fn activate(&self) -> u64 {
        let mut inner = self.inner.write();
        inner.generation += 1;
        inner.active = true;
        inner.ids = HashMap::new();
        inner.flag = Flag::Unknown;
        inner.generation
    }

    /// The connection of `generation` is lost (or given up): nothing it
    /// cached may be used any more.
    pub(super) fn deactivate(&self, generation: u64) {
        let mut inner = self.inner.write();
        if inner.generation == generation {
            inner.active = false;
            inner.ids = HashMap::new();
            inner.flag = Flag::Unknown;
        }
    }

    /// Whether `P:v1` is known absent (no ID of the cluster retains).
    pub(super) fn v1_absent(&self) -> bool {
        let inner = self.inner.read();
        inner.active && inner.flag == Flag::Absent
    }

    /// The members of each of `targets` when every one is cached, else
    /// `None`. `f` is called with each target's index and members.
    pub(super) fn all_known<'a>(
        &self,
        targets: impl IntoIterator<Item = &'a str>,
        mut f: impl FnMut(usize, &Members),
    ) -> bool {
        let inner = self.inner.read();
        if !inner.active {
            return false;
        }
        for (i, id) in targets.into_iter().enumerate() {
            match inner.ids.get(id) {
                Some(Entry::Known(members)) => f(i, members),
                _ => return false,
            }
        }
        true
    }

    /// The cached members of `id`, if any.
    pub(super) fn get(&self, id: &str) -> Option<Members> {
        let inner = self.inner.read();
        if !inner.active {
            return None;
        }
        match inner.ids.get(id) {
            Some(Entry::Known(members)) => Some(Arc::clone(members)),
            _ => None,
        }
    }

    /// Marks `ids` as being read over the connection of `generation`;
    /// `None` when that connection is not the tracked one (then the read
    /// must not ask Redis to track, and nothing is stored).
    pub(super) fn begin<'a>(
        &self,
        generation: Option<u64>,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Option<Vec<Fill>> {
        let generation = generation?;
        let mut inner = self.inner.write();
        if !inner.active || inner.generation != generation {
            return None;
        }
        if inner.ids.len() >= self.capacity {
            // Full: start over rather than track which entry is oldest
            // (an entry costs a map slot and the members; see
            // `RedisConfig::location_cache_entries`).
            inner.ids = HashMap::new();
        }
        let mut fills = Vec::new();
        for id in ids {
            let token = inner.next_token;
            inner.next_token += 1;
            inner.ids.insert(Box::from(id), Entry::Filling(token));
            fills.push(Fill { token });
        }
        Some(fills)
    }

    /// Stores what the read of `fill` found for `id`, unless the key was
    /// invalidated (or the cache emptied) since the read was sent.
    pub(super) fn finish(&self, id: &str, fill: &Fill, members: Members) {
        let mut inner = self.inner.write();
        if let Some(entry) = inner.ids.get_mut(id)
            && matches!(entry, Entry::Filling(token) if *token == fill.token)
        {
            *entry = Entry::Known(members);
        }
    }

    /// Marks `P:v1` as being read over the connection of `generation`.
    pub(super) fn begin_flag(&self, generation: Option<u64>) -> Option<Fill> {
        let generation = generation?;
        let mut inner = self.inner.write();
        if !inner.active || inner.generation != generation {
            return None;
        }
        let token = inner.next_token;
        inner.next_token += 1;
        inner.flag = Flag::Filling(token);
        Some(Fill { token })
    }

    /// Stores that `P:v1` was absent when the read of `fill` ran.
    pub(super) fn finish_flag_absent(&self, fill: &Fill) {
        let mut inner = self.inner.write();
        if inner.flag == Flag::Filling(fill.token) {
            inner.flag = Flag::Absent;
        }
    }

    /// An `invalidate` push: `data` is one array of key names, or nil
    /// (everything). `loc_id` maps a key to its ID when it is a location
    /// key; `is_flag` says whether a key is `P:v1`.
    pub(super) fn invalidate(
        &self,
        data: &[Value],
        loc_id: impl Fn(&[u8]) -> Option<&str>,
        is_flag: impl Fn(&[u8]) -> bool,
    ) {
        let mut inner = self.inner.write();
        let keys = match data.first() {
            Some(Value::Array(keys)) | Some(Value::Set(keys)) => keys,
            _ => {
                inner.ids = HashMap::new();
                inner.flag = Flag::Unknown;
                return;
            }
        };
        for key in keys {
            let Value::BulkString(key) = key else {
                continue;
            };
            if is_flag(key) {
                inner.flag = Flag::Unknown;
            } else if let Some(id) = loc_id(key) {
                inner.ids.remove(id);
            }
        }
    }

    /// How many IDs are cached (for `/metrics`).
    pub(super) fn len(&self) -> usize {
        self.inner.read().ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Members {
        names.iter().map(|&n| Arc::from(n)).collect()
    }

    fn loc(key: &[u8]) -> Option<&str> {
        std::str::from_utf8(key).ok()?.strip_prefix("p:loc:")
    }

    fn invalidate(cache: &LocCache, keys: &[&str]) {
        let keys = keys
            .iter()
            .map(|k| Value::BulkString(k.as_bytes().to_vec()))
            .collect();
        cache.invalidate(&[Value::Array(keys)], loc, |k| k == b"p:v1");
    }

    #[test]
    fn an_invalidation_between_the_reply_and_the_store_wins() {
        let cache = LocCache::new(10);
        let generation = cache.activate();
        let fills = cache.begin(Some(generation), ["a", "b"]).expect("active");
        invalidate(&cache, &["p:loc:a"]);
        cache.finish("a", &fills[0], members(&["n#1.1"]));
        cache.finish("b", &fills[1], members(&[]));
        assert!(cache.get("a").is_none(), "invalidated while filling");
        assert_eq!(cache.get("b").map(|m| m.len()), Some(0));
        invalidate(&cache, &["p:loc:b"]);
        assert!(cache.get("b").is_none());
    }

    #[test]
    fn a_fill_over_an_older_connection_stores_nothing() {
        let cache = LocCache::new(10);
        let old = cache.activate();
        let fills = cache.begin(Some(old), ["a"]).expect("active");
        let new = cache.activate();
        cache.finish("a", &fills[0], members(&["x"]));
        assert!(cache.get("a").is_none());
        assert!(cache.begin(Some(old), ["a"]).is_none());
        assert!(cache.begin(None, ["a"]).is_none());
        let fills = cache.begin(Some(new), ["a"]).expect("active");
        cache.finish("a", &fills[0], members(&["x"]));
        assert!(cache.get("a").is_some());
        cache.deactivate(old);
        assert!(
            cache.get("a").is_some(),
            "an old generation changes nothing"
        );
        cache.deactivate(new);
        assert!(cache.get("a").is_none());
    }

    #[test]
    fn the_flag_and_a_nil_invalidation() {
        let cache = LocCache::new(10);
        let generation = cache.activate();
        let fill = cache.begin_flag(Some(generation)).expect("active");
        cache.finish_flag_absent(&fill);
        assert!(cache.v1_absent());
        invalidate(&cache, &["p:v1"]);
        assert!(!cache.v1_absent());
        let fill = cache.begin_flag(Some(generation)).expect("active");
        cache.finish_flag_absent(&fill);
        let fills = cache.begin(Some(generation), ["a"]).expect("active");
        cache.finish("a", &fills[0], members(&[]));
        cache.invalidate(&[Value::Nil], loc, |_| false);
        assert!(!cache.v1_absent());
        assert!(cache.get("a").is_none());
    }

    #[test]
    fn a_full_cache_starts_over() {
        let cache = LocCache::new(2);
        let generation = cache.activate();
        for id in ["a", "b", "c"] {
            let fills = cache.begin(Some(generation), [id]).expect("active");
            cache.finish(id, &fills[0], members(&[]));
        }
        assert_eq!(cache.len(), 1);
        assert!(cache.get("c").is_some());
        assert!(!cache.all_known(["a", "c"], |_, _| {}));
        assert!(cache.all_known(["c"], |_, _| {}));
    }
}
