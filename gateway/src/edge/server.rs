//! Listeners: accept TCP connections and take each through the connection
//! phases of the pipeline before HTTP starts:
//!
//! ```text
//! accept -> listener connection limit -> PROXY header (if enabled)
//!        -> per-client-address limit -> TLS + ALPN (if enabled)
//!        -> HTTP/1.1 or HTTP/2 (hyper, with the head/stream limits)
//! ```
//!
//! The order matters: the listener limit is checked before a byte is read,
//! so a flood costs one accept; the per-address limit needs the PROXY
//! address, so it follows the header; TLS comes after both, so a refused
//! client never costs a handshake.
//!
//! Once HTTP runs, the connection's task polls hyper's connection and the
//! connection's clocks together (`conn_clock`): a request head slower than
//! `header_read_timeout` drops the connection, `idle_timeout` without a
//! request closes it gracefully, and the drain asks it to close. A
//! connection that upgraded (WebSocket) runs its tunnel in the same task,
//! so it keeps its connection slots and the drain waits for it.
//!
//! An HTTP/1.1 connection idle for `park_idle_after` is *parked*: hyper's
//! connection (its read and write buffers, about 16 KiB) is taken apart
//! and dropped, and the task waits for the socket to become readable,
//! still under the same clocks and the drain, still holding the same
//! slots. The client's next bytes start a fresh hyper connection on the
//! same socket (and TLS session). HTTP/2 connections are never parked.

use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Buf, Bytes};
use std::future::{poll_fn, Future};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ListenerConfig};
use crate::edge::conn_clock::{ActiveRequest, Clocks, ConnClock, Exit, HeadWatch, ParkTimer};
use crate::edge::limits::ConnLimits;
use crate::edge::proxy_protocol;
use crate::edge::stream_idle::{self, StreamExec};
use crate::edge::tls::CertStore;
use crate::edge::{App, ConnInfo};

/// Builds the connection settings of a listener: the limits a client
/// controls (head size, header count, HTTP/2 streams) are set here, on the
/// connection, before any request reaches the pipeline. The header read
/// and idle timeouts are our own (`conn_clock`): hyper's one HTTP/1.1
/// clock runs from the moment it waits for a head, idle time included, so
/// it stays only as a backstop that never fires before ours. Its timer is
/// set per connection ([`ParkTimer`]): arming it is how hyper tells us it
/// waits for a head.
///
/// HTTP/1.1 uses hyper's own builder rather than hyper-util's auto one:
/// only hyper's connection gives its IO back (`into_parts`) for parking.
fn http_builders(
    cfg: &ListenerConfig,
    stream_timeouts: IntCounter,
) -> (http1::Builder, auto::Builder<StreamExec>) {
    let mut h1 = http1::Builder::new();
    h1.keep_alive(true)
        .header_read_timeout(cfg.idle_timeout.0 + cfg.header_read_timeout.0 * 2)
        .max_headers(cfg.max_headers)
        .max_buf_size(cfg.max_header_bytes.0 as usize);
    // HTTP/2 streams run as tasks hyper spawns: under the stream idle
    // clock (`stream_idle`).
    let mut h2 = auto::Builder::new(StreamExec {
        idle: cfg.stream_idle_timeout.0,
        timeouts: stream_timeouts,
    });
    h2.http2()
        .timer(TokioTimer::new())
        // Twice the limit at the protocol level: h2 answers a header list
        // above its setting with a bare REFUSED_STREAM, which tells clients
        // to retry at once. Up to twice the limit, the request-limits phase
        // answers 431 as HTTP/1.1 does; beyond, h2's reset still bounds
        // the memory.
        .max_header_list_size(
            cfg.max_header_bytes
                .0
                .saturating_mul(2)
                .min(u32::MAX as u64) as u32,
        )
        .max_concurrent_streams(cfg.max_concurrent_streams);
    (h1, h2.http2_only())
}

/// Whether a reload from `a` to `b` can be applied to a running listener:
/// the socket (`name`, `listen`), the TLS certificate paths and the PROXY
/// protocol switch are fixed at start; every limit and `trusted_proxies`
/// apply to new connections and requests at once.
pub fn applies_live(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    a.name == b.name
        && a.listen == b.listen
        && a.tls == b.tls
        && a.proxy_protocol == b.proxy_protocol
}

