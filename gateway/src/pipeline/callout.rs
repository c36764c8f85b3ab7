//! HTTP callouts for filters (a Wasm guest's `proxy_http_call`): the
//! gateway's side of [`filters::callout::HttpCallout`]. A callout goes to
//! an `[[upstreams]]` cluster of the running config, through the same
//! pools, load balancing and concurrency limit as proxied requests, but
//! without retries (the guest sets its own timeout and decides).

use std::sync::{Arc, Weak};

use bytes::Bytes;
use filters::callout::{CalloutError, CalloutFuture, CalloutRequest, CalloutResponse, HttpCallout};
use http::{header, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Either, Full, Limited};

use crate::upstream::Cluster;
use crate::Shared;

/// Largest callout answer body a filter gets; a bigger one fails the call.
const MAX_CALLOUT_BODY: usize = 1 << 20;

/// Sends filter callouts to the clusters of the current runtime.
pub struct GatewayCallout {
    /// Weak: the registration is process-wide and must not keep a stopped
    /// gateway alive.
    pub shared: Weak<Shared>,
    /// Where root contexts' callouts run (see [`HttpCallout::spawn`]).
    pub runtime: tokio::runtime::Handle,
}

impl HttpCallout for GatewayCallout {
    fn call(&self, req: CalloutRequest) -> Result<CalloutFuture, CalloutError> {
        let shared = self
            .shared
            .upgrade()
            .ok_or_else(|| CalloutError::Failed("the gateway is stopping".into()))?;
        let runtime = shared.runtime.load();
        let cluster = runtime
            .clusters
            .iter()
            .find(|c| *c.name == *req.cluster)
            .cloned()
            .ok_or_else(|| CalloutError::UnknownCluster(req.cluster.clone()))?;
        Ok(Box::pin(send(cluster, req)))
    }

    fn spawn(&self, task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.runtime.spawn(task);
    }
}

async fn send(cluster: Arc<Cluster>, req: CalloutRequest) -> Result<CalloutResponse, CalloutError> {
    let failed = |what: &str| CalloutError::Failed(format!("{what} (cluster {})", cluster.name));
    let permit = cluster
        .try_admit()
        .ok_or_else(|| failed("cluster at its concurrency limit"))?;
    let i = cluster.pick(&[]);
    let endpoint = cluster.endpoints[i].clone();
    let in_flight = cluster.start(i, None);
    let mut conn = cluster.connection(i).await.map_err(|e| failed(e.code()))?;
    let mut upstream = Request::new(Either::Right(Either::Left(Full::new(req.body))));
    *upstream.method_mut() = req.method;
    *upstream.uri_mut() = req
        .path
        .parse::<Uri>()
        .map_err(|_| failed("invalid :path"))?;
    *upstream.headers_mut() = req.headers;
    if !upstream.headers().contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(endpoint.authority.as_str()) {
            upstream.headers_mut().insert(header::HOST, v);
        }
    }
    let resp = conn
        .try_send_request(upstream)
        .await
        .map_err(|e| failed(&format!("send: {}", e.into_error())))?;
    let (parts, body) = resp.into_parts();
    let collected = Limited::new(body, MAX_CALLOUT_BODY)
        .collect()
        .await
        .map_err(|e| failed(&format!("reading the answer: {e}")))?;
    cluster.observe(i, parts.status.is_server_error());
    in_flight.hold(permit, conn).complete();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body: Bytes = collected.to_bytes();
    Ok(CalloutResponse {
        status: parts.status,
        headers: parts.headers,
        body,
        trailers,
    })
}
