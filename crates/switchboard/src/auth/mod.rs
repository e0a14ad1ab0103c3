//! Who may connect, and who may call the backend API.
//!
//! - [`Authenticator`]: checks every WebSocket upgrade request before the
//!   101 and returns the client's [`Identity`] (its client ID, when its
//!   credentials expire, what it may do). [`jwt::JwtAuthenticator`] is the
//!   built-in one; write your own for sessions, opaque tokens or mTLS.
//! - [`AllowedOrigins`]: the browser origins that may open WebSockets and
//!   call the API.
//! - [`AllowedHosts`]: the `Host` names a server on a loopback address
//!   answers to besides `localhost` (DNS rebinding).
//! - [`ApiKeys`]: the keys that open `/api/*` (and optionally `/metrics`
//!   and `/heartbeat`).
//! - [`TrustedProxies`]: whose `X-Forwarded-For` is believed, for the
//!   per-IP limits.
//!
//! All of it is set on the hub with a [`Security`]:
//!
//! ```
//! use std::sync::Arc;
//! use switchboard::auth::{AllowedOrigins, ApiKeys};
//! use switchboard::auth::jwt::{JwtAuthenticator, JwtConfig, JwtKey};
//! use switchboard::{Hub, Limits, Security};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let jwt = JwtAuthenticator::new(JwtConfig::new(JwtKey::Secret(
//!     b"a shared secret of at least 32 bytes!".to_vec(),
//! )))?;
//! let security = Security {
//!     authenticator: Some(Arc::new(jwt)),
//!     allowed_origins: Some(AllowedOrigins::new(["https://app.example.com"])?),
//!     api_keys: ApiKeys::new(["0123456789abcdef0123456789abcdef"])?,
//!     ..Security::default()
//! };
//! let hub = Hub::builder(Limits::default()).security(security).build();
//! # let _ = hub;
//! # Ok(())
//! # }
//! ```
//!
//! The threat model — what this protects, how, and what it does not — is
//! docs/security.md.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::request::Parts;
use http::{HeaderValue, StatusCode, header};

use crate::BoxFuture;
use crate::http_error::HttpError;
use crate::id::{ClientId, Topic};

mod api_key;
mod hosts;
mod ip;
#[cfg(feature = "jwt")]
pub mod jwt;
mod origin;

pub(crate) use api_key::require_api_key;
pub use api_key::{ApiKeyError, ApiKeys, MIN_API_KEY_LEN};
pub use hosts::{AllowedHosts, HostError, is_loopback_host};
pub use ip::{ClientIp, ProxyError, TrustedProxies};
pub(crate) use ip::{IpGuard, IpLimiter};
pub(crate) use origin::is_same_origin;
pub use origin::{AllowedOrigins, OriginError};

/// The `switchboard.v1` client protocol (docs/protocol-v1.md), chosen by
/// offering it in `Sec-WebSocket-Protocol`.
pub const SUBPROTOCOL_V1: &str = "switchboard.v1";

/// The plain relay protocol, for a client that must offer a subprotocol
/// (a browser passing `bearer.<jwt>`) but wants the plain relay, byte for
/// byte as without one.
pub const SUBPROTOCOL_PLAIN: &str = "switchboard.plain";

