//! The path normalizer (gateway/src/pipeline/route/router.rs): never
//! panics; what it gives back has no dot segments left and is its own
//! normal form.
#![no_main]

use flashgate_fuzz::router::normalize_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Some(normal) = normalize_path(path) else {
        return;
    };
    if path.starts_with('/') {
        assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
        assert!(
            normal.split('/').all(|s| s != "." && s != ".."),
            "{path:?} -> {normal:?}"
        );
    }
    assert_eq!(
        normalize_path(&normal).as_deref(),
        Some(&*normal),
        "{path:?}"
    );
});
