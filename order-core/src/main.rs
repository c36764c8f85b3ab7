//! `order-core`: the checkout service, its consumer and its DLQ tool.
//!
//! ```text
//! order-core run --config FILE          Redis + RocketMQ (durable)
//! order-core demo --listen ADDR --admin-token T [--stock SKU=N]...
//!                                       in memory, NOT durable
//! order-core consume --config FILE      the order consumer (sink + DLQ)
//! order-core dlq list|replay --config FILE
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use flashgate_redis::{RedisClient, Settings};
use order_core::config::{Config, RedisTarget};
use order_core::consumer::{self, ConsumerSettings};
use order_core::http::Api;
use order_core::publish::local::LocalQueue;
use order_core::publish::rocketmq::{MqRuntime, MqSettings, RocketMqPublisher};
use order_core::publish::Publisher;
use order_core::service::{Core, Limits};
use order_core::sink::DeadLetters;
use order_core::store::redis::{Ack, RedisStore};
use order_core::store::Store;

#[derive(Parser)]
#[command(
    name = "order-core",
    version,
    about = "flashgate's inventory/order core"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serves checkout on Redis and RocketMQ.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Serves the in-memory core (not durable).
    Demo {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        #[arg(long)]
        admin_token: String,
        /// Initial stock, `SKU=N` (repeatable).
        #[arg(long, value_parser = parse_stock)]
        stock: Vec<(String, i64)>,
    },
    /// Consumes orders into the sink.
    Consume {
        #[arg(long)]
        config: PathBuf,
    },
    /// Lists or replays dead letters.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Prints each dead letter as one JSON line.
    List {
        #[arg(long)]
        config: PathBuf,
    },
    /// Re-publishes every dead letter to the orders topic.
    Replay {
        #[arg(long)]
        config: PathBuf,
    },
}

fn parse_stock(s: &str) -> Result<(String, i64), String> {
    let (sku, n) = s.split_once('=').ok_or("expected SKU=N")?;
    Ok((
        sku.to_string(),
        n.parse().map_err(|_| "N must be a number")?,
    ))
}

fn load(path: &PathBuf) -> Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    Config::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rocketmq=warn,rocketmq_client_rust=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Run { config } => run(load(&config)?).await,
            Cmd::Demo {
                listen,
                admin_token,
                stock,
            } => {
                let stock: Vec<(&str, i64)> = stock.iter().map(|(s, n)| (s.as_str(), *n)).collect();
                let demo = order_core::demo::start(listen, &admin_token, Limits::default(), &stock)
                    .await?;
                eprintln!(
                    "order-core demo on http://{} (in memory, NOT durable)",
                    demo.addr
                );
                order_core::shutdown_signal().await;
                Ok(())
            }
            Cmd::Consume { config } => {
                let c = load(&config)?;
                let mq = c.mq().map_err(|e| anyhow!(e))?;
                consumer::run(ConsumerSettings {
                    namesrv: mq.namesrv.clone(),
                    topic: mq.topic.clone(),
                    group: mq.consumer_group.clone(),
                    sink: c.consumer.sink.clone(),
                    dlq: c.consumer.dlq.clone(),
                    max_attempts: c.consumer.max_attempts,
                })
                .await
            }
            Cmd::Dlq { action } => match action {
                DlqAction::List { config } => {
                    let c = load(&config)?;
                    for dl in DeadLetters::new(&c.consumer.dlq).list()? {
                        println!("{}", serde_json::to_string(&dl)?);
                    }
                    Ok(())
                }
                DlqAction::Replay { config } => {
                    let c = load(&config)?;
                    let mq = c.mq().map_err(|e| anyhow!(e))?;
                    let n = consumer::replay_dlq(
                        &mq.namesrv,
                        &mq.topic,
                        &DeadLetters::new(&c.consumer.dlq),
                    )
                    .await?;
                    println!("replayed {n}");
                    Ok(())
                }
            },
        }
    })
}

/// How often the cluster's replicas are counted again.
const TOPOLOGY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The Redis store with the `[redis]` settings; replicated acks on by
/// default on a Cluster whose every slot range has a replica.
async fn redis_store(c: &Config) -> Result<RedisStore> {
    let timing = c.redis_timing().map_err(|e| anyhow!(e))?;
    let settings = Settings {
        timeout: timing.timeout,
        budget: timing.retry_budget,
        ..Settings::default()
    };
    let client = match c.redis_target().map_err(|e| anyhow!(e))? {
        RedisTarget::Single(url) => RedisClient::single(&url, settings).await,
        RedisTarget::Cluster(urls) => RedisClient::cluster(&urls, settings).await,
    }
    .map_err(|e| anyhow!(e))?;
    client
        .read_topology()
        .await
        .map_err(|e| anyhow!("read the cluster's topology (CLUSTER NODES): {e}"))?;
    let replicas = match timing.replicas_ack {
        Some(n) => n,
        None => match client.min_replicas() {
            Some(n) if n > 0 => 1,
            Some(_) => {
                tracing::warn!("redis cluster has a master without a replica: acknowledged orders are on one master only (replicas_ack = 0)");
                0
            }
            None => 0,
        },
    };
    let ack = Ack {
        replicas,
        timeout: timing.replicas_ack_timeout,
    };
    tracing::info!(replicas_ack = ack.replicas, timeout = ?settings.timeout, budget = ?settings.budget, "redis store");
    Ok(order_core::store::redis::new_store(client, ack))
}

async fn run(c: Config) -> Result<()> {
    let redis = redis_store(&c).await?;
    // Keeps the replica counts fresh (a replica that rejoins counts again).
    let _topology = redis.client().spawn_topology_watch(TOPOLOGY_EVERY);
    let store: Arc<dyn Store> = Arc::new(redis);
    let publisher: Arc<dyn Publisher> = match &c.rocketmq {
        Some(m) => Arc::new(
            RocketMqPublisher::start(
                &MqSettings {
                    namesrv: m.namesrv.clone(),
                    topic: m.topic.clone(),
                    producer_group: m.producer_group.clone(),
                },
                store.clone(),
                Arc::new(MqRuntime::producer(c.limits.max_in_flight)?),
            )
            .await?,
        ),
        None => {
            tracing::warn!(
                "no [rocketmq]: orders are not published (benchmark mode, NOT durable downstream)"
            );
            Arc::new(LocalQueue::new())
        }
    };
    let limits = Limits {
        per_user: c.limits.per_user,
        max_qty: c.limits.max_qty,
        expiry: c.expiry_window().map_err(|e| anyhow!(e))?,
        max_in_flight: c.limits.max_in_flight,
        queue_wait: c.queue_wait().map_err(|e| anyhow!(e))?,
    };
    let core = Arc::new(Core::new(store, publisher, limits));
    let _expiry = core.spawn_expiry(c.sweep_every().map_err(|e| anyhow!(e))?);
    let api = Arc::new(Api {
        core,
        admin_token: c.admin_token.clone(),
    });
    let (addr, _server) = order_core::http::spawn(c.listen, api)
        .await
        .with_context(|| format!("listen on {}", c.listen))?;
    eprintln!("order-core listening on http://{addr}");
    order_core::shutdown_signal().await;
    Ok(())
}
