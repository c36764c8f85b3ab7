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
            Continue(route)
        }
        None => Break(Stop::Refuse(ProxyError::NoRoute.into())),
    }
}
