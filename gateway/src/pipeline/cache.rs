//! The cache phase, on routes with `cache = {...}`: after the filters
//! (they may rewrite the head or answer locally), before the upstream. A
//! fresh L1 hit is answered here without building an upstream request;
//! misses, stale answers and bypasses go to [`crate::cache`], which decides
//! whether and when this request goes upstream (at most once per key for
//! the whole fleet).

use http::request::Parts;
use http::Response;
use hyper::body::Body;

use std::sync::Arc;

use super::admission::shed;
use super::forward::{forward, head_for_upstream, prefetch};
use super::runtime::Route;
use super::RequestCtx;
use crate::body::ProxyBody;
use crate::cache::{Lookup, RouteCache};
use crate::observe::access_log::UpstreamTiming;
use crate::respond;
use crate::upstream::UpstreamBody;

/// Answers from the cache, or lets it decide when to go upstream.
pub async fn serve(
    ctx: &mut RequestCtx<'_>,
    rc: &Arc<RouteCache>,
    route: &Route,
    head: &mut Parts,
    mut body: UpstreamBody,
) -> Response<ProxyBody> {
    let pending = match ctx
        .runtime
        .cache
        .lookup(rc, head, &ctx.host, !body.is_end_stream())
    {
        Lookup::Hit(hit) => return hit,
        Lookup::Pending(pending) => pending,
    };
    // As in `forward::send`: bad framing is refused before anything goes
    // upstream.
    if let Err(e) = prefetch(&mut body, ctx.listener.header_read_timeout.0).await {
        return respond::error(e, &ctx.request_id);
    }
    let mut up = head_for_upstream(ctx, head);
    pending.prepare_upstream(&mut up.headers);
    // Owned: a fill runs in a task of its own and may outlive this request.
    let cluster = route.cluster.clone();
    let verdict = ctx.verdict.clone();
    let replay = ctx.replay.take();
    // The fill takes its slot from the cluster's overload gate when it
    // goes upstream; a refusal is the fill's error (stale-if-error applies).
    let gate = route
        .gate
        .clone()
        .map(|g| (g, route.priority, ctx.deprioritized));
    let fetch = move || async move {
        let permit = match gate {
            Some((g, priority, deprioritized)) => Some(
                g.acquire(priority, deprioritized)
                    .await
                    .map_err(|why| why.error())?,
            ),
            None => None,
        };
        let mut timing = UpstreamTiming::default();
        let mut resp = forward(&cluster, up, body, replay, verdict.as_ref(), &mut timing)
            .await
            .map(|(r, _)| r)?;
        shed::hold(permit, &mut resp);
        Ok(resp)
    };
    // Boxed: a miss waits for L2 or the origin anyway, and the fill's
    // state machine is large; unboxed, every request of the route would
    // carry (and copy) its size.
    Box::pin(pending.resolve(&ctx.request_id, fetch)).await
}
