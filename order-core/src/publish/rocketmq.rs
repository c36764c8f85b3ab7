//! Orders through RocketMQ transactional messages (`rocketmq-client-rust`,
//! the remoting-protocol client: it speaks to Apache RocketMQ's Java broker
//! and to the Rust broker alike).
//!
//! One checkout: send the half message (topic `orders`, key = order id,
//! body = [`OrderEvent`] JSON) -> the client calls our
//! [`TransactionListener::execute_local_transaction`] -> it runs the
//! checkout Lua -> commit on `Created`, rollback otherwise. If this process
//! dies in between, the broker asks any producer of the group through
//! [`TransactionListener::check_local_transaction`], which answers from
//! Redis and fences (see `check_txn.lua`).
//!
//! The listener's methods are synchronous. The client calls them on its
//! blocking lane (`spawn_blocking`), so waiting there is allowed; we run the
//! async Redis call as a task on the *service's* runtime (its handle is kept
//! in the listener) and wait for it on a std channel. No runtime worker
//! thread ever blocks; should a future client version call the listener on
//! a worker of a multi-thread runtime, the wait goes through
//! `block_in_place`.

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocketmq_client_rust::{
    ClientRuntime, ClientRuntimeConfig, LocalTransactionState, TransactionListener,
    TransactionMQProducer,
};
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_model::common::message::MessageTrait;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use tokio::runtime::{Handle, RuntimeFlavor};

use super::{LocalTxn, Publisher};
use crate::error::CoreError;
use crate::hooks;
use crate::model::{OrderEvent, Outcome, TxnVerdict};
use crate::service::MAX_IN_FLIGHT_CEILING;
use crate::store::{BoxFut, Store};

/// How long a listener waits for Redis before answering `Unknown` (the
/// broker then asks again through the check-back).
const LOCAL_WAIT: Duration = Duration::from_secs(5);

/// The client runtime's ceiling on blocking threads (`rocketmq-runtime`'s
/// `MAX_ENTRYPOINT_BLOCKING_THREADS`, not exported): more is refused.
const MAX_BLOCKING_THREADS: usize = 512;

/// The RocketMQ client's own runtime and telemetry; dropped last.
pub struct MqRuntime {
    // Kept alive: the client runtime's tasks run on it.
    _owner: RuntimeOwner,
    _telemetry: rocketmq_observability::TelemetryRuntimeGuard,
    client: Arc<ClientRuntime>,
}

impl MqRuntime {
    /// The runtime of a consumer or a tool: the client's default lanes.
    pub fn new(scope: &str) -> Result<MqRuntime, CoreError> {
        MqRuntime::build(scope, 0)
    }

    /// The runtime of a transactional producer that has up to
    /// `in_flight` transactions (`limits.max_in_flight`) open at once.
    pub fn producer(in_flight: usize) -> Result<MqRuntime, CoreError> {
        MqRuntime::build("producer", in_flight)
    }

    fn build(scope: &str, in_flight: usize) -> Result<MqRuntime, CoreError> {
        let mut config = RuntimeConfig {
            thread_name: format!("rocketmq-{scope}"),
            ..Default::default()
        };
        size_listener_lane(&mut config, in_flight)?;
        let owner = RuntimeOwner::plan(config)
            .map_err(|e| CoreError::broker("plan RocketMQ client runtime", e.to_string()))?
            .build()
            .map_err(|e| CoreError::broker("build RocketMQ client runtime", e.to_string()))?;
        let telemetry = rocketmq_observability::install_global(
            &rocketmq_observability::TelemetryBootstrapConfig::default(),
        )
        .map_err(|e| CoreError::broker("RocketMQ client telemetry", e.to_string()))?;
        let client = ClientRuntime::try_new(
            owner.root_context().component("client"),
            ClientRuntimeConfig::default(),
            telemetry.handle(),
        )
        .map_err(|e| CoreError::broker("RocketMQ client runtime", e.to_string()))?;
        Ok(MqRuntime {
            _owner: owner,
            _telemetry: telemetry,
            client,
        })
    }

    pub fn client(&self) -> Arc<ClientRuntime> {
        self.client.clone()
    }
}

