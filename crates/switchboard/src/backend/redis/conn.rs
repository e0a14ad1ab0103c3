//! One Redis, or a Redis Cluster: [`RedisClient`] says how to reach it
//! (from [`RedisConfig::url`](super::RedisConfig::url)), [`RedisConn`] is a
//! connection to it that runs any command or pipeline the backend builds.
//!
//! On a cluster, a command goes to the master of its key's slot (the
//! client follows `MOVED` and `ASK`), and a pipeline is split: one
//! sub-pipeline per slot, all sent at once, the answers put back in the
//! pipeline's order; a keyless command (`TIME`, `SCRIPT LOAD`, `PUBSUB
//! SHARDNUMSUB`) runs alone, routed as the Redis client routes it (to a
//! random node, or to all and aggregated). So the backend writes its
//! pipelines as for one Redis, and every Lua script keeps its `KEYS` in one
//! slot (hash tags, see `keys.rs`).

use std::collections::HashMap;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    AsyncConnectionConfig, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, ProtocolVersion,
    PushInfo, RedisFuture, RedisResult, Value,
};

use super::config::RedisConfigError;

/// The scheme of a cluster URL: `redis+cluster://host:port,host:port`.
pub(super) const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16_384;

/// Pipelines of at most this many commands run their per-slot parts one
/// after the other, in the order of their first command, rather than all
/// at once: the backend's small pipelines are "do this, then release that"
/// (a cleanup, then its lock), where the order matters; its large ones
/// (lookups, publishes, presence batches) are independent commands, where
/// one round trip per slot would cost hundreds of round trips.
const ORDERED_PIPELINE: usize = 4;

/// How many times the cluster client retries a command redirected
/// (`MOVED`, `ASK`) or refused during a failover (`TRYAGAIN`,
/// `CLUSTERDOWN`) before it fails; every retry is also bounded by the
/// request timeout.
const CLUSTER_RETRIES: u32 = 4;

/// How to reach Redis.
pub(super) enum RedisClient {
    Single(::redis::Client),
    /// The seed nodes of a cluster; a client is built per connection,
    /// since the push handler (which names the connection's epoch) is
    /// given to the cluster client, not to one connection.
    Cluster(Vec<ConnectionInfo>),
}

impl RedisClient {
    /// Parses `url`: `redis://…` for one Redis, `redis+cluster://…` for a
    /// cluster. Every connection speaks RESP3: pushes (messages) and
    /// replies share one connection per Redis node.
    pub(super) fn open(url: &str) -> Result<Self, RedisConfigError> {
        if url.starts_with(CLUSTER_SCHEME) {
            let mut seeds = cluster_seeds(url)?;
            for seed in &mut seeds {
                seed.redis.protocol = ProtocolVersion::RESP3;
            }
            // Checks what the client checks (TLS, credentials).
            ClusterClient::new(seeds.clone()).map_err(|err| RedisConfigError::Url {
                message: err.to_string(),
            })?;
            return Ok(Self::Cluster(seeds));
        }
        let mut info = url
            .into_connection_info()
            .map_err(|err| RedisConfigError::Url {
                message: err.to_string(),
            })?;
        info.redis.protocol = ProtocolVersion::RESP3;
        let client = ::redis::Client::open(info).map_err(|err| RedisConfigError::Url {
            message: err.to_string(),
        })?;
        Ok(Self::Single(client))
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// A new connection whose pushes (messages, subscription changes,
    /// disconnections of any node) go to `on_push`.
    pub(super) async fn connect(
        &self,
        timeout: Duration,
        on_push: impl Fn(PushInfo) -> Result<(), std::convert::Infallible> + Send + Sync + 'static,
    ) -> RedisResult<RedisConn> {
        match self {
            Self::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout)
                    .set_push_sender(on_push);
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(RedisConn::Single(conn))
            }
            Self::Cluster(seeds) => {
                let client = ClusterClientBuilder::new(seeds.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(on_push)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(10)
                    .max_retry_wait(timeout.as_millis().try_into().unwrap_or(u64::MAX) / 4)
                    .build()?;
                let conn = client.get_async_connection().await?;
                Ok(RedisConn::Cluster(conn))
            }
        }
    }
}

