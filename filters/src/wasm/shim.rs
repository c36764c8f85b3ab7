//! Fused entry points added to a guest module when it is loaded.
//!
//! Every call from the host into a guest pays wasmtime's entry and exit
//! (saving and restoring the trap state, the stack limit, the thread's
//! activation), about as much as a small callback costs inside the guest.
//! Two groups of callbacks always run back to back:
//! - a stream's first callback, `proxy_on_context_create(id, root)` followed
//!   by `proxy_on_request_headers(id, headers, end_of_stream)`;
//! - its end, `proxy_on_done(id)`, `proxy_on_log(id)`, `proxy_on_delete(id)`.
//!
//! So the loader appends two small functions to the module that make those
//! calls in that order and exports them under names no SDK uses
//! ([`FIRST_REQUEST`], [`END`]). The guest's own code is not touched: its
//! functions, indices and exports stay as they were, and the SDK sees the
//! same callbacks in the same order. The host then enters the guest once
//! per group instead of once per callback. A module without the exports
//! (or with other signatures than the ABI's) gets no shims, and the host
//! calls one callback at a time as before.

use std::collections::HashMap;
use std::ops::Range;

use wasmparser::{CompositeInnerType, Encoding, ExternalKind, Parser, Payload, TypeRef, ValType};

/// `(context_id, root_context_id, headers, end_of_stream) -> action`:
/// `proxy_on_context_create` then `proxy_on_request_headers`.
pub(crate) const FIRST_REQUEST: &str = "flashgate:first_request_headers";
/// `(context_id)`: `proxy_on_done` (its answer dropped), `proxy_on_log`,
/// `proxy_on_delete`, those the module exports.
pub(crate) const END: &str = "flashgate:end_stream";

const SECTION_TYPE: u8 = 1;
const SECTION_FUNCTION: u8 = 3;
const SECTION_EXPORT: u8 = 7;
const SECTION_CODE: u8 = 10;

type Sig = (Vec<ValType>, Vec<ValType>);

/// What the first pass learns of the module.
#[derive(Default)]
struct Shape {
    /// Every type index's signature (`None`: not a function type).
    types: Vec<Option<Sig>>,
    /// The type index of every function, imports first.
    funcs: Vec<u32>,
    /// Exported functions by name.
    exports: HashMap<String, u32>,
    /// Content ranges of the sections the shims extend.
    sections: HashMap<u8, Range<usize>>,
}

/// The module with the shims, or `None` when it does not have the shape
/// they need (a component, missing exports, other signatures, a parse
/// error: the module is then compiled as it is, and any error reported
/// from that).
pub(crate) fn add(wasm: &[u8]) -> Option<Vec<u8>> {
    let shape = shape(wasm)?;
    let i32s = |n: usize| vec![ValType::I32; n];
    // Each export the shims call, checked against the ABI's signature.
    let func = |name: &str, sig: Sig| -> Option<Option<u32>> {
        match shape.exports.get(name) {
            None => Some(None),
            Some(&f) => {
                let ty = *shape.funcs.get(f as usize)?;
                let actual = shape.types.get(ty as usize)?.as_ref()?;
                (*actual == sig).then_some(Some(f))
            }
        }
    };
    let create = func("proxy_on_context_create", (i32s(2), vec![]))??;
    let headers = func("proxy_on_request_headers", (i32s(3), i32s(1)))??;
    let done = func("proxy_on_done", (i32s(1), i32s(1)))?;
    let log = func("proxy_on_log", (i32s(1), vec![]))?;
    let delete = func("proxy_on_delete", (i32s(1), vec![]))?;
    if [FIRST_REQUEST, END]
        .iter()
        .any(|n| shape.exports.contains_key(*n))
    {
        return None;
    }
    for id in [SECTION_TYPE, SECTION_FUNCTION, SECTION_EXPORT, SECTION_CODE] {
        shape.sections.get(&id)?;
    }

    let type_first = shape.types.len() as u32;
    let func_first = shape.funcs.len() as u32;

    // Two function types: (i32 i32 i32 i32) -> i32 and (i32) -> ().
    let mut types = Vec::new();
    types.extend_from_slice(&[0x60, 4, 0x7f, 0x7f, 0x7f, 0x7f, 1, 0x7f]);
    types.extend_from_slice(&[0x60, 1, 0x7f, 0]);

    let mut functions = Vec::new();
    leb(&mut functions, type_first);
    leb(&mut functions, type_first + 1);

    let mut exports = Vec::new();
    for (name, index) in [(FIRST_REQUEST, func_first), (END, func_first + 1)] {
        leb(&mut exports, name.len() as u32);
        exports.extend_from_slice(name.as_bytes());
        exports.push(0x00); // a function
        leb(&mut exports, index);
    }

    // local.get = 0x20, call = 0x10, drop = 0x1a, end = 0x0b.
    let mut first = vec![0x00]; // no locals
    first.extend_from_slice(&[0x20, 0, 0x20, 1, 0x10]);
    leb(&mut first, create);
    first.extend_from_slice(&[0x20, 0, 0x20, 2, 0x20, 3, 0x10]);
    leb(&mut first, headers);
    first.push(0x0b);
    let mut end = vec![0x00];
    for (f, drops) in [(done, true), (log, false), (delete, false)] {
        if let Some(f) = f {
            end.extend_from_slice(&[0x20, 0, 0x10]);
            leb(&mut end, f);
            if drops {
                end.push(0x1a);
            }
        }
    }
    end.push(0x0b);
    let mut code = Vec::new();
    for body in [first, end] {
        leb(&mut code, body.len() as u32);
        code.extend_from_slice(&body);
    }

    let added: HashMap<u8, (u32, Vec<u8>)> = [
        (SECTION_TYPE, (2, types)),
        (SECTION_FUNCTION, (2, functions)),
        (SECTION_EXPORT, (2, exports)),
        (SECTION_CODE, (2, code)),
    ]
    .into_iter()
    .collect();
    rebuild(wasm, &added)
}

