//! Client IP addresses and the per-IP admission limits.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use ipnet::IpNet;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::http_error::HttpError;

/// The IP address of the client behind a request: the TCP peer, or, when
/// the peer is a trusted proxy, the address it forwarded. Put in the
/// request's extensions of WebSocket upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientIp(pub IpAddr);

/// Proxies whose `X-Forwarded-For` header is believed. Nobody by default:
/// a client could otherwise claim any address and escape the per-IP limits.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// Why a trusted proxy entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid trusted proxy {entry:?}: write an IP address (\"10.0.0.5\", \"::1\") or a CIDR range (\"10.0.0.0/8\", \"fd00::/8\")"
)]
pub struct ProxyError {
    /// The entry.
    pub entry: String,
}

impl TrustedProxies {
    /// Parses addresses (`10.0.0.5`) and CIDR ranges (`10.0.0.0/8`).
    pub fn new<I, S>(entries: I) -> Result<Self, ProxyError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let list = entries
            .into_iter()
            .map(|entry| {
                let entry = entry.as_ref().trim();
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| ProxyError {
                        entry: entry.chars().take(100).collect(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(list))
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: `peer` unless it is a trusted proxy; then the
    /// rightmost `X-Forwarded-For` entry that is not a trusted proxy (the
    /// entries to its left were written by the client and prove nothing),
    /// or the leftmost when every entry is trusted, or `peer` when the
    /// header is absent. A trusted proxy's header that cannot be read is a
    /// 400 `invalid_forwarded_for`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> Result<IpAddr, HttpError> {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return Ok(peer);
        }
        let mut entries = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let value = value.to_str().map_err(|_| bad_forwarded("(not ASCII)"))?;
            entries.extend(value.split(',').map(str::trim));
        }
        let mut leftmost = None;
        for entry in entries.iter().rev() {
            let ip = parse_forwarded(entry).ok_or_else(|| bad_forwarded(entry))?;
            if !self.contains(ip) {
                return Ok(ip);
            }
            leftmost = Some(ip);
        }
        Ok(leftmost.unwrap_or(peer))
    }
}

/// An `X-Forwarded-For` entry: an address, optionally with a port
/// (`1.2.3.4:5678`, `[2001:db8::1]:443`), as some proxies write it.
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

fn bad_forwarded(entry: &str) -> HttpError {
    HttpError::new(
        StatusCode::BAD_REQUEST,
        "invalid_forwarded_for",
        format!(
            "X-Forwarded-For entry {:?} from a trusted proxy is not an IP address",
            entry.chars().take(60).collect::<String>()
        ),
    )
}

impl fmt::Debug for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(ToString::to_string))
            .finish()
    }
}

/// The per-IP limits of WebSocket upgrades: concurrent connections and new
/// connections per second (a token bucket holding one second's worth).
///
/// IPv6 clients are counted per /64, the smallest block usually given to
/// one subscriber; IPv4 clients per address.
pub(crate) struct IpLimiter {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<IpKey, Arc<IpEntry>>,
    /// Prune idle entries when the shard grows past this.
    prune_at: usize,
}

/// An IPv4 address or an IPv6 /64, 8-byte aligned so that a guard stays
/// small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct IpKey(u64, u64);

impl IpKey {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self(0, u64::from(u32::from(v4))),
            IpAddr::V6(v6) => Self(1, (u128::from(v6) >> 64) as u64),
        }
    }
}

struct IpEntry {
    state: Mutex<EntryState>,
}

struct EntryState {
    active: u32,
    tokens: f64,
    refilled: Instant,
}

/// One admitted WebSocket's place under its IP's concurrent limit, held
/// for the connection's life.
pub(crate) struct IpGuard(Arc<IpEntry>);

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.active = state.active.saturating_sub(1);
    }
}

const SHARDS: usize = 16;
const MIN_PRUNE_AT: usize = 256;