/// A listener's settings for new connections, from one loaded config.
struct Settings {
    /// The config these were built from: a reload brings a new one.
    source: Arc<Config>,
    cfg: Arc<ListenerConfig>,
    /// HTTP/1.1 only and HTTP/2 only: the protocol is chosen before hyper
    /// sees the connection (ALPN, or the h2c preface).
    h1: http1::Builder,
    h2: auto::Builder<StreamExec>,
}

impl Settings {
    fn new(source: Arc<Config>, cfg: ListenerConfig, stream_timeouts: IntCounter) -> Settings {
        let (h1, h2) = http_builders(&cfg, stream_timeouts);
        Settings {
            source,
            cfg: Arc::new(cfg),
            h1,
            h2,
        }
    }
}

/// The drain's stages, sent to every connection that serves HTTP.
const SERVING: u8 = 0;
/// Close gracefully: HTTP/1.1 `connection: close` after the request in
/// flight (idle ones at once), HTTP/2 GOAWAY; tunnels run on.
const DRAINING: u8 = 1;
/// `drain_timeout` has passed: drop whatever is still open.
const CUT: u8 = 2;

/// What every connection of one listener shares.
struct Listener<A> {
    app: Arc<A>,
    name: Arc<str>,
    settings: ArcSwap<Settings>,
    tls: Option<(TlsAcceptor, Duration)>,
    limits: Arc<ConnLimits>,
    refused: IntCounterVec,
    /// `flashgate_connections_parked` of this listener.
    parked: IntGauge,
    /// The drain's stage. Each connection serving HTTP holds a receiver,
    /// so the drain knows when the last one is gone (`Sender::closed`).
    drain: watch::Sender<u8>,
}

impl<A: App> Listener<A> {
    fn refuse(&self, reason: &str) {
        self.refused.with_label_values(&[&self.name, reason]).inc();
    }

    fn stream_timeouts(&self) -> IntCounter {
        self.app
            .metrics()
            .connection_timeouts
            .with_label_values(&[&self.name, "stream_idle"])
    }

    fn timed_out(&self, timeout: &str) {
        self.app
            .metrics()
            .connection_timeouts
            .with_label_values(&[&self.name, timeout])
            .inc();
    }

    /// The settings for a new connection: those of the config in effect.
    /// After a reload the first connection rebuilds them (and the
    /// connection limits); later ones reuse them.
    fn settings(&self) -> Arc<Settings> {
        let current = self.settings.load_full();
        let config = self.app.config();
        if Arc::ptr_eq(&current.source, &config) {
            return current;
        }
        let found = config
            .listeners
            .iter()
            .find(|l| *l.name == *self.name && applies_live(&current.cfg, l));
        // Gone or moved: the reload reported a restart as needed; keep
        // serving with what we have.
        let cfg = found.cloned().unwrap_or_else(|| (*current.cfg).clone());
        self.limits
            .set(cfg.max_connections, cfg.max_connections_per_ip);
        let next = Arc::new(Settings::new(config.clone(), cfg, self.stream_timeouts()));
        self.settings.store(next.clone());
        next
    }

