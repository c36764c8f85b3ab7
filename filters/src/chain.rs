//! Runs a route's filters in order for one stream.

use std::sync::Arc;

use crate::{FilterFactory, Flow, LocalResponse, StreamFilter, StreamInfo};

/// A route's ordered filters. Cheap to clone; built when config is loaded.
#[derive(Clone, Default)]
pub struct FilterChain {
    factories: Arc<[Arc<dyn FilterFactory>]>,
}

impl FilterChain {
    pub fn new(factories: Vec<Arc<dyn FilterFactory>>) -> Self {
        FilterChain {
            factories: factories.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.factories.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.factories.iter().map(|f| f.name())
    }

    /// Makes the per-request state of every filter in the chain.
    pub fn start(&self) -> ChainStream {
        ChainStream {
            filters: self.factories.iter().map(|f| f.new_stream()).collect(),
            entered: 0,
        }
    }
}

/// One stream's walk through the chain. Dropping it ends the stream for
/// every filter (`on_done`), which is how a client abort reaches filters:
/// the request future is dropped and this with it.
pub struct ChainStream {
    filters: Vec<Box<dyn StreamFilter>>,
    /// How many filters saw the request phase; only those see the response.
    entered: usize,
}

impl ChainStream {
    /// Runs the request phase in configuration order. `Some` means a filter
    /// answered locally: the answer still goes through the response phase of
    /// the filters before it (never through its own), like Envoy's local
    /// replies.
    pub async fn on_request(
        &mut self,
        req: &mut http::request::Parts,
        info: &StreamInfo,
    ) -> Option<LocalResponse> {
        for i in 0..self.filters.len() {
            let filter = &mut self.filters[i];
            let mut flow = filter.on_request_headers(req, info);
            loop {
                match flow {
                    Flow::Continue => break,
                    Flow::Respond(local) => {
                        self.entered = i;
                        return Some(local);
                    }
                    Flow::Pause(pending) => {
                        pending.await;
                        flow = filter.resume_request_headers(req, info);
                    }
                }
            }
            self.entered = i + 1;
        }
        None
    }

    /// Runs the response phase in reverse order over the filters that saw
    /// the request. `Some` means a filter replaced the response; the
    /// replacement goes on through the remaining filters.
    pub async fn on_response(
        &mut self,
        resp: &mut http::response::Parts,
        info: &StreamInfo,
    ) -> Option<LocalResponse> {
        let mut replaced = None;
        for i in (0..self.entered).rev() {
            let filter = &mut self.filters[i];
            let mut flow = filter.on_response_headers(resp, info);
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
                        flow = filter.resume_response_headers(resp, info);
                    }
                }
            }
        }
        replaced
    }
}

impl Drop for ChainStream {
    fn drop(&mut self) {
        for f in &mut self.filters {
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
            request_id: "id".into(),
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
        assert!(s.on_request(&mut req, &info()).await.is_none());
        assert!(s.on_response(&mut resp, &info()).await.is_none());
        drop(s);
        assert_eq!(*log.lock().unwrap(), ["req:a", "req:b", "resp:b", "resp:a"]);
        let seen: Vec<_> = req.headers.get_all("x-seen").iter().collect();
        assert_eq!(seen, ["a", "b"]);
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn local_response_stops_chain_and_skips_responder() {
        let (chain, log, done) =
            chain(&[("a", false, false), ("b", true, false), ("c", false, false)]);
        let (mut req, mut resp) = parts();
        let mut s = chain.start();
        let local = s.on_request(&mut req, &info()).await.expect("b answers");
        assert_eq!(local.status, StatusCode::FORBIDDEN);
        s.on_response(&mut resp, &info()).await;
        drop(s);
        assert_eq!(*log.lock().unwrap(), ["req:a", "req:b", "resp:a"]);
        // c never saw the request but its stream still ends exactly once.
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn pause_then_resume() {
        let (chain, log, _) = chain(&[("p", false, true), ("q", false, false)]);
        let (mut req, _) = parts();
        let mut s = chain.start();
        assert!(s.on_request(&mut req, &info()).await.is_none());
        assert_eq!(*log.lock().unwrap(), ["req:p", "resume:p", "req:q"]);
        let seen: Vec<_> = req.headers.get_all("x-seen").iter().collect();
        assert_eq!(seen, ["p", "q"]);
    }

    #[tokio::test]
    async fn dropped_mid_request_still_ends_streams() {
        let (chain, _, done) = chain(&[("a", false, false), ("b", false, false)]);
        let s = chain.start();
        drop(s);
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }
}
