//! `bot-score`: scores each request from its headers and tells the rest of
//! the pipeline (and the upstream) through the request header `x-bot-score`.
//!
//! Points (configurable, JSON plugin configuration, every key optional):
//!
//! ```json
//! {"missing_user_agent": 40, "missing_accept_language": 20,
//!  "bot_user_agent": 60, "bot_user_agents": ["curl", "python-requests"],
//!  "block_at": 0}
//! ```
//!
//! The score is the sum of the matching rules, capped at 100. When
//! `block_at` is above zero and the score reaches it, the request is
//! answered locally with 403. Metrics: the counter `bot_score_scored_total`,
//! the counter `bot_score_bots_total` (score >= 50) and the histogram
//! `bot_score_score`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use serde::Deserialize;
use std::rc::Rc;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct Config {
    missing_user_agent: u32,
    missing_accept_language: u32,
    bot_user_agent: u32,
    bot_user_agents: Vec<String>,
    block_at: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            missing_user_agent: 40,
            missing_accept_language: 20,
            bot_user_agent: 60,
            bot_user_agents: [
                "bot",
                "crawler",
                "spider",
                "curl",
                "wget",
                "python-requests",
                "python-urllib",
                "go-http-client",
                "scrapy",
                "headlesschrome",
                "phantomjs",
                "httpclient",
                "okhttp",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            block_at: 0,
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
                Ok(mut config) => {
                    for ua in &mut config.bot_user_agents {
                        *ua = ua.to_ascii_lowercase();
                    }
                    self.config = Rc::new(config);
                }
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

impl Stream {
    fn score(&self) -> u32 {
        let c = &self.config;
        let mut score = 0;
        match self.get_http_request_header("user-agent") {
            None => score += c.missing_user_agent,
            Some(ua) if ua.trim().is_empty() => score += c.missing_user_agent,
            Some(ua) => {
                let ua = ua.to_ascii_lowercase();
                if c.bot_user_agents.iter().any(|b| ua.contains(b.as_str())) {
                    score += c.bot_user_agent;
                }
            }
        }
        if self.get_http_request_header("accept-language").is_none() {
            score += c.missing_accept_language;
        }
        score.min(100)
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let score = self.score();
        // The client must not be able to pick its own score.
        self.set_http_request_header("x-bot-score", Some(&score.to_string()));
        if let Some(m) = &self.metrics {
            let _ = hostcalls::increment_metric(m.scored, 1);
            if score >= 50 {
                let _ = hostcalls::increment_metric(m.bots, 1);
            }
            let _ = hostcalls::record_metric(m.score, u64::from(score));
        }
        if self.config.block_at > 0 && score >= self.config.block_at {
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