/// `redis+cluster://[user:password@]host:port[,host:port…]` → one
/// connection info per seed node, each with the credentials.
fn cluster_seeds(url: &str) -> Result<Vec<ConnectionInfo>, RedisConfigError> {
    let bad = |why: String| RedisConfigError::Url {
        message: format!(
            "{why}; a cluster URL is redis+cluster://[user:password@]host:port[,host:port…] \
             (seed nodes of one Redis Cluster, separated by commas, no database path)"
        ),
    };
    let rest = &url[CLUSTER_SCHEME.len()..];
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') {
        return Err(bad(
            "a cluster has only database 0: remove the path or query".to_owned(),
        ));
    }
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((credentials, hosts)) => (Some(credentials), hosts),
        None => (None, rest),
    };
    let mut seeds = Vec::new();
    for host in hosts.split(',') {
        let host = host.trim();
        if host.is_empty() {
            return Err(bad("a seed node is empty".to_owned()));
        }
        let port = host.rsplit_once(':').map(|(_, port)| port);
        if port.is_none_or(|port| port.parse::<u16>().is_err()) {
            return Err(bad(format!("seed node {host:?} needs host:port")));
        }
        let seed = match credentials {
            Some(credentials) => format!("redis://{credentials}@{host}/"),
            None => format!("redis://{host}/"),
        };
        let info = seed
            .as_str()
            .into_connection_info()
            .map_err(|err| bad(format!("seed node {host:?}: {err}")))?;
        seeds.push(info);
    }
    Ok(seeds)
}

