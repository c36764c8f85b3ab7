//! Logging, time, ticks, buffers (configuration), stream control, local
//! responses, metrics, HTTP and unary gRPC callouts, and the ABI's calls
//! that are not implemented (gRPC streams, foreign functions), which
//! answer with a status the SDKs handle instead of trapping.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tracing::level_filters::LevelFilter;
use wasmtime::{Caller, Linker};

use crate::wasm::abi::{self, buffer, status, stream};
use crate::wasm::metrics::MetricKind;
use crate::wasm::state::{finish, give, read, write_u32, write_u64, HostResult, HostState};
use crate::LocalResponse;

type C<'a> = Caller<'a, HostState>;

pub(super) fn add(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: u32, ptr: u32, len: u32| finish(log(&mut c, level, ptr, len)),
    )?;
    l.func_wrap("env", "proxy_get_log_level", |mut c: C<'_>, ret: u32| {
        let level = match LevelFilter::current() {
            LevelFilter::TRACE => 0,
            LevelFilter::DEBUG => 1,
            LevelFilter::INFO => 2,
            LevelFilter::WARN => 3,
            LevelFilter::ERROR => 4,
            _ => 5, // off: only "critical" would pass
        };
        finish(write_u32(&mut c, ret, level))
    })?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: u32| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            finish(write_u64(&mut c, ret, now))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, ms: u32| {
            // Ticks go to the root context only (as in Envoy); the pool's
            // ticker thread delivers them. The SDK treats any answer but Ok
            // as fatal, so Ok it is.
            c.data_mut().tick_period_ms = ms;
            c.data().plugin.signals.wake();
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: u32, start: u32, max: u32, rptr: u32, rsize: u32| {
            finish(get_buffer(&mut c, kind, start, max, rptr, rsize))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: u32, start: u32, size: u32, ptr: u32, len: u32| {
            finish(set_buffer(&mut c, kind, start, size, ptr, len))
        },
    )?;
    l.func_wrap("env", "proxy_continue_stream", |mut c: C<'_>, kind: u32| {
        // Resumes the effective stream: a paused one (reached through
        // proxy_set_effective_context from a tick, a queue or another
        // stream) wakes up; the current one continues when its callback
        // returns.
        Ok(match (kind, c.data_mut().stream()) {
            (stream::HTTP_REQUEST | stream::HTTP_RESPONSE, Some(s)) => {
                s.continued = true;
                if let Some(w) = &s.wake {
                    w.notify_one();
                }
                status::OK
            }
            (stream::HTTP_REQUEST | stream::HTTP_RESPONSE, None) => status::NOT_FOUND,
            _ => status::BAD_ARGUMENT,
        })
    })?;
    l.func_wrap("env", "proxy_close_stream", |mut c: C<'_>, kind: u32| {
        Ok(match (kind, c.data_mut().stream()) {
            (stream::HTTP_REQUEST | stream::HTTP_RESPONSE, Some(s)) => {
                s.reset = true;
                if let Some(w) = &s.wake {
                    w.notify_one();
                }
                status::OK
            }
            (stream::HTTP_REQUEST | stream::HTTP_RESPONSE, None) => status::NOT_FOUND,
            _ => status::BAD_ARGUMENT,
        })
    })?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: u32,
         _details_ptr: u32,
         _details_len: u32,
         body_ptr: u32,
         body_len: u32,
         headers_ptr: u32,
         headers_len: u32,
         grpc_status: i32| {
            finish(local_response(
                &mut c,
                code,
                (body_ptr, body_len),
                (headers_ptr, headers_len),
                grpc_status,
            ))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, id: u32| {
            let s = c.data_mut();
            Ok(if s.knows(id) {
                s.effective = id;
                status::OK
            } else {
                status::BAD_ARGUMENT
            })
        },
    )?;
    l.func_wrap("env", "proxy_done", |_c: C<'_>| Ok(status::OK))?;

    // Metrics.
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: u32, ptr: u32, len: u32, ret: u32| {
            finish(define_metric(&mut c, kind, ptr, len, ret))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: u32, ret: u32| {
            let v = c.data().plugin.metrics.get(id);
            finish(match v {
                None => Err(status::NOT_FOUND.into()),
                Some(Err(())) => Err(status::BAD_ARGUMENT.into()),
                Some(Ok(v)) => write_u64(&mut c, ret, v),
            })
        },
    )?;
    l.func_wrap("env", "proxy_record_metric", |c: C<'_>, id: u32, v: u64| {
        Ok(match c.data().plugin.metrics.record(id, v) {
            Some(()) => status::OK,
            None => status::NOT_FOUND,
        })
    })?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: C<'_>, id: u32, d: i64| {
            Ok(match c.data().plugin.metrics.increment(id, d) {
                Some(Ok(())) => status::OK,
                Some(Err(())) => status::BAD_ARGUMENT,
                None => status::NOT_FOUND,
            })
        },
    )?;

    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         up: u32,
         up_len: u32,
         h: u32,
         h_len: u32,
         b: u32,
         b_len: u32,
         _t: u32,
         _t_len: u32,
         timeout: u32,
         ret: u32| {
            finish(http_call(
                &mut c,
                (up, up_len),
                (h, h_len),
                (b, b_len),
                timeout,
                ret,
            ))
        },
    )?;
    // Unary gRPC calls go to the cluster over HTTP/2 (see `wasm::grpc`);
    // gRPC streams (`proxy_grpc_stream`) answer InternalFailure at once.
    l.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: C<'_>,
         up: u32,
         up_len: u32,
         svc: u32,
         svc_len: u32,
         m: u32,
         m_len: u32,
         md: u32,
         md_len: u32,
         msg: u32,
         msg_len: u32,
         timeout: u32,
         ret: u32| {
            finish(grpc_call(
                &mut c,
                [
                    (up, up_len),
                    (svc, svc_len),
                    (m, m_len),
                    (md, md_len),
                    (msg, msg_len),
                ],
                timeout,
                ret,
            ))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_stream",
        |_c: C<'_>,
         _up: u32,
         _up_len: u32,
         _svc: u32,
         _svc_len: u32,
         _m: u32,
         _m_len: u32,
         _md: u32,
         _md_len: u32,
         _ret: u32| Ok(status::INTERNAL_FAILURE),
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_send",
        |_c: C<'_>, _token: u32, _ptr: u32, _len: u32, _eos: u32| Ok(status::NOT_FOUND),
    )?;
    l.func_wrap("env", "proxy_grpc_cancel", |_c: C<'_>, _token: u32| {
        Ok(status::NOT_FOUND)
    })?;
    l.func_wrap("env", "proxy_grpc_close", |_c: C<'_>, _token: u32| {
        Ok(status::NOT_FOUND)
    })?;
    l.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, code: u32, rptr: u32, rsize: u32| {
            // The status of the callout being delivered: its HTTP status,
            // or 0 with the reason when it got no answer; for a gRPC call,
            // its gRPC status and message.
            let grpc = c.data_mut().stream().and_then(|s| s.grpc_answer.as_ref());
            let (status, msg) = match grpc {
                Some(g) => (g.status, g.message.clone()),
                None => match c.data_mut().call_response().map(|r| &*r) {
                    Some(Ok(r)) => (u32::from(r.status.as_u16()), String::new()),
                    Some(Err(e)) => (0, e.to_string()),
                    None => (0, String::new()),
                },
            };
            finish(
                write_u32(&mut c, code, status)
                    .and_then(|()| give(&mut c, msg.as_bytes(), rptr, rsize)),
            )
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_c: C<'_>, _n: u32, _n_len: u32, _a: u32, _a_len: u32, _r: u32, _r_len: u32| {
            Ok(status::NOT_FOUND)
        },
    )?;
    Ok(())
}

