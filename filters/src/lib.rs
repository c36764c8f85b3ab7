//! The flashgate filter chain.
//!
//! Filters sit between admission and the cache in the gateway's pipeline
//! (see `docs/pipeline.md`): they see every request's head before it is
//! looked up or forwarded, and every response's head on its way back. A
//! filter may let the stream go on, answer it locally, or pause it until
//! some asynchronous work (an HTTP callout, say) is done.
//!
//! This crate deliberately knows nothing about listeners, connection pools or
//! Redis: it works on `http` request/response heads and a small
//! [`StreamInfo`], so that native filters and the proxy-wasm host
//! ([`wasm`], behind the same [`FilterFactory`] trait) can be tested
//! without a network.
//!
//! The model is Envoy's: a [`FilterFactory`] is built once per configured
//! filter and makes one [`StreamFilter`] per request, so a filter can keep
//! per-request state without locks.

mod body;
pub mod callout;
mod chain;
pub mod native;
#[cfg(feature = "wasm")]
pub mod wasm;

pub use body::{BodyStop, FilteredBody};
pub use chain::{ChainStream, FilterChain};

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

/// What a filter wants done with the stream after one of its phases.
pub enum Flow {
    /// Go on with the next filter (or the next pipeline phase).
    Continue,
    /// Stop here and answer the client with this response. Filters after
    /// this one never see the request.
    Respond(LocalResponse),
    /// Hold the stream until the future completes, then call the same
    /// phase's `resume` hook. The future must not borrow the request: a
    /// filter that needs to change the head after the wait records what to
    /// do and applies it in `resume_*`.
    Pause(Pending),
    /// Abort the stream without an answer (proxy-wasm's
    /// `proxy_close_stream`, Envoy's stream reset): HTTP/2 resets the
    /// stream, HTTP/1.1 closes the connection. Later filters never see the
    /// stream; every filter's `on_done` still runs. See [`StreamReset`].
    Reset,
}

impl fmt::Debug for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flow::Continue => f.write_str("Continue"),
            Flow::Respond(r) => f.debug_tuple("Respond").field(&r.status).finish(),
            Flow::Pause(_) => f.write_str("Pause"),
            Flow::Reset => f.write_str("Reset"),
        }
    }
}

/// What a filter wants done after one of its body callbacks.
pub enum BodyFlow {
    /// Pass the (possibly rewritten) data on now.
    Continue,
    /// Hold the data: the chain keeps it and calls the filter again with
    /// everything held so far plus the next chunk, until the filter
    /// continues or the body ends (proxy-wasm's `Pause` on a body). The
    /// held bytes are bounded by the chain's body limit.
    Buffer,
    /// Stop the stream and answer with this response instead.
    Respond(LocalResponse),
    /// Abort the stream without an answer, as [`Flow::Reset`]. Once the
    /// response head went out, the client sees the response cut off.
    Reset,
}

/// A filter reset the stream ([`Flow::Reset`], [`BodyFlow::Reset`]): the
/// chain's answer, which the gateway turns into an aborted exchange (an
/// HTTP/2 `RST_STREAM`, or an HTTP/1.1 connection closed without a
/// response) instead of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream reset by filter")]
pub struct StreamReset;

/// A paused stream's wake-up: when it completes, the chain resumes the filter.
pub type Pending = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A response produced by a filter instead of the upstream.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Set when the answer is not the filter's own but a refusal on the
    /// filter's account (a trap in a fail-closed filter, a body past the
    /// hold limit): the gateway then builds it in the shape of all its
    /// own answers, with an error code and the request id.
    pub refusal: Option<Refusal>,
}

impl LocalResponse {
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        LocalResponse {
            status,
            headers: HeaderMap::new(),
            body: body.into(),
            refusal: None,
        }
    }

    /// A refusal for the gateway to build (see [`LocalResponse::refusal`]).
    pub fn refused(refusal: Refusal) -> Self {
        LocalResponse {
            refusal: Some(refusal),
            ..LocalResponse::new(refusal.status(), Bytes::new())
        }
    }
}

/// Why the filter chain refused a stream on its own account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A filter held more of the request body than the chain's limit.
    RequestBodyTooLarge,
    /// The request body broke off while a filter read it.
    RequestBodyBroken,
    /// A filter held more of the response body than the chain's limit.
    ResponseBodyTooLarge,
    /// The upstream's body broke off while a filter held it.
    UpstreamBodyBroken,
    /// A filter failed (trap, timeout, out of memory) with `fail = "closed"`.
    FilterFailed,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::RequestBodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::RequestBodyBroken => StatusCode::BAD_REQUEST,
            // As Envoy: a response past a buffering filter's limit is the
            // gateway's own failure (500), a broken upstream body the
            // upstream's (502), a failed Wasm filter `wasm_fail_stream`
            // (503).
            Refusal::ResponseBodyTooLarge => StatusCode::INTERNAL_SERVER_ERROR,
            Refusal::UpstreamBodyBroken => StatusCode::BAD_GATEWAY,
            Refusal::FilterFailed => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// How important a route is when the gateway is overloaded. Checkout is
/// `Critical`, the catalog `Normal`, recommendations and the like
/// `Sheddable`. Filters read it to decide what to strip under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Sheddable,
    #[default]
    Normal,
    Critical,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Sheddable => "sheddable",
            Priority::Normal => "normal",
            Priority::Critical => "critical",
        }
    }
}