/// A connection to one Redis or to a cluster; clones share it.
#[derive(Clone)]
pub(super) enum RedisConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => {
                if pipeline.is_transaction() {
                    // A transaction must be in one slot anyway: as it is.
                    conn.req_packed_commands(pipeline, offset, count)
                } else {
                    Box::pin(split_by_slot(conn.clone(), pipeline))
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// One part of a split pipeline: its commands' positions, and either a
/// sub-pipeline of one slot or one keyless command.
struct Part {
    positions: Vec<usize>,
    pipeline: Pipeline,
    keyless: Option<Cmd>,
}

impl Part {
    async fn run(&self, mut conn: ClusterConnection) -> RedisResult<Vec<Value>> {
        match &self.keyless {
            Some(cmd) => Ok(vec![conn.req_packed_command(cmd).await?]),
            None => {
                let n = self.positions.len();
                conn.req_packed_commands(&self.pipeline, 0, n).await
            }
        }
    }
}

/// Runs `pipeline` on a cluster: one sub-pipeline per slot (see the
/// module documentation); every answer, in the pipeline's order (the
/// caller drops the ignored ones).
async fn split_by_slot(conn: ClusterConnection, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
    let mut parts: Vec<Part> = Vec::new();
    let mut by_slot: HashMap<u16, usize> = HashMap::new();
    let mut total = 0;
    for (position, cmd) in pipeline.cmd_iter().enumerate() {
        total += 1;
        match command_slot(cmd) {
            Some(slot) => {
                let index = *by_slot.entry(slot).or_insert_with(|| {
                    parts.push(Part {
                        positions: Vec::new(),
                        pipeline: Pipeline::new(),
                        keyless: None,
                    });
                    parts.len() - 1
                });
                let part = &mut parts[index];
                part.positions.push(position);
                part.pipeline.add_command(cmd.clone());
            }
            None => parts.push(Part {
                positions: vec![position],
                pipeline: Pipeline::new(),
                keyless: Some(cmd.clone()),
            }),
        }
    }
    let answers: Vec<RedisResult<Vec<Value>>> = if total <= ORDERED_PIPELINE {
        let mut answers = Vec::with_capacity(parts.len());
        for part in &parts {
            answers.push(part.run(conn.clone()).await);
        }
        answers
    } else {
        futures_util::future::join_all(parts.iter().map(|part| part.run(conn.clone()))).await
    };
    let mut values: Vec<Value> = vec![Value::Nil; total];
    for (part, answer) in parts.iter().zip(answers) {
        for (position, value) in part.positions.iter().zip(answer?) {
            values[*position] = value;
        }
    }
    Ok(values)
}

/// The slot of the key a command of the backend names, `None` for a
/// keyless one. Covers the commands the backend sends: the first argument
/// is the key, except for `EVAL`/`EVALSHA` (the first of their `KEYS`)
/// and the keyless `TIME`, `SCRIPT`, `PUBSUB`, `CLIENT`, `PING`.
fn command_slot(cmd: &Cmd) -> Option<u16> {
    let mut args = cmd.args_iter().filter_map(|arg| match arg {
        ::redis::Arg::Simple(bytes) => Some(bytes),
        ::redis::Arg::Cursor => None,
    });
    let name = args.next()?.to_ascii_uppercase();
    match name.as_slice() {
        b"TIME" | b"SCRIPT" | b"PUBSUB" | b"CLIENT" | b"PING" | b"INFO" | b"CLUSTER" => None,
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" => {
            let _script = args.next()?;
            let keys: usize = std::str::from_utf8(args.next()?).ok()?.parse().ok()?;
            if keys == 0 {
                return None;
            }
            Some(slot_of(args.next()?))
        }
        _ => args.next().map(slot_of),
    }
}

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part
/// between the first `{` and the next `}`, when not empty) or of the
/// whole key, modulo 16384, as Redis Cluster defines it.
pub(super) fn slot_of(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16_xmodem(tagged.unwrap_or(key)) % SLOTS
}

/// CRC16 with polynomial 0x1021, initial value 0, no reflection.
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // `CLUSTER KEYSLOT` of a Redis 7.0 cluster for the same keys.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_eq!(slot_of(b"sb:{id:42}:meta"), slot_of(b"id:42"));
        // An empty tag hashes the whole key.
        assert_ne!(slot_of(b"a{}"), slot_of(b""));
    }

    #[test]
    fn cluster_urls_list_seed_nodes() {
        let client = RedisClient::open("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
            .expect("a cluster url");
        assert!(client.is_cluster());
        let RedisClient::Cluster(seeds) = client else {
            unreachable!()
        };
        assert_eq!(seeds.len(), 2);
        let single = RedisClient::open("redis://127.0.0.1:6379/").expect("a url");
        assert!(!single.is_cluster());
        for bad in [
            "redis+cluster://",
            "redis+cluster://127.0.0.1:7000,",
            "redis+cluster://127.0.0.1",
            "redis+cluster://127.0.0.1:7000/1",
            "redis+cluster://127.0.0.1:notaport",
        ] {
            let Err(RedisConfigError::Url { message }) = RedisClient::open(bad) else {
                panic!("{bad} must be refused");
            };
            assert!(
                message.contains("redis+cluster://[user:password@]host:port"),
                "{message}"
            );
        }
    }

    #[test]
    fn commands_are_split_by_their_keys_slot() {
        let mut get = ::redis::cmd("GET");
        get.arg("foo");
        assert_eq!(command_slot(&get), Some(12182));
        let mut eval = ::redis::cmd("EVALSHA");
        eval.arg("sha").arg(2).arg("sb:{id:42}:meta").arg("x");
        assert_eq!(command_slot(&eval), Some(slot_of(b"id:42")));
        let mut none = ::redis::cmd("EVAL");
        none.arg("return 1").arg(0);
        assert_eq!(command_slot(&none), None);
        assert_eq!(command_slot(&::redis::cmd("TIME")), None);
    }
}
