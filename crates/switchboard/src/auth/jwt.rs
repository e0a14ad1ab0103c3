//! The built-in [`Authenticator`]: JSON Web Tokens (RFC 7519).
//!
//! ```
//! use std::time::Duration;
//! use switchboard::auth::jwt::{JwtAuthenticator, JwtConfig, JwtKey};
//!
//! # fn main() -> Result<(), switchboard::auth::jwt::JwtError> {
//! let jwt = JwtAuthenticator::new(JwtConfig {
//!     issuer: Some("https://auth.example.com/".into()),
//!     audience: Some("switchboard".into()),
//!     clock_skew: Duration::from_secs(10),
//!     ..JwtConfig::new(JwtKey::Secret(b"a shared secret of at least 32 bytes!".to_vec()))
//! })?;
//! # let _ = jwt;
//! # Ok(())
//! # }
//! ```
//!
//! # What is checked
//!
//! - The signature, with the algorithms that fit the configured key and no
//!   others: a shared secret takes HS256/HS384/HS512; an RSA public key
//!   RS256/RS384/RS512/PS256/PS384/PS512; an EC key ES256/ES384; an Ed25519
//!   key EdDSA; a JWKS key its `alg`, or what its type takes. So `alg: none`
//!   is never accepted, and neither is a token signed with HS256 using the
//!   server's RSA public key as the secret (algorithm confusion).
//! - `exp` (required unless [`JwtConfig::require_exp`] is off) and `nbf`,
//!   each with [`JwtConfig::clock_skew`] of tolerance.
//! - `iss` and `aud` when configured (then the token must have them). `iss`
//!   must be a string, as RFC 7519 §4.1.1 defines it (a StringOrURI): a
//!   one-element array holding the right issuer is refused
//!   (`invalid_issuer`), whatever `jsonwebtoken` would accept.
//! - `kid`, when the key is a JWKS with several keys and
//!   [`JwtConfig::jwks_require_kid`] is on (the default): a token must name
//!   its key rather than be tried against each (`missing_kid`).
//! - `sub`: required, and must be a valid [`ClientId`]; it becomes the
//!   client's ID.
//!
//! # Claims that restrict a client
//!
//! Optional arrays of [`NamePattern`]s (`"*"`, `"room/*"`, `"bob"`); absent
//! means unrestricted, `[]` allows nothing:
//!
//! | claim | restricts |
//! |-------|-----------|
//! | `sb_targets` | client IDs the client may relay to |
//! | `sb_subscribe` | topics it may subscribe to (and so `/chat`) |
//! | `sb_publish` | topics it may publish to (and so send on `/chat`) |
//!
//! # The presence claim
//!
//! `sb_presence`: any JSON value of at most 1 KiB (as compact JSON text),
//! the client's presence meta — what watchers of a topic it subscribes to
//! see of it (`{"name":"Ann","avatar":"…"}`). Larger: 401
//! `presence_meta_too_large`. A refreshed token's claim is not applied to
//! topics joined before.
//!
//! # Errors
//!
//! Every refusal is 401 with a JSON body and `WWW-Authenticate: Bearer`;
//! the codes are `missing_token`, `invalid_token` (malformed, or a claim
//! that cannot be used), `unsupported_algorithm`, `missing_kid` (no `kid`
//! while the JWKS has several keys), `unknown_key` (a `kid` not in the
//! JWKS), `invalid_signature`, `token_expired`,
//! `token_not_yet_valid`, `invalid_issuer` and `invalid_audience`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use http::request::Parts;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;
use serde_json::Value;

use super::{Authenticator, Identity, NamePattern, Permissions, bearer_token, unauthorized};
use crate::BoxFuture;
use crate::http_error::HttpError;
use crate::id::ClientId;

/// The shortest HMAC secret accepted, in bytes (RFC 7518 §3.2: at least
/// the hash size).
pub const MIN_SECRET_LEN: usize = 32;

