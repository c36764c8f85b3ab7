//! The request-limits phase: what the connection layer cannot check,
//! refused before any routing work: a `Content-Length` next to
//! `Transfer-Encoding` (see `edge::framing`), a target longer than
//! `max_uri_bytes` (414), a declared body above `max_body` (413), and a
//! path that cannot be normalized (400). The path is normalized here, so
//! the route, the cache key and the upstream all see the same path.

use std::borrow::Cow;
use std::ops::ControlFlow::{self, Break, Continue};

use http::request::Parts;
use http::Uri;
use hyper::body::Incoming;

use super::route::router::normalize_path;
use super::{RequestCtx, Stop};
use crate::edge::request_body::LimitedBody;
use crate::error::ProxyError;

pub fn check(
    ctx: &mut RequestCtx<'_>,
    head: &mut Parts,
    body: Incoming,
) -> ControlFlow<Stop, LimitedBody> {
    let refuse = |e: ProxyError| Break(Stop::Refuse(e.into()));
    // hyper kept only the Transfer-Encoding; refused as Envoy and nginx do.
    if ctx.conn.clock.head_had_length()
        && head.headers.contains_key(http::header::TRANSFER_ENCODING)
    {
        return refuse(ProxyError::AmbiguousLength);
    }
    if let Err(e) = check_uri(&head.uri, ctx.listener.max_uri_bytes.0) {
        return refuse(e);
    }
    let (body, verdict) = match LimitedBody::new(body, ctx.listener.max_body.0) {
        Ok(b) => b,
        Err(e) => return refuse(e),
    };
    ctx.verdict = Some(verdict);
    if let Err(e) = normalize_request_path(&mut head.uri) {
        return refuse(e);
    }
    Continue(body)
}

/// Rewrites the URI's path to its normalized form, keeping the query.
fn normalize_request_path(uri: &mut Uri) -> Result<(), ProxyError> {
    let normalized = match normalize_path(uri.path()).ok_or(ProxyError::BadPath)? {
        Cow::Borrowed(_) => return Ok(()),
        Cow::Owned(p) => p,
    };
    let path_and_query = match uri.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(path_and_query.parse().map_err(|_| ProxyError::BadPath)?);
    *uri = Uri::from_parts(parts).map_err(|_| ProxyError::BadPath)?;
    Ok(())
}

/// The length of the request target as the client sent it (414 above the
/// limit). The authority counts too, for absolute-form and HTTP/2.
pub fn check_uri(uri: &Uri, max: u64) -> Result<(), ProxyError> {
    let len = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    if len as u64 > max {
        Err(ProxyError::UriTooLong)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_length() {
        let ok: Uri = "/a?b=c".parse().unwrap();
        assert!(check_uri(&ok, 6).is_ok());
        assert_eq!(check_uri(&ok, 5), Err(ProxyError::UriTooLong));
    }
}
