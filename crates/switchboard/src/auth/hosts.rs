//! The host names a server answers to (`Host`), against DNS rebinding.
//!
//! A page on `http://evil.example:8080` whose DNS name the attacker then
//! points at 127.0.0.1 is, to the browser, talking to its own origin: no
//! preflight, no origin check, the answers readable. Only the `Host`
//! header still says `evil.example`. A server on a loopback address is
//! meant for this machine's programs, which call it `localhost`,
//! `127.0.0.1` or `[::1]`; [`serve`](crate::serve) refuses other names
//! there (421 `host_not_allowed`) unless they are listed in
//! [`Security::allowed_hosts`](crate::Security::allowed_hosts).

use std::fmt;
use std::net::IpAddr;

/// Host names the server answers to besides the loopback ones: exact
/// names or addresses (`rt.example.com`, `192.0.2.7`, `[2001:db8::7]`),
/// subdomain wildcards (`*.example.com` matches `a.example.com` and
/// `a.b.example.com`, not `example.com`), or `*` for any. Names compare
/// case-insensitively, a trailing dot ignored; ports are not part of a
/// pattern (the listener decides the port).
#[derive(Clone, PartialEq, Eq)]
pub struct AllowedHosts(Vec<HostPattern>);

#[derive(Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Subdomains(String),
}

/// Why a host pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The list is empty.
    #[error(
        "the host list is empty: list names such as \"rt.example.com\", or leave allowed_hosts unset"
    )]
    Empty,
    /// A pattern that is not a host name, an address, `*.name` or `*`.
    #[error("invalid host {pattern:?}: {reason}")]
    Invalid {
        /// The pattern.
        pattern: String,
        /// What is wrong and how to write it.
        reason: &'static str,
    },
}

impl AllowedHosts {
    /// Parses the patterns; at least one.
    pub fn new<I, S>(patterns: I) -> Result<Self, HostError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let list = patterns
            .into_iter()
            .map(|p| parse(p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err(HostError::Empty);
        }
        Ok(Self(list))
    }

    /// Whether `host` (the host part of a `Host` header, without its port;
    /// IPv6 in brackets or not) is listed.
    pub fn allows(&self, host: &str) -> bool {
        let host = normalize(host);
        self.0.iter().any(|pattern| match pattern {
            HostPattern::Any => true,
            HostPattern::Exact(exact) => *exact == host,
            HostPattern::Subdomains(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        })
    }
}

/// Whether `host` (without its port) names this machine's loopback
/// interface: `localhost` and its subdomains (RFC 6761 §6.3: resolvers and
/// browsers answer them with loopback, so no outsider can point them
/// elsewhere), `127.0.0.0/8`, `::1`, and `::ffff:127.x.y.z`.
pub fn is_loopback_host(host: &str) -> bool {
    // Checked on every request's `Host`, so without the lower-case copy
    // `normalize` makes (one allocation per request).
    let host = strip_brackets_and_dot(host);
    let localhost = |name: &str| name.eq_ignore_ascii_case("localhost");
    if localhost(host)
        || host
            .len()
            .checked_sub(".localhost".len())
            .and_then(|dot| host.get(dot..))
            .is_some_and(|tail| tail.starts_with('.') && localhost(&tail[1..]))
    {
        return true;
    }
    host.parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Without IPv6 brackets or a trailing dot.
fn strip_brackets_and_dot(host: &str) -> &str {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host)
}

/// Lower case, without IPv6 brackets or a trailing dot.
fn normalize(host: &str) -> String {
    strip_brackets_and_dot(host).to_ascii_lowercase()
}

fn parse(raw: &str) -> Result<HostPattern, HostError> {
    let invalid = |reason| HostError::Invalid {
        pattern: raw.chars().take(100).collect(),
        reason,
    };
    let text = raw.trim();
    if text == "*" {
        return Ok(HostPattern::Any);
    }
    if text.contains("://") || text.contains(['/', '?', '#', '@']) {
        return Err(invalid(
            "a host is a bare name or address, e.g. \"rt.example.com\" (no scheme, path or user)",
        ));
    }
    let host = normalize(text);
    if host.parse::<IpAddr>().is_ok() {
        return Ok(HostPattern::Exact(host));
    }
    if host.contains(':') {
        return Err(invalid(
            "a host pattern has no port: the listener decides the port",
        ));
    }
    let (wildcard, name) = match host.strip_prefix("*.") {
        Some(suffix) => (true, suffix),
        None => (false, host.as_str()),
    };
    let label_ok = |label: &str| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !name.split('.').all(label_ok) {
        return Err(invalid(
            "use a host name (letters, digits, - and _ between dots), an address, \"*.example.com\" or \"*\"",
        ));
    }
    Ok(if wildcard {
        HostPattern::Subdomains(format!(".{name}"))
    } else {
        HostPattern::Exact(name.to_owned())
    })
}

impl fmt::Debug for AllowedHosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(host) => f.write_str(host),
            Self::Subdomains(suffix) => write!(f, "*{suffix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names() {
        for host in [
            "localhost",
            "LOCALHOST",
            "localhost.",
            "app.localhost",
            "App.LocalHost.",
            ".localhost",
            "127.0.0.1",
            "127.1.2.3",
            "[::1]",
            "::1",
            "[::ffff:127.0.0.1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "localhost.evil.example",
            "mylocalhost",
            "localhost..",
            "é.localhos",
            "élocalhost",
            "0.0.0.0",
            "10.0.0.1",
            "[::]",
            "[::ffff:10.0.0.1]",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn patterns() {
        let allowed = AllowedHosts::new([
            "rt.example.com",
            "*.example.org",
            "192.0.2.7",
            "[2001:db8::7]",
        ])
        .expect("valid");
        for ok in [
            "rt.example.com",
            "RT.Example.com.",
            "a.example.org",
            "a.b.example.org",
            "192.0.2.7",
            "[2001:db8::7]",
        ] {
            assert!(allowed.allows(ok), "{ok}");
        }
        for refused in [
            "example.org",
            "evil.example",
            "rt.example.com.evil",
            "localhost",
        ] {
            assert!(!allowed.allows(refused), "{refused}");
        }
        assert!(AllowedHosts::new(["*"]).expect("any").allows("anything"));
        for (bad, says) in [
            ("https://rt.example.com", "bare name"),
            ("rt.example.com:443", "no port"),
            ("a..b", "host name"),
            ("*", ""),
        ] {
            match AllowedHosts::new([bad]) {
                Ok(_) => assert!(says.is_empty(), "{bad} accepted"),
                Err(err) => assert!(err.to_string().contains(says), "{bad}: {err}"),
            }
        }
        assert_eq!(
            AllowedHosts::new(Vec::<String>::new()),
            Err(HostError::Empty)
        );
    }
}
