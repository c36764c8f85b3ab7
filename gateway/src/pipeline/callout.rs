//! HTTP callouts for filters (a Wasm guest's `proxy_http_call`): the
//! gateway's side of [`filters::callout::HttpCallout`]. A callout goes to
//! an `[[upstreams]]` cluster of the running config, through the same
//! pools, load balancing and concurrency limit as proxied requests, but
//! without retries (the guest sets its own timeout and decides).
//!
//! A gRPC call (`proxy_grpc_call`, already framed by the filters crate)
//! goes to the cluster over HTTP/2 with prior knowledge (h2c, as gRPC
//! servers on plain TCP speak it), on one multiplexed connection per
//! endpoint kept here, with the cluster's load balancing and concurrency
//! limit.

use std::sync::{Arc, Weak};

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use filters::callout::{CalloutError, CalloutFuture, CalloutRequest, CalloutResponse, HttpCallout};
use http::{header, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};

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
    /// HTTP/2 connections for gRPC calls, by endpoint address.
    pub h2: H2Connections,
}

/// HTTP/2 connections for gRPC calls, one per endpoint address, opened on
/// first use and replaced once closed.
#[derive(Default, Clone)]
pub struct H2Connections(Arc<Mutex<HashMap<String, H2Sender>>>);

type H2Sender = http2::SendRequest<Full<Bytes>>;

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
        if req.grpc {
            return Ok(Box::pin(send_grpc(cluster, req, self.h2.clone())));
        }
        Ok(Box::pin(send(cluster, req)))
    }

    fn spawn(&self, task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.runtime.spawn(task);
    }
}

/// A callout's failure, naming its cluster.
fn failure(cluster: &Cluster, what: &str) -> CalloutError {
    CalloutError::Failed(format!("{what} (cluster {})", cluster.name))
}

/// A slot in the callout's cluster (callouts obey its concurrency limit
/// like requests) and the endpoint to call.
fn admit(cluster: &Cluster) -> Result<(tokio::sync::OwnedSemaphorePermit, usize), CalloutError> {
    let permit = cluster
        .try_admit()
        .ok_or_else(|| failure(cluster, "cluster at its concurrency limit"))?;
    Ok((permit, cluster.pick(&[])))
}

async fn send(cluster: Arc<Cluster>, req: CalloutRequest) -> Result<CalloutResponse, CalloutError> {
    let failed = |what: &str| failure(&cluster, what);
    let (permit, i) = admit(&cluster)?;
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

/// One unary gRPC call over HTTP/2; the answer with its trailers (where
/// gRPC puts `grpc-status`).
async fn send_grpc(
    cluster: Arc<Cluster>,
    req: CalloutRequest,
    conns: H2Connections,
) -> Result<CalloutResponse, CalloutError> {
    let failed = |what: &str| failure(&cluster, what);
    let (permit, i) = admit(&cluster)?;
    let endpoint = cluster.endpoints[i].clone();
    let _in_flight = cluster.start(i, Some(permit));
    let mut sender = conns.get(&endpoint.addr).await.map_err(|e| failed(&e))?;
    let uri = format!("http://{}{}", endpoint.authority, req.path)
        .parse::<Uri>()
        .map_err(|_| failed("invalid service or method name"))?;
    let mut upstream = Request::new(Full::new(req.body));
    *upstream.method_mut() = req.method;
    *upstream.uri_mut() = uri;
    *upstream.version_mut() = http::Version::HTTP_2;
    *upstream.headers_mut() = req.headers;
    let resp = sender
        .send_request(upstream)
        .await
        .map_err(|e| failed(&format!("send: {e}")))?;
    let (parts, body) = resp.into_parts();
    let collected = Limited::new(body, MAX_CALLOUT_BODY)
        .collect()
        .await
        .map_err(|e| failed(&format!("reading the answer: {e}")))?;
    cluster.observe(i, parts.status.is_server_error());
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Ok(CalloutResponse {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

impl H2Connections {
    /// A ready connection to `addr`: the kept one, or a new one.
    async fn get(&self, addr: &str) -> Result<H2Sender, String> {
        let kept = self.lock().get(addr).cloned();
        if let Some(mut sender) = kept {
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        let stream = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "gRPC callout connection ended with an error");
            }
        });
        self.lock().insert(addr.to_string(), sender.clone());
        Ok(sender)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, H2Sender>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
