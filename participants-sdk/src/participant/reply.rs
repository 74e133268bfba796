//! After the commit: the replies published with confirms, then the commands acked; what can
//! never be delivered goes to the participant's dead-letter queue with the reason.
//!
//! A batch hands its committed commands to the connection's reply task ([`Participant::send_replies`])
//! and is done: its slot takes the next commands at once. The task publishes everything handed
//! to it since its last batch as one pipelined batch, so the replies of many transactions share
//! one wait for the broker's confirms, instead of each transaction waiting its turn for a
//! confirm of its own.

use lapin::Channel;
use lapin::message::Delivery;
use sagaflow_amqp::transport;
use sagas::protocol::{InboundCommand, WireMessage};
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::{Error, Participant};
use crate::store;

/// A committed command: its delivery (acked once its reply is confirmed), the command, its reply.
pub(super) type Committed = (Delivery, InboundCommand, WireMessage);

/// Where batches hand their committed commands. Unbounded as a channel, bounded by `prefetch`:
/// every item holds a delivery the broker counts as unacked.
pub(super) type Replies = mpsc::UnboundedSender<Vec<Committed>>;

/// Most replies in one pipelined batch.
const MAX_REPLY_BATCH: usize = 1024;

impl Participant {
    /// Hand committed commands to the reply task. Should that task be gone (it outlives every
    /// batch of its connection), the commands go back to the queue and are answered from the
    /// record when redelivered.
    pub(super) async fn finish(&self, replies: &Replies, done: Vec<((Delivery, InboundCommand), WireMessage)>) {
        let mut sent = Vec::with_capacity(done.len());
        for ((d, cmd), reply) in done {
            if self.inner.crash_after_commit.as_ref().is_some_and(|crash| crash(&cmd)) {
                tracing::warn!(message.id = %cmd.message_id, "fault injection: crashing after the commit, before the reply and the ack");
                let _ = transport::requeue(&d).await;
                continue;
            }
            sent.push((d, cmd, reply));
        }
        if let Err(mpsc::error::SendError(lost)) = replies.send(sent) {
            for (d, ..) in lost {
                let _ = transport::requeue(&d).await;
            }
        }
    }

    /// The reply task of a connection: publish what batches hand over, many batches' replies at
    /// a time, until every sender is gone (the consumer stopped and its batches ended).
    pub(super) async fn send_replies(self, ch: Channel, mut committed: mpsc::UnboundedReceiver<Vec<Committed>>) {
        while let Some(mut batch) = committed.recv().await {
            while batch.len() < MAX_REPLY_BATCH {
                match committed.try_recv() {
                    Ok(more) => batch.extend(more),
                    Err(_) => break,
                }
            }
            self.publish_replies(&ch, batch).await;
        }
    }

    /// Publish the replies (pipelined, with confirms), then ack their commands. A command whose
    /// reply the broker did not take goes back to the queue unacked: redelivered, it is answered
    /// from the record.
    async fn publish_replies(&self, ch: &Channel, sent: Vec<Committed>) {
        let batch = sent.iter().map(|(_, cmd, reply)| ("", cmd.reply_to.as_str(), reply, true)).collect();
        let one_batch = self.inner.publishing.lock().await;
        let results = transport::publish_batch(ch, batch).await;
        let mut settled = Vec::with_capacity(sent.len());
        for ((d, cmd, reply), result) in sent.into_iter().zip(results) {
            match result {
                Ok(()) => settled.push((d, cmd)),
                Err(e) if self.set_aside(ch, &cmd.reply_to, &reply, &e).await => settled.push((d, cmd)),
                Err(e) => {
                    tracing::warn!(message.id = %cmd.message_id, error = %e, "reply not sent; the command goes back to the queue and is answered from the record");
                    let _ = transport::requeue(&d).await;
                }
            }
        }
        drop(one_batch);
        for (d, cmd) in settled {
            if let Err(e) = transport::ack(&d).await {
                tracing::warn!(message.id = %cmd.message_id, error = %e, "ack failed; the command will be redelivered and answered from the record");
            }
        }
    }

    /// Dead-letter `d` with `reason` (back to the queue if even that fails).
    pub(super) async fn refuse(&self, ch: &Channel, queue: &str, d: &Delivery, reason: &str, detail: &str) {
        let one_batch = self.inner.publishing.lock().await;
        let refused = transport::dead_letter(ch, &self.inner.names, queue, d, reason, detail).await;
        drop(one_batch);
        if let Err(e) = refused {
            tracing::error!(error = %e, reason, "could not dead-letter a message; it goes back to the queue");
            let _ = transport::requeue(d).await;
        }
    }

    /// A reply that can never be delivered as it is (its `reply_to` queue does not exist, or it
    /// is too large to publish) goes to this participant's dead-letter queue with the reason,
    /// instead of staying in the outbox for ever; `true` once it is there (delete the row).
    async fn set_aside(&self, ch: &Channel, reply_to: &str, reply: &WireMessage, e: &transport::TransportError) -> bool {
        let reason = match e {
            transport::TransportError::Unroutable { .. } => "unroutable_reply",
            transport::TransportError::TooLarge { .. } => "unpublishable",
            _ => return false,
        };
        let queue = self.inner.names.participant_queue(&self.inner.name);
        let detail = format!("the reply to `{reply_to}` cannot be delivered: {e}");
        tracing::error!(participant = %self.inner.name, reason, detail, message.id = reply.message_id.as_deref().unwrap_or(""), "dead-lettering a reply");
        let props = transport::properties(reply);
        match transport::publish_dead_letter(ch, &self.inner.names, &queue, &props, &reply.body, reason, &detail).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "could not dead-letter the reply; it stays in the outbox");
                false
            }
        }
    }

    /// Publish replies an earlier version of the SDK left in its outbox.
    pub(super) async fn sweep(&self, pool: &PgPool, ch: &Channel) -> Result<(), Error> {
        let age = i64::try_from(self.inner.config.sweep_interval.as_millis()).unwrap_or(i64::MAX);
        let mut tx = pool.begin().await?;
        let pending = store::claim_stale(&mut tx, &self.inner.name, age, 100).await?;
        let batch: Vec<(&str, &str, &WireMessage, bool)> = pending.iter().map(|p| ("", p.routing_key.as_str(), &p.msg, true)).collect();
        let _one_batch = self.inner.publishing.lock().await;
        let results = transport::publish_batch(ch, batch).await;
        let mut sent = Vec::new();
        for (p, result) in pending.iter().zip(results) {
            match result {
                Ok(()) => sent.push(p.id),
                Err(e) if self.set_aside(ch, &p.routing_key, &p.msg, &e).await => sent.push(p.id),
                Err(e) => tracing::warn!(error = %e, "leftover reply not sent; retrying later"),
            }
        }
        sqlx::query("DELETE FROM sagaflow_participant.outbox WHERE id = ANY($1)").bind(&sent).execute(&mut *tx).await?;
        tx.commit().await?;
        if !sent.is_empty() {
            tracing::info!(participant = %self.inner.name, count = sent.len(), "republished leftover replies");
        }
        Ok(())
    }
}