const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
const ED: &[Algorithm] = &[Algorithm::EdDSA];

/// Where the verification key comes from.
#[derive(Clone)]
#[non_exhaustive]
pub enum JwtKey {
    /// A shared secret for HS256 (HS384, HS512): at least
    /// [`MIN_SECRET_LEN`] bytes.
    Secret(Vec<u8>),
    /// A PEM public key: RSA (RS256, PS256, …), EC P-256/P-384 (ES256,
    /// ES384) or Ed25519 (EdDSA).
    PublicKeyPem(Vec<u8>),
    /// A PEM public key file, read again by [`JwtAuthenticator::reload`].
    PublicKeyFile(PathBuf),
    /// A JWKS document (RFC 7517 `{"keys":[…]}`); tokens pick a key by
    /// `kid`. Symmetric (`"kty":"oct"`) keys are refused.
    Jwks(String),
    /// A JWKS file, read again by [`JwtAuthenticator::reload`].
    JwksFile(PathBuf),
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("Secret(..)"),
            Self::PublicKeyPem(_) => f.write_str("PublicKeyPem(..)"),
            Self::PublicKeyFile(path) => f.debug_tuple("PublicKeyFile").field(path).finish(),
            Self::Jwks(_) => f.write_str("Jwks(..)"),
            Self::JwksFile(path) => f.debug_tuple("JwksFile").field(path).finish(),
        }
    }
}

/// How tokens are verified.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// The verification key.
    pub key: JwtKey,
    /// The `iss` tokens must have; `None` does not check it.
    pub issuer: Option<String>,
    /// The `aud` tokens must have (one of, if theirs is a list); `None`
    /// does not check it.
    pub audience: Option<String>,
    /// Tolerance for clocks that disagree, applied to `exp` and `nbf`.
    /// Default 30 s.
    pub clock_skew: Duration,
    /// Refuse tokens without `exp` (they would never expire). Default
    /// `true`.
    pub require_exp: bool,
    /// With a JWKS of several keys, refuse tokens without a `kid` header
    /// (401 `missing_kid`) instead of trying each key in turn, and refuse a
    /// JWKS in which such a key has no `kid`. Default `true`. Why: a token
    /// that names no key costs one signature check per key (a cheap way to
    /// make the server work), and which key verified it is left to chance
    /// when keys overlap in algorithm. A single-key JWKS, a PEM key or a
    /// secret needs no `kid`.
    pub jwks_require_kid: bool,
}

impl JwtConfig {
    /// Defaults around `key`: no issuer or audience check, 30 s of clock
    /// skew, `exp` required, `kid` required with a JWKS of several keys.
    pub fn new(key: JwtKey) -> Self {
        Self {
            key,
            issuer: None,
            audience: None,
            clock_skew: Duration::from_secs(30),
            require_exp: true,
            jwks_require_kid: true,
        }
    }
}

/// Why a [`JwtConfig`] cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The shared secret is too short to resist guessing.
    #[error(
        "the HS256 secret is {len} bytes long: use at least {MIN_SECRET_LEN} random bytes (e.g. `openssl rand -base64 48`)"
    )]
    WeakSecret {
        /// Its length.
        len: usize,
    },
    /// The shared secret is a PEM key.
    #[error(
        "the HS256 secret is a PEM key: configure public keys as jwt_public_key (RS256, ES256, EdDSA); an HMAC secret anyone can read lets anyone sign tokens"
    )]
    SecretIsPem,
    /// A key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not a PEM public key this crate can use.
    #[error("{what} is not a usable PEM public key: {hint}")]
    Pem {
        /// The file, or "the PEM key".
        what: String,
        /// What to do.
        hint: &'static str,
    },
    /// Not a JWKS document with a usable signing key.
    #[error("{what} is not a usable JWKS: {reason}")]
    Jwks {
        /// The file, or "the JWKS".
        what: String,
        /// What is wrong.
        reason: String,
    },
}

