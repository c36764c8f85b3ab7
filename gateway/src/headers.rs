//! Header rules every proxied request and response follows: hop-by-hop
//! removal (RFC 9110 section 7.6.1), forwarding headers, request ids and W3C
//! trace context.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rand::RngCore;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// The client address the gateway resolved (see `client_ip`), set on every
/// upstream request and replacing any the client sent.
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers that are never forwarded, whether or not `Connection`
/// names them. `Proxy-Authenticate`/`Proxy-Authorization` are addressed to
/// this proxy, not to the origin.
fn fixed_hop_headers() -> [&'static HeaderName; 9] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ]
}

/// End-to-end headers a `Connection` header can never make hop-by-hop:
/// the request's `Host` (the origin's and the cache key's idea of the site
/// must stay the one we routed on: naming it let a client get an answer
/// for the endpoint's address cached under the shop's URL) and the
/// gateway's own headers, which it sets for the origin.
fn never_hop_by_hop(name: &HeaderName) -> bool {
    [
        &header::HOST,
        &X_REQUEST_ID,
        &TRACEPARENT,
        &X_FORWARDED_FOR,
        &X_FORWARDED_PROTO,
        &header::FORWARDED,
        &X_REAL_IP,
    ]
    .contains(&name)
}

/// Removes hop-by-hop headers, including every header the `Connection`
/// headers list (a client must not be able to smuggle `x-internal` past the
/// proxy by naming it there), except those that are never hop-by-hop
/// ([`never_hop_by_hop`]).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names (compared,
    // not hashed) is far cheaper than nine lookups, on every request and
    // every response.
    let fixed = fixed_hop_headers();
    if !headers.keys().any(|k| fixed.contains(&k)) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|name| !never_hop_by_hop(name))
            .collect();
        for name in listed {
            headers.remove(&name);
        }
    }
    for name in fixed {
        headers.remove(name);
    }
}

/// An IP address as text, written without `core::fmt` for IPv4: its
/// `Display` costs over a thousand instructions per address, and every
/// proxied request writes the client's address three times.
pub struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    pub fn new(ip: IpAddr) -> IpText {
        let mut t = IpText {
            buf: [0; 45],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        t.push(b'.');
                    }
                    if octet >= 100 {
                        t.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        t.push(b'0' + octet / 10 % 10);
                    }
                    t.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(v6) => {
                use std::io::Write;
                // 45 bytes hold the longest IPv6 text.
                let mut out = std::io::Cursor::new(&mut t.buf[..]);
                let _ = write!(out, "{v6}");
                t.len = out.position() as usize;
            }
        }
        t
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }

    /// The address as a header value.
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.buf[..self.len])
            .expect("an IP address is a valid header value")
    }
}

/// `prev, next` as a header value (or `next` alone after an empty `prev`).
fn appended(prev: Option<&HeaderValue>, next: &str) -> Option<HeaderValue> {
    match prev.and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            let mut s = String::with_capacity(prev.len() + 2 + next.len());
            s.push_str(prev);
            s.push_str(", ");
            s.push_str(next);
            HeaderValue::try_from(s).ok()
        }
        _ => HeaderValue::from_str(next).ok(),
    }
}

/// Sets `x-forwarded-for` (appending the client), `x-forwarded-proto` and
/// an RFC 7239 `forwarded` element for the hop from the client to us.
pub fn set_forwarded(headers: &mut HeaderMap, client: IpAddr, proto: &'static str, host: &str) {
    let ip = IpText::new(client);
    let ip = ip.as_str();
    if let Some(v) = appended(headers.get(&X_FORWARDED_FOR), ip) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));

    let mut element = String::with_capacity(32 + ip.len() + host.len());
    element.push_str("for=");
    match client {
        IpAddr::V4(_) => element.push_str(ip),
        IpAddr::V6(_) => {
            element.push_str("\"[");
            element.push_str(ip);
            element.push_str("]\"");
        }
    }
    element.push_str(";proto=");
    element.push_str(proto);
    if !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    {
        element.push_str(";host=");
        element.push_str(host);
    }
    if let Some(v) = appended(headers.get(header::FORWARDED), &element) {
        headers.insert(header::FORWARDED, v);
    }
}

/// Keeps a client's `x-request-id` when it is sane (1-128 visible ASCII
/// characters), otherwise generates one. Returns the id in use.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    let mut text = [0u8; 32];
    hex_into(&id, &mut text);
    let v = HeaderValue::from_bytes(&text).expect("hex is a valid header value");
    headers.insert(X_REQUEST_ID.clone(), v.clone());
    v
}

/// Continues the client's W3C trace (same trace id and flags, a new parent
/// id for our hop, as a participating intermediary must) or starts a new
/// sampled one when there is none or it is malformed.
pub fn continue_trace(headers: &mut HeaderMap) {
    TraceContext::continue_or_start(headers).write(headers);
}

/// A valid version-00 `traceparent` a client sent: the remote parent of
/// this hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteParent {
    pub trace_id: [u8; 16],
    /// The client's span (W3C `parent-id`).
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl RemoteParent {
    /// The client's `traceparent`, when it is a valid version-00 header.
    pub fn from_headers(headers: &HeaderMap) -> Option<RemoteParent> {
        let (trace, parent, flags) = parse_traceparent(headers.get(&TRACEPARENT)?.as_bytes())?;
        let mut p = RemoteParent {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 0,
        };
        let mut f = [0u8; 1];
        (unhex_into(trace, &mut p.trace_id)
            && unhex_into(parent, &mut p.span_id)
            && unhex_into(flags, &mut f))
        .then(|| RemoteParent { flags: f[0], ..p })
    }
}

