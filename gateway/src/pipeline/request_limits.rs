//! The request-limits phase: what the connection layer cannot check,
//! refused before any routing work: a `Content-Length` next to
//! `Transfer-Encoding` (see `edge::framing`), a transfer coding other than
//! `chunked` (501), a Host that is missing, repeated or malformed (400), a
//! target longer than `max_uri_bytes` (414), a declared body above
//! `max_body` (413), and a path that cannot be normalized (400). The path
//! is normalized and the Host settled here, so the route, the cache key
//! and the upstream all see the same path and the same Host.

use std::borrow::Cow;
use std::ops::ControlFlow::{self, Break, Continue};

use http::request::Parts;
use http::{header, HeaderValue, Uri, Version};
use hyper::body::Incoming;

use super::authority::valid_authority;
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
    if head.version == Version::HTTP_2 {
        if let Err(e) = check_h2_header_list(head, ctx.listener.max_header_bytes.0) {
            return refuse(e);
        }
    }
    if let Err(e) = check_transfer_coding(&head.headers) {
        return refuse(e);
    }
    if let Err(e) = settle_host(head) {
        return refuse(e);
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

/// The HTTP/2 header list size as SETTINGS_MAX_HEADER_LIST_SIZE counts it
/// (RFC 9113 section 6.5.2: name + value + 32 per field, pseudo-fields
/// too), checked against the listener's limit: 431, as HTTP/1.1 gets.
fn check_h2_header_list(head: &Parts, max: u64) -> Result<(), ProxyError> {
    let pseudo = head.method.as_str().len()
        + head.uri.scheme_str().map_or(0, str::len)
        + head.uri.authority().map_or(0, |a| a.as_str().len())
        + head.uri.path_and_query().map_or(0, |p| p.as_str().len())
        + 4 * (32 + 7);
    let fields: usize = head
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum();
    if (pseudo + fields) as u64 > max {
        Err(ProxyError::HeadersTooLarge)
    } else {
        Ok(())
    }
}

/// RFC 9112 section 6.1: a server that receives a transfer coding it does
/// not understand answers 501. The gateway decodes only `chunked`; a
/// `gzip, chunked` body forwarded as plain chunked would hand the origin
/// still-coded bytes it was told were plain.
fn check_transfer_coding(headers: &http::HeaderMap) -> Result<(), ProxyError> {
    let mut codings = 0;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let value = value.to_str().map_err(|_| ProxyError::UnsupportedCoding)?;
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            codings += 1;
            if !coding.eq_ignore_ascii_case("chunked") || codings > 1 {
                return Err(ProxyError::UnsupportedCoding);
            }
        }
    }
    Ok(())
}

/// Settles the one Host every later phase uses (RFC 9112 section 3.2,
/// RFC 9113 section 8.3.1): at most one `Host` field; on HTTP/1.1 (and
/// HTTP/2 without `:authority`) one is required; the authority must be a
/// plain `host[:port]` without userinfo; an HTTP/2 `Host` must agree with
/// `:authority`. When the target carries an authority (absolute-form,
/// `:authority`) it becomes the `Host` field, so the route, the cache key
/// and the upstream read one validated value, never two.
fn settle_host(head: &mut Parts) -> Result<(), ProxyError> {
    let mut fields = head.headers.get_all(header::HOST).iter();
    let field = fields.next();
    if fields.next().is_some() {
        return Err(ProxyError::BadHost);
    }
    let Some(authority) = head.uri.authority() else {
        return match field {
            Some(v) if valid_authority(v.as_bytes()) => Ok(()),
            None if head.version <= Version::HTTP_10 => Ok(()),
            _ => Err(ProxyError::BadHost),
        };
    };
    let authority = authority.as_str();
    if !valid_authority(authority.as_bytes()) {
        return Err(ProxyError::BadHost);
    }
    match field {
        // HTTP/1.1 absolute-form: the target's authority wins over Host
        // (RFC 9112 section 3.2.2), so the field is only replaced below.
        Some(v)
            if head.version == Version::HTTP_2
                && !v.as_bytes().eq_ignore_ascii_case(authority.as_bytes()) =>
        {
            return Err(ProxyError::BadHost);
        }
        Some(_) if head.version == Version::HTTP_2 => {}
        Some(v) if v.as_bytes() == authority.as_bytes() => return Ok(()),
        _ => {}
    }
    let value = HeaderValue::from_str(authority).map_err(|_| ProxyError::BadHost)?;
    head.headers.insert(header::HOST, value);
    Ok(())
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

    fn parts(req: http::request::Builder) -> Parts {
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn host_settled_once() {
        let mut one = parts(http::Request::get("/").header("host", "shop.example"));
        assert_eq!(settle_host(&mut one), Ok(()));
        let mut two = parts(
            http::Request::get("/")
                .header("host", "shop.example")
                .header("host", "evil.example"),
        );
        assert_eq!(settle_host(&mut two), Err(ProxyError::BadHost));
        let mut none = parts(http::Request::get("/"));
        assert_eq!(settle_host(&mut none), Err(ProxyError::BadHost));
        let mut old = parts(http::Request::get("/").version(Version::HTTP_10));
        assert_eq!(settle_host(&mut old), Ok(()));
        // Absolute-form: the target's authority replaces the field.
        let mut abs = parts(http::Request::get("http://shop.example/x").header("host", "other"));
        assert_eq!(settle_host(&mut abs), Ok(()));
        assert_eq!(abs.headers[header::HOST], "shop.example");
        let mut info = parts(http::Request::get("http://u:p@shop.example/x"));
        assert_eq!(settle_host(&mut info), Err(ProxyError::BadHost));
        let mut h2 = parts(
            http::Request::get("https://shop.example/x")
                .version(Version::HTTP_2)
                .header("host", "evil.example"),
        );
        assert_eq!(settle_host(&mut h2), Err(ProxyError::BadHost));
    }

    #[test]
    fn only_chunked_is_understood() {
        let te = |v: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in v {
                h.append(header::TRANSFER_ENCODING, v.parse().unwrap());
            }
            check_transfer_coding(&h)
        };
        assert_eq!(te(&[]), Ok(()));
        assert_eq!(te(&["chunked"]), Ok(()));
        assert_eq!(te(&["Chunked "]), Ok(()));
        assert_eq!(te(&["gzip, chunked"]), Err(ProxyError::UnsupportedCoding));
        assert_eq!(te(&["gzip", "chunked"]), Err(ProxyError::UnsupportedCoding));
        assert_eq!(
            te(&["chunked, chunked"]),
            Err(ProxyError::UnsupportedCoding)
        );
    }
}
