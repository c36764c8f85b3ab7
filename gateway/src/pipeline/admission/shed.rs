//! Overload shedding in the pipeline: at admission, what the load level
//! does with the request ([`check`], by priority: see
//! `overload::shed`); before the upstream, a slot from the cluster's gate
//! ([`slot`]) and, when the gate says no, the route's fallback or a 503
//! ([`refused`]).

use std::ops::ControlFlow::{self, Break, Continue};

use http::request::Parts;
use http::{HeaderValue, Response};

use super::super::runtime::Route;
use super::super::{RequestCtx, Stop};
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::overload::gate::{Permit, Refused};
use crate::overload::shed::{decide, Action};
use crate::respond::{self, Refusal, DEGRADED};

/// Reads the level for this request (its cluster's or the process's, the
/// higher: [`crate::overload::Overload::level_for`]) and sheds or
/// degrades it when the level says so: a cached copy first, then the
/// route's fallback, then (shed only) 503 with `retry-after`.
pub fn check(ctx: &mut RequestCtx<'_>, route: &Route, head: &Parts) -> ControlFlow<Stop> {
    let cfg = &ctx.runtime.config.overload;
    if !cfg.enabled {
        return Continue(());
    }
    ctx.load_level = ctx.shared.overload.level_for(route.gate.as_deref());
    if let Some(h) = &cfg.debug_header {
        ctx.debug_level = head.headers.contains_key(h.as_str());
    }
    let action = decide(ctx.load_level, route.priority, ctx.deprioritized);
    if action == Action::Send {
        return Continue(());
    }
    let copy = route
        .cache
        .as_ref()
        .and_then(|rc| ctx.runtime.cache.peek(rc, head, &ctx.host));
    let (answer, reason) = match (copy, &route.fallback) {
        (Some(mut resp), _) => {
            resp.headers_mut()
                .insert(DEGRADED.clone(), HeaderValue::from_static("stale"));
            (Stop::Answer(Box::new(resp)), "stale")
        }
        (None, Some(f)) => (Stop::Answer(Box::new(f.answer())), "fallback"),
        (None, None) if action == Action::Shed => {
            let secs = cfg.retry_after.0.as_secs().max(1) as u32;
            (
                Stop::Refuse(Refusal::new(ProxyError::Overloaded).retry_after(secs)),
                "level",
            )
        }
        (None, None) => return Continue(()),
    };
    // Shed requests are demand all the same: the level must not fall
    // because it sheds.
    if let Some(g) = &route.gate {
        g.arrived();
    }
    count(ctx, route, reason);
    Break(answer)
}

fn count(ctx: &RequestCtx<'_>, route: &Route, reason: &str) {
    ctx.shared
        .overload
        .shed
        .with_label_values(&[&route.name, route.priority.as_str(), reason])
        .inc();
}

/// A slot from the route's cluster gate, waiting for one by priority;
/// `Ok(None)` without a gate (`[overload] enabled = false`).
/// (Takes the flag, not the context: the context is not `Sync`.)
pub async fn slot(route: &Route, deprioritized: bool) -> Result<Option<Permit>, Refused> {
    match &route.gate {
        Some(g) => g.acquire(route.priority, deprioritized).await.map(Some),
        None => Ok(None),
    }
}

/// The answer when the gate refused a slot: the route's fallback, else
/// 503 with the reason's code and `retry-after`.
pub fn refused(ctx: &RequestCtx<'_>, route: &Route, why: Refused) -> Response<ProxyBody> {
    if let Some(f) = &route.fallback {
        count(ctx, route, "fallback");
        return f.answer();
    }
    count(ctx, route, why.reason());
    let error = why.error();
    let secs = ctx.runtime.config.overload.retry_after.0.as_secs().max(1) as u32;
    respond::refusal(Refusal::new(error).retry_after(secs), &ctx.request_id)
}

/// Keeps the slot until the response ends; a 5xx counts as failed.
pub fn hold(permit: Option<Permit>, resp: &mut Response<ProxyBody>) {
    if let Some(mut p) = permit {
        if resp.status().is_server_error() {
            p.failed();
        }
        resp.body_mut().keep(Box::new(p));
    }
}
