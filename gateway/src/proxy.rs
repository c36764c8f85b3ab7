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
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use filters::LocalResponse;
use filters::{BodyStop, ChainStream, StreamInfo, StreamReset};
use http::request::Parts;
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};

use crate::access_log::{AccessRecord, UpstreamTiming};
use crate::body::ProxyBody;
use crate::cache;
use crate::config::ListenerConfig;
use crate::conn_clock::ConnClock;
use crate::error::ProxyError;
use crate::limits::{self, BodyVerdict, LimitedBody};
use crate::router::{normalize_path, request_host};
use crate::runtime::Runtime;
use crate::upgrade;
use crate::upstream::{Cluster, Endpoint, UpstreamBody};
use crate::Shared;
use crate::{client_ip as identity, headers, otel};

/// What the listener knows about the connection a request came on.
pub struct ConnInfo {
    /// The connection's client address: the TCP peer, or the source in its
    /// PROXY protocol header.
    pub peer: SocketAddr,
    /// The TCP peer (the load balancer) when a PROXY header named another
    /// source.
    pub proxied_by: Option<SocketAddr>,
    pub listener: Arc<str>,
    /// `http` or `https`, for `x-forwarded-proto`.
    pub scheme: &'static str,
    /// The listener's settings: trusted proxies and request limits.
    pub config: Arc<ListenerConfig>,
    /// Requests in flight and the header read / idle clocks.
    pub clock: Arc<ConnClock>,
    /// A WebSocket tunnel to run once hyper hands the connection over.
    pub tunnel: upgrade::TunnelSlot,
}

/// What the access log and the request metrics record for a stream a
/// filter reset (no response at all): 444, nginx's code for a connection
/// closed without a response.
pub const RESET_STATUS: http::StatusCode = match http::StatusCode::from_u16(444) {
    Ok(s) => s,
    Err(_) => http::StatusCode::INTERNAL_SERVER_ERROR,
};