/// The first pass: types, functions, exports and where the sections are.
fn shape(wasm: &[u8]) -> Option<Shape> {
    let mut s = Shape::default();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.ok()? {
            Payload::Version { encoding, .. } if encoding != Encoding::Module => return None,
            Payload::TypeSection(reader) => {
                s.sections.insert(SECTION_TYPE, reader.range());
                for group in reader {
                    for sub in group.ok()?.into_types() {
                        s.types.push(match &sub.composite_type.inner {
                            CompositeInnerType::Func(f) => {
                                Some((f.params().to_vec(), f.results().to_vec()))
                            }
                            _ => None,
                        });
                    }
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    if let TypeRef::Func(ty) = import.ok()?.ty {
                        s.funcs.push(ty);
                    }
                }
            }
            Payload::FunctionSection(reader) => {
                s.sections.insert(SECTION_FUNCTION, reader.range());
                for ty in reader {
                    s.funcs.push(ty.ok()?);
                }
            }
            Payload::ExportSection(reader) => {
                s.sections.insert(SECTION_EXPORT, reader.range());
                for export in reader {
                    let export = export.ok()?;
                    if export.kind == ExternalKind::Func {
                        s.exports.insert(export.name.to_string(), export.index);
                    }
                }
            }
            Payload::CodeSectionStart { range, .. } => {
                s.sections.insert(SECTION_CODE, range);
            }
            _ => {}
        }
    }
    Some(s)
}

/// The module again, section by section, with `added` entries appended to
/// the sections named there (their counts raised to match); every other
/// byte copied as it was.
fn rebuild(wasm: &[u8], added: &HashMap<u8, (u32, Vec<u8>)>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(wasm.len() + 512);
    out.extend_from_slice(wasm.get(..8)?);
    let mut copied_to = 8;
    for payload in Parser::new(0).parse_all(wasm) {
        let Some((id, range)) = payload.ok()?.as_section() else {
            continue;
        };
        match added.get(&id) {
            None => out.extend_from_slice(wasm.get(copied_to..range.end)?),
            Some((extra, entries)) => {
                let content = wasm.get(range.clone())?;
                let (count, at) = read_leb(content)?;
                let mut section = Vec::with_capacity(content.len() + entries.len() + 5);
                leb(&mut section, count.checked_add(*extra)?);
                section.extend_from_slice(&content[at..]);
                section.extend_from_slice(entries);
                out.push(id);
                leb(&mut out, u32::try_from(section.len()).ok()?);
                out.extend_from_slice(&section);
            }
        }
        copied_to = range.end;
    }
    (copied_to == wasm.len()).then_some(out)
}

