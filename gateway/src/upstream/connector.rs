//! The TCP connector for upstream pools: hyper-util's `HttpConnector` (with
//! the connect timeout and TCP_NODELAY) plus a counter of new connections,
//! which is what tells an operator whether keep-alive pooling works.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::net::TcpStream;

#[derive(Clone)]
pub struct CountingConnector {
    inner: HttpConnector,
    opened: IntCounter,
}

impl CountingConnector {
    pub fn new(connect_timeout: Duration, opened: IntCounter) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_connect_timeout(Some(connect_timeout));
        inner.set_nodelay(true);
        inner.enforce_http(true);
        CountingConnector { inner, opened }
    }
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let fut = self.inner.call(uri);
        let opened = self.opened.clone();
        Box::pin(async move {
            let conn = fut.await?;
            opened.inc();
            Ok(conn)
        })
    }
}
