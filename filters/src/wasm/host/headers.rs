//! Header maps: `proxy_{get,set}_header_map_pairs` and the single-value
//! calls. The request map is the request head during the request phase
//! (and a read-only copy of it afterwards, so the response phase and
//! `on_log` can read it); the response map exists during the response
//! phase. Like Envoy, the maps include pseudo-headers: `:method`, `:path`,
//! `:authority`, `:scheme` on requests and `:status` on responses, and
//! setting `:path`, `:method`, `:authority` or `:status` changes the head.
//! As in Envoy (whose HTTP/1 codec turns `Host` into `:authority`), the
//! request map has `:authority` and no `host`: `host` is its alias for
//! single-header calls, and `:authority` goes back out as `Host`.

use http::header::HOST;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use wasmtime::{Caller, Linker};

use crate::callout::CalloutResponse;
use crate::wasm::abi::{self, map, status};
use crate::wasm::state::{
    finish, give, read, HostResult, HostState, KnownName, ReqHead, RespHead, KNOWN_NAMES,
    KNOWN_VALUE_MAX,
};

type C<'a> = Caller<'a, HostState>;

pub(super) fn add(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, kind: u32, rptr: u32, rsize: u32| {
            let enc = pairs(c.data_mut(), kind);
            finish(give(&mut c, &enc, rptr, rsize))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, kind: u32, ptr: u32, len: u32| {
            finish(read(&mut c, ptr, len).and_then(|raw| set_pairs(c.data_mut(), kind, &raw)))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, kind: u32, kptr: u32, klen: u32, rptr: u32, rsize: u32| {
            finish(read(&mut c, kptr, klen).and_then(|key| {
                let value = value(c.data_mut(), kind, &key).ok_or(status::NOT_FOUND)?;
                give(&mut c, &value, rptr, rsize)
            }))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C<'_>, kind: u32, kptr: u32, klen: u32, vptr: u32, vlen: u32| {
            finish(edit(
                &mut c,
                kind,
                (kptr, klen),
                Some((vptr, vlen)),
                Op::Replace,
            ))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C<'_>, kind: u32, kptr: u32, klen: u32, vptr: u32, vlen: u32| {
            finish(edit(
                &mut c,
                kind,
                (kptr, klen),
                Some((vptr, vlen)),
                Op::Add,
            ))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, kind: u32, kptr: u32, klen: u32| {
            finish(edit(&mut c, kind, (kptr, klen), None, Op::Remove))
        },
    )?;
    Ok(())
}

/// A header map the guest can address right now.
enum Map<'a> {
    Req(&'a mut ReqHead),
    Resp(&'a mut RespHead),
    /// A callout's answer: headers with `:status`.
    Call(&'a mut CalloutResponse),
    /// Trailers (of the body in the current trailer callback, or of a
    /// callout's answer): no pseudo-headers.
    Plain(&'a mut http::HeaderMap),
    /// A map type flashgate does not have (gRPC metadata) or that does not
    /// exist in this phase: reads see an empty map, writes are refused.
    Absent,
}

fn map_of(s: &mut HostState, kind: u32) -> Map<'_> {
    match kind {
        map::CALL_RESPONSE_HEADERS => {
            return match s.call_response() {
                Some(Ok(r)) => Map::Call(r),
                _ => Map::Absent,
            }
        }
        map::CALL_RESPONSE_TRAILERS => {
            return match s.call_response() {
                Some(Ok(r)) => Map::Plain(&mut r.trailers),
                _ => Map::Absent,
            }
        }
        _ => {}
    }
    let Some(stream) = s.stream() else {
        return Map::Absent;
    };
    match kind {
        map::REQUEST_HEADERS if stream.has_req => Map::Req(&mut stream.req),
        map::RESPONSE_HEADERS if stream.has_resp => Map::Resp(&mut stream.resp),
        map::REQUEST_TRAILERS | map::RESPONSE_TRAILERS => match stream.trailers.as_mut() {
            Some((k, t)) if *k == kind => Map::Plain(t),
            _ => Map::Absent,
        },
        _ => Map::Absent,
    }
}

fn authority(h: &ReqHead) -> Option<&[u8]> {
    match h.uri.authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => h.headers.view().get("host"),
    }
}

fn path(h: &ReqHead) -> &str {
    h.uri.path_and_query().map_or("/", |p| p.as_str())
}

/// The request's pseudo-headers, Envoy's order.
fn req_pseudo(h: &ReqHead) -> Vec<(&'static str, &[u8])> {
    let mut out = Vec::with_capacity(4);
    if let Some(a) = authority(h) {
        out.push((":authority", a));
    }
    out.push((":path", path(h).as_bytes()));
    out.push((":method", h.method.as_str().as_bytes()));
    out.push((":scheme", h.uri.scheme_str().unwrap_or("http").as_bytes()));
    out
}

/// The whole map in the pairs encoding; an absent map is an empty one
/// (which `give` hands over as a null pointer and size 0).
pub(crate) fn pairs(s: &mut HostState, kind: u32) -> Vec<u8> {
    match map_of(s, kind) {
        Map::Req(h) => {
            let pseudo = req_pseudo(h);
            let all = pseudo
                .iter()
                .map(|(k, v)| (k.as_bytes(), *v))
                .chain(h.headers.view().iter().filter(|(k, _)| *k != b"host"));
            abi::encode_pairs(&all.collect::<Vec<_>>())
        }
        Map::Resp(h) => with_status(&h.status, h.headers.view().iter()),
        Map::Call(r) => with_status(&r.status, bytes_of(&r.headers)),
        Map::Plain(t) => encode_map(bytes_of(t)),
        Map::Absent => Vec::new(),
    }
}

/// A map's names and values as bytes.
fn bytes_of(map: &http::HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
    map.iter()
        .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()))
}

fn with_status<'a>(
    status: &'a StatusCode,
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Vec<u8> {
    let all = std::iter::once((&b":status"[..], status.as_str().as_bytes())).chain(headers);
    abi::encode_pairs(&all.collect::<Vec<_>>())
}

/// Headers in the pairs encoding (trailers, the `request.headers` property).
pub(crate) fn encode_map<'a>(headers: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    abi::encode_pairs(&headers.collect::<Vec<_>>())
}