struct KeyEntry {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Verifies JWTs from the `Authorization` header, the `bearer.` subprotocol
/// entry or `?token=` (see [`bearer_token`]).
pub struct JwtAuthenticator {
    source: JwtKey,
    keys: RwLock<Arc<Vec<KeyEntry>>>,
    validation: Validation,
    require_exp: bool,
    issuer: Option<String>,
    require_kid: bool,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field("source", &self.source)
            .field("keys", &self.keys.read().len())
            .finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Loads the key (reading files now) and checks the configuration.
    pub fn new(config: JwtConfig) -> Result<Self, JwtError> {
        let keys = load(&config.key, config.jwks_require_kid)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.clock_skew.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["sub"];
        if config.require_exp {
            required.push("exp");
        }
        // `iss` is checked in `identity`, not by `jsonwebtoken`, which
        // takes an array of issuers too (see there).
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            source: config.key,
            keys: RwLock::new(Arc::new(keys)),
            validation,
            require_exp: config.require_exp,
            issuer: config.issuer,
            require_kid: config.jwks_require_kid,
        })
    }

    /// Reads the key file or JWKS file again (key rotation); on error the
    /// keys in use stay. Returns how many keys are now in use. A key given
    /// in memory is kept as it is.
    pub fn reload(&self) -> Result<usize, JwtError> {
        let keys = load(&self.source, self.require_kid)?;
        let n = keys.len();
        *self.keys.write() = Arc::new(keys);
        Ok(n)
    }

    /// Verifies `token` and returns the identity it proves.
    pub fn verify(&self, token: &str) -> Result<Identity, HttpError> {
        let (alg, kid) = peek_header(token)?;
        if alg.eq_ignore_ascii_case("none") {
            return Err(unauthorized(
                "unsupported_algorithm",
                "alg \"none\" (an unsigned token) is never accepted",
            ));
        }
        let keys = Arc::clone(&*self.keys.read());
        let accepted = || {
            let mut list: Vec<String> = Vec::new();
            for key in keys.iter() {
                for alg in &key.algorithms {
                    let name = format!("{alg:?}");
                    if !list.contains(&name) {
                        list.push(name);
                    }
                }
            }
            list.join(", ")
        };
        let Ok(algorithm) = alg.parse::<Algorithm>() else {
            return Err(unauthorized(
                "unsupported_algorithm",
                format!(
                    "alg {:?} is not supported: the configured key takes {}",
                    cut(&alg),
                    accepted()
                ),
            ));
        };
        if !keys.iter().any(|k| k.algorithms.contains(&algorithm)) {
            return Err(unauthorized(
                "unsupported_algorithm",
                format!(
                    "alg {algorithm:?} is not accepted: the configured key takes {}",
                    accepted()
                ),
            ));
        }
        if kid.is_none() && self.require_kid && keys.len() > 1 {
            return Err(unauthorized(
                "missing_kid",
                format!(
                    "the token has no `kid` header, and the JWKS has {} keys: the token must name the key that signed it (auth.jwks_require_kid)",
                    keys.len()
                ),
            ));
        }
        let candidates: Vec<&KeyEntry> = keys
            .iter()
            .filter(|k| k.algorithms.contains(&algorithm))
            .filter(|k| match (&kid, &k.kid) {
                (Some(wanted), Some(have)) => wanted == have,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(unauthorized(
                "unknown_key",
                format!(
                    "no configured key has kid {:?}: the JWKS may need reloading (SIGHUP)",
                    kid.as_deref().map(cut).unwrap_or_default()
                ),
            ));
        }
        let mut validation = self.validation.clone();
        validation.algorithms = vec![algorithm];
        let mut last = None;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return self.identity(data.claims),
                Err(err) if matches!(err.kind(), JwtErrorKind::InvalidSignature) => {
                    last = Some(err);
                }
                Err(err) => return Err(refusal(&err)),
            }
        }
        Err(last.map_or_else(
            || unauthorized("invalid_signature", "the signature does not verify"),
            |err| refusal(&err),
        ))
    }

    fn identity(&self, claims: Claims) -> Result<Identity, HttpError> {
        // Checked here rather than by `jsonwebtoken`, which accepts an
        // array `iss` whose members are all configured issuers (and calls
        // an `iss` of another type missing). RFC 7519 §4.1.1 makes `iss` one
        // StringOrURI: an issuer that writes anything else is not the one
        // configured.
        if let Some(issuer) = &self.issuer {
            match &claims.iss {
                Some(Value::String(iss)) if iss == issuer => {}
                Some(Value::String(_)) => {
                    return Err(unauthorized(
                        "invalid_issuer",
                        "the token's `iss` is not the configured issuer (auth.issuer)",
                    ));
                }
                Some(_) => {
                    return Err(unauthorized(
                        "invalid_issuer",
                        "the token's `iss` must be a string (RFC 7519 §4.1.1): the configured issuer (auth.issuer)",
                    ));
                }
                None => {
                    return Err(unauthorized(
                        "invalid_token",
                        "the token has no `iss` claim, which is required",
                    ));
                }
            }
        }
        let sub = match &claims.sub {
            Some(Value::String(sub)) => sub,
            _ => {
                return Err(unauthorized(
                    "invalid_token",
                    "the token has no `sub` claim (a string): it is the client ID",
                ));
            }
        };
        let client_id = ClientId::new(sub).map_err(|err| {
            unauthorized(
                "invalid_token",
                format!("the token's `sub` is not a valid client id: {err}"),
            )
        })?;
        let mut identity = Identity::new(client_id);
        match claims.exp.as_ref().and_then(Value::as_f64) {
            Some(exp) => {
                let at = Duration::try_from_secs_f64(exp.max(0.0))
                    .ok()
                    .and_then(|d| UNIX_EPOCH.checked_add(d))
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                identity = identity.expires_at(at);
            }
            None if self.require_exp => {
                return Err(unauthorized(
                    "invalid_token",
                    "the token has no `exp` claim (a number of seconds since 1970)",
                ));
            }
            None => {}
        }
        let permissions = Permissions {
            targets: patterns("sb_targets", claims.sb_targets)?,
            subscribe: patterns("sb_subscribe", claims.sb_subscribe)?,
            publish: patterns("sb_publish", claims.sb_publish)?,
        };
        if !permissions.is_unrestricted() {
            identity = identity.with_permissions(permissions);
        }
        if let Some(meta) = claims.sb_presence {
            let text = meta.to_string();
            if text.len() > crate::backend::MAX_META_BYTES {
                return Err(unauthorized(
                    "presence_meta_too_large",
                    format!(
                        "the token's `sb_presence` claim is {} bytes of JSON; presence meta is at most {} bytes: issue the token with a smaller one",
                        text.len(),
                        crate::backend::MAX_META_BYTES
                    ),
                ));
            }
            identity = identity.with_presence_meta(Arc::from(text));
        }
        Ok(identity)
    }
}