fn log(c: &mut C<'_>, level: u32, ptr: u32, len: u32) -> HostResult {
    let msg = read(c, ptr, len)?;
    let msg = String::from_utf8_lossy(&msg);
    if level >= 2 && c.data().start_log.is_some() {
        let name = ["trace", "debug", "info", "warn", "error", "critical"];
        let name = name.get(level as usize).copied().unwrap_or("critical");
        c.data_mut().note_start_log(name, &msg);
    }
    let filter = c.data().plugin.name.as_str();
    match level {
        0 => tracing::trace!(target: "flashgate::wasm", filter, "{msg}"),
        1 => tracing::debug!(target: "flashgate::wasm", filter, "{msg}"),
        2 => tracing::info!(target: "flashgate::wasm", filter, "{msg}"),
        3 => tracing::warn!(target: "flashgate::wasm", filter, "{msg}"),
        _ => tracing::error!(target: "flashgate::wasm", filter, "{msg}"),
    }
    Ok(())
}

fn get_buffer(c: &mut C<'_>, kind: u32, start: u32, max: u32, rptr: u32, rsize: u32) -> HostResult {
    let slice = |all: &[u8]| {
        let start = (start as usize).min(all.len());
        let end = start.saturating_add(max as usize).min(all.len());
        all[start..end].to_vec()
    };
    let bytes = match kind {
        buffer::PLUGIN_CONFIGURATION => slice(&c.data().plugin.config),
        buffer::VM_CONFIGURATION => Vec::new(),
        buffer::REQUEST_BODY | buffer::RESPONSE_BODY => {
            let s = c.data_mut().stream().ok_or(status::NOT_FOUND)?;
            match &s.body {
                Some((k, body)) if *k == kind => slice(body),
                _ => return Err(status::NOT_FOUND.into()),
            }
        }
        buffer::CALL_RESPONSE_BODY => match c.data_mut().call_response() {
            Some(Ok(r)) => slice(&r.body),
            _ => return Err(status::NOT_FOUND.into()),
        },
        buffer::GRPC_RECEIVE => match c.data_mut().stream().and_then(|s| s.grpc_answer.as_ref()) {
            Some(g) => slice(&g.body),
            None => return Err(status::NOT_FOUND.into()),
        },
        // Stream (TCP) data does not exist here.
        _ => return Err(status::NOT_FOUND.into()),
    };
    give(c, &bytes, rptr, rsize)
}

