//! Filters compiled into the gateway. They cost no sandbox crossing, so the
//! common header edits an operator needs do not require a Wasm module.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::{FilterError, FilterFactory, Flow, StreamFilter, StreamInfo};

/// The native filter kinds a `[[filters]]` entry may name with `native = "..."`.
pub const KNOWN: &[&str] = &["headers"];

/// Builds the native filter `kind` from its JSON config string.
pub fn build(kind: &str, name: &str, config: &str) -> Result<Arc<dyn FilterFactory>, FilterError> {
    match kind {
        "headers" => Ok(Arc::new(HeadersFilter::from_config(name, config)?)),
        other => Err(FilterError::UnknownNative(other.to_string())),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HeadersConfig {
    #[serde(default)]
    request_set: Vec<(String, String)>,
    #[serde(default)]
    request_remove: Vec<String>,
    #[serde(default)]
    response_set: Vec<(String, String)>,
    #[serde(default)]
    response_remove: Vec<String>,
}

/// Sets and removes request and response headers: `native = "headers"`.
///
/// Config (JSON): `{"request_set": [["x-a", "1"]], "request_remove": ["x-b"],
/// "response_set": [["x-frame-options", "DENY"]], "response_remove": ["server"]}`.
/// Pairs are lists rather than a map so that the order is the operator's.
pub struct HeadersFilter {
    name: String,
    edits: Arc<HeaderEdits>,
}

struct HeaderEdits {
    request_set: Vec<(HeaderName, HeaderValue)>,
    request_remove: Vec<HeaderName>,
    response_set: Vec<(HeaderName, HeaderValue)>,
    response_remove: Vec<HeaderName>,
}

fn parse_pairs(
    pairs: Vec<(String, String)>,
) -> Result<Vec<(HeaderName, HeaderValue)>, FilterError> {
    pairs
        .into_iter()
        .map(|(n, v)| {
            let name = HeaderName::try_from(n.as_str())
                .map_err(|_| FilterError::Config(format!("invalid header name {n:?}")))?;
            let value = HeaderValue::try_from(v.as_str())
                .map_err(|_| FilterError::Config(format!("invalid value for header {n:?}")))?;
            Ok((name, value))
        })
        .collect()
}

fn parse_names(names: Vec<String>) -> Result<Vec<HeaderName>, FilterError> {
    names
        .into_iter()
        .map(|n| {
            HeaderName::try_from(n.as_str())
                .map_err(|_| FilterError::Config(format!("invalid header name {n:?}")))
        })
        .collect()
}

impl HeadersFilter {
    pub fn from_config(name: &str, config: &str) -> Result<Self, FilterError> {
        let cfg: HeadersConfig = if config.trim().is_empty() {
            HeadersConfig::default()
        } else {
            serde_json::from_str(config).map_err(|e| FilterError::Config(e.to_string()))?
        };
        Ok(HeadersFilter {
            name: name.to_string(),
            edits: Arc::new(HeaderEdits {
                request_set: parse_pairs(cfg.request_set)?,
                request_remove: parse_names(cfg.request_remove)?,
                response_set: parse_pairs(cfg.response_set)?,
                response_remove: parse_names(cfg.response_remove)?,
            }),
        })
    }
}

fn apply(headers: &mut HeaderMap, set: &[(HeaderName, HeaderValue)], remove: &[HeaderName]) {
    for name in remove {
        headers.remove(name);
    }
    for (name, value) in set {
        headers.insert(name.clone(), value.clone());
    }
}

impl FilterFactory for HeadersFilter {
    fn name(&self) -> &str {
        &self.name
    }
    fn new_stream(&self) -> Box<dyn StreamFilter> {
        Box::new(HeadersStream(self.edits.clone()))
    }
}

struct HeadersStream(Arc<HeaderEdits>);

impl StreamFilter for HeadersStream {
    fn on_request_headers(&mut self, req: &mut http::request::Parts, _: &StreamInfo) -> Flow {
        apply(
            &mut req.headers,
            &self.0.request_set,
            &self.0.request_remove,
        );
        Flow::Continue
    }
    fn on_response_headers(&mut self, resp: &mut http::response::Parts, _: &StreamInfo) -> Flow {
        apply(
            &mut resp.headers,
            &self.0.response_set,
            &self.0.response_remove,
        );
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_config() {
        assert!(matches!(
            build("headers", "h", r#"{"request_set": [["bad name", "x"]]}"#),
            Err(FilterError::Config(_))
        ));
        assert!(matches!(
            build("headers", "h", r#"{"unknown": 1}"#),
            Err(FilterError::Config(_))
        ));
        assert!(matches!(
            build("nope", "h", ""),
            Err(FilterError::UnknownNative(_))
        ));
    }

    #[test]
    fn edits_both_directions() {
        let f = build(
            "headers",
            "h",
            r#"{"request_set": [["x-a", "1"]], "request_remove": ["x-b"],
                "response_set": [["x-c", "2"]], "response_remove": ["server"]}"#,
        )
        .unwrap();
        let info = StreamInfo {
            client_ip: "127.0.0.1".parse().unwrap(),
            route: "r".into(),
            priority: crate::Priority::Normal,
            load_level: 0,
            bot_score: 99,
            ja4: None,
            request_id: http::HeaderValue::from_static("id"),
            end_of_stream: true,
        };
        let mut s = f.new_stream();
        let (mut req, ()) = http::Request::builder()
            .header("x-b", "gone")
            .header("x-a", "old")
            .body(())
            .unwrap()
            .into_parts();
        assert!(matches!(
            s.on_request_headers(&mut req, &info),
            Flow::Continue
        ));
        assert_eq!(req.headers["x-a"], "1");
        assert!(req.headers.get("x-b").is_none());
        let (mut resp, ()) = http::Response::builder()
            .header("server", "origin")
            .body(())
            .unwrap()
            .into_parts();
        s.on_response_headers(&mut resp, &info);
        assert_eq!(resp.headers["x-c"], "2");
        assert!(resp.headers.get("server").is_none());
    }
}