impl Authenticator for JwtAuthenticator {
    fn authenticate<'a>(
        &'a self,
        request: &'a Parts,
    ) -> BoxFuture<'a, Result<Identity, HttpError>> {
        Box::pin(async move {
            let token = bearer_token(request)?.ok_or_else(|| {
                unauthorized(
                    "missing_token",
                    "no token: send `Authorization: Bearer <jwt>`, offer the subprotocols [\"switchboard.v1\" or \"switchboard.plain\", \"bearer.<jwt>\"], or add ?token=<jwt>",
                )
            })?;
            self.verify(&token)
        })
    }

    fn refresh<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Identity, HttpError>> {
        Box::pin(std::future::ready(self.verify(token)))
    }
}

/// The claims read beyond what `jsonwebtoken` validates; loosely typed so
/// that a claim of the wrong type gets a message naming it.
#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<Value>,
    iss: Option<Value>,
    exp: Option<Value>,
    sb_targets: Option<Value>,
    sb_subscribe: Option<Value>,
    sb_publish: Option<Value>,
    sb_presence: Option<Value>,
}

fn patterns(claim: &str, value: Option<Value>) -> Result<Option<Vec<NamePattern>>, HttpError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let bad = |why: String| {
        unauthorized(
            "invalid_token",
            format!(
                "the `{claim}` claim must be an array of patterns such as [\"room/*\", \"bob\"]: {why}"
            ),
        )
    };
    let Value::Array(items) = value else {
        return Err(bad(format!("got {value}")));
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => NamePattern::new(s).map_err(|e| bad(e.to_string())),
            Value::Number(n) => NamePattern::new(&n.to_string()).map_err(|e| bad(e.to_string())),
            other => Err(bad(format!("{other} is not a string"))),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The header's `alg` and `kid`, read before any key is chosen.
fn peek_header(token: &str) -> Result<(String, Option<String>), HttpError> {
    let malformed = |why: &str| {
        unauthorized(
            "invalid_token",
            format!(
                "the token is malformed: {why} (a JWT is three base64url parts joined by dots)"
            ),
        )
    };
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("it does not have three parts"));
    };
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let header = LENIENT
        .decode(header)
        .map_err(|_| malformed("the header is not base64url"))?;
    let header: Value =
        serde_json::from_slice(&header).map_err(|_| malformed("the header is not JSON"))?;
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg.clone(),
        _ => return Err(malformed("the header has no `alg`")),
    };
    let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);
    Ok((alg, kid))
}

