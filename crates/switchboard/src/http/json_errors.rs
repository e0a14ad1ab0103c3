//! JSON for every error axum would answer with an empty body.

use std::any::Any;
use std::convert::Infallible;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt as _;
use http::StatusCode;

use crate::http_error::HttpError;

/// Makes a router answer every error with a JSON body: unknown paths (404),
/// wrong methods (405), and panics in HTTP handlers (500, with the server
/// still running). [`serve()`](super::serve()) applies it; call it yourself with `axum::serve`.
pub fn json_errors(router: Router) -> Router {
    router
        .fallback(|request: Request| async move {
            HttpError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {} {}", request.method(), request.uri().path()),
            )
        })
        .method_not_allowed_fallback(|request: Request| async move {
            HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!(
                    "{} is not allowed on {}",
                    request.method(),
                    request.uri().path()
                ),
            )
        })
        .layer(middleware::from_fn(catch_panics))
}

async fn catch_panics(request: Request, next: Next) -> Result<Response, Infallible> {
    let path = request.uri().path().to_owned();
    match std::panic::AssertUnwindSafe(next.run(request))
        .catch_unwind()
        .await
    {
        Ok(response) => Ok(response),
        Err(panic) => {
            tracing::error!(%path, panic = panic_message(&*panic), "http handler panicked");
            Ok(HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the handler for this route panicked; the server keeps running",
            )
            .into_response())
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic)")
}
