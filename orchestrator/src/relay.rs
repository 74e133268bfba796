//! The outbox relay: it publishes what the deciding node could not (see `publisher`). Woken
//! by `NOTIFY sagaflow_outbox` (with a poll as a safety net), it claims rows with
//! `FOR UPDATE SKIP LOCKED`, publishes them with confirms (commands as `mandatory`), and
//! deletes them in the same transaction once the broker confirmed. A crash in between leaves
//! the rows for the next round: delivery is at-least-once.

use std::time::Duration;

use lapin::Channel;
use participants_sdk::transport::{self, TransportError};
use sagas::protocol::{DEFAULT_MAX_BODY_BYTES, ReplyOutcome, decode_command};
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
        tx.rollback().await?;
        return Ok(0);
    }
    let results = publish_claimed(ch, &rows).await;
    let mut unroutable = Vec::new();
    for (r, result) in rows.iter().zip(results) {
        match result {
            Ok(()) => {}
            Err(TransportError::Unroutable { reply_text, .. }) => unroutable.push((r, reply_text)),
            // Nothing is deleted: the rows go back to the outbox with the rollback.
            Err(e) => return Err(e.into()),
        }
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    store::delete_outbox(&mut *tx, &ids).await?;
    tx.commit().await?;
    report_unroutable(engine, unroutable).await?;
    Ok(rows.len())
}

/// Publish outbox `rows` pipelined, then wait for the confirms: one result per row, in order.
pub(crate) async fn publish_claimed(ch: &Channel, rows: &[Claimed]) -> Vec<Result<(), TransportError>> {
    let batch: Vec<_> = rows.iter().map(|r| (r.exchange.as_str(), r.routing_key.as_str(), &r.msg, r.mandatory)).collect();
    transport::publish_batch(ch, batch).await
}

/// A command that reached no queue is a failed attempt the saga sees (and retries under the
/// step's policy), not a silent drop.
pub(crate) async fn report_unroutable(engine: &Engine, rows: Vec<(&Claimed, String)>) -> Result<(), sqlx::Error> {
    for (r, why) in rows {
        if let Some((saga, reply)) = unroutable_reply(r, &why) {
            engine.apply(saga, &Input::Reply(reply), None).await?;
        }
    }
    Ok(())
}

/// The transient failure a saga sees for command `r` that reached no queue.
pub(crate) fn unroutable_reply(r: &Claimed, why: &str) -> Option<(sagas::SagaId, Reply)> {
    let cmd = decode_command(&r.msg, DEFAULT_MAX_BODY_BYTES).ok()?;
    let message = format!("unroutable: no queue is bound for participant `{}` ({why})", r.routing_key);
    tracing::error!(saga.id = %r.saga, step.name = %cmd.step_name, participant = %r.routing_key, "{message}");
    let reply = Reply {
        in_reply_to: cmd.message_id,
        step: cmd.step,
        kind: cmd.kind,
        attempt: cmd.attempt,
        outcome: ReplyOutcome::TransientFailure { message },
    };
    Some((r.saga, reply))
}