fn cut(s: &str) -> String {
    s.chars().take(40).collect()
}

/// The 401 for a `jsonwebtoken` error.
fn refusal(err: &jsonwebtoken::errors::Error) -> HttpError {
    match err.kind() {
        JwtErrorKind::ExpiredSignature => unauthorized(
            "token_expired",
            "the token has expired (exp): get a new one",
        ),
        JwtErrorKind::ImmatureSignature => unauthorized(
            "token_not_yet_valid",
            "the token is not valid yet (nbf): check the issuer's clock",
        ),
        JwtErrorKind::InvalidIssuer => unauthorized(
            "invalid_issuer",
            "the token's `iss` is not the configured issuer (auth.issuer)",
        ),
        JwtErrorKind::InvalidAudience => unauthorized(
            "invalid_audience",
            "the token's `aud` does not include the configured audience (auth.audience)",
        ),
        JwtErrorKind::InvalidSignature
        | JwtErrorKind::InvalidEcdsaKey
        | JwtErrorKind::InvalidRsaKey(_)
        | JwtErrorKind::InvalidEddsaKey => {
            unauthorized("invalid_signature", "the signature does not verify")
        }
        JwtErrorKind::InvalidAlgorithm | JwtErrorKind::UnsupportedAlgorithm => unauthorized(
            "unsupported_algorithm",
            "the token's alg does not fit the configured key",
        ),
        JwtErrorKind::MissingRequiredClaim(claim) => unauthorized(
            "invalid_token",
            format!("the token has no `{claim}` claim, which is required"),
        ),
        JwtErrorKind::InvalidClaimFormat(claim) => unauthorized(
            "invalid_token",
            format!("the token's `{claim}` claim has the wrong type"),
        ),
        _ => unauthorized("invalid_token", format!("the token is malformed: {err}")),
    }
}

