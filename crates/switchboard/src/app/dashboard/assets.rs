//! The dashboard's files, compiled into the binary: nothing to install or
//! fetch at run time, and no build step (plain HTML, CSS and JavaScript;
//! uPlot is vendored as its npm package ships it, and `scripts/check-uplot`
//! fails when the copy differs from the pinned version).

use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::http_error::HttpError;

/// One embedded file: its name under `/dashboard/`, content type, bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:literal, $file:literal) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../../../dashboard/", $file)),
        }
    };
}

const ASSETS: &[Asset] = &[
    asset!("app.js", "text/javascript; charset=utf-8", "app.js"),
    asset!("app.css", "text/css; charset=utf-8", "app.css"),
    asset!(
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        "third-party/uplot/uPlot.iife.min.js"
    ),
    asset!(
        "uPlot.min.css",
        "text/css; charset=utf-8",
        "third-party/uplot/uPlot.min.css"
    ),
    asset!(
        "uPlot.LICENSE.txt",
        "text/plain; charset=utf-8",
        "third-party/uplot/LICENSE"
    ),
];

const INDEX: &str = include_str!("../../../dashboard/index.html");

/// Only this server's own files run or load: no inline script, no other
/// origin, no framing (the key is typed into this page).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

fn respond(content_type: &'static str, body: &'static [u8]) -> Response {
    let mut response = (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /dashboard`: the page.
#[utoipa::path(
    get,
    path = "/dashboard",
    tag = "dashboard",
    responses((status = 200, description = "The dashboard page", content_type = "text/html", body = String)),
)]
pub(crate) async fn index() -> Response {
    respond("text/html; charset=utf-8", INDEX.as_bytes())
}

/// `GET /dashboard/{file}`: a script, a style sheet, a license.
#[utoipa::path(
    get,
    path = "/dashboard/{file}",
    tag = "dashboard",
    params(("file" = String, Path, description = "`app.js`, `app.css`, `uPlot.iife.min.js`, `uPlot.min.css`, `uPlot.LICENSE.txt`")),
    responses(
        (status = 200, description = "The file", content(
            (String = "text/javascript"),
            (String = "text/css"),
            (String = "text/plain"),
        )),
        (status = 404, description = "`not_found`", body = crate::app::schemas::ErrorBody),
    ),
)]
pub(crate) async fn file(Path(name): Path<String>) -> Result<Response, HttpError> {
    ASSETS
        .iter()
        .find(|asset| asset.name == name)
        .map(|asset| respond(asset.content_type, asset.body))
        .ok_or_else(|| {
            HttpError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "the dashboard has no file {:?}: open /dashboard",
                    name.chars().take(100).collect::<String>()
                ),
            )
        })
}
