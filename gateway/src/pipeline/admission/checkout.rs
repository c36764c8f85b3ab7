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
//! - Never cached: the core marks every answer `cache-control: no-store`,
//!   and a checkout route must be `priority = "critical"` (validated), so
//!   overload shedding keeps its capacity.
//!
//! Its settings, and their checks, are `config::CheckoutRouteConfig`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use serde::Deserialize;

use crate::config::CheckoutRouteConfig;
use crate::edge::request_body::LimitedBody;
use crate::error::ProxyError;
use crate::respond::Refusal;
use crate::upstream::UpstreamBody;

/// Most SKUs flagged at once; beyond that expired flags are dropped first,
/// then all (a flag is only an optimisation: the core decides).
const MAX_FLAGS: usize = 10_000;

/// A checkout route's runtime state.
pub struct Checkout {
    config: CheckoutRouteConfig,
    sold_out: Mutex<HashMap<String, Instant>>,
}

/// A checkout request that may go upstream.
pub struct Prepared {
    pub body: UpstreamBody,
    /// The body again, when an `Idempotency-Key` makes a retry safe.
    pub replay: Option<Bytes>,
    pub sku: Option<String>,
}

#[derive(Deserialize)]
struct SkuOnly {
    sku: String,
}

impl Checkout {
    pub fn new(config: &CheckoutRouteConfig) -> Checkout {
        Checkout {
            config: config.clone(),
            sold_out: Mutex::new(HashMap::new()),
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
            return Err(Refusal::new(ProxyError::Unauthenticated)
                .header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
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
            body: Either::Right(Either::Left(Full::new(bytes))),
            replay,
            sku,
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
    use std::time::Duration;

    #[test]
    fn a_409_flags_the_sku_until_the_ttl_or_a_201() {
        let c = Checkout::new(&CheckoutRouteConfig {
            sold_out_ttl: Dur(Duration::from_millis(50)),
            max_body_bytes: 1024,
            body_timeout: Dur(Duration::from_secs(10)),
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
