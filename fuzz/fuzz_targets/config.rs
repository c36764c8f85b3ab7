//! The config parser (gateway/src/config/): any text is a config or an
//! error with a key path, never a panic.
#![no_main]

use flashgate_fuzz::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text);
    }
});
