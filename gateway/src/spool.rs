//! Bodies read ahead of a slow side, so that a slow client never holds an
//! upstream slot (nginx's `proxy_buffering` and `proxy_request_buffering`).
//!
//! A [`Spool`] is one body's bytes in order: the first
//! `buffering.memory` bytes in memory, the rest in a temp file that is
//! unlinked as soon as it is created (nothing is left behind, even after a
//! crash). Temp bytes of all spools together are capped by
//! `buffering.temp_max` (`flashgate_spool_temp_bytes`); a body that would
//! go above it is not read ahead any further and moves at its reader's
//! pace, as with buffering off.
//!
//! - Responses ([`read_ahead`], from `body::ProxyBody`): small ones pass
//!   straight through (hyper takes a few KiB into its own write buffer
//!   whatever the client does); once more than [`HANDOFF`] bytes have
//!   passed, or at once for an HTTP/2 stream (whose window may be shut
//!   before its first byte), a task reads the rest at the upstream's pace
//!   and gives the upstream connection and its slot back when the body is
//!   in.
//! - Requests ([`read_request`]): the whole body is read before an
//!   upstream slot is taken, each read bounded by `body_read_timeout`.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::Notify;

use crate::config::BufferingConfig;
use crate::observe::metrics::Metrics;

/// What an upstream response holds until it is read to its end (the
/// upstream's connection and cluster slot): given back complete when the
/// body is in, dropped (the connection closed) when it broke off.
pub trait Slot: Send + 'static {
    fn complete(self);
}

/// Response bytes passed through before the rest is read ahead by a task:
/// more than hyper's smallest write buffer (8 KiB), so hyper never stops
/// polling a body before it is handed off; small enough that a client
/// that reads nothing holds the upstream for no more than that.
pub const HANDOFF: usize = 8 << 10;

/// How much of a temp file one read hands the reader.
const FILE_CHUNK: u64 = 64 << 10;

/// The spools' shared settings and accounting; one per runtime, with the
/// process-wide temp-byte gauge.
pub struct Spooler {
    memory: usize,
    dir: PathBuf,
    temp_max: u64,
    temp_bytes: IntGauge,
    temp_full: IntCounter,
    to_memory: [IntCounter; 2],
    to_file: [IntCounter; 2],
}

/// Which way a body goes, for the metrics.
#[derive(Clone, Copy)]
pub enum Direction {
    Request = 0,
    Response = 1,
}

impl Spooler {
    pub fn new(cfg: &BufferingConfig, metrics: &Metrics) -> Spooler {
        let spooled = |dir: &str, to: &str| metrics.bodies_spooled.with_label_values(&[dir, to]);
        Spooler {
            memory: cfg.memory.0 as usize,
            dir: cfg.temp_dir(),
            temp_max: cfg.temp_max.0,
            temp_bytes: metrics.spool_temp_bytes.clone(),
            temp_full: metrics.spool_temp_full.clone(),
            to_memory: [spooled("request", "memory"), spooled("response", "memory")],
            to_file: [spooled("request", "file"), spooled("response", "file")],
        }
    }

    /// Whether `len` more temp bytes would fit now.
    fn reserve_possible(&self, len: u64) -> bool {
        self.temp_bytes.get().max(0) as u64 + len <= self.temp_max
    }

    /// Takes `len` bytes of the process's temp budget, if there are.
    fn reserve(&self, len: u64) -> bool {
        let gauge = &self.temp_bytes;
        let mut now = gauge.get();
        loop {
            if now as u64 + len > self.temp_max {
                return false;
            }
            // IntGauge has no compare-and-swap: add, and take it back if
            // a concurrent spool got there first.
            gauge.add(len as i64);
            let after = gauge.get();
            if after as u64 <= self.temp_max {
                return true;
            }
            gauge.sub(len as i64);
            now = gauge.get();
            if now as u64 + len > self.temp_max {
                return false;
            }
        }
    }
}

/// A temp file, unlinked at creation; its bytes leave the budget when it
/// is dropped.
struct TempFile {
    file: Arc<std::fs::File>,
    written: u64,
    budget: IntGauge,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        self.budget.sub(self.written as i64);
    }
}

static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

