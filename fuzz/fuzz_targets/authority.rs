//! Host validation (gateway/src/pipeline/authority.rs): never panics; an
//! accepted authority is a plain `host[:port]` that an origin and a cache
//! read the same way.
#![no_main]

use flashgate_fuzz::authority::valid_authority;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if !valid_authority(data) {
        return;
    }
    assert!(!data.is_empty());
    assert!(
        !data
            .iter()
            .any(|b| matches!(b, b'@' | b'/' | b'?' | b'#' | b'%' | b',')
                || b.is_ascii_whitespace()
                || !b.is_ascii()),
        "{data:?}"
    );
    assert!(http::HeaderValue::from_bytes(data).is_ok());
    assert!(
        http::uri::Authority::try_from(data).is_ok(),
        "{:?}",
        String::from_utf8_lossy(data)
    );
});
