//! Runs a route's filters in order for one stream.
//!
//! A stream's filter state is the request future's own while only that
//! future reaches it: every stream of a header-only chain, and every
//! stream until a body is filtered. A filtered body is polled wherever the
//! gateway polls it (the upstream connection's task for a request body),
//! so from then on the state sits behind one mutex, held for one filter
//! call at a time, never across a pause. The owned state spares the
//! common case the atomic operations of a lock per phase, which cost more
//! than their instructions on a path this full of stores (each waits for
//! the stores before it to drain).

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;

use crate::body::{BodyStop, Dir, FilteredBody};
use crate::{BodyFlow, FilterFactory, Flow, LocalResponse, StreamFilter, StreamInfo, StreamReset};

/// A route's ordered filters. Cheap to clone; built when config is loaded.
#[derive(Clone, Default)]
pub struct FilterChain {
    factories: Arc<[Arc<dyn FilterFactory>]>,
    bodies: Arc<BodyRouting>,
}

/// Which filters of a chain get body callbacks, and the bound on what they
/// may hold.
#[derive(Default)]
pub(crate) struct BodyRouting {
    /// By position.
    filters: Box<[bool]>,
    /// Any of them.
    any: bool,
    /// The smallest `body_limit` of those that do.
    limit: usize,
}

impl BodyRouting {
    fn of(factories: &[Arc<dyn FilterFactory>]) -> BodyRouting {
        let filters: Box<[bool]> = factories.iter().map(|f| f.wants_bodies()).collect();
        let limit = factories
            .iter()
            .zip(filters.iter())
            .filter(|(_, wants)| **wants)
            .map(|(f, _)| f.body_limit())
            .min()
            .unwrap_or(crate::DEFAULT_BODY_LIMIT);
        BodyRouting {
            any: filters.iter().any(|b| *b),
            filters,
            limit,
        }
    }

    /// Do the factories still say what this routing was built from?
    fn current(&self, factories: &[Arc<dyn FilterFactory>]) -> bool {
        factories
            .iter()
            .zip(self.filters.iter())
            .all(|(f, wants)| f.wants_bodies() == *wants)
    }
}

impl FilterChain {
    pub fn new(factories: Vec<Arc<dyn FilterFactory>>) -> Self {
        FilterChain {
            bodies: Arc::new(BodyRouting::of(&factories)),
            factories: factories.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.factories.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.factories.iter().map(|f| f.name())
    }

    /// Does any filter of the chain look at bodies (as it was built)?
    pub fn wants_bodies(&self) -> bool {
        self.bodies.any
    }

    /// Makes the per-request state of every filter in the chain.
    pub fn start(&self) -> ChainStream {
        // A Wasm module swapped in from its file (not through a config
        // reload, which builds a new chain) may export body callbacks the
        // old one did not, or drop them: each stream asks again, one cheap
        // call per filter, and builds a new routing only when it changed.
        let bodies = if self.bodies.current(&self.factories) {
            self.bodies.clone()
        } else {
            Arc::new(BodyRouting::of(&self.factories))
        };
        let filters = match &*self.factories {
            [one] => Filters::One(one.new_stream()),
            all => Filters::Many(all.iter().map(|f| f.new_stream()).collect()),
        };
        ChainStream {
            len: self.factories.len(),
            wants_bodies: bodies.any,
            inner: Inner::Own(Box::new(ChainInner {
                filters,
                entered: 0,
                bodies,
                req_held: Vec::new(),
                resp_held: Vec::new(),
                reset: false,
            })),
        }
    }
}

/// A stream's filters; one (the common case) without a vector.
enum Filters {
    One(Box<dyn StreamFilter>),
    Many(Vec<Box<dyn StreamFilter>>),
}

impl std::ops::Deref for Filters {
    type Target = [Box<dyn StreamFilter>];

    fn deref(&self) -> &Self::Target {
        match self {
            Filters::One(f) => std::slice::from_ref(f),
            Filters::Many(v) => v,
        }
    }
}

impl std::ops::DerefMut for Filters {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Filters::One(f) => std::slice::from_mut(f),
            Filters::Many(v) => v,
        }
    }
}

/// One stream's walk through the chain. Dropping it (and any body it
/// filters) ends the stream for every filter (`on_done`), which is how a
/// client abort reaches filters: the request future is dropped and this
/// with it.
pub struct ChainStream {
    inner: Inner,
    /// How many filters.
    len: usize,
    wants_bodies: bool,
}

