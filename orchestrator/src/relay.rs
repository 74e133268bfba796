//! The outbox relay: it publishes what the deciding node could not (see `publisher`). Woken
//! by `NOTIFY sagaflow_outbox` (with a poll as a safety net), it claims rows with
//! `FOR UPDATE SKIP LOCKED`, publishes them with confirms (commands as `mandatory`), and
//! deletes them in the same transaction once the broker confirmed. A crash in between leaves
//! the rows for the next round: delivery is at-least-once.

use std::time::Duration;

use lapin::Channel;
use participants_sdk::transport::{self, TransportError};
use sagas::protocol::{H_TRACEPARENT, ReplyOutcome, decode_command};
use sagas::{Input, Reply};
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::intake::Engine;
use crate::store::{self, Claimed};

/// Run the relay on `ch` until `token` is cancelled; returns an error when the channel or the
/// database fails so the supervisor can reconnect.
pub(crate) async fn run(engine: Engine, ch: Channel, batch: u32, poll: Duration, token: CancellationToken) -> anyhow::Result<()> {
    let mut listener = PgListener::connect_with(engine.pool()).await?;
    listener.listen("sagaflow_outbox").await?;
    // Fresh rows are normally published by the node that wrote them (see `publisher`); a poll
    // takes only rows older than this, a notification (a node could not publish) takes all.
    let grace_ms = i64::try_from(poll.as_millis()).unwrap_or(i64::MAX);
    let mut min_age = grace_ms;
    loop {
        let n = relay_once(&engine, &ch, i64::from(batch), min_age).await?;
        if n >= batch as usize {
            continue;
        }
        min_age = grace_ms;
        tokio::select! {
            () = token.cancelled() => {
                // Flush what the last inputs wrote before stopping.
                while relay_once(&engine, &ch, i64::from(batch), 0).await? >= batch as usize {}
                let _ = ch.close(200, "shutdown".into()).await;
                return Ok(());
            }
            n = listener.try_recv() => {
                n?;
                min_age = 0;
            }
            () = tokio::time::sleep(poll) => {}
        }
    }
}

/// Publish one batch; returns how many rows it claimed.
pub(crate) async fn relay_once(engine: &Engine, ch: &Channel, limit: i64, min_age_ms: i64) -> anyhow::Result<usize> {
    let mut tx = engine.pool().begin().await?;
    let rows = store::claim_outbox(&mut tx, limit, min_age_ms).await?;
    if rows.is_empty() {
        // Commit, not roll back: rows that could not be read were dropped in it.
        tx.commit().await?;
        return Ok(0);
    }
    let results = publish_claimed(ch, &rows).await;
    let mut undeliverable = Vec::new();
    for (r, result) in rows.iter().zip(results) {
        match outcome(r, result) {
            Sent::Published => {}
            Sent::Undeliverable(reply) => undeliverable.extend(reply),
            // Nothing is deleted: the rows go back to the outbox with the rollback.
            Sent::Failed(e) => return Err(e.into()),
        }
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    store::delete_outbox(&mut *tx, &ids).await?;
    tx.commit().await?;
    for (saga, reply) in undeliverable {
        engine.apply(saga, &Input::Reply(reply), None).await?;
    }
    Ok(rows.len())
}

/// Publish outbox `rows` pipelined, then wait for the confirms: one result per row, in order.
pub(crate) async fn publish_claimed(ch: &Channel, rows: &[Claimed]) -> Vec<Result<(), TransportError>> {
    let batch: Vec<_> = rows.iter().map(|r| (r.exchange.as_str(), r.routing_key.as_str(), &r.msg, r.mandatory)).collect();
    transport::publish_batch(ch, batch).await
}

/// What a publish did for an outbox row.
pub(crate) enum Sent {
    /// The broker has it: delete the row.
    Published,
    /// It can never be delivered as it is: delete the row; for a command, the saga is told
    /// with this reply (see [`outcome`]).
    Undeliverable(Option<(sagas::SagaId, Reply)>),
    /// The broker or the connection failed: the row stays, to be published again.
    Failed(TransportError),
}

/// What `result`, the publish of row `r`, means. A command that reached no queue is a failed
/// attempt the saga retries under the step's policy (a participant's queue may appear); a
/// command too large to publish is a refusal the saga compensates for (it would be as large
/// every time). An event too large is dropped with an error. Never a silent drop, never a
/// row retried forever.
pub(crate) fn outcome(r: &Claimed, result: Result<(), TransportError>) -> Sent {
    let failed = |outcome: ReplyOutcome| -> Option<(sagas::SagaId, Reply)> {
        // Only the command's coordinates are needed: leave out what may have made it too large.
        let mut coordinates = r.msg.clone();
        coordinates.body = b"null".to_vec();
        coordinates.headers.remove(H_TRACEPARENT);
        let Ok(cmd) = decode_command(&coordinates, usize::MAX) else {
            tracing::error!(saga.id = %r.saga, routing_key = %r.routing_key, "an undeliverable command does not decode; its saga cannot be told");
            return None;
        };
        let reply = Reply { in_reply_to: cmd.message_id, step: cmd.step, kind: cmd.kind, attempt: cmd.attempt, outcome };
        Some((r.saga, reply))
    };
    match result {
        Ok(()) => Sent::Published,
        Err(TransportError::Unroutable { reply_text, .. }) => {
            let message = format!("unroutable: no queue is bound for participant `{}` ({reply_text})", r.routing_key);
            tracing::error!(saga.id = %r.saga, participant = %r.routing_key, "{message}");
            Sent::Undeliverable(failed(ReplyOutcome::TransientFailure { message }))
        }
        Err(e @ TransportError::TooLarge { .. }) => {
            tracing::error!(saga.id = %r.saga, exchange = %r.exchange, routing_key = %r.routing_key, error = %e, "an outbox message can never be published; dropping it");
            let message = format!("unpublishable: {e}");
            Sent::Undeliverable(failed(ReplyOutcome::Rejected { code: UNPUBLISHABLE.into(), message }))
        }
        Err(e) => Sent::Failed(e),
    }
}

/// The code of the refusal a saga sees for a command that can never be published.
pub(crate) const UNPUBLISHABLE: &str = "unpublishable";
