//! Waiting for outcomes.

use std::time::Duration;

use sagas::{SagaId, SagaState, SagaStatus};
use sqlx::PgPool;

pub use orchestrator::store::{HistoryEntry, history};
pub use orchestrator::wait_settled as settled;

/// Wait until every saga in `ids` is settled; returns their states in the same order.
pub async fn all_settled(pool: &PgPool, ids: &[SagaId], timeout: Duration) -> anyhow::Result<Vec<SagaState>> {
    let mut out = Vec::with_capacity(ids.len());
    let deadline = tokio::time::Instant::now() + timeout;
    for id in ids {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        out.push(orchestrator::wait_settled(pool, *id, left).await?);
    }
    Ok(out)
}

/// Wait until `check` holds for saga `id`'s state (e.g. a step is running).
pub async fn until(pool: &PgPool, id: SagaId, timeout: Duration, check: impl Fn(&SagaState) -> bool) -> anyhow::Result<SagaState> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(st) = orchestrator::store::load(pool, id).await?
            && check(&st)
        {
            return Ok(st);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "saga {id}: condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many sagas have each status.
pub async fn status_counts(pool: &PgPool) -> anyhow::Result<Vec<(SagaStatus, i64)>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM sagaflow.instances GROUP BY status ORDER BY status").fetch_all(pool).await?;
    rows.into_iter().map(|(s, n)| Ok((serde_json::from_value(serde_json::Value::String(s))?, n))).collect()
}

/// Take up to `want` messages from `queue` (acking them), waiting up to `window`.
pub async fn drain(ch: &lapin::Channel, queue: &str, want: usize, window: Duration) -> anyhow::Result<Vec<lapin::message::Delivery>> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while out.len() < want && tokio::time::Instant::now() < deadline {
        match ch.basic_get(queue.into(), lapin::options::BasicGetOptions::default()).await? {
            Some(m) => {
                m.delivery.ack(lapin::options::BasicAckOptions::default()).await?;
                out.push(m.delivery);
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    Ok(out)
}

/// The `x-dead-letter-reason` of a dead letter (empty when it has none).
pub fn dead_letter_reason(d: &lapin::message::Delivery) -> String {
    match d.properties.headers().as_ref().and_then(|h| h.inner().get(sagas::protocol::H_DEAD_LETTER_REASON).cloned()) {
        Some(lapin::types::AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        _ => String::new(),
    }
}

/// The sorted dead-letter reasons of up to `want` messages of `queue`.
pub async fn dead_letter_reasons(ch: &lapin::Channel, queue: &str, want: usize, window: Duration) -> anyhow::Result<Vec<String>> {
    let mut reasons: Vec<String> = drain(ch, queue, want, window).await?.iter().map(dead_letter_reason).collect();
    reasons.sort();
    Ok(reasons)
}
