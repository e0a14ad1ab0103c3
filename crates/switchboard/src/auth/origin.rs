//! The origin allow-list for WebSocket upgrades.
//!
//! Browsers send `Origin` with every WebSocket handshake and let any page
//! open a WebSocket to any server, cookies included: without this check a
//! page on another site could talk to the server as the user
//! (cross-site WebSocket hijacking).

use std::fmt;

/// Origins allowed to open WebSockets: exact origins
/// (`https://app.example.com`, `http://localhost:3000`) and wildcard
/// subdomains (`https://*.example.com` matches `https://a.example.com` and
/// `https://a.b.example.com`, not `https://example.com`).
///
/// Scheme, host and port must all match; a missing port is the scheme's
/// default (80 for `http`, 443 for `https`). Hosts compare
/// case-insensitively. `Origin: null` (sandboxed frames, `file://` pages)
/// never matches.
#[derive(Clone, PartialEq, Eq)]
pub struct AllowedOrigins(Vec<OriginPattern>);

#[derive(Clone, PartialEq, Eq)]
struct OriginPattern {
    scheme: String,
    host: Host,
    port: Option<u16>,
}

#[derive(Clone, PartialEq, Eq)]
enum Host {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Subdomains(String),
}

/// Why an origin pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OriginError {
    /// The list is empty, which would refuse every browser.
    #[error(
        "the origin list is empty: list origins such as \"https://app.example.com\", or leave allowed_origins unset to allow any"
    )]
    Empty,
    /// A pattern that is not `scheme://host[:port]`.
    #[error("invalid origin {pattern:?}: {reason}")]
    Invalid {
        /// The pattern.
        pattern: String,
        /// What is wrong and how to write it.
        reason: &'static str,
    },
}

impl AllowedOrigins {
    /// Parses the patterns; at least one.
    pub fn new<I, S>(patterns: I) -> Result<Self, OriginError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let list = patterns
            .into_iter()
            .map(|p| parse(p.as_ref(), true))
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err(OriginError::Empty);
        }
        Ok(Self(list))
    }

    /// Whether the value of an `Origin` header is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        let Ok(origin) = parse(origin, false) else {
            return false;
        };
        let Host::Exact(host) = &origin.host else {
            return false;
        };
        self.0.iter().any(|pattern| {
            pattern.scheme == origin.scheme
                && pattern.port == origin.port
                && match &pattern.host {
                    Host::Exact(exact) => exact == host,
                    Host::Subdomains(suffix) => {
                        host.len() > suffix.len() && host.ends_with(suffix.as_str())
                    }
                }
        })
    }
}

fn parse(raw: &str, wildcard: bool) -> Result<OriginPattern, OriginError> {
    let invalid = |reason| OriginError::Invalid {
        pattern: raw.chars().take(100).collect(),
        reason,
    };
    let text = raw.trim();
    // A trailing slash is a common slip when copying an origin from a URL.
    let text = text.strip_suffix('/').unwrap_or(text);
    let (scheme, rest) = text
        .split_once("://")
        .ok_or_else(|| invalid("write scheme://host[:port], e.g. \"https://app.example.com\""))?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Err(invalid("the scheme must be letters, such as https"));
    }
    if rest.contains(['/', '?', '#', '@']) {
        return Err(invalid(
            "an origin has no path, query or user: write scheme://host[:port]",
        ));
    }
    let (host, port) = split_port(rest).ok_or_else(|| invalid("the port must be 1-65535"))?;
    let host = host.to_ascii_lowercase();
    if host.is_empty() {
        return Err(invalid("the host is missing"));
    }
    let host = match host.strip_prefix("*.") {
        Some(_) if !wildcard => return Err(invalid("a wildcard is not an origin")),
        Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
            Host::Subdomains(format!(".{suffix}"))
        }
        _ if host.contains('*') => {
            return Err(invalid(
                "a wildcard must be a whole first label: \"https://*.example.com\"",
            ));
        }
        _ => Host::Exact(host),
    };
    let port = port.or(match scheme.as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    });
    Ok(OriginPattern { scheme, host, port })
}