    /// One connection, from its first byte to its end.
    async fn connection(&self, settings: Arc<Settings>, mut stream: TcpStream, peer: SocketAddr) {
        let mut client = peer;
        let mut proxied_by = None;
        let mut prefix = Bytes::new();
        if settings.cfg.proxy_protocol {
            let header = tokio::time::timeout(
                settings.cfg.proxy_protocol_timeout.0,
                proxy_protocol::read_header(&mut stream),
            )
            .await;
            match header {
                Ok(Ok((source, rest))) => {
                    if let Some(source) = source {
                        client = source;
                        proxied_by = Some(peer);
                    }
                    prefix = rest;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "PROXY header refused; closing");
                    return self.refuse("proxy_protocol");
                }
                Err(_) => {
                    tracing::debug!(%peer, "no PROXY header in time; closing");
                    return self.refuse("proxy_protocol_timeout");
                }
            }
        }
        let Some(_ip_slot) = self.limits.try_ip(client.ip()) else {
            return self.refuse("max_connections_per_ip");
        };
        let Some((acceptor, handshake_timeout)) = &self.tls else {
            // Plain: HTTP/2 with prior knowledge starts with its preface.
            // A client that sends nothing (or half a preface) within
            // header_read_timeout is closed. For HTTP/1.1 the first head's
            // clock starts here too: its first bytes are read here.
            let http_from = Instant::now();
            let sniffed = tokio::time::timeout_at(
                http_from + settings.cfg.header_read_timeout.0,
                sniff_h2(&mut stream, prefix),
            )
            .await;
            let (h2, prefix) = match sniffed {
                Ok(Ok(found)) => found,
                Ok(Err(_)) => return,
                Err(_) => return self.refuse("first_bytes_timeout"),
            };
            let io = Rewind {
                prefix,
                inner: stream,
            };
            return Box::pin(self.serve_http(
                &settings,
                io,
                h2,
                Peer {
                    client,
                    proxied_by,
                    ja4: None,
                },
                "http",
                http_from,
            ))
            .await;
        };
        // Boxed: the handshake's state (a whole rustls connection) would
        // otherwise stay part of the task's size for its whole life. The
        // TLS stream it yields is boxed as well (1.2 KiB, most of it the
        // rustls connection): every future that holds the connection's IO
        // (the task, serving, parking, closing) then holds a pointer, not
        // a copy of the rustls state each.
        let handshake = Box::pin(async move {
            tokio::time::timeout(*handshake_timeout, async move {
                // The ClientHello is read ahead for its JA4 fingerprint
                // (rustls does not expose it), then put back for rustls.
                let mut stream = stream;
                let (hello, ja4) =
                    super::ja4::read_hello(&mut stream, bytes::BytesMut::from(&prefix[..])).await?;
                let io = Rewind {
                    prefix: hello,
                    inner: stream,
                };
                let tls = acceptor.accept(io).await?;
                Ok::<_, std::io::Error>((Box::new(tls), ja4.map(Arc::<str>::from)))
            })
            .await
        });
        match handshake.await {
            Ok(Ok((tls, ja4))) => {
                // ALPN decides; a client that offered none speaks HTTP/1.1.
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let http_from = Instant::now();
                let io = Rewind {
                    prefix: Bytes::new(),
                    inner: tls,
                };
                let from = Peer {
                    client,
                    proxied_by,
                    ja4,
                };
                Box::pin(self.serve_http(&settings, io, h2, from, "https", http_from)).await
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                self.refuse("tls_handshake");
            }
            Err(_) => self.refuse("tls_handshake_timeout"),
        }
    }

    /// HTTP on a connection, from `http_from` (when its first bytes were
    /// awaited) to its end, and then its tunnel if it upgraded.
    #[allow(clippy::too_many_arguments)]
    async fn serve_http<I: Parkable>(
        &self,
        settings: &Settings,
        mut io: Rewind<I>,
        h2: bool,
        from: Peer,
        scheme: &'static str,
        http_from: Instant,
    ) {
        let Peer {
            client,
            proxied_by,
            ja4,
        } = from;
        // HTTP/1.1 owes its first head from the start; HTTP/2 starts idle.
        let clock = ConnClock::new(!h2);
        let conn = Arc::new(ConnInfo {
            peer: client,
            proxied_by,
            listener: self.name.clone(),
            scheme,
            ja4,
            config: settings.cfg.clone(),
            clock: clock.clone(),
            tunnel: Default::default(),
        });
        let app = self.app.clone();
        let info = conn.clone();
        let mut service = service_fn(move |req| {
            // Counted from the moment hyper has the head until the
            // response body is done (or the handler is dropped).
            let request = ActiveRequest::start(&info);
            let app = app.clone();
            async move {
                let answer = app.handle(request, req).await;
                // HTTP/2: the stream's idle clock starts now.
                stream_idle::answered();
                answer
            }
        });

        let mut drain = self.drain.subscribe();
        let cfg = &settings.cfg;
        let timer = pin!(tokio::time::sleep_until(http_from));
        let mut clocks = Clocks::new(
            &clock,
            cfg.header_read_timeout.0,
            cfg.idle_timeout.0,
            cfg.send_timeout.0,
            http_from,
            timer,
        );
        // With upgrades: a WebSocket route hands the raw connection over
        // once its 101 has been sent (see `pipeline::upgrade`).
        let ended = if h2 {
            let io = HeadWatch::sends_only(io, clock.clone());
            // Boxed, so that the HTTP/1.1 connections' tasks, parked or
            // not, are not sized for an HTTP/2 connection.
            let mut connection = Box::pin(
                settings
                    .h2
                    .serve_connection_with_upgrades(TokioIo::new(io), service),
            );
            let run = Box::pin(self.drive(
                &mut clocks,
                connection.as_mut(),
                &mut drain,
                client,
                None,
                |c| c.graceful_shutdown(),
            ))
            .await;
            match run {
                Run::Ended(ended) => ended,
                Run::Dropped | Run::Park => return,
            }
        } else {
            // The park timer lives as long as the connection: re-armed
            // lazily, as the clocks' timer is.
            let mut park_timer = pin!(tokio::time::sleep_until(http_from));
            loop {
                let io_watch = TokioIo::new(HeadWatch::new(io, Some(clock.clone())));
                // Boxed: parking frees it with the buffers it owns.
                let mut connection = Box::pin(
                    settings
                        .h1
                        .clone()
                        .timer(ParkTimer(clock.clone()))
                        .serve_connection(io_watch, service)
                        .with_upgrades(),
                );
                let park = Park {
                    clock: &clock,
                    after: cfg.park_idle_after.0,
                    timer: park_timer.as_mut(),
                };
                // Boxed too: what serving takes is freed while parked, and
                // the task itself stays small.
                let run = Box::pin(self.drive(
                    &mut clocks,
                    connection.as_mut(),
                    &mut drain,
                    client,
                    Some(park),
                    |c| c.graceful_shutdown(),
                ))
                .await;
                match run {
                    Run::Ended(ended) => break ended.map_err(Into::into),
                    Run::Dropped => return,
                    Run::Park => {}
                }
                // Idle, flushed, no head begun: nothing of HTTP is lost
                // but the bytes hyper read ahead, which are put back.
                let Some(parts) = Pin::into_inner(connection).into_parts() else {
                    return;
                };
                io = parts.io.into_inner().into_inner();
                service = parts.service;
                if !parts.read_buf.is_empty() {
                    io.put_back(parts.read_buf);
                    continue;
                }
                drop(parts.read_buf);
                let woke = {
                    let _parked = Parked::new(&self.parked);
                    let readable = pin!(poll_fn(|cx| io.poll_read_ready(cx)));
                    let stop = async {
                        let _ = drain.wait_for(|stage| *stage >= DRAINING).await;
                    };
                    clocks.run(readable, stop).await
                };
                match woke {
                    // The client sent something (or closed): hyper reads it.
                    Exit::Done(()) => {}
                    Exit::IdleTimeout => {
                        self.timed_out("idle");
                        return close_parked(io, cfg.header_read_timeout.0).await;
                    }
                    Exit::Stopped(_) => return close_parked(io, cfg.header_read_timeout.0).await,
                    // No head is pending and nothing is written while parked.
                    Exit::HeadTimeout | Exit::SendTimeout => return,
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(peer = %client, error = %e, "connection ended with an error");
        }
        // An upgraded connection: its tunnel runs here, holding the
        // connection's slots, until either side closes or the drain's
        // time is up.
        if let Some(tunnel) = conn.tunnel.take() {
            tokio::select! {
                _ = tunnel => {}
                _ = drain.wait_for(|stage| *stage >= CUT) => {}
            }
        }
    }

    /// Polls one hyper connection under the connection's clocks and the
    /// drain until it ends, is dropped, or (with `park`) may be parked.
    async fn drive<C: Future>(
        &self,
        clocks: &mut Clocks<'_>,
        mut connection: Pin<&mut C>,
        drain: &mut watch::Receiver<u8>,
        client: SocketAddr,
        mut park: Option<Park<'_>>,
        graceful_shutdown: impl Fn(Pin<&mut C>),
    ) -> Run<C::Output> {
        let mut closing = false;
        loop {
            let stop_at = if closing { CUT } else { DRAINING };
            let mut drained = pin!(drain.wait_for(|stage| *stage >= stop_at));
            let mut park = park.as_mut().filter(|_| !closing);
            let stop = poll_fn(|cx| {
                if drained.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                match park {
                    Some(ref mut park) => park.poll(cx).map(|()| true),
                    None => Poll::Pending,
                }
            });
            match clocks.run(connection.as_mut(), stop).await {
                Exit::Done(ended) => return Run::Ended(ended),
                Exit::Stopped(true) => return Run::Park,
                Exit::HeadTimeout => {
                    tracing::debug!(peer = %client, "request head too slow; closing");
                    self.timed_out("header_read");
                    return Run::Dropped;
                }
                Exit::SendTimeout => {
                    tracing::debug!(peer = %client, "client took no bytes for send_timeout; closing");
                    self.timed_out("send");
                    return Run::Dropped;
                }
                // Told to close and still there: the client did not go
                // within the grace, or the drain's time is up.
                Exit::IdleTimeout | Exit::Stopped(false) if closing => return Run::Dropped,
                Exit::IdleTimeout => {
                    self.timed_out("idle");
                    graceful_shutdown(connection.as_mut());
                    clocks.closing();
                    closing = true;
                }
                Exit::Stopped(false) => {
                    graceful_shutdown(connection.as_mut());
                    clocks.closing();
                    closing = true;
                }
            }
        }
    }
}

/// How [`Listener::drive`] left a hyper connection.
enum Run<T> {
    /// It ended by itself (closed, failed, or upgraded).
    Ended(T),
    /// Timed out or cut by the drain: drop the socket.
    Dropped,
    /// Idle for `park_idle_after`: take the IO back.
    Park,
}

/// When an HTTP/1.1 connection may be parked: once it has been
/// [parkable](ConnClock::parkable) for `after` since its last request.
struct Park<'a> {
    clock: &'a ConnClock,
    after: Duration,
    /// Re-armed only when it is due earlier than it is set for (never
    /// once per request: a busy connection moves its due time on with
    /// every request, and the timer catches up when it fires).
    timer: Pin<&'a mut Sleep>,
}

