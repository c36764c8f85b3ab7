//! Hot-item limits (Sentinel's hot-parameter rules): one budget per value
//! taken from the request (a path segment, a query parameter, or a field
//! of the checkout's JSON body), so one hot SKU cannot eat the budget of
//! the others; `overrides` give chosen values a rate of their own.
//!
//! The values tracked are an LRU of `rate_limit.hot_values` entries: the
//! values asked for most recently keep their state, and a value pushed
//! out by many others starts again with a full burst (a hot value, asked
//! for all the time, is the last to be pushed out).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::request::Parts;
use lru::LruCache;

use super::local::Direct;
use super::Policy;
use crate::config::{HotLimit, HotSource, LimitSpec, Scope};
use crate::observe::metrics::Metrics;

/// Longest value used as a key; longer ones are cut (at a char boundary).
const MAX_VALUE: usize = 256;

pub(super) struct Hot {
    source: HotSource,
    default: (Policy, LimitSpec),
    overrides: HashMap<String, (Policy, LimitSpec)>,
    route_burst: Option<u32>,
    divide: u32,
    values: Mutex<LruCache<Box<str>, Arc<Direct>>>,
}

impl Hot {
    pub(super) fn new(
        c: &HotLimit,
        route_burst: Option<u32>,
        divide: u32,
        scope: Scope,
        cap: usize,
        route: &str,
        metrics: &Metrics,
    ) -> Hot {
        let policy = |spec: LimitSpec| {
            (
                Policy::new("hot", spec, route_burst, scope, route, metrics),
                spec,
            )
        };
        Hot {
            source: c.source(),
            default: policy(c.spec()),
            overrides: c
                .overrides
                .iter()
                .map(|(v, s)| (v.clone(), policy(*s)))
                .collect(),
            route_burst,
            divide,
            values: Mutex::new(LruCache::new(
                NonZeroUsize::new(cap.max(1)).expect("at least 1"),
            )),
        }
    }

    /// The value from the path or the query; `None` for a body field or
    /// when the request has none.
    pub(super) fn value_of(&self, head: &Parts) -> Option<String> {
        match &self.source {
            HotSource::PathSegment(n) => head
                .uri
                .path()
                .trim_start_matches('/')
                .split('/')
                .nth(*n)
                .filter(|s| !s.is_empty())
                .map(|s| cut(percent_decode(s))),
            HotSource::Query(name) => head.uri.query().and_then(|q| {
                q.split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k) == *name && !v.is_empty()).then(|| cut(percent_decode(v)))
                })
            }),
            HotSource::BodyField(_) => None,
        }
    }

    /// The value of a body field (a string or a number) of a JSON body.
    pub(super) fn value_of_body(&self, body: &Bytes) -> Option<String> {
        let HotSource::BodyField(field) = &self.source else {
            return None;
        };
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        match v.get(field)? {
            serde_json::Value::String(s) if !s.is_empty() => Some(cut(s.clone())),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// The policy and the local budget of `value` (made on first use).
    pub(super) fn limit_for(&self, value: &str) -> (&Policy, Arc<Direct>) {
        let (policy, spec) = self.overrides.get(value).unwrap_or(&self.default);
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        let local = match values.get(value) {
            Some(d) => d.clone(),
            None => {
                let d = Arc::new(Direct::new(*spec, self.route_burst, self.divide));
                values.put(value.into(), d.clone());
                d
            }
        };
        (policy, local)
    }

    /// Nothing to do: the LRU bounds the values by itself.
    pub(super) fn sweep(&self) {}

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.values.lock().unwrap().len()
    }
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_VALUE {
        let mut end = MAX_VALUE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// `%XX` decoded (and `+` as a space), so that `sku=a%62c` is `abc`;
/// invalid escapes stay as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn hot(toml: &str) -> Hot {
        let c = Config::parse(&format!(
            "{}rate_limit = {{ hot = {toml} }}\n",
            crate::config::TEST_BASE
        ))
        .unwrap();
        let h = c.routes[0]
            .rate_limit
            .as_ref()
            .unwrap()
            .hot
            .clone()
            .unwrap();
        Hot::new(&h, None, 1, Scope::Local, 2, "r", &Metrics::new())
    }

    fn head(uri: &str) -> Parts {
        http::Request::get(uri).body(()).unwrap().into_parts().0
    }

    #[test]
    fn values_from_path_query_and_body() {
        let h = hot("{ path_segment = 1, rate = \"1/s\" }");
        assert_eq!(
            h.value_of(&head("/items/sku-1/x")).as_deref(),
            Some("sku-1")
        );
        assert_eq!(h.value_of(&head("/items")), None);
        let h = hot("{ query = \"sku\", rate = \"1/s\" }");
        assert_eq!(
            h.value_of(&head("/p?a=1&sku=a%62c")).as_deref(),
            Some("abc")
        );
        assert_eq!(h.value_of(&head("/p?a=1")), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn overrides_and_a_capped_lru() {
        let h = hot("{ query = \"sku\", rate = \"1/m\", burst = 3, overrides = { hot = { rate = \"1/m\", burst = 1 } } }");
        let (p, d) = h.limit_for("hot");
        assert_eq!(p.value, "\"hot\";q=1;w=60");
        assert!(matches!(
            d.check(),
            super::super::local::Decision::Allowed { .. }
        ));
        assert!(matches!(
            d.check(),
            super::super::local::Decision::Limited { .. }
        ));
        let (p, _) = h.limit_for("cold");
        assert_eq!(p.value, "\"hot\";q=3;w=180");
        h.limit_for("other");
        assert_eq!(h.tracked(), 2, "the LRU holds at most hot_values");
    }
}
