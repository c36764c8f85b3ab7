//! What the cache stores: a whole response (status, headers, body) with
//! the times that decide whether it is fresh, stale or dead, and the
//! compact binary form it has in Redis.
//!
//! The codec is hand-written rather than serde + a format crate: the layout
//! is ten fields, it must never panic on bytes someone else wrote into
//! Redis (a decoding error is a miss), and it stays readable here:
//!
//! ```text
//! "FGC1" kind:u8
//! kind 1 (response): status:u16 stored_at_ms:u64 ttl_ms:u64 swr_ms:u64
//!   sie_ms:u64 fill_ms:u32 nvary:u16 {name value?}* nheaders:u16
//!   {name value}* body:rest
//! kind 2 (vary): expires_at_ms:u64 nnames:u16 {name}*
//! name = len:u16 bytes; value = len:u32 bytes; value? = 0 | 1 value
//! ```

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 4] = b"FGC1";

/// Milliseconds since the Unix epoch. Freshness is wall-clock time, because
/// gateways share entries through Redis (their clocks must agree, as NTP
/// keeps them).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// As served: the origin's headers less hop-by-hop ones, with
    /// `content-length` set to the stored body's (the origin's `age`, kept,
    /// is the entry's age when stored; see [`Entry::served_age`]).
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stored_at_ms: u64,
    /// Fresh lifetime, jitter applied.
    pub ttl_ms: u64,
    pub swr_ms: u64,
    pub sie_ms: u64,
    /// How long the fill took, XFetch's delta.
    pub fill_ms: u32,
    /// The request's values of the headers the origin's `Vary` named, for
    /// checking that a waiter of a fill wants the same variant.
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
}

/// Where an entry is in its life at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Expired; may be served while revalidating and/or on error.
    Stale {
        revalidate: bool,
        on_error: bool,
    },
    /// Past every window: useless.
    Dead,
}

impl Entry {
    pub fn expires_ms(&self) -> u64 {
        self.stored_at_ms.saturating_add(self.ttl_ms)
    }

    /// How long after `stored_at` the entry is of any use (Redis `PX`).
    pub fn lifetime_ms(&self) -> u64 {
        self.ttl_ms.saturating_add(self.swr_ms.max(self.sie_ms))
    }

    pub fn freshness(&self, now: u64) -> Freshness {
        let expires = self.expires_ms();
        if now < expires {
            return Freshness::Fresh;
        }
        let past = now - expires;
        let revalidate = past < self.swr_ms;
        let on_error = past < self.sie_ms;
        if revalidate || on_error {
            Freshness::Stale {
                revalidate,
                on_error,
            }
        } else {
            Freshness::Dead
        }
    }

    /// Whether a request with `headers` wants the variant this entry is.
    pub fn matches_variant(&self, headers: &HeaderMap) -> bool {
        self.vary.iter().all(|(name, value)| {
            let mut got = headers.get_all(name).iter();
            match (value, got.next()) {
                (None, None) => true,
                (Some(want), Some(first)) => {
                    // Repeated request headers are compared joined, as the
                    // key joins them.
                    let mut joined = first.as_bytes().to_vec();
                    for v in got {
                        joined.push(b',');
                        joined.extend_from_slice(v.as_bytes());
                    }
                    joined == want.as_bytes()
                }
                _ => false,
            }
        })
    }

    /// Bytes this entry costs in L1 (an estimate with a fixed overhead).
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + headers + 128
    }

    pub fn age_secs(&self, now: u64) -> u64 {
        now.saturating_sub(self.stored_at_ms) / 1000
    }

    /// The `age` to serve: the origin's own (it may sit behind another
    /// cache) plus the time since we stored it (RFC 9111 4.2.3).
    pub fn served_age(&self, now: u64) -> u64 {
        origin_age(&self.headers).saturating_add(self.age_secs(now))
    }
}

/// The origin's response headers as the cache keeps them.
pub fn stored_headers(mut headers: HeaderMap, body_len: usize) -> HeaderMap {
    headers.remove("x-cache");
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    headers
}

