//! JSON error bodies for every HTTP error Switchboard answers.
//!
//! Every error has the same shape, so clients need one parser:
//!
//! ```json
//! {"error":{"code":"bad_request","message":"`id` is missing: connect to /ws?id=<client id>"}}
//! ```

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode};

/// An HTTP error answered with a JSON body `{"error":{"code","message"}}`.
///
/// `code` is a stable, machine-readable string; `message` is for people and
/// may change between versions.
#[derive(Debug, Clone)]
pub struct HttpError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable, machine-readable code such as `"bad_request"`.
    pub code: &'static str,
    /// What went wrong and how to fix it.
    pub message: Cow<'static, str>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl HttpError {
    /// An error with a status, a stable code and a message.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a response header (for example `Retry-After`).
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for HttpError {}
