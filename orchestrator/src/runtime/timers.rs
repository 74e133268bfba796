//! Durable timers: every `timer_poll_ms` the node reads the due timers and fires each in its
//! own transaction (instance locked with `SKIP LOCKED`, timer row deleted, `decide`, write).
//! Nodes race harmlessly: the row is deleted by whoever fires it first. The same loop fires the
//! due schedules (`crate::schedules`) and sweeps the resource slots (`store::slots`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::intake::{Engine, Handled};
use crate::store;

/// How often a node grants what every resource with waiters has free, whatever else happens
/// (a grant lost with a node that died between a commit and its grant is made then).
const SLOT_SWEEP: Duration = Duration::from_secs(3);

/// Fire due timers until `token` is cancelled; woken early by `engine.timers_wake` (a resource
/// slot was granted: its timer is due now).
pub(crate) async fn run(engine: Engine, poll: Duration, batch: u32, token: CancellationToken) {
    let (mut swept, mut scheduled) = (tokio::time::Instant::now(), tokio::time::Instant::now());
    loop {
        match fire_due(&engine, i64::from(batch)).await {
            Ok(n) if n >= batch as usize => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "timers: database error; retrying"),
        }
        if scheduled.elapsed() >= crate::schedules::POLL {
            scheduled = tokio::time::Instant::now();
            if let Err(e) = crate::schedules::fire_due(&engine).await {
                tracing::warn!(error = %e, "schedules: database error; the due ticks stay due");
            }
        }
        if swept.elapsed() >= SLOT_SWEEP {
            swept = tokio::time::Instant::now();
            if let Err(e) = engine.sweep_slots().await {
                tracing::warn!(error = %e, "resource slots: database error; retrying at the next sweep");
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(poll) => {}
            () = engine.timers_wake.notified() => {}
        }
    }
}

async fn fire_due(engine: &Engine, limit: i64) -> Result<usize, sqlx::Error> {
    let due = store::due_timers(engine.pool(), i64::try_from(sagas::Timestamp::now().0).unwrap_or(i64::MAX), limit).await?;
    let mut fired = 0;
    for (saga, key) in &due {
        match engine.fire_timer(*saga, key).await? {
            Handled::Skipped | Handled::UnknownVersion { .. } | Handled::Invalid { .. } => {}
            _ => fired += 1,
        }
    }
    Ok(fired)
}
