//! `strip-heavy-fields`: under load, drop configured fields from JSON
//! responses (reviews, long descriptions, related items) so each answer
//! costs less to send and to render.
//!
//! Reads flashgate's property `flashgate.load_level`. At or above
//! `min_level`, a response whose `content-type` is JSON is held to its end,
//! parsed, stripped of every key named in `fields` (at any depth) and sent
//! re-serialized with `x-stripped: 1`. Below `min_level`, or for a body
//! that is not JSON, the response passes untouched.
//!
//! ```json
//! {"min_level": 1, "fields": ["reviews", "description"]}
//! ```

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use std::rc::Rc;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct Config {
    min_level: u64,
    fields: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_level: 1,
            fields: Vec::new(),
        }
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: Rc::new(Config::default()) })
    });
}}

struct Root {
    config: Rc<Config>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        if let Some(bytes) = self.get_plugin_configuration() {
            match serde_json::from_slice::<Config>(&bytes) {
                Ok(c) => self.config = Rc::new(c),
                Err(e) => {
                    log::error!("strip-heavy-fields: invalid configuration: {e}");
                    return false;
                }
            }
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            config: self.config.clone(),
            strip: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    config: Rc<Config>,
    strip: bool,
}

impl Context for Stream {}

fn load_level(bytes: &[u8]) -> u64 {
    match <[u8; 8]>::try_from(bytes) {
        Ok(b) => u64::from_le_bytes(b),
        Err(_) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0),
    }
}

/// Removes every key named in `fields`, at any depth.
fn strip(v: &mut serde_json::Value, fields: &[String]) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|k, _| !fields.iter().any(|f| f == k));
            map.values_mut().for_each(|v| strip(v, fields));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| strip(v, fields)),
        _ => {}
    }
}

impl HttpContext for Stream {
    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let level = self
            .get_property(vec!["flashgate", "load_level"])
            .map(|b| load_level(&b))
            .unwrap_or(0);
        let json = self
            .get_http_response_header("content-type")
            .is_some_and(|t| t.to_ascii_lowercase().contains("json"));
        self.strip = !end_of_stream
            && json
            && level >= self.config.min_level
            && !self.config.fields.is_empty();
        if self.strip {
            // The length changes with the body.
            self.set_http_response_header("content-length", None);
            self.set_http_response_header("x-stripped", Some("1"));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.strip {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_response_body(0, size).unwrap_or_default();
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) {
            strip(&mut v, &self.config.fields);
            if let Ok(out) = serde_json::to_vec(&v) {
                self.set_http_response_body(0, size, &out);
            }
        }
        Action::Continue
    }
}
