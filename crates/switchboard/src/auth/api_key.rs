//! API keys for the backend API, compared in constant time.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::http_error::HttpError;

/// The shortest key accepted: 16 characters. Keys are meant to be random
/// (`openssl rand -hex 32`); a short one can be guessed.
pub const MIN_API_KEY_LEN: usize = 16;

/// The keys that open the backend API. Several may be valid at once, so a
/// key can be rotated without downtime: add the new one, move the callers,
/// remove the old one.
///
/// Only SHA-256 digests of the keys are kept. A presented key is hashed and
/// compared with every digest in constant time, without stopping at the
/// first match, so the time taken tells nothing about the keys.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Arc<[[u8; 32]]>,
}

/// Why a key was refused. The messages never contain the key itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiKeyError {
    /// The key is too short to be a secret.
    #[error(
        "api key #{index} is {len} characters long: use at least {MIN_API_KEY_LEN} random characters (e.g. `openssl rand -hex 32`)"
    )]
    TooShort {
        /// Its position in the list, from 1.
        index: usize,
        /// Its length.
        len: usize,
    },
    /// The key has a character that cannot travel in an HTTP header.
    #[error(
        "api key #{index} has a space, a control or a non-ASCII character: use printable ASCII (e.g. `openssl rand -hex 32`)"
    )]
    BadChar {
        /// Its position in the list, from 1.
        index: usize,
    },
}

impl ApiKeys {
    /// The keys, each at least [`MIN_API_KEY_LEN`] printable ASCII
    /// characters without spaces.
    pub fn new<I, S>(keys: I) -> Result<Self, ApiKeyError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut digests = Vec::new();
        for (i, key) in keys.into_iter().enumerate() {
            let key = key.as_ref();
            let index = i + 1;
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ApiKeyError::BadChar { index });
            }
            if key.len() < MIN_API_KEY_LEN {
                return Err(ApiKeyError::TooShort {
                    index,
                    len: key.len(),
                });
            }
            digests.push(Sha256::digest(key.as_bytes()).into());
        }
        Ok(Self {
            digests: digests.into(),
        })
    }

    /// Whether no key is set (the API is open).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// How many keys are set.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether `presented` is one of the keys, in constant time.
    pub fn verify(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = Choice::from(0);
        for key in self.digests.iter() {
            found |= key.ct_eq(&digest);
        }
        found.into()
    }

    /// Checks the `Authorization: Bearer <key>` of a request: 401
    /// `missing_api_key` or `invalid_api_key` with a JSON body otherwise.
    /// Always `Ok` when no key is set.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), HttpError> {
        if self.is_empty() {
            return Ok(());
        }
        let challenge = || HeaderValue::from_static("Bearer realm=\"switchboard-api\"");
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(HttpError::new(
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                "this endpoint needs an API key: send `Authorization: Bearer <key>` (api.keys)",
            )
            .with_header(header::WWW_AUTHENTICATE, challenge()));
        };
        let key = value.to_str().ok().and_then(super::strip_bearer);
        let Some(key) = key else {
            return Err(HttpError::new(
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                "the Authorization header must be `Bearer <key>`",
            )
            .with_header(header::WWW_AUTHENTICATE, challenge()));
        };
        if self.verify(key) {
            Ok(())
        } else {
            Err(HttpError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "the API key is not one of the configured keys (api.keys)",
            )
            .with_header(header::WWW_AUTHENTICATE, challenge()))
        }
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

/// axum middleware: refuses requests without a valid key (see
/// [`ApiKeys::check`]). `router.layer(middleware::from_fn_with_state(keys, require_api_key))`.
pub(crate) async fn require_api_key(
    State(keys): State<ApiKeys>,
    request: Request,
    next: Next,
) -> Response {
    match keys.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_verify_and_refuse() {
        let keys = ApiKeys::new(["0123456789abcdef", "fedcba9876543210-second"]).expect("keys");
        assert!(keys.verify("0123456789abcdef"));
        assert!(keys.verify("fedcba9876543210-second"));
        assert!(!keys.verify("0123456789abcdeF"));
        assert!(!keys.verify(""));
        let err = ApiKeys::new(["ok-ok-ok-ok-ok-ok-ok", "short"]).expect_err("short");
        assert_eq!(err, ApiKeyError::TooShort { index: 2, len: 5 });
        assert!(!err.to_string().contains("short\""), "{err}");
        let err = ApiKeys::new(["with a space in it!!"]).expect_err("space");
        assert_eq!(err, ApiKeyError::BadChar { index: 1 });
        assert!(ApiKeys::default().check(&HeaderMap::new()).is_ok());
    }
}