impl Default for IpLimiter {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl IpLimiter {
    /// Admits one more connection from `ip`, or refuses it with 429 and
    /// `Retry-After`. `max_concurrent` 0 and `rate` 0 turn each limit off;
    /// with both off nothing is tracked and `Ok(None)` is returned.
    pub(crate) fn admit(
        &self,
        ip: IpAddr,
        max_concurrent: usize,
        rate: u32,
    ) -> Result<Option<IpGuard>, HttpError> {
        if max_concurrent == 0 && rate == 0 {
            return Ok(None);
        }
        let key = IpKey::of(ip);
        let now = Instant::now();
        let capacity = f64::from(rate.max(1));
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let entry = {
            let mut shard = shard.lock();
            if shard.entries.len() >= shard.prune_at.max(MIN_PRUNE_AT) {
                shard
                    .entries
                    .retain(|_, entry| !entry.idle(now, rate, capacity));
                shard.prune_at = (shard.entries.len() * 2).max(MIN_PRUNE_AT);
            }
            Arc::clone(shard.entries.entry(key).or_insert_with(|| {
                Arc::new(IpEntry {
                    state: Mutex::new(EntryState {
                        active: 0,
                        tokens: capacity,
                        refilled: now,
                    }),
                })
            }))
        };
        let mut state = entry.state.lock();
        if rate > 0 {
            let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
            state.tokens = (state.tokens + elapsed * f64::from(rate)).min(capacity);
            state.refilled = now;
            if state.tokens < 1.0 {
                let wait = (1.0 - state.tokens) / f64::from(rate);
                return Err(refuse(
                    "connection_rate_limited",
                    format!(
                        "too many new connections from {ip}: at most {rate} per second (limits.max_connection_rate_per_ip); retry later"
                    ),
                    Duration::from_secs_f64(wait),
                ));
            }
            state.tokens -= 1.0;
        }
        if max_concurrent > 0 && state.active as usize >= max_concurrent {
            return Err(refuse(
                "too_many_connections",
                format!(
                    "{ip} has {max_concurrent} open connections, the most allowed (limits.max_connections_per_ip); close one and retry"
                ),
                Duration::from_secs(1),
            ));
        }
        state.active += 1;
        drop(state);
        Ok(Some(IpGuard(entry)))
    }
}

impl IpEntry {
    /// No open connection and a full bucket: forgetting it changes nothing.
    fn idle(&self, now: Instant, rate: u32, capacity: f64) -> bool {
        let state = self.state.lock();
        if state.active > 0 {
            return false;
        }
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        rate == 0 || state.tokens + elapsed * f64::from(rate) >= capacity
    }
}

fn refuse(code: &'static str, message: String, retry_after: Duration) -> HttpError {
    let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    HttpError::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        .with_header(header::RETRY_AFTER, HeaderValue::from(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in xff {
            map.append(
                "x-forwarded-for",
                HeaderValue::from_str(value).expect("ascii"),
            );
        }
        map
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxies = TrustedProxies::new(["10.0.0.0/8", "::1"]).expect("valid");
        let direct: IpAddr = "203.0.113.9".parse().expect("ip");
        let proxy: IpAddr = "10.1.2.3".parse().expect("ip");
        let spoof = headers(&["198.51.100.1"]);
        assert_eq!(proxies.client_ip(direct, &spoof).expect("ok"), direct);
        assert_eq!(
            proxies.client_ip(proxy, &spoof).expect("ok"),
            "198.51.100.1".parse::<IpAddr>().expect("ip")
        );
        // The client wrote the left entry; the proxy appended the real one.
        let chain = headers(&["6.6.6.6, 198.51.100.7", "10.9.9.9"]);
        assert_eq!(
            proxies.client_ip(proxy, &chain).expect("ok"),
            "198.51.100.7".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(proxies.client_ip(proxy, &headers(&[])).expect("ok"), proxy);
        let with_port = headers(&["198.51.100.7:5555"]);
        assert_eq!(
            proxies.client_ip(proxy, &with_port).expect("ok"),
            "198.51.100.7".parse::<IpAddr>().expect("ip")
        );
        let err = proxies
            .client_ip(proxy, &headers(&["not-an-ip"]))
            .expect_err("garbage");
        assert_eq!(err.code, "invalid_forwarded_for");
        let err = TrustedProxies::new(["10.0.0.0/33"]).expect_err("bad");
        assert!(err.to_string().contains("10.0.0.0/33"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_and_rate_per_ip() {
        let limiter = IpLimiter::default();
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let g1 = limiter.admit(a, 2, 0).expect("1st");
        let _g2 = limiter.admit(a, 2, 0).expect("2nd");
        let err = limiter.admit(a, 2, 0).err().expect("3rd refused");
        assert_eq!(
            (err.status.as_u16(), err.code),
            (429, "too_many_connections")
        );
        assert!(limiter.admit(b, 2, 0).is_ok(), "another IP is not affected");
        drop(g1);
        assert!(limiter.admit(a, 2, 0).is_ok(), "a slot was freed");

        let c: IpAddr = "2001:db8::1".parse().expect("ip");
        let c2: IpAddr = "2001:db8::2".parse().expect("ip");
        assert!(limiter.admit(c, 0, 2).is_ok());
        assert!(limiter.admit(c2, 0, 2).is_ok(), "same /64");
        let err = limiter.admit(c, 0, 2).err().expect("rate");
        assert_eq!(err.code, "connection_rate_limited");
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(limiter.admit(c, 0, 2).is_ok(), "refilled");
    }
}
