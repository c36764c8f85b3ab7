//! The embedded default: the same state machine over the in-memory store
//! and the in-process queue. NOT DURABLE: orders and stock live in this
//! process only. Used by `order-core demo` and `flashgate demo`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::http::Api;
use crate::model::Sku;
use crate::publish::local::LocalQueue;
use crate::service::{Core, Limits};
use crate::store::memory::MemoryStore;

/// A running demo core.
pub struct DemoCore {
    pub addr: SocketAddr,
    pub core: Arc<Core>,
    pub queue: LocalQueue,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for DemoCore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the in-memory core on `listen`, seeded with `stock`.
pub async fn start(
    listen: SocketAddr,
    admin_token: &str,
    limits: Limits,
    stock: &[(&str, i64)],
) -> anyhow::Result<DemoCore> {
    let queue = LocalQueue::new();
    let core = Arc::new(Core::new(
        Arc::new(MemoryStore::new()),
        Arc::new(queue.clone()),
        limits,
    ));
    for (sku, n) in stock {
        core.set_stock(&Sku::parse(sku)?, *n).await?;
    }
    let api = Arc::new(Api {
        core: core.clone(),
        admin_token: admin_token.to_string(),
    });
    let (addr, server) = crate::http::spawn(listen, api).await?;
    let expiry = core.spawn_expiry(Duration::from_secs(1));
    Ok(DemoCore {
        addr,
        core,
        queue,
        tasks: vec![server, expiry],
    })
}
