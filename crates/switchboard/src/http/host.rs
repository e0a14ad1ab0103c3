//! The `Host` of every request, checked in [`serve`](super::serve()) before
//! routing: present and well-formed, and one this server answers to.
//!
//! RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status
//! code to any HTTP/1.1 request message that lacks a Host header field and
//! to any request message that contains more than one Host header field
//! line or a Host header field with an invalid field value." hyper leaves
//! that to the server; a request refused here gets `Connection: close` too,
//! since a client that gets framing this wrong is not worth keeping.

use std::net::IpAddr;

use axum::response::{IntoResponse as _, Response};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, StatusCode, Version, header};

use crate::auth::{AllowedHosts, is_loopback_host};
use crate::http_error::HttpError;

/// Which `Host` names a server answers to: on a loopback listener, or with
/// [`Security::allowed_hosts`](crate::Security::allowed_hosts) set, the
/// loopback names and the listed ones; otherwise any.
///
/// Why: a web page can point a DNS name of its own at 127.0.0.1
/// (DNS rebinding); the browser then treats the server as that page's own
/// origin — no preflight, no `Origin` to refuse, answers readable — and
/// only `Host` still carries the page's name. A development server on
/// loopback with no credentials (the defaults) would otherwise be open to
/// every site its user visits.
#[derive(Debug)]
pub(crate) struct HostPolicy {
    loopback_listener: bool,
    allowed: Option<AllowedHosts>,
}

impl HostPolicy {
    pub(crate) fn new(listener: IpAddr, allowed: Option<AllowedHosts>) -> Self {
        Self {
            loopback_listener: listener.to_canonical().is_loopback(),
            allowed,
        }
    }

    /// 421 `host_not_allowed` for a name the server does not answer to. A
    /// request without `Host` (HTTP/1.0) is not a browser's: let through.
    pub(crate) fn check(&self, authority: Option<&Authority>) -> Result<(), HttpError> {
        let Some(authority) = authority else {
            return Ok(());
        };
        if !self.loopback_listener && self.allowed.is_none() {
            return Ok(());
        }
        let host = authority.host();
        if is_loopback_host(host) || self.allowed.as_ref().is_some_and(|a| a.allows(host)) {
            return Ok(());
        }
        let host: String = host.chars().take(100).collect();
        let message = if self.loopback_listener {
            format!(
                "this server listens on a loopback address and answers to localhost, 127.0.0.1 and [::1], not {host:?} (a web page pointing its own name at this machine, DNS rebinding, looks like this): if you reach the server by that name, through a reverse proxy for example, add it to allowed_hosts"
            )
        } else {
            format!("{host:?} is not one of the server's names: add it to allowed_hosts")
        };
        Err(HttpError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
            message,
        ))
    }
}

/// The authority a request is for: its `Host`, checked as RFC 9112 §3.2
/// asks, or — for an absolute-form target (`GET http://host/path`), which
/// RFC 9112 §3.2.2 says overrides `Host` — the target's. `None` for an
/// HTTP/1.0 request without `Host`.
pub(crate) fn authority(
    version: Version,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Result<Option<Authority>, HttpError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    let more = hosts.count();
    if more > 0 {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "invalid_host",
            format!(
                "the request has {} Host headers: send one (RFC 9112 §3.2)",
                more + 1
            ),
        ));
    }
    let host = match host {
        Some(host) => Some(parse(host)?),
        None if version == Version::HTTP_10 || version == Version::HTTP_09 => None,
        None => {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "missing_host",
                "an HTTP/1.1 request must have a Host header naming the server, e.g. `Host: localhost:8080` (RFC 9112 §3.2)",
            ));
        }
    };
    Ok(uri.authority().cloned().or(host))
}