/// Sizes the client's lane that runs transaction listeners for `in_flight`
/// transactions at once.
///
/// The client calls `execute_local_transaction` on its metadata lane, one
/// blocking call per open transaction, for as long as the checkout script
/// takes. The lane's defaults (sized to the core count: 4 running and 16
/// queued on a 2-core box) let only 4 of the 32 open transactions run their
/// script at once; the others waited there with their half message already
/// on the broker. So the lane runs as many listeners as the core has
/// transaction slots (the threads only wait on a channel; the Redis call
/// runs on the service's runtime), up to the client's own ceiling on
/// blocking threads, and its queue is at least [`MAX_IN_FLIGHT_CEILING`]
/// deep, because a listener refused there leaves the transaction unknown
/// (503, settled by the check-back). The core's own slot gate is the bound
/// meant to apply. (Measured: no throughput change on a 2-core box, where
/// CPU is the bound; see docs/checkout.md, "Durable checkout throughput".)
fn size_listener_lane(config: &mut RuntimeConfig, in_flight: usize) -> Result<(), CoreError> {
    let lane = &mut config.blocking_lane_policies.metadata_io;
    lane.max_queue_depth = lane.max_queue_depth.max(MAX_IN_FLIGHT_CEILING);
    if in_flight > lane.max_concurrency {
        // Room for the listeners next to what the other lanes may hold.
        let threads = (config.max_blocking_threads + in_flight).min(MAX_BLOCKING_THREADS);
        lane.max_concurrency = in_flight.min(threads - 2);
        let sized = config
            .clone()
            .with_max_blocking_threads(threads)
            .map_err(|e| CoreError::broker("size the RocketMQ listener lane", format!("{e:?}")))?;
        *config = sized;
    }
    Ok(())
}

/// Runs `fut` on `rt` and waits for it from synchronous code (see the
/// module docs for why this never blocks a runtime worker).
fn wait_on<T: Send + 'static>(rt: &Handle, fut: BoxFut<'static, T>) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    let recv = || rx.recv_timeout(LOCAL_WAIT).ok();
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(recv)
        }
        _ => recv(),
    }
}

/// Handed to the listener as the send's argument: the local transaction to
/// run, and where to put its outcome for the waiting request.
struct TxnCtx {
    local: Mutex<Option<LocalTxn>>,
    result: Mutex<Option<Result<Outcome, CoreError>>>,
}

struct OrderTxnListener {
    store: Arc<dyn Store>,
    rt: Handle,
}

impl TransactionListener for OrderTxnListener {
    fn execute_local_transaction(
        &self,
        _msg: &dyn MessageTrait,
        arg: Option<&(dyn Any + Send + Sync)>,
    ) -> LocalTransactionState {
        let Some(ctx) = arg.and_then(|a| a.downcast_ref::<Arc<TxnCtx>>()) else {
            // Not ours: let the check-back decide from the store.
            return LocalTransactionState::Unknown;
        };
        hooks::pause_at("after_half");
        let local = ctx.local.lock().unwrap_or_else(|p| p.into_inner()).take();
        let result = match local {
            Some(run) => wait_on(&self.rt, run()).unwrap_or_else(|| {
                Err(CoreError::Unknown(format!(
                    "local transaction took longer than {LOCAL_WAIT:?}"
                )))
            }),
            None => Err(CoreError::Unknown("local transaction ran twice".into())),
        };
        let state = match &result {
            Ok(o) if o.commits() => LocalTransactionState::CommitMessage,
            Ok(_) => LocalTransactionState::RollbackMessage,
            // The script may have run: only the check-back can tell.
            Err(CoreError::Unknown(_)) => LocalTransactionState::Unknown,
            // Refused before running (Redis unreachable): nothing changed.
            Err(_) => LocalTransactionState::RollbackMessage,
        };
        hooks::pause_at("after_local");
        *ctx.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
        state
    }

    fn check_local_transaction(&self, msg: &MessageExt) -> LocalTransactionState {
        let event: OrderEvent = match msg.body().map(|b| serde_json::from_slice(&b)) {
            Some(Ok(ev)) => ev,
            _ => {
                tracing::warn!(msg_id = %msg.msg_id(), "check-back for a message that is not an order event: rollback");
                return LocalTransactionState::RollbackMessage;
            }
        };
        let store = self.store.clone();
        let fut: BoxFut<'static, _> =
            Box::pin(async move { store.check_txn(&event.sku, &event.txn).await });
        let verdict = wait_on(&self.rt, fut);
        tracing::info!(msg_id = %msg.msg_id(), ?verdict, "transaction check-back");
        match verdict {
            Some(Ok(TxnVerdict::Commit)) => LocalTransactionState::CommitMessage,
            Some(Ok(TxnVerdict::Rollback)) => LocalTransactionState::RollbackMessage,
            // Redis down: say nothing; the broker asks again later.
            _ => LocalTransactionState::Unknown,
        }
    }
}