impl Park<'_> {
    /// Checked every time the connection's task wakes: parkable changes
    /// only inside hyper's poll, which runs just before.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if !self.clock.parkable() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let due = self.clock.idle_since() + self.after;
            if due <= now {
                return Poll::Ready(());
            }
            let set = self.timer.deadline();
            if set <= now || set > due {
                self.timer.as_mut().reset(due);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired for an earlier due time: look again.
        }
    }
}

/// Counts a parked connection in `flashgate_connections_parked` while it
/// lives (also when the drain cuts the task).
struct Parked(IntGauge);

impl Parked {
    fn new(gauge: &IntGauge) -> Parked {
        gauge.inc();
        Parked(gauge.clone())
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Closes a parked connection as hyper closes an idle one: TLS
/// `close_notify` and FIN, given `grace` to go out.
async fn close_parked<I: Parkable>(mut io: Rewind<I>, grace: Duration) {
    let _ = tokio::time::timeout(grace, io.shutdown()).await;
}

/// A client connection's transport that can be watched for the client's
/// next bytes without reading them.
pub trait Parkable: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready once there is something to read (bytes, EOF or an error).
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<()>;
}

impl Parkable for TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        TcpStream::poll_read_ready(self, cx).map(|_| ())
    }
}

impl<T: Parkable> Parkable for Box<T> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        (**self).poll_read_ready(cx)
    }
}

