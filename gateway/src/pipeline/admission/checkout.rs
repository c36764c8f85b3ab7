//! The checkout route (`checkout = { ... }` on a route): what the gateway
//! does for the one path that must never be wrong.
//!
//! - Identity is required: the verified JWT subject (see [`crate::pipeline::identity::jwt`]);
//!   without one the gateway answers 401 and the core never sees the call.
//! - The sold-out flag at the edge: when the core answers 409 for a SKU,
//!   the gateway answers 409 itself for that SKU for `sold_out_ttl`
//!   (short: stock can come back when unpaid orders expire), so the losers
//!   of a sale stop at the edge. A 201 for the SKU clears the flag.
//! - The body is read whole (a checkout is tiny; `max_body` bounds it) so
//!   that a request carrying an `Idempotency-Key` can be retried after a
//!   reset: the core answers a repeat with the same order. Without the key
//!   a POST is never retried once sent (only a refused connect is).
//! - A checkout with an `Idempotency-Key` that the core answers `503`
//!   `{"error":"unavailable"}` (Redis or the broker failing over: nothing
//!   deducted, or an outcome the key settles) is sent again after 100 ms,
//!   then 200, 400 ... until `retry_unavailable` (default 1.5 s) is spent:
//!   most buyers caught in a failover's detection window get their answer
//!   instead of a 503. `busy` (the core's own queue full) is not retried:
//!   more load is what it refuses. Counted in
//!   `flashgate_checkout_unavailable_retries_total{route,outcome}`.
//! - Never cached: the core marks every answer `cache-control: no-store`,
//!   and a checkout route must be `priority = "critical"` (validated), so
//!   overload shedding keeps its capacity.
//!
//! Its settings, and their checks, are `config::CheckoutRouteConfig`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use prometheus::{IntCounter, IntCounterVec};
use serde::Deserialize;

use crate::body::ProxyBody;
use crate::config::CheckoutRouteConfig;
use crate::edge::request_body::{BodyVerdict, LimitedBody};
use crate::error::ProxyError;
use crate::observe::access_log::UpstreamTiming;
use crate::pipeline::forward::{forward, Sent, UpstreamHead};
use crate::respond::Refusal;
use crate::upstream::{Cluster, UpstreamBody};

/// Most SKUs flagged at once; beyond that expired flags are dropped first,
/// then all (a flag is only an optimisation: the core decides).
const MAX_FLAGS: usize = 10_000;

/// A checkout route's runtime state.
pub struct Checkout {
    config: CheckoutRouteConfig,
    sold_out: Mutex<HashMap<String, Instant>>,
    /// `retried`, `recovered`, `exhausted` (see the module docs).
    retries: Option<[IntCounter; 3]>,
}

/// The first wait before a retry of a 503 `unavailable`; doubled each time.
const FIRST_RETRY_WAIT: Duration = Duration::from_millis(100);

/// Most of a core's 503 body the gateway reads to see its error code.
const MAX_ERROR_BODY: usize = 4096;

/// A checkout request that may go upstream.
pub struct Prepared {
    pub body: UpstreamBody,
    /// The body again, when an `Idempotency-Key` makes a retry safe.
    pub replay: Option<Bytes>,
    pub sku: Option<String>,
    /// The body as read (for a hot-item limit on one of its fields).
    pub bytes: Bytes,
}

#[derive(Deserialize)]
struct SkuOnly {
    sku: String,
}

/// The core's error answer, `{"error": "...", ...}`.
#[derive(Deserialize)]
struct ErrorOnly {
    error: String,
}

impl Checkout {
    pub fn new(config: &CheckoutRouteConfig) -> Checkout {
        Checkout {
            config: config.clone(),
            sold_out: Mutex::new(HashMap::new()),
            retries: None,
        }
    }

    /// Counts retries of 503 `unavailable` in `counters` for `route`.
    pub fn with_retry_metrics(mut self, counters: &IntCounterVec, route: &str) -> Checkout {
        self.retries = Some(
            ["retried", "recovered", "exhausted"].map(|o| counters.with_label_values(&[route, o])),
        );
        self
    }

    fn count(&self, outcome: usize) {
        if let Some(c) = &self.retries {
            c[outcome].inc();
        }
    }

