//! The two clocks of a client connection, kept apart:
//!
//! - **header read** (`header_read_timeout`, HTTP/1.1): from the first byte
//!   of a request head to its last. A client that dribbles a head is cut.
//! - **idle** (`idle_timeout`): how long a connection may have no request
//!   in flight (HTTP/1.1 between keep-alive requests, HTTP/2 with no open
//!   stream). It is then closed gracefully: HTTP/1.1 closes, HTTP/2 sends
//!   GOAWAY.
//! - **send** (`send_timeout`, HTTP/1.1 and HTTP/2): how long a write may
//!   wait for the client to take bytes (the socket's send buffer stays
//!   full) before the connection is dropped, as nginx's `send_timeout`. A
//!   client that never reads (slow read) is cut, whatever is in flight.
//!
//! hyper has only one clock for HTTP/1.1, started when it waits for the
//! next head, so it cannot tell a slow head from an idle keep-alive
//! connection. The pieces here share one [`ConnClock`] per connection:
//!
//! - [`HeadWatch`], around the connection's IO, notes that bytes arrived
//!   while no request was in flight: a head has started;
//! - [`ActiveRequest`], made when hyper hands a request to the service and
//!   kept in the response body until it ends or is dropped, counts requests
//!   in flight and stamps when the last one ended;
//! - [`Clocks`], polled in the connection's own task right after the hyper
//!   connection, turns that into one timer per connection.
//!
//! The same clock tells the connection's task when an HTTP/1.1 connection
//! may be *parked* (`server`): hyper waits for the next head
//! ([`ParkTimer`] sees it), nothing of a head has arrived, no request is in
//! flight and every byte written has been flushed ([`HeadWatch`]).
//!
//! A request costs a few relaxed atomic operations and one clock read when
//! it ends; no timer is touched per request. The timer is re-armed lazily:
//! when it fires it computes the real deadline from the counters and
//! sleeps again, and it is moved earlier only for a head that did not
//! arrive in one read.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::Timer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::edge::framing::HeadScan;
use crate::edge::ConnInfo;

/// Requests started (high 32 bits, wrapping) and in flight (low 32 bits)
/// in one word, so starting a request is one atomic add.
const ONE_STARTED: u64 = 1 << 32;
const IN_FLIGHT: u64 = ONE_STARTED - 1;

fn started(counts: u64) -> u64 {
    counts >> 32
}

fn in_flight(counts: u64) -> u64 {
    counts & IN_FLIGHT
}

/// What one connection's requests and reads tell its clocks.
pub struct ConnClock {
    epoch: Instant,
    counts: AtomicU64,
    /// 0, or 1 + the number of requests started when bytes last arrived
    /// with no request in flight. Equal to 1 + `started` means a head has
    /// begun and not yet become a request.
    head_mark: AtomicU64,
    /// Milliseconds from `epoch` to the end of the last request.
    idle_since: AtomicU64,
    /// hyper's head timers alive: hyper is between two messages, waiting
    /// for the next head (see [`ParkTimer`]).
    head_waits: AtomicU32,
    /// Bytes were written and not yet flushed: hyper (or TLS) may still
    /// hold part of a response.
    unflushed: AtomicBool,
    /// The mark of the last head that had a `Content-Length` field line
    /// ([`HeadScan`]), 0 = none.
    length_head: AtomicU64,
    /// 1 + milliseconds from `epoch` to when a write first found the
    /// socket full and no write has gone through since; 0 = not stalled.
    stalled: AtomicU64,
}

impl ConnClock {
    /// `head_first`: the connection speaks HTTP/1.1, and its first request
    /// head is due from the start.
    pub fn new(head_first: bool) -> Arc<ConnClock> {
        Arc::new(ConnClock {
            epoch: Instant::now(),
            counts: AtomicU64::new(0),
            head_mark: AtomicU64::new(u64::from(head_first)),
            idle_since: AtomicU64::new(0),
            head_waits: AtomicU32::new(0),
            unflushed: AtomicBool::new(false),
            length_head: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
        })
    }

