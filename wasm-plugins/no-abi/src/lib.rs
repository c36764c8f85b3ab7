//! `no-abi`: a Wasm module that does not export a proxy-wasm ABI version
//! marker. The host must refuse it at load time.

#[no_mangle]
pub extern "C" fn add(a: i32, b: i32) -> i32 {
    a.wrapping_add(b)
}
