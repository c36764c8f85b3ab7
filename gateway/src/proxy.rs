//! The request pipeline: one request's way through the gateway, phase by
//! phase, in the order of `docs/pipeline.md`:
//!
//! ```text
//! accept -> client identity -> route -> admission -> request filters
//!        -> cache lookup -> upstream -> response filters -> log, metrics
//! ```
//!
//! Phases that later issues fill in (admission) have their place marked
//! here, so the order stays readable in one function.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use filters::{LocalResponse, StreamInfo};
use http::request::Parts;
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};

use crate::body::ProxyBody;
use crate::cache;
use crate::error::ProxyError;
use crate::headers;
use crate::router::{normalize_path, request_host};
use crate::runtime::Runtime;
use crate::upstream::{Cluster, Endpoint, UpstreamBody};
use crate::Shared;

/// What the listener knows about the connection a request came on.
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub listener: Arc<str>,
    /// `http` or `https`, for `x-forwarded-proto`.
    pub scheme: &'static str,
}

/// Handles one request. Never fails: every error becomes a response here or
/// in [`ProxyError::response`].
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    // One runtime for the whole request, even if a reload lands meanwhile.
    let runtime = shared.runtime.load_full();
    let (mut head, body) = req.into_parts();

    // Client identity. The peer address for now; PROXY protocol and trusted
    // X-Forwarded-For hops plug in here, before anything uses the client IP.
    let client_ip = conn.peer.ip();
    let request_id = headers::ensure_request_id(&mut head.headers);
    // The JWT subject becomes the user header; a user header the client
    // sent never passes, verified token or not (see `jwt`).
    let identified = match &runtime.jwt {
        Some(v) => matches!(v.identify(&mut head.headers), Ok(Some(_))),
        None => {
            crate::jwt::strip_user_header(&mut head.headers);
            false
        }
    };

    // Route: decides the cluster, the priority and the filters. The path is
    // normalized first, so the route and the upstream see the same path.
    if let Err(e) = normalize_request_path(&mut head.uri) {
        return Ok(reject(
            &shared,
            &runtime,
            e,
            &head,
            &request_id,
            &conn,
            client_ip,
            started,
        ));
    }
    let host = request_host(&head.uri, &head.headers).to_string();
    // `OPTIONS *` is about the server as a whole: it takes the `/` route.
    let route_path = if head.uri.path() == "*" {
        "/"
    } else {
        head.uri.path()
    };
    let Some(route) = runtime.route(&host, route_path) else {
        return Ok(reject(
            &shared,
            &runtime,
            ProxyError::NoRoute,
            &head,
            &request_id,
            &conn,
            client_ip,
            started,
        ));
    };

    // Admission (bot rules, rate limits, waiting room, overload shedding)
    // comes here: after routing, because limits and priorities are per
    // route; before filters, so refused traffic costs no filter time.
    // Checkout routes admit here too: identity required, the edge's
    // sold-out flag, and the body read whole so that an Idempotency-Key
    // makes a retry safe (see `checkout`).
    let (body, replay, sku, early) = match &route.checkout {
        None => (Either::Left(body), None, None, None),
        Some(c) => match c.prepare(&head, body, identified, &request_id).await {
            Ok(p) => (p.body, p.replay, p.sku, None),
            Err(answer) => (
                Either::Right(Full::new(Bytes::new())),
                None,
                None,
                Some(answer),
            ),
        },
    };

    // Request filters: may rewrite the head, answer locally, or pause.
    // (Built only for routes that have filters: most traffic has none.)
    let mut filtering = (!route.filters.is_empty()).then(|| {
        let info = StreamInfo {
            client_ip,
            route: route.name.clone(),
            priority: route.priority,
            load_level: 0,
            request_id: request_id.to_str().unwrap_or("").into(),
        };
        (route.filters.start(), info)
    });
    let local = match (&early, &mut filtering) {
        (None, Some((chain, info))) => chain.on_request(&mut head, info).await,
        _ => None,
    };

    // Cache lookup: after filters (they may rewrite the head or answer
    // locally), before the upstream. A fresh L1 hit is answered here,
    // without building an upstream request.
    let cached = match (&early, &local, &route.cache) {
        (None, None, Some(rc)) => Some(runtime.cache.lookup(
            rc,
            &head,
            &host,
            !body.is_end_stream(),
        )),
        _ => None,
    };

    let (mut resp, endpoint) = match (early, local, cached) {
        (Some(answer), _, _) => (answer, None),
        (None, Some(local), _) => (local_response(local), None),
        (None, None, Some(cache::Lookup::Hit(hit))) => (hit, None),
        // Misses, stale answers, bypasses: the cache decides whether and
        // when this request goes upstream (at most once).
        (None, None, Some(cache::Lookup::Pending(pending))) => {
            let mut up = head_for_upstream(&mut head, client_ip, &conn, &host);
            pending.prepare_upstream(&mut up.headers);
            let cluster = route.cluster.clone();
            let fetch =
                move || async move { forward(&cluster, up, body, replay).await.map(|(r, _)| r) };
            (pending.resolve(&request_id, fetch).await, None)
        }
        (None, None, None) => match forward(
            &route.cluster,
            head_for_upstream(&mut head, client_ip, &conn, &host),
            body,
            replay,
        )
        .await
        {
            Ok((resp, ep)) => (resp, Some(ep)),
            Err(e) => (e.response(&request_id), None),
        },
    };
    if let (Some(c), Some(_)) = (&route.checkout, &endpoint) {
        c.observe(sku.as_deref(), resp.status());
    }

    // Response filters, in reverse order; then our own response headers.
    if let Some((mut chain, info)) = filtering {
        let (mut parts, mut body) = resp.into_parts();
        if let Some(replaced) = chain.on_response(&mut parts, &info).await {
            body = ProxyBody::full(replaced.body);
        }
        body.attach(chain);
        resp = Response::from_parts(parts, body);
    }
    resp.headers_mut()
        .insert(headers::X_REQUEST_ID.clone(), request_id.clone());

    // Cache store, metrics and the access log close the request.
    let status = resp.status();
    route.count(status);
    route.latency.observe(started.elapsed().as_secs_f64());
    if runtime.config.log.access_log {
        access_log(
            &head,
            &request_id,
            &conn,
            client_ip,
            &route.name,
            endpoint.as_deref().map(|e| &*e.addr),
            status,
            started,
        );
    }
    Ok(resp)
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

