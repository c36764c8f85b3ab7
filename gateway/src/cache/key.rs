//! Cache keys. A key is the request's host (lower-cased) and path with
//! query, as routed, followed by the values of the route's `key_headers`
//! and, for a variant, of the headers the origin named in `Vary`:
//!
//! ```text
//! shop.example.com/products/7?ref=x \x1f h:accept-language=de \x1f v:accept-encoding=gzip
//! ```
//!
//! That leading `host/path?query` is what operators purge by. The parts are
//! separated by 0x1f, a byte no header value can contain, so two different
//! requests can never make the same key. Keys are bytes, not strings: header
//! values may be any visible byte, and a lossy conversion could merge two.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Between the parts of a key. `HeaderValue` rejects control bytes, so
/// this cannot appear inside a part.
pub const SEP: u8 = 0x1f;

/// The key of a request before the origin's `Vary` is known.
pub fn base(
    host: &str,
    path_and_query: &str,
    key_headers: &[HeaderName],
    headers: &HeaderMap,
) -> Bytes {
    let mut out = BytesMut::with_capacity(host.len() + path_and_query.len() + 16);
    for b in host.bytes() {
        out.put_u8(b.to_ascii_lowercase());
    }
    out.put_slice(path_and_query.as_bytes());
    for name in key_headers {
        push_header(&mut out, b"h:", name, headers);
    }
    out.freeze()
}

/// The key of one variant of `base`: the request's values of the headers
/// the origin's `Vary` named (`names` sorted and lower-case).
pub fn variant(base: &[u8], names: &[HeaderName], headers: &HeaderMap) -> Bytes {
    let mut out = BytesMut::with_capacity(base.len() + 32);
    out.put_slice(base);
    for name in names {
        push_header(&mut out, b"v:", name, headers);
    }
    out.freeze()
}

/// The same key from the values a stored variant recorded (see
/// [`vary_values`]).
pub fn variant_of(base: &[u8], values: &[(HeaderName, Option<HeaderValue>)]) -> Bytes {
    let mut out = BytesMut::with_capacity(base.len() + 32);
    out.put_slice(base);
    for (name, value) in values {
        out.put_u8(SEP);
        out.put_slice(b"v:");
        out.put_slice(name.as_str().as_bytes());
        if let Some(v) = value {
            out.put_u8(b'=');
            out.put_slice(v.as_bytes());
        }
    }
    out.freeze()
}

/// The request's values of `names`, repeated headers joined with `,` as
/// the key joins them.
pub fn vary_values(
    names: &[HeaderName],
    headers: &HeaderMap,
) -> Vec<(HeaderName, Option<HeaderValue>)> {
    names
        .iter()
        .map(|n| {
            let mut it = headers.get_all(n).iter();
            let value = it.next().map(|first| {
                let mut joined = first.as_bytes().to_vec();
                for v in it {
                    joined.push(b',');
                    joined.extend_from_slice(v.as_bytes());
                }
                // Joined valid values with ',' are valid.
                HeaderValue::from_bytes(&joined).unwrap_or_else(|_| first.clone())
            });
            (n.clone(), value)
        })
        .collect()
}

/// `SEP tag name` and, when the request has the header, `=v1,v2` (an absent
/// header and an empty one differ).
fn push_header(out: &mut BytesMut, tag: &[u8], name: &HeaderName, headers: &HeaderMap) {
    out.put_u8(SEP);
    out.put_slice(tag);
    out.put_slice(name.as_str().as_bytes());
    let mut values = headers.get_all(name).iter();
    if let Some(first) = values.next() {
        out.put_u8(b'=');
        out.put_slice(first.as_bytes());
        for v in values {
            out.put_u8(b',');
            out.put_slice(v.as_bytes());
        }
    }
}

/// Most header names a `Vary` may list for the answer to be stored.
pub const MAX_VARY: usize = 16;

/// The header names of a `Vary` field list, lower-case, sorted and
/// deduplicated; `None` for `Vary: *`, a name that is not a header name or
/// more than [`MAX_VARY`] names (nothing can be stored then).
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for v in headers.get_all(http::header::VARY) {
        let v = v.to_str().ok()?;
        for part in v.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            if part == "*" {
                return None;
            }
            names.push(HeaderName::from_bytes(part.as_bytes()).ok()?);
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    // Real origins vary on a handful of headers; a huge list is not worth
    // a key (and the entry codec counts them in a u16).
    (names.len() <= MAX_VARY).then_some(names)
}

/// Does `key` belong to the purge of exact key `purged`: the key itself,
/// or one of its header variants?
pub fn in_family(key: &[u8], purged: &[u8]) -> bool {
    key == purged
        || (key.len() > purged.len() && key.starts_with(purged) && key[purged.len()] == SEP)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn host_is_lowercased_path_and_query_kept() {
        let k = base("Shop.Example.COM", "/p/1?a=B", &[], &HeaderMap::new());
        assert_eq!(&k[..], b"shop.example.com/p/1?a=B");
    }

    #[test]
    fn key_headers_absent_empty_and_set_differ() {
        let names = [HeaderName::from_static("accept-language")];
        let absent = base("h", "/", &names, &HeaderMap::new());
        let empty = base("h", "/", &names, &headers(&[("accept-language", "")]));
        let de = base("h", "/", &names, &headers(&[("accept-language", "de")]));
        assert_ne!(absent, empty);
        assert_ne!(empty, de);
        assert_eq!(&de[..], b"h/\x1fh:accept-language=de");
        // Repeated values are all part of the key.
        let two = base(
            "h",
            "/",
            &names,
            &headers(&[("accept-language", "de"), ("accept-language", "fr")]),
        );
        assert_eq!(&two[..], b"h/\x1fh:accept-language=de,fr");
    }

    #[test]
    fn variants_extend_the_base() {
        let b = base("h", "/x", &[], &HeaderMap::new());
        let names = vary_names(&headers(&[
            ("vary", "Accept-Encoding, accept-language"),
            ("vary", "accept-encoding"),
        ]))
        .unwrap();
        assert_eq!(names.len(), 2);
        let gz = variant(&b, &names, &headers(&[("accept-encoding", "gzip")]));
        let br = variant(&b, &names, &headers(&[("accept-encoding", "br")]));
        assert_ne!(gz, br);
        assert!(in_family(&gz, &b));
        let values = vary_values(&names, &headers(&[("accept-encoding", "gzip")]));
        assert_eq!(variant_of(&b, &values), gz);
        assert!(in_family(&b, &b));
        // "/x" must not purge "/xy" nor its variants.
        let other = base("h", "/xy", &[], &HeaderMap::new());
        assert!(!in_family(&other, &b));
    }

    #[test]
    fn vary_star_is_uncacheable() {
        assert!(vary_names(&headers(&[("vary", "accept, *")])).is_none());
        let many: Vec<String> = (0..=MAX_VARY).map(|i| format!("x-{i}")).collect();
        assert!(vary_names(&headers(&[("vary", &many.join(","))])).is_none());
        assert_eq!(vary_names(&HeaderMap::new()), Some(vec![]));
    }

    #[test]
    fn non_utf8_values_stay_distinct() {
        let names = [HeaderName::from_static("x-v")];
        let mut a = HeaderMap::new();
        a.insert("x-v", http::HeaderValue::from_bytes(b"\xff").unwrap());
        let mut b = HeaderMap::new();
        b.insert("x-v", http::HeaderValue::from_bytes(b"\xfe").unwrap());
        assert_ne!(base("h", "/", &names, &a), base("h", "/", &names, &b));
    }
}