impl Parkable for tokio_rustls::server::TlsStream<Rewind<TcpStream>> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let (io, tls) = self.get_mut();
        // Records rustls has already taken off the socket would never
        // make it readable again.
        match tls.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() == 0 => io.poll_read_ready(cx),
            _ => Poll::Ready(()),
        }
    }
}

impl<T: Parkable> Parkable for Rewind<T> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.prefix.is_empty() {
            return Poll::Ready(());
        }
        self.inner.poll_read_ready(cx)
    }
}

/// What every socket of one listener shares, however many workers serve
/// it (`edge::workers`): the connection limits count the listener's
/// connections, not a socket's, and one TLS config means one session
/// ticket key, so a client resumes on whichever worker it lands.
#[derive(Clone)]
pub struct ListenerGroup {
    limits: Arc<ConnLimits>,
    tls: Option<(TlsAcceptor, Duration)>,
}

impl ListenerGroup {
    /// `None` when the listener has TLS but its config failed to build
    /// (logged): it does not serve.
    pub fn new(cfg: &ListenerConfig, certs: Option<Arc<CertStore>>) -> Option<ListenerGroup> {
        let tls = certs.and_then(|store| match store.server_config() {
            Ok(config) => {
                let timeout = cfg.tls.as_ref().map_or(Duration::from_secs(10), |t| {
                    t.handshake_timeout.0
                });
                Some((TlsAcceptor::from(config), timeout))
            }
            Err(e) => {
                tracing::error!(listener = %cfg.name, error = %e, "TLS config failed; listener not serving");
                None
            }
        });
        if cfg.tls.is_some() && tls.is_none() {
            return None;
        }
        Some(ListenerGroup {
            limits: ConnLimits::new(cfg.max_connections, cfg.max_connections_per_ip),
            tls,
        })
    }
}

