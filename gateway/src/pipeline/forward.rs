//! The upstream phase: the request as the upstream sees it (hop-by-hop
//! headers gone, forwarding headers set, the trace continued), sent to an
//! endpoint of the route's cluster with bounded retries where a retry is
//! safe, or passed through as an upgrade (WebSocket) on a connection of
//! its own. The cache phase calls it on a miss; routes without a cache
//! come here directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::Body;

use super::admission::shed;
use super::runtime::Route;
use super::{upgrade, RequestCtx};
use crate::body::ProxyBody;
use crate::edge::request_body::BodyVerdict;
use crate::error::ProxyError;
use crate::headers;
use crate::observe::access_log::UpstreamTiming;
use crate::respond;
use crate::spool::{self, RequestRead};
use crate::upstream::{Cluster, Endpoint, UpstreamBody};

/// Sends the request to the route's cluster; a failure becomes the
/// gateway's answer.
pub async fn send(
    ctx: &mut RequestCtx<'_>,
    route: &Route,
    head: &mut Parts,
    mut body: UpstreamBody,
) -> Response<ProxyBody> {
    if route.buffer_requests {
        body = match buffer_request(ctx, body).await {
            Ok(b) => b,
            Err(e) => return respond::error(e, &ctx.request_id),
        };
    }
    // A chunked body's first chunk is read before the upstream is chosen:
    // bad framing is refused here, never forwarded.
    if let Err(e) = prefetch(&mut body, ctx.listener.header_read_timeout.0).await {
        return respond::error(e, &ctx.request_id);
    }
    // A request that streams holds its slot at the client's pace: one
    // client gets only its share of them.
    let share = if route.buffer_requests && route.buffer_responses {
        None
    } else {
        match route.cluster.shares.take(ctx.client_ip) {
            Some(share) => Some(share),
            None => return respond::error(ProxyError::ClientShare, &ctx.request_id),
        }
    };
    // The cluster's overload gate: a slot by priority, or the fallback.
    let permit = match shed::slot(route, ctx.deprioritized).await {
        Ok(p) => p,
        Err(why) => return shed::refused(ctx, route, why),
    };
    let up = head_for_upstream(ctx, head);
    let replay = ctx.replay.take();
    let (cluster, verdict) = (&route.cluster, ctx.verdict.as_ref());
    let sent = match &route.checkout {
        // Retries a failover's 503 within its budget (admission/checkout.rs).
        Some(c) => Box::pin(c.send(cluster, up, body, replay, verdict, &mut ctx.timing)).await,
        None => forward(cluster, up, body, replay, verdict, &mut ctx.timing).await,
    };
    let mut resp = answered(ctx, sent);
    if let Some(share) = share {
        resp.body_mut().hold_share(share);
    }
    shed::hold(permit, &mut resp);
    resp
}

/// Reads the client's body in before an upstream slot is taken (memory,
/// then a temp file; [`crate::spool`]), so a client that sends slowly
/// holds only its own connection. A body with nothing left to read, or
/// one the filters hold already, is left as it is.
async fn buffer_request(
    ctx: &mut RequestCtx<'_>,
    body: UpstreamBody,
) -> Result<UpstreamBody, ProxyError> {
    let client = match body {
        Either::Left(client) if !client.is_end_stream() => client,
        other => return Ok(other),
    };
    let spooler = ctx.runtime.spooler.clone();
    match spool::read_request(client, spooler, ctx.listener.body_read_timeout.0).await {
        Ok(reader) => Ok(Either::Right(Either::Right(Either::Right(reader)))),
        Err(RequestRead::Stalled) => {
            ctx.shared
                .metrics
                .connection_timeouts
                .with_label_values(&[&ctx.conn.listener, "body_read"])
                .inc();
            Err(ProxyError::BodyTimeout)
        }
        Err(RequestRead::Broken) => Err(ctx
            .verdict
            .as_ref()
            .map_or(ProxyError::BadBody, |v| v.explain(ProxyError::BadBody))),
        Err(RequestRead::Spool(e)) => {
            tracing::warn!(error = %e, "holding a request body in a temp file failed; answering 500");
            Err(ProxyError::SpoolFailed)
        }
    }
}

/// Hands what is left of an upstream response body to the spool when the
/// route buffers responses (HTTP/2 at once: a stream whose window is shut
/// never reads its first byte).
pub fn spool_response(
    ctx: &RequestCtx<'_>,
    route: &Route,
    head: &Parts,
    resp: Response<ProxyBody>,
) -> Response<ProxyBody> {
    if !route.buffer_responses {
        return resp;
    }
    let at_once = head.version == http::Version::HTTP_2;
    resp.map(|b| b.spool(&ctx.runtime.spooler, at_once))
}