/// Several values under one name read as one, comma-joined (Envoy returns
/// the first; joining loses nothing). `None` when there is no value.
fn joined<'a>(mut vals: impl Iterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let first = vals.next()?;
    let mut out = first.to_vec();
    for v in vals {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v);
    }
    Some(out)
}

/// `key` in lower case, copied only if it is not already.
fn lower(key: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if key.iter().any(u8::is_ascii_uppercase) {
        std::borrow::Cow::Owned(key.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(key)
    }
}

fn value(s: &mut HostState, kind: u32, key: &[u8]) -> Option<Vec<u8>> {
    let key = lower(key);
    if kind == map::REQUEST_HEADERS && &*key == b"host" {
        return value(s, kind, b":authority");
    }
    // Lookups by `&str` hash the name without building a `HeaderName`
    // (no allocation for names the `http` crate does not know).
    let name = std::str::from_utf8(&key).ok();
    match map_of(s, kind) {
        Map::Req(h) => {
            if key.first() == Some(&b':') {
                return req_pseudo(h)
                    .into_iter()
                    .find(|(k, _)| k.as_bytes() == &*key)
                    .map(|(_, v)| v.to_vec());
            }
            joined(h.headers.view().get_all(name?))
        }
        Map::Resp(h) => {
            if &*key == b":status" {
                return Some(h.status.as_str().as_bytes().to_vec());
            }
            joined(h.headers.view().get_all(name?))
        }
        Map::Call(r) => {
            if &*key == b":status" {
                return Some(r.status.as_str().as_bytes().to_vec());
            }
            joined(r.headers.get_all(name?).iter().map(|v| v.as_bytes()))
        }
        Map::Plain(t) => joined(t.get_all(name?).iter().map(|v| v.as_bytes())),
        Map::Absent => None,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Replace,
    Add,
    Remove,
}

fn edit(c: &mut C<'_>, kind: u32, key: (u32, u32), val: Option<(u32, u32)>, op: Op) -> HostResult {
    // The common case, a regular header: name and value are parsed
    // straight out of guest memory, without intermediate copies.
    if let Some((name, value)) = regular(c, key, val)? {
        if kind != map::REQUEST_HEADERS || name != HOST {
            return apply_regular(c.data_mut(), kind, name, value, op);
        }
    }
    let key = read(c, key.0, key.1)?;
    let val = match val {
        Some((p, l)) => read(c, p, l)?,
        None => Vec::new(),
    };
    apply(c.data_mut(), kind, &key, &val, op)
}

/// A regular (not pseudo) header name and its value, parsed in place;
/// `None` for a pseudo-header. Names (and values) the instance saw before
/// are not parsed again ([`KnownName`]).
fn regular(
    c: &mut C<'_>,
    key: (u32, u32),
    val: Option<(u32, u32)>,
) -> HostResult<Option<(HeaderName, Option<HeaderValue>)>> {
    let mem = c.data().memory.ok_or(status::INTERNAL_FAILURE)?;
    let (data, state) = mem.data_and_store_mut(&mut *c);
    let data: &[u8] = data;
    let key = guest_slice(data, key)?;
    if key.first() == Some(&b':') {
        return Ok(None);
    }
    let names = &mut state.names;
    let at = match names.iter().position(|n| n.name.as_str().as_bytes() == key) {
        Some(at) => Some(at),
        None => {
            // `from_bytes` lower-cases the name.
            let name = HeaderName::from_bytes(key).map_err(|_| status::BAD_ARGUMENT)?;
            if names.len() < KNOWN_NAMES && !names.iter().any(|n| n.name == name) {
                names.push(KnownName {
                    name,
                    last: Vec::new(),
                    value: None,
                });
                Some(names.len() - 1)
            } else {
                let value = match val {
                    Some(v) => Some(
                        HeaderValue::from_bytes(guest_slice(data, v)?)
                            .map_err(|_| status::BAD_ARGUMENT)?,
                    ),
                    None => None,
                };
                return Ok(Some((name, value)));
            }
        }
    };
    let Some(known) = at.and_then(|i| names.get_mut(i)) else {
        return Err(status::INTERNAL_FAILURE.into());
    };
    let value = match val {
        Some(v) => Some(known_value(known, guest_slice(data, v)?)?),
        None => None,
    };
    Ok(Some((known.name.clone(), value)))
}

/// `raw` as a header value, reusing the one `known` kept when it is the
/// same (see [`KnownName`]).
fn known_value(known: &mut KnownName, raw: &[u8]) -> HostResult<HeaderValue> {
    if let Some(v) = known.value.as_ref().filter(|v| v.as_bytes() == raw) {
        return Ok(v.clone());
    }
    let value = HeaderValue::from_bytes(raw).map_err(|_| status::BAD_ARGUMENT)?;
    if raw.len() <= KNOWN_VALUE_MAX {
        if known.last == raw {
            known.value = Some(value.clone());
        } else {
            known.value = None;
            known.last.clear();
            known.last.extend_from_slice(raw);
        }
    }
    Ok(value)
}

fn guest_slice(data: &[u8], (ptr, len): (u32, u32)) -> HostResult<&[u8]> {
    let start = ptr as usize;
    start
        .checked_add(len as usize)
        .and_then(|end| data.get(start..end))
        .ok_or_else(|| status::BAD_ARGUMENT.into())
}

fn apply_regular(
    s: &mut HostState,
    kind: u32,
    name: HeaderName,
    value: Option<HeaderValue>,
    op: Op,
) -> HostResult {
    let headers = match map_of(s, kind) {
        Map::Req(h) => h.headers.map_mut(),
        Map::Resp(h) => h.headers.map_mut(),
        Map::Call(r) => &mut r.headers,
        Map::Plain(t) => t,
        Map::Absent => return Err(status::BAD_ARGUMENT.into()),
    };
    match (op, value) {
        (Op::Remove, _) => {
            headers.remove(name);
        }
        (Op::Replace, Some(v)) => {
            headers.insert(name, v);
        }
        (Op::Add, Some(v)) => {
            headers.append(name, v);
        }
        (_, None) => return Err(status::BAD_ARGUMENT.into()),
    }
    Ok(())
}

fn apply(s: &mut HostState, kind: u32, key: &[u8], val: &[u8], op: Op) -> HostResult {
    let mut key = key.to_ascii_lowercase();
    if kind == map::REQUEST_HEADERS && key == b"host" {
        // The request map's `host` is `:authority` (see the module doc).
        key = b":authority".to_vec();
    }
    let map = map_of(s, kind);
    if matches!(map, Map::Absent) {
        return Err(status::BAD_ARGUMENT.into());
    }
    if key.first() == Some(&b':') {
        // Pseudo-headers are single-valued: add means replace, and removing
        // one is a no-op (a request without a path makes no sense).
        if op == Op::Remove {
            return Ok(());
        }
        return set_pseudo(map, &key, val);
    }
    let name = HeaderName::from_bytes(&key).map_err(|_| status::BAD_ARGUMENT)?;
    let headers = match map {
        Map::Req(h) => h.headers.map_mut(),
        Map::Resp(h) => h.headers.map_mut(),
        Map::Call(r) => &mut r.headers,
        Map::Plain(t) => t,
        Map::Absent => return Err(status::BAD_ARGUMENT.into()),
    };
    match op {
        Op::Remove => {
            headers.remove(name);
        }
        Op::Replace => {
            let value = HeaderValue::from_bytes(val).map_err(|_| status::BAD_ARGUMENT)?;
            headers.insert(name, value);
        }
        Op::Add => {
            let value = HeaderValue::from_bytes(val).map_err(|_| status::BAD_ARGUMENT)?;
            headers.append(name, value);
        }
    }
    Ok(())
}

fn set_pseudo(map: Map<'_>, key: &[u8], val: &[u8]) -> HostResult {
    let bad = || status::BAD_ARGUMENT;
    match (map, key) {
        (Map::Req(h), b":path") => {
            let pq = PathAndQuery::try_from(val).map_err(|_| bad())?;
            let mut parts = std::mem::take(&mut h.uri).into_parts();
            parts.path_and_query = Some(pq);
            h.uri = Uri::from_parts(parts).map_err(|_| bad())?;
        }
        (Map::Req(h), b":method") => {
            h.method = Method::from_bytes(val).map_err(|_| bad())?;
        }
        (Map::Req(h), b":authority") => {
            let value = HeaderValue::from_bytes(val).map_err(|_| bad())?;
            if h.uri.authority().is_some() {
                let a = Authority::try_from(val).map_err(|_| bad())?;
                let mut parts = std::mem::take(&mut h.uri).into_parts();
                parts.authority = Some(a);
                h.uri = Uri::from_parts(parts).map_err(|_| bad())?;
            }
            h.headers.map_mut().insert(HOST, value);
        }
        // The scheme is the listener's business; accepted and ignored.
        (Map::Req(_), b":scheme") => {}
        (Map::Resp(h), b":status") => {
            let code = std::str::from_utf8(val)
                .ok()
                .and_then(|v| v.parse::<u16>().ok());
            h.status = code
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(bad)?;
        }
        _ => return Err(bad().into()),
    }
    Ok(())
}

fn set_pairs(s: &mut HostState, kind: u32, raw: &[u8]) -> HostResult {
    let pairs = abi::decode_pairs(raw).ok_or(status::BAD_ARGUMENT)?;
    // Validate everything before changing anything.
    let mut regular = Vec::with_capacity(pairs.len());
    let mut pseudo = Vec::new();
    for (k, v) in pairs {
        let mut k = k.to_ascii_lowercase();
        if kind == map::REQUEST_HEADERS && k == b"host" {
            k = b":authority".to_vec();
        }
        if k.first() == Some(&b':') {
            pseudo.push((k, v));
        } else {
            let name = HeaderName::from_bytes(&k).map_err(|_| status::BAD_ARGUMENT)?;
            let value = HeaderValue::from_bytes(v).map_err(|_| status::BAD_ARGUMENT)?;
            regular.push((name, value));
        }
    }
    match map_of(s, kind) {
        Map::Req(ReqHead { headers, .. }) => {
            // `host` is not in the guest's view of the map: it stays unless
            // the new pairs set `:authority` (or `host`).
            let map = headers.map_mut();
            let host = map.remove(HOST);
            map.clear();
            for (k, v) in regular {
                map.append(k, v);
            }
            if let (Some(host), false) = (host, pseudo.iter().any(|(k, _)| k == b":authority")) {
                map.insert(HOST, host);
            }
        }
        Map::Resp(RespHead { headers, .. }) => {
            let map = headers.map_mut();
            map.clear();
            for (k, v) in regular {
                map.append(k, v);
            }
        }
        Map::Call(r) => {
            r.headers.clear();
            for (k, v) in regular {
                r.headers.append(k, v);
            }
        }
        Map::Plain(t) => {
            t.clear();
            for (k, v) in regular {
                t.append(k, v);
            }
        }
        Map::Absent => return Err(status::BAD_ARGUMENT.into()),
    }
    for (k, v) in pseudo {
        set_pseudo(map_of(s, kind), &k, v)?;
    }
    Ok(())
}
