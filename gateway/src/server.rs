//! Listeners: accept TCP connections and serve HTTP/1.1 and h2c (prior
//! knowledge) on each, with the listener's limits, until shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ListenerConfig;
use crate::proxy::{self, ConnInfo};
use crate::Shared;

/// Builds the connection settings of a listener: the limits a client
/// controls (head size, time to send the head) are set here, on the
/// connection, before any request reaches the pipeline.
fn http_builder(cfg: &ListenerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(cfg.header_read_timeout.0)
        .max_buf_size(cfg.max_header_bytes.0 as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes.0 as u32)
        .max_concurrent_streams(256);
    builder
}

/// Serves one listener until `shutdown` flips, then stops accepting, lets
/// open connections finish (HTTP/1 gets `connection: close`, HTTP/2 a
/// GOAWAY) for at most `drain_timeout`, and returns.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    cfg: ListenerConfig,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    let builder = http_builder(&cfg);
    let graceful = GracefulShutdown::new();
    let name: Arc<str> = cfg.name.as_str().into();
    let active = shared
        .metrics
        .connections_active
        .with_label_values(&[&cfg.name]);
    let total = shared
        .metrics
        .connections_total
        .with_label_values(&[&cfg.name]);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        total.inc();
        active.inc();
        let conn = Arc::new(ConnInfo {
            peer,
            listener: name.clone(),
            scheme: "http",
        });
        let shared = shared.clone();
        let service = service_fn(move |req| proxy::handle(shared.clone(), conn.clone(), req));
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let watched = graceful.watch(connection);
        let active = active.clone();
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            active.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = %name, "drain timeout: closing remaining connections");
    }
}
