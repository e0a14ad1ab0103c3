//! Listing what a backend holds, a page at a time: client IDs and topics in
//! name order with a cursor, and the nodes of a cluster. For the operator's
//! API (`GET /api/ids`, `GET /api/topics`) and the dashboard.
//!
//! Why cursor paging: with 100,000 IDs a whole listing is ~5 MB of JSON, and
//! an offset page changes under the reader as clients come and go. A cursor
//! (the last name of the previous page) is stable: a page starts strictly
//! after it, whatever connected or left meanwhile. Each page costs one scan
//! of this node's map — with 100,000 IDs, ~27 ms a page of 1,000 in a
//! release build, ~90 ms in a debug one (the
//! `pages_through_100k_ids_with_a_cursor_and_a_prefix` test, on the 2-core
//! development machine under other load) — but keeps only `limit + 1`
//! entries, so its memory is the page's.

use std::collections::BinaryHeap;

use crate::id::Topic;

use super::ClientInfo;

/// The most entries one page may hold: the page is built in memory (~100 B
/// an entry, ~100 KB at this limit) and sent as ~80 KB of JSON.
pub const MAX_PAGE_LIMIT: usize = 1000;

/// The entries of a page when the caller does not say.
pub const DEFAULT_PAGE_LIMIT: usize = 100;

/// Which page of names to list: those starting with `prefix`, strictly after
/// `after`, in byte order, at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PageQuery {
    /// Only names starting with this (empty: every name).
    pub prefix: String,
    /// Only names after this one (the previous page's `next`).
    pub after: Option<String>,
    /// At most this many entries (1 to [`MAX_PAGE_LIMIT`]).
    pub limit: usize,
}

impl PageQuery {
    /// Every name, from the first, `limit` at a time.
    pub fn new(limit: usize) -> Self {
        Self {
            prefix: String::new(),
            after: None,
            limit: limit.clamp(1, MAX_PAGE_LIMIT),
        }
    }

    /// Only names starting with `prefix`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Only names after `after`.
    pub fn after(mut self, after: impl Into<String>) -> Self {
        self.after = Some(after.into());
        self
    }

    /// Whether `name` belongs on this page's side of the cursor.
    pub fn matches(&self, name: &str) -> bool {
        name.starts_with(&self.prefix) && self.after.as_deref().is_none_or(|after| name > after)
    }
}

/// One page of a listing, in name order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Page<T> {
    /// The entries.
    pub items: Vec<T>,
    /// The cursor of the next page (the last name here), `None` on the last
    /// page.
    pub next: Option<String>,
}

/// One topic and its subscribers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct TopicInfo {
    /// The topic.
    #[schema(value_type = String)]
    pub topic: Topic,
    /// Connections subscribed to it on this node.
    pub subscribers: usize,
}

/// One node of a cluster, as the backplane sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct NodeInfo {
    /// The node's ID (`node_id` of its configuration).
    pub node: String,
    /// Its member name on the backplane (`node_id#instance.epoch`).
    pub member: String,
    /// Whether its last heartbeat is still within the presence TTL.
    pub alive: bool,
    /// Whether this is the node that answered.
    pub this_node: bool,
    /// Until when its last heartbeat counts, in milliseconds since the Unix
    /// epoch (the backplane's clock).
    pub alive_until_unix_ms: u64,
    /// Client IDs registered on it.
    pub ids: u64,
    /// Connections of those IDs.
    pub connections: u64,
}

/// Something with a name to page by.
pub(crate) trait Named {
    fn name(&self) -> &str;
}

impl Named for ClientInfo {
    fn name(&self) -> &str {
        self.id.as_str()
    }
}

impl Named for TopicInfo {
    fn name(&self) -> &str {
        self.topic.as_str()
    }
}

/// Collects a page from entries in any order: keeps the `limit + 1`
/// smallest matching names seen (a max-heap), so memory is the page's, not
/// the listing's. `make` is called only for entries that match.
pub(crate) struct PageBuilder<'q, T> {
    query: &'q PageQuery,
    heap: BinaryHeap<ByName<T>>,
}

struct ByName<T>(T);

impl<T: Named> PartialEq for ByName<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}
impl<T: Named> Eq for ByName<T> {}
impl<T: Named> PartialOrd for ByName<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T: Named> Ord for ByName<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.name().cmp(other.0.name())
    }
}

impl<'q, T: Named> PageBuilder<'q, T> {
    pub(crate) fn new(query: &'q PageQuery) -> Self {
        Self {
            query,
            heap: BinaryHeap::with_capacity(query.limit + 1),
        }
    }

    /// Offers the entry named `name`, built by `make` if it may be kept.
    pub(crate) fn offer(&mut self, name: &str, make: impl FnOnce() -> T) {
        if !self.query.matches(name) {
            return;
        }
        if self.heap.len() > self.query.limit {
            // Full: only a name before the largest kept gets in.
            if self.heap.peek().is_some_and(|top| name >= top.0.name()) {
                return;
            }
            self.heap.pop();
        }
        self.heap.push(ByName(make()));
    }

    pub(crate) fn finish(self) -> Page<T> {
        let mut items: Vec<T> = self
            .heap
            .into_sorted_vec()
            .into_iter()
            .map(|e| e.0)
            .collect();
        let next = if items.len() > self.query.limit {
            items.truncate(self.query.limit);
            items.last().map(|last| last.name().to_owned())
        } else {
            None
        };
        Page { items, next }
    }
}

/// A page of `entries` (any order).
pub(crate) fn page_of<T: Named>(entries: Vec<T>, query: &PageQuery) -> Page<T> {
    let mut page = PageBuilder::new(query);
    for entry in entries {
        let name = entry.name().to_owned();
        page.offer(&name, || entry);
    }
    page.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str, subscribers: usize) -> TopicInfo {
        TopicInfo {
            topic: Topic::new(name).expect("topic"),
            subscribers,
        }
    }

    fn names(page: &Page<TopicInfo>) -> Vec<&str> {
        page.items.iter().map(|t| t.topic.as_str()).collect()
    }

    #[test]
    fn pages_in_name_order_with_a_cursor() {
        let all: Vec<TopicInfo> = ["d", "a", "c", "b", "e"]
            .iter()
            .map(|n| topic(n, 1))
            .collect();
        let first = page_of(all.clone(), &PageQuery::new(2));
        assert_eq!(names(&first), ["a", "b"]);
        assert_eq!(first.next.as_deref(), Some("b"));
        let second = page_of(all.clone(), &PageQuery::new(2).after("b"));
        assert_eq!(names(&second), ["c", "d"]);
        let last = page_of(all.clone(), &PageQuery::new(2).after("d"));
        assert_eq!(names(&last), ["e"]);
        assert_eq!(last.next, None);
        let exact = page_of(all, &PageQuery::new(5));
        assert_eq!(exact.items.len(), 5);
        assert_eq!(exact.next, None, "a page that holds the rest is the last");
    }

    #[test]
    fn a_prefix_filters() {
        let all = vec![topic("room/1", 1), topic("lobby", 2), topic("room/2", 3)];
        let page = page_of(all, &PageQuery::new(10).prefix("room/"));
        assert_eq!(names(&page), ["room/1", "room/2"]);
    }
}
