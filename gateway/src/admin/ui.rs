//! `GET /admin/ui`: the live dashboard. One self-contained page (HTML, CSS,
//! a small script and inline SVG, no external assets: the admin port is
//! often on a network without internet) that polls `/admin/ui/data` (the
//! `/admin/status` document) once a second and draws it.
//!
//! A caller off loopback passes the admin token in the URL fragment
//! (`/admin/ui#token=...`): the fragment never leaves the browser, and the
//! script sends it as a bearer token.

use http::StatusCode;

use super::{reply, AdminResponse};

const PAGE: &str = include_str!("ui.html");

pub fn page() -> AdminResponse {
    let mut resp = reply(StatusCode::OK, "text/html; charset=utf-8", PAGE);
    // Nothing from elsewhere: scripts, styles and images are inline.
    resp.headers_mut().insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             img-src data:; connect-src 'self'",
        ),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}
