//! Properties: `proxy_get_property` / `proxy_set_property`.
//!
//! Paths are NUL-separated segments (`request\0path`). Strings are returned
//! as their bytes, integers as 8-byte little-endian (as Envoy does), maps
//! in the pairs encoding. Properties a guest sets are visible to that
//! context (or, from the root context, to every context of the instance)
//! and shadow built-in ones.

use wasmtime::{Caller, Linker};

use super::headers::encode_map;
use crate::wasm::abi::{self, status};
use crate::wasm::state::{finish, give, read, HeadersRef, HostState};

type C<'a> = Caller<'a, HostState>;

/// Largest value a guest may store as a property.
const MAX_PROPERTY: usize = 64 << 10;

pub(super) fn add(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, ptr: u32, len: u32, rptr: u32, rsize: u32| {
            finish(read(&mut c, ptr, len).and_then(|path| {
                let value = lookup(c.data_mut(), &path).ok_or(status::NOT_FOUND)?;
                give(&mut c, &value, rptr, rsize)
            }))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, ptr: u32, len: u32, vptr: u32, vlen: u32| {
            finish((|| {
                let path = read(&mut c, ptr, len)?;
                let value = read(&mut c, vptr, vlen)?;
                if path.is_empty() || value.len() > MAX_PROPERTY {
                    return Err(status::BAD_ARGUMENT.into());
                }
                let s = c.data_mut();
                match s.stream() {
                    Some(stream) => stream.props.insert(path, value),
                    None => s.root_props.insert(path, value),
                };
                Ok(())
            })())
        },
    )?;
    Ok(())
}

fn int(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// The value of the property at `path`, if there is one.
pub(crate) fn lookup(s: &mut HostState, path: &[u8]) -> Option<Vec<u8>> {
    if let Some(v) = s.stream().and_then(|st| st.props.get(path)) {
        return Some(v.clone());
    }
    if let Some(v) = s.root_props.get(path) {
        return Some(v.clone());
    }
    let segs: Vec<&str> = abi::split_path(path)
        .into_iter()
        .map(std::str::from_utf8)
        .collect::<Result<_, _>>()
        .ok()?;
    let plugin = s.plugin.clone();
    match segs.as_slice() {
        ["plugin_name"] => return Some(plugin.name.as_bytes().to_vec()),
        ["plugin_vm_id"] => return Some(plugin.vm_id.as_bytes().to_vec()),
        ["plugin_root_id"] => return Some(plugin.root_id.as_bytes().to_vec()),
        _ => {}
    }
    let st = s.stream()?;
    let info = &st.info;
    match segs.as_slice() {
        ["flashgate", "load_level"] => Some(int(u64::from(info.load_level))),
        ["flashgate", "bot_score"] => Some(int(u64::from(info.bot_score))),
        ["flashgate", "ja4"] => info.ja4.as_ref().map(|f| f.as_bytes().to_vec()),
        ["flashgate", "route"] => Some(info.route.as_bytes().to_vec()),
        ["flashgate", "priority"] => Some(info.priority.as_str().as_bytes().to_vec()),
        ["flashgate", "request_id"] | ["request", "id"] => {
            Some(info.request_id.as_bytes().to_vec())
        }
        ["source", "address"] => Some(info.client_ip.to_string().into_bytes()),
        ["request", rest @ ..] => {
            let h = st.req()?;
            let headers = h.headers.view();
            match rest {
                ["path"] => Some(h.uri.path_and_query().map_or("/", |p| p.as_str()).into()),
                ["url_path"] => Some(h.uri.path().as_bytes().to_vec()),
                ["query"] => Some(h.uri.query().unwrap_or("").as_bytes().to_vec()),
                ["method"] => Some(h.method.as_str().as_bytes().to_vec()),
                ["scheme"] => Some(h.uri.scheme_str().unwrap_or("http").as_bytes().to_vec()),
                ["host"] => h
                    .uri
                    .authority()
                    .map(|a| a.as_str().as_bytes().to_vec())
                    .or_else(|| headers.get("host").map(<[u8]>::to_vec)),
                ["protocol"] => Some(format!("{:?}", h.version).into_bytes()),
                ["useragent"] => header(headers, "user-agent"),
                ["referer"] => header(headers, "referer"),
                ["headers"] => Some(encode_map(headers.iter())),
                ["headers", name] => header(headers, name),
                _ => None,
            }
        }
        ["response", rest @ ..] => {
            let h = st.resp()?;
            let headers = h.headers.view();
            match rest {
                ["code"] => Some(int(u64::from(h.status.as_u16()))),
                ["headers"] => Some(encode_map(headers.iter())),
                ["headers", name] => header(headers, name),
                _ => None,
            }
        }
        _ => None,
    }
}

fn header(h: HeadersRef<'_>, name: &str) -> Option<Vec<u8>> {
    let name = name.to_ascii_lowercase();
    h.get(&name).map(<[u8]>::to_vec)
}
