//! The admission phase: whether a routed request may use the gateway's
//! and the upstream's capacity at all. After routing, because limits and
//! priorities are per route; before filters, the cache and the upstream,
//! so that refused traffic costs no filter time and no upstream slot.
//!
//! Today admission is overload shedding by load level and priority
//! ([`shed`]), then the checkout gate ([`checkout`]): identity required,
//! the edge's sold-out flag, and the body read whole so that an
//! `Idempotency-Key` makes a retry safe. Bot rules ([`bots`], with the
//! proof-of-work [`challenge`]) come first, then rate limits ([`limits`]),
//! both before shedding: the cheapest and most certain refusals first (a
//! hot limit on a checkout body field waits for the body; a bot rule's
//! `deprioritize` sets `RequestCtx::deprioritized`, which shedding reads).
//! The waiting room ([`waiting_room`]) comes after the rate limits and
//! before shedding: a flood of polls is cut by the in-memory limits
//! before it costs a store round trip, and a waiting visitor's poll,
//! answered by the gateway, is never shed.

pub mod bots;
pub mod challenge;
pub mod checkout;
pub mod limits;
pub mod redis_link;
pub mod shed;
pub mod waiting_room;

use std::ops::ControlFlow::{self, Break, Continue};

use http::request::Parts;
use http::Response;
use http_body_util::Either;

use super::runtime::Route;
use super::{RequestCtx, Stop};
use crate::body::ProxyBody;
use crate::edge::request_body::LimitedBody;
use crate::upstream::UpstreamBody;

/// Admits the request or refuses it; what it lets through is the body
/// that goes on (a checkout's, read whole).
pub async fn admit(
    ctx: &mut RequestCtx<'_>,
    route: &Route,
    head: &Parts,
    body: LimitedBody,
) -> ControlFlow<Stop, UpstreamBody> {
    // Bot rules first: a bot's request uses no rate budget and does not
    // count as demand, and `deprioritize` must be set before shedding.
    bots::check(ctx, route, head).await?;
    // `identity = "required"`: no verified token, no further (checkout
    // routes check it in their own gate).
    if route.identity_required && !ctx.identified {
        return Break(Stop::Refuse(crate::pipeline::identity::unauthenticated(
            &head.headers,
        )));
    }
    if let Some(l) = &route.limits {
        match l.check(ctx.client_ip, ctx.user.as_deref(), head).await {
            Ok(fields) => ctx.rate_limit_fields = fields.map(Box::new),
            Err(refusal) => return Break(Stop::Refuse(refusal)),
        }
    }
    if let Some(room) = &route.waiting_room {
        // Boxed: only routes behind a room wait here.
        Box::pin(waiting_room::check(ctx, room, head)).await?;
    }
    shed::check(ctx, route, head)?;
    let Some(checkout) = &route.checkout else {
        return Continue(Either::Left(body));
    };
    // Boxed: only checkout routes wait here, and the read of the body
    // would otherwise make every request's state larger (and its copy
    // dearer).
    match Box::pin(checkout.prepare(head, body, ctx.identified)).await {
        Ok(p) => {
            if let Some(l) = &route.limits {
                if let Err(refusal) = l.check_body(&p.bytes).await {
                    return Break(Stop::Refuse(refusal));
                }
            }
            ctx.sku = p.sku;
            ctx.replay = p.replay;
            Continue(p.body)
        }
        Err(refusal) => Break(Stop::Refuse(refusal)),
    }
}

/// Learns from the upstream's answer to an admitted request: a checkout
/// answered 409 flags its SKU sold out at the edge, a 201 clears it; a
/// waiting room's session gets its cookie, or ends on the origin's
/// `flashgate-waiting-room: release`.
pub fn learn(ctx: &mut RequestCtx<'_>, route: &Route, resp: &mut Response<ProxyBody>) {
    if let Some(room) = &route.waiting_room {
        waiting_room::on_response(ctx, room, resp);
    }
    if let (Some(c), Some(_)) = (&route.checkout, &ctx.endpoint) {
        c.observe(ctx.sku.as_deref(), resp.status());
    }
}