/// `proxy_set_buffer_bytes` on the current body: replaces the bytes
/// `[start, start + size)` with the new ones (clamped to the buffer, so
/// `(0, len)` replaces all, `(len, 0)` appends and `(0, 0)` prepends).
fn set_buffer(c: &mut C<'_>, kind: u32, start: u32, size: u32, ptr: u32, len: u32) -> HostResult {
    if kind != buffer::REQUEST_BODY && kind != buffer::RESPONSE_BODY {
        return Err(status::BAD_ARGUMENT.into());
    }
    let data = read(c, ptr, len)?;
    let s = c.data_mut().stream().ok_or(status::NOT_FOUND)?;
    let body = match &mut s.body {
        Some((k, body)) if *k == kind => body,
        _ => return Err(status::NOT_FOUND.into()),
    };
    let start = (start as usize).min(body.len());
    let end = start.saturating_add(size as usize).min(body.len());
    let mut out = bytes::BytesMut::with_capacity(body.len() - (end - start) + data.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(&data);
    out.extend_from_slice(&body[end..]);
    *body = out.freeze();
    Ok(())
}

/// `proxy_grpc_call`: a unary call to a configured upstream cluster,
/// over HTTP/2, for a stream that pauses to wait for it (answered through
/// `proxy_on_grpc_receive` or `proxy_on_grpc_close`). An unknown cluster
/// is refused at once with `BadArgument`, as for HTTP callouts (and as
/// Envoy does). Root contexts get `InternalFailure` (not supported).
fn grpc_call(c: &mut C<'_>, args: [(u32, u32); 5], timeout_ms: u32, ret: u32) -> HostResult {
    let [cluster, service, method, metadata, message] = args;
    if c.data_mut().stream().is_none() {
        return Err(status::INTERNAL_FAILURE.into());
    }
    let text = |c: &mut C<'_>, (p, l): (u32, u32)| -> HostResult<String> {
        String::from_utf8(read(c, p, l)?).map_err(|_| status::BAD_ARGUMENT.into())
    };
    let cluster = text(c, cluster)?;
    let service = text(c, service)?;
    let method = text(c, method)?;
    let raw = read(c, metadata.0, metadata.1)?;
    let pairs = abi::decode_pairs(&raw).ok_or(status::BAD_ARGUMENT)?;
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        let name = HeaderName::from_bytes(k).map_err(|_| status::BAD_ARGUMENT)?;
        let value = HeaderValue::from_bytes(v).map_err(|_| status::BAD_ARGUMENT)?;
        map.append(name, value);
    }
    let message = read(c, message.0, message.1)?;
    let req = crate::wasm::grpc::request(cluster, &service, &method, map, &message, timeout_ms);
    let timeout = std::time::Duration::from_millis(u64::from(timeout_ms.max(1)));
    let fut = crate::callout::start(req, timeout).map_err(|e| {
        tracing::debug!(filter = %c.data().plugin.name, error = %e, "wasm gRPC call refused");
        status::BAD_ARGUMENT
    })?;
    let token = c.data().plugin.next_token();
    let s = c.data_mut().stream().ok_or(status::BAD_ARGUMENT)?;
    s.calls.push((token, fut));
    s.grpc_calls.push(token);
    write_u32(c, ret, token)
}

