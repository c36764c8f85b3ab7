//! flashgate's inventory/order core: checkout that never oversells and
//! never loses or duplicates an order.
//!
//! - [`service::Core`]: the state machine, over a [`store::Store`] (Redis
//!   Lua in production, memory in the demo) and a [`publish::Publisher`]
//!   (RocketMQ transactional messages in production, an in-process queue
//!   in the demo).
//! - [`http`]: the HTTP API. [`demo`]: the in-memory core, also embedded by
//!   `flashgate demo`.
//! - `consumer` (feature `rocketmq`): the idempotent order consumer.
//!
//! Features `redis` and `rocketmq` (default) compile the production back
//! ends; without them the crate is the demo core only. The Redis client
//! (timeouts, slot-map refresh, retries, replicated acks' topology) is the
//! workspace crate `flashgate-redis`, shared with the gateway's cache.

pub mod config;
pub mod demo;
pub mod error;
pub mod hooks;
pub mod http;
pub mod model;
pub mod publish;
pub mod service;
pub mod sink;
pub mod store;
pub mod timing;

#[cfg(feature = "rocketmq")]
pub mod consumer;

pub use error::CoreError;
pub use service::{Core, Limits};

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