/// A `Sec-WebSocket-Protocol` entry starting with this carries a bearer
/// token: `bearer.<token>`. Browsers cannot set an `Authorization` header on
/// a WebSocket, so they offer `["switchboard.v1", "bearer.<jwt>"]`; the
/// server takes the token from the second entry and answers with
/// `switchboard.v1` only, never echoing the token.
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// Checks the credentials of a WebSocket upgrade request.
///
/// Called by [`ws`](crate::ws) for every upgrade on a hub whose
/// [`Security::authenticator`] is set, after the handshake, origin and
/// per-IP checks and before the handler's `connect`. Return the client's
/// [`Identity`] to accept it — handlers find it in the request's extensions
/// (`request.extensions.get::<Identity>()`) — or an [`HttpError`] (usually
/// 401 via [`unauthorized`]) to refuse the upgrade with that status and a
/// JSON body.
///
/// ```
/// use switchboard::auth::{Authenticator, Identity, bearer_token, unauthorized};
/// use switchboard::{BoxFuture, ClientId, HttpError};
///
/// /// Opaque tokens looked up in a table (a database in real life).
/// struct Sessions(std::collections::HashMap<String, String>);
///
/// impl Authenticator for Sessions {
///     fn authenticate<'a>(
///         &'a self,
///         request: &'a http::request::Parts,
///     ) -> BoxFuture<'a, Result<Identity, HttpError>> {
///         Box::pin(async move {
///             let token = bearer_token(request)?
///                 .ok_or_else(|| unauthorized("missing_token", "send a session token"))?;
///             let user = self
///                 .0
///                 .get(&token)
///                 .ok_or_else(|| unauthorized("invalid_token", "unknown session"))?;
///             let id = ClientId::new(user)
///                 .map_err(|e| unauthorized("invalid_token", e.to_string()))?;
///             Ok(Identity::new(id))
///         })
///     }
/// }
/// ```
pub trait Authenticator: Send + Sync + 'static {
    /// Accepts the request with the client's identity, or refuses it.
    fn authenticate<'a>(&'a self, request: &'a Parts)
    -> BoxFuture<'a, Result<Identity, HttpError>>;

    /// Checks a token a connected client sends to extend its session (a
    /// `switchboard.v1` `refresh`), as the handshake would. The default
    /// refuses: an authenticator that does not read bearer tokens cannot
    /// refresh.
    fn refresh<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Identity, HttpError>> {
        let _ = token;
        Box::pin(std::future::ready(Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "refresh_not_supported",
            "this server's authenticator does not accept tokens in-band: reconnect with new credentials",
        ))))
    }
}

/// Who a client is, as an [`Authenticator`] proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Identity {
    /// The client ID the connection is registered under (the JWT's `sub`).
    pub client_id: ClientId,
    /// When the credentials stop being valid (the JWT's `exp`): the
    /// connection is then closed with 4002 after [`Security::expiry_grace`].
    pub expires_at: Option<SystemTime>,
    /// What the client may do; unrestricted by default.
    pub permissions: Arc<Permissions>,
    /// The client's presence meta (JSON text, at most
    /// [`MAX_META_BYTES`](crate::backend::MAX_META_BYTES)): what watchers of a topic
    /// it subscribes to see of it. The JWT's `sb_presence` claim.
    pub presence_meta: Option<Arc<str>>,
}

impl Identity {
    /// An identity that never expires and may do anything.
    pub fn new(client_id: ClientId) -> Self {
        Self {
            client_id,
            expires_at: None,
            permissions: Permissions::unrestricted(),
            presence_meta: None,
        }
    }

    /// Sets the client's presence meta (JSON text).
    pub fn with_presence_meta(mut self, meta: Arc<str>) -> Self {
        self.presence_meta = Some(meta);
        self
    }

    /// Sets when the credentials expire.
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Sets what the client may do.
    pub fn with_permissions(mut self, permissions: Permissions) -> Self {
        self.permissions = Arc::new(permissions);
        self
    }
}

/// What an authenticated client may do on the relay. `None` means no
/// restriction; `Some(vec![])` allows nothing.
///
/// The JWT authenticator reads them from the claims `sb_targets`,
/// `sb_subscribe` and `sb_publish` (arrays of [`NamePattern`]s).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Permissions {
    /// Client IDs this client may relay to (`{"targets":[…]}`).
    pub targets: Option<Vec<NamePattern>>,
    /// Topics it may subscribe to (and so join `/chat`, the topic `chat`).
    pub subscribe: Option<Vec<NamePattern>>,
    /// Topics it may publish to (and so send on `/chat`).
    pub publish: Option<Vec<NamePattern>>,
}

impl Permissions {
    /// No restriction, shared: one allocation for every unrestricted client.
    pub fn unrestricted() -> Arc<Self> {
        static UNRESTRICTED: std::sync::LazyLock<Arc<Permissions>> =
            std::sync::LazyLock::new(|| Arc::new(Permissions::default()));
        Arc::clone(&UNRESTRICTED)
    }

    /// Whether nothing is restricted.
    pub fn is_unrestricted(&self) -> bool {
        self.targets.is_none() && self.subscribe.is_none() && self.publish.is_none()
    }

    /// Whether the client may relay to `target`.
    pub fn may_send_to(&self, target: &ClientId) -> bool {
        allows(self.targets.as_deref(), target.as_str())
    }

    /// Whether the client may subscribe to `topic`.
    pub fn may_subscribe(&self, topic: &Topic) -> bool {
        allows(self.subscribe.as_deref(), topic.as_str())
    }

    /// Whether the client may publish to `topic`.
    pub fn may_publish(&self, topic: &Topic) -> bool {
        allows(self.publish.as_deref(), topic.as_str())
    }
}