/// See the module docs.
pub struct RocketMqPublisher {
    producer: TransactionMQProducer,
    topic: String,
    _rt: Arc<MqRuntime>,
}

/// Connection settings.
#[derive(Clone, Debug)]
pub struct MqSettings {
    pub namesrv: String,
    pub topic: String,
    pub producer_group: String,
}

impl RocketMqPublisher {
    /// Starts a transactional producer. Must be called inside the service's
    /// tokio runtime (its handle runs the listener's Redis calls).
    pub async fn start(
        settings: &MqSettings,
        store: Arc<dyn Store>,
        rt: Arc<MqRuntime>,
    ) -> Result<RocketMqPublisher, CoreError> {
        let listener = OrderTxnListener {
            store,
            rt: Handle::current(),
        };
        let mut producer = TransactionMQProducer::builder(rt.client())
            .producer_group(settings.producer_group.clone())
            .name_server_addr(settings.namesrv.clone())
            .topics(vec![settings.topic.clone()])
            .send_msg_timeout(2000)
            .retry_times_when_send_failed(1)
            .transaction_listener(listener)
            .build();
        producer.start().await.map_err(|e| {
            CoreError::broker(
                format!("start producer on {}", settings.namesrv),
                e.to_string(),
            )
        })?;
        Ok(RocketMqPublisher {
            producer,
            topic: settings.topic.clone(),
            _rt: rt,
        })
    }
}

impl Publisher for RocketMqPublisher {
    fn transact(
        &self,
        event: OrderEvent,
        local: LocalTxn,
    ) -> BoxFut<'_, Result<Outcome, CoreError>> {
        Box::pin(async move {
            let body = serde_json::to_vec(&event)
                .map_err(|e| CoreError::Corrupt(format!("encode order event: {e}")))?;
            let msg = Message::builder()
                .topic(self.topic.as_str())
                .tags("order")
                .key(event.order_id.as_str())
                .body(body)
                .build_unchecked();
            let ctx = Arc::new(TxnCtx {
                local: Mutex::new(Some(local)),
                result: Mutex::new(None),
            });
            let sent = self
                .producer
                .send_message_in_transaction(msg, Some(ctx.clone()))
                .await
                .map_err(|e| {
                    CoreError::broker(
                        format!("half message for order {}", event.order_id),
                        e.to_string(),
                    )
                })?;
            let result = ctx.result.lock().unwrap_or_else(|p| p.into_inner()).take();
            match result {
                Some(r) => r,
                // The broker did not store the half message (flush or
                // replica timeout): the local transaction never ran.
                None => Err(CoreError::broker(
                    format!("half message for order {} not stored", event.order_id),
                    sent.to_string(),
                )),
            }
        })
    }

    fn durable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(in_flight: usize) -> RuntimeConfig {
        let mut config = RuntimeConfig::for_parallelism("t", 2);
        size_listener_lane(&mut config, in_flight).unwrap();
        config.validate().unwrap();
        config
    }

    #[test]
    fn the_listener_lane_runs_every_open_transaction() {
        let default = RuntimeConfig::for_parallelism("t", 2);
        let lane = |c: &RuntimeConfig| c.blocking_lane_policies.metadata_io.clone();
        // A consumer keeps the client's defaults, with the deep queue.
        let consumer = sized(0);
        assert_eq!(
            lane(&consumer).max_concurrency,
            lane(&default).max_concurrency
        );
        assert_eq!(lane(&consumer).max_queue_depth, MAX_IN_FLIGHT_CEILING);
        // The default core: all 32 transactions run their script at once,
        // next to the other lanes' threads.
        let core = sized(32);
        assert_eq!(lane(&core).max_concurrency, 32);
        assert!(core.max_blocking_threads >= 32 + 2);
        assert_eq!(
            core.blocking_lane_policies.storage_io.max_concurrency,
            default.blocking_lane_policies.storage_io.max_concurrency
        );
        // The most the config allows stays within the client's ceiling.
        let most = sized(MAX_IN_FLIGHT_CEILING);
        assert_eq!(most.max_blocking_threads, MAX_BLOCKING_THREADS);
        assert_eq!(lane(&most).max_concurrency, MAX_BLOCKING_THREADS - 2);
    }
}
