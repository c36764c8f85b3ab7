//! The order core's HTTP API (hyper, HTTP/1.1 and h2c):
//!
//! - `POST /checkout` `{"sku", "qty"}` with `Idempotency-Key` and `x-user-id`
//! - `GET /orders/{id}`, `POST /orders/{id}/pay`
//! - `PUT /admin/stock/{sku}` `{"stock": N}`, `GET /admin/stock/{sku}`,
//!   `GET /admin/timings` (where checkouts spend their time, see
//!   [`crate::timing`]) (`authorization: Bearer <admin_token>`)
//! - `GET /healthz`
//!
//! Errors become answers in one place, [`error_response`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::error::CoreError;
use crate::model::{sku_of_order, Order, Outcome, Sku};
use crate::service::{CheckoutRequest, Core};

/// Largest request body accepted (a checkout is a few dozen bytes).
const MAX_BODY: usize = 16 * 1024;

/// The header the gateway sets from the verified JWT subject.
pub const USER_HEADER: &str = "x-user-id";
/// Set on a 200 that replays an earlier checkout.
pub const REPLAY_HEADER: &str = "idempotent-replay";

pub type Body = Full<Bytes>;

/// What the HTTP layer needs: the core and the admin token.
pub struct Api {
    pub core: Arc<Core>,
    pub admin_token: String,
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, api: Arc<Api>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let api = api.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds `addr` and serves in a background task; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    api: Arc<Api>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((bound, tokio::spawn(serve(listener, api))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckoutBody {
    sku: Sku,
    qty: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StockBody {
    stock: i64,
}

impl Api {
    /// Routes one request. Never panics on client input: every refusal is
    /// an answer.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let result = match (&method, segments.as_slice()) {
            (&Method::POST, ["checkout"]) => self.checkout(req).await,
            (&Method::GET, ["orders", id]) => self.get_order(id).await,
            (&Method::POST, ["orders", id, "pay"]) => self.pay(id).await,
            (&Method::PUT, ["admin", "stock", sku]) => match self.admin(&req) {
                Ok(()) => self.put_stock(sku, req).await,
                Err(r) => Ok(r),
            },
            (&Method::GET, ["admin", "stock", sku]) => match self.admin(&req) {
                Ok(()) => self.get_stock(sku).await,
                Err(r) => Ok(r),
            },
            (&Method::GET, ["admin", "timings"]) => match self.admin(&req) {
                Ok(()) => Ok(json_response(
                    StatusCode::OK,
                    &json!(self.core.timings().snapshot()),
                )),
                Err(r) => Ok(r),
            },
            (&Method::GET, ["healthz"]) => Ok(json_response(
                StatusCode::OK,
                &json!({"ok": true, "durable": self.core.durable()}),
            )),
            (_, ["checkout"] | ["orders", ..] | ["admin", ..] | ["healthz"]) => Ok(json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed"}),
            )),
            _ => Ok(json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found"}),
            )),
        };
        result.unwrap_or_else(|e| error_response(&e, &method, &path))
    }

