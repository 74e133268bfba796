//! Shared-resource slots (`StepBuilder::limit`): which steps wait for a slot of a resource, in
//! order, and which hold one.
//!
//! A decision queues a step for a slot and gives one back in the same statement that writes the
//! saga's state (`ACQUIRE_SLOTS` and `RELEASE_SLOTS` in write.rs), so the slot rows always agree
//! with the sagas, whichever process dies when: a node killed mid-decision leaves both or
//! neither. Granting is apart: [`grant`] moves the first waiters of a resource (by priority,
//! then arrival) to its holders, up to its capacity, under the resource's lock, and schedules a
//! `SlotGranted` timer for each, due at once. Any node grants after a commit that queued or gave
//! back a slot, and every few seconds for every resource with waiters (a grant lost with a node
//! that died between its commit and the grant is made by the next sweep).

use sagas::{SagaId, StepIndex, Timestamp};
use sqlx::PgPool;

/// A step queued for a slot.
pub(crate) struct Acquire {
    pub(crate) step: i32,
    pub(crate) resource: String,
    pub(crate) capacity: i32,
    pub(crate) priority: i32,
}

/// The slots one decision queues for and gives back.
#[derive(Default)]
pub(crate) struct SlotRows {
    pub(crate) acquire: Vec<Acquire>,
    /// `(step, resource)`: the step's slot, or its place in the queue, given back.
    pub(crate) release: Vec<(i32, String)>,
}

impl SlotRows {
    pub(crate) fn is_empty(&self) -> bool {
        self.acquire.is_empty() && self.release.is_empty()
    }

    /// The resources whose queue or holders the decision changed.
    pub(crate) fn resources(&self) -> Vec<String> {
        let mut r: Vec<String> =
            self.acquire.iter().map(|a| a.resource.clone()).chain(self.release.iter().map(|(_, r)| r.clone())).collect();
        r.sort_unstable();
        r.dedup();
        r
    }
}

/// The resource's lock: grants of one resource run one at a time, on any node.
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended('sagaflow.slots/' || $1, 0))";

/// Move the first waiters of resource $1 to its holders while fewer than its capacity (the
/// first waiter's: definitions naming one resource should agree on it) hold it, and schedule a
/// `SlotGranted` timer due at $2 for each. Run under [`LOCK`], so the holders counted are every
/// grant committed before.
const GRANT: &str = "WITH cap AS (
    SELECT capacity FROM sagaflow.slot_waiters WHERE resource = $1 ORDER BY priority DESC, seq LIMIT 1
), picked AS (
    DELETE FROM sagaflow.slot_waiters w WHERE w.seq IN (
        SELECT seq FROM sagaflow.slot_waiters WHERE resource = $1 ORDER BY priority DESC, seq
        LIMIT GREATEST(0, COALESCE((SELECT capacity FROM cap), 0) - (SELECT count(*) FROM sagaflow.slot_holders WHERE resource = $1))
    )
    RETURNING w.saga_id, w.step, w.priority, w.seq
), held AS (
    INSERT INTO sagaflow.slot_holders (saga_id, step, resource) SELECT saga_id, step, $1 FROM picked ON CONFLICT DO NOTHING
), due AS (
    INSERT INTO sagaflow.timers (saga_id, key, timer, due_ms)
    SELECT saga_id, 'slot/' || step, json_build_object('timer', 'slot_granted', 'step', step), $2 FROM picked
    ON CONFLICT (saga_id, key) DO UPDATE SET timer = EXCLUDED.timer, due_ms = EXCLUDED.due_ms
)
SELECT saga_id, step FROM picked ORDER BY priority DESC, seq";

/// Grant what resource `resource` has free to its first waiters; returns the steps granted, in
/// the order they were queued for (priority, then arrival).
pub(crate) async fn grant(pool: &PgPool, resource: &str) -> Result<Vec<(SagaId, StepIndex)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK).bind(resource).execute(&mut *tx).await?;
    let now = i64::try_from(Timestamp::now().0).unwrap_or(i64::MAX);
    let granted: Vec<(uuid::Uuid, i32)> = sqlx::query_as(GRANT).bind(resource).bind(now).fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(granted.into_iter().map(|(s, step)| (SagaId(s), StepIndex(u32::try_from(step).unwrap_or_default()))).collect())
}

/// The resources with steps waiting for a slot.
pub(crate) async fn waiting_resources(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT DISTINCT resource FROM sagaflow.slot_waiters").fetch_all(pool).await
}

/// Per resource: how many steps hold a slot and how many wait for one (for the metrics).
pub(crate) async fn usage(pool: &PgPool) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT resource, sum(held)::int8, sum(waiting)::int8 FROM (
             SELECT resource, 1 AS held, 0 AS waiting FROM sagaflow.slot_holders
             UNION ALL SELECT resource, 0, 1 FROM sagaflow.slot_waiters
         ) u GROUP BY resource ORDER BY resource",
    )
    .fetch_all(pool)
    .await
}
