//! The exit: every request ends here, however it ends (answered by the
//! upstream, the cache or a filter, refused by a phase, or reset by a
//! filter), so its metrics, its access-log line and its span are recorded
//! in one place. (The overload feedback rides on the response body with
//! the upstream slot: see `overload::gate::Permit`.)

use std::ops::ControlFlow::{self, Break, Continue};
use std::sync::Arc;

use filters::StreamReset;
use http::request::Parts;
use http::{HeaderMap, Response};

use super::{RequestCtx, Stop};
use crate::body::ProxyBody;
use crate::headers;
use crate::observe::access_log::AccessRecord;
use crate::observe::otel;
use crate::respond;

/// What the access log and the request metrics record for a stream a
/// filter reset (no response at all): 444, nginx's code for a connection
/// closed without a response.
pub const RESET_STATUS: http::StatusCode = match http::StatusCode::from_u16(444) {
    Ok(s) => s,
    Err(_) => http::StatusCode::INTERNAL_SERVER_ERROR,
};

/// On answers to requests that carried `[overload] debug_header`.
pub static LOAD_LEVEL_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-flashgate-load-level");

/// Turns the pipeline's outcome into the answer and records it. `Err`
/// when a filter reset the stream: hyper then aborts the exchange.
pub fn finish(
    mut ctx: RequestCtx<'_>,
    head: &Parts,
    outcome: ControlFlow<Stop, Response<ProxyBody>>,
) -> Result<Response<ProxyBody>, StreamReset> {
    let mut resp = match outcome {
        Continue(resp) => resp,
        Break(Stop::Refuse(refusal)) => respond::refusal(refusal, &ctx.request_id),
        Break(Stop::Answer(resp)) => *resp,
        Break(Stop::Reset) => return Err(reset(ctx, head)),
    };
    resp.headers_mut()
        .insert(headers::X_REQUEST_ID.clone(), ctx.request_id.clone());
    if let Some(fields) = ctx.rate_limit_fields.take() {
        fields.apply(resp.headers_mut());
    }
    if ctx.debug_level {
        resp.headers_mut()
            .insert(LOAD_LEVEL_HEADER.clone(), u16::from(ctx.load_level).into());
    }
    let status = resp.status();
    count(&ctx, status);
    if ctx.runtime.config.log.access_log {
        resp.body_mut()
            .log_on_end(access_record(&ctx, head, status));
    }
    if let Some(mut span) = ctx.span.take() {
        let route = route_name(&ctx);
        span.answered(answer(&ctx, &route, head, status, resp.headers()));
        resp.body_mut().span_on_end(span);
    }
    Ok(resp)
}

/// A stream a filter reset: counted and logged as [`RESET_STATUS`], its
/// span ended at once (there is no response body to wait for). Out of
/// line: it is rare, and the request path stays small.
#[cold]
#[inline(never)]
fn reset(mut ctx: RequestCtx<'_>, head: &Parts) -> StreamReset {
    count(&ctx, RESET_STATUS);
    if ctx.runtime.config.log.access_log {
        access_record(&ctx, head, RESET_STATUS).emit(0, false);
    }
    if let Some(mut span) = ctx.span.take() {
        let route = route_name(&ctx);
        span.answered(answer(&ctx, &route, head, RESET_STATUS, &HeaderMap::new()));
        span.finish(0, false);
    }
    StreamReset
}

/// Requests by route and status; refused before routing: route "none".
fn count(ctx: &RequestCtx<'_>, status: http::StatusCode) {
    match ctx.route {
        Some(route) => {
            route.count(status);
            route.latency.observe(ctx.started.elapsed().as_secs_f64());
        }
        None => ctx
            .shared
            .metrics
            .requests
            .with_label_values(&["none", status.as_str()])
            .inc(),
    }
}

fn route_name(ctx: &RequestCtx<'_>) -> Arc<str> {
    ctx.route
        .map_or_else(|| Arc::from("none"), |r| r.name.clone())
}

fn answer<'a>(
    ctx: &'a RequestCtx<'_>,
    route: &'a Arc<str>,
    head: &'a Parts,
    status: http::StatusCode,
    headers: &'a HeaderMap,
) -> otel::Answer<'a> {
    otel::Answer {
        route,
        host: &ctx.host,
        path: head.uri.path(),
        upstream: ctx.endpoint.as_deref().map(|e| e.addr.as_str()),
        status,
        headers,
    }
}

fn access_record(
    ctx: &RequestCtx<'_>,
    head: &Parts,
    status: http::StatusCode,
) -> Box<AccessRecord> {
    Box::new(AccessRecord {
        listener: ctx.conn.listener.clone(),
        client: ctx.client_ip,
        peer: ctx.conn.peer,
        method: head.method.clone(),
        path: head.uri.path().to_string(),
        route: route_name(ctx),
        upstream: ctx.endpoint.as_deref().map(|e| Arc::from(&*e.addr)),
        status,
        request_id: ctx.request_id.clone(),
        started: ctx.started,
        head: ctx.started.elapsed(),
        timing: ctx.timing,
        load_level: ctx.load_level,
        bot_score: ctx.bot_score,
        ja4: ctx.ja4.clone(),
    })
}