    async fn checkout(&self, req: Request<Incoming>) -> Result<Response<Body>, CoreError> {
        let key = header_str(&req, "idempotency-key")
            .ok_or_else(|| CoreError::bad_input("Idempotency-Key header is required"))?;
        let user = header_str(&req, USER_HEADER)
            .ok_or_else(|| CoreError::bad_input("x-user-id header is required"))?;
        let body: CheckoutBody = read_json(req.into_body()).await?;
        let outcome = self
            .core
            .checkout(CheckoutRequest {
                sku: body.sku,
                qty: body.qty,
                user,
                idempotency_key: key,
            })
            .await?;
        Ok(match outcome {
            Outcome::Created(order) => order_response(StatusCode::CREATED, &order, false),
            Outcome::Replay(order) => order_response(StatusCode::OK, &order, true),
            Outcome::SoldOut => json_response(StatusCode::CONFLICT, &json!({"error": "sold_out"})),
            Outcome::OverLimit => {
                let mut r = json_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    &json!({"error": "over_limit", "per_user": self.core.limits().per_user}),
                );
                // Quota comes back only when an unpaid order expires.
                r.headers_mut().insert(
                    header::RETRY_AFTER,
                    self.core.limits().expiry.as_secs().max(1).into(),
                );
                r
            }
            Outcome::Fenced => {
                return Err(CoreError::Unknown(
                    "the broker rolled this attempt back before it ran; retry with the same Idempotency-Key"
                        .into(),
                ))
            }
        })
    }

    async fn get_order(&self, id: &str) -> Result<Response<Body>, CoreError> {
        if sku_of_order(id).is_none() {
            return Ok(json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found"}),
            ));
        }
        Ok(match self.core.order(id).await? {
            Some(o) => order_response(StatusCode::OK, &o, false),
            None => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        })
    }

    async fn pay(&self, id: &str) -> Result<Response<Body>, CoreError> {
        Ok(match self.core.pay(id).await? {
            Some(o) => order_response(StatusCode::OK, &o, false),
            None => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        })
    }

    async fn put_stock(
        &self,
        sku: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, CoreError> {
        let sku = Sku::parse(sku)?;
        let body: StockBody = read_json(req.into_body()).await?;
        self.core.set_stock(&sku, body.stock).await?;
        self.get_stock(sku.as_str()).await
    }

    async fn get_stock(&self, sku: &str) -> Result<Response<Body>, CoreError> {
        let sku = Sku::parse(sku)?;
        let info = self.core.stock(&sku).await?;
        Ok(json_response(
            StatusCode::OK,
            &json!({"sku": sku, "stock": info.stock, "orders": info.orders}),
        ))
    }

    /// Admin calls need `authorization: Bearer <admin_token>`.
    // An admin call is rare: the unboxed answer keeps the callers simple.
    #[allow(clippy::result_large_err)]
    fn admin<B>(&self, req: &Request<B>) -> Result<(), Response<Body>> {
        let ok = header_str(req, "authorization")
            .and_then(|v| v.strip_prefix("Bearer ").map(str::to_string))
            .is_some_and(|t| constant_time_eq(t.as_bytes(), self.admin_token.as_bytes()));
        if ok {
            Ok(())
        } else {
            let mut r = json_response(StatusCode::UNAUTHORIZED, &json!({"error": "unauthorized"}));
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            Err(r)
        }
    }
}

/// Compares without an early exit, so response time does not leak how much
/// of the token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn header_str<B>(req: &Request<B>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

async fn read_json<T: serde::de::DeserializeOwned>(body: Incoming) -> Result<T, CoreError> {
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| CoreError::bad_input(format!("request body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| CoreError::bad_input(format!("JSON body: {e}")))
}

fn order_response(status: StatusCode, order: &Order, replay: bool) -> Response<Body> {
    let mut r = json_response(status, &json!({ "order": order }));
    if replay {
        r.headers_mut()
            .insert(REPLAY_HEADER, http::HeaderValue::from_static("true"));
    }
    r
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

/// The one place where errors become answers. Client mistakes are not
/// logged as errors; outages are logged once with their cause chain.
pub fn error_response(e: &CoreError, method: &Method, path: &str) -> Response<Body> {
    let (status, code) = match e {
        CoreError::BadInput(_) | CoreError::KeyReuse(_) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "bad_input")
        }
        CoreError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        CoreError::Store { .. } | CoreError::Broker { .. } | CoreError::Unknown(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        CoreError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    if status.is_server_error() {
        tracing::warn!(%method, path, error = %chain(e), "request failed");
    } else {
        tracing::debug!(%method, path, error = %e, "request refused");
    }
    let mut r = json_response(status, &json!({"error": code, "detail": e.to_string()}));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    }
    r
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
