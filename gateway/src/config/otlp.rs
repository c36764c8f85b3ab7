//! `[tracing]`: OpenTelemetry span export over OTLP/HTTP (see
//! `gateway::otel`). Absent = no exporter. Every key and its default is in
//! `docs/config.md`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ConfigError, Dur};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces URL,
    /// `http://127.0.0.1:4318/v1/traces`; a URL without a path gets
    /// `/v1/traces`.
    pub endpoint: String,
    /// The `service.name` resource attribute.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Share of new traces (no sampled-or-not decision from the client)
    /// that are sampled; a client's `traceparent` decision is honoured.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Finished spans waiting for export at most; more are dropped (and
    /// counted), never waited for.
    #[serde(default = "default_max_queue_size")]
    pub max_queue_size: usize,
    /// Spans in one export request at most.
    #[serde(default = "default_max_export_batch_size")]
    pub max_export_batch_size: usize,
    /// A batch goes out at least this often (sooner when it is full).
    #[serde(default = "default_scheduled_delay")]
    pub scheduled_delay: Dur,
    /// Bound on one export, retries included.
    #[serde(default = "default_export_timeout")]
    pub export_timeout: Dur,
    /// Extra headers on every export request (a collector's API key).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_service_name() -> String {
    "flashgate".into()
}
fn default_sample_ratio() -> f64 {
    1.0
}
fn default_max_queue_size() -> usize {
    2048
}
fn default_max_export_batch_size() -> usize {
    512
}
fn default_scheduled_delay() -> Dur {
    Dur(std::time::Duration::from_secs(5))
}
fn default_export_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}

/// Largest `max_queue_size`: a queue of finished spans (a few hundred bytes
/// each) must not be able to take the process's memory.
const MAX_QUEUE: usize = 1_000_000;

impl TracingConfig {
    /// The URL export requests go to: `endpoint`, with `/v1/traces` when it
    /// has no path.
    pub fn traces_url(&self) -> Result<http::Uri, String> {
        let uri: http::Uri = self
            .endpoint
            .parse()
            .map_err(|e| format!("invalid URL {:?}: {e}", self.endpoint))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(
                    "https is not supported yet: send to a collector or agent on the \
                     node or in the cluster over http://"
                        .into(),
                )
            }
            _ => {
                return Err(format!(
                    "invalid URL {:?}: expected http://host:port/path",
                    self.endpoint
                ))
            }
        }
        let Some(auth) = uri.authority() else {
            return Err(format!("invalid URL {:?}: no host", self.endpoint));
        };
        if auth.as_str().contains('@') {
            return Err("credentials in the URL are not allowed (use tracing.headers)".into());
        }
        if auth.host().is_empty() {
            return Err(format!("invalid URL {:?}: no host", self.endpoint));
        }
        if matches!(uri.path(), "" | "/") && uri.query().is_none() {
            return format!("http://{auth}/v1/traces")
                .parse()
                .map_err(|e| format!("invalid URL {:?}: {e}", self.endpoint));
        }
        Ok(uri)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let p = "tracing";
        self.traces_url()
            .map_err(|m| ConfigError::at(format!("{p}.endpoint"), m))?;
        if self.service_name.trim().is_empty() {
            return Err(ConfigError::at(
                format!("{p}.service_name"),
                "must not be empty",
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(ConfigError::at(
                format!("{p}.sample_ratio"),
                "must be between 0.0 and 1.0",
            ));
        }
        if self.max_queue_size == 0 || self.max_queue_size > MAX_QUEUE {
            return Err(ConfigError::at(
                format!("{p}.max_queue_size"),
                format!("must be between 1 and {MAX_QUEUE}"),
            ));
        }
        if self.max_export_batch_size == 0 || self.max_export_batch_size > self.max_queue_size {
            return Err(ConfigError::at(
                format!("{p}.max_export_batch_size"),
                format!(
                    "must be between 1 and max_queue_size ({})",
                    self.max_queue_size
                ),
            ));
        }
        for (key, d) in [
            ("scheduled_delay", self.scheduled_delay),
            ("export_timeout", self.export_timeout),
        ] {
            if d.0.is_zero() {
                return Err(ConfigError::at(format!("{p}.{key}"), "must be above zero"));
            }
            if d.0 > std::time::Duration::from_secs(3600) {
                return Err(ConfigError::at(format!("{p}.{key}"), "at most 1h"));
            }
        }
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::at(
                    format!("{p}.headers.{name}"),
                    format!("invalid header name {name:?}"),
                ));
            }
            if http::HeaderValue::from_str(value).is_err() {
                return Err(ConfigError::at(
                    format!("{p}.headers.{name}"),
                    "invalid header value",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoint: &str) -> TracingConfig {
        toml::from_str(&format!("endpoint = {endpoint:?}")).unwrap()
    }

    #[test]
    fn defaults_and_url() {
        let c = cfg("http://127.0.0.1:4318");
        assert_eq!(c.service_name, "flashgate");
        assert_eq!(c.sample_ratio, 1.0);
        assert_eq!(c.max_queue_size, 2048);
        assert_eq!(c.max_export_batch_size, 512);
        assert_eq!(
            c.traces_url().unwrap().to_string(),
            "http://127.0.0.1:4318/v1/traces"
        );
        let c = cfg("http://otel-agent.monitoring:4318/custom/traces");
        assert_eq!(
            c.traces_url().unwrap().to_string(),
            "http://otel-agent.monitoring:4318/custom/traces"
        );
        c.validate().unwrap();
    }

    #[test]
    fn refused_with_key_paths() {
        for (endpoint, needle) in [
            ("https://collector:4318/v1/traces", "https is not supported"),
            ("collector:4318", "expected http://"),
            ("http://user:pw@collector:4318/", "credentials"),
            ("not a url", "invalid URL"),
        ] {
            let e = cfg(endpoint).validate().unwrap_err();
            assert_eq!(e.path, "tracing.endpoint");
            assert!(e.message.contains(needle), "{endpoint}: {e}");
        }
        let mut c = cfg("http://127.0.0.1:4318/v1/traces");
        c.sample_ratio = 1.5;
        assert_eq!(c.validate().unwrap_err().path, "tracing.sample_ratio");
        c.sample_ratio = f64::NAN;
        assert_eq!(c.validate().unwrap_err().path, "tracing.sample_ratio");
        c.sample_ratio = 0.0;
        c.max_export_batch_size = 4096;
        assert_eq!(
            c.validate().unwrap_err().path,
            "tracing.max_export_batch_size"
        );
        c.max_export_batch_size = 512;
        c.headers.insert("bad name".into(), "x".into());
        assert_eq!(c.validate().unwrap_err().path, "tracing.headers.bad name");
    }
}