/// An answer's `age` in seconds; 0 when absent or not a number.
pub fn origin_age(headers: &HeaderMap) -> u64 {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What a key holds.
#[derive(Debug, Clone)]
pub enum Record {
    Response(Arc<Entry>),
    /// The origin answers this key with variants: look up the variant key
    /// made of these request headers.
    Vary(Arc<VaryRecord>),
}

#[derive(Debug)]
pub struct VaryRecord {
    pub names: Vec<HeaderName>,
    pub expires_at_ms: u64,
}

impl Record {
    pub fn weight(&self) -> usize {
        match self {
            Record::Response(e) => e.weight(),
            Record::Vary(v) => 64 + v.names.iter().map(|n| n.as_str().len()).sum::<usize>(),
        }
    }

    /// Past every window at `now`.
    pub fn is_dead(&self, now: u64) -> bool {
        match self {
            Record::Response(e) => e.freshness(now) == Freshness::Dead,
            Record::Vary(v) => now >= v.expires_at_ms,
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_slice(MAGIC);
        match self {
            Record::Response(e) => {
                out.reserve(e.body.len() + 256);
                out.put_u8(1);
                out.put_u16_le(e.status.as_u16());
                out.put_u64_le(e.stored_at_ms);
                out.put_u64_le(e.ttl_ms);
                out.put_u64_le(e.swr_ms);
                out.put_u64_le(e.sie_ms);
                out.put_u32_le(e.fill_ms);
                out.put_u16_le(e.vary.len() as u16);
                for (name, value) in &e.vary {
                    put_name(&mut out, name.as_str().as_bytes());
                    match value {
                        None => out.put_u8(0),
                        Some(v) => {
                            out.put_u8(1);
                            put_value(&mut out, v.as_bytes());
                        }
                    }
                }
                out.put_u16_le(e.headers.len().min(u16::MAX as usize) as u16);
                for (name, value) in e.headers.iter().take(u16::MAX as usize) {
                    put_name(&mut out, name.as_str().as_bytes());
                    put_value(&mut out, value.as_bytes());
                }
                out.put_slice(&e.body);
            }
            Record::Vary(v) => {
                out.put_u8(2);
                out.put_u64_le(v.expires_at_ms);
                out.put_u16_le(v.names.len() as u16);
                for n in &v.names {
                    put_name(&mut out, n.as_str().as_bytes());
                }
            }
        }
        out.freeze()
    }

    /// `None` for anything that is not a record this version wrote.
    pub fn decode(mut data: Bytes) -> Option<Record> {
        let mut r = Reader(&mut data);
        if r.take(4)? != MAGIC[..] {
            return None;
        }
        match r.u8()? {
            1 => {
                let status = StatusCode::from_u16(r.u16()?).ok()?;
                let stored_at_ms = r.u64()?;
                let ttl_ms = r.u64()?;
                let swr_ms = r.u64()?;
                let sie_ms = r.u64()?;
                let fill_ms = r.u32()?;
                let nvary = r.u16()?;
                // Counts come from bytes someone else may have written:
                // room only for what the bytes left could hold (a vary
                // entry takes 3 bytes at least, a header 6).
                let mut vary = Vec::with_capacity((nvary as usize).min(r.0.len() / 3));
                for _ in 0..nvary {
                    let name = HeaderName::from_bytes(&r.name()?).ok()?;
                    let value = match r.u8()? {
                        0 => None,
                        1 => Some(HeaderValue::from_maybe_shared(r.value()?).ok()?),
                        _ => return None,
                    };
                    vary.push((name, value));
                }
                let nheaders = r.u16()?;
                // `with_capacity` and `append` panic past the map's largest
                // size (32,768 entries), which a u16 count can ask for.
                let mut headers =
                    HeaderMap::try_with_capacity((nheaders as usize).min(r.0.len() / 6)).ok()?;
                for _ in 0..nheaders {
                    let name = HeaderName::from_bytes(&r.name()?).ok()?;
                    let value = HeaderValue::from_maybe_shared(r.value()?).ok()?;
                    headers.try_append(name, value).ok()?;
                }
                let body = std::mem::take(r.0);
                Some(Record::Response(Arc::new(Entry {
                    status,
                    headers,
                    body,
                    stored_at_ms,
                    ttl_ms,
                    swr_ms,
                    sie_ms,
                    fill_ms,
                    vary,
                })))
            }
            2 => {
                let expires_at_ms = r.u64()?;
                let n = r.u16()?;
                let mut names = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    names.push(HeaderName::from_bytes(&r.name()?).ok()?);
                }
                Some(Record::Vary(Arc::new(VaryRecord {
                    names,
                    expires_at_ms,
                })))
            }
            _ => None,
        }
    }
}

fn put_name(out: &mut BytesMut, b: &[u8]) {
    out.put_u16_le(b.len() as u16);
    out.put_slice(b);
}

fn put_value(out: &mut BytesMut, b: &[u8]) {
    out.put_u32_le(b.len() as u32);
    out.put_slice(b);
}

/// Checked reads: running out of bytes is `None`, never a panic.
struct Reader<'a>(&'a mut Bytes);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<Bytes> {
        (self.0.len() >= n).then(|| self.0.split_to(n))
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?[..].try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?[..].try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?[..].try_into().ok()?))
    }
    fn name(&mut self) -> Option<Bytes> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn value(&mut self) -> Option<Bytes> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// A duration in whole milliseconds, as entries keep them.
