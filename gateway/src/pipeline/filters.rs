//! The filter phases: the route's filter chain (native and Wasm, see the
//! `filters` crate) on the request after admission, and in reverse order
//! on the response before it goes out. A filter may rewrite the head,
//! answer locally, pause the stream, hold and rewrite a body, or reset the
//! stream (no answer at all).
//!
//! The chain is started only for routes that have filters (most traffic
//! has none), and bodies go through the filters' body callbacks only when
//! a filter of the route looks at bodies; otherwise they stream as is.

use std::ops::ControlFlow::{self, Break, Continue};

use filters::{BodyStop, ChainStream, LocalResponse, StreamInfo, StreamReset};
use http::request::Parts;
use http::{HeaderValue, Response};
use http_body_util::Either;
use hyper::body::Body;

use super::runtime::Route;
use super::{RequestCtx, Stop};
use crate::body::ProxyBody;
use crate::edge::request_body::LimitedBody;
use crate::respond;
use crate::upstream::UpstreamBody;

/// A stream through the route's filter chain, kept from the request phase
/// to the response phase (and then by the response body until it ends,
/// which is when the filters' streams end: `on_done`, `on_log`).
pub struct Filtering {
    chain: ChainStream,
    info: StreamInfo,
}

/// Where the request goes after the request filters.
pub enum Next {
    /// On to the cache and the upstream, with this body.
    Upstream(UpstreamBody),
    /// A filter answered it.
    Answered(Response<ProxyBody>),
}

pub async fn on_request(
    ctx: &mut RequestCtx<'_>,
    route: &Route,
    head: &mut Parts,
    body: UpstreamBody,
) -> ControlFlow<Stop, Next> {
    if route.filters.is_empty() {
        return Continue(Next::Upstream(body));
    }
    let info = StreamInfo {
        client_ip: ctx.client_ip,
        route: route.name.clone(),
        priority: route.priority,
        // As the admission phase saw it (`overload`).
        load_level: ctx.load_level,
        // As the bot rules scored it (`admission::bots`).
        bot_score: ctx.bot_score,
        ja4: ctx.ja4.clone(),
        request_id: ctx.request_id.clone(),
        end_of_stream: body.is_end_stream(),
    };
    let mut chain = route.filters.start();
    // The chain's futures are boxed here and below: only routes with
    // filters wait on them, and unboxed their state would make every
    // request's larger and its copy dearer (measured: a copy costs more
    // than the allocation, also on routes with filters).
    let next = match Box::pin(chain.on_request(head, &info)).await {
        Err(StreamReset) => Err(StreamReset),
        Ok(Some(local)) => Ok(Next::Answered(respond::local(local, &ctx.request_id))),
        Ok(None) => match body {
            Either::Left(incoming) if chain.wants_bodies() && !incoming.is_end_stream() => {
                match Box::pin(filter_request_body(&mut chain, &info, head, incoming)).await {
                    Ok(filtered) => Ok(Next::Upstream(filtered)),
                    Err(stop) => stop
                        .into_response(true)
                        .map(|answer| Next::Answered(respond::local(answer, &ctx.request_id))),
                }
            }
            body => Ok(Next::Upstream(body)),
        },
    };
    // Kept also after a reset: the filters' streams end with the request.
    ctx.filters = Some(Filtering { chain, info });
    match next {
        Ok(next) => Continue(next),
        Err(StreamReset) => Break(Stop::Reset),
    }
}

pub async fn on_response(
    ctx: &mut RequestCtx<'_>,
    resp: Response<ProxyBody>,
) -> ControlFlow<Stop, Response<ProxyBody>> {
    let Some(Filtering {
        mut chain,
        mut info,
    }) = ctx.filters.take()
    else {
        return Continue(resp);
    };
    // A body callback can reset the stream while the request body streams
    // upstream: whatever the upstream made of the cut body, the client
    // gets no answer.
    if chain.wants_bodies() && chain.is_reset() {
        return Break(Stop::Reset);
    }
    let (mut parts, mut body) = resp.into_parts();
    info.end_of_stream = body.is_end_stream();
    match Box::pin(chain.on_response(&mut parts, &info)).await {
        Err(StreamReset) => return Break(Stop::Reset),
        Ok(Some(replaced)) => body = replace(&mut parts, replaced, &ctx.request_id),
        Ok(None) if chain.wants_bodies() && !body.is_end_stream() => {
            body = match Box::pin(body.filter(&mut chain, &info, &mut parts.headers)).await {
                Ok(filtered) => filtered,
                Err(stop) => match stop.into_response(false) {
                    Ok(answer) => replace(&mut parts, answer, &ctx.request_id),
                    // While priming: nothing went out yet. (A reset
                    // later, while the body streams, ends it with an
                    // error: hyper resets the stream or closes the
                    // connection mid-body.)
                    Err(StreamReset) => return Break(Stop::Reset),
                },
            };
        }
        Ok(None) => {}
    }
    body.attach(chain);
    Continue(Response::from_parts(parts, body))
}

/// A filter's answer in place of the response: its status, headers and
/// body (a refusal on a filter's account in the gateway's shape).
fn replace(
    parts: &mut http::response::Parts,
    local: LocalResponse,
    request_id: &HeaderValue,
) -> ProxyBody {
    let (answer, body) = respond::local(local, request_id).into_parts();
    parts.status = answer.status;
    parts.headers = answer.headers;
    body
}

/// Routes the request body through the filters' body callbacks, primed so
/// that a filter holding the body from its start can still answer (413
/// past the bound, or its own response) or reset the stream before
/// anything goes upstream.
async fn filter_request_body(
    chain: &mut ChainStream,
    info: &StreamInfo,
    head: &mut Parts,
    body: LimitedBody,
) -> Result<UpstreamBody, BodyStop> {
    let mut filtered = chain.request_body(body, info);
    filtered.prime().await?;
    filtered.set_length(&mut head.headers);
    Ok(Either::Right(Either::Right(Either::Left(Box::new(
        filtered,
    )))))
}