fn create_temp(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("flashgate-spool-{}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// How a body ended, once it has.
enum End {
    Trailers(Option<HeaderMap>),
    Failed(String),
}

/// One body's bytes, in order: memory first, then the temp file.
struct State {
    memory: VecDeque<Bytes>,
    in_memory: usize,
    file: Option<TempFile>,
    /// Bytes of the file handed to the reader.
    read: u64,
    end: Option<End>,
    reader: Option<Waker>,
    /// The reader is gone: stop reading ahead.
    abandoned: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer when the reader took bytes (it waits for room
    /// only when the temp budget is spent).
    room: Notify,
}

/// One body being read ahead: the writer's side.
pub struct Spool {
    shared: Arc<Shared>,
    spooler: Arc<Spooler>,
    direction: Direction,
    spilled: bool,
}

/// What became of a pushed piece.
pub enum Push {
    Stored,
    /// The reader is gone.
    Abandoned,
    /// The temp budget is spent and the reader is behind; given back
    /// (only when the caller said not to wait).
    Full(Bytes),
}

/// Where a piece goes, decided under the lock.
enum Target {
    /// The temp file, at its end (`None`: it has to be created first).
    File(Option<(Arc<std::fs::File>, u64)>),
    /// Wait until the reader has taken something.
    Wait,
}

impl Spool {
    pub fn new(spooler: Arc<Spooler>, direction: Direction) -> (Spool, SpoolReader) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                memory: VecDeque::new(),
                in_memory: 0,
                file: None,
                read: 0,
                end: None,
                reader: None,
                abandoned: false,
            }),
            room: Notify::new(),
        });
        spooler.to_memory[direction as usize].inc();
        (
            Spool {
                shared: shared.clone(),
                spooler,
                direction,
                spilled: false,
            },
            SpoolReader { shared },
        )
    }

    /// Stores the next bytes, in order: in memory while there is room and
    /// nothing went to the file yet, else at the end of the temp file.
    /// When the temp budget is spent, a piece goes through memory only
    /// once the reader has everything before it: with `wait` this waits
    /// for that, else the piece comes back as [`Push::Full`].
    pub async fn push(&mut self, data: Bytes, wait: bool) -> std::io::Result<Push> {
        let len = data.len();
        let shared = self.shared.clone();
        loop {
            let room = shared.room.notified();
            let target = {
                let mut st = shared.state.lock().expect("spool lock");
                if st.abandoned {
                    return Ok(Push::Abandoned);
                }
                let reader_has_all =
                    st.memory.is_empty() && st.file.as_ref().is_none_or(|f| st.read >= f.written);
                if (st.file.is_none() && st.in_memory + len <= self.spooler.memory)
                    || (reader_has_all && !self.spooler.reserve_possible(len as u64))
                {
                    if st.file.is_some() || st.in_memory + len > self.spooler.memory {
                        self.note_full();
                    }
                    st.in_memory += len;
                    // A copy: the piece is usually a slice of the upstream
                    // connection's read buffer, and holding the slice
                    // would hold the whole buffer (hundreds of KiB) for as
                    // long as the client takes.
                    st.memory.push_back(Bytes::copy_from_slice(&data));
                    wake(&mut st);
                    return Ok(Push::Stored);
                }
                if self.spooler.reserve(len as u64) {
                    Target::File(st.file.as_ref().map(|f| (f.file.clone(), f.written)))
                } else if !wait {
                    return Ok(Push::Full(data));
                } else {
                    self.note_full();
                    Target::Wait
                }
            };
            let existing = match target {
                Target::Wait => {
                    room.await;
                    continue;
                }
                Target::File(existing) => existing,
            };
            let created = existing.is_none();
            let (file, at) = match existing {
                Some(f) => f,
                // The first spill: the file is created outside the lock.
                None => match create_temp(&self.spooler.dir) {
                    Ok(f) => (Arc::new(f), 0),
                    Err(e) => {
                        self.spooler.temp_bytes.sub(len as i64);
                        return Err(e);
                    }
                },
            };
            // Written in place, as nginx writes its temp files: a write to
            // the page cache costs microseconds, less than handing it to a
            // blocking thread (whose stacks and malloc arenas cost memory
            // under a flood of slow readers).
            if let Err(e) = file.write_all_at(&data, at) {
                self.spooler.temp_bytes.sub(len as i64);
                return Err(e);
            }
            // Readable only now that the bytes are on the file.
            let mut st = self.shared.state.lock().expect("spool lock");
            if created {
                self.spooler.to_file[self.direction as usize].inc();
                st.file = Some(TempFile {
                    file,
                    written: len as u64,
                    budget: self.spooler.temp_bytes.clone(),
                });
            } else if let Some(f) = &mut st.file {
                f.written += len as u64;
            }
            wake(&mut st);
            return Ok(Push::Stored);
        }
    }

    fn note_full(&mut self) {
        if !self.spilled {
            self.spilled = true;
            self.spooler.temp_full.inc();
        }
    }

    /// The body ended (with its trailers, if any).
    pub fn finish(self, trailers: Option<HeaderMap>) {
        self.end(End::Trailers(trailers));
    }

    /// The body broke off; the reader gets the error after the bytes
    /// before it.
    pub fn fail(self, why: String) {
        self.end(End::Failed(why));
    }

    fn end(self, end: End) {
        let mut st = self.shared.state.lock().expect("spool lock");
        st.end = Some(end);
        wake(&mut st);
    }
}

