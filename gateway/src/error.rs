//! Why the gateway answered instead of the upstream, decided in one place:
//! every synthetic 4xx/5xx is built here, with the same JSON shape, the
//! request id, and `retry-after` on 503.

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;

/// The causes a proxied request can fail with. The short code goes into the
/// JSON body and the `x-flashgate-error` header so an operator can tell a
/// 502 from a refused connect from one from a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("the request path is not acceptable (dot segments above the root or percent-encoded)")]
    BadPath,
    #[error("no route matches this host and path")]
    NoRoute,
    #[error("the request target is longer than the listener's max_uri_bytes")]
    UriTooLong,
    #[error("the request body is larger than the listener's max_body")]
    BodyTooLarge,
    #[error("the request body is malformed (bad chunk framing) or was cut short")]
    BadBody,
    #[error("the request has both Content-Length and Transfer-Encoding")]
    AmbiguousLength,
    #[error("the request body did not start arriving in time")]
    BodyTimeout,
    #[error("the upstream cluster is at its concurrency limit")]
    Overflow,
    #[error("the upstream refused the connection")]
    ConnectRefused,
    #[error("connecting to the upstream failed")]
    ConnectFailed,
    #[error("connecting to the upstream timed out")]
    ConnectTimeout,
    #[error("the upstream did not answer in time")]
    Timeout,
    #[error("the upstream closed or reset the connection before answering")]
    UpstreamReset,
    #[error("the protocol upgrade could not be passed to the upstream")]
    UpgradeFailed,
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::BadPath => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadBody | ProxyError::AmbiguousLength => StatusCode::BAD_REQUEST,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Overflow => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectRefused
            | ProxyError::ConnectFailed
            | ProxyError::UpstreamReset
            | ProxyError::UpgradeFailed => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout | ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            ProxyError::BadPath => "bad_path",
            ProxyError::NoRoute => "no_route",
            ProxyError::UriTooLong => "uri_too_long",
            ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::BadBody => "bad_body",
            ProxyError::AmbiguousLength => "ambiguous_length",
            ProxyError::BodyTimeout => "body_timeout",
            ProxyError::Overflow => "upstream_overflow",
            ProxyError::ConnectRefused => "connect_refused",
            ProxyError::ConnectFailed => "connect_failed",
            ProxyError::ConnectTimeout => "connect_timeout",
            ProxyError::Timeout => "upstream_timeout",
            ProxyError::UpstreamReset => "upstream_reset",
            ProxyError::UpgradeFailed => "upgrade_failed",
        }
    }

    pub fn response(self, request_id: &HeaderValue) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "request_id": request_id.to_str().unwrap_or(""),
        });
        let mut resp = Response::new(ProxyBody::full(body.to_string()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-flashgate-error", HeaderValue::from_static(self.code()));
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // The client's request was not read to its end (or was broken): the
        // connection cannot carry another request.
        if matches!(
            self,
            ProxyError::BodyTooLarge | ProxyError::BadBody | ProxyError::BodyTimeout
        ) {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}
