//! `test-host`: a guest that exercises flashgate's proxy-wasm host for the
//! tests in `filters/tests/wasm.rs`. Not meant for production.
//!
//! The request header `x-test` selects what a request does:
//!
//! - `props`: copies properties into `x-prop-*` request headers.
//! - `shared`: increments the shared-data key `counter` with CAS and reports
//!   it in `x-counter`; checks that a stale CAS is refused (`x-cas-stale`).
//! - `metrics`: bumps the metrics and reports the counter in `x-counter-value`.
//! - `local`: answers locally with 418.
//! - `headers`: add/replace/remove on request and response headers.
//! - `config`: answers locally with the plugin configuration as the body.
//! - `pause`: pauses; the root context's tick (every 5 ms) resumes it.
//! - `log`: logs at every level and prints to stdout/stderr.
//! - `body`: holds the request body to its end (`Pause` on each chunk),
//!   then replaces it with its ASCII upper-case form plus `|wasm`.
//! - `resp-body`: the same for the response body, wrapped as `<...>`.
//! - `body-chunks`: counts request body callbacks without holding the
//!   body; the count goes to the response header `x-body-calls`.
//! - `callout`: calls the cluster named by `x-callout-cluster` (path from
//!   `x-callout-path`, timeout from `x-callout-timeout` ms, default 1000),
//!   pauses, and on the answer sets `x-callout-status` / `x-callout-body`
//!   / `x-callout-header` on the request, then resumes it.
//! - `enqueue`: puts `x-value` on the shared queue `events`; the root
//!   context's `on_queue_ready` moves it to the shared data key
//!   `queue-last`. `queue-seen` reports that key in `x-queue-last`.
//!   A value `call:<cluster>` instead makes the root context call that
//!   cluster (`GET /root-call`); its answer (`<status> <body>`, or
//!   `refused`) goes to the shared data key `root-call`, which
//!   `root-call-seen` reports in `x-root-call`.
//! - `body-grow`, `body-grow-late`: stream the request body, each
//!   chunk one byte longer (from the first chunk, or from the second).
//! - `grpc`: starts a gRPC call (cluster `auth`) and pauses; its gRPC
//!   status goes to `x-grpc-status` before resuming.
//! - `ticks`: reports how many ticks the root contexts saw
//!   (`x-ticks`, from shared data).
//! - `close-request`, `close-response`, `close-resp-body`: reset the
//!   stream (`proxy_close_stream`) from the request headers, response
//!   headers or first response body callback (then return `Continue`: the
//!   reset must win).
//!
//! Response trailers get `x-wasm-trailer: 1`.
//!
//! Every context's `on_log` bumps the counter `test_on_log_total`, so the
//! tests can see that each stream ends exactly once; a root context's
//! `on_done` bumps `test_root_done_total`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

thread_local! {
    static PAUSED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

#[derive(Default)]
struct Ids {
    requests: u32,
    gauge: u32,
    hist: u32,
    on_log: u32,
    root_done: u32,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: Rc::new(Vec::new()), ids: Rc::new(Ids::default()), queue: 0 })
    });
}}

struct Root {
    config: Rc<Vec<u8>>,
    ids: Rc<Ids>,
    queue: u32,
}

