//! The host functions a proxy-wasm guest imports, by family. Each is a
//! `func_wrap` on the linker that reaches the store's [`HostState`]
//! through `Caller`. Signatures follow the ABI spec (v0.2.1): pointers and
//! sizes are `i32` (wasm32), results come back through pointers into the
//! guest's memory, and every function returns a status code.
//!
//! Nothing here may panic on guest input: every pointer is bounds-checked,
//! every encoding is parsed defensively, and failures become statuses.

mod headers;
mod misc;
mod properties;
mod shared;
mod wasi;

use wasmtime::{FuncType, Linker, Module, Val, ValType};

use super::abi::status;
use super::state::HostState;

/// Defines every host function on `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    misc::add(linker)?;
    headers::add(linker)?;
    properties::add(linker)?;
    shared::add(linker)?;
    wasi::add(linker)?;
    Ok(())
}

/// WASI's "function not supported" errno.
const ENOSYS: i32 = 52;

/// Resolves the imports of `module` that the host does not implement
/// itself, so that modules from other SDKs or newer toolchains still
/// instantiate: any other WASI function answers `ENOSYS`, an unknown
/// `env.proxy_*` function answers `InternalFailure`, and any other unknown
/// function traps when called (like wasmtime's
/// `define_unknown_imports_as_traps`). Returns the stubbed names (the
/// loader logs them), or an error for an import that is not a function.
pub(crate) fn stub_unknown_imports(
    linker: &mut Linker<HostState>,
    module: &Module,
) -> Result<Vec<String>, String> {
    let mut stubbed = Vec::new();
    for import in module.imports() {
        let (m, name) = (import.module(), import.name());
        let Some(ty) = import.ty().func().cloned() else {
            return Err(format!(
                "import {m}.{name} is not a function (the host provides only functions)"
            ));
        };
        let code = match m {
            "wasi_snapshot_preview1" | "wasi_unstable" => Some(ENOSYS),
            "env" if name.starts_with("proxy_") => Some(status::INTERNAL_FAILURE as i32),
            _ => None,
        };
        // Without shadowing, defining a name the host already provides
        // fails: that is how an import is known to be one of ours.
        if define_stub(linker, m, name, ty, code).is_ok() {
            stubbed.push(format!("{m}.{name}"));
        }
    }
    Ok(stubbed)
}

fn define_stub(
    linker: &mut Linker<HostState>,
    module: &str,
    name: &str,
    ty: FuncType,
    code: Option<i32>,
) -> wasmtime::Result<()> {
    let returns_status =
        ty.results().len() == 1 && matches!(ty.results().next(), Some(ValType::I32));
    let what = format!("{module}.{name}");
    linker.func_new(module, name, ty, move |_caller, _params, results| {
        match (code, returns_status, results.first_mut()) {
            (Some(code), true, Some(r)) => {
                *r = Val::I32(code);
                Ok(())
            }
            _ => Err(wasmtime::format_err!(
                "{what} is not implemented by the host"
            )),
        }
    })?;
    Ok(())
}
