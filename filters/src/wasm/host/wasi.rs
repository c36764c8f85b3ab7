//! The few WASI (preview 1) functions a proxy-wasm guest built for
//! `wasm32-wasip1` really uses: stdout/stderr go to the log, clocks,
//! random bytes, an empty environment and argument list, and no
//! preopened directories. Every other WASI import is stubbed with `ENOSYS`
//! by [`super::stub_unknown_imports`]. A guest gets no file system, no
//! sockets and no way to block.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use crate::wasm::state::{read, write, write_u32, write_u64, HostErr, HostResult, HostState};

type C<'a> = Caller<'a, HostState>;

/// The same functions under both names: `wasi_unstable` is what older
/// toolchains (AssemblyScript's `bindings/wasi_unstable`) import; the
/// calls used here are the same in both.
const MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];
const SUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;

fn errno(r: HostResult) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(SUCCESS),
        Err(HostErr::Status(_)) => Ok(EFAULT),
        Err(HostErr::Trap(e)) => Err(e),
    }
}

/// Most bytes of one `fd_write` that reach the log.
const MAX_LOG_WRITE: usize = 16 << 10;

pub(super) fn add(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    for m in MODULES {
        add_as(l, m)?;
    }
    Ok(())
}

fn add_as(l: &mut Linker<HostState>, module: &str) -> wasmtime::Result<()> {
    l.func_wrap(
        module,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: u32, n: u32, ret: u32| {
            if fd != 1 && fd != 2 {
                return Ok(EBADF);
            }
            errno(fd_write(&mut c, fd, iovs, n, ret))
        },
    )?;
    l.func_wrap(
        module,
        "fd_read",
        |mut c: C<'_>, fd: i32, _iovs: u32, _n: u32, ret: u32| {
            // stdin is always at its end; nothing else is open.
            if fd != 0 {
                return Ok(EBADF);
            }
            errno(write_u32(&mut c, ret, 0))
        },
    )?;
    l.func_wrap(module, "fd_close", |_c: C<'_>, _fd: i32| Ok(EBADF))?;
    l.func_wrap(
        module,
        "fd_prestat_get",
        |_c: C<'_>, _fd: i32, _ret: u32| {
            // No preopened directories: libc stops looking at the first EBADF.
            Ok(EBADF)
        },
    )?;
    l.func_wrap(
        module,
        "fd_fdstat_get",
        |mut c: C<'_>, fd: i32, ret: u32| {
            if !(0..=2).contains(&fd) {
                return Ok(EBADF);
            }
            // filetype character device (2), no flags, no rights beyond the
            // ones the guest already uses through the calls above.
            let mut stat = [0u8; 24];
            stat[0] = 2;
            errno(write(&mut c, ret, &stat))
        },
    )?;
    l.func_wrap(
        module,
        "environ_sizes_get",
        |mut c: C<'_>, count: u32, size: u32| {
            errno(write_u32(&mut c, count, 0).and_then(|()| write_u32(&mut c, size, 0)))
        },
    )?;
    l.func_wrap(module, "environ_get", |_c: C<'_>, _env: u32, _buf: u32| {
        Ok(SUCCESS)
    })?;
    l.func_wrap(
        module,
        "args_sizes_get",
        |mut c: C<'_>, count: u32, size: u32| {
            errno(write_u32(&mut c, count, 0).and_then(|()| write_u32(&mut c, size, 0)))
        },
    )?;
    l.func_wrap(module, "args_get", |_c: C<'_>, _argv: u32, _buf: u32| {
        Ok(SUCCESS)
    })?;
    l.func_wrap(
        module,
        "clock_time_get",
        |mut c: C<'_>, id: i32, _precision: i64, ret: u32| {
            let Some(now) = clock(id) else {
                return Ok(EINVAL);
            };
            errno(write_u64(&mut c, ret, now))
        },
    )?;
    l.func_wrap(
        module,
        "clock_res_get",
        |mut c: C<'_>, id: i32, ret: u32| {
            if clock(id).is_none() {
                return Ok(EINVAL);
            }
            errno(write_u64(&mut c, ret, 1_000))
        },
    )?;
    l.func_wrap(module, "random_get", |mut c: C<'_>, buf: u32, len: u32| {
        let mut bytes = vec![0u8; (len as usize).min(1 << 20)];
        if bytes.len() != len as usize {
            return Ok(EINVAL);
        }
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
        errno(write(&mut c, buf, &bytes))
    })?;
    l.func_wrap(module, "sched_yield", |_c: C<'_>| Ok(SUCCESS))?;
    l.func_wrap(
        module,
        "proc_exit",
        |mut c: C<'_>, code: i32| -> wasmtime::Result<()> {
            c.data_mut().exited = Some(code);
            Err(wasmtime::format_err!(
                "the module exited (proc_exit({code}))"
            ))
        },
    )?;
    Ok(())
}

/// Nanoseconds on WASI clock `id`: 0 realtime, 1 monotonic, 2/3 CPU time
/// (answered with the monotonic clock).
fn clock(id: i32) -> Option<u64> {
    static START: OnceLock<Instant> = OnceLock::new();
    match id {
        0 => Some(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        ),
        1..=3 => Some(START.get_or_init(Instant::now).elapsed().as_nanos() as u64),
        _ => None,
    }
}

fn fd_write(c: &mut C<'_>, fd: i32, iovs: u32, n: u32, ret: u32) -> HostResult {
    if n > 1024 {
        return Err(HostErr::Status(0));
    }
    let raw = read(c, iovs, n.checked_mul(8).ok_or(HostErr::Status(0))?)?;
    let mut total: u32 = 0;
    let mut text = Vec::new();
    for iov in raw.chunks_exact(8) {
        let ptr = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        let room = MAX_LOG_WRITE.saturating_sub(text.len());
        let take = (len as usize).min(room) as u32;
        text.extend_from_slice(&read(c, ptr, take)?);
        total = total.saturating_add(len);
    }
    let line = String::from_utf8_lossy(&text);
    let line = line.trim_end_matches('\n');
    if !line.is_empty() {
        if c.data().start_log.is_some() {
            let stream = if fd == 1 { "stdout" } else { "stderr" };
            let line = line.to_string();
            c.data_mut().note_start_log(stream, &line);
        }
        let filter = c.data().plugin.name.as_str();
        if fd == 1 {
            tracing::info!(target: "flashgate::wasm", filter, stream = "stdout", "{line}");
        } else {
            tracing::warn!(target: "flashgate::wasm", filter, stream = "stderr", "{line}");
        }
    }
    write_u32(c, ret, total)
}
