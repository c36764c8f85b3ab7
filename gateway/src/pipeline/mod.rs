//! The request pipeline: one request's way through the gateway, phase by
//! phase, in the order of `docs/pipeline.md`:
//!
//! ```text
//! identity -> request limits -> route -> admission -> request filters
//!          -> cache -> upstream -> response filters -> finish
//! ```
//!
//! Each phase is a plain function in its own module. It takes the
//! request's [`RequestCtx`] (what the request has accumulated so far) and
//! returns [`ControlFlow`]: `Continue` with what the next phase needs, or
//! `Break` with a [`Stop`], which ends the request early.
//! Every way a request ends goes through one exit, [`finish`], and every
//! answer the gateway makes itself through one builder, [`crate::respond`].
//! [`handle`] is the whole order on one screen.

pub mod admission;
pub mod authority;
pub mod cache;
pub mod callout;
pub mod filters;
pub mod finish;
pub mod forward;
pub mod identity;
pub mod request_limits;
pub mod route;
pub mod runtime;
pub mod upgrade;

use std::future::Future;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::config::{Config, ListenerConfig};
use crate::edge::conn_clock::ActiveRequest;
use crate::edge::request_body::BodyVerdict;
use crate::edge::{App, ConnInfo};
use crate::observe::access_log::UpstreamTiming;
use crate::observe::metrics::Metrics;
use crate::observe::otel::RequestSpan;
use crate::upstream::Endpoint;
use crate::Shared;
use runtime::{Route, Runtime};

pub use finish::RESET_STATUS;

/// Why a request ends before the next phase.
pub enum Stop {
    /// The gateway answers it itself (see [`crate::respond`]).
    Refuse(crate::respond::Refusal),
    /// A filter reset the stream: no answer at all (an HTTP/2
    /// `RST_STREAM`, or an HTTP/1.1 connection closed without a response).
    Reset,
    /// Answered without the filters and the upstream: a copy from the
    /// cache or the route's fallback, given by overload shedding.
    Answer(Box<Response<ProxyBody>>),
}

/// What one request accumulates on its way through the phases. Borrowed
/// parts (the runtime, the connection, the route) live as long as the
/// request: a reload that lands meanwhile does not change them.
pub struct RequestCtx<'a> {
    pub shared: &'a Shared,
    /// One runtime for the whole request, even if a reload lands meanwhile.
    pub runtime: &'a Runtime,
    pub conn: &'a ConnInfo,
    /// The listener's settings from the config in effect, not from when
    /// the connection opened: an ALB keeps its connections for hours, and
    /// a reloaded limit must reach them.
    pub listener: &'a ListenerConfig,
    pub started: Instant,
    /// The resolved client (see `identity::client_ip`).
    pub client_ip: IpAddr,
    pub request_id: HeaderValue,
    /// The request carried a verified JWT.
    pub identified: bool,
    /// The verified JWT subject (for per-user rate limits).
    pub user: Option<String>,
    /// The request's server span when an exporter is on.
    pub span: Option<RequestSpan>,
    /// The routing host (empty before routing).
    pub host: String,
    /// Set by the route phase.
    pub route: Option<&'a Route>,
    /// Whether the client's body overran or broke, readable after an
    /// upstream attempt failed.
    pub verdict: Option<BodyVerdict>,
    /// A checkout's SKU, for the sold-out flag.
    pub sku: Option<String>,
    /// A checkout body kept for a retry its `Idempotency-Key` makes safe.
    pub replay: Option<Bytes>,
    /// The filter chain's stream, from the request filters to the
    /// response filters.
    pub filters: Option<filters::Filtering>,
    /// The endpoint that answered.
    pub endpoint: Option<Arc<Endpoint>>,
    pub timing: UpstreamTiming,
    /// The load level when the request was admitted: what filters read as
    /// `flashgate.load_level` and the access log writes.
    pub load_level: u8,
    /// Set by bot rules (`deprioritize`): shed before the other requests
    /// of its priority.
    pub deprioritized: bool,
    /// The request carried `[overload] debug_header`: the answer gets
    /// `x-flashgate-load-level`.
    pub debug_level: bool,
    /// 1 (automated) to 99 (human), from the bot rules that applied: what
    /// filters read as `flashgate.bot_score` and the access log writes.
    pub bot_score: u8,
    /// The client's JA4 TLS fingerprint, when known (from a trusted
    /// proxy's header).
    pub ja4: Option<Arc<str>>,
    /// `RateLimit-Policy` / `RateLimit` for the answer, from a route with
    /// `rate_limit.headers = "always"` (boxed: rarely set, and the
    /// request's state stays small).
    pub rate_limit_fields: Option<Box<admission::limits::Allowed>>,
    /// Set when a waiting room let the request in: its session, for the
    /// cookie and the origin's release on the answer.
    pub waiting_room: Option<admission::waiting_room::Admitted>,
}