/// Serves one listener until `shutdown` flips, then stops accepting, lets
/// open connections finish (HTTP/1 gets `connection: close`, HTTP/2 a
/// GOAWAY; WebSocket tunnels run on) for at most `shutdown.drain_timeout`,
/// cuts what is left, and returns.
pub async fn serve<A: App>(
    app: Arc<A>,
    listener: TcpListener,
    cfg: ListenerConfig,
    shutdown: watch::Receiver<bool>,
    certs: Option<Arc<CertStore>>,
) {
    if let Some(group) = ListenerGroup::new(&cfg, certs) {
        serve_socket(app, listener, cfg, shutdown, group).await
    }
}

/// [`serve`] for one of the sockets of a listener `group`.
pub async fn serve_socket<A: App>(
    app: Arc<A>,
    listener: TcpListener,
    cfg: ListenerConfig,
    mut shutdown: watch::Receiver<bool>,
    group: ListenerGroup,
) {
    let name: Arc<str> = cfg.name.as_str().into();
    let ListenerGroup { limits, tls } = group;
    let this = Arc::new(Listener {
        limits,
        parked: app.metrics().connections_parked.with_label_values(&[&name]),
        settings: ArcSwap::from_pointee(Settings::new(
            app.config(),
            cfg,
            app.metrics()
                .connection_timeouts
                .with_label_values(&[&name, "stream_idle"]),
        )),
        refused: app.metrics().connections_refused.clone(),
        app: app.clone(),
        name: name.clone(),
        tls,
        drain: watch::Sender::new(SERVING),
    });
    let active = app.metrics().connections_active.with_label_values(&[&name]);
    let total = app.metrics().connections_total.with_label_values(&[&name]);
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
        total.inc();
        let settings = this.settings();
        let Some(slot) = this.limits.try_conn() else {
            this.refuse("max_connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        active.inc();
        let this = this.clone();
        let active = active.clone();
        tokio::spawn(async move {
            this.connection(settings, stream, peer).await;
            drop(slot);
            active.dec();
        });
    }
    drop(listener);
    let drain_timeout = app.config().shutdown.drain_timeout.0;
    this.drain.send_replace(DRAINING);
    if tokio::time::timeout(drain_timeout, this.drain.closed())
        .await
        .is_err()
    {
        tracing::warn!(listener = %name, "drain timeout: closing remaining connections");
        this.drain.send_replace(CUT);
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the first bytes tell HTTP/2 (the whole preface) from
/// HTTP/1.1 (any byte that departs from it). Returns the verdict and every
/// byte read, to be replayed.
async fn sniff_h2(stream: &mut TcpStream, prefix: Bytes) -> std::io::Result<(bool, Bytes)> {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::from(&prefix[..]);
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Ok((false, buf.freeze()));
        }
        if n == H2_PREFACE.len() {
            return Ok((true, buf.freeze()));
        }
        buf.reserve(H2_PREFACE.len());
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Who is at the other end of a connection.
struct Peer {
    client: SocketAddr,
    proxied_by: Option<SocketAddr>,
    /// The client's JA4 fingerprint (TLS listeners).
    ja4: Option<Arc<str>>,
}

/// A stream with bytes already read from it (past a PROXY header, or read
/// ahead by a hyper connection that was parked) put back in front, so the
/// next reader sees the stream from its own first byte.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// `bytes` were read before whatever is still in front.
    fn put_back(&mut self, bytes: Bytes) {
        self.prefix = if self.prefix.is_empty() {
            bytes
        } else {
            let mut all = bytes::BytesMut::with_capacity(bytes.len() + self.prefix.len());
            all.extend_from_slice(&bytes);
            all.extend_from_slice(&self.prefix);
            all.freeze()
        };
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An empty view still holds the whole buffer it came from.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
