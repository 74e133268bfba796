//! Outbound: the messages decisions wrote to the outbox, published, and their rows deleted once
//! the broker confirmed them. Two paths share one publish and one classification ([`send`]):
//!
//! - the [`Publisher`]: a node hands it the rows of each decision right after the commit; its
//!   task ([`Publishing`]) publishes them as pipelined batches on the node's confirm channel and
//!   deletes the confirmed rows in batches, so an input is acked without waiting for the broker;
//! - the [relay](relay::run): what that path could not publish (no channel, a full queue, a
//!   failure, a crash in between) stays in the outbox; the relay claims it with
//!   `FOR UPDATE SKIP LOCKED`, publishes it and deletes it in the same transaction. A crash in
//!   between leaves the rows for the next round: delivery is at least once.
//!
//! A command no queue takes, or too large to ever publish, cannot be delivered: its row is
//! deleted and the saga must be told. This module does not apply inputs; it hands such commands
//! as [`Undeliverable`] data to whoever owns the receiving end (the runtime applies them as
//! replies).

mod publisher;
mod relay;

pub(crate) use publisher::{Publisher, Publishing};
pub(crate) use relay::run as relay;

use lapin::Channel;
use sagaflow_amqp::transport::{self, TransportError};
use sagas::protocol::{H_TRACEPARENT, ReplyOutcome, decode_command};
use sagas::{FailureCode, Reply, SagaId};
use tokio::sync::mpsc;

use crate::store::Claimed;

/// A command that can never be delivered, as the reply its saga gets instead.
pub(crate) type Undeliverable = (SagaId, Reply);

/// Where both paths hand [`Undeliverable`] commands. The receiving end ends once every path
/// that holds a sender has stopped.
pub(crate) type UndeliverableTx = mpsc::UnboundedSender<Undeliverable>;

/// What publishing a batch of rows did.
#[derive(Default)]
pub(crate) struct Sent {
    /// Rows the broker took, or that can never be published: delete them.
    pub(crate) done: Vec<i64>,
    /// The sagas to tell of commands that can never be delivered.
    pub(crate) undeliverable: Vec<Undeliverable>,
    /// Rows the broker or the connection failed to take: they stay, to be published again.
    pub(crate) failed: Vec<(i64, TransportError)>,
}

/// Publish `rows` pipelined, wait for the confirms, and say what became of each.
pub(crate) async fn send(ch: &Channel, rows: &[Claimed]) -> Sent {
    let batch: Vec<_> = rows.iter().map(|r| (r.exchange.as_str(), r.routing_key.as_str(), &r.msg, r.mandatory)).collect();
    let results = transport::publish_batch(ch, batch).await;
    let mut sent = Sent::default();
    for (r, result) in rows.iter().zip(results) {
        match result {
            Ok(()) => sent.done.push(r.id),
            Err(e) => match refusal(r, &e) {
                Some(outcome) => {
                    sent.done.push(r.id);
                    sent.undeliverable.extend(undeliverable(r, outcome));
                }
                None => sent.failed.push((r.id, e)),
            },
        }
    }
    sent
}

/// What the saga of row `r` is told when `e` means the row can never be published as it is;
/// `None` for a failure worth another try. A command that reached no queue is a failed attempt
/// the saga retries under the step's policy (a participant's queue may appear); a command too
/// large to publish is a refusal the saga compensates for (it would be as large every time). An
/// event too large is dropped with an error. Never a silent drop, never a row retried for ever.
fn refusal(r: &Claimed, e: &TransportError) -> Option<ReplyOutcome> {
    match e {
        TransportError::Unroutable { reply_text, .. } => {
            let message = format!("unroutable: no queue is bound for participant `{}` ({reply_text})", r.routing_key);
            tracing::error!(saga.id = %r.saga, participant = %r.routing_key, "{message}");
            Some(ReplyOutcome::TransientFailure { message })
        }
        TransportError::TooLarge { .. } => {
            tracing::error!(saga.id = %r.saga, exchange = %r.exchange, routing_key = %r.routing_key, error = %e, "an outbox message can never be published; dropping it");
            // The refusal's code is the saga's failure code for it.
            let code = FailureCode::Unpublishable.as_str();
            Some(ReplyOutcome::Rejected { code: code.into(), message: format!("{code}: {e}") })
        }
        _ => None,
    }
}

/// The reply that tells row `r`'s saga of `outcome`, when the row is a command (an event has
/// no saga waiting for it).
fn undeliverable(r: &Claimed, outcome: ReplyOutcome) -> Option<Undeliverable> {
    if !r.mandatory {
        return None;
    }
    // Only the command's coordinates are needed: leave out what may have made it too large.
    let mut coordinates = r.msg.clone();
    coordinates.body = b"null".to_vec();
    coordinates.headers.remove(H_TRACEPARENT);
    let Ok(cmd) = decode_command(&coordinates, usize::MAX) else {
        tracing::error!(saga.id = %r.saga, routing_key = %r.routing_key, "an undeliverable command does not decode; its saga cannot be told");
        return None;
    };
    Some((r.saga, Reply { in_reply_to: cmd.message_id, step: cmd.step, kind: cmd.kind, attempt: cmd.attempt, outcome }))
}