    /// Whether hyper's HTTP/1.1 connection holds nothing of a message:
    /// it waits for a head and has seen none of it, no request is in
    /// flight, and everything it wrote went out. Its IO can then be taken
    /// back without losing a byte (bytes read ahead are in
    /// `Parts::read_buf`).
    pub fn parkable(&self) -> bool {
        self.head_waits.load(Ordering::Relaxed) > 0
            && self.in_flight() == 0
            && self.pending_head().is_none()
            && !self.unflushed.load(Ordering::Relaxed)
    }

    fn set_unflushed(&self, unflushed: bool) {
        if self.unflushed.load(Ordering::Relaxed) != unflushed {
            self.unflushed.store(unflushed, Ordering::Relaxed);
        }
    }

    fn begin(&self) {
        self.counts.fetch_add(ONE_STARTED + 1, Ordering::Relaxed);
    }

    fn end(&self) {
        let prev = self.counts.fetch_sub(1, Ordering::Relaxed);
        if in_flight(prev) == 1 {
            let ms = self.epoch.elapsed().as_millis() as u64;
            self.idle_since.fetch_max(ms, Ordering::Relaxed);
        }
    }

    /// Bytes came in: with no request in flight they start a head.
    fn saw_bytes(&self) {
        let counts = self.counts.load(Ordering::Relaxed);
        if in_flight(counts) == 0 {
            let mark = started(counts) + 1;
            if self.head_mark.load(Ordering::Relaxed) != mark {
                self.head_mark.store(mark, Ordering::Relaxed);
            }
        }
    }

    /// The mark of a head that has begun and not yet become a request.
    fn pending_head(&self) -> Option<u64> {
        let mark = self.head_mark.load(Ordering::Relaxed);
        let counts = self.counts.load(Ordering::Relaxed);
        (mark != 0 && mark == started(counts) + 1).then_some(mark)
    }

    /// Whether the head of the request that started last had a
    /// `Content-Length` field line (see [`crate::edge::framing`]).
    pub fn head_had_length(&self) -> bool {
        let mark = self.length_head.load(Ordering::Relaxed);
        mark != 0 && mark == started(self.counts.load(Ordering::Relaxed))
    }

    /// A write found the socket full: the send clock starts, unless it
    /// runs already.
    fn write_blocked(&self) {
        if self.stalled.load(Ordering::Relaxed) == 0 {
            let ms = self.epoch.elapsed().as_millis() as u64;
            self.stalled.store(ms + 1, Ordering::Relaxed);
        }
    }

    /// A write went through: the client is reading.
    fn write_went_through(&self) {
        if self.stalled.load(Ordering::Relaxed) != 0 {
            self.stalled.store(0, Ordering::Relaxed);
        }
    }

    /// Since when writes have been waiting for the client, if they are.
    fn stalled_since(&self) -> Option<Instant> {
        match self.stalled.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.epoch + Duration::from_millis(ms - 1)),
        }
    }

    fn in_flight(&self) -> u64 {
        in_flight(self.counts.load(Ordering::Relaxed))
    }

    pub fn idle_since(&self) -> Instant {
        self.epoch + Duration::from_millis(self.idle_since.load(Ordering::Relaxed))
    }
}

/// One request from the moment hyper hands it to the service until its
/// response body has ended or been dropped (also when the handler's
/// future is dropped before it answered).
pub struct ActiveRequest(Arc<ConnInfo>);

impl ActiveRequest {
    pub fn start(conn: &Arc<ConnInfo>) -> ActiveRequest {
        conn.clock.begin();
        ActiveRequest(conn.clone())
    }

    pub fn conn(&self) -> &ConnInfo {
        &self.0
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.clock.end();
    }
}

/// A connection's IO, noting for the header read clock when bytes arrive
/// between requests (HTTP/1.1 only: `heads`), and for the send clock when
/// writes wait for the client. It also scans each head for a
/// `Content-Length` field, and makes one past hyper's largest length
/// invalid so that hyper answers 400, not 431 ([`HeadScan`]).
pub struct HeadWatch<I> {
    inner: I,
    clock: Option<Arc<ConnClock>>,
    /// Bytes between requests start a head (HTTP/1.1); HTTP/2 reads are
    /// passed through untouched.
    heads: bool,
    /// The head being scanned: its mark and the scan.
    scan: (u64, HeadScan),
}

