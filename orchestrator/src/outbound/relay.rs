//! The outbox relay: it publishes what the deciding node could not (see [`super::Publisher`]).
//! Woken by `NOTIFY sagaflow_outbox` (with a poll as a safety net), it claims rows with
//! `FOR UPDATE SKIP LOCKED`, publishes them with confirms (commands as `mandatory`), and
//! deletes them in the same transaction once the broker confirmed. A crash in between leaves
//! the rows for the next round: delivery is at least once.

use std::time::Duration;

use lapin::Channel;
use sagaflow_amqp::transport;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::{UndeliverableTx, send};
use crate::store;

/// Relay on `ch` until `stop`, then flush what is left and close the channel. Returns an error
/// when the channel or the database fails, so the caller can reconnect.
pub(crate) async fn run(
    pool: PgPool,
    ch: Channel,
    batch: u32,
    poll: Duration,
    undeliverable: UndeliverableTx,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen("sagaflow_outbox").await?;
    let once = |min_age_ms| relay_once(&pool, &ch, i64::from(batch), min_age_ms, &undeliverable);
    // Fresh rows are normally published by the node that wrote them; a poll takes only rows
    // older than this, a notification (a node could not publish) takes all.
    let grace_ms = i64::try_from(poll.as_millis()).unwrap_or(i64::MAX);
    let mut min_age = grace_ms;
    loop {
        if once(min_age).await? >= batch as usize {
            continue;
        }
        min_age = grace_ms;
        tokio::select! {
            () = stop.cancelled() => break,
            n = listener.try_recv() => {
                n?;
                min_age = 0;
            }
            () = tokio::time::sleep(poll) => {}
        }
    }
    // Flush what the last inputs wrote before stopping.
    while once(0).await? >= batch as usize {}
    let _ = listener.unlisten_all().await;
    drop(listener);
    transport::close_channel(&ch, "shutdown").await;
    Ok(())
}

/// Publish one batch; returns how many rows it claimed.
async fn relay_once(pool: &PgPool, ch: &Channel, limit: i64, min_age_ms: i64, undeliverable: &UndeliverableTx) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows = store::claim_outbox(&mut tx, limit, min_age_ms).await?;
    if rows.is_empty() {
        // Commit, not roll back: rows that could not be read were dropped in it.
        tx.commit().await?;
        return Ok(0);
    }
    let sent = send(ch, &rows).await;
    if let Some((_, e)) = sent.failed.into_iter().next() {
        // Nothing is deleted: the rows go back to the outbox with the rollback.
        return Err(e.into());
    }
    store::delete_outbox(&mut *tx, &sent.done).await?;
    tx.commit().await?;
    for u in sent.undeliverable {
        // The runtime's receiver outlives every publishing path.
        let _ = undeliverable.send(u);
    }
    Ok(rows.len())
}