/// Answers a request the gateway refuses before routing it anywhere.
#[allow(clippy::too_many_arguments)]
fn reject(
    shared: &Shared,
    runtime: &Runtime,
    err: ProxyError,
    head: &Parts,
    request_id: &HeaderValue,
    conn: &ConnInfo,
    client_ip: IpAddr,
    started: Instant,
) -> Response<ProxyBody> {
    let mut resp = err.response(request_id);
    resp.headers_mut()
        .insert(headers::X_REQUEST_ID.clone(), request_id.clone());
    shared
        .metrics
        .requests
        .with_label_values(&["none", resp.status().as_str()])
        .inc();
    if runtime.config.log.access_log {
        access_log(
            head,
            request_id,
            conn,
            client_ip,
            "none",
            None,
            resp.status(),
            started,
        );
    }
    resp
}

/// The request head as the upstream sees it.
fn head_for_upstream(
    head: &mut Parts,
    client_ip: IpAddr,
    conn: &ConnInfo,
    host: &str,
) -> UpstreamHead {
    // The client's head keeps only what the access log reads; the headers
    // move to the upstream request rather than being copied.
    let mut headers = std::mem::take(&mut head.headers);
    // The target's authority, when the request has one (HTTP/2 :authority,
    // HTTP/1.1 absolute-form), is what we routed on, so it is the Host the
    // upstream gets (RFC 9112 section 3.2.2: it replaces a Host header).
    if let Some(auth) = head.uri.authority() {
        if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
            headers.insert(header::HOST, v);
        }
    }
    headers::remove_hop_by_hop(&mut headers);
    headers::set_forwarded(&mut headers, client_ip, conn.scheme, host);
    headers::continue_trace(&mut headers);
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

struct UpstreamHead {
    method: http::Method,
    path: http::uri::PathAndQuery,
    headers: http::HeaderMap,
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
async fn forward(
    cluster: &Arc<Cluster>,
    mut head: UpstreamHead,
    body: UpstreamBody,
    replay: Option<Bytes>,
) -> Result<(Response<ProxyBody>, Arc<Endpoint>), ProxyError> {
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

        let err = match tokio::time::timeout_at(deadline, cluster.connection(i)).await {
            Err(_) => ProxyError::ConnectTimeout,
            Ok(Err(e)) => e,
            Ok(Ok(mut conn)) => {
                let mut req = Request::new(body.take().unwrap_or_else(|| {
                    Either::Right(Full::new(replay.clone().unwrap_or_default()))
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
                        _ => ProxyError::UpstreamReset,
                    },
                    Err(_elapsed) => ProxyError::Timeout,
                }
            }
        };
        drop(in_flight);
        cluster.observe(i, true);
        cluster.record_error(err.code());
        tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.addr, error = err.code(), attempt, "upstream attempt failed");
        let connect_failed = matches!(
            err,
            ProxyError::ConnectRefused | ProxyError::ConnectFailed | ProxyError::ConnectTimeout
        );
        let may_retry = connect_failed || (replayable && err == ProxyError::UpstreamReset);
        if last || !may_retry {
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

fn local_response(local: LocalResponse) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(local.body));
    *resp.status_mut() = local.status;
    *resp.headers_mut() = local.headers;
    resp
}

#[allow(clippy::too_many_arguments)]
fn access_log(
    head: &Parts,
    request_id: &HeaderValue,
    conn: &ConnInfo,
    client_ip: IpAddr,
    route: &str,
    upstream: Option<&str>,
    status: http::StatusCode,
    started: Instant,
) {
    tracing::info!(
        target: "flashgate::access",
        listener = %conn.listener,
        client = %client_ip,
        method = %head.method,
        path = head.uri.path(),
        route,
        upstream = upstream.unwrap_or("-"),
        status = status.as_u16(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        request_id = request_id.to_str().unwrap_or("-"),
    );
}