impl Context for Root {
    fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
        let (status, body) = call_answer(body_size);
        let _ = self.set_shared_data(
            "root-call",
            Some(format!("{status} {body}").as_bytes()),
            None,
        );
    }

    fn on_done(&mut self) -> bool {
        let _ = hostcalls::increment_metric(self.ids.root_done, 1);
        true
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        log::info!("test-host: vm start");
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        self.config = Rc::new(self.get_plugin_configuration().unwrap_or_default());
        if self.config.as_slice() == b"refuse" {
            return false;
        }
        let d = |t, n| hostcalls::define_metric(t, n).unwrap_or(u32::MAX);
        self.ids = Rc::new(Ids {
            requests: d(MetricType::Counter, "test_requests_total"),
            gauge: d(MetricType::Gauge, "test_gauge"),
            hist: d(MetricType::Histogram, "test_hist"),
            on_log: d(MetricType::Counter, "test_on_log_total"),
            root_done: d(MetricType::Counter, "test_root_done_total"),
        });
        self.set_tick_period(Duration::from_millis(5));
        self.queue = hostcalls::register_shared_queue("events").unwrap_or(0);
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if queue_id != self.queue {
            return;
        }
        while let Ok(Some(item)) = hostcalls::dequeue_shared_queue(queue_id) {
            if let Some(cluster) = item.strip_prefix(b"call:") {
                let cluster = String::from_utf8_lossy(cluster).into_owned();
                let started = self.dispatch_http_call(
                    &cluster,
                    vec![
                        (":method", "GET"),
                        (":path", "/root-call"),
                        (":authority", "auth"),
                    ],
                    None,
                    vec![],
                    Duration::from_secs(2),
                );
                if started.is_err() {
                    let _ = hostcalls::set_shared_data("root-call", Some(b"refused"), None);
                }
                continue;
            }
            let _ = hostcalls::set_shared_data("queue-last", Some(&item), None);
        }
    }

    fn on_tick(&mut self) {
        let (ticks, cas) = self.get_shared_data("ticks");
        let n = ticks
            .and_then(|d| <[u8; 8]>::try_from(d.as_slice()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        let _ = self.set_shared_data("ticks", Some(&(n + 1).to_le_bytes()), cas);
        let paused: Vec<u32> = PAUSED.with(|p| p.borrow_mut().drain(..).collect());
        for id in paused {
            if hostcalls::set_effective_context(id).is_ok() {
                let _ =
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-resumed", Some("1"));
                let _ = hostcalls::resume_http_request();
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            id: context_id,
            config: self.config.clone(),
            ids: self.ids.clone(),
            test: String::new(),
            body_calls: 0,
            req_eos: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    id: u32,
    config: Rc<Vec<u8>>,
    ids: Rc<Ids>,
    test: String,
    body_calls: u32,
    /// `end_of_stream` of the request-header callback.
    req_eos: bool,
}

impl Context for Stream {
    fn on_grpc_call_response(&mut self, _: u32, status_code: u32, _: usize) {
        self.set_http_request_header("x-grpc-status", Some(&status_code.to_string()));
        self.resume_http_request();
    }

    fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
        let (status, body) = call_answer(body_size);
        let header = self
            .get_http_call_response_header("x-auth")
            .unwrap_or_default();
        self.set_http_request_header("x-callout-status", Some(&status));
        self.set_http_request_header("x-callout-body", Some(&body));
        self.set_http_request_header("x-callout-header", Some(&header));
        self.resume_http_request();
    }
}

/// The callout answer being delivered: its `:status` (`none` without an
/// answer) and its body.
fn call_answer(body_size: usize) -> (String, String) {
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .unwrap_or_else(|| "none".to_string());
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    (status, body)
}

fn text(b: Option<Vec<u8>>) -> String {
    match b {
        None => "<none>".to_string(),
        Some(b) => String::from_utf8_lossy(&b).into_owned(),
    }
}

fn int(b: Option<Vec<u8>>) -> String {
    match b.as_deref().map(<[u8; 8]>::try_from) {
        Some(Ok(b)) => u64::from_le_bytes(b).to_string(),
        _ => "<bad>".to_string(),
    }
}

impl Stream {
    fn props(&self) {
        let set = |n: &str, v: String| self.set_http_request_header(n, Some(&v));
        set(
            "x-prop-path",
            text(self.get_property(vec!["request", "path"])),
        );
        set(
            "x-prop-method",
            text(self.get_property(vec!["request", "method"])),
        );
        set(
            "x-prop-source",
            text(self.get_property(vec!["source", "address"])),
        );
        set(
            "x-prop-plugin",
            text(self.get_property(vec!["plugin_name"])),
        );
        set(
            "x-prop-route",
            text(self.get_property(vec!["flashgate", "route"])),
        );
        set(
            "x-prop-priority",
            text(self.get_property(vec!["flashgate", "priority"])),
        );
        set(
            "x-prop-load",
            int(self.get_property(vec!["flashgate", "load_level"])),
        );
        set(
            "x-prop-ua",
            text(self.get_property(vec!["request", "headers", "user-agent"])),
        );
        set(
            "x-prop-missing",
            text(self.get_property(vec!["no", "such", "thing"])),
        );
        // request.headers is a whole map in the pairs encoding.
        let map = self
            .get_property(vec!["request", "headers"])
            .unwrap_or_default();
        let count = map
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        set("x-prop-headers", format!("{count:?}"));
        self.set_property(vec!["test", "custom"], Some(b"v1"));
        set(
            "x-prop-custom",
            text(self.get_property(vec!["test", "custom"])),
        );
        set(
            "x-prop-bot-score",
            int(self.get_property(vec!["flashgate", "bot_score"])),
        );
        set(
            "x-prop-ja4",
            text(self.get_property(vec!["flashgate", "ja4"])),
        );
        set(
            "x-pseudo-path",
            self.get_http_request_header(":path").unwrap_or_default(),
        );
        set(
            "x-pseudo-method",
            self.get_http_request_header(":method").unwrap_or_default(),
        );
    }

    fn shared(&self) {
        let mut value = 0u64;
        for _ in 0..100 {
            let (data, cas) = self.get_shared_data("counter");
            let current = data
                .and_then(|d| <[u8; 8]>::try_from(d.as_slice()).ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            value = current + 1;
            match self.set_shared_data("counter", Some(&value.to_le_bytes()), cas) {
                Ok(()) => break,
                Err(Status::CasMismatch) => continue,
                Err(_) => return,
            }
        }
        self.set_http_request_header("x-counter", Some(&value.to_string()));
        // A stale CAS must be refused.
        let (_, cas) = self.get_shared_data("counter");
        let stale = cas
            .map(|c| c.wrapping_sub(1))
            .filter(|c| *c != 0)
            .unwrap_or(12345);
        let r = self.set_shared_data("counter", Some(b"clobbered"), Some(stale));
        let verdict = if r == Err(Status::CasMismatch) {
            "refused"
        } else {
            "accepted"
        };
        self.set_http_request_header("x-cas-stale", Some(verdict));
    }

    fn metrics(&self) {
        let ids = &self.ids;
        let _ = hostcalls::increment_metric(ids.requests, 1);
        let v = self
            .get_http_request_header("x-value")
            .and_then(|v| v.parse().ok())
            .unwrap_or(7);
        let _ = hostcalls::record_metric(ids.gauge, v);
        let _ = hostcalls::record_metric(ids.hist, v);
        let got = hostcalls::get_metric(ids.requests).map(|v| v.to_string());
        self.set_http_request_header("x-counter-value", Some(&format!("{got:?}")));
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        self.test = self.get_http_request_header("x-test").unwrap_or_default();
        self.req_eos = end_of_stream;
        match self.test.as_str() {
            "props" => self.props(),
            "shared" => self.shared(),
            "metrics" => self.metrics(),
            "local" => {
                self.send_http_response(418, vec![("x-local", "1")], Some(b"teapot"));
                return Action::Pause;
            }
            "config" => {
                self.send_http_response(200, vec![], Some(&self.config));
                return Action::Pause;
            }
            "headers" => {
                self.set_http_request_header("x-replace", Some("new"));
                self.remove_http_request_header("x-remove");
                self.add_http_request_header("x-multi", "two");
                self.add_http_request_header("x-added", "1");
                let n = self.get_http_request_headers().len();
                self.set_http_request_header("x-count", Some(&n.to_string()));
                if let Some(p) = self.get_http_request_header("x-new-path") {
                    self.set_http_request_header(":path", Some(&p));
                }
            }
            "pause" => {
                PAUSED.with(|p| p.borrow_mut().push(self.id));
                return Action::Pause;
            }
            "callout" => {
                let cluster = self
                    .get_http_request_header("x-callout-cluster")
                    .unwrap_or_default();
                let path = self
                    .get_http_request_header("x-callout-path")
                    .unwrap_or_else(|| "/auth".to_string());
                let timeout = self
                    .get_http_request_header("x-callout-timeout")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000);
                let r = self.dispatch_http_call(
                    &cluster,
                    vec![
                        (":method", "GET"),
                        (":path", &path),
                        (":authority", "auth.internal"),
                        ("x-from", "wasm"),
                    ],
                    None,
                    vec![],
                    Duration::from_millis(timeout),
                );
                match r {
                    Ok(_) => return Action::Pause,
                    Err(e) => {
                        self.set_http_request_header("x-callout-error", Some(&format!("{e:?}")))
                    }
                }
            }
            "grpc" => {
                let r = self.dispatch_grpc_call(
                    "auth",
                    "flashgate.Test",
                    "Check",
                    vec![],
                    None,
                    Duration::from_secs(1),
                );
                match r {
                    Ok(_) => return Action::Pause,
                    Err(e) => {
                        self.set_http_request_header("x-grpc-status", Some(&format!("{e:?}")))
                    }
                }
            }
            "enqueue" => {
                let value = self.get_http_request_header("x-value").unwrap_or_default();
                let r = hostcalls::resolve_shared_queue("", "events").and_then(|q| match q {
                    Some(q) => hostcalls::enqueue_shared_queue(q, Some(value.as_bytes())),
                    None => Err(Status::NotFound),
                });
                self.set_http_request_header("x-enqueued", Some(&format!("{r:?}")));
            }
            "queue-seen" => {
                let (v, _) = self.get_shared_data("queue-last");
                self.set_http_request_header("x-queue-last", Some(&text(v)));
            }
            "root-call-seen" => {
                let (v, _) = self.get_shared_data("root-call");
                self.set_http_request_header("x-root-call", Some(&text(v)));
            }
            "ticks" => {
                let (v, _) = self.get_shared_data("ticks");
                self.set_http_request_header("x-ticks", Some(&int(v)));
            }
            "close-request" => self.reset_http_request(),
            "log" => {
                log::trace!("test-host trace");
                log::debug!("test-host debug");
                log::info!("test-host info");
                log::warn!("test-host warn");
                log::error!("test-host error");
                println!("test-host stdout");
                eprintln!("test-host stderr");
                let t = self.get_current_time();
                let ok = t > std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
                self.set_http_request_header("x-time-ok", Some(if ok { "1" } else { "0" }));
            }
            _ => {}
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        if self.test == "eos" {
            // What the header callbacks were told: does a body follow?
            let req = self.req_eos.to_string();
            self.set_http_response_header("x-req-eos", Some(&req));
            self.set_http_response_header("x-resp-eos", Some(&end_of_stream.to_string()));
        }
        if self.test == "body-chunks" {
            let n = self.body_calls.to_string();
            self.set_http_response_header("x-body-calls", Some(&n));
        }
        if self.test == "resp-body" {
            self.set_http_response_header("content-length", None);
        }
        if self.test == "headers" {
            self.set_http_response_header("x-resp-replace", Some("new"));
            self.remove_http_response_header("server");
            self.add_http_response_header("x-resp-added", "1");
            let seen = self
                .get_http_request_header("x-replace")
                .unwrap_or_default();
            self.set_http_response_header("x-req-seen", Some(&seen));
            let status = self.get_http_response_header(":status").unwrap_or_default();
            self.set_http_response_header("x-status-seen", Some(&status));
        }
        if self.test == "close-response" {
            self.reset_http_response();
        }
        if self.test == "local-response-phase" {
            self.send_http_response(503, vec![("x-replaced", "1")], Some(b"replaced"));
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        match self.test.as_str() {
            "body" => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = self.get_http_request_body(0, size).unwrap_or_default();
                let mut out = body.to_ascii_uppercase();
                out.extend_from_slice(b"|wasm");
                self.set_http_request_body(0, size, &out);
            }
            "body-chunks" => self.body_calls += 1,
            // Streams the body, one byte longer per chunk: from the first
            // chunk, or (`-late`) from the second.
            "body-grow" | "body-grow-late" => {
                self.body_calls += 1;
                let late = self.test == "body-grow-late";
                if size > 0 && (!late || self.body_calls > 1) {
                    let mut body = self.get_http_request_body(0, size).unwrap_or_default();
                    body.push(b'+');
                    self.set_http_request_body(0, size, &body);
                }
            }
            _ => {}
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.test == "close-resp-body" {
            self.reset_http_response();
        }
        if self.test == "resp-body" {
            if !end_of_stream {
                return Action::Pause;
            }
            let body = self.get_http_response_body(0, size).unwrap_or_default();
            let mut out = b"<".to_vec();
            out.extend_from_slice(&body);
            out.push(b'>');
            self.set_http_response_body(0, size, &out);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _: usize) -> Action {
        self.add_http_response_trailer("x-wasm-trailer", "1");
        Action::Continue
    }

    fn on_log(&mut self) {
        let _ = hostcalls::increment_metric(self.ids.on_log, 1);
    }
}
