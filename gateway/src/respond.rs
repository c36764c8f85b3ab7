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
    /// The whole answer built beforehand ([`Canned`]): the fields above
    /// are then only what it was built from.
    pub canned: Option<std::sync::Arc<Canned>>,
}

impl Refusal {
    pub fn new(error: ProxyError) -> Refusal {
        Refusal {
            error,
            retry_after: None,
            headers: HeaderMap::new(),
            details: None,
            page: None,
            canned: None,
        }
    }

    /// A refusal answered with `canned` as it was built.
    pub fn canned(canned: std::sync::Arc<Canned>) -> Refusal {
        Refusal {
            canned: Some(canned.clone()),
            ..Refusal::new(canned.error)
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
    if let Some(c) = &refusal.canned {
        return c.answer(request_id);
    }
    let (status, headers, body) = shape(refusal, request_id);
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// The status, header fields and body of the answer for `refusal`.
fn shape(refusal: Refusal, request_id: &HeaderValue) -> (StatusCode, HeaderMap, bytes::Bytes) {
    let Refusal {
        error,
        retry_after,
        headers,
        details,
        page,
        canned: _,
    } = refusal;
    let (body, content_type) = match page {
        Some(html) => (html, HeaderValue::from_static("text/html; charset=utf-8")),
        None => {
            let message = error.to_string();
            let request_id = request_id.to_str().unwrap_or("");
            // Serialized from borrowed fields, not a `json!` map; refusals
            // a flood causes are canned ([`Canned`]). Only the few with
            // details (a challenge) build a map.
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
            (body.into(), HeaderValue::from_static("application/json"))
        }
    };
    let mut h = HeaderMap::with_capacity(7 + headers.len());
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
    (error.status(), h, body)
}

/// A refusal built once and answered many times (a rate limit's 429 for
/// each `retry-after` second): the answer [`refusal`] makes, kept as its
/// status, its header fields (with a place for `x-request-id`, so setting
/// it later does not grow the map) and its JSON body split around the
/// request id. An answer then costs a header-map clone and one copy of
/// the body, no JSON formatting and no header value built: a flood's 429s
/// must cost no more than cache hits (bench/rate-limits).
#[derive(Debug)]
pub struct Canned {
    pub error: ProxyError,
    status: StatusCode,
    headers: HeaderMap,
    /// The JSON body up to the request id's first character.
    head: bytes::Bytes,
    /// The JSON body after the request id's last character.
    tail: bytes::Bytes,
}

/// Stands for the request id while a [`Canned`] answer is built: visible
/// ASCII that needs no JSON escaping and appears nowhere else.
const ID_MARK: &str = "@@flashgate-request-id@@";

impl Canned {
    /// Builds the answer for `r` once (no details, no page: those answers
    /// are not canned).
    pub fn new(r: Refusal) -> Canned {
        let error = r.error;
        let (status, mut headers, body) = shape(r, &HeaderValue::from_static(ID_MARK));
        let (head, tail) = match memchr::memmem::find(&body, ID_MARK.as_bytes()) {
            Some(at) => (body.slice(..at), body.slice(at + ID_MARK.len()..)),
            None => (body, bytes::Bytes::new()),
        };
        headers.insert(
            crate::headers::X_REQUEST_ID.clone(),
            HeaderValue::from_static(ID_MARK),
        );
        Canned {
            error,
            status,
            headers,
            head,
            tail,
        }
    }

    /// The answer, carrying `request_id` in its body and header.
    pub fn answer(&self, request_id: &HeaderValue) -> Response<ProxyBody> {
        let id = request_id.as_bytes();
        let mut body = Vec::with_capacity(self.head.len() + id.len() + self.tail.len() + 8);
        body.extend_from_slice(&self.head);
        if id.iter().any(|&c| c == b'"' || c == b'\\' || c < 0x20) {
            // Rare (ids are the client's own when sane): escape as JSON,
            // without the quotes the template has.
            let quoted =
                serde_json::to_string(request_id.to_str().unwrap_or("")).unwrap_or_default();
            let inner = quoted.as_bytes().get(1..quoted.len().saturating_sub(1));
            body.extend_from_slice(inner.unwrap_or_default());
        } else {
            body.extend_from_slice(id);
        }
        body.extend_from_slice(&self.tail);
        let mut resp = Response::new(ProxyBody::full(body));
        *resp.status_mut() = self.status;
        let mut headers = self.headers.clone();
        headers.insert(crate::headers::X_REQUEST_ID.clone(), request_id.clone());
        *resp.headers_mut() = headers;
        resp
    }
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

    #[tokio::test]
    async fn a_canned_answer_is_the_answer_refusal_makes() {
        use http_body_util::BodyExt;
        let make = || {
            Refusal::new(ProxyError::RateLimited).retry_after(3).header(
                HeaderName::from_static("ratelimit"),
                HeaderValue::from_static("\"route\";r=0;t=3"),
            )
        };
        let canned = std::sync::Arc::new(Canned::new(make()));
        for id in ["req-1", "we\"ird\\id"] {
            let id = HeaderValue::from_str(id).unwrap();
            let fresh = refusal(make(), &id);
            let again = refusal(Refusal::canned(canned.clone()), &id);
            assert_eq!(fresh.status(), again.status());
            let mut with_id = fresh.headers().clone();
            with_id.insert(crate::headers::X_REQUEST_ID.clone(), id.clone());
            assert_eq!(&with_id, again.headers());
            let a = fresh.into_body().collect().await.unwrap().to_bytes();
            let b = again.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(a, b);
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["request_id"], id.to_str().unwrap());
            assert_eq!(v["error"], "rate_limited");
        }
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