/// Handles one request. Every error becomes a response here or in
/// [`ProxyError::response`]; the one `Err` is a filter resetting the
/// stream ([`StreamReset`]), which hyper turns into an aborted exchange:
/// an HTTP/2 `RST_STREAM` for the stream, or an HTTP/1.1 connection closed
/// without a response.
pub async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, StreamReset> {
    let started = Instant::now();
    // One runtime for the whole request, even if a reload lands meanwhile.
    let runtime = shared.runtime.load_full();
    let (mut head, body) = req.into_parts();

    // Client identity: the connection's address (peer or PROXY source),
    // or the right-most untrusted x-forwarded-for entry when that address
    // is a trusted proxy. Before anything uses the client IP.
    // The listener's settings from the config in effect, not from when the
    // connection opened: an ALB keeps its connections for hours, and a
    // reloaded limit must reach them.
    let listener = runtime
        .config
        .listeners
        .iter()
        .find(|l| *l.name == *conn.listener)
        .unwrap_or(&conn.config);
    let client_ip = identity::resolve(conn.peer.ip(), &head.headers, &listener.trusted_proxies);
    let request_id = headers::ensure_request_id(&mut head.headers);
    // Trace: with an exporter the request's server span starts here, as a
    // child of the client's traceparent; its context is what the upstream
    // gets. Without one the traceparent is continued on the way out.
    let mut span = shared.otel.as_ref().map(|o| {
        let mut s = o.start_span(&head);
        s.arrived(otel::Arrival {
            head: &head,
            scheme: conn.scheme,
            listener: &conn.listener,
            peer: conn.peer,
            client: client_ip,
            request_id: &request_id,
        });
        s
    });
    let trace = span.as_ref().map(|s| s.context);
    // The JWT subject becomes the user header; a user header the client
    // sent never passes, verified token or not (see `jwt`).
    let identified = match &runtime.jwt {
        Some(v) => matches!(v.identify(&mut head.headers), Ok(Some(_))),
        None => {
            crate::jwt::strip_user_header(&mut head.headers);
            false
        }
    };

    // The answer for a request refused before it has a route (one place:
    // metrics under route "none", the access log, the request id).
    let mut refuse = |e: ProxyError, head: &Parts| {
        reject(
            shared,
            &runtime,
            e,
            head,
            &request_id,
            conn,
            client_ip,
            started,
            span.take(),
        )
    };

    // Content-Length next to Transfer-Encoding: hyper kept only the
    // latter; refused as Envoy and nginx do (see `framing`).
    if conn.clock.head_had_length() && head.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Ok(refuse(ProxyError::AmbiguousLength, &head));
    }

    // Request limits the connection layer cannot check: target length
    // (414) and a declared body length (413), before any routing work.
    let (body, verdict) = match limits::check_uri(&head.uri, listener.max_uri_bytes.0)
        .and_then(|()| LimitedBody::new(body, listener.max_body.0))
    {
        Ok(b) => b,
        Err(e) => return Ok(refuse(e, &head)),
    };

    // Route: decides the cluster, the priority and the filters. The path is
    // normalized first, so the route and the upstream see the same path.
    if let Err(e) = normalize_request_path(&mut head.uri) {
        return Ok(refuse(e, &head));
    }
    let host = request_host(&head.uri, &head.headers).to_string();
    // `OPTIONS *` is about the server as a whole: it takes the `/` route.
    let route_path = if head.uri.path() == "*" {
        "/"
    } else {
        head.uri.path()
    };
    let Some(route) = runtime.route(&host, route_path) else {
        return Ok(refuse(ProxyError::NoRoute, &head));
    };

    // Admission (bot rules, rate limits, waiting room, overload shedding)
    // comes here: after routing, because limits and priorities are per
    // route; before filters, so refused traffic costs no filter time.
    // Checkout routes admit here too: identity required, the edge's
    // sold-out flag, and the body read whole so that an Idempotency-Key
    // makes a retry safe (see `checkout`).
    let (mut body, replay, sku, early): (UpstreamBody, _, _, _) = match &route.checkout {
        None => (Either::Left(body), None, None, None),
        Some(c) => match c.prepare(&head, body, identified, &request_id).await {
            Ok(p) => (p.body, p.replay, p.sku, None),
            Err(answer) => (
                Either::Right(Either::Left(Full::new(Bytes::new()))),
                None,
                None,
                Some(answer),
            ),
        },
    };

    // A filter reset the stream: no answer at all (`abort_exchange`). The
    // filters' streams end (on_done, on_log) when `filtering` drops on the
    // way out.
    let aborted =
        |head: &Parts| abort_exchange(&runtime, route, head, &request_id, conn, client_ip, started);

    // Request filters: may rewrite the head, answer locally, pause, or
    // reset the stream.
    // (Built only for routes that have filters: most traffic has none.)
    let mut filtering = (!route.filters.is_empty()).then(|| {
        let info = StreamInfo {
            client_ip,
            route: route.name.clone(),
            priority: route.priority,
            load_level: 0,
            request_id: request_id.clone(),
            end_of_stream: body.is_end_stream(),
        };
        (route.filters.start(), info)
    });
    let mut local = match (&early, &mut filtering) {
        (None, Some((chain, info))) => match chain.on_request(&mut head, info).await {
            Ok(local) => local,
            Err(StreamReset) => return aborted(&head),
        },
        _ => None,
    };
    // The request body goes through the filters' body callbacks only when
    // a filter of the route looks at bodies; otherwise it streams as is.
    if let (None, None, Some((chain, info))) = (&early, &local, &mut filtering) {
        if chain.wants_bodies() && !body.is_end_stream() {
            if let Either::Left(incoming) = body {
                match filter_request_body(chain, info, &mut head, incoming).await {
                    Ok(filtered) => body = filtered,
                    Err(stop) => match stop.into_response(true) {
                        Ok(answer) => {
                            local = Some(answer);
                            body = Either::Right(Either::Left(Full::new(Bytes::new())));
                        }
                        Err(StreamReset) => return aborted(&head),
                    },
                }
            }
        }
    }

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

    let mut timing = UpstreamTiming::default();
    let (mut resp, endpoint) = match (early, local, cached) {
        (Some(answer), _, _) => (answer, None),
        (None, Some(local), _) => (local_response(local), None),
        // WebSocket and other upgrades, on routes that allow them: a
        // connection of their own, spliced after the upstream's 101.
        (None, None, _) if route.websocket && upgrade::is_upgrade(&head) => {
            match upgrade_request(&route.cluster, &mut head, client_ip, conn, &host, trace).await {
                Ok((resp, ep)) => (resp, Some(ep)),
                Err(e) => (e.response(&request_id), None),
            }
        }
        (None, None, Some(cache::Lookup::Hit(hit))) => (hit, None),
        // Misses, stale answers, bypasses: the cache decides whether and
        // when this request goes upstream (at most once). A chunked body's
        // first chunk is read before the upstream is chosen: bad framing
        // is refused here, never forwarded.
        (None, None, Some(cache::Lookup::Pending(pending))) => {
            match prefetch(&mut body, listener.header_read_timeout.0).await {
                Err(e) => (e.response(&request_id), None),
                Ok(()) => {
                    let mut up = head_for_upstream(&mut head, client_ip, conn, &host, trace);
                    pending.prepare_upstream(&mut up.headers);
                    let cluster = route.cluster.clone();
                    let verdict = verdict.clone();
                    let fetch = move || async move {
                        let mut timing = UpstreamTiming::default();
                        forward(&cluster, up, body, replay, &verdict, &mut timing)
                            .await
                            .map(|(r, _)| r)
                    };
                    (pending.resolve(&request_id, fetch).await, None)
                }
            }
        }
        (None, None, None) => match prefetch(&mut body, listener.header_read_timeout.0).await {
            Err(e) => (e.response(&request_id), None),
            Ok(()) => match forward(
                &route.cluster,
                head_for_upstream(&mut head, client_ip, conn, &host, trace),
                body,
                replay,
                &verdict,
                &mut timing,
            )
            .await
            {
                Ok((resp, ep)) => (resp, Some(ep)),
                Err(e) => (e.response(&request_id), None),
            },
        },
    };
    // A body callback can reset the stream while the request body streams
    // upstream: whatever the upstream made of the cut body, the client
    // gets no answer.
    if let Some((chain, _)) = &filtering {
        if chain.wants_bodies() && chain.is_reset() {
            return aborted(&head);
        }
    }
    if let (Some(c), Some(_)) = (&route.checkout, &endpoint) {
        c.observe(sku.as_deref(), resp.status());
    }

    // Response filters, in reverse order; then our own response headers.
    if let Some((mut chain, mut info)) = filtering {
        let (mut parts, mut body) = resp.into_parts();
        info.end_of_stream = body.is_end_stream();
        match chain.on_response(&mut parts, &info).await {
            Err(StreamReset) => return aborted(&head),
            Ok(Some(replaced)) => body = ProxyBody::full(replaced.body),
            Ok(None) if chain.wants_bodies() && !body.is_end_stream() => {
                body = match body.filter(&mut chain, &info).await {
                    Ok((filtered, len)) => {
                        set_length(&mut parts.headers, len);
                        filtered
                    }
                    Err(stop) => match stop.into_response(false) {
                        Ok(answer) => {
                            parts.status = answer.status;
                            parts.headers = answer.headers;
                            ProxyBody::full(answer.body)
                        }
                        // While priming: nothing went out yet. (A reset
                        // later, while the body streams, ends it with an
                        // error: hyper resets the stream or closes the
                        // connection mid-body.)
                        Err(StreamReset) => return aborted(&head),
                    },
                };
            }
            Ok(None) => {}
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
        let record = access_record(
            &head,
            &request_id,
            conn,
            client_ip,
            route.name.clone(),
            endpoint.as_deref().map(|e| Arc::from(&*e.addr)),
            status,
            started,
            timing,
        );
        resp.body_mut().log_on_end(record);
    }
    if let Some(mut span) = span {
        span.answered(otel::Answer {
            route: &route.name,
            host: &host,
            path: head.uri.path(),
            upstream: endpoint.as_deref().map(|e| e.addr.as_str()),
            status,
            headers: resp.headers(),
        });
        resp.body_mut().span_on_end(span);
    }
    Ok(resp)
}