fn wake(st: &mut State) {
    if let Some(w) = st.reader.take() {
        w.wake();
    }
}

/// The reading side of a [`Spool`]: a body.
pub struct SpoolReader {
    shared: Arc<Shared>,
}

impl Drop for SpoolReader {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.abandoned = true;
        }
        self.shared.room.notify_one();
    }
}

/// The error a spooled body ends with when its source broke off.
#[derive(Debug)]
pub struct SpoolError(pub String);

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpoolError {}

impl Body for SpoolReader {
    type Data = Bytes;
    type Error = SpoolError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, SpoolError>>> {
        let mut st = self.shared.state.lock().expect("spool lock");
        if let Some(bytes) = st.memory.pop_front() {
            st.in_memory -= bytes.len();
            drop(st);
            self.shared.room.notify_one();
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        let unread = st
            .file
            .as_ref()
            .filter(|f| st.read < f.written)
            .map(|f| (f.file.clone(), f.written));
        if let Some((file, written)) = unread {
            let at = st.read;
            let len = (written - at).min(FILE_CHUNK);
            st.read += len;
            drop(st);
            self.shared.room.notify_one();
            // Read in place, as written: from the page cache, mostly.
            let mut buf = vec![0u8; len as usize];
            let got = file
                .read_exact_at(&mut buf, at)
                .map(|()| Frame::data(Bytes::from(buf)))
                .map_err(|e| SpoolError(format!("spool read: {e}")));
            return Poll::Ready(Some(got));
        }
        match st.end.take() {
            Some(End::Trailers(Some(t))) => {
                st.end = Some(End::Trailers(None));
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            Some(End::Trailers(None)) => {
                st.end = Some(End::Trailers(None));
                Poll::Ready(None)
            }
            Some(End::Failed(why)) => Poll::Ready(Some(Err(SpoolError(why)))),
            None => {
                st.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let st = self.shared.state.lock().expect("spool lock");
        st.memory.is_empty()
            && st.file.as_ref().is_none_or(|f| st.read >= f.written)
            && matches!(st.end, Some(End::Trailers(None)))
    }

    /// Exact once the body is wholly in (a request read in before it goes
    /// upstream): the upstream then gets a `Content-Length`, as nginx
    /// sends after buffering a chunked upload.
    fn size_hint(&self) -> SizeHint {
        let st = self.shared.state.lock().expect("spool lock");
        if !matches!(st.end, Some(End::Trailers(None))) {
            return SizeHint::default();
        }
        let in_file = st.file.as_ref().map_or(0, |f| f.written - st.read);
        SizeHint::with_exact(st.in_memory as u64 + in_file)
    }
}

/// Reads the rest of an upstream response body at the upstream's pace,
/// in a task of its own, and gives the connection and its slot back when
/// it is in; the client reads the returned spool at its own pace.
pub fn read_ahead(body: Incoming, in_flight: impl Slot, spooler: Arc<Spooler>) -> SpoolReader {
    let (spool, reader) = Spool::new(spooler, Direction::Response);
    read_upstream(body, in_flight, spool);
    reader
}

fn read_upstream(mut body: Incoming, in_flight: impl Slot, mut spool: Spool) {
    tokio::spawn(async move {
        loop {
            match body.frame().await {
                None => {
                    in_flight.complete();
                    spool.finish(None);
                    return;
                }
                Some(Err(e)) => {
                    drop(in_flight);
                    spool.fail(format!("upstream body: {e}"));
                    return;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match spool.push(data, true).await {
                        Ok(Push::Stored | Push::Full(_)) => {}
                        // The client is gone: the connection, with bytes
                        // unread, is closed (dropped) with the slot.
                        Ok(Push::Abandoned) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "spooling a response to a temp file failed; the response is cut");
                            spool.fail(format!("spool: {e}"));
                            return;
                        }
                    },
                    Err(frame) => {
                        let trailers = frame.into_trailers().ok();
                        // Trailers end the body; anything after is ignored.
                        if body.is_end_stream() || trailers.is_some() {
                            in_flight.complete();
                        }
                        spool.finish(trailers);
                        return;
                    }
                },
            }
        }
    });
}

/// Reads a whole request body into a spool before any upstream work,
/// each read within `each_read` (a body that stalls longer is the
/// client's fault: 408). The spool is complete when this returns, unless
/// the temp budget ran out: then a task feeds the rest at the upstream's
/// pace (as with buffering off).
pub async fn read_request<B>(
    mut body: B,
    spooler: Arc<Spooler>,
    each_read: Duration,
) -> Result<SpoolReader, RequestRead>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    let (mut spool, reader) = Spool::new(spooler, Direction::Request);
    loop {
        let frame = match tokio::time::timeout(each_read, body.frame()).await {
            Err(_) => return Err(RequestRead::Stalled),
            Ok(None) => {
                spool.finish(None);
                return Ok(reader);
            }
            Ok(Some(Err(_))) => return Err(RequestRead::Broken),
            Ok(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => match spool.push(data, false).await {
                Ok(Push::Stored | Push::Abandoned) => {}
                Ok(Push::Full(data)) => {
                    tokio::spawn(feed(body, spool, data));
                    return Ok(reader);
                }
                Err(e) => return Err(RequestRead::Spool(e)),
            },
            Err(frame) => {
                spool.finish(frame.into_trailers().ok());
                return Ok(reader);
            }
        }
    }
}

/// The rest of a request body that did not fit the temp budget, fed as
/// the upstream takes it.
async fn feed<B>(mut body: B, mut spool: Spool, first: Bytes)
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut next = Some(first);
    loop {
        if let Some(data) = next.take() {
            match spool.push(data, true).await {
                Ok(Push::Stored | Push::Full(_)) => {}
                Ok(Push::Abandoned) => return,
                Err(e) => return spool.fail(format!("spool: {e}")),
            }
        }
        match body.frame().await {
            None => return spool.finish(None),
            Some(Err(_)) => return spool.fail("the request body broke off".into()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => next = Some(data),
                Err(frame) => return spool.finish(frame.into_trailers().ok()),
            },
        }
    }
}

/// Why a request body could not be read in.
#[derive(Debug)]
pub enum RequestRead {
    /// No byte for `body_read_timeout`.
    Stalled,
    /// The body broke (bad framing, over `max_body`, the client went).
    Broken,
    /// The temp file failed.
    Spool(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Size;

    fn spooler(memory: u64, temp_max: u64, metrics: &Metrics) -> Arc<Spooler> {
        let cfg = BufferingConfig {
            memory: Size(memory),
            temp_dir: None,
            temp_max: Size(temp_max),
        };
        Arc::new(Spooler::new(&cfg, metrics))
    }

    async fn read_all(reader: SpoolReader) -> Vec<u8> {
        reader.collect().await.unwrap().to_bytes().to_vec()
    }

    /// Memory first, then the file, read back in order; the temp bytes
    /// leave the budget with the reader.
    #[tokio::test]
    async fn spills_to_a_file_in_order() {
        let metrics = Metrics::new();
        let sp = spooler(4096, 1 << 20, &metrics);
        let (mut spool, reader) = Spool::new(sp, Direction::Request);
        let mut want = Vec::new();
        for i in 0..10u8 {
            let piece = vec![i; 1500];
            want.extend_from_slice(&piece);
            assert!(matches!(
                spool.push(Bytes::from(piece), false).await.unwrap(),
                Push::Stored
            ));
        }
        spool.finish(None);
        assert_eq!(reader.size_hint().exact(), Some(15_000));
        assert_eq!(metrics.spool_temp_bytes.get(), 15_000 - 3000);
        assert_eq!(read_all(reader).await, want);
        assert_eq!(metrics.spool_temp_bytes.get(), 0);
    }

    /// Past the temp cap a piece is refused without waiting, or waits for
    /// the reader; nothing is lost or reordered.
    #[tokio::test]
    async fn past_the_cap_it_streams() {
        let metrics = Metrics::new();
        let sp = spooler(4096, 4096, &metrics);
        let (mut spool, mut reader) = Spool::new(sp, Direction::Response);
        let piece = |b: u8| Bytes::from(vec![b; 4000]);
        assert!(matches!(
            spool.push(piece(1), false).await.unwrap(),
            Push::Stored
        ));
        assert!(matches!(
            spool.push(piece(2), false).await.unwrap(),
            Push::Stored
        ));
        assert!(matches!(
            spool.push(piece(3), false).await.unwrap(),
            Push::Full(_)
        ));
        assert_eq!(
            metrics.spool_temp_full.get(),
            0,
            "not counted when given back"
        );
        let writer = tokio::spawn(async move {
            for b in 3..6 {
                spool.push(piece(b), true).await.unwrap();
            }
            spool.finish(None);
        });
        let mut got = Vec::new();
        while let Some(frame) = reader.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        writer.await.unwrap();
        let want: Vec<u8> = (1..6).flat_map(|b| vec![b; 4000]).collect();
        assert_eq!(got, want);
        assert!(metrics.spool_temp_full.get() >= 1);
        drop(reader);
        assert_eq!(metrics.spool_temp_bytes.get(), 0);
    }

    /// A reader that goes away stops the writer.
    #[tokio::test]
    async fn an_abandoned_spool_stops_its_writer() {
        let metrics = Metrics::new();
        let (mut spool, reader) = Spool::new(spooler(4096, 1 << 20, &metrics), Direction::Response);
        drop(reader);
        assert!(matches!(
            spool.push(Bytes::from_static(b"x"), true).await.unwrap(),
            Push::Abandoned
        ));
    }
}
