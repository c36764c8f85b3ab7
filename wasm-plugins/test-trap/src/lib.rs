//! `test-trap`: a misbehaving guest for the host's failure tests.
//!
//! The plugin configuration names the misbehaviour; it happens on request
//! headers when the request carries `x-trap: 1` (other requests pass, so the
//! tests can see that a fresh instance replaced the poisoned one):
//!
//! - `loop`: spins forever (the epoch deadline must stop it),
//! - `panic`: panics (a Wasm trap),
//! - `oom`: allocates until the memory cap refuses to grow,
//! - `response-panic`: panics in the response phase instead,
//! - `configure-panic`: panics in `on_configure` (the load must fail),
//! - `configure-loop`: spins in `on_configure` (the load must fail).
//!
//! Requests that pass get `x-trap-passed: 1`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { mode: Rc::new(String::new()) })
    });
}}

struct Root {
    mode: Rc<String>,
}

impl Context for Root {}

fn spin() -> ! {
    let mut i: u64 = 0;
    loop {
        i = std::hint::black_box(i.wrapping_add(1));
    }
}

fn hog() -> usize {
    let mut keep: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; 1 << 20];
        chunk[0] = keep.len() as u8;
        keep.push(std::hint::black_box(chunk));
        if keep.len() > 1 << 20 {
            return keep.len();
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        self.mode = Rc::new(String::from_utf8_lossy(&config).trim().to_string());
        match self.mode.as_str() {
            "configure-panic" => panic!("test-trap: panic in on_configure"),
            "configure-loop" => spin(),
            _ => true,
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            mode: self.mode.clone(),
            armed: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    mode: Rc<String>,
    armed: bool,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.armed = self.get_http_request_header("x-trap").as_deref() == Some("1");
        if self.armed {
            match self.mode.as_str() {
                "loop" => spin(),
                "panic" => panic!("test-trap: panic on request headers"),
                "oom" => {
                    let n = hog();
                    self.set_http_request_header("x-hog", Some(&n.to_string()));
                }
                _ => {}
            }
        }
        self.set_http_request_header("x-trap-passed", Some("1"));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if self.armed && self.mode.as_str() == "response-panic" {
            panic!("test-trap: panic on response headers");
        }
        Action::Continue
    }
}