impl<I> HeadWatch<I> {
    pub fn new(inner: I, clock: Option<Arc<ConnClock>>) -> HeadWatch<I> {
        HeadWatch {
            inner,
            clock,
            heads: true,
            scan: (0, HeadScan::new()),
        }
    }

    /// For HTTP/2: only the send clock is kept.
    pub fn sends_only(inner: I, clock: Arc<ConnClock>) -> HeadWatch<I> {
        HeadWatch {
            inner,
            clock: Some(clock),
            heads: false,
            scan: (0, HeadScan::new()),
        }
    }

    pub fn into_inner(self) -> I {
        self.inner
    }

    fn wrote(&self) {
        if let Some(clock) = &self.clock {
            clock.set_unflushed(true);
        }
    }

    /// Feeds a write's outcome to the send clock.
    fn track<T>(&self, polled: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Some(clock) = &self.clock {
            match &polled {
                Poll::Pending => clock.write_blocked(),
                Poll::Ready(_) => clock.write_went_through(),
            }
        }
        polled
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HeadWatch<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !this.heads {
            return polled;
        }
        if let (Poll::Ready(Ok(())), Some(clock)) = (&polled, &this.clock) {
            if buf.filled().len() > before {
                clock.saw_bytes();
                // Bytes of a head that has not become a request yet.
                if let Some(mark) = clock.pending_head() {
                    let (scanning, scan) = &mut this.scan;
                    if *scanning != mark {
                        *scanning = mark;
                        *scan = HeadScan::new();
                    }
                    if !scan.done() {
                        if let Some(i) = scan.feed(&buf.filled()[before..]) {
                            // A length hyper would answer 431: one it
                            // reads as invalid gets its 400 instead
                            // (`edge::framing`).
                            buf.filled_mut()[before + i] = b'x';
                        }
                        if scan.found_length() {
                            clock.length_head.store(mark, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for HeadWatch<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.wrote();
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.track(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.wrote();
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.track(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        let polled = self.track(polled);
        // hyper flushes after every batch of writes (its write buffer is
        // empty once the IO's flush is reached and ready), so a ready
        // flush means nothing of a response is held anywhere.
        if let (Poll::Ready(Ok(())), Some(clock)) = (&polled, &self.clock) {
            clock.set_unflushed(false);
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's timer for an HTTP/1.1 connection, telling the connection's
/// clock when hyper waits for a head. hyper arms its head timer
/// (`header_read_timeout`, our backstop) exactly when it starts reading a
/// head in its idle state, and drops it once the head is parsed; so while
/// one of these timers lives, hyper is between two messages. Nothing else
/// in hyper's public API says so, and parking a connection in any other
/// state (a request body still coming, say) would lose bytes.
pub struct ParkTimer(pub Arc<ConnClock>);

impl Timer for ParkTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now().into_std() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.0.head_waits.fetch_add(1, Ordering::Relaxed);
        Box::pin(HeadWait {
            sleep: tokio::time::sleep_until(deadline.into()),
            clock: self.0.clone(),
        })
    }
}

pin_project_lite::pin_project! {
    /// hyper's head timer: counted in `head_waits` while it lives.
    struct HeadWait {
        #[pin]
        sleep: Sleep,
        clock: Arc<ConnClock>,
    }

    impl PinnedDrop for HeadWait {
        fn drop(this: Pin<&mut Self>) {
            this.clock.head_waits.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Future for HeadWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().sleep.poll(cx)
    }
}

impl hyper::rt::Sleep for HeadWait {}

/// Why [`Clocks::run`] returned.
pub enum Exit<T, S = ()> {
    /// The connection future ended by itself.
    Done(T),
    /// The future given as `stop` completed (the drain, or the time to
    /// park).
    Stopped(S),
    /// A request head took longer than `header_read_timeout`: drop the
    /// connection.
    HeadTimeout,
    /// The client took no byte for `send_timeout`: drop the connection.
    SendTimeout,
    /// No request for `idle_timeout` (or, once closing, for the close
    /// grace): close gracefully, or drop if already closing.
    IdleTimeout,
}

/// The timeouts of one connection and its single timer.
pub struct Clocks<'a> {
    clock: &'a ConnClock,
    header_read: Duration,
    idle: Duration,
    send: Duration,
    /// The head being waited for: its mark and deadline.
    head: Option<(u64, Instant)>,
    /// Set once the connection is closing: from then on an idle
    /// connection gets `header_read` more (time for a client to read the
    /// GOAWAY and go), not `idle`.
    closing_since: Option<Instant>,
    sleep: Pin<&'a mut Sleep>,
}

impl<'a> Clocks<'a> {
    /// `sleep` is the connection's timer (any deadline; it is reset here).
    /// `head_from`: when the first head's clock started, for HTTP/1.1.
    pub fn new(
        clock: &'a ConnClock,
        header_read: Duration,
        idle: Duration,
        send: Duration,
        head_from: Instant,
        mut sleep: Pin<&'a mut Sleep>,
    ) -> Clocks<'a> {
        let head = clock
            .pending_head()
            .map(|mark| (mark, head_from + header_read));
        sleep
            .as_mut()
            .reset(head.map_or(clock.epoch + idle, |h| h.1));
        Clocks {
            clock,
            header_read,
            idle,
            send,
            head,
            closing_since: None,
            sleep,
        }
    }

    /// From now on the connection is closing (graceful shutdown started).
    pub fn closing(&mut self) {
        let now = Instant::now();
        self.closing_since = Some(now);
        // Re-evaluated at once: a connection that is idle now gets the
        // close grace from now.
        self.sleep.as_mut().reset(now);
    }

    /// Polls `conn` until it ends, `stop` completes, or a clock runs out.
    pub async fn run<C: Future, S: Future>(
        &mut self,
        mut conn: Pin<&mut C>,
        stop: S,
    ) -> Exit<C::Output, S::Output> {
        let mut stop = pin!(stop);
        poll_fn(|cx| {
            if let Poll::Ready(out) = conn.as_mut().poll(cx) {
                return Poll::Ready(Exit::Done(out));
            }
            if let Poll::Ready(out) = stop.as_mut().poll(cx) {
                return Poll::Ready(Exit::Stopped(out));
            }
            self.poll_timer(cx)
        })
        .await
    }

    fn poll_timer<T, S>(&mut self, cx: &mut Context<'_>) -> Poll<Exit<T, S>> {
        // A head that did not arrive in the read that began it: its clock
        // starts now, and the timer moves earlier if it has to. (The
        // first head's clock started with the connection, in `new`.)
        match self.clock.pending_head() {
            Some(mark) if self.head.map(|h| h.0) != Some(mark) => {
                let deadline = Instant::now() + self.header_read;
                self.head = Some((mark, deadline));
                if deadline < self.sleep.deadline() {
                    self.sleep.as_mut().reset(deadline);
                }
            }
            Some(_) => {}
            None => {
                // The head became a request. The timer may sleep past
                // the idle deadline that can follow now (an idle_timeout
                // shorter than header_read_timeout): never later than
                // that. Only for a connection's first head and for heads
                // that took more than one read.
                if self.head.take().is_some() {
                    let latest = Instant::now() + self.idle;
                    if self.sleep.deadline() > latest {
                        self.sleep.as_mut().reset(latest);
                    }
                }
            }
        }
        // A write waiting for the client: its deadline may be before the
        // timer's (set once per stall, then the timer is at it).
        if let Some(since) = self.clock.stalled_since() {
            let deadline = since + self.send;
            if deadline < self.sleep.deadline() {
                self.sleep.as_mut().reset(deadline);
            }
        }
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            match self.next_deadline(now) {
                Ok(next) => self.sleep.as_mut().reset(next),
                Err(exit) => {
                    // Whatever the caller does next, the timer restarts
                    // from a fresh evaluation rather than firing at once.
                    self.sleep.as_mut().reset(now + self.header_read);
                    return Poll::Ready(exit);
                }
            }
        }
    }

    /// The next moment the clocks must be looked at, or the timeout that
    /// has run out.
    fn next_deadline<T, S>(&self, now: Instant) -> Result<Instant, Exit<T, S>> {
        let send = match self.clock.stalled_since() {
            Some(since) if since + self.send <= now => return Err(Exit::SendTimeout),
            Some(since) => since + self.send,
            None => now + self.send,
        };
        self.next_other_deadline(now).map(|next| next.min(send))
    }

    /// [`next_deadline`](Self::next_deadline) without the send clock.
    fn next_other_deadline<T, S>(&self, now: Instant) -> Result<Instant, Exit<T, S>> {
        if let Some((_, deadline)) = self.head {
            return if deadline <= now {
                Err(Exit::HeadTimeout)
            } else {
                Ok(deadline)
            };
        }
        let (limit, floor) = match self.closing_since {
            Some(since) => (self.header_read, Some(since)),
            None => (self.idle, None),
        };
        if self.clock.in_flight() > 0 {
            // Busy: look again in a while (a request in flight is never
            // timed out here; the upstream's request_timeout bounds it).
            return Ok(now + limit);
        }
        let since = self.clock.idle_since();
        let since = floor.map_or(since, |f| f.max(since));
        let deadline = since + limit;
        if deadline <= now {
            Err(Exit::IdleTimeout)
        } else {
            Ok(deadline)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_head_marks() {
        let c = ConnClock::new(true);
        assert_eq!(c.pending_head(), Some(1), "the first head is due at once");
        c.saw_bytes();
        assert_eq!(c.pending_head(), Some(1));
        c.begin();
        assert_eq!(c.pending_head(), None, "the head became a request");
        c.saw_bytes();
        assert_eq!(c.pending_head(), None, "body bytes start no head");
        c.end();
        assert_eq!(c.in_flight(), 0);
        c.saw_bytes();
        assert_eq!(c.pending_head(), Some(2), "the next head");
        c.begin();
        c.begin();
        c.end();
        assert_eq!(c.in_flight(), 1);
        assert_eq!(c.pending_head(), None);
        let h2 = ConnClock::new(false);
        assert_eq!(h2.pending_head(), None);
    }

    /// Parkable only while hyper's head timer lives, nothing is in flight,
    /// no head byte has come and every write has been flushed.
    #[tokio::test]
    async fn parkable_needs_a_head_wait_and_a_flush() {
        use tokio::io::AsyncWriteExt;

        let c = ConnClock::new(true);
        c.begin();
        c.end();
        assert!(!c.parkable(), "hyper is not waiting for a head");
        let timer = ParkTimer(c.clone());
        let wait = timer.sleep(Duration::from_secs(60));
        assert!(c.parkable());
        // hyper's reset: a new timer first, then the old one dropped.
        let again = timer.sleep(Duration::from_secs(60));
        drop(wait);
        assert!(c.parkable());

        // A write the peer has not taken yet: not parkable until flushed.
        let (near, mut far) = tokio::io::duplex(4);
        let mut io = HeadWatch::new(near, Some(c.clone()));
        let wrote = poll_fn(|cx| Poll::Ready(Pin::new(&mut io).poll_write(cx, b"12345678"))).await;
        assert!(matches!(wrote, Poll::Ready(Ok(4))));
        assert!(!c.parkable(), "written, not flushed");
        io.flush().await.unwrap();
        assert!(c.parkable());

        // Bytes from the client with nothing in flight: a head has begun.
        far.write_all(b"G").await.unwrap();
        let mut buf = [0u8; 8];
        let _ = tokio::io::AsyncReadExt::read(&mut io, &mut buf)
            .await
            .unwrap();
        assert!(!c.parkable(), "a head has begun");
        c.begin();
        assert!(!c.parkable(), "a request in flight");
        c.end();
        assert!(c.parkable());
        drop(again);
        assert!(!c.parkable(), "hyper parsed a head");
    }
}
