//! What a waiting visitor sees: the HTML page (it reloads itself every
//! `refresh`, so a browser needs no script and ends on the product page
//! by itself when its turn comes) or, for an API client that sends
//! `accept: application/json` without `text/html`, a JSON document it
//! polls with the cookie it was given. Both through the one answer
//! builder (`respond::content`), never cached.

use http::header::{ACCEPT, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::config::ConfigError;
use crate::respond;

/// One visitor's view of the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// 1 is next; `None` when not known (Redis down).
    pub position: Option<u64>,
    /// The estimated wait, when it can be estimated.
    pub wait_seconds: Option<u64>,
}

/// A room's page, built once per config.
pub struct Page {
    room: String,
    status: StatusCode,
    refresh_s: u64,
    template: String,
}

impl Page {
    /// `template`: the operator's file, read here (errors at `p.template`).
    pub fn new(
        room: &str,
        status: u16,
        refresh_s: u64,
        template: Option<&std::path::Path>,
        p: &str,
    ) -> Result<Page, ConfigError> {
        let template = match template {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                ConfigError::at(
                    format!("{p}.template"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?,
            None => DEFAULT.to_string(),
        };
        Ok(Page {
            room: room.to_string(),
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            refresh_s,
            template,
        })
    }

    /// The waiting answer, with `cookies` (the ticket) among its headers.
    pub fn answer(
        &self,
        request: &HeaderMap,
        view: View,
        cookies: HeaderMap,
    ) -> Response<ProxyBody> {
        let mut headers = cookies;
        headers.insert(RETRY_AFTER, HeaderValue::from(self.refresh_s));
        if wants_json(request) {
            let body = serde_json::json!({
                "in_queue": true,
                "room": self.room,
                "position": view.position,
                "wait_seconds": view.wait_seconds,
                "wait_known": view.wait_seconds.is_some(),
                "refresh_seconds": self.refresh_s,
                "queue_full": false,
            });
            return respond::content(self.status, headers, "application/json", body.to_string());
        }
        let unknown = || "unknown".to_string();
        let html = self
            .template
            .replace("{{room}}", &escape(&self.room))
            .replace(
                "{{position}}",
                &view.position.map_or_else(unknown, |p| p.to_string()),
            )
            .replace(
                "{{wait_seconds}}",
                &view.wait_seconds.map_or_else(unknown, |w| w.to_string()),
            )
            .replace("{{refresh_seconds}}", &self.refresh_s.to_string());
        respond::content(self.status, headers, "text/html; charset=utf-8", html)
    }
}

/// An API client: JSON asked for, HTML not.
fn wants_json(headers: &HeaderMap) -> bool {
    let mut json = false;
    for v in headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        if v.contains("text/html") {
            return false;
        }
        json |= v.contains("application/json");
    }
    json
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The built-in page: self-contained, no script, reloads itself.
const DEFAULT: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="{{refresh_seconds}}">
<meta name="robots" content="noindex"><title>You are in line</title>
<style>body{font:16px system-ui,sans-serif;max-width:32em;margin:20vh auto;padding:0 1em;text-align:center;color:#222}b{font-size:2em}</style>
</head><body><h1>You are in line</h1>
<p id="flashgate-waiting-room" data-room="{{room}}">Your place: <b id="position">{{position}}</b></p>
<p>Estimated wait: <span id="wait">{{wait_seconds}}</span> seconds.</p>
<p>This page refreshes by itself every {{refresh_seconds}} seconds and takes you to the shop when it is your turn. Reloading keeps your place; leaving for longer than a moment loses it.</p>
</body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_for_api_clients_html_for_browsers() {
        let page = Page::new("drop", 200, 5, None, "waiting_rooms[0]").unwrap();
        let view = View {
            position: Some(3),
            wait_seconds: Some(2),
        };
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let r = page.answer(&h, view, HeaderMap::new());
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["cache-control"], "no-store");
        h.insert(
            ACCEPT,
            HeaderValue::from_static("text/html,application/json;q=0.9"),
        );
        let r = page.answer(&h, view, HeaderMap::new());
        assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
        assert_eq!(r.headers()["retry-after"], "5");
    }
}
