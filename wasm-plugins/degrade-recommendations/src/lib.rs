//! `degrade-recommendations`: under load, answer recommendation requests at
//! the edge with a cheap placeholder instead of asking the origin.
//!
//! Reads flashgate's property `flashgate.load_level` (8-byte little-endian
//! integer, 0 = calm). When it is at least `min_level`, the request is
//! answered locally with `status` (default 200) and the configured JSON
//! `placeholder` body, with `x-degraded: 1`. Otherwise the request goes on.
//!
//! ```json
//! {"min_level": 2, "placeholder": {"items": []}, "status": 200}
//! ```

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use std::rc::Rc;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct Config {
    min_level: u64,
    placeholder: serde_json::Value,
    status: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_level: 2,
            placeholder: serde_json::json!({"items": [], "degraded": true}),
            status: 200,
        }
    }
}

struct Ready {
    min_level: u64,
    status: u32,
    body: Vec<u8>,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { ready: Rc::new(prepare(Config::default())) })
    });
}}

fn prepare(c: Config) -> Ready {
    Ready {
        min_level: c.min_level,
        status: c.status,
        body: serde_json::to_vec(&c.placeholder).unwrap_or_default(),
    }
}

struct Root {
    ready: Rc<Ready>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        if let Some(bytes) = self.get_plugin_configuration() {
            match serde_json::from_slice::<Config>(&bytes) {
                Ok(c) if (200..600).contains(&c.status) => self.ready = Rc::new(prepare(c)),
                Ok(c) => {
                    log::error!("degrade-recommendations: invalid status {}", c.status);
                    return false;
                }
                Err(e) => {
                    log::error!("degrade-recommendations: invalid configuration: {e}");
                    return false;
                }
            }
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            ready: self.ready.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    ready: Rc<Ready>,
}

impl Context for Stream {}

fn load_level(bytes: &[u8]) -> u64 {
    // flashgate encodes integers as 8-byte little-endian; accept decimal text
    // too so the filter also runs on hosts that hand out strings.
    match <[u8; 8]>::try_from(bytes) {
        Ok(b) => u64::from_le_bytes(b),
        Err(_) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0),
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let level = self
            .get_property(vec!["flashgate", "load_level"])
            .map(|b| load_level(&b))
            .unwrap_or(0);
        if level < self.ready.min_level {
            return Action::Continue;
        }
        self.send_http_response(
            self.ready.status,
            vec![("content-type", "application/json"), ("x-degraded", "1")],
            Some(&self.ready.body),
        );
        Action::Pause
    }
}
