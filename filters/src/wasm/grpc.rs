//! Unary gRPC callouts (`proxy_grpc_call`): the request a guest's call
//! becomes, and what its answer means to the guest.
//!
//! A call is an HTTP/2 POST of `/<service>/<method>` to the cluster, with
//! `content-type: application/grpc`, `te: trailers`, `grpc-timeout` and
//! the message in one length-prefixed frame; the gateway carries it over
//! HTTP/2 (prior knowledge). As in Envoy, an answer with `grpc-status` 0
//! reaches the guest through `proxy_on_grpc_receive` (the message in the
//! `GrpcReceiveBuffer`), any other outcome through `proxy_on_grpc_close`
//! with the status, whose message `proxy_get_status` reads.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::callout::{CalloutError, CalloutRequest, CalloutResponse};

/// gRPC status codes the host produces itself.
pub(crate) mod code {
    pub const OK: u32 = 0;
    pub const UNKNOWN: u32 = 2;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
    pub const PERMISSION_DENIED: u32 = 7;
}

/// What a finished call means to the guest.
#[derive(Debug, Clone)]
pub(crate) struct GrpcAnswer {
    /// The gRPC status (0 = OK).
    pub status: u32,
    /// `grpc-message` (or why the call failed).
    pub message: String,
    /// The response message, without its frame header (OK only).
    pub body: Bytes,
}

/// The HTTP/2 request for a unary call.
pub(crate) fn request(
    cluster: String,
    service: &str,
    method: &str,
    mut metadata: HeaderMap,
    message: &[u8],
    timeout_ms: u32,
) -> CalloutRequest {
    metadata.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    metadata.insert(http::header::TE, HeaderValue::from_static("trailers"));
    // At most 8 digits in gRPC's timeout format: milliseconds fit.
    let timeout = HeaderValue::from_str(&format!("{}m", timeout_ms.max(1)))
        .unwrap_or(HeaderValue::from_static("1000m"));
    metadata.insert("grpc-timeout", timeout);
    let mut body = BytesMut::with_capacity(5 + message.len());
    body.put_u8(0); // not compressed
    body.put_u32(message.len() as u32);
    body.put_slice(message);
    CalloutRequest {
        cluster,
        method: Method::POST,
        path: format!("/{service}/{method}"),
        headers: metadata,
        body: body.freeze(),
        grpc: true,
    }
}

/// The guest's view of a call's outcome.
pub(crate) fn answer(result: &Result<CalloutResponse, CalloutError>) -> GrpcAnswer {
    let fail = |status, message: String| GrpcAnswer {
        status,
        message,
        body: Bytes::new(),
    };
    let r = match result {
        Ok(r) => r,
        Err(CalloutError::Timeout) => {
            return fail(code::DEADLINE_EXCEEDED, "deadline exceeded".into())
        }
        Err(e) => return fail(code::UNAVAILABLE, e.to_string()),
    };
    // Trailers-only answers carry the status in the headers.
    let field = |name: &str| r.trailers.get(name).or_else(|| r.headers.get(name));
    let status = field("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    let message = field("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    let status = match status {
        Some(s) => s,
        // No gRPC status: the HTTP status decides (gRPC's mapping).
        None if r.status != StatusCode::OK => {
            let s = http_to_grpc(r.status);
            return fail(s, format!("HTTP status {}", r.status.as_u16()));
        }
        None => return fail(code::INTERNAL, "answer without grpc-status".into()),
    };
    if status != code::OK {
        return fail(status, message);
    }
    match unframe(&r.body) {
        Some(body) => GrpcAnswer {
            status,
            message,
            body,
        },
        None => fail(
            code::INTERNAL,
            "malformed or compressed response message".into(),
        ),
    }
}

/// The message of a unary answer: one uncompressed length-prefixed frame
/// (or none: an empty message).
fn unframe(body: &Bytes) -> Option<Bytes> {
    if body.is_empty() {
        return Some(Bytes::new());
    }
    let (&flag, rest) = body.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    if flag != 0 || rest.len() < 4 + len {
        return None;
    }
    Some(body.slice(5..5 + len))
}

/// gRPC's mapping of HTTP statuses without `grpc-status`.
fn http_to_grpc(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => code::INTERNAL,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 => code::UNIMPLEMENTED,
        429 | 502..=504 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

/// `grpc-message` is percent-encoded.
fn percent_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_with(
        status: StatusCode,
        headers: &[(&str, &str)],
        trailers: &[(&str, &str)],
        body: &[u8],
    ) -> GrpcAnswer {
        let map = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        answer(&Ok(CalloutResponse {
            status,
            headers: map(headers),
            body: Bytes::copy_from_slice(body),
            trailers: map(trailers),
        }))
    }

    #[test]
    fn a_request_is_one_framed_message() {
        let r = request("c".into(), "pkg.Svc", "Do", HeaderMap::new(), b"hi", 1500);
        assert_eq!(r.path, "/pkg.Svc/Do");
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.headers["content-type"], "application/grpc");
        assert_eq!(r.headers["te"], "trailers");
        assert_eq!(r.headers["grpc-timeout"], "1500m");
        assert_eq!(&r.body[..], &[0, 0, 0, 0, 2, b'h', b'i']);
        assert!(r.grpc);
    }

    #[test]
    fn answers_map_to_statuses() {
        let ok = answer_with(
            StatusCode::OK,
            &[],
            &[("grpc-status", "0")],
            &[0, 0, 0, 0, 1, 7],
        );
        assert_eq!((ok.status, &ok.body[..]), (0, &[7u8][..]));
        let err = answer_with(
            StatusCode::OK,
            &[("grpc-status", "3"), ("grpc-message", "bad%20arg")],
            &[],
            &[],
        );
        assert_eq!((err.status, err.message.as_str()), (3, "bad arg"));
        assert_eq!(
            answer_with(StatusCode::SERVICE_UNAVAILABLE, &[], &[], &[]).status,
            code::UNAVAILABLE
        );
        assert_eq!(
            answer(&Err(CalloutError::Timeout)).status,
            code::DEADLINE_EXCEEDED
        );
        assert_eq!(
            answer(&Err(CalloutError::Failed("x".into()))).status,
            code::UNAVAILABLE
        );
        let compressed = answer_with(
            StatusCode::OK,
            &[],
            &[("grpc-status", "0")],
            &[1, 0, 0, 0, 0],
        );
        assert_eq!(compressed.status, code::INTERNAL);
        assert_eq!(percent_decode(b"100%"), "100%");
    }
}