pub(crate) struct ChainInner {
    filters: Filters,
    /// How many filters saw the request phase; only those see the response.
    entered: usize,
    bodies: Arc<BodyRouting>,
    /// Bytes a filter holds after `BodyFlow::Buffer`, by filter index
    /// (empty, and unallocated, unless a filter holds a body).
    req_held: Vec<(usize, BytesMut)>,
    resp_held: Vec<(usize, BytesMut)>,
    /// A filter reset the stream.
    reset: bool,
}

/// Where a stream's filter state lives (see the module doc).
enum Inner {
    /// Boxed: the response body carries the stream to its end.
    Own(Box<ChainInner>),
    Shared(Arc<Mutex<ChainInner>>),
}

/// The state for one step: borrowed, or locked.
enum Guard<'a> {
    Own(&'a mut ChainInner),
    Shared(MutexGuard<'a, ChainInner>),
}

impl std::ops::Deref for Guard<'_> {
    type Target = ChainInner;

    fn deref(&self) -> &ChainInner {
        match self {
            Guard::Own(c) => c,
            Guard::Shared(g) => g,
        }
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut ChainInner {
        match self {
            Guard::Own(c) => c,
            Guard::Shared(g) => g,
        }
    }
}

pub(crate) fn lock(inner: &Mutex<ChainInner>) -> MutexGuard<'_, ChainInner> {
    // A filter that panicked cannot leave the chain inconsistent in a way
    // that matters more than failing its own stream.
    inner.lock().unwrap_or_else(|e| e.into_inner())
}

impl ChainStream {
    fn lock(&mut self) -> Guard<'_> {
        match &mut self.inner {
            Inner::Own(c) => Guard::Own(c),
            Inner::Shared(m) => Guard::Shared(lock(m)),
        }
    }

    /// The state, shared from now on: a filtered body needs it too.
    fn share(&mut self) -> Arc<Mutex<ChainInner>> {
        let shared = match &mut self.inner {
            Inner::Shared(m) => return m.clone(),
            Inner::Own(c) => {
                // What stays behind for the moment of the swap is empty:
                // its drop ends no filter.
                let empty = ChainInner {
                    filters: Filters::Many(Vec::new()),
                    entered: 0,
                    bodies: c.bodies.clone(),
                    req_held: Vec::new(),
                    resp_held: Vec::new(),
                    reset: false,
                };
                Arc::new(Mutex::new(std::mem::replace(&mut **c, empty)))
            }
        };
        self.inner = Inner::Shared(shared.clone());
        shared
    }

    /// Runs the request phase in configuration order. `Some` means a filter
    /// answered locally: the answer still goes through the response phase of
    /// that filter and the filters before it (not of those after it, which
    /// never saw the request), like Envoy's local replies. `Err` means a filter reset the stream: abort it, answer
    /// nothing.
    pub async fn on_request(
        &mut self,
        req: &mut http::request::Parts,
        info: &StreamInfo,
    ) -> Result<Option<LocalResponse>, StreamReset> {
        for i in 0..self.len {
            let mut flow = self.request_step(i, req, info, false);
            loop {
                match flow {
                    Flow::Continue => break,
                    Flow::Respond(local) => {
                        self.lock().entered = i + 1;
                        return Ok(Some(local));
                    }
                    Flow::Pause(pending) => {
                        pending.await;
                        flow = self.request_step(i, req, info, true);
                    }
                    Flow::Reset => return Err(self.lock().mark_reset()),
                }
            }
        }
        Ok(None)
    }

    /// One request-header call (or its resumption) of filter `i`, under
    /// one lock; a filter that lets the request go on has seen it.
    fn request_step(
        &mut self,
        i: usize,
        req: &mut http::request::Parts,
        info: &StreamInfo,
        resume: bool,
    ) -> Flow {
        let mut inner = self.lock();
        let flow = match inner.filters.get_mut(i) {
            Some(f) if resume => f.resume_request_headers(req, info),
            Some(f) => f.on_request_headers(req, info),
            None => Flow::Continue,
        };
        if matches!(flow, Flow::Continue) {
            inner.entered = i + 1;
        }
        flow
    }

    /// Runs the response phase in reverse order over the filters that saw
    /// the request. `Some` means a filter replaced the response; the
    /// replacement goes on through the remaining filters. `Err`: a filter
    /// reset the stream.
    pub async fn on_response(
        &mut self,
        resp: &mut http::response::Parts,
        info: &StreamInfo,
    ) -> Result<Option<LocalResponse>, StreamReset> {
        let mut replaced = None;
        let entered = self.lock().entered;
        for i in (0..entered).rev() {
            let mut flow = self.lock().filters[i].on_response_headers(resp, info);
            loop {
                match flow {
                    Flow::Continue => break,
                    Flow::Respond(local) => {
                        resp.status = local.status;
                        resp.headers = local.headers.clone();
                        replaced = Some(local);
                        break;
                    }
                    Flow::Pause(pending) => {
                        pending.await;
                        flow = self.lock().filters[i].resume_response_headers(resp, info);
                    }
                    Flow::Reset => return Err(self.lock().mark_reset()),
                }
            }
        }
        Ok(replaced)
    }

    /// Did a filter reset the stream? (A body or trailer callback can, in
    /// a body the gateway was streaming at the time.)
    pub fn is_reset(&self) -> bool {
        match &self.inner {
            Inner::Own(c) => c.reset,
            Inner::Shared(m) => lock(m).reset,
        }
    }

    /// Does any filter of this stream look at bodies?
    pub fn wants_bodies(&self) -> bool {
        self.wants_bodies
    }

    /// Routes the request body through the filters' body callbacks. Call
    /// after [`ChainStream::on_request`], then [`FilteredBody::prime`]
    /// before sending the head on.
    pub fn request_body<B>(&mut self, body: B, info: &StreamInfo) -> FilteredBody<B> {
        FilteredBody::new(body, self.share(), Dir::Request, info.clone())
    }

    /// Routes the response body through the filters' body callbacks (in
    /// reverse order). Call after [`ChainStream::on_response`].
    pub fn response_body<B>(&mut self, body: B, info: &StreamInfo) -> FilteredBody<B> {
        FilteredBody::new(body, self.share(), Dir::Response, info.clone())
    }
}