/// Facts about the stream that filters may read but not change.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// The resolved client address (after PROXY protocol / trusted hops).
    pub client_ip: IpAddr,
    /// The matched route's name.
    pub route: Arc<str>,
    pub priority: Priority,
    /// The gateway's current load level (0 = calm; higher = more loaded).
    pub load_level: u8,
    /// 1 (automated) to 99 (human), from the gateway's bot rules.
    pub bot_score: u8,
    /// The client's JA4 TLS fingerprint, when the gateway knows it.
    pub ja4: Option<Arc<str>>,
    /// The request id (the `x-request-id` header's value).
    pub request_id: http::HeaderValue,
    /// No body follows the head being filtered (the gateway sets it before
    /// each header phase from the body itself: HTTP/2's END_STREAM, an
    /// HTTP/1.1 head without a body, a 204). proxy-wasm passes it to
    /// the header callbacks as `end_of_stream`.
    pub end_of_stream: bool,
}

/// Per-request filter state. Every phase has a default that lets the stream
/// continue, so a filter implements only the phases it cares about.
pub trait StreamFilter: Send {
    /// Runs once the request head is known, before the cache and upstream.
    /// Changes to `req` are what the upstream sees.
    fn on_request_headers(&mut self, _req: &mut http::request::Parts, _info: &StreamInfo) -> Flow {
        Flow::Continue
    }

    /// Called after a `Flow::Pause` from `on_request_headers` completed.
    fn resume_request_headers(
        &mut self,
        _req: &mut http::request::Parts,
        _info: &StreamInfo,
    ) -> Flow {
        Flow::Continue
    }

    /// Runs on the response head on its way to the client, in the reverse
    /// order of the request phase (the filter nearest the upstream first).
    /// Local responses from earlier filters pass through here too.
    fn on_response_headers(
        &mut self,
        _resp: &mut http::response::Parts,
        _info: &StreamInfo,
    ) -> Flow {
        Flow::Continue
    }

    /// Called after a `Flow::Pause` from `on_response_headers` completed.
    fn resume_response_headers(
        &mut self,
        _resp: &mut http::response::Parts,
        _info: &StreamInfo,
    ) -> Flow {
        Flow::Continue
    }

    /// Runs on each chunk of the request body, in configuration order,
    /// only for filters whose factory says [`FilterFactory::wants_bodies`].
    /// `body` holds the chunk, or everything this filter held so far plus
    /// the chunk after a [`BodyFlow::Buffer`]; the filter may rewrite it.
    /// `end_of_stream` is true on the last call (possibly with no data).
    fn on_request_body(
        &mut self,
        _body: &mut Bytes,
        _end_of_stream: bool,
        _info: &StreamInfo,
    ) -> BodyFlow {
        BodyFlow::Continue
    }

    /// Like [`StreamFilter::on_request_body`] for the response body, in
    /// reverse order.
    fn on_response_body(
        &mut self,
        _body: &mut Bytes,
        _end_of_stream: bool,
        _info: &StreamInfo,
    ) -> BodyFlow {
        BodyFlow::Continue
    }

    /// Runs on the trailers of a body that has them (after its last data
    /// chunk); the filter may edit them, or reset the stream.
    fn on_request_trailers(
        &mut self,
        _trailers: &mut HeaderMap,
        _info: &StreamInfo,
    ) -> Result<(), StreamReset> {
        Ok(())
    }

    /// Like [`StreamFilter::on_request_trailers`] for response trailers.
    fn on_response_trailers(
        &mut self,
        _trailers: &mut HeaderMap,
        _info: &StreamInfo,
    ) -> Result<(), StreamReset> {
        Ok(())
    }

    /// The stream is over (answered, failed or aborted by the client). Runs
    /// exactly once per stream, also when the client went away mid-request.
    fn on_done(&mut self) {}
}

/// A configured filter: built once from config, shared by all requests.
pub trait FilterFactory: Send + Sync {
    /// The name routes refer to it by.
    fn name(&self) -> &str;
    /// Makes the per-request state.
    fn new_stream(&self) -> Box<dyn StreamFilter>;
    /// Does this filter look at bodies? Only then does the gateway route
    /// bodies through the chain; a chain where no filter does streams
    /// them untouched, with no copy and no buffering.
    fn wants_bodies(&self) -> bool {
        false
    }
    /// The most body bytes this filter may hold with [`BodyFlow::Buffer`]
    /// (the chain uses the smallest limit of its filters).
    fn body_limit(&self) -> usize {
        DEFAULT_BODY_LIMIT
    }
}

/// Default bound of a body held by a filter: past it, a request is
/// answered 413 and a response is replaced by a 502 (Envoy's default
/// per-connection buffer limit is the same 1 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// What happens to a stream when its filter fails (a Wasm filter traps,
/// runs out of time or memory, or cannot run): `[[filters]] fail = ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Skip the filter: the stream goes on as if it were not configured.
    Open,
    /// Fail the stream: the client gets a 500.
    #[default]
    Closed,
}

/// Why a filter could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("unknown native filter `{0}` (known: {known})", known = native::KNOWN.join(", "))]
    UnknownNative(String),
    /// The filter refused its configuration (for a Wasm filter: its
    /// `proxy_on_configure` returned false).
    #[error("invalid config: {0}")]
    Config(String),
    /// The Wasm module cannot be used: unreadable, invalid, not a
    /// proxy-wasm module, or it failed to start.
    #[error("wasm module: {0}")]
    Wasm(String),
}
