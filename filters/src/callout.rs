//! HTTP callouts: how a filter (a Wasm guest's `proxy_http_call`) sends a
//! request to one of the gateway's upstream clusters.
//!
//! This crate does not know connection pools or listeners, so the gateway
//! hands it an [`HttpCallout`] at start-up ([`set_http_callout`]); the
//! filters crate only builds the request, bounds it with the guest's
//! timeout and delivers the answer. Without a registered callout every
//! call is refused (the guest sees `BadArgument` from `proxy_http_call`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

/// A request a filter sends to an upstream cluster.
#[derive(Debug)]
pub struct CalloutRequest {
    /// The `[[upstreams]]` name the guest asked for.
    pub cluster: String,
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    /// Regular headers (the guest's `:authority` becomes `host`).
    pub headers: HeaderMap,
    pub body: Bytes,
    /// A gRPC call (`proxy_grpc_call`): send it over HTTP/2 (prior
    /// knowledge) and keep the answer's trailers. The request is complete
    /// (headers, framed message); the gateway only carries it.
    pub grpc: bool,
}

/// The upstream's complete answer (callout bodies are small: the gateway
/// bounds them).
#[derive(Debug, Clone)]
pub struct CalloutResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: HeaderMap,
}

/// Why a callout got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CalloutError {
    #[error("no upstream cluster named `{0}`")]
    UnknownCluster(String),
    #[error("callout timed out")]
    Timeout,
    #[error("callout failed: {0}")]
    Failed(String),
}

/// The answer to come.
pub type CalloutFuture =
    Pin<Box<dyn Future<Output = Result<CalloutResponse, CalloutError>> + Send + 'static>>;

/// Sends callouts for filters. Implemented by the gateway.
pub trait HttpCallout: Send + Sync {
    /// Starts `req`. An error here (no such cluster) is reported to the
    /// guest at once; a started call always completes through the future.
    fn call(&self, req: CalloutRequest) -> Result<CalloutFuture, CalloutError>;

    /// Runs a root context's callout in the background. A stream's callout
    /// is awaited by the request's own task; a root context (a tick, a
    /// queue) has no task, and its ticker thread is not a runtime thread.
    fn spawn(&self, task: Pin<Box<dyn Future<Output = ()> + Send + 'static>>);
}

static CALLOUT: RwLock<Option<Arc<dyn HttpCallout>>> = RwLock::new(None);

/// Registers the process's callout implementation (the gateway does this
/// once at start-up; a later call replaces it).
pub fn set_http_callout(callout: Arc<dyn HttpCallout>) {
    *CALLOUT.write().unwrap_or_else(|e| e.into_inner()) = Some(callout);
}

// Used by the Wasm host only (feature `wasm`).
#[cfg_attr(not(feature = "wasm"), allow(dead_code))]
fn registered() -> Option<Arc<dyn HttpCallout>> {
    CALLOUT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Starts a callout bounded by `timeout`.
#[cfg_attr(not(feature = "wasm"), allow(dead_code))]
pub(crate) fn start(req: CalloutRequest, timeout: Duration) -> Result<CalloutFuture, CalloutError> {
    let callout = registered().ok_or_else(|| CalloutError::UnknownCluster(req.cluster.clone()))?;
    let fut = callout.call(req)?;
    Ok(Box::pin(async move {
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CalloutError::Timeout),
        }
    }))
}

/// Starts a root context's callout bounded by `timeout`; `deliver` gets
/// its answer, on a runtime thread.
#[cfg_attr(not(feature = "wasm"), allow(dead_code))]
pub(crate) fn start_detached(
    req: CalloutRequest,
    timeout: Duration,
    deliver: impl FnOnce(Result<CalloutResponse, CalloutError>) + Send + 'static,
) -> Result<(), CalloutError> {
    let callout = registered().ok_or_else(|| CalloutError::UnknownCluster(req.cluster.clone()))?;
    let fut = start(req, timeout)?;
    callout.spawn(Box::pin(async move { deliver(fut.await) }));
    Ok(())
}
