//! `bench-hello`: the smallest useful hyper 1 server, used by `bench/run`
//! both as the fixed-cost upstream behind the proxies and as the ceiling of
//! the box (what one hyper process answers when it does nothing else).
//!
//! Every request, whatever its method or path, gets `200 OK` with the same
//! body of `--body-bytes` bytes. Connections are HTTP/1.1 with keep-alive
//! (HTTP/2 with prior knowledge also works, through the auto builder). The
//! request body, if any, is drained by hyper.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "bench-hello",
    about = "A minimal hyper server answering 200 with a fixed body"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Size of the response body in bytes.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Capacity-limited origin: each request takes this long ...
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// ... and at most this many are served at once; the rest wait in
    /// line (0: no limit). With `--delay-ms 20 --slots 4` the origin serves
    /// 200 req/s, the overload benchmark's shape (`bench/overload`).
    #[arg(long, default_value_t = 0)]
    slots: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(serve(cli))
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    // Printed so a caller that asked for port 0 learns the real one.
    println!("bench-hello listening on {}", listener.local_addr()?);

    // One shared buffer: every response clones the `Bytes` handle, so the
    // per-request cost does not depend on the body size beyond the copy
    // into the socket.
    let body = Bytes::from(vec![b'x'; cli.body_bytes]);
    let content_type = HeaderValue::from_static("text/plain");

    let delay = std::time::Duration::from_millis(cli.delay_ms);
    let slots =
        (cli.slots > 0).then(|| std::sync::Arc::new(tokio::sync::Semaphore::new(cli.slots)));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true);

    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("bench-hello: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let content_type = content_type.clone();
        let slots = slots.clone();
        let service = service_fn(move |_req: Request<Incoming>| {
            let mut resp = Response::new(Full::new(body.clone()));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, content_type.clone());
            let slots = slots.clone();
            async move {
                let _slot = match &slots {
                    Some(s) => s.acquire().await.ok(),
                    None => None,
                };
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            // Clients going away mid-request is normal under load; nothing
            // to report.
            let _ = connection.await;
        });
    }
}
