//! Why the gateway answered instead of the upstream: every cause of a
//! synthetic answer, with its status, its short code and its message.
//! The answer itself is built in one place, [`crate::respond`]; this module
//! only names causes, so any layer (edge, upstream, cache, pipeline) can
//! return one without knowing how answers look.

use http::StatusCode;

/// The causes a request can be answered by the gateway for. The short
/// code goes into the JSON body and the `x-flashgate-error` header so an
/// operator can tell a 502 from a refused connect from one from a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("the request path is not acceptable (dot segments above the root or percent-encoded)")]
    BadPath,
    #[error("the request path holds a percent-encoded slash or backslash (%2F, %5C), which this route refuses")]
    EscapedSlash,
    #[error("the request's Host is missing, repeated, malformed, carries userinfo or disagrees with :authority")]
    BadHost,
    #[error("the request uses a transfer coding other than chunked")]
    UnsupportedCoding,
    #[error("no route matches this host and path")]
    NoRoute,
    #[error("the request target is longer than the listener's max_uri_bytes")]
    UriTooLong,
    #[error("the request's header list is larger than the listener's max_header_bytes")]
    HeadersTooLarge,
    #[error("the request body is larger than the route or listener allows")]
    BodyTooLarge,
    #[error("the request body is malformed (bad chunk framing) or was cut short")]
    BadBody,
    #[error("the request has both Content-Length and Transfer-Encoding")]
    AmbiguousLength,
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("this route needs a valid bearer token")]
    Unauthenticated,
    #[error("sold out")]
    SoldOut,
    #[error("a filter failed and is configured to fail closed")]
    FilterFailed,
    #[error("the response body is larger than a filter may hold")]
    ResponseTooLarge,
    #[error("the upstream's response body broke off")]
    UpstreamBodyFailed,
    #[error("the request body could not be held for the upstream (temp file)")]
    SpoolFailed,
    #[error("the upstream cluster is at its concurrency limit")]
    Overflow,
    #[error("this client holds its share of the cluster's streaming requests")]
    ClientShare,
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
    #[error("the gateway is overloaded and sheds this route's requests for now")]
    Overloaded,
    #[error("no upstream slot became free in time")]
    QueueTimeout,
    #[error("too many requests are waiting for this upstream")]
    QueueFull,
    #[error("the upstream's circuit breaker is open")]
    BreakerOpen,
    #[error("too many requests: a rate limit of this route is spent (see retry-after and the RateLimit fields)")]
    RateLimited,
    #[error(
        "the fleet rate limit cannot be checked (Redis unreachable) and is configured to refuse"
    )]
    RateLimitUnavailable,
    #[error("this client is refused by a bot rule")]
    BotBlocked,
    #[error("too many requests from this client; slow down")]
    BotTarpit,
    #[error("this client must solve the proof-of-work challenge first")]
    ChallengeRequired,
    #[error("the challenge answer is wrong, expired or for another client")]
    ChallengeFailed,
    #[error(
        "the waiting room is full and does not queue (queueing = \"reject\"); try again later"
    )]
    WaitingRoomFull,
    #[error("too many waiting-room tickets are waiting from this network")]
    WaitingRoomPrefixCap,
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::BadPath
            | ProxyError::EscapedSlash
            | ProxyError::BadHost
            | ProxyError::BadBody
            | ProxyError::AmbiguousLength => StatusCode::BAD_REQUEST,
            ProxyError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ProxyError::SoldOut => StatusCode::CONFLICT,
            ProxyError::ClientShare
            | ProxyError::RateLimited
            | ProxyError::BotTarpit
            | ProxyError::WaitingRoomPrefixCap => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BotBlocked
            | ProxyError::ChallengeRequired
            | ProxyError::ChallengeFailed => StatusCode::FORBIDDEN,
            // As Envoy answers a failed Wasm filter (`wasm_fail_stream`).
            ProxyError::FilterFailed
            | ProxyError::Overflow
            | ProxyError::Overloaded
            | ProxyError::QueueTimeout
            | ProxyError::QueueFull
            | ProxyError::BreakerOpen
            | ProxyError::RateLimitUnavailable
            | ProxyError::WaitingRoomFull => StatusCode::SERVICE_UNAVAILABLE,
            // As Envoy answers a response past a buffering filter's limit.
            ProxyError::ResponseTooLarge | ProxyError::SpoolFailed => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ProxyError::ConnectRefused
            | ProxyError::ConnectFailed
            | ProxyError::UpstreamReset
            | ProxyError::UpgradeFailed
            | ProxyError::UpstreamBodyFailed => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout | ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            ProxyError::BadPath => "bad_path",
            ProxyError::EscapedSlash => "escaped_slash",
            ProxyError::BadHost => "bad_host",
            ProxyError::UnsupportedCoding => "unsupported_transfer_coding",
            ProxyError::NoRoute => "no_route",
            ProxyError::UriTooLong => "uri_too_long",
            ProxyError::HeadersTooLarge => "headers_too_large",
            ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::BadBody => "bad_body",
            ProxyError::AmbiguousLength => "ambiguous_length",
            ProxyError::BodyTimeout => "body_timeout",
            ProxyError::Unauthenticated => "unauthenticated",
            ProxyError::SoldOut => "sold_out",
            ProxyError::FilterFailed => "filter_failed",
            ProxyError::ResponseTooLarge => "response_too_large",
            ProxyError::UpstreamBodyFailed => "upstream_body_failed",
            ProxyError::SpoolFailed => "spool_failed",
            ProxyError::Overflow => "upstream_overflow",
            ProxyError::ClientShare => "client_share",
            ProxyError::ConnectRefused => "connect_refused",
            ProxyError::ConnectFailed => "connect_failed",
            ProxyError::ConnectTimeout => "connect_timeout",
            ProxyError::Timeout => "upstream_timeout",
            ProxyError::UpstreamReset => "upstream_reset",
            ProxyError::UpgradeFailed => "upgrade_failed",
            ProxyError::Overloaded => "overloaded",
            ProxyError::QueueTimeout => "queue_timeout",
            ProxyError::QueueFull => "queue_full",
            ProxyError::BreakerOpen => "breaker_open",
            ProxyError::RateLimited => "rate_limited",
            ProxyError::RateLimitUnavailable => "rate_limit_unavailable",
            ProxyError::BotBlocked => "bot_blocked",
            ProxyError::BotTarpit => "bot_tarpit",
            ProxyError::ChallengeRequired => "challenge_required",
            ProxyError::ChallengeFailed => "challenge_failed",
            ProxyError::WaitingRoomFull => "waiting_room_full",
            ProxyError::WaitingRoomPrefixCap => "waiting_room_prefix_cap",
        }
    }

    /// The client's fault (4xx): logged quietly, never counted against an
    /// upstream.
    pub fn is_client(self) -> bool {
        self.status().is_client_error()
    }

    /// Nothing of the request reached the upstream, so another attempt is
    /// safe for any request, body or not.
    pub fn nothing_sent(self) -> bool {
        matches!(
            self,
            ProxyError::ConnectRefused | ProxyError::ConnectFailed | ProxyError::ConnectTimeout
        )
    }

    /// Another endpoint might answer where this one failed: a failed
    /// connect, or a connection closed before any answer. Whether the
    /// request may be sent again is the caller's call (see
    /// [`nothing_sent`](Self::nothing_sent)); a timeout never qualifies,
    /// since the request may still be running upstream.
    pub fn is_retryable(self) -> bool {
        self.nothing_sent() || self == ProxyError::UpstreamReset
    }

    /// The client's request was not read to its end (or was broken): its
    /// connection cannot carry another request.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            ProxyError::BodyTooLarge
                | ProxyError::BadBody
                | ProxyError::BodyTimeout
                | ProxyError::UnsupportedCoding
        )
    }
}