/// Appends `v` as an unsigned LEB128.
fn leb(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// An unsigned LEB128 (possibly padded, as linkers write them) and its
/// length.
fn read_leb(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut v: u32 = 0;
    for (i, b) in bytes.iter().take(5).enumerate() {
        v |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leb_round_trips_and_reads_padded_forms() {
        for v in [0u32, 1, 127, 128, 300, 16_384, u32::MAX] {
            let mut out = Vec::new();
            leb(&mut out, v);
            assert_eq!(read_leb(&out), Some((v, out.len())));
        }
        // 3 written in five bytes, as wasm-ld pads section sizes.
        assert_eq!(read_leb(&[0x83, 0x80, 0x80, 0x80, 0x00]), Some((3, 5)));
        assert_eq!(read_leb(&[0x80, 0x80]), None);
    }

    use wasm_encoder::{
        CodeSection, ExportKind, ExportSection, Function, FunctionSection, ImportSection,
        Module as Encoder, TypeSection, ValType as V,
    };
    use wasmtime::{Linker, Module, Store};

    /// A guest whose callbacks record `tag * 100 + first argument` through
    /// an imported host function, with `signatures` as the callbacks'
    /// exports (name, params, results). Results are the last argument.
    fn guest(callbacks: &[(&str, usize, usize)]) -> Vec<u8> {
        let mut types = TypeSection::new();
        types.ty().function([V::I32], []); // the import
        let mut imports = ImportSection::new();
        imports.import("env", "record", wasm_encoder::EntityType::Function(0));
        let mut funcs = FunctionSection::new();
        let mut exports = ExportSection::new();
        let mut code = CodeSection::new();
        for (i, (name, params, results)) in callbacks.iter().enumerate() {
            let ty = i as u32 + 1;
            types
                .ty()
                .function(vec![V::I32; *params], vec![V::I32; *results]);
            funcs.function(ty);
            let index = ty; // the import is function 0
            exports.export(name, ExportKind::Func, index);
            let mut f = Function::new([]);
            let mut sink = f.instructions();
            sink.i32_const(ty as i32 * 100)
                .local_get(0)
                .i32_add()
                .call(0);
            if *results == 1 {
                sink.local_get(*params as u32 - 1);
            }
            sink.end();
            code.function(&f);
        }
        let mut m = Encoder::new();
        m.section(&types)
            .section(&imports)
            .section(&funcs)
            .section(&exports)
            .section(&code);
        m.finish()
    }

    const ABI: [(&str, usize, usize); 5] = [
        ("proxy_on_context_create", 2, 0),
        ("proxy_on_request_headers", 3, 1),
        ("proxy_on_done", 1, 1),
        ("proxy_on_log", 1, 0),
        ("proxy_on_delete", 1, 0),
    ];

    /// Runs `export(args)` in the shimmed guest; returns the result and
    /// what the callbacks recorded, in order.
    fn run<P, R>(wasm: &[u8], export: &str, args: P) -> (R, Vec<i32>)
    where
        P: wasmtime::WasmParams,
        R: wasmtime::WasmResults,
    {
        let engine = crate::wasm::engine::engine().unwrap();
        let module = Module::new(engine, wasm).unwrap();
        let mut linker: Linker<Vec<i32>> = Linker::new(engine);
        linker
            .func_wrap(
                "env",
                "record",
                |mut c: wasmtime::Caller<'_, Vec<i32>>, v: i32| c.data_mut().push(v),
            )
            .unwrap();
        let mut store = Store::new(engine, Vec::new());
        store.set_epoch_deadline(1000);
        let inst = linker.instantiate(&mut store, &module).unwrap();
        let f = inst.get_typed_func::<P, R>(&mut store, export).unwrap();
        let r = f.call(&mut store, args).unwrap();
        (r, store.into_data())
    }

    #[test]
    fn fused_entries_make_the_callbacks_in_order_with_their_arguments() {
        let original = guest(&ABI);
        let shimmed = add(&original).expect("the ABI's exports get shims");
        // create(7, 1), then request_headers(7, 5, 1) whose answer (its
        // last argument, 1) is the entry's.
        let (action, calls) =
            run::<(u32, u32, u32, u32), u32>(&shimmed, FIRST_REQUEST, (7, 1, 5, 1));
        assert_eq!(action, 1);
        assert_eq!(calls, vec![107, 207]);
        let ((), calls) = run::<u32, ()>(&shimmed, END, 9);
        assert_eq!(calls, vec![309, 409, 509]);
        // The guest's own exports are still there and unchanged.
        let (action, calls) =
            run::<(u32, u32, u32), u32>(&shimmed, "proxy_on_request_headers", (4, 2, 0));
        assert_eq!((action, calls), (0, vec![204]));
    }

    #[test]
    fn the_end_entry_calls_only_what_the_guest_exports() {
        let without_log: Vec<_> = ABI
            .iter()
            .copied()
            .filter(|c| c.0 != "proxy_on_log")
            .collect();
        let shimmed = add(&guest(&without_log)).unwrap();
        let ((), calls) = run::<u32, ()>(&shimmed, END, 3);
        // proxy_on_delete is the fourth type here.
        assert_eq!(calls, vec![303, 403]);
    }

    #[test]
    fn other_signatures_or_missing_callbacks_get_no_shims() {
        let mut wrong = ABI;
        wrong[1] = ("proxy_on_request_headers", 2, 1); // the 0.1 ABI's shape
        assert!(add(&guest(&wrong)).is_none());
        let mut done_wrong = ABI;
        done_wrong[2] = ("proxy_on_done", 1, 0);
        assert!(add(&guest(&done_wrong)).is_none());
        assert!(
            add(&guest(&ABI[1..])).is_none(),
            "no proxy_on_context_create"
        );
        // A module that already exports one of the names is left alone.
        let mut taken = ABI.to_vec();
        taken.push((END, 1, 0));
        assert!(add(&guest(&taken)).is_none());
    }

    #[test]
    fn refuses_what_it_cannot_shim() {
        // Not a module at all, and the smallest module (no exports).
        assert!(add(b"junk").is_none());
        assert!(add(b"\0asm\x01\0\0\0").is_none());
    }
}