impl ChainInner {
    fn mark_reset(&mut self) -> StreamReset {
        self.reset = true;
        StreamReset
    }

    /// Feeds one chunk through the body callbacks of the filters that saw
    /// the request; returns what passes all of them now (empty while a
    /// filter holds the body).
    pub(crate) fn body(
        &mut self,
        dir: Dir,
        mut chunk: Bytes,
        end_of_stream: bool,
        info: &StreamInfo,
    ) -> Result<Bytes, BodyStop> {
        let n = self.entered;
        for step in 0..n {
            let i = match dir {
                Dir::Request => step,
                Dir::Response => n - 1 - step,
            };
            if !self.bodies.filters[i] {
                continue;
            }
            let held = match dir {
                Dir::Request => &mut self.req_held,
                Dir::Response => &mut self.resp_held,
            };
            // What the filter sees: what it held plus this chunk, or the
            // chunk itself (no copy).
            let mut data = match held.iter().position(|(f, _)| *f == i) {
                Some(at) => {
                    let (_, mut b) = held.swap_remove(at);
                    b.extend_from_slice(&chunk);
                    b.freeze()
                }
                None => std::mem::take(&mut chunk),
            };
            let filter = &mut self.filters[i];
            let flow = match dir {
                Dir::Request => filter.on_request_body(&mut data, end_of_stream, info),
                Dir::Response => filter.on_response_body(&mut data, end_of_stream, info),
            };
            match flow {
                BodyFlow::Continue => chunk = data,
                // Nothing more will come to wait for: the data goes on.
                BodyFlow::Buffer if end_of_stream => chunk = data,
                BodyFlow::Buffer => {
                    if data.len() > self.bodies.limit {
                        return Err(BodyStop::TooLarge(self.bodies.limit));
                    }
                    held.push((i, BytesMut::from(data)));
                    return Ok(Bytes::new());
                }
                BodyFlow::Respond(local) => return Err(BodyStop::Local(Box::new(local))),
                BodyFlow::Reset => {
                    self.mark_reset();
                    return Err(BodyStop::Reset);
                }
            }
        }
        Ok(chunk)
    }

    /// Runs the trailer callbacks in the body's order, until one resets
    /// the stream.
    pub(crate) fn trailers(
        &mut self,
        dir: Dir,
        trailers: &mut HeaderMap,
        info: &StreamInfo,
    ) -> Result<(), StreamReset> {
        let n = self.entered;
        for step in 0..n {
            let i = match dir {
                Dir::Request => step,
                Dir::Response => n - 1 - step,
            };
            if !self.bodies.filters[i] {
                continue;
            }
            let r = match dir {
                Dir::Request => self.filters[i].on_request_trailers(trailers, info),
                Dir::Response => self.filters[i].on_response_trailers(trailers, info),
            };
            if r.is_err() {
                return Err(self.mark_reset());
            }
        }
        Ok(())
    }
}

