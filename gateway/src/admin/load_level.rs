//! `POST /admin/load-level`: forces the load level for a drill, so that
//! operators can rehearse degradation before a sale. Off unless
//! `[overload] allow_forced_level = true`; needs the admin token.
//!
//! Body `{"level": 2, "for": "60s"}` (level 0-3, at most one hour), or
//! `{"level": null}` to go back to the computed level at once.

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;

use super::{json_reply, AdminResponse};
use crate::config::Dur;
use crate::Shared;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Force {
    level: Option<u8>,
    #[serde(rename = "for")]
    for_: Option<String>,
}

pub async fn force(shared: &Shared, req: Request<Incoming>) -> AdminResponse {
    if !shared.runtime.load().config.overload.allow_forced_level {
        return json_reply(
            StatusCode::FORBIDDEN,
            json!({"error": "forced load levels are off: set overload.allow_forced_level = true"}),
        );
    }
    let body = match http_body_util::Limited::new(req.into_body(), 4096)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad(format!("cannot read the request body: {e}")),
    };
    let f: Force = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return bad(format!("invalid JSON body: {e}")),
    };
    let forced = match (f.level, f.for_) {
        (None, _) => None,
        (Some(l), _) if l > 3 => return bad("level must be 0, 1, 2 or 3".into()),
        (Some(_), None) => return bad("\"for\" is required, e.g. \"60s\"".into()),
        (Some(l), Some(d)) => match d.parse::<Dur>() {
            Ok(Dur(d)) if !d.is_zero() && d <= Duration::from_secs(3600) => Some((l, d)),
            Ok(_) => return bad("\"for\" must be above zero and at most 1h".into()),
            Err(e) => return bad(format!("for: {e}")),
        },
    };
    shared.overload.force(forced);
    json_reply(StatusCode::OK, shared.overload.status())
}

fn bad(message: String) -> AdminResponse {
    json_reply(StatusCode::BAD_REQUEST, json!({ "error": message }))
}
