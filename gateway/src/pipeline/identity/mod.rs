//! The client-identity phase: who is asking. The client IP (through
//! trusted proxies only, see [`client_ip`]), the request id (kept or
//! generated), the trace span, and the verified JWT subject (see [`jwt`]).
//! First in the pipeline: every later phase and every answer use them.

pub mod client_ip;
pub mod jwt;

use http::request::Parts;

use super::RequestCtx;
use crate::headers;
use crate::observe::otel;

pub fn identify(ctx: &mut RequestCtx<'_>, head: &mut Parts) {
    let conn = ctx.conn;
    ctx.client_ip =
        client_ip::resolve(conn.peer.ip(), &head.headers, &ctx.listener.trusted_proxies);
    ctx.request_id = headers::ensure_request_id(&mut head.headers);
    // The JA4 fingerprint: a trusted proxy's (the client's TLS ended
    // there), else our own TLS listener's; a client's header never.
    let from_proxy = client_ip::is_trusted(conn.peer.ip(), &ctx.listener.trusted_proxies);
    ctx.ja4 = crate::pipeline::admission::bots::ja4_from_proxy(&mut head.headers, from_proxy)
        .or_else(|| conn.ja4.clone());
    // With an exporter the request's server span starts here, as a child
    // of the client's traceparent; its context is what the upstream gets.
    // Without one the traceparent is continued on the way out.
    ctx.span = ctx.shared.otel.as_ref().map(|o| {
        let mut s = o.start_span(head);
        s.arrived(otel::Arrival {
            head,
            scheme: conn.scheme,
            listener: &conn.listener,
            peer: conn.peer,
            client: ctx.client_ip,
            request_id: &ctx.request_id,
        });
        s
    });
    // The JWT subject becomes the user header; a user header the client
    // sent never passes, verified token or not (see `jwt`).
    ctx.user = match &ctx.runtime.jwt {
        Some(v) => v.identify(&mut head.headers).ok().flatten(),
        None => {
            jwt::strip_user_header(&mut head.headers);
            None
        }
    };
    ctx.identified = ctx.user.is_some();
}

/// The `401` for a route that needs an identity the request does not
/// have: `www-authenticate: Bearer` (RFC 6750), with
/// `error="invalid_token"` when a token was sent but did not verify.
pub fn unauthenticated(headers: &http::HeaderMap) -> crate::respond::Refusal {
    let challenge = if headers.contains_key(http::header::AUTHORIZATION) {
        http::HeaderValue::from_static("Bearer error=\"invalid_token\"")
    } else {
        http::HeaderValue::from_static("Bearer")
    };
    crate::respond::Refusal::new(crate::error::ProxyError::Unauthenticated)
        .header(http::header::WWW_AUTHENTICATE, challenge)
}