    /// Sends a checkout with [`forward`], and again while the core answers
    /// 503 `unavailable` and the budget lasts. Only checkouts that carry
    /// an `Idempotency-Key` (`replay` is their body) are retried.
    pub async fn send(
        &self,
        cluster: &Arc<Cluster>,
        up: UpstreamHead,
        body: UpstreamBody,
        replay: Option<Bytes>,
        verdict: Option<&BodyVerdict>,
        timing: &mut UpstreamTiming,
    ) -> Sent {
        let budget = self.config.retry_unavailable.0;
        let Some(bytes) = replay.clone().filter(|_| !budget.is_zero()) else {
            return forward(cluster, up, body, replay, verdict, timing).await;
        };
        let until = Instant::now() + budget;
        let mut wait = FIRST_RETRY_WAIT;
        let mut body = Some(body);
        let mut retried = false;
        loop {
            let head = UpstreamHead {
                method: up.method.clone(),
                path: up.path.clone(),
                headers: up.headers.clone(),
            };
            let this = body
                .take()
                .unwrap_or_else(|| Either::Right(Either::Left(Full::new(bytes.clone()))));
            let (resp, endpoint) =
                forward(cluster, head, this, Some(bytes.clone()), verdict, timing).await?;
            if resp.status() != StatusCode::SERVICE_UNAVAILABLE {
                if retried {
                    self.count(1);
                }
                return Ok((resp, endpoint));
            }
            // Read the (small) error body to tell `unavailable` from `busy`;
            // the answer is rebuilt from it when it goes to the buyer.
            let (parts, b) = resp.into_parts();
            let read = Limited::new(b, MAX_ERROR_BODY).collect().await;
            let Ok(read) = read else {
                return Err(ProxyError::UpstreamReset);
            };
            let text = read.to_bytes();
            let resp = Response::from_parts(parts, ProxyBody::full(text.clone()));
            let unavailable =
                serde_json::from_slice::<ErrorOnly>(&text).is_ok_and(|e| e.error == "unavailable");
            if !unavailable {
                return Ok((resp, endpoint));
            }
            if Instant::now() + wait > until {
                if retried {
                    self.count(2);
                }
                return Ok((resp, endpoint));
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
            retried = true;
            self.count(0);
        }
    }

    /// Admission for a checkout: identity, body, sold-out flag. `Err` is
    /// the gateway's own answer.
    pub async fn prepare(
        &self,
        head: &Parts,
        body: LimitedBody,
        identified: bool,
    ) -> Result<Prepared, Refusal> {
        if !identified {
            return Err(crate::pipeline::identity::unauthenticated(&head.headers));
        }
        let read = tokio::time::timeout(
            self.config.body_timeout.0,
            Limited::new(body, self.config.max_body_bytes).collect(),
        )
        .await
        .map_err(|_| Refusal::new(ProxyError::BodyTimeout))?;
        let bytes = match read {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(Refusal::new(ProxyError::BodyTooLarge))
            }
            Err(_) => return Err(Refusal::new(ProxyError::BadBody)),
        };
        // Not JSON or no SKU: the core answers 422; the edge only reads.
        let sku = serde_json::from_slice::<SkuOnly>(&bytes)
            .ok()
            .map(|b| b.sku);
        if let Some(sku) = &sku {
            if self.is_sold_out(sku) {
                return Err(Refusal::new(ProxyError::SoldOut).header(
                    HeaderName::from_static("x-flashgate-sold-out"),
                    HeaderValue::from_static("edge"),
                ));
            }
        }
        let replay = head
            .headers
            .contains_key("idempotency-key")
            .then(|| bytes.clone());
        Ok(Prepared {
            body: Either::Right(Either::Left(Full::new(bytes.clone()))),
            replay,
            sku,
            bytes,
        })
    }

    /// Learns from the core's answer for `sku`.
    pub fn observe(&self, sku: Option<&str>, status: StatusCode) {
        let Some(sku) = sku else { return };
        let mut flags = self.sold_out.lock().unwrap_or_else(|p| p.into_inner());
        match status {
            StatusCode::CONFLICT => {
                if flags.len() >= MAX_FLAGS {
                    let now = Instant::now();
                    flags.retain(|_, until| *until > now);
                    if flags.len() >= MAX_FLAGS {
                        flags.clear();
                    }
                }
                flags.insert(sku.to_string(), Instant::now() + self.config.sold_out_ttl.0);
            }
            StatusCode::CREATED => {
                flags.remove(sku);
            }
            _ => {}
        }
    }

    fn is_sold_out(&self, sku: &str) -> bool {
        let flags = self.sold_out.lock().unwrap_or_else(|p| p.into_inner());
        flags.get(sku).is_some_and(|until| *until > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    #[test]
    fn a_409_flags_the_sku_until_the_ttl_or_a_201() {
        let c = Checkout::new(&CheckoutRouteConfig {
            sold_out_ttl: Dur(Duration::from_millis(50)),
            max_body_bytes: 1024,
            body_timeout: Dur(Duration::from_secs(10)),
            retry_unavailable: Dur(Duration::ZERO),
        });
        c.observe(Some("a"), StatusCode::CONFLICT);
        assert!(c.is_sold_out("a"));
        assert!(!c.is_sold_out("b"));
        c.observe(Some("a"), StatusCode::CREATED);
        assert!(!c.is_sold_out("a"));
        c.observe(Some("a"), StatusCode::CONFLICT);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!c.is_sold_out("a"), "flags expire");
    }
}