/// The keys of `source`; `require_kid` refuses a JWKS of several keys in
/// which one has no `kid`.
fn load(source: &JwtKey, require_kid: bool) -> Result<Vec<KeyEntry>, JwtError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| JwtError::Read {
            path: path.clone(),
            source,
        })
    };
    match source {
        JwtKey::Secret(secret) => {
            if secret.trim_ascii_start().starts_with(b"-----BEGIN") {
                return Err(JwtError::SecretIsPem);
            }
            if secret.len() < MIN_SECRET_LEN {
                return Err(JwtError::WeakSecret { len: secret.len() });
            }
            Ok(vec![KeyEntry {
                kid: None,
                key: DecodingKey::from_secret(secret),
                algorithms: HMAC.to_vec(),
            }])
        }
        JwtKey::PublicKeyPem(pem) => pem_key(pem, "the PEM key".to_owned()),
        JwtKey::PublicKeyFile(path) => pem_key(&read(path)?, path.display().to_string()),
        JwtKey::Jwks(text) => jwks(text.as_bytes(), "the JWKS".to_owned(), require_kid),
        JwtKey::JwksFile(path) => jwks(&read(path)?, path.display().to_string(), require_kid),
    }
}

fn pem_key(pem: &[u8], what: String) -> Result<Vec<KeyEntry>, JwtError> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("PRIVATE KEY-----") {
        return Err(JwtError::Pem {
            what,
            hint: "it is a private key; give the server only the public key (`openssl pkey -in key.pem -pubout`)",
        });
    }
    let (key, algorithms) = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        (key, RSA)
    } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        (key, EC)
    } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        (key, ED)
    } else {
        return Err(JwtError::Pem {
            what,
            hint: "expected `-----BEGIN PUBLIC KEY-----` (or `RSA PUBLIC KEY`) holding an RSA, EC P-256/P-384 or Ed25519 key",
        });
    };
    Ok(vec![KeyEntry {
        kid: None,
        key,
        algorithms: algorithms.to_vec(),
    }])
}

fn jwks(text: &[u8], what: String, require_kid: bool) -> Result<Vec<KeyEntry>, JwtError> {
    let bad = |reason: String| JwtError::Jwks {
        what: what.clone(),
        reason,
    };
    let set: JwkSet = serde_json::from_slice(text)
        .map_err(|e| bad(format!("{e} (expected {{\"keys\":[…]}})")))?;
    let signing =
        |jwk: &&jsonwebtoken::jwk::Jwk| jwk.common.public_key_use != Some(PublicKeyUse::Encryption);
    let several = set.keys.iter().filter(signing).count() > 1;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let name = match &jwk.common.key_id {
            Some(kid) => format!("key #{} (kid {kid:?})", i + 1),
            None => format!("key #{}", i + 1),
        };
        if !signing(&jwk) {
            continue;
        }
        if require_kid && several && jwk.common.key_id.is_none() {
            return Err(bad(format!(
                "{name} has no kid: with several keys, tokens name theirs by kid (give every key a kid, or turn off auth.jwks_require_kid)"
            )));
        }
        let by_type: &[Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => &[Algorithm::ES256],
                EllipticCurve::P384 => &[Algorithm::ES384],
                _ => {
                    return Err(bad(format!(
                        "{name}: only the EC curves P-256 and P-384 are supported"
                    )));
                }
            },
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => ED,
            AlgorithmParameters::OctetKey(_) => {
                return Err(bad(format!(
                    "{name} is a symmetric (\"kty\":\"oct\") key: put shared secrets in jwt_secret, a JWKS holds public keys"
                )));
            }
            _ => return Err(bad(format!("{name} has an unsupported key type"))),
        };
        let algorithms = match jwk.common.key_algorithm {
            Some(declared) => {
                let alg = Algorithm::try_from(declared)
                    .ok()
                    .filter(|a| by_type.contains(a));
                match alg {
                    Some(alg) => vec![alg],
                    None => {
                        return Err(bad(format!(
                            "{name} declares alg {declared}, which does not fit its key type"
                        )));
                    }
                }
            }
            None => by_type.to_vec(),
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("{name}: {e}")))?;
        keys.push(KeyEntry {
            kid: jwk.common.key_id.clone(),
            key,
            algorithms,
        });
    }
    if keys.is_empty() {
        return Err(bad("it has no signing key".to_owned()));
    }
    Ok(keys)
}
