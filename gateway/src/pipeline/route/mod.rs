//! The route phase: the request's host and normalized path pick a route
//! ([`router`]), which decides the upstream cluster, the priority, the
//! filters and the cache. Limits and priorities are per route, so every
//! phase after this one can use them.

pub mod router;

use std::ops::ControlFlow::{self, Break, Continue};

use http::request::Parts;

use super::runtime::Route;
use super::{RequestCtx, Stop};
use crate::error::ProxyError;

pub fn select<'a>(ctx: &mut RequestCtx<'a>, head: &Parts) -> ControlFlow<Stop, &'a Route> {
    ctx.host = router::request_host(&head.uri, &head.headers).to_string();
    // `OPTIONS *` is about the server as a whole: it takes the `/` route.
    let path = if head.uri.path() == "*" {
        "/"
    } else {
        head.uri.path()
    };
    let runtime = ctx.runtime;
    match runtime.route(&ctx.host, path) {
        Some(route) => {
            ctx.route = Some(route);
            if !route.keep_escaped_slashes && has_escaped_slash(path) {
                return Break(Stop::Refuse(ProxyError::EscapedSlash.into()));
            }
            Continue(route)
        }
        None => Break(Stop::Refuse(ProxyError::NoRoute.into())),
    }
}

/// `%2F` or `%5C` in any case: a slash the router did not see as one.
fn has_escaped_slash(path: &str) -> bool {
    let b = path.as_bytes();
    memchr::memchr_iter(b'%', b).any(|i| {
        matches!(
            (b.get(i + 1), b.get(i + 2).map(u8::to_ascii_lowercase)),
            (Some(b'2'), Some(b'f')) | (Some(b'5'), Some(b'c'))
        )
    })
}

#[cfg(test)]
mod tests {
    use super::has_escaped_slash;

    #[test]
    fn escaped_slashes() {
        assert!(has_escaped_slash("/a/..%2fadmin"));
        assert!(has_escaped_slash("/a%2Fb"));
        assert!(has_escaped_slash("/a%5cb"));
        assert!(!has_escaped_slash("/a%20b/%2"));
        assert!(!has_escaped_slash("/plain"));
    }
}
