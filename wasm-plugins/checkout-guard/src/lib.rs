//! `checkout-guard`: above a load level, lets checkout through only for
//! clients that already queued (a waiting-room session cookie) or proved who
//! they are (a verified JWT: flashgate puts the verified subject in the user
//! header and never passes one the client sent), and answers the rest
//! locally, so the order core spends its capacity on buyers who waited.
//!
//! Reads flashgate's property `flashgate.load_level`. At or above
//! `min_level` a request without the `session_cookie` cookie and without
//! the `user_header` header gets `status` (default 503) with
//! `retry-after` and a small JSON body. Below `min_level` every request
//! passes.
//!
//! ```json
//! {"min_level": 2, "session_cookie": "fg_room", "user_header": "x-user-id",
//!  "status": 503, "retry_after": 5}
//! ```

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use std::rc::Rc;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct Config {
    min_level: u64,
    session_cookie: String,
    user_header: String,
    status: u32,
    retry_after: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_level: 2,
            session_cookie: "fg_room".into(),
            user_header: "x-user-id".into(),
            status: 503,
            retry_after: 5,
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
                Ok(c) if (200..600).contains(&c.status) => self.config = Rc::new(c),
                Ok(c) => {
                    log::error!("checkout-guard: invalid status {}", c.status);
                    return false;
                }
                Err(e) => {
                    log::error!("checkout-guard: invalid configuration: {e}");
                    return false;
                }
            }
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    config: Rc<Config>,
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

/// Whether a `cookie` header value holds a non-empty cookie `name`.
fn has_cookie(header: &str, name: &str) -> bool {
    header.split(';').any(|pair| {
        let mut kv = pair.trim().splitn(2, '=');
        kv.next() == Some(name) && kv.next().is_some_and(|v| !v.is_empty())
    })
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let level = self
            .get_property(vec!["flashgate", "load_level"])
            .map(|b| load_level(&b))
            .unwrap_or(0);
        if level < self.config.min_level {
            return Action::Continue;
        }
        let c = &self.config;
        let verified = self
            .get_http_request_header(&c.user_header)
            .is_some_and(|v| !v.is_empty());
        let queued = self
            .get_http_request_headers()
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("cookie") && has_cookie(v, &c.session_cookie));
        if verified || queued {
            return Action::Continue;
        }
        let retry = c.retry_after.to_string();
        self.send_http_response(
            c.status,
            vec![
                ("content-type", "application/json"),
                ("retry-after", retry.as_str()),
                ("cache-control", "no-store"),
                ("x-checkout-guard", "1"),
            ],
            Some(br#"{"error":"checkout_busy","message":"checkout is open to queued or signed-in buyers only right now; try again shortly"}"#),
        );
        Action::Pause
    }
}