/// Callouts a root context may have in flight at once.
const ROOT_CALLS_MAX: u32 = 64;

/// `proxy_http_call`: starts a callout to a configured upstream cluster
/// for the effective context. A stream gets its answer through
/// `proxy_on_http_call_response` when it pauses to wait for it; a root
/// context (from a tick, a queue, its configuration) gets it on the
/// ticker thread, like its ticks. A root context has at most
/// [`ROOT_CALLS_MAX`] callouts in flight; past that the call is refused.
fn http_call(
    c: &mut C<'_>,
    upstream: (u32, u32),
    headers: (u32, u32),
    body: (u32, u32),
    timeout_ms: u32,
    ret: u32,
) -> HostResult {
    let cluster = read(c, upstream.0, upstream.1)?;
    let cluster = String::from_utf8(cluster).map_err(|_| status::BAD_ARGUMENT)?;
    let raw = read(c, headers.0, headers.1)?;
    let pairs = abi::decode_pairs(&raw).ok_or(status::BAD_ARGUMENT)?;
    let mut method = None;
    let mut path = None;
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        match k {
            b":method" => {
                method = Some(http::Method::from_bytes(v).map_err(|_| status::BAD_ARGUMENT)?)
            }
            b":path" => {
                path = Some(String::from_utf8(v.to_vec()).map_err(|_| status::BAD_ARGUMENT)?)
            }
            b":authority" => {
                let value = HeaderValue::from_bytes(v).map_err(|_| status::BAD_ARGUMENT)?;
                map.insert(http::header::HOST, value);
            }
            _ if k.first() == Some(&b':') => {}
            _ => {
                let name = HeaderName::from_bytes(k).map_err(|_| status::BAD_ARGUMENT)?;
                let value = HeaderValue::from_bytes(v).map_err(|_| status::BAD_ARGUMENT)?;
                map.append(name, value);
            }
        }
    }
    let (Some(method), Some(path)) = (method, path) else {
        return Err(status::BAD_ARGUMENT.into());
    };
    let body = read(c, body.0, body.1)?;
    let root = c.data().effective == c.data().root_id;
    if root && c.data().root_calls >= ROOT_CALLS_MAX {
        return Err(status::BAD_ARGUMENT.into());
    }
    if !root && c.data_mut().stream().is_none() {
        return Err(status::BAD_ARGUMENT.into());
    }
    let req = crate::callout::CalloutRequest {
        cluster,
        method,
        path,
        headers: map,
        body: Bytes::from(body),
        grpc: false,
    };
    let timeout = std::time::Duration::from_millis(u64::from(timeout_ms.max(1)));
    if root {
        let token = c.data().plugin.next_token();
        let (slot, generation) = (c.data().slot, c.data().generation);
        let signals = c.data().plugin.signals.clone();
        crate::callout::start_detached(req, timeout, move |answer| {
            signals.call_done((slot, generation, token, answer));
        })
        .map_err(|e| {
            tracing::debug!(filter = %c.data().plugin.name, error = %e, "wasm root callout refused");
            status::BAD_ARGUMENT
        })?;
        c.data_mut().root_calls += 1;
        return write_u32(c, ret, token);
    }
    let fut = crate::callout::start(req, timeout).map_err(|e| {
        tracing::debug!(filter = %c.data().plugin.name, error = %e, "wasm callout refused");
        status::BAD_ARGUMENT
    })?;
    let token = c.data().plugin.next_token();
    let s = c.data_mut().stream().ok_or(status::BAD_ARGUMENT)?;
    s.calls.push((token, fut));
    write_u32(c, ret, token)
}

