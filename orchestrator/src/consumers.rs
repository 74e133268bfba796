//! The orchestrator's two queues: replies from participants, and start requests and external
//! events from clients. Each delivery is decoded (refused → dead letter with the reason),
//! applied in one transaction, then acked.

use std::time::Duration;

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use participants_sdk::transport::{self, Names};
use sagas::protocol::{TYPE_EVENT, TYPE_START, decode_event, decode_reply, decode_start};
use sagas::{Input, MessageId};
use tokio_util::sync::CancellationToken;

use crate::intake::{Engine, Handled, StartError};

/// Which queue a consumer serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Queue {
    Replies,
    Inbound,
}

#[derive(Clone)]
pub(crate) struct Consumer {
    pub(crate) engine: Engine,
    pub(crate) names: Names,
    pub(crate) max_body: usize,
    pub(crate) prefetch: u16,
    pub(crate) concurrency: usize,
    pub(crate) batch_max: usize,
}

/// What to do with a delivery after handling it.
enum Verdict {
    Ack,
    DeadLetter(&'static str, String),
    /// Put it back (after a pause): the database is away, or no node here knows the version.
    Requeue(String),
}

impl Consumer {
    /// Consume `queue` until `token` is cancelled (then finish in-flight deliveries) or the
    /// channel fails.
    pub(crate) async fn run(self, ch: Channel, queue: Queue, token: CancellationToken) -> anyhow::Result<()> {
        ch.basic_qos(self.prefetch, BasicQosOptions::default()).await?;
        let name = self.queue_name(queue);
        let deliveries = ch.basic_consume(name.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
        let result = match queue {
            // Replies are applied in batches: one transaction for what arrived together.
            Queue::Replies => {
                transport::run_batch_consumer(&ch, deliveries, self.batch_max, self.concurrency, &token, |batch| {
                    let (this, ch, name) = (self.clone(), ch.clone(), name.clone());
                    async move {
                        let settled = this.replies(batch).await;
                        this.settle(&ch, &name, settled).await;
                    }
                })
                .await
            }
            Queue::Inbound => {
                transport::run_consumer(&ch, deliveries, self.concurrency, &token, |d| {
                    let (this, ch, name) = (self.clone(), ch.clone(), name.clone());
                    async move {
                        let verdict = this.inbound(&d).await;
                        this.settle(&ch, &name, vec![(d, verdict)]).await;
                    }
                })
                .await
            }
        };
        if result.is_ok() {
            let _ = ch.close(200, "shutdown".into()).await;
        }
        result.map_err(|e| anyhow::anyhow!("consuming {name}: {e}"))
    }

    fn queue_name(&self, queue: Queue) -> String {
        match queue {
            Queue::Replies => self.names.replies_queue(),
            Queue::Inbound => self.names.inbound_queue(),
        }
    }

    /// Ack, dead-letter or requeue each delivery as its verdict says. What goes back to the
    /// queue goes last, after a pause (the database is away, or no node here knows a version),
    /// so it does not hold up the others.
    async fn settle(&self, ch: &Channel, queue_name: &str, settled: Vec<(Delivery, Verdict)>) {
        let (requeue, settle): (Vec<_>, Vec<_>) = settled.into_iter().partition(|(_, v)| matches!(v, Verdict::Requeue(_)));
        for (d, verdict) in settle {
            let result = match verdict {
                Verdict::DeadLetter(reason, detail) => {
                    self.engine.metrics().dead_lettered(queue_name, reason);
                    transport::dead_letter(ch, &self.names, queue_name, &d, reason, &detail).await
                }
                // `Ack`: what goes back to the queue was set apart above.
                _ => transport::ack(&d).await,
            };
            if let Err(e) = result {
                tracing::warn!(queue = queue_name, error = %e, "could not settle a delivery; the broker will redeliver it");
            }
        }
        let Some((_, Verdict::Requeue(why))) = requeue.first() else { return };
        tracing::warn!(queue = queue_name, messages = requeue.len(), "{why}; the messages go back to the queue");
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (d, _) in requeue {
            if let Err(e) = transport::requeue(&d).await {
                tracing::warn!(queue = queue_name, error = %e, "could not requeue a delivery; the broker will redeliver it");
            }
        }
    }

    /// Decode the replies of `batch` (refused → dead letter) and apply them together.
    async fn replies(&self, batch: Vec<Delivery>) -> Vec<(Delivery, Verdict)> {
        tracing::debug!(replies = batch.len(), "applying a batch of replies");
        let mut settled = Vec::with_capacity(batch.len());
        let mut decoded = Vec::with_capacity(batch.len());
        for d in batch {
            match decode_reply(&transport::wire_from_delivery(&d), self.max_body) {
                Ok(r) => decoded.push((d, r.saga_id, Input::Reply(r.reply), r.message_id)),
                Err(e) => settled.push((d, Verdict::DeadLetter(e.code(), e.to_string()))),
            }
        }
        let inputs: Vec<_> = decoded.iter().map(|(_, saga, input, m)| (*saga, input, Some(*m))).collect();
        let handled = self.engine.apply_batch(&inputs).await;
        drop(inputs);
        match handled {
            Ok(hs) => settled.extend(decoded.into_iter().zip(hs).map(|((d, saga, ..), h)| (d, self.verdict(h, saga)))),
            Err(e) => settled.extend(decoded.into_iter().map(|(d, ..)| (d, Verdict::Requeue(format!("database error: {e}"))))),
        }
        settled
    }

    async fn inbound(&self, d: &Delivery) -> Verdict {
        let msg = transport::wire_from_delivery(d);
        match msg.kind.as_deref() {
            Some(TYPE_START) => {
                let req = match decode_start(&msg, self.max_body) {
                    Ok(r) => r,
                    Err(e) => return Verdict::DeadLetter(e.code(), e.to_string()),
                };
                match self.engine.start(&req, None).await {
                    Ok(_) => Verdict::Ack,
                    Err(StartError::Database(e)) => Verdict::Requeue(format!("database error: {e}")),
                    Err(e) => Verdict::DeadLetter(e.code(), e.to_string()),
                }
            }
            Some(TYPE_EVENT) => {
                let ev = match decode_event(&msg, self.max_body) {
                    Ok(ev) => ev,
                    Err(e) => return Verdict::DeadLetter(e.code(), e.to_string()),
                };
                let inbox = msg.message_id.as_deref().and_then(|m| m.parse::<MessageId>().ok());
                match self.engine.apply(ev.saga_id, &Input::Event { name: ev.event, payload: ev.payload }, inbox).await {
                    Ok(h) => self.verdict(h, ev.saga_id),
                    Err(e) => Verdict::Requeue(format!("database error: {e}")),
                }
            }
            Some(other) => Verdict::DeadLetter("unknown_type", format!("`{other}` is not a start request or an event")),
            None => Verdict::DeadLetter("invalid_properties", "the message has no `type`".into()),
        }
    }

    fn verdict(&self, h: Handled, saga: sagas::SagaId) -> Verdict {
        match h {
            Handled::Decided { .. } | Handled::Duplicate | Handled::Skipped => Verdict::Ack,
            Handled::UnknownSaga => Verdict::DeadLetter("unknown_saga", format!("no saga has id {saga}")),
            Handled::Invalid { code, detail } => Verdict::DeadLetter(code, detail),
            Handled::UnknownVersion { definition, version } => {
                Verdict::Requeue(format!("saga {saga} is on `{definition}` version {version}, which this node does not know"))
            }
        }
    }
}
