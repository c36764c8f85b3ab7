//! `add-headers`: the template for operators' own filters.
//!
//! Adds, sets and removes request and response headers as its JSON plugin
//! configuration says:
//!
//! ```json
//! {"request_add":    [["x-edge", "flashgate"]],
//!  "request_set":    [["x-env", "prod"]],
//!  "request_remove": ["x-debug"],
//!  "response_add":   [["cache-status", "edge"]],
//!  "response_set":   [["x-frame-options", "DENY"]],
//!  "response_remove":["server"]}
//! ```
//!
//! `add` appends another value, `set` replaces all values, `remove` drops
//! the header. Order: remove, then set, then add. An invalid configuration
//! makes `on_configure` fail, so the gateway refuses the filter at load.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use std::cell::RefCell;
use std::rc::Rc;

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, default)]
struct Config {
    request_add: Vec<(String, String)>,
    request_set: Vec<(String, String)>,
    request_remove: Vec<String>,
    response_add: Vec<(String, String)>,
    response_set: Vec<(String, String)>,
    response_remove: Vec<String>,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

thread_local! {
    /// The instance's configuration. A Wasm instance runs one thread, so
    /// this is per instance (per VM), like the root context; streams read
    /// it in place instead of each holding a reference.
    static CONFIG: RefCell<Rc<Config>> = RefCell::new(Rc::new(Config::default()));
}

fn config() -> Rc<Config> {
    CONFIG.with_borrow(Rc::clone)
}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            return true; // no configuration: a filter that does nothing
        };
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(config) => {
                CONFIG.set(Rc::new(config));
                true
            }
            Err(e) => {
                log::error!("add-headers: invalid configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Zero-sized: the SDK boxes one per request, and boxing a
        // zero-sized value allocates nothing.
        Some(Box::new(Stream))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request. It keeps no state of its own: what it does comes from the
/// instance's configuration.
struct Stream;

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let c = config();
        for name in &c.request_remove {
            self.remove_http_request_header(name);
        }
        for (name, value) in &c.request_set {
            self.set_http_request_header(name, Some(value));
        }
        for (name, value) in &c.request_add {
            self.add_http_request_header(name, value);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let c = config();
        for name in &c.response_remove {
            self.remove_http_response_header(name);
        }
        for (name, value) in &c.response_set {
            self.set_http_response_header(name, Some(value));
        }
        for (name, value) in &c.response_add {
            self.add_http_response_header(name, value);
        }
        Action::Continue
    }
}
