//! Refused connections, explained: every refused WebSocket upgrade (and
//! every connection turned away at the connection cap) is logged once with
//! its route, status, error code, client address and request id, and kept
//! in a short list of the most recent ones.
//!
//! Why: a browser whose upgrade is refused sees only close code 1006 — the
//! HTTP status and the JSON body explaining it never reach page scripts. The
//! server's log is the one place a developer can find out why. A flood of
//! refusals (a client retrying in a loop, token guessing) must not flood
//! that log, so lines are rate-limited — [`LINES_PER_SECOND`], bursts of
//! [`BURST`] — and the next line that gets through says how many were
//! suppressed. The token of a refused client is never logged: the route is
//! the path without the query string, and error messages never quote
//! credentials.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;

use crate::backend::unix_ms;

/// Refusal lines logged per second, sustained.
pub(crate) const LINES_PER_SECOND: f64 = 10.0;

/// Refusal lines that may be logged at once before the rate applies.
pub(crate) const BURST: f64 = 50.0;

/// How many recent refusals [`RefusalLog::recent`] keeps (about 300 B each).
pub(crate) const RECENT: usize = 100;

/// One refused connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct Refusal {
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// The request path, without the query string (which may hold a token);
    /// `None` when the connection was refused before its request was read.
    pub route: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
    /// The error code of the JSON body, e.g. `"invalid_token"`.
    pub code: &'static str,
    /// The client's address (behind trusted proxies, the forwarded one).
    #[schema(value_type = Option<String>)]
    pub client: Option<IpAddr>,
    /// The request id: the client's `X-Request-Id` when it sent a usable
    /// one, else one the server made up; answered in `X-Request-Id`.
    pub request_id: String,
}

/// The refusal log of one hub.
pub(crate) struct RefusalLog {
    limiter: Mutex<Bucket>,
    suppressed: AtomicU64,
    total: AtomicU64,
    recent: Mutex<VecDeque<Refusal>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Default for RefusalLog {
    fn default() -> Self {
        Self {
            limiter: Mutex::new(Bucket {
                tokens: BURST,
                last: Instant::now(),
            }),
            suppressed: AtomicU64::new(0),
            total: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
        }
    }
}

impl RefusalLog {
    /// Records `refusal` with its human-readable `message`, and logs it
    /// unless the rate limit says otherwise.
    pub(crate) fn record(&self, refusal: Refusal, message: &str) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if self.take_token() {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            log(&refusal, message, suppressed);
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
        let mut recent = self.recent.lock();
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(refusal);
    }

    /// The most recent refusals, oldest first.
    pub(crate) fn recent(&self) -> Vec<Refusal> {
        self.recent.lock().iter().cloned().collect()
    }

    /// Refusals recorded since the hub started.
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn take_token(&self) -> bool {
        let mut bucket = self.limiter.lock();
        let now = Instant::now();
        let refill = now.duration_since(bucket.last).as_secs_f64() * LINES_PER_SECOND;
        bucket.last = now;
        bucket.tokens = (bucket.tokens + refill).min(BURST);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Authentication failures at `warn` (someone may be guessing), server
/// faults at `error`, every other refusal at `info`.
fn log(refusal: &Refusal, message: &str, suppressed: u64) {
    let route = refusal.route.as_deref().unwrap_or("-");
    let client = refusal
        .client
        .map_or_else(|| "-".to_owned(), |ip| ip.to_string());
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                route,
                status = refusal.status,
                code = refusal.code,
                client = client.as_str(),
                request_id = refusal.request_id.as_str(),
                suppressed,
                "connection refused: {message}"
            )
        };
    }
    match refusal.status {
        500.. => line!(error),
        401 | 403 => line!(warn),
        _ => line!(info),
    }
}

/// A refusal of `status`/`code`, now.
pub(crate) fn refusal(
    route: Option<&str>,
    status: u16,
    code: &'static str,
    client: Option<IpAddr>,
    request_id: String,
) -> Refusal {
    Refusal {
        at_unix_ms: unix_ms(SystemTime::now()),
        route: route.map(str::to_owned),
        status,
        code,
        client,
        request_id,
    }
}

/// The client's `X-Request-Id` if it is short and plain (1–64 of
/// `A-Z a-z 0-9 - _ . :`), else a new one: 16 hex digits from a process-wide
/// counter mixed with a per-process random key, unique in this process and
/// unlikely to repeat across processes.
pub(crate) fn request_id(offered: Option<&http::HeaderValue>) -> String {
    if let Some(value) = offered.and_then(|v| v.to_str().ok())
        && (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return value.to_owned();
    }
    use std::hash::{BuildHasher, RandomState};
    use std::sync::OnceLock;
    static KEY: OnceLock<RandomState> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}", KEY.get_or_init(RandomState::new).hash_one(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent_and_counts_all() {
        let log = RefusalLog::default();
        for i in 0..(RECENT + 5) {
            log.record(
                refusal(Some("/ws"), 400, "missing_id", None, i.to_string()),
                "x",
            );
        }
        let recent = log.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].request_id, "5");
        assert_eq!(log.total(), (RECENT + 5) as u64);
    }

    #[test]
    fn a_flood_is_rate_limited() {
        let log = RefusalLog::default();
        for _ in 0..1000 {
            log.record(refusal(None, 503, "over_capacity", None, "r".into()), "x");
        }
        // The burst got through; the rest (less a refill of a few tokens
        // while the loop ran) were counted as suppressed.
        let suppressed = log.suppressed.load(Ordering::Relaxed);
        assert!(
            (700..=950).contains(&suppressed),
            "suppressed {suppressed} of 1000"
        );
    }

    #[test]
    fn request_ids_are_taken_when_plain_and_made_otherwise() {
        let plain = http::HeaderValue::from_static("abc-123");
        assert_eq!(request_id(Some(&plain)), "abc-123");
        let odd = http::HeaderValue::from_static("a b");
        let made = request_id(Some(&odd));
        assert_eq!(made.len(), 16);
        assert_ne!(made, request_id(None));
    }
}
