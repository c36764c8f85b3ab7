//! Shared data (with CAS) and shared queues, backed by the filter's
//! [`SharedStore`](crate::wasm::shared::SharedStore). An enqueue wakes the
//! root context of every instance that registered the queue with
//! `proxy_on_queue_ready` (delivered by the pool's ticker thread).

use wasmtime::{Caller, Linker};

use crate::wasm::abi::status;
use crate::wasm::shared::{SetError, SharedStore};
use crate::wasm::state::{finish, give, read, write_u32, HostState};

type C<'a> = Caller<'a, HostState>;

pub(super) fn add(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kptr: u32, klen: u32, rptr: u32, rsize: u32, rcas: u32| {
            finish((|| {
                let key = read(&mut c, kptr, klen)?;
                let (value, cas) = c.data().plugin.shared.get(&key).ok_or(status::NOT_FOUND)?;
                give(&mut c, &value, rptr, rsize)?;
                write_u32(&mut c, rcas, cas)
            })())
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kptr: u32, klen: u32, vptr: u32, vlen: u32, cas: u32| {
            finish((|| {
                let key = read(&mut c, kptr, klen)?;
                let value = read(&mut c, vptr, vlen)?;
                match c.data().plugin.shared.set(&key, &value, cas) {
                    Ok(()) => Ok(()),
                    Err(SetError::CasMismatch) => Err(status::CAS_MISMATCH.into()),
                    Err(SetError::TooLarge) => Err(status::INTERNAL_FAILURE.into()),
                }
            })())
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, nptr: u32, nlen: u32, rid: u32| {
            finish((|| {
                let name = read(&mut c, nptr, nlen)?;
                let d = c.data();
                let by = (&d.plugin.signals, d.slot, d.generation);
                let id = d.plugin.shared.register_queue(&name, Some(by));
                write_u32(&mut c, rid, id)
            })())
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vptr: u32, vlen: u32, nptr: u32, nlen: u32, rid: u32| {
            finish((|| {
                let vm_id = read(&mut c, vptr, vlen)?;
                let name = read(&mut c, nptr, nlen)?;
                let vm_id = std::str::from_utf8(&vm_id).map_err(|_| status::BAD_ARGUMENT)?;
                let store = if vm_id.is_empty() {
                    c.data().plugin.shared.clone()
                } else {
                    SharedStore::for_vm(vm_id)
                };
                let id = store.resolve_queue(&name).ok_or(status::NOT_FOUND)?;
                write_u32(&mut c, rid, id)
            })())
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: u32, rptr: u32, rsize: u32| {
            finish((|| {
                let item = c
                    .data()
                    .plugin
                    .shared
                    .dequeue(id)
                    .ok_or(status::NOT_FOUND)?;
                let item = item.ok_or(status::EMPTY)?;
                give(&mut c, &item, rptr, rsize)
            })())
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: u32, vptr: u32, vlen: u32| {
            finish((|| {
                let value = read(&mut c, vptr, vlen)?;
                let shared = c.data().plugin.shared.clone();
                // A queue resolved from another VM id lives in that store.
                let store = if shared.has_queue(id) {
                    shared
                } else {
                    SharedStore::owning_queue(id).ok_or(status::NOT_FOUND)?
                };
                store.enqueue(id, &value).map_err(|full| {
                    if full {
                        status::INTERNAL_FAILURE
                    } else {
                        status::NOT_FOUND
                    }
                })?;
                Ok(())
            })())
        },
    )?;
    Ok(())
}