/// A `Host` value: `host[:port]`, no user information, not empty.
fn parse(value: &HeaderValue) -> Result<Authority, HttpError> {
    let invalid = || {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            "invalid_host",
            format!(
                "the Host header {:?} is not host[:port] (RFC 9112 §3.2)",
                String::from_utf8_lossy(value.as_bytes())
                    .chars()
                    .take(100)
                    .collect::<String>()
            ),
        )
    };
    let text = value.to_str().map_err(|_| invalid())?;
    if text.is_empty() || text.contains('@') || split_port(text).is_none() {
        return Err(invalid());
    }
    text.parse::<Authority>().map_err(|_| invalid())
}

/// `host[:port]` split, the port a number (`Authority` takes any text
/// there); an IPv6 host keeps its brackets. `None` when malformed.
pub(crate) fn split_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        match rest {
            "" => (host, None),
            _ => (host, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(port) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            Some(port.parse::<u16>().ok()?)
        }
        Some(_) => return None,
    };
    (!host.is_empty()).then_some((host, port))
}

/// The response for a refused request: its JSON error, and the connection
/// closed after it.
pub(crate) fn refuse(refusal: HttpError) -> Response {
    let mut response = refusal.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(version: Version, uri: &str, hosts: &[&str]) -> Result<Option<String>, &'static str> {
        let mut headers = HeaderMap::new();
        for host in hosts {
            headers.append(header::HOST, HeaderValue::from_str(host).expect("value"));
        }
        authority(version, &uri.parse().expect("uri"), &headers)
            .map(|a| a.map(|a| a.to_string()))
            .map_err(|err| err.code)
    }

    #[test]
    fn host_policy_by_listener_and_list() {
        let check = |policy: &HostPolicy, host: &str| {
            policy
                .check(Some(&host.parse().expect("authority")))
                .map_err(|err| err.code)
        };
        let loopback = HostPolicy::new([127, 0, 0, 1].into(), None);
        assert_eq!(check(&loopback, "localhost:8080"), Ok(()));
        assert_eq!(
            check(&loopback, "evil.example:8080"),
            Err("host_not_allowed")
        );
        assert!(loopback.check(None).is_ok());
        let v6 = HostPolicy::new("::1".parse().expect("ip"), None);
        assert_eq!(check(&v6, "evil.example"), Err("host_not_allowed"));
        // Elsewhere any name, unless a list is set.
        let public = HostPolicy::new([192, 0, 2, 1].into(), None);
        assert_eq!(check(&public, "evil.example"), Ok(()));
        let listed = AllowedHosts::new(["rt.example.com"]).expect("hosts");
        let public = HostPolicy::new([0, 0, 0, 0].into(), Some(listed));
        assert_eq!(check(&public, "rt.example.com"), Ok(()));
        assert_eq!(check(&public, "localhost:1"), Ok(()));
        assert_eq!(check(&public, "evil.example"), Err("host_not_allowed"));
    }

    #[test]
    fn rfc_9112_host_rules() {
        let v11 = Version::HTTP_11;
        assert_eq!(
            check(v11, "/", &["localhost:8080"]),
            Ok(Some("localhost:8080".into()))
        );
        assert_eq!(check(v11, "/", &["[::1]:80"]), Ok(Some("[::1]:80".into())));
        assert_eq!(check(v11, "/", &[]), Err("missing_host"));
        assert_eq!(check(Version::HTTP_10, "/", &[]), Ok(None));
        assert_eq!(check(v11, "/", &["a", "a"]), Err("invalid_host"));
        for bad in [
            "",
            "user@host",
            "a b",
            "host:port",
            "host:",
            "host:99999",
            "a:1:2",
            "host/path",
            "[::1",
            "[::1]x",
            ":80",
        ] {
            assert_eq!(check(v11, "/", &[bad]), Err("invalid_host"), "{bad:?}");
        }
        // The absolute-form target wins over Host.
        assert_eq!(
            check(v11, "http://127.0.0.1:9/x", &["example.com"]),
            Ok(Some("127.0.0.1:9".into()))
        );
    }
}
