//! `POST /admin/waiting-rooms/{name}`: changes a room's `queue_all` and
//! `new_users` live (an operator pauses the sale, or lets the line move
//! faster), for the whole fleet when the room's line is in Redis. Needs
//! the admin token.
//!
//! Body `{"queue_all": true}`, `{"new_users": "200/s"}` or both; a member
//! set to `null` drops the live value (back to the config's). Answers the
//! room as `/admin/status` shows it.

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::{json_reply, AdminResponse};
use crate::config::waiting_room::rate_per_s;
use crate::config::Rate;
use crate::Shared;

/// The path prefix of the call.
pub const PREFIX: &str = "/admin/waiting-rooms/";

pub async fn set(shared: &Shared, name: &str, req: Request<Incoming>) -> AdminResponse {
    let runtime = shared.runtime.load_full();
    let Some(room) = runtime.rooms.iter().find(|r| *r.name == *name) else {
        return json_reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no waiting room {name:?}")}),
        );
    };
    let body = match http_body_util::Limited::new(req.into_body(), 4096)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad(format!("cannot read the request body: {e}")),
    };
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&body) else {
        return bad("the body must be a JSON object".into());
    };
    let mut queue_all = None;
    let mut new_users = None;
    for (k, v) in &map {
        match (k.as_str(), v) {
            ("queue_all", Value::Null) => queue_all = Some(None),
            ("queue_all", Value::Bool(b)) => queue_all = Some(Some(*b)),
            ("new_users", Value::Null) => new_users = Some(None),
            ("new_users", Value::String(s)) => match s.parse::<Rate>() {
                Ok(r) if rate_per_s(r) <= 100_000.0 => new_users = Some(Some(rate_per_s(r))),
                Ok(_) => return bad("new_users: at most 100000/s".into()),
                Err(e) => return bad(format!("new_users: {e}")),
            },
            ("queue_all" | "new_users", _) => {
                return bad(format!(
                    "{k}: wrong type (queue_all: bool, new_users: \"50/s\")"
                ))
            }
            _ => return bad(format!("unknown member {k:?} (queue_all, new_users)")),
        }
    }
    if room.set_live(queue_all, new_users).await.is_err() {
        return json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "the room's store (Redis) did not answer; nothing changed"}),
        );
    }
    tracing::info!(room = %room.name, ?queue_all, ?new_users, "waiting room changed live");
    json_reply(StatusCode::OK, room.status())
}

/// Fetches every room's numbers, before a status is built.
pub async fn refresh(shared: &Shared) {
    let runtime = shared.runtime.load_full();
    for r in &runtime.rooms {
        r.refresh().await;
    }
}

fn bad(message: String) -> AdminResponse {
    json_reply(StatusCode::BAD_REQUEST, json!({ "error": message }))
}