fn allows(patterns: Option<&[NamePattern]>, name: &str) -> bool {
    patterns.is_none_or(|patterns| patterns.iter().any(|p| p.matches(name)))
}

/// A pattern over client IDs or topics: `"*"` (anything), `"room/*"`
/// (anything starting with `room/`), or an exact name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern(PatternKind);

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternKind {
    Any,
    Prefix(String),
    Exact(String),
}

/// Why a [`NamePattern`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid pattern {pattern:?}: use \"*\", a name, or a prefix ending in \"*\" such as \"room/*\" (a \"*\" may only come last)"
)]
pub struct PatternError {
    /// The pattern, cut to 60 characters.
    pub pattern: String,
}

impl NamePattern {
    /// Parses `"*"`, `"prefix*"` or an exact name.
    pub fn new(pattern: &str) -> Result<Self, PatternError> {
        let error = || PatternError {
            pattern: pattern.chars().take(60).collect(),
        };
        let kind = match pattern.strip_suffix('*') {
            Some("") => PatternKind::Any,
            Some(prefix) if !prefix.contains('*') => PatternKind::Prefix(prefix.to_owned()),
            Some(_) => return Err(error()),
            None if pattern.is_empty() || pattern.contains('*') => return Err(error()),
            None => PatternKind::Exact(pattern.to_owned()),
        };
        Ok(Self(kind))
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match &self.0 {
            PatternKind::Any => true,
            PatternKind::Prefix(prefix) => name.starts_with(prefix.as_str()),
            PatternKind::Exact(exact) => name == exact,
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            PatternKind::Any => f.write_str("*"),
            PatternKind::Prefix(prefix) => write!(f, "{prefix}*"),
            PatternKind::Exact(exact) => f.write_str(exact),
        }
    }
}

/// The security settings of a hub: client authentication, origin checks,
/// API keys and trusted proxies. The default secures nothing (every client
/// picks its own ID, every origin and every API caller is accepted), which
/// suits tests and loopback development; the `switchboard` binary refuses
/// to start like that on a non-loopback address.
///
/// Build it with struct update syntax, `Security { api_keys, ..Security::default() }`,
/// so that settings added later keep their defaults.
#[derive(Clone)]
pub struct Security {
    /// Checks every WebSocket upgrade; `None` accepts every client
    /// unauthenticated (the relay then takes its ID from `?id=`).
    pub authenticator: Option<Arc<dyn Authenticator>>,
    /// How long a connection may stay open after its credentials expired
    /// ([`Identity::expires_at`]) before it is closed with 4002. Default
    /// 30 s.
    pub expiry_grace: Duration,
    /// Browser origins allowed to open WebSockets; `None` allows any. A
    /// request with another `Origin` gets 403 before the upgrade; a request
    /// without `Origin` (not a browser) is not affected.
    ///
    /// The API (`/api/*`) takes browser requests only from these origins
    /// and from the server's own (the `Origin` naming the request's `Host`);
    /// `None` there means no other origin, not any (see
    /// [`api`](crate::api)).
    pub allowed_origins: Option<AllowedOrigins>,
    /// `Host` names answered besides the loopback ones. `None` (the
    /// default): on a loopback listener only `localhost` (and
    /// `*.localhost`), `127.0.0.0/8` and `[::1]` are answered, any name
    /// elsewhere. Set: the listed names and the loopback ones, on any
    /// listener. Other names get 421 `host_not_allowed` before routing —
    /// what a DNS-rebinding page looks like. List the public name when a
    /// reverse proxy on the same machine forwards it to a loopback
    /// listener; `*` turns the check off.
    pub allowed_hosts: Option<AllowedHosts>,
    /// Keys that open `/api/*` (`Authorization: Bearer <key>`); empty
    /// leaves the API open.
    pub api_keys: ApiKeys,
    /// Whether `/metrics` needs an API key too (when keys are set).
    /// Default `true`: the counters tell an outsider how busy the server is.
    pub protect_metrics: bool,
    /// Whether `/heartbeat` needs an API key (when keys are set). Default
    /// `false`, so load balancers can probe it.
    pub protect_heartbeat: bool,
    /// Peers whose `X-Forwarded-For` names the client, for the per-IP
    /// limits; empty (the default) believes no one.
    pub trusted_proxies: TrustedProxies,
}