/// A filter's own refusals, in the gateway's terms.
impl From<filters::Refusal> for ProxyError {
    fn from(r: filters::Refusal) -> ProxyError {
        match r {
            filters::Refusal::RequestBodyTooLarge => ProxyError::BodyTooLarge,
            filters::Refusal::RequestBodyBroken => ProxyError::BadBody,
            filters::Refusal::ResponseBodyTooLarge => ProxyError::ResponseTooLarge,
            filters::Refusal::UpstreamBodyBroken => ProxyError::UpstreamBodyFailed,
            filters::Refusal::FilterFailed => ProxyError::FilterFailed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert!(ProxyError::BadPath.is_client());
        assert!(!ProxyError::Overflow.is_client());
        assert!(ProxyError::ConnectRefused.is_retryable());
        assert!(ProxyError::UpstreamReset.is_retryable());
        assert!(!ProxyError::UpstreamReset.nothing_sent());
        assert!(!ProxyError::Timeout.is_retryable());
        assert!(ProxyError::BadBody.closes_connection());
        assert!(!ProxyError::NoRoute.closes_connection());
    }

    #[test]
    fn filter_refusals_keep_their_status() {
        for r in [
            filters::Refusal::RequestBodyTooLarge,
            filters::Refusal::RequestBodyBroken,
            filters::Refusal::ResponseBodyTooLarge,
            filters::Refusal::UpstreamBodyBroken,
            filters::Refusal::FilterFailed,
        ] {
            assert_eq!(ProxyError::from(r).status(), r.status(), "{r:?}");
        }
    }
}