/// What [`forward`] comes back with: the response and the endpoint that
/// gave it, or why there is none.
pub type Sent = Result<(Response<ProxyBody>, Arc<Endpoint>), ProxyError>;

/// The response for a sent request; a failure becomes the gateway's
/// answer.
pub fn answered(ctx: &mut RequestCtx<'_>, sent: Sent) -> Response<ProxyBody> {
    match sent {
        Ok((resp, endpoint)) => {
            ctx.endpoint = Some(endpoint);
            resp
        }
        Err(e) => respond::error(e, &ctx.request_id),
    }
}

/// WebSocket and other upgrades, on routes that allow them: a connection
/// of their own, spliced after the upstream's 101.
pub async fn upgrade(
    ctx: &mut RequestCtx<'_>,
    route: &Route,
    head: &mut Parts,
) -> Response<ProxyBody> {
    // Boxed: upgrades are rare, and their state would otherwise be part
    // of every request's.
    let sent = Box::pin(upgrade_request(ctx, &route.cluster, head)).await;
    answered(ctx, sent)
}

/// The request head as the upstream sees it.
pub fn head_for_upstream(ctx: &RequestCtx<'_>, head: &mut Parts) -> UpstreamHead {
    let conn = ctx.conn;
    // The client's head keeps only what the access log reads; the headers
    // move to the upstream request rather than being copied.
    // Host was settled by the request-limits phase: the one value the
    // route and the cache key were taken from.
    let mut headers = std::mem::take(&mut head.headers);
    headers::remove_hop_by_hop(&mut headers);
    // x-forwarded-for and forwarded get the hop we saw (the connection's
    // address); x-real-ip the resolved client, replacing whatever the
    // client sent, so origins have one header they can believe.
    headers::set_forwarded(&mut headers, conn.peer.ip(), conn.scheme, &ctx.host);
    headers.insert(
        headers::X_REAL_IP.clone(),
        headers::IpText::new(ctx.client_ip).header_value(),
    );
    // The span's context when an exporter is on (decided when the request
    // arrived), else the client's trace continued now.
    match ctx.span.as_ref().map(|s| s.context) {
        Some(ctx) => ctx.write(&mut headers),
        None => headers::continue_trace(&mut headers),
    }
    UpstreamHead {
        method: head.method.clone(),
        path: head
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        headers,
    }
}

/// Hands an upgrade request to [`upgrade::pass_through`].
async fn upgrade_request(
    ctx: &mut RequestCtx<'_>,
    cluster: &Arc<Cluster>,
    head: &mut Parts,
) -> Result<(Response<ProxyBody>, Arc<Endpoint>), ProxyError> {
    let conn = ctx.conn;
    let on = head
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or(ProxyError::UpgradeFailed)?;
    let protocol = upgrade::upgrade_headers(head).ok_or(ProxyError::UpgradeFailed)?;
    let up = head_for_upstream(ctx, head);
    upgrade::pass_through(
        cluster,
        on,
        &conn.tunnel,
        up.method,
        up.path,
        up.headers,
        protocol,
        conn.config.websocket_idle_timeout.0,
    )
    .await
}

/// The request line and headers that go upstream.
pub struct UpstreamHead {
    pub method: http::Method,
    pub path: http::uri::PathAndQuery,
    pub headers: http::HeaderMap,
}

