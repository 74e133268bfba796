//! The orchestrator's queues: replies from participants (and, with partitions, the events
//! forwarded to their saga's partition), start requests and external events from clients, and
//! the commands of child steps. Each delivery is decoded (refused → dead letter with the reason),
//! applied (its decision committed), then acked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::Shared;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use sagaflow_amqp::transport::TransportError;
use sagaflow_amqp::transport::{self, Names};
use sagas::protocol::{
    H_SAGA_ID, HeaderValue, InboundReplyOrHeartbeat, ProtocolError, TYPE_EVENT, TYPE_START, WireMessage, decode_command, decode_event,
    decode_reply_or_heartbeat, decode_start,
};
use sagas::{Input, MessageId, SagaId};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::children::ChildVerdict;
use crate::intake::{Engine, Handled, StartError};
use crate::store;

/// Which queue a consumer serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Queue {
    /// `{ns}.replies`, taken by every node.
    Replies,
    /// One reply partition's queue, taken by one node at a time (`partitions.rs`).
    Partition(u16),
    Inbound,
    /// The queue of the built-in participant `sagaflow.child` (`children`), taken by every node
    /// whose definitions start child sagas.
    Children,
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
            // Replies are applied in batches: one read and one write for what arrived together.
            Queue::Replies | Queue::Partition(_) => {
                let order = InOrder::default();
                transport::run_batch_consumer(&ch, deliveries, self.batch_max, self.concurrency, &token, |batch| {
                    let (this, ch, name) = (self.clone(), ch.clone(), name.clone());
                    // A reply without a readable saga id waits for nothing: it is dead-lettered.
                    let turn = order.take_turn(batch.iter().filter_map(saga_of));
                    async move {
                        let settled = this.replies(batch, turn).await;
                        this.settle(&ch, &name, settled).await;
                    }
                })
                .await
            }
            Queue::Inbound | Queue::Children => {
                transport::run_consumer(&ch, deliveries, self.concurrency, &token, |d| {
                    let (this, ch, name) = (self.clone(), ch.clone(), name.clone());
                    async move {
                        let verdict = if queue == Queue::Children { this.child(&d).await } else { this.inbound(&ch, &d).await };
                        this.settle(&ch, &name, vec![(d, verdict)]).await;
                    }
                })
                .await
            }
        };
        if result.is_ok() {
            transport::close_channel(&ch, "shutdown").await;
        }
        result.map_err(|e| anyhow::anyhow!("consuming {name}: {e}"))
    }

    fn queue_name(&self, queue: Queue) -> String {
        match queue {
            Queue::Replies => self.names.replies_queue(),
            Queue::Partition(p) => self.names.partition_queue(p),
            Queue::Inbound => self.names.inbound_queue(),
            Queue::Children => self.names.participant_queue(sagas::CHILD_PARTICIPANT),
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

    /// Decode the replies and heartbeats of `batch` (refused → dead letter) and apply them together, once the
    /// batches before it with replies of the same sagas are applied (`turn`).
    async fn replies(&self, batch: Vec<Delivery>, mut turn: Turn) -> Vec<(Delivery, Verdict)> {
        tracing::debug!(replies = batch.len(), "applying a batch of replies");
        let mut settled = Vec::with_capacity(batch.len());
        let mut decoded = Vec::with_capacity(batch.len());
        for d in batch {
            match transport::wire_from_delivery(&d, self.max_body).and_then(|m| self.decode_partitioned(&m)) {
                Ok((saga, input, inbox)) => decoded.push((d, saga, input, inbox)),
                Err(e) => settled.push((d, Verdict::DeadLetter(e.code(), e.to_string()))),
            }
        }
        // A reply is deduplicated by its saga's own fence, not by its message id: a reply that
        // does not answer the attempt its step waits for is ignored by `decide` (recorded as
        // `duplicate` or `stale`), so replies cost no inbox row. An event is, by its id.
        let inputs: Vec<_> = decoded.iter().map(|(_, saga, input, inbox)| (*saga, input, *inbox)).collect();
        turn.wait().await;
        let handled = match self.engine.apply_batch(&inputs).await {
            // One input PostgreSQL refuses must not hold back the others: each alone, then.
            Err(e) if store::is_unstorable(&e) => {
                tracing::warn!(error = %e, replies = inputs.len(), "PostgreSQL refused a batch of replies; applying them one by one");
                let mut each = Vec::with_capacity(inputs.len());
                for &(saga, input, m) in &inputs {
                    each.push(self.engine.apply(saga, input, m).await.map_err(|e| NotApplied::from(&e)));
                }
                each
            }
            Err(e) => inputs.iter().map(|_| Err(NotApplied::Database(e.to_string()))).collect(),
            Ok(hs) => hs.into_iter().map(Ok).collect(),
        };
        drop((inputs, turn));
        settled.extend(decoded.into_iter().zip(handled).map(|((d, saga, ..), h)| (d, self.applied(h, saga))));
        settled
    }

    /// What a reply queue carries: a reply or a heartbeat, or (with partitions) an event a
    /// node forwarded from the inbound queue ([`Self::forward_event`]); the saga, the input and
    /// the id to deduplicate it by.
    fn decode_partitioned(&self, m: &WireMessage) -> Result<(SagaId, Input, Option<MessageId>), ProtocolError> {
        if m.kind.as_deref() == Some(TYPE_EVENT) {
            let ev = decode_event(m, self.max_body)?;
            let inbox = event_inbox_id(m);
            return Ok((ev.saga_id, Input::Event { name: ev.event, payload: ev.payload }, inbox));
        }
        Ok(match decode_reply_or_heartbeat(m, self.max_body)? {
            InboundReplyOrHeartbeat::Reply(r) => (r.saga_id, Input::Reply(r.reply), None),
            InboundReplyOrHeartbeat::Heartbeat(saga, h) => (saga, Input::Heartbeat(h), None),
        })
    }

    /// With partitions, an event from the inbound queue goes on to its saga's partition queue
    /// (with the saga's id in `x-saga-id`, for the order of its batch), so the node that applies
    /// the saga's replies applies its events too, in arrival order. It is acked here once the
    /// broker confirmed the copy; a copy sent twice (a crash in between) is applied once, by its
    /// id. With no partition queue to take it, it is applied here.
    async fn forward_event(&self, ch: &Channel, mut msg: WireMessage, saga: SagaId, input: Input) -> Verdict {
        msg.headers.insert(H_SAGA_ID.into(), HeaderValue::Str(saga.to_string()));
        let queue = self.names.reply_queue_for(saga);
        match transport::publish_confirmed(ch, "", &queue, &msg, true).await {
            Ok(()) => Verdict::Ack,
            Err(TransportError::Unroutable { .. }) => {
                tracing::warn!(queue, saga.id = %saga, "no partition queue took an event; applying it here");
                let inbox = event_inbox_id(&msg);
                let h = self.engine.apply(saga, &input, inbox).await;
                self.applied(h.map_err(|e| NotApplied::from(&e)), saga)
            }
            Err(e) => Verdict::Requeue(format!("forwarding an event to {queue}: {e}")),
        }
    }

    /// The verdict on an input applied to `saga` ([`Self::verdict`]), or on the error that
    /// stopped it: refused for good when PostgreSQL cannot store it, back to the queue else.
    fn applied(&self, h: Result<Handled, NotApplied>, saga: SagaId) -> Verdict {
        match h {
            Ok(h) => self.verdict(h, saga),
            Err(NotApplied::Unstorable(e)) => Verdict::DeadLetter("unstorable", format!("PostgreSQL cannot store it: {e}")),
            Err(NotApplied::Database(e)) => Verdict::Requeue(format!("database error: {e}")),
        }
    }

    async fn inbound(&self, ch: &Channel, d: &Delivery) -> Verdict {
        let msg = match transport::wire_from_delivery(d, self.max_body) {
            Ok(msg) => msg,
            Err(e) => return Verdict::DeadLetter(e.code(), e.to_string()),
        };
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
                let (saga, input) = (ev.saga_id, Input::Event { name: ev.event, payload: ev.payload });
                if self.names.partitions() > 0 {
                    return self.forward_event(ch, msg, saga, input).await;
                }
                let inbox = event_inbox_id(&msg);
                let h = self.engine.apply(saga, &input, inbox).await;
                self.applied(h.map_err(|e| NotApplied::from(&e)), saga)
            }
            Some(other) => Verdict::DeadLetter("unknown_type", format!("`{other}` is not a start request or an event")),
            None => Verdict::DeadLetter("invalid_properties", "the message has no `type`".into()),
        }
    }

    /// A command of `sagaflow.child`: start or undo a child saga (`children`).
    async fn child(&self, d: &Delivery) -> Verdict {
        let cmd = match transport::wire_from_delivery(d, self.max_body).and_then(|m| decode_command(&m, self.max_body)) {
            Ok(cmd) => cmd,
            Err(e) => return Verdict::DeadLetter(e.code(), e.to_string()),
        };
        match self.engine.child_command(&cmd).await {
            ChildVerdict::Done => Verdict::Ack,
            ChildVerdict::Refused(code, why) => Verdict::DeadLetter(code, why),
            ChildVerdict::Later(why) => Verdict::Requeue(why),
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

/// Why an input was not applied.
enum NotApplied {
    /// PostgreSQL refused the data itself ([`store::is_unstorable`]): the same every time.
    Unstorable(String),
    /// The database failed (or the batch the input was in did): worth another try.
    Database(String),
}

impl From<&sqlx::Error> for NotApplied {
    fn from(e: &sqlx::Error) -> Self {
        if store::is_unstorable(e) { Self::Unstorable(e.to_string()) } else { Self::Database(e.to_string()) }
    }
}

/// The replies of one saga are applied in the order they arrived on this node (a parallel group's
/// branches completed in that order, and compensate in the reverse): a batch takes its turn when
/// it is formed, in delivery order, and waits for the batches before it that hold replies of the
/// same sagas. Batches of other sagas run side by side.
#[derive(Clone, Default)]
struct InOrder(Arc<Mutex<HashMap<SagaId, Done>>>);

/// Resolves when a batch is done: its [`Turn`] dropped its sender.
type Done = Shared<oneshot::Receiver<()>>;

impl InOrder {
    /// The turn of a batch of replies of `sagas` (call in delivery order).
    fn take_turn(&self, sagas: impl IntoIterator<Item = SagaId>) -> Turn {
        let (sender, done) = oneshot::channel();
        let done = done.shared();
        let mut last = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut mine, mut before) = (Vec::new(), Vec::new());
        for saga in sagas {
            match last.insert(saga, done.clone()) {
                Some(prev) if prev.ptr_eq(&done) => continue,
                Some(prev) => before.push(prev),
                None => {}
            }
            mine.push(saga);
        }
        drop(last);
        Turn { order: self.clone(), sagas: mine, before, done, _sender: sender }
    }
}

/// A batch's place in [`InOrder`]; dropping it lets the batches after it go.
struct Turn {
    order: InOrder,
    sagas: Vec<SagaId>,
    before: Vec<Done>,
    done: Done,
    _sender: oneshot::Sender<()>,
}

impl Turn {
    /// Wait until the batches before this one with replies of the same sagas are done.
    async fn wait(&mut self) {
        while let Some(prev) = self.before.last() {
            let _ = prev.clone().await;
            self.before.pop();
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut last = self.order.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for saga in &self.sagas {
            if last.get(saga).is_some_and(|d| d.ptr_eq(&self.done)) {
                last.remove(saga);
            }
        }
    }
}

/// What an event is deduplicated by: its `message_id`, when that is a UUID (an event without
/// one is not deduplicated by id).
fn event_inbox_id(m: &WireMessage) -> Option<MessageId> {
    m.message_id.as_deref().and_then(|id| id.parse::<MessageId>().ok())
}

/// The saga a reply is for, from its `x-saga-id` header.
fn saga_of(d: &Delivery) -> Option<SagaId> {
    match transport::delivery_header(d, H_SAGA_ID)? {
        HeaderValue::Str(s) => s.parse().ok(),
        HeaderValue::Int(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_waits_for_the_earlier_batches_of_its_sagas_only() {
        let order = InOrder::default();
        let (x, y) = (SagaId::new(), SagaId::new());
        let first = order.take_turn([x, x]);
        let mut second = order.take_turn([y, x]);
        let mut other = order.take_turn([y]);
        let mut unrelated = order.take_turn([SagaId::new()]);
        assert!(unrelated.wait().now_or_never().is_some(), "no earlier batch holds its saga");
        assert!(second.wait().now_or_never().is_none(), "the first batch holds x");
        drop(first);
        second.wait().now_or_never().expect("the first batch is done");
        assert!(other.wait().now_or_never().is_none(), "the second batch holds y");
        drop(second);
        other.wait().now_or_never().expect("the second batch is done");
        drop((other, unrelated));
        assert!(order.0.lock().unwrap().is_empty(), "nothing is kept once every batch is done");
    }
}
