//! The request-body deadline (`limits.body_timeout`).
//!
//! hyper's `header_read_timeout` bounds the request head only: a client
//! that announces `Content-Length: 1000` and sends 10 bytes would hold its
//! connection — and a permit of `limits.max_connections`, which `/heartbeat`
//! needs too — for as long as it likes, one handler task blocked in the
//! body read. [`limit_body`] gives the body a deadline counted from the
//! moment the head was read; past it the body read fails, and
//! [`BodyDeadline::response`] replaces whatever the handler answered with
//! 408 `body_timeout` and `Connection: close`, so hyper closes the
//! connection after writing it.

use std::error::Error;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse as _, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use hyper::body::Incoming;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::http_error::HttpError;
use crate::limits::duration;

/// Gives `request`'s body `timeout` to arrive, counted from now (the head
/// has just been read). A request without a body, or a zero `timeout`,
/// is left as it is and gets `None`.
pub(crate) fn limit_body(
    request: http::Request<Incoming>,
    timeout: Duration,
) -> (http::Request<Body>, Option<BodyDeadline>) {
    if timeout.is_zero() || request.body().is_end_stream() {
        return (request.map(Body::new), None);
    }
    let fired = Arc::new(AtomicBool::new(false));
    let deadline = BodyDeadline {
        fired: Arc::clone(&fired),
        timeout,
    };
    let request = request.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
            fired,
        })
    });
    (request, Some(deadline))
}

/// Whether a request's body missed its deadline, seen from the service
/// once the handler has answered.
pub(crate) struct BodyDeadline {
    fired: Arc<AtomicBool>,
    timeout: Duration,
}

impl BodyDeadline {
    /// The 408 to answer instead of the handler's response, if the body
    /// read ran out of time. Whatever the handler made of the failed read
    /// (a 400, a 413, its own error), the client is told what happened.
    pub(crate) fn response(&self) -> Option<Response> {
        if !self.fired.load(Ordering::Acquire) {
            return None;
        }
        let mut response = HttpError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} (limits.body_timeout); the connection is closed",
                duration::format(self.timeout)
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        Some(response)
    }
}

/// The error a body read gets past its deadline.
#[derive(Debug)]
pub(crate) struct BodyTimedOut;

impl fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request body did not arrive in time (limits.body_timeout)")
    }
}

impl Error for BodyTimedOut {}

/// Whether `err`, or an error it wraps, is a [`BodyTimedOut`].
pub(crate) fn is_body_timeout(err: &(dyn Error + 'static)) -> bool {
    let mut next = Some(err);
    // Bounded: error chains are a few links long; 16 is plenty.
    for _ in 0..16 {
        let Some(err) = next else { return false };
        if err.is::<BodyTimedOut>() {
            return true;
        }
        next = err.source();
    }
    false
}

/// hyper's body with a deadline.
struct DeadlineBody {
    inner: Incoming,
    /// Registered with the timer on its first poll, so a body read at once
    /// never touches the timer wheel.
    sleep: Pin<Box<Sleep>>,
    fired: Arc<AtomicBool>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.fired.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        // Data that has arrived is taken even at the deadline.
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|result| result.map_err(Into::into)));
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            this.fired.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