/// Sends the request to an endpoint of the cluster, retrying where that is
/// safe:
/// - a failed connect, for any request: nothing of it was sent;
/// - a pooled connection found dead before the request went out: the
///   request comes back unsent and goes out again (this does not count as
///   an attempt; at most twice per request);
/// - a reset or close before any response, for idempotent methods without
///   a body, and for checkout requests whose `Idempotency-Key` makes a
///   repeat harmless (`replay` holds their body), on another endpoint when
///   there is one.
///
/// A timeout is never retried: the request may be running upstream, and a
/// retry would double the load on a cluster that is already slow.
pub async fn forward(
    cluster: &Arc<Cluster>,
    mut head: UpstreamHead,
    body: UpstreamBody,
    replay: Option<Bytes>,
    verdict: Option<&BodyVerdict>,
    timing: &mut UpstreamTiming,
) -> Sent {
    let permit = cluster.try_admit().ok_or(ProxyError::Overflow)?;
    let replayable = (head.method.is_idempotent() && body.is_end_stream()) || replay.is_some();
    let attempts = cluster.retries + 1;
    let mut body: Option<UpstreamBody> = Some(body);
    // At most 6 attempts (retries <= 5) plus resends of unsent requests.
    let mut tried = Tried::default();
    let mut attempt = 0;
    let mut stale_retries = 0;
    loop {
        attempt += 1;
        let last = attempt >= attempts;
        let i = cluster.pick(tried.as_slice());
        tried.push(i);
        let endpoint = cluster.endpoints[i].clone();
        let in_flight = cluster.start(i, None);
        let deadline = tokio::time::Instant::now() + cluster.request_timeout;
        let sent = Instant::now();

        let connected = tokio::time::timeout_at(deadline, cluster.connection(i)).await;
        let connect = sent.elapsed();
        timing.connect = Some(connect);
        let err = match connected {
            Err(_) => ProxyError::ConnectTimeout,
            Ok(Err(e)) => e,
            Ok(Ok(mut conn)) => {
                let mut req = Request::new(body.take().unwrap_or_else(|| {
                    Either::Right(Either::Left(Full::new(replay.clone().unwrap_or_default())))
                }));
                *req.method_mut() = head.method.clone();
                *req.uri_mut() = Uri::from(head.path.clone());
                // Keep a copy only when a reset could be retried.
                *req.headers_mut() = if replayable && !last {
                    head.headers.clone()
                } else {
                    std::mem::take(&mut head.headers)
                };
                if !req.headers().contains_key(header::HOST) {
                    if let Ok(v) = HeaderValue::from_str(endpoint.authority.as_str()) {
                        req.headers_mut().insert(header::HOST, v);
                    }
                }
                match tokio::time::timeout_at(deadline, conn.try_send_request(req)).await {
                    Ok(Ok(resp)) => {
                        timing.first_byte = Some(sent.elapsed().saturating_sub(connect));
                        cluster.duration.observe(sent.elapsed().as_secs_f64());
                        cluster.observe(i, resp.status().is_server_error());
                        let (mut parts, resp_body) = resp.into_parts();
                        headers::remove_hop_by_hop(&mut parts.headers);
                        let in_flight = in_flight.hold(permit, conn);
                        return Ok((
                            Response::from_parts(parts, ProxyBody::upstream(resp_body, in_flight)),
                            endpoint,
                        ));
                    }
                    Ok(Err(mut e)) => match e.take_message() {
                        // Never written: the pooled connection had died.
                        // Pick again (its pool hands out the next
                        // connection or a new one); no attempt is counted.
                        Some(unsent) if stale_retries < 2 => {
                            stale_retries += 1;
                            let (parts, unsent_body) = unsent.into_parts();
                            head.headers = parts.headers;
                            body = Some(unsent_body);
                            tried.pop();
                            attempt -= 1;
                            drop(in_flight);
                            continue;
                        }
                        _ => {
                            tracing::debug!(endpoint = %endpoint.addr, error = %e.error(), "upstream request failed");
                            ProxyError::UpstreamReset
                        }
                    },
                    Err(_elapsed) => ProxyError::Timeout,
                }
            }
        };
        drop(in_flight);
        // The client's body overran max_body or broke: its fault, not the
        // endpoint's, and nothing to retry.
        let err = verdict.map_or(err, |v| v.explain(err));
        if err.is_client() {
            return Err(err);
        }
        cluster.observe(i, true);
        cluster.record_error(err.code());
        tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, error = err.code(), attempt, "upstream attempt failed");
        let may_retry = err.is_retryable() && (err.nothing_sent() || replayable);
        if last || !may_retry {
            // Once per failed request, like nginx's "while connecting to
            // upstream" lines: an operator sees which cluster fails how.
            tracing::warn!(cluster = %cluster.name, endpoint = %endpoint.addr, error = err.code(), attempts = attempt, "upstream failed; answering {}", err.status().as_u16());
            return Err(err);
        }
        cluster
            .metrics
            .upstream_retries
            .with_label_values(&[&cluster.name])
            .inc();
    }
}

/// Endpoints already tried for one request, without a heap allocation.
#[derive(Default)]
struct Tried {
    slots: [usize; 8],
    len: usize,
}

impl Tried {
    fn push(&mut self, i: usize) {
        if self.len < self.slots.len() {
            self.slots[self.len] = i;
            self.len += 1;
        }
    }
    fn pop(&mut self) {
        self.len = self.len.saturating_sub(1);
    }
    fn as_slice(&self) -> &[usize] {
        &self.slots[..self.len]
    }
}

/// Reads ahead the first frame of a client body that goes upstream as it
/// is ([`LimitedBody::prefetch`]); a filtered body was primed already.
pub async fn prefetch(body: &mut UpstreamBody, within: Duration) -> Result<(), ProxyError> {
    match body {
        Either::Left(client) => client.prefetch(within).await,
        Either::Right(_) => Ok(()),
    }
}