impl Drop for ChainInner {
    fn drop(&mut self) {
        for f in self.filters.iter_mut() {
            f.on_done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Priority;
    use http::{HeaderValue, StatusCode};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A test filter that records the order of its calls.
    struct Recorder {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        respond: bool,
        pause: bool,
        done: Arc<AtomicUsize>,
    }

    struct RecorderStream {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        respond: bool,
        pause: bool,
        done: Arc<AtomicUsize>,
    }

    impl FilterFactory for Recorder {
        fn name(&self) -> &str {
            self.name
        }
        fn new_stream(&self) -> Box<dyn StreamFilter> {
            Box::new(RecorderStream {
                name: self.name,
                log: self.log.clone(),
                respond: self.respond,
                pause: self.pause,
                done: self.done.clone(),
            })
        }
    }

    impl StreamFilter for RecorderStream {
        fn on_request_headers(&mut self, req: &mut http::request::Parts, _: &StreamInfo) -> Flow {
            self.log.lock().unwrap().push(format!("req:{}", self.name));
            if self.pause {
                return Flow::Pause(Box::pin(tokio::task::yield_now()));
            }
            if self.respond {
                return Flow::Respond(LocalResponse::new(StatusCode::FORBIDDEN, "no"));
            }
            req.headers
                .append("x-seen", HeaderValue::from_static(self.name));
            Flow::Continue
        }
        fn resume_request_headers(
            &mut self,
            req: &mut http::request::Parts,
            _: &StreamInfo,
        ) -> Flow {
            self.log
                .lock()
                .unwrap()
                .push(format!("resume:{}", self.name));
            req.headers
                .append("x-seen", HeaderValue::from_static(self.name));
            Flow::Continue
        }
        fn on_response_headers(&mut self, _: &mut http::response::Parts, _: &StreamInfo) -> Flow {
            self.log.lock().unwrap().push(format!("resp:{}", self.name));
            Flow::Continue
        }
        fn on_done(&mut self) {
            self.done.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn info() -> StreamInfo {
        StreamInfo {
            client_ip: "127.0.0.1".parse().unwrap(),
            route: "r".into(),
            priority: Priority::Normal,
            load_level: 0,
            bot_score: 99,
            ja4: None,
            request_id: http::HeaderValue::from_static("id"),
            end_of_stream: true,
        }
    }

    fn chain(
        spec: &[(&'static str, bool, bool)],
    ) -> (FilterChain, Arc<Mutex<Vec<String>>>, Arc<AtomicUsize>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicUsize::new(0));
        let factories = spec
            .iter()
            .map(|&(name, respond, pause)| {
                Arc::new(Recorder {
                    name,
                    log: log.clone(),
                    respond,
                    pause,
                    done: done.clone(),
                }) as Arc<dyn FilterFactory>
            })
            .collect();
        (FilterChain::new(factories), log, done)
    }

    fn parts() -> (http::request::Parts, http::response::Parts) {
        let (req, ()) = http::Request::new(()).into_parts();
        let (resp, ()) = http::Response::new(()).into_parts();
        (req, resp)
    }

    #[tokio::test]
    async fn request_in_order_response_in_reverse() {
        let (chain, log, done) = chain(&[("a", false, false), ("b", false, false)]);
        let (mut req, mut resp) = parts();
        let mut s = chain.start();
        assert!(s.on_request(&mut req, &info()).await.unwrap().is_none());
        assert!(s.on_response(&mut resp, &info()).await.unwrap().is_none());
        drop(s);
        assert_eq!(*log.lock().unwrap(), ["req:a", "req:b", "resp:b", "resp:a"]);
        let seen: Vec<_> = req.headers.get_all("x-seen").iter().collect();
        assert_eq!(seen, ["a", "b"]);
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn local_response_stops_chain_and_goes_back_through_the_responder() {
        let (chain, log, done) =
            chain(&[("a", false, false), ("b", true, false), ("c", false, false)]);
        let (mut req, mut resp) = parts();
        let mut s = chain.start();
        let local = s
            .on_request(&mut req, &info())
            .await
            .unwrap()
            .expect("b answers");
        assert_eq!(local.status, StatusCode::FORBIDDEN);
        s.on_response(&mut resp, &info()).await.unwrap();
        drop(s);
        assert_eq!(*log.lock().unwrap(), ["req:a", "req:b", "resp:b", "resp:a"]);
        // c never saw the request but its stream still ends exactly once.
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn pause_then_resume() {
        let (chain, log, _) = chain(&[("p", false, true), ("q", false, false)]);
        let (mut req, _) = parts();
        let mut s = chain.start();
        assert!(s.on_request(&mut req, &info()).await.unwrap().is_none());
        assert_eq!(*log.lock().unwrap(), ["req:p", "resume:p", "req:q"]);
        let seen: Vec<_> = req.headers.get_all("x-seen").iter().collect();
        assert_eq!(seen, ["p", "q"]);
    }

    #[test]
    fn chains_without_body_filters_leave_bodies_alone() {
        // The gateway routes bodies through the chain only when this says
        // so; native filters never look at bodies.
        let (c, _, _) = chain(&[("a", false, false)]);
        assert!(!c.wants_bodies());
        let native = crate::native::build("headers", "h", "").unwrap();
        assert!(!FilterChain::new(vec![native]).wants_bodies());
    }

    /// A filter whose body callbacks come and go, like a Wasm module
    /// swapped in from its file.
    struct Swappable(Arc<std::sync::atomic::AtomicBool>);

    impl FilterFactory for Swappable {
        fn name(&self) -> &str {
            "swappable"
        }
        fn new_stream(&self) -> Box<dyn StreamFilter> {
            Box::new(Swappable(self.0.clone()))
        }
        fn wants_bodies(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
        fn body_limit(&self) -> usize {
            7
        }
    }

    impl StreamFilter for Swappable {}

    #[test]
    fn body_routing_follows_a_swapped_module() {
        let bodies = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (recorded, _, _) = chain(&[("a", false, false)]);
        let c = FilterChain::new(vec![
            recorded.factories[0].clone(),
            Arc::new(Swappable(bodies.clone())),
        ]);
        let before = c.start();
        assert!(!before.wants_bodies());

        bodies.store(true, Ordering::SeqCst);
        let mut after = c.start();
        assert!(after.wants_bodies());
        {
            let inner = after.lock();
            assert_eq!(&*inner.bodies.filters, &[false, true]);
            assert_eq!(inner.bodies.limit, 7);
        }
        // A stream keeps the routing it started with.
        assert!(!before.wants_bodies());

        bodies.store(false, Ordering::SeqCst);
        assert!(!c.start().wants_bodies());
    }

    /// Resets the stream in the phase `on` names.
    struct Resetter {
        on: &'static str,
    }

    impl FilterFactory for Resetter {
        fn name(&self) -> &str {
            "reset"
        }
        fn new_stream(&self) -> Box<dyn StreamFilter> {
            Box::new(Resetter { on: self.on })
        }
    }

    impl StreamFilter for Resetter {
        fn on_request_headers(&mut self, _: &mut http::request::Parts, _: &StreamInfo) -> Flow {
            if self.on == "request" {
                Flow::Reset
            } else {
                Flow::Continue
            }
        }
        fn on_response_headers(&mut self, _: &mut http::response::Parts, _: &StreamInfo) -> Flow {
            if self.on == "response" {
                Flow::Reset
            } else {
                Flow::Continue
            }
        }
    }

    #[tokio::test]
    async fn a_reset_stops_the_chain_and_still_ends_every_stream() {
        let (recorded, log, done) = chain(&[("a", false, false), ("c", false, false)]);
        let reset: Arc<dyn FilterFactory> = Arc::new(Resetter { on: "request" });
        let factories = vec![
            recorded.factories[0].clone(),
            reset,
            recorded.factories[1].clone(),
        ];
        let (mut req, mut resp) = parts();
        let mut s = FilterChain::new(factories.clone()).start();
        assert_eq!(
            s.on_request(&mut req, &info()).await.unwrap_err(),
            StreamReset
        );
        assert!(s.is_reset());
        drop(s);
        // c never saw the request; a and c still end exactly once.
        assert_eq!(*log.lock().unwrap(), ["req:a"]);
        assert_eq!(done.load(Ordering::SeqCst), 2);

        let mut factories = factories;
        factories[1] = Arc::new(Resetter { on: "response" });
        let mut s = FilterChain::new(factories).start();
        assert!(s.on_request(&mut req, &info()).await.unwrap().is_none());
        assert!(!s.is_reset());
        assert_eq!(
            s.on_response(&mut resp, &info()).await.unwrap_err(),
            StreamReset
        );
        assert!(s.is_reset());
        drop(s);
        // The response phase stops at the filter that reset: a never sees it.
        assert_eq!(*log.lock().unwrap(), ["req:a", "req:a", "req:c", "resp:c"]);
        assert_eq!(done.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn dropped_mid_request_still_ends_streams() {
        let (chain, _, done) = chain(&[("a", false, false), ("b", false, false)]);
        let s = chain.start();
        drop(s);
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }
}
