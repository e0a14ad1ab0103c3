//! The per-connection message rate limit (`limits.max_message_rate`).

use tokio::time::Instant;

/// The verdict of the rate limit on one message.
pub(crate) enum Rate {
    Allowed,
    /// Over the limit: refuse this message.
    Refused,
    /// Kept sending after the bucket ran dry: close the connection.
    Abusive,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up. Refused
/// messages fill a second bucket of the same size; a client that fills it
/// (sends `burst` messages more than it may) is abusive.
pub(crate) struct TokenBucket {
    rate: u32,
    burst: u32,
    // f32 is plenty for counts up to millions and keeps the bucket at 32 B.
    tokens: f32,
    refused: f32,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate,
            burst: burst.max(1),
            tokens: burst.max(1) as f32,
            refused: 0.0,
            last: Instant::now(),
        }
    }

    pub(crate) fn take(&mut self, now: Instant) -> Rate {
        if self.rate == 0 {
            return Rate::Allowed;
        }
        let refill = now.saturating_duration_since(self.last).as_secs_f32() * self.rate as f32;
        self.last = now;
        let burst = self.burst as f32;
        self.tokens = (self.tokens + refill).min(burst);
        self.refused = (self.refused - refill).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Rate::Allowed;
        }
        self.refused += 1.0;
        if self.refused >= burst {
            Rate::Abusive
        } else {
            Rate::Refused
        }
    }
}
