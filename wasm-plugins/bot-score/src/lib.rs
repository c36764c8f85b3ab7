//! `bot-score`: passes the gateway's bot score on to the upstream in the
//! request header `x-bot-score`, counts it, and optionally answers 403
//! below a threshold.
//!
//! The score is the host's, not a guess of this guest: flashgate's bot
//! rules score every request from 1 (automated) to 99 (human), as
//! Cloudflare defines it, and expose it as the property
//! `flashgate.bot_score` (8-byte little-endian integer; see
//! `docs/bot-rules.md`). A host without that property gives no score: the
//! header is then removed and nothing is blocked.
//!
//! Configuration (JSON, every key optional):
//!
//! ```json
//! {"block_below": 0, "bot_below": 30}
//! ```
//!
//! With `block_below` above zero, a request scoring below it is answered
//! locally with 403. Metrics: the counter `bot_score_scored_total`, the
//! counter `bot_score_bots_total` (score below `bot_below`, 30 by default:
//! Cloudflare's "likely automated" band) and the histogram
//! `bot_score_score`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use serde::Deserialize;
use std::rc::Rc;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct Config {
    block_below: u64,
    bot_below: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            block_below: 0,
            bot_below: 30,
        }
    }
}

struct Metrics {
    scored: u32,
    bots: u32,
    score: u32,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: Rc::new(Config::default()), metrics: None })
    });
}}

struct Root {
    config: Rc<Config>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        if let Some(bytes) = self.get_plugin_configuration() {
            match serde_json::from_slice::<Config>(&bytes) {
                Ok(config) => self.config = Rc::new(config),
                Err(e) => {
                    log::error!("bot-score: invalid configuration: {e}");
                    return false;
                }
            }
        }
        let define = |kind, name| hostcalls::define_metric(kind, name);
        match (
            define(MetricType::Counter, "bot_score_scored_total"),
            define(MetricType::Counter, "bot_score_bots_total"),
            define(MetricType::Histogram, "bot_score_score"),
        ) {
            (Ok(scored), Ok(bots), Ok(score)) => {
                self.metrics = Some(Rc::new(Metrics {
                    scored,
                    bots,
                    score,
                }));
                true
            }
            _ => false,
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            config: self.config.clone(),
            metrics: self.metrics.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    config: Rc<Config>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for Stream {}

/// The property's value: an 8-byte little-endian integer (flashgate's
/// encoding), or a decimal string from hosts that write numbers as text.
fn score(bytes: &[u8]) -> Option<u64> {
    match <[u8; 8]>::try_from(bytes) {
        Ok(b) => Some(u64::from_le_bytes(b)),
        Err(_) => std::str::from_utf8(bytes).ok()?.trim().parse().ok(),
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let Some(score) = self
            .get_property(vec!["flashgate", "bot_score"])
            .and_then(|b| score(&b))
        else {
            // The client must never pick its own score.
            self.set_http_request_header("x-bot-score", None);
            return Action::Continue;
        };
        self.set_http_request_header("x-bot-score", Some(&score.to_string()));
        if let Some(m) = &self.metrics {
            let _ = hostcalls::increment_metric(m.scored, 1);
            if score < self.config.bot_below {
                let _ = hostcalls::increment_metric(m.bots, 1);
            }
            let _ = hostcalls::record_metric(m.score, score);
        }
        if self.config.block_below > 0 && score < self.config.block_below {
            self.send_http_response(
                403,
                vec![
                    ("content-type", "text/plain"),
                    ("x-bot-score", &score.to_string()),
                ],
                Some(b"automated traffic is not allowed\n"),
            );
            return Action::Pause;
        }
        Action::Continue
    }
}