/// This hop's W3C trace context: the trace it belongs to, the span id of
/// the gateway's hop (the `parent-id` the upstream gets, and the id of the
/// exported span when `[tracing]` is on) and the flags. Written to the
/// upstream request as `traceparent` by [`TraceContext::write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// Without an exporter: the client's trace and flags with a new random
    /// span id, or a new sampled trace (`-01`).
    pub fn continue_or_start(headers: &HeaderMap) -> TraceContext {
        let mut rng = rand::thread_rng();
        let mut ctx = TraceContext {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 1,
        };
        rng.fill_bytes(&mut ctx.span_id);
        match RemoteParent::from_headers(headers) {
            Some(p) => {
                ctx.trace_id = p.trace_id;
                ctx.flags = p.flags;
            }
            None => rng.fill_bytes(&mut ctx.trace_id),
        }
        ctx
    }

    /// Sets `traceparent` (`00-<trace id>-<span id>-<flags>`), replacing
    /// any the request had. Built on the stack: this runs for every request.
    pub fn write(&self, headers: &mut HeaderMap) {
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex_into(&self.trace_id, &mut out[3..35]);
        hex_into(&self.span_id, &mut out[36..52]);
        hex_into(&[self.flags], &mut out[53..55]);
        if let Ok(v) = HeaderValue::from_bytes(&out) {
            headers.insert(TRACEPARENT.clone(), v);
        }
    }
}

/// Returns (trace id, parent id, flags) of a valid version-00 traceparent.
fn parse_traceparent(v: &[u8]) -> Option<(&str, &str, &str)> {
    let s = std::str::from_utf8(v).ok()?;
    let mut parts = s.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = parts.next().is_none()
        && version == "00"
        && lower_hex(trace, 32)
        && lower_hex(parent, 16)
        && lower_hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    ok.then_some((trace, parent, flags))
}

/// Bytes from lower-case hex (`hex` twice as long as `out`); false on a
/// character that is not a hex digit.
fn unhex_into(hex: &str, out: &mut [u8]) -> bool {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if hex.len() != out.len() * 2 {
        return false;
    }
    for (pair, o) in hex.as_bytes().chunks_exact(2).zip(out.iter_mut()) {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => *o = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[(b >> 4) as usize];
        pair[1] = DIGITS[(b & 15) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("proxy-authorization", "Basic x".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn connection_cannot_name_host_or_the_gateways_headers() {
        let mut h = HeaderMap::new();
        h.append("connection", "host, x-request-id".parse().unwrap());
        h.append("connection", "traceparent, x-other".parse().unwrap());
        h.insert("host", "shop.example".parse().unwrap());
        h.insert("x-request-id", "abc".parse().unwrap());
        h.insert("traceparent", "00-x".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h["host"], "shop.example");
        assert_eq!(h["x-request-id"], "abc");
        assert_eq!(h["traceparent"], "00-x");
        // Every `Connection` header counts, not only the first.
        assert!(h.get("x-other").is_none(), "{h:?}");
        assert!(h.get("connection").is_none());
    }

    #[test]
    fn forwarded_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        set_forwarded(&mut h, "10.0.0.1".parse().unwrap(), "http", "shop.com");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["forwarded"], "for=10.0.0.1;proto=http;host=shop.com");
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, "::1".parse().unwrap(), "https", "bad host\"");
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=https");
    }

    #[test]
    fn ip_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "127.0.0.1",
            "192.168.100.255",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::new(ip).as_str(), ip.to_string());
            assert_eq!(IpText::new(ip).header_value(), ip.to_string().as_str());
        }
    }

    #[test]
    fn no_hop_by_hop_headers_leaves_the_map_alone() {
        let mut h = HeaderMap::new();
        h.insert("host", "shop.example".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        // One hop-by-hop header is enough for the full rules.
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
    }

    #[test]
    fn request_id_kept_or_made() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(ensure_request_id(&mut h), "abc-123");
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "has space".parse().unwrap());
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(h["x-request-id"], id);
    }

    #[test]
    fn trace_context_round_trips() {
        let ctx = TraceContext {
            trace_id: [0xab; 16],
            span_id: [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef],
            flags: 0,
        };
        let mut h = HeaderMap::new();
        ctx.write(&mut h);
        assert_eq!(
            h["traceparent"],
            "00-abababababababababababababababab-0123456789abcdef-00"
        );
        let p = RemoteParent::from_headers(&h).unwrap();
        assert_eq!(
            (p.trace_id, p.span_id, p.flags),
            (ctx.trace_id, ctx.span_id, 0)
        );
    }

    #[test]
    fn traceparent_continued_or_started() {
        let mut h = HeaderMap::new();
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", incoming.parse().unwrap());
        continue_trace(&mut h);
        let out = h["traceparent"].to_str().unwrap().to_string();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert_ne!(out, incoming);
        assert!(parse_traceparent(out.as_bytes()).is_some());
        let parent = RemoteParent::from_headers(&h).unwrap();
        assert_eq!(parent.trace_id[..2], [0x4b, 0xf9]);
        assert_eq!(parent.flags, 1);

        // Flags are kept as they came (not sampled stays not sampled).
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                .parse()
                .unwrap(),
        );
        continue_trace(&mut h);
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));

        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", bad.parse().unwrap());
            continue_trace(&mut h);
            let out = h["traceparent"].to_str().unwrap();
            assert!(parse_traceparent(out.as_bytes()).is_some());
            assert!(!out.contains("4bf92f"));
            assert!(out.ends_with("-01"), "a new trace is sampled: {out}");
        }
    }
}
