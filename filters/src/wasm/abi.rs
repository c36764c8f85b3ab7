//! The proxy-wasm ABI's numbers and encodings (v0.2.0 / v0.2.1), written
//! from the spec: status codes, enum values, and the "pairs" encoding used
//! for header maps.

/// Status codes returned to the guest by host functions.
///
/// Only codes the public SDKs know are used: the Rust SDK reads the status
/// as a Rust enum without `Unimplemented` (12), so a host returning 12 would
/// hand the guest a value it cannot represent. Unimplemented features answer
/// with `NotFound`, `BadArgument` or `InternalFailure` instead (see
/// docs/filters.md).
pub(crate) mod status {
    pub const OK: u32 = 0;
    pub const NOT_FOUND: u32 = 1;
    pub const BAD_ARGUMENT: u32 = 2;
    pub const EMPTY: u32 = 7;
    pub const CAS_MISMATCH: u32 = 8;
    pub const INTERNAL_FAILURE: u32 = 10;
}

/// `MapType` values.
pub(crate) mod map {
    pub const REQUEST_HEADERS: u32 = 0;
    pub const REQUEST_TRAILERS: u32 = 1;
    pub const RESPONSE_HEADERS: u32 = 2;
    pub const RESPONSE_TRAILERS: u32 = 3;
    pub const CALL_RESPONSE_HEADERS: u32 = 6;
    pub const CALL_RESPONSE_TRAILERS: u32 = 7;
}

/// `BufferType` values.
pub(crate) mod buffer {
    pub const REQUEST_BODY: u32 = 0;
    pub const RESPONSE_BODY: u32 = 1;
    pub const CALL_RESPONSE_BODY: u32 = 4;
    pub const GRPC_RECEIVE: u32 = 5;
    pub const VM_CONFIGURATION: u32 = 6;
    pub const PLUGIN_CONFIGURATION: u32 = 7;
}

/// `StreamType` values (for `proxy_continue_stream` / `proxy_close_stream`).
pub(crate) mod stream {
    pub const HTTP_REQUEST: u32 = 0;
    pub const HTTP_RESPONSE: u32 = 1;
}

/// `Action` values returned by the guest's header callbacks.
pub(crate) mod action {
    pub const CONTINUE: u32 = 0;
}

/// The export that marks a module as a proxy-wasm module, newest first.
pub(crate) const ABI_MARKERS: &[(&str, &str)] = &[
    ("proxy_abi_version_0_2_1", "0.2.1"),
    ("proxy_abi_version_0_2_0", "0.2.0"),
];

/// Encodes `pairs` in the proxy-wasm map encoding: a u32 count, then a
/// (u32 key length, u32 value length) per pair, then each key and value
/// followed by a NUL byte. All integers little-endian.
pub(crate) fn encode_pairs(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + bytes);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

fn le_u32(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// Decodes the pairs encoding. `None` if the bytes are malformed (the
/// caller answers `BadArgument`). An empty input is an empty map.
pub(crate) fn decode_pairs(b: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if b.is_empty() {
        return Some(Vec::new());
    }
    let count = le_u32(b, 0)?;
    // Each pair needs at least 10 bytes; refuse counts the buffer cannot hold
    // before allocating for them.
    if count > b.len() / 10 + 1 {
        return None;
    }
    let mut sizes = Vec::with_capacity(count);
    for i in 0..count {
        let at = 4 + i * 8;
        sizes.push((le_u32(b, at)?, le_u32(b, at + 4)?));
    }
    let mut pos = 4 + count * 8;
    let mut out = Vec::with_capacity(count);
    for (klen, vlen) in sizes {
        let key = b.get(pos..pos.checked_add(klen)?)?;
        pos = pos.checked_add(klen + 1)?;
        let value = b.get(pos..pos.checked_add(vlen)?)?;
        pos = pos.checked_add(vlen + 1)?;
        if pos > b.len() {
            return None;
        }
        out.push((key, value));
    }
    Some(out)
}

/// Splits a property path: segments separated by NUL bytes.
pub(crate) fn split_path(path: &[u8]) -> Vec<&[u8]> {
    path.split(|b| *b == 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"a", b"1"), (b"bee", b""), (b"", b"x")];
        let enc = encode_pairs(&pairs);
        assert_eq!(decode_pairs(&enc).unwrap(), pairs);
        assert_eq!(decode_pairs(&[]).unwrap(), Vec::<(&[u8], &[u8])>::new());
        let empty = encode_pairs(&[]);
        assert_eq!(empty, 0u32.to_le_bytes());
    }

    #[test]
    fn malformed_pairs_are_refused() {
        let enc = encode_pairs(&[(&b"key"[..], &b"value"[..])]);
        for cut in 1..enc.len() {
            assert!(decode_pairs(&enc[..cut]).is_none(), "cut at {cut}");
        }
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(decode_pairs(&huge).is_none());
    }

    #[test]
    fn paths() {
        assert_eq!(split_path(b"request\0path"), vec![&b"request"[..], b"path"]);
        assert_eq!(split_path(b"plugin_name"), vec![&b"plugin_name"[..]]);
    }
}
