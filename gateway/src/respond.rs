//! The one answer builder: every answer the gateway makes itself (a
//! refused request, a failed upstream, a filter's refusal) is built here,
//! in one shape:
//!
//! - a JSON body `{"error": code, "message": ..., "request_id": ...}`;
//! - `x-flashgate-error: <code>`, `content-type: application/json`,
//!   `cache-control: no-store` (an answer about one request is never
//!   something a cache in front of us may keep);
//! - `retry-after` when the refusal says when to come back (every 503
//!   says at least 1 second, so clients back off instead of hammering);
//! - `connection: close` when the request was not read to its end;
//! - whatever else the refusal carries (a challenge's `www-authenticate`,
//!   the edge's sold-out mark; later the rate limit's `RateLimit` fields
//!   and the waiting room's cookie).
//!
//! A filter's own local response (its status, headers and body) is passed
//! through as the filter made it; only refusals on a filter's account
//! ([`filters::Refusal`]) take the gateway's shape.

use http::header::{HeaderName, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::error::ProxyError;

/// A request the gateway answers itself, and what the answer carries
/// beside its cause.
#[derive(Debug)]
pub struct Refusal {
    pub error: ProxyError,
    /// Seconds for `retry-after`; 503 answers get 1 when unset.
    pub retry_after: Option<u32>,
    /// Extra header fields of this refusal.
    pub headers: HeaderMap,
    /// More members of the JSON body (a challenge's token and
    /// difficulty), beside `error`, `message` and `request_id`.
    pub details: Option<serde_json::Map<String, serde_json::Value>>,
    /// An HTML page instead of the JSON body, for a browser (the
    /// proof-of-work challenge): same status and headers, `content-type:
    /// text/html`.
    pub page: Option<bytes::Bytes>,
}

impl Refusal {
    pub fn new(error: ProxyError) -> Refusal {
        Refusal {
            error,
            retry_after: None,
            headers: HeaderMap::new(),
            details: None,
            page: None,
        }
    }

    pub fn detail(mut self, name: &str, value: serde_json::Value) -> Refusal {
        self.details
            .get_or_insert_with(Default::default)
            .insert(name.into(), value);
        self
    }

    pub fn page(mut self, html: impl Into<bytes::Bytes>) -> Refusal {
        self.page = Some(html.into());
        self
    }

    pub fn retry_after(mut self, seconds: u32) -> Refusal {
        self.retry_after = Some(seconds);
        self
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Refusal {
        self.headers.insert(name, value);
        self
    }
}

impl From<ProxyError> for Refusal {
    fn from(error: ProxyError) -> Refusal {
        Refusal::new(error)
    }
}

/// The JSON body of every answer the gateway makes itself.
#[derive(serde::Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
    request_id: &'a str,
}

/// Builds the answer for `refusal` (see the module docs for its shape).
pub fn refusal(refusal: Refusal, request_id: &HeaderValue) -> Response<ProxyBody> {
    let Refusal {
        error,
        retry_after,
        headers,
        details,
        page,
    } = refusal;
    let (body, content_type) = match page {
        Some(html) => (
            ProxyBody::full(html),
            HeaderValue::from_static("text/html; charset=utf-8"),
        ),
        None => {
            let message = error.to_string();
            let request_id = request_id.to_str().unwrap_or("");
            // Serialized from borrowed fields, not a `json!` map: refusals
            // (a flood's 429s) are made at the rate the flood arrives. Only
            // the few with details (a challenge) build a map.
            let body = match details {
                None => serde_json::to_vec(&Body {
                    error: error.code(),
                    message: &message,
                    request_id,
                }),
                Some(more) => {
                    let mut obj = serde_json::Map::with_capacity(3 + more.len());
                    obj.insert("error".into(), error.code().into());
                    obj.insert("message".into(), message.into());
                    obj.insert("request_id".into(), request_id.into());
                    obj.extend(more);
                    serde_json::to_vec(&obj)
                }
            }
            .unwrap_or_default();
            (
                ProxyBody::full(body),
                HeaderValue::from_static("application/json"),
            )
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = error.status();
    let h = resp.headers_mut();
    h.reserve(6 + headers.len());
    h.insert(CONTENT_TYPE, content_type);
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-flashgate-error", HeaderValue::from_static(error.code()));
    let retry_after = retry_after
        .or((error.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(1))
        .map(HeaderValue::from);
    if let Some(v) = retry_after {
        h.insert(RETRY_AFTER, v);
    }
    if error.closes_connection() {
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    for (name, value) in headers {
        if let Some(name) = name {
            h.insert(name, value);
        }
    }
    resp
}

/// An answer without a body that is not a refusal (a challenge answer
/// exchanged for its clearance cookie): `status`, `headers`, and
/// `cache-control: no-store`.
pub fn empty(status: StatusCode, headers: HeaderMap) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(bytes::Bytes::new()));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// An answer with a body that is not a refusal (the waiting room's page
/// or its JSON): `status`, `headers`, the body's `content-type`, and
/// `cache-control: no-store` (it is about one visitor).
pub fn content(
    status: StatusCode,
    headers: HeaderMap,
    content_type: &'static str,
    body: impl Into<bytes::Bytes>,
) -> Response<ProxyBody> {
    let mut resp = empty(status, headers);
    *resp.body_mut() = ProxyBody::full(body.into());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The answer for a bare cause (no extra headers).
pub fn error(error: ProxyError, request_id: &HeaderValue) -> Response<ProxyBody> {
    refusal(Refusal::new(error), request_id)
}

/// A filter's local response: the filter's own as it made it, or a
/// refusal on the filter's account in the gateway's shape.
pub fn local(local: filters::LocalResponse, request_id: &HeaderValue) -> Response<ProxyBody> {
    if let Some(r) = local.refusal {
        return error(r.into(), request_id);
    }
    let mut resp = Response::new(ProxyBody::full(local.body));
    *resp.status_mut() = local.status;
    *resp.headers_mut() = local.headers;
    resp
}

/// A route's `fallback`: the operator's static answer for a request that
/// overload protection does not send upstream. Built once per config;
/// marked `x-flashgate-degraded: fallback` and never cached downstream.
#[derive(Debug, Clone)]
pub struct Fallback {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
}

impl Fallback {
    /// From a validated `fallback` table.
    pub fn new(c: &crate::config::FallbackConfig) -> Fallback {
        let mut headers = HeaderMap::new();
        for (name, value) in &c.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(n, v);
            }
        }
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(DEGRADED.clone(), HeaderValue::from_static("fallback"));
        Fallback {
            status: StatusCode::from_u16(c.status).unwrap_or(StatusCode::OK),
            headers,
            body: c.body.clone().into(),
        }
    }

    pub fn answer(&self) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::full(self.body.clone()));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        resp
    }
}

/// Set on answers overload protection gave instead of the upstream's:
/// `stale` (a cached copy) or `fallback` (the route's `fallback`).
pub static DEGRADED: HeaderName = HeaderName::from_static("x-flashgate-degraded");

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> HeaderValue {
        HeaderValue::from_static("req-1")
    }

    #[test]
    fn shape_of_every_answer() {
        let resp = error(ProxyError::NoRoute, &id());
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let h = resp.headers();
        assert_eq!(h["x-flashgate-error"], "no_route");
        assert_eq!(h[CONTENT_TYPE], "application/json");
        assert_eq!(h[CACHE_CONTROL], "no-store");
        assert!(h.get(RETRY_AFTER).is_none());
        assert!(h.get(CONNECTION).is_none());
    }

    #[test]
    fn retry_after_is_the_refusals_own() {
        let resp = error(ProxyError::Overflow, &id());
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
        let resp = refusal(Refusal::new(ProxyError::Overflow).retry_after(7), &id());
        assert_eq!(resp.headers()[RETRY_AFTER], "7");
        let resp = refusal(Refusal::new(ProxyError::SoldOut).retry_after(2), &id());
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
    }

    #[test]
    fn extra_headers_and_connection_close() {
        let r = Refusal::new(ProxyError::Unauthenticated).header(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        let resp = refusal(r, &id());
        assert_eq!(resp.headers()[http::header::WWW_AUTHENTICATE], "Bearer");
        let resp = error(ProxyError::BadBody, &id());
        assert_eq!(resp.headers()[CONNECTION], "close");
    }

    #[test]
    fn filter_answers() {
        let own = filters::LocalResponse::new(StatusCode::FORBIDDEN, "no");
        let resp = local(own, &id());
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert!(resp.headers().get("x-flashgate-error").is_none());
        let refused = filters::LocalResponse::refused(filters::Refusal::FilterFailed);
        let resp = local(refused, &id());
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()["x-flashgate-error"], "filter_failed");
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
    }
}
