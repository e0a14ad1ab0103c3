//! The cluster's nodes as Redis sees them, for the operator's view: every
//! member of `P:nodes` with its deadline, its IDs (`HLEN P:ids:<member>`)
//! and their connections (the counts in that hash, read with `HSCAN`).
//!
//! Cost: one `HSCAN` pass per other node's hash per call — about 100
//! round trips of 1,000 fields for a node with 100,000 IDs. The dashboard
//! asks at most once every 2 seconds however many dashboards are open, and
//! only while one is; the listing is bounded by `request_timeout`.

use super::conn::RedisConn;
use ::redis::Value;

use super::Shared;
use super::keys::Keys;
use super::presence::read_nodes;
use super::replies::{parse_presence, scan_reply};
use crate::backend::NodeInfo;

impl Shared {
    pub(super) async fn nodes(&self) -> Option<Vec<NodeInfo>> {
        let link = self.link()?;
        let listing = async {
            let mut conn = link.conn.clone();
            let (now_ms, members) = read_nodes(&mut conn, &self.keys).await?;
            let mut nodes = Vec::with_capacity(members.len());
            for (member, until_ms) in members {
                let this_node = member == *link.member;
                let (ids, connections) = if this_node {
                    let local = self.local.clients_now();
                    let connections = local.iter().map(|c| c.connections as u64).sum();
                    (local.len() as u64, connections)
                } else {
                    count_member(&mut conn, &self.keys, &member).await?
                };
                nodes.push(NodeInfo {
                    node: member
                        .split_once('#')
                        .map_or(member.as_str(), |(node, _)| node)
                        .to_owned(),
                    alive: until_ms > now_ms,
                    this_node,
                    alive_until_unix_ms: until_ms,
                    ids,
                    connections,
                    member,
                });
            }
            nodes.sort_by(|a, b| (&a.node, &a.member).cmp(&(&b.node, &b.member)));
            Ok::<_, ::redis::RedisError>(nodes)
        };
        tokio::time::timeout(self.config.request_timeout, listing)
            .await
            .ok()?
            .ok()
    }
}

/// The IDs of `member` and their connections, from its presence hash.
async fn count_member(
    conn: &mut RedisConn,
    keys: &Keys,
    member: &str,
) -> Result<(u64, u64), ::redis::RedisError> {
    let key = keys.ids(member);
    let (mut ids, mut connections) = (0u64, 0u64);
    let mut cursor = 0u64;
    // Bounded: HSCAN ends (each pass returns a cursor that reaches 0).
    for _ in 0..u32::MAX {
        let reply: Value = ::redis::cmd("HSCAN")
            .arg(&key)
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        let (next, fields) = scan_reply(reply);
        for pair in fields.chunks_exact(2) {
            if let Some((count, _)) = parse_presence(&pair[1]) {
                ids += 1;
                connections += count as u64;
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok((ids, connections))
}