/// Counts and logs a stream a filter reset, as [`RESET_STATUS`], and
/// returns the error that makes hyper abort the exchange. Out of line: it
/// is rare, and the request path stays small.
#[cold]
#[inline(never)]
fn abort_exchange(
    runtime: &Runtime,
    route: &crate::runtime::Route,
    head: &Parts,
    request_id: &HeaderValue,
    conn: &ConnInfo,
    client_ip: IpAddr,
    started: Instant,
) -> Result<Response<ProxyBody>, StreamReset> {
    route.count(RESET_STATUS);
    route.latency.observe(started.elapsed().as_secs_f64());
    if runtime.config.log.access_log {
        let record = access_record(
            head,
            request_id,
            conn,
            client_ip,
            route.name.clone(),
            None,
            RESET_STATUS,
            started,
            UpstreamTiming::default(),
        );
        record.emit(0, false);
    }
    Err(StreamReset)
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
    span: Option<otel::RequestSpan>,
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
        let record = access_record(
            head,
            request_id,
            conn,
            client_ip,
            Arc::from("none"),
            None,
            resp.status(),
            started,
            UpstreamTiming::default(),
        );
        resp.body_mut().log_on_end(record);
    }
    if let Some(mut span) = span {
        span.answered(otel::Answer {
            route: &Arc::from("none"),
            host: "",
            path: head.uri.path(),
            upstream: None,
            status: resp.status(),
            headers: resp.headers(),
        });
        resp.body_mut().span_on_end(span);
    }
    resp
}