/// Whether the `Origin` value `origin` names the server a request was sent
/// to: the same host and port as `authority`, the request's `Host`. The
/// scheme is not compared: behind a proxy that terminates TLS the server
/// sees plain HTTP for an `https://` page, and one port does not serve both
/// schemes to a browser. A `Host` without a port takes the origin scheme's
/// default.
pub(crate) fn is_same_origin(origin: &str, authority: &str) -> bool {
    let Ok(origin) = parse(origin, false) else {
        return false;
    };
    let (Host::Exact(origin_host), Some(origin_port)) = (&origin.host, origin.port) else {
        return false;
    };
    let Some((host, port)) = split_port(authority) else {
        return false;
    };
    host.eq_ignore_ascii_case(origin_host) && port.unwrap_or(origin_port) == origin_port
}

/// `host[:port]`, with IPv6 hosts in brackets; `None` for a bad port.
fn split_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let port_at = match authority.rfind(':') {
        Some(at) if !authority[at..].contains(']') => at,
        _ => return Some((authority, None)),
    };
    let port = authority[port_at + 1..].parse::<u16>().ok()?;
    (port != 0).then_some((&authority[..port_at], Some(port)))
}

impl fmt::Debug for AllowedOrigins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl fmt::Debug for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            Host::Exact(host) => host.clone(),
            Host::Subdomains(suffix) => format!("*{suffix}"),
        };
        match self.port {
            Some(port) => write!(f, "{}://{host}:{port}", self.scheme),
            None => write!(f, "{}://{host}", self.scheme),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcard_origins() {
        let allowed = AllowedOrigins::new([
            "https://app.example.com",
            "https://*.example.org/",
            "http://localhost:3000",
            "http://[::1]:8080",
        ])
        .expect("valid");
        for ok in [
            "https://app.example.com",
            "https://APP.example.com:443",
            "https://a.example.org",
            "https://a.b.example.org",
            "http://localhost:3000",
            "http://[::1]:8080",
        ] {
            assert!(allowed.allows(ok), "{ok} must be allowed");
        }
        for refused in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://evil.com",
            "https://example.org",
            "https://evilexample.org",
            "https://app.example.com.evil.com",
            "http://localhost:3001",
            "null",
            "",
        ] {
            assert!(!allowed.allows(refused), "{refused} must be refused");
        }
    }

    #[test]
    fn same_origin_is_host_and_port() {
        for (origin, host) in [
            ("http://localhost:8080", "localhost:8080"),
            ("http://LOCALHOST:8080", "localhost:8080"),
            ("https://rt.example.com", "rt.example.com"),
            ("https://rt.example.com", "rt.example.com:443"),
            ("http://rt.example.com", "rt.example.com"),
            ("http://[::1]:8080", "[::1]:8080"),
        ] {
            assert!(is_same_origin(origin, host), "{origin} {host}");
        }
        for (origin, host) in [
            ("http://evil.example:8080", "localhost:8080"),
            ("http://localhost:8081", "localhost:8080"),
            ("https://rt.example.com", "rt.example.com:8443"),
            ("null", "localhost:8080"),
            ("http://localhost:8080", "bad host:x"),
        ] {
            assert!(!is_same_origin(origin, host), "{origin} {host}");
        }
    }

    #[test]
    fn bad_patterns_are_named() {
        for (bad, says) in [
            ("app.example.com", "scheme://host"),
            ("https://app.example.com/path", "no path"),
            ("https://a.*.example.com", "whole first label"),
            ("https://*", "whole first label"),
            ("https://host:0", "port"),
            ("https://host:99999", "port"),
            ("https://:443", "host is missing"),
        ] {
            let err = AllowedOrigins::new([bad]).expect_err(bad).to_string();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(err.contains(bad.trim_end_matches('/')), "{bad}: {err}");
        }
        assert_eq!(
            AllowedOrigins::new(Vec::<String>::new()),
            Err(OriginError::Empty)
        );
    }
}