pub fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/html"));
        headers.append("link", HeaderValue::from_static("</a.css>"));
        headers.append("link", HeaderValue::from_static("</b.js>"));
        headers.insert("x-bin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        Entry {
            status: StatusCode::NOT_FOUND,
            headers: stored_headers(headers, 5),
            body: Bytes::from_static(b"hello"),
            stored_at_ms: 1_700_000_000_000,
            ttl_ms: 30_000,
            swr_ms: 5_000,
            sie_ms: 60_000,
            fill_ms: 200,
            vary: vec![
                (
                    HeaderName::from_static("accept-encoding"),
                    Some(HeaderValue::from_static("gzip")),
                ),
                (HeaderName::from_static("x-absent"), None),
            ],
        }
    }

    #[test]
    fn response_roundtrip() {
        let e = entry();
        let bytes = Record::Response(Arc::new(entry())).encode();
        let Some(Record::Response(d)) = Record::decode(bytes) else {
            panic!("decodes")
        };
        assert_eq!(d.status, e.status);
        assert_eq!(d.headers, e.headers);
        assert_eq!(d.headers.get_all("link").iter().count(), 2);
        assert_eq!(d.body, e.body);
        assert_eq!(
            (d.stored_at_ms, d.ttl_ms, d.swr_ms, d.sie_ms, d.fill_ms),
            (e.stored_at_ms, e.ttl_ms, e.swr_ms, e.sie_ms, e.fill_ms)
        );
        assert_eq!(d.vary, e.vary);
        assert_eq!(d.headers["content-length"], "5");
    }

    #[test]
    fn vary_roundtrip() {
        let v = Record::Vary(Arc::new(VaryRecord {
            names: vec![HeaderName::from_static("accept-encoding")],
            expires_at_ms: 42,
        }));
        let Some(Record::Vary(d)) = Record::decode(v.encode()) else {
            panic!("decodes")
        };
        assert_eq!(d.expires_at_ms, 42);
        assert_eq!(d.names, vec![HeaderName::from_static("accept-encoding")]);
    }

    #[test]
    fn garbage_and_truncation_never_panic() {
        assert!(Record::decode(Bytes::from_static(b"")).is_none());
        assert!(Record::decode(Bytes::from_static(b"nope, not a record")).is_none());
        let full = Record::Response(Arc::new(entry())).encode();
        // Every truncation before the body is an error, none panics.
        let body_start = full.len() - 5;
        for n in 0..body_start {
            assert!(Record::decode(full.slice(..n)).is_none(), "prefix {n}");
        }
        let mut flipped = full.to_vec();
        flipped[4] = 9;
        assert!(Record::decode(Bytes::from(flipped)).is_none());
    }

    #[test]
    fn freshness_windows() {
        let e = entry();
        let t = e.stored_at_ms;
        assert_eq!(e.freshness(t), Freshness::Fresh);
        assert_eq!(e.freshness(t + 29_999), Freshness::Fresh);
        assert_eq!(
            e.freshness(t + 30_000),
            Freshness::Stale {
                revalidate: true,
                on_error: true
            }
        );
        assert_eq!(
            e.freshness(t + 36_000),
            Freshness::Stale {
                revalidate: false,
                on_error: true
            }
        );
        assert_eq!(e.freshness(t + 90_000), Freshness::Dead);
        assert_eq!(e.lifetime_ms(), 90_000);
    }

    #[test]
    fn variant_matching() {
        let e = entry();
        let mut h = HeaderMap::new();
        h.insert("accept-encoding", HeaderValue::from_static("gzip"));
        assert!(e.matches_variant(&h));
        h.insert("x-absent", HeaderValue::from_static("1"));
        assert!(!e.matches_variant(&h));
        h.remove("x-absent");
        h.insert("accept-encoding", HeaderValue::from_static("br"));
        assert!(!e.matches_variant(&h));
    }

    /// Found by fuzzing (fuzz/fuzz_targets/cache_entry.rs): a header
    /// count above what a `HeaderMap` can hold panicked in
    /// `with_capacity` (and in `append` past 32,768 names); such bytes
    /// are a miss, not a crash.
    #[test]
    fn header_counts_past_the_map_limit_decode_to_none() {
        let head = |nheaders: u16| {
            let mut b = BytesMut::new();
            b.put_slice(MAGIC);
            b.put_u8(1);
            b.put_u16_le(200);
            for _ in 0..4 {
                b.put_u64_le(1);
            }
            b.put_u32_le(0);
            b.put_u16_le(0);
            b.put_u16_le(nheaders);
            b
        };
        let mut few = head(u16::MAX);
        put_name(&mut few, b"age");
        put_value(&mut few, b"3");
        assert!(Record::decode(few.freeze()).is_none());
        let mut many = head(u16::MAX);
        for i in 0..40_000 {
            put_name(&mut many, format!("h{i}").as_bytes());
            put_value(&mut many, b"v");
        }
        assert!(Record::decode(many.freeze()).is_none());
    }
}