/// The request head as the upstream sees it.
fn head_for_upstream(
    head: &mut Parts,
    client_ip: IpAddr,
    conn: &ConnInfo,
    host: &str,
    trace: Option<headers::TraceContext>,
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
    // x-forwarded-for and forwarded get the hop we saw (the connection's
    // address); x-real-ip the resolved client, replacing whatever the
    // client sent, so origins have one header they can believe.
    headers::set_forwarded(&mut headers, conn.peer.ip(), conn.scheme, host);
    if let Ok(v) = HeaderValue::try_from(client_ip.to_string()) {
        headers.insert(headers::X_REAL_IP.clone(), v);
    }
    // The span's context when an exporter is on (decided when the request
    // arrived), else the client's trace continued now.
    match trace {
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
    cluster: &Arc<Cluster>,
    head: &mut Parts,
    client_ip: IpAddr,
    conn: &ConnInfo,
    host: &str,
    trace: Option<headers::TraceContext>,
) -> Result<(Response<ProxyBody>, Arc<Endpoint>), ProxyError> {
    let on = head
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or(ProxyError::UpgradeFailed)?;
    let protocol = upgrade::upgrade_headers(head).ok_or(ProxyError::UpgradeFailed)?;
    let up = head_for_upstream(head, client_ip, conn, host, trace);
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
    verdict: &BodyVerdict,
    timing: &mut UpstreamTiming,
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
                        _ => ProxyError::UpstreamReset,
                    },
                    Err(_elapsed) => ProxyError::Timeout,
                }
            }
        };
        drop(in_flight);
        // The client's body overran max_body or broke: its fault, not the
        // endpoint's, and nothing to retry.
        let err = verdict.explain(err);
        if matches!(err, ProxyError::BodyTooLarge | ProxyError::BadBody) {
            return Err(err);
        }
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

/// Reads ahead the first frame of a client body that goes upstream as it
/// is ([`LimitedBody::prefetch`]); a filtered body was primed already.
async fn prefetch(body: &mut UpstreamBody, within: Duration) -> Result<(), ProxyError> {
    match body {
        Either::Left(client) => client.prefetch(within).await,
        Either::Right(_) => Ok(()),
    }
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
    set_length(&mut head.headers, filtered.known_length());
    Ok(Either::Right(Either::Right(filtered)))
}

/// A filtered body's length: exact when it was held whole (a filter may
/// have rewritten it), unknown (chunked) while it streams.
fn set_length(headers: &mut http::HeaderMap, len: Option<u64>) {
    match len {
        Some(n) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
}

fn local_response(local: LocalResponse) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(local.body));
    *resp.status_mut() = local.status;
    *resp.headers_mut() = local.headers;
    resp
}

#[allow(clippy::too_many_arguments)]
fn access_record(
    head: &Parts,
    request_id: &HeaderValue,
    conn: &ConnInfo,
    client_ip: IpAddr,
    route: Arc<str>,
    upstream: Option<Arc<str>>,
    status: http::StatusCode,
    started: Instant,
    timing: UpstreamTiming,
) -> Box<AccessRecord> {
    Box::new(AccessRecord {
        listener: conn.listener.clone(),
        client: client_ip,
        peer: conn.peer,
        method: head.method.clone(),
        path: head.uri.path().to_string(),
        route,
        upstream,
        status,
        request_id: request_id.clone(),
        started,
        head: started.elapsed(),
        timing,
    })
}