impl Default for Security {
    fn default() -> Self {
        Self {
            authenticator: None,
            expiry_grace: Duration::from_secs(30),
            allowed_origins: None,
            allowed_hosts: None,
            api_keys: ApiKeys::default(),
            protect_metrics: true,
            protect_heartbeat: false,
            trusted_proxies: TrustedProxies::default(),
        }
    }
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Security")
            .field("authenticator", &self.authenticator.is_some())
            .field("expiry_grace", &self.expiry_grace)
            .field("allowed_origins", &self.allowed_origins)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("api_keys", &self.api_keys)
            .field("protect_metrics", &self.protect_metrics)
            .field("protect_heartbeat", &self.protect_heartbeat)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
}

/// A 401 with a JSON body and `WWW-Authenticate: Bearer` (RFC 6750 §3).
pub fn unauthorized(
    code: &'static str,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> HttpError {
    let challenge = if code == "missing_token" {
        HeaderValue::from_static("Bearer realm=\"switchboard\"")
    } else {
        HeaderValue::from_static("Bearer realm=\"switchboard\", error=\"invalid_token\"")
    };
    HttpError::new(StatusCode::UNAUTHORIZED, code, message)
        .with_header(header::WWW_AUTHENTICATE, challenge)
}

/// The bearer token of an upgrade request, from the first place that has
/// one:
///
/// 1. `Authorization: Bearer <token>` (a header any non-browser client can
///    set);
/// 2. a `Sec-WebSocket-Protocol` entry `bearer.<token>` (what browsers can
///    do: `new WebSocket(url, ["switchboard.v1", "bearer." + jwt])`);
/// 3. the query parameter `?token=<token>` (works everywhere, but URLs end
///    up in proxy and access logs: prefer the other two).
///
/// `Ok(None)` when there is none; an `Authorization` header with another
/// scheme, or an empty token, is a 401 `invalid_token`; `?token=` given
/// twice is a 400 `invalid_query`.
pub fn bearer_token(request: &Parts) -> Result<Option<String>, HttpError> {
    if let Some(value) = request.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| {
            unauthorized(
                "invalid_token",
                "the Authorization header is not ASCII: send `Authorization: Bearer <token>`",
            )
        })?;
        let token = strip_bearer(value).ok_or_else(|| {
            unauthorized(
                "invalid_token",
                "the Authorization header must be `Bearer <token>`",
            )
        })?;
        return Ok(Some(token.to_owned()));
    }
    for entry in offered_subprotocols(request) {
        if let Some(token) = entry.strip_prefix(BEARER_PROTOCOL_PREFIX) {
            if token.is_empty() {
                return Err(unauthorized(
                    "invalid_token",
                    "the Sec-WebSocket-Protocol entry `bearer.` has no token after the dot",
                ));
            }
            return Ok(Some(token.to_owned()));
        }
    }
    match crate::query::param(&request.uri, "token")? {
        Some(token) if token.is_empty() => Err(unauthorized(
            "invalid_token",
            "`?token=` is empty: put the token after the `=`",
        )),
        token => Ok(token),
    }
}

/// `Bearer <token>`, the scheme case-insensitive (RFC 7235 §2.1).
pub(crate) fn strip_bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Every entry of every `Sec-WebSocket-Protocol` header, trimmed.
pub(crate) fn offered_subprotocols(request: &Parts) -> impl Iterator<Item = &str> {
    request
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
}

