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
    status: StatusCode,
    refresh_s: u64,
    /// The template cut at its per-visitor placeholders, with the room and
    /// the refresh already filled in: a poll only writes two numbers.
    html: Vec<Piece>,
    /// `"room":"<name>"` as JSON, escaped once.
    json_room: String,
}

enum Piece {
    Text(String),
    Position,
    Wait,
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
        let filled = template
            .replace("{{room}}", &escape(room))
            .replace("{{refresh_seconds}}", &refresh_s.to_string());
        Ok(Page {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            refresh_s,
            html: pieces(&filled),
            json_room: format!("\"room\":{}", serde_json::Value::from(room)),
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
            let body = self.json(view);
            return respond::content(self.status, headers, "application/json", body);
        }
        let html = self.html(view);
        respond::content(self.status, headers, "text/html; charset=utf-8", html)
    }

    fn json(&self, view: View) -> String {
        format!(
            "{{\"in_queue\":true,{},\"position\":{},\"wait_seconds\":{},\"wait_known\":{},\"refresh_seconds\":{},\"queue_full\":false}}",
            self.json_room,
            number(view.position, "null"),
            number(view.wait_seconds, "null"),
            view.wait_seconds.is_some(),
            self.refresh_s,
        )
    }

    fn html(&self, view: View) -> String {
        let mut html = String::with_capacity(
            self.html
                .iter()
                .map(|p| match p {
                    Piece::Text(t) => t.len(),
                    _ => 20,
                })
                .sum(),
        );
        for p in &self.html {
            match p {
                Piece::Text(t) => html.push_str(t),
                Piece::Position => html.push_str(&number(view.position, "unknown")),
                Piece::Wait => html.push_str(&number(view.wait_seconds, "unknown")),
            }
        }
        html
    }
}

/// An API client: JSON asked for, HTML not.
fn number(n: Option<u64>, none: &str) -> String {
    n.map_or_else(|| none.to_string(), |n| n.to_string())
}

/// Cuts the template at `{{position}}` and `{{wait_seconds}}`.
fn pieces(template: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut rest = template;
    loop {
        let next = [
            ("{{position}}", Piece::Position),
            ("{{wait_seconds}}", Piece::Wait),
        ]
        .into_iter()
        .filter_map(|(mark, piece)| rest.find(mark).map(|at| (at, mark.len(), piece)))
        .min_by_key(|(at, _, _)| *at);
        let Some((at, len, piece)) = next else {
            if !rest.is_empty() {
                out.push(Piece::Text(rest.to_string()));
            }
            return out;
        };
        if at > 0 {
            out.push(Piece::Text(rest[..at].to_string()));
        }
        out.push(piece);
        rest = &rest[at + len..];
    }
}

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

    #[test]
    fn the_filled_page_and_json_say_the_visitors_place() {
        let page = Page::new("d\"rop<", 200, 5, None, "waiting_rooms[0]").unwrap();
        let view = View {
            position: Some(7),
            wait_seconds: None,
        };
        let json: serde_json::Value = serde_json::from_str(&page.json(view)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"in_queue": true, "room": "d\"rop<", "position": 7,
                "wait_seconds": null, "wait_known": false, "refresh_seconds": 5, "queue_full": false})
        );
        let html = page.html(view);
        assert!(html.contains(r#"data-room="d&quot;rop&lt;""#), "{html}");
        assert!(html.contains(r#"<b id="position">7</b>"#));
        assert!(html.contains(r#"<span id="wait">unknown</span>"#));
        assert!(html.contains(r#"content="5""#));
        assert!(!html.contains("{{"));
        let p = pieces("{{wait_seconds}}a{{position}}{{position}}");
        assert!(matches!(
            &p[..],
            [Piece::Wait, Piece::Text(t), Piece::Position, Piece::Position] if t == "a"
        ));
    }
}
