//! `order-core consume`: the stand-in for payment and shipping. A push
//! consumer group on the orders topic that writes each order once to the
//! durable [`Sink`] and only then acknowledges.
//!
//! - Idempotent by order id: RocketMQ delivers at least once (redelivery
//!   after a crash before the offset is stored, or a second check-back
//!   commit), and the sink remembers what it wrote.
//! - Poison messages: a message that fails `max_attempts` times in a row is
//!   written to the dead-letter file (fsynced) and then acknowledged, so one
//!   bad message does not stall its queue. `order-core dlq list|replay`
//!   inspects and re-publishes them once the cause is fixed. The retry runs
//!   in process (with a short backoff) rather than through the broker's
//!   retry topic, so the DLQ decision does not depend on the broker's
//!   delay levels; a crash during the retries simply means redelivery.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rocketmq_client_rust::{
    ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus, DefaultMQProducer,
    DefaultMQPushConsumer, MQPushConsumer, MessageListenerConcurrently,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;

use crate::hooks;
use crate::model::{now_ms, OrderEvent};
use crate::publish::rocketmq::MqRuntime;
use crate::sink::{DeadLetter, DeadLetters, Sink};

/// What the consumer needs.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    pub namesrv: String,
    pub topic: String,
    pub group: String,
    pub sink: PathBuf,
    pub dlq: PathBuf,
    pub max_attempts: u32,
}

struct OrderSinkListener {
    sink: Mutex<Sink>,
    dlq: DeadLetters,
    max_attempts: u32,
}

impl OrderSinkListener {
    fn process(&self, msg: &MessageExt) -> Result<()> {
        let body = msg.body().ok_or_else(|| anyhow!("message has no body"))?;
        let ev: OrderEvent = serde_json::from_slice(&body).context("body is not an order event")?;
        if hooks::fail_sku(ev.sku.as_str()) {
            return Err(anyhow!("injected failure for order {}", ev.order_id));
        }
        let written = self
            .sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&ev)?;
        if written {
            tracing::info!(order = %ev.order_id, "order recorded");
            if hooks::crash_after_sink() {
                tracing::warn!("test hook: crashing after the sink write, before the ack");
                std::process::abort();
            }
        } else {
            tracing::info!(order = %ev.order_id, "duplicate delivery ignored");
        }
        Ok(())
    }

    /// Processes one message with retries; `Err` only when even the DLQ
    /// could not be written (then the broker redelivers).
    fn handle(&self, msg: &MessageExt) -> Result<()> {
        let mut last = None;
        for attempt in 1..=self.max_attempts.max(1) {
            match self.process(msg) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(msg_id = %msg.msg_id(), attempt, error = %format!("{e:#}"), "processing failed");
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
                }
            }
        }
        let body = msg
            .body()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let key = serde_json::from_str::<OrderEvent>(&body)
            .ok()
            .map(|e| e.order_id);
        self.dlq.append(&DeadLetter {
            msg_id: msg.msg_id().to_string(),
            key,
            body,
            error: last.map(|e| format!("{e:#}")).unwrap_or_default(),
            attempts: self.max_attempts,
            at_ms: now_ms(),
        })?;
        tracing::error!(msg_id = %msg.msg_id(), "message moved to the DLQ");
        Ok(())
    }
}

impl MessageListenerConcurrently for OrderSinkListener {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> rocketmq_client_rust::ClientResult<ConsumeConcurrentlyStatus> {
        for msg in msgs {
            if let Err(e) = self.handle(msg) {
                tracing::error!(error = %format!("{e:#}"), "cannot record or dead-letter a message; redelivery");
                return Ok(ConsumeConcurrentlyStatus::ReconsumeLater);
            }
        }
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

/// Runs the consumer until SIGINT/SIGTERM.
pub async fn run(settings: ConsumerSettings) -> Result<()> {
    let sink = Sink::open(&settings.sink)?;
    tracing::info!(sink = %settings.sink.display(), orders = sink.len(), "sink opened");
    let rt = MqRuntime::new("consumer").map_err(|e| anyhow!("{e}"))?;
    let mut consumer = DefaultMQPushConsumer::builder(rt.client())
        .consumer_group(settings.group.clone())
        .name_server_addr(settings.namesrv.clone())
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .consume_message_batch_max_size(1)
        .build();
    consumer
        .subscribe(settings.topic.as_str(), "*")
        .await
        .map_err(|e| anyhow!("subscribe to {}: {e}", settings.topic))?;
    consumer.register_message_listener_concurrently(OrderSinkListener {
        sink: Mutex::new(sink),
        dlq: DeadLetters::new(&settings.dlq),
        max_attempts: settings.max_attempts,
    });
    consumer
        .start()
        .await
        .map_err(|e| anyhow!("start consumer on {}: {e}", settings.namesrv))?;
    tracing::info!(group = %settings.group, topic = %settings.topic, "consuming");
    crate::shutdown_signal().await;
    consumer.shutdown().await;
    Ok(())
}

/// Re-publishes every dead letter to the topic (plain, not transactional:
/// the order already exists) and removes those that were sent. Returns how
/// many were replayed.
pub async fn replay_dlq(namesrv: &str, topic: &str, dlq: &DeadLetters) -> Result<usize> {
    let letters = dlq.list()?;
    if letters.is_empty() {
        return Ok(0);
    }
    let rt = Arc::new(MqRuntime::new("dlq").map_err(|e| anyhow!("{e}"))?);
    let mut producer = DefaultMQProducer::builder(rt.client())
        .producer_group("order-core-dlq-replay")
        .name_server_addr(namesrv)
        .build();
    producer
        .start()
        .await
        .map_err(|e| anyhow!("start producer on {namesrv}: {e}"))?;
    let mut keep = Vec::new();
    let mut sent = 0;
    for dl in letters {
        let mut b = Message::builder()
            .topic(topic)
            .tags("order")
            .body(dl.body.clone().into_bytes());
        if let Some(k) = &dl.key {
            b = b.key(k.as_str());
        }
        match producer.send(b.build_unchecked()).await {
            Ok(_) => sent += 1,
            Err(e) => {
                tracing::warn!(msg_id = %dl.msg_id, error = %e, "replay failed; kept in the DLQ");
                keep.push(dl);
            }
        }
    }
    dlq.rewrite(&keep)?;
    producer.shutdown().await;
    Ok(sent)
}