/// Picks the subprotocol to answer with: the first of `supported` (the
/// endpoint's, in its order of preference) that the client offered.
///
/// Refused with 400:
/// - `subprotocol_required`: a `bearer.` entry without a protocol the
///   endpoint speaks. The answer cannot echo the token, and browsers fail a
///   handshake in which they offered protocols and got none back — after
///   the server has accepted, a confusing failure this turns into a clear
///   one.
/// - `unsupported_subprotocol`: only `switchboard.*` protocols this endpoint
///   does not speak (a `switchboard.v1` client on `/chat`, say).
///
/// Other unknown protocols are not an error: the server answers without one
/// (RFC 6455 §4.2.2), as servers that speak none do.
pub(crate) fn negotiate_subprotocol(
    request: &Parts,
    supported: &[&'static str],
) -> Result<Option<&'static str>, HttpError> {
    let mut bearer = false;
    let mut ours = Vec::new();
    for entry in offered_subprotocols(request) {
        bearer |= entry.starts_with(BEARER_PROTOCOL_PREFIX);
        if entry.starts_with("switchboard.") {
            ours.push(entry);
        }
    }
    if let Some(chosen) = supported.iter().find(|name| ours.contains(name)) {
        return Ok(Some(chosen));
    }
    if ours.is_empty() && !bearer {
        // The usual upgrade: nothing offered, nothing to explain (building
        // the explanation below cost ~3,800 instructions per handshake).
        return Ok(None);
    }
    let speaks = if supported.is_empty() {
        "this endpoint speaks no subprotocol".to_owned()
    } else {
        format!(
            "this endpoint speaks {}",
            supported
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(" or ")
        )
    };
    if let Some(first) = ours.first() {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_subprotocol",
            format!(
                "subprotocol {:?} is not spoken here: {speaks}",
                first.chars().take(40).collect::<String>()
            ),
        ));
    }
    if bearer {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "subprotocol_required",
            format!(
                "a `{BEARER_PROTOCOL_PREFIX}<token>` subprotocol entry must come with a protocol the server can answer with ({speaks}): offer e.g. [\"{}\", \"{BEARER_PROTOCOL_PREFIX}<token>\"]",
                supported.first().copied().unwrap_or("switchboard.plain")
            ),
        ));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("request").into_parts().0
    }

    #[test]
    fn token_sources_in_order() {
        let p = parts(
            "/ws?token=q",
            &[
                ("authorization", "bearer h"),
                ("sec-websocket-protocol", "switchboard.v1, bearer.p"),
            ],
        );
        assert_eq!(bearer_token(&p).expect("ok").as_deref(), Some("h"));
        let p = parts(
            "/ws?token=q",
            &[("sec-websocket-protocol", "switchboard.v1, bearer.p")],
        );
        assert_eq!(bearer_token(&p).expect("ok").as_deref(), Some("p"));
        let p = parts("/ws?id=1&token=q%2Eb", &[]);
        assert_eq!(bearer_token(&p).expect("ok").as_deref(), Some("q.b"));
        assert_eq!(bearer_token(&parts("/ws", &[])).expect("ok"), None);
        let err =
            bearer_token(&parts("/ws", &[("authorization", "Basic dTpw")])).expect_err("basic");
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        assert_eq!(err.code, "invalid_token");
    }

    #[test]
    fn subprotocol_answer() {
        const RELAY: &[&str] = &[SUBPROTOCOL_V1, SUBPROTOCOL_PLAIN];
        const CHAT: &[&str] = &[SUBPROTOCOL_PLAIN];
        let offer = |value: &str| parts("/ws", &[("sec-websocket-protocol", value)]);
        let p = parts(
            "/ws",
            &[
                ("sec-websocket-protocol", "bearer.x"),
                ("sec-websocket-protocol", "switchboard.v1"),
            ],
        );
        assert_eq!(
            negotiate_subprotocol(&p, RELAY).expect("ok"),
            Some("switchboard.v1")
        );
        // The endpoint's preference wins over the client's order.
        let both = offer("switchboard.plain, switchboard.v1");
        assert_eq!(
            negotiate_subprotocol(&both, RELAY).expect("ok"),
            Some("switchboard.v1")
        );
        assert_eq!(
            negotiate_subprotocol(&both, CHAT).expect("ok"),
            Some("switchboard.plain")
        );
        // Someone else's protocol: answered without one.
        assert_eq!(
            negotiate_subprotocol(&offer("graphql-ws"), RELAY).expect("ok"),
            None
        );
        // A bearer entry alone cannot be answered.
        let err = negotiate_subprotocol(&offer("bearer.x"), RELAY).expect_err("bearer alone");
        assert_eq!(err.code, "subprotocol_required");
        // v1 where only the plain protocol is spoken.
        let err = negotiate_subprotocol(&offer("switchboard.v1, bearer.x"), CHAT)
            .expect_err("v1 on chat");
        assert_eq!(err.code, "unsupported_subprotocol");
        assert!(err.message.contains("switchboard.plain"), "{}", err.message);
    }

    #[test]
    fn name_patterns() {
        let any = NamePattern::new("*").expect("any");
        let room = NamePattern::new("room/*").expect("prefix");
        let exact = NamePattern::new("bob").expect("exact");
        assert!(any.matches("x"));
        assert!(room.matches("room/1") && !room.matches("roo"));
        assert!(exact.matches("bob") && !exact.matches("bobby"));
        for bad in ["", "a*b", "**", "*a"] {
            let err = NamePattern::new(bad).expect_err(bad);
            assert!(err.to_string().contains("invalid pattern"), "{err}");
        }
        assert_eq!(room.to_string(), "room/*");
    }
}