impl<'a> RequestCtx<'a> {
    fn new(shared: &'a Shared, runtime: &'a Runtime, conn: &'a ConnInfo) -> RequestCtx<'a> {
        let started = Instant::now();
        let listener = runtime
            .config
            .listeners
            .iter()
            .find(|l| *l.name == *conn.listener)
            .unwrap_or(&conn.config);
        RequestCtx {
            shared,
            runtime,
            conn,
            listener,
            started,
            client_ip: conn.peer.ip(),
            request_id: HeaderValue::from_static(""),
            identified: false,
            user: None,
            span: None,
            host: String::new(),
            route: None,
            verdict: None,
            sku: None,
            replay: None,
            filters: None,
            endpoint: None,
            timing: UpstreamTiming::default(),
            load_level: 0,
            deprioritized: false,
            debug_level: false,
            bot_score: admission::bots::HUMAN,
            ja4: None,
            rate_limit_fields: None,
            waiting_room: None,
        }
    }
}

/// Handles one request: the phases in their order, then the exit. Each
/// line says why its phase stands where it does; `phase!` ends the request
/// early (to the exit) when a phase stops it.
pub async fn handle(
    shared: &Shared,
    request: ActiveRequest,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ::filters::StreamReset> {
    let runtime = shared.runtime.load_full();
    let (mut parts, body) = req.into_parts();
    let mut state = RequestCtx::new(shared, &runtime, request.conn());
    let (ctx, head) = (&mut state, &mut parts);
    // One async fn for all phases, not one per phase list: each nested
    // future costs a copy of its whole state when it is created.
    let outcome = 'phases: {
        macro_rules! phase {
            ($e:expr) => {
                match $e {
                    ControlFlow::Continue(v) => v,
                    ControlFlow::Break(stop) => break 'phases ControlFlow::Break(stop),
                }
            };
        }
        // Who is asking, first: every later phase and every answer use it.
        identity::identify(ctx, head);
        // What the connection layer could not refuse, before any routing.
        let body = phase!(request_limits::check(ctx, head, body));
        // The route decides the cluster, priority, filters and cache.
        let route = phase!(route::select(ctx, head));
        // Limits and priorities are per route; a refusal costs no filter
        // time and no upstream slot.
        let body = phase!(admission::admit(ctx, route, head, body).await);
        // Filters may rewrite the head, answer locally, pause or reset.
        let mut resp = match phase!(filters::on_request(ctx, route, head, body).await) {
            filters::Next::Answered(resp) => resp,
            // Upgrades get a connection of their own and are never cached.
            filters::Next::Upstream(_) if route.websocket && upgrade::is_upgrade(head) => {
                forward::upgrade(ctx, route, head).await
            }
            // The cache answers or decides when to go upstream (one fill
            // per key for the whole fleet).
            filters::Next::Upstream(body) => match &route.cache {
                Some(rc) => cache::serve(ctx, rc, route, head, body).await,
                None => forward::send(ctx, route, head, body).await,
            },
        };
        admission::learn(ctx, route, &mut resp);
        // The response filters see every answer that passed the request
        // filters.
        let resp = phase!(filters::on_response(ctx, resp).await);
        // What the filters left of an upstream body is read at the
        // upstream's pace: a slow client holds no upstream slot.
        ControlFlow::Continue(forward::spool_response(ctx, route, head, resp))
    };
    // Metrics, access log and span, however the request ended.
    let mut resp = finish::finish(state, &parts, outcome)?;
    // The connection counts the request as in flight until its response
    // body is done.
    resp.body_mut().hold(request);
    Ok(resp)
}

/// The pipeline serves the edge's connections.
impl App for Shared {
    type Body = ProxyBody;

    fn config(&self) -> Arc<Config> {
        self.runtime.load().config.clone()
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn handle(
        &self,
        request: ActiveRequest,
        req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ::filters::StreamReset>> + Send {
        handle(self, request, req)
    }
}