/// `proxy_send_local_response`. With a gRPC status (`grpc_status` >= 0,
/// the SDKs' `send_grpc_response`) the answer is a trailers-only gRPC
/// response: HTTP 200, `content-type: application/grpc`, `grpc-status`,
/// and the body as `grpc-message`, as Envoy sends it. A body without a
/// `content-type` of the guest's gets `text/plain`, as in Envoy.
fn local_response(
    c: &mut C<'_>,
    code: u32,
    body: (u32, u32),
    headers: (u32, u32),
    grpc_status: i32,
) -> HostResult {
    let status = u16::try_from(code)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or(status::BAD_ARGUMENT)?;
    let body = read(c, body.0, body.1)?;
    let raw = read(c, headers.0, headers.1)?;
    let pairs = abi::decode_pairs(&raw).ok_or(status::BAD_ARGUMENT)?;
    let mut map = HeaderMap::with_capacity(pairs.len() + 2);
    for (k, v) in pairs {
        let name = HeaderName::from_bytes(k).map_err(|_| status::BAD_ARGUMENT)?;
        let value = HeaderValue::from_bytes(v).map_err(|_| status::BAD_ARGUMENT)?;
        map.append(name, value);
    }
    let (status, body) = match u32::try_from(grpc_status) {
        Ok(grpc) if grpc <= 16 => {
            map.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            map.insert("grpc-status", HeaderValue::from(grpc));
            if !body.is_empty() {
                let message = percent_encode(&body);
                let value = HeaderValue::from_str(&message).map_err(|_| status::BAD_ARGUMENT)?;
                map.insert("grpc-message", value);
            }
            (StatusCode::OK, Vec::new())
        }
        _ => {
            if !body.is_empty() && !map.contains_key(CONTENT_TYPE) {
                map.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            (status, body)
        }
    };
    let s = c.data_mut().stream().ok_or(status::BAD_ARGUMENT)?;
    s.local = Some(LocalResponse {
        status,
        headers: map,
        body: Bytes::from(body),
        refusal: None,
    });
    Ok(())
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII but `%`
/// stays, everything else is `%XX`.
fn percent_encode(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for &b in raw {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn define_metric(c: &mut C<'_>, kind: u32, ptr: u32, len: u32, ret: u32) -> HostResult {
    let kind = MetricKind::from_abi(kind).ok_or(status::BAD_ARGUMENT)?;
    let name = read(c, ptr, len)?;
    let name = std::str::from_utf8(&name).map_err(|_| status::BAD_ARGUMENT)?;
    if name.is_empty() {
        return Err(status::BAD_ARGUMENT.into());
    }
    let id = c
        .data()
        .plugin
        .metrics
        .define(kind, name)
        .ok_or(status::BAD_ARGUMENT)?;
    write_u32(c, ret, id)
}
