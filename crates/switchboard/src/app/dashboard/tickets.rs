//! Stream tickets: short-lived, single-use tokens that open the dashboard's
//! event stream.
//!
//! Why: a browser's `EventSource` cannot send an `Authorization` header, so
//! the stream must take its credential in the URL — where proxies, access
//! logs and the browser's history may keep it. The API key must never go
//! there. Instead the page trades the key (in a header, `POST
//! /api/stats/ticket`) for a ticket that opens one stream within
//! [`TICKET_TTL`] and is then spent: a ticket read from a log later opens
//! nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::StatusCode;
use parking_lot::Mutex;

use crate::http_error::HttpError;

/// How long a ticket stays valid unspent: long enough for a page to open
/// its stream on a slow link, short enough that a leaked one is stale.
pub(crate) const TICKET_TTL: Duration = Duration::from_secs(30);

/// Unspent tickets kept at most (~80 B each: 10,000 cost under 1 MiB).
/// Past it, a new ticket is refused with 429 until some expire or are
/// spent: a client looping on `POST /api/stats/ticket` cannot grow memory.
pub(crate) const MAX_TICKETS: usize = 10_000;

/// The unspent tickets of one server.
#[derive(Default)]
pub(crate) struct Tickets {
    unspent: Mutex<HashMap<String, Instant>>,
}

impl Tickets {
    /// A new ticket, valid for [`TICKET_TTL`].
    pub(crate) fn issue(&self) -> Result<String, HttpError> {
        let ticket = random_hex()?;
        let now = Instant::now();
        let mut unspent = self.unspent.lock();
        if unspent.len() >= MAX_TICKETS {
            unspent.retain(|_, expires| *expires > now);
        }
        if unspent.len() >= MAX_TICKETS {
            return Err(HttpError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_tickets",
                format!(
                    "{MAX_TICKETS} stream tickets are waiting to be used: open a stream with one, or retry in {} s when they expire",
                    TICKET_TTL.as_secs()
                ),
            ));
        }
        unspent.insert(ticket.clone(), now + TICKET_TTL);
        Ok(ticket)
    }

    /// Spends `ticket`: `true` once for a ticket issued less than
    /// [`TICKET_TTL`] ago, `false` after that and for any other string.
    pub(crate) fn redeem(&self, ticket: &str) -> bool {
        let expires = self.unspent.lock().remove(ticket);
        expires.is_some_and(|expires| expires > Instant::now())
    }
}

/// 128 random bits from the operating system, in hex.
fn random_hex() -> Result<String, HttpError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|err| {
        HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("no randomness for a ticket: {err}"),
        )
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_once() {
        let tickets = Tickets::default();
        let ticket = tickets.issue().expect("ticket");
        assert_eq!(ticket.len(), 32);
        assert!(!tickets.redeem("not-a-ticket"));
        assert!(tickets.redeem(&ticket));
        assert!(!tickets.redeem(&ticket), "spent");
        assert_ne!(tickets.issue().expect("ticket"), ticket);
    }

    #[test]
    fn unspent_tickets_are_bounded() {
        let tickets = Tickets::default();
        for _ in 0..MAX_TICKETS {
            tickets.issue().expect("ticket");
        }
        let err = tickets.issue().expect_err("over the bound");
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.code, "too_many_tickets");
    }
}
