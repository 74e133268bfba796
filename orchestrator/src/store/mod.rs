//! The PostgreSQL store (schema `sagaflow`): migrations, the reads the runtime makes before it
//! decides, the writes of decisions ([`write`]), timers, the outbox, retention, and the reads
//! of the operator surface.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use sagas::protocol::WireMessage;
use sagas::{SagaId, SagaState, SagaStatus, TimerKey, Timestamp};
use serde_json::Value;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row, SqlSafeStr};

pub(crate) mod schedules;
pub(crate) mod slots;
pub(crate) mod write;

pub(crate) use write::Guard;

/// The embedded migrations, recorded in `sagaflow._sqlx_migrations`.
pub fn migrator() -> Migrator {
    let migration = |version, name, sql: &'static str| {
        Migration::new(version, Cow::Borrowed(name), MigrationType::Simple, AssertSqlSafe(sql).into_sql_str(), false)
    };
    let migrations = vec![
        migration(1, "initial", include_str!("../../migrations/0001_initial.sql")),
        migration(2, "retention", include_str!("../../migrations/0002_retention.sql")),
        migration(3, "hot_updates", include_str!("../../migrations/0003_hot_updates.sql")),
        migration(4, "json_documents", include_str!("../../migrations/0004_json_documents.sql")),
        migration(5, "search_keys", include_str!("../../migrations/0005_search_keys.sql")),
        migration(6, "nodes", include_str!("../../migrations/0006_nodes.sql")),
        migration(7, "resource_slots", include_str!("../../migrations/0007_resource_slots.sql")),
        migration(8, "schedules", include_str!("../../migrations/0008_schedules.sql")),
    ];
    let mut m = Migrator::with_migrations(migrations);
    m.create_schema("sagaflow");
    m.dangerous_set_table_name("sagaflow._sqlx_migrations");
    m
}

/// Run the migrations (idempotent; concurrent nodes serialize on an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    migrator().run(pool).await
}

pub use sagaflow_amqp::is_unstorable;

/// An instance row as read: its state and trace context.
pub(crate) struct Instance {
    pub(crate) state: SagaState,
    pub(crate) traceparent: Option<String>,
}

/// Lock the instance row and read it. `None` when there is no such saga.
pub(crate) async fn lock(tx: &mut PgConnection, id: SagaId, skip_locked: bool) -> Result<Option<Instance>, sqlx::Error> {
    let sql = if skip_locked {
        "SELECT state, traceparent FROM sagaflow.instances WHERE id = $1 FOR UPDATE SKIP LOCKED"
    } else {
        "SELECT state, traceparent FROM sagaflow.instances WHERE id = $1 FOR UPDATE"
    };
    let Some(row) = sqlx::query(sql).bind(id.0).fetch_optional(&mut *tx).await? else { return Ok(None) };
    let state: Value = row.try_get(0)?;
    let state: SagaState = serde_json::from_value(state).map_err(|e| sqlx::Error::Decode(e.into()))?;
    Ok(Some(Instance { state, traceparent: row.try_get(1)? }))
}

/// What [`read_batch`] found.
#[derive(Default)]
pub(crate) struct ReadBatch {
    /// The instances that exist, by id, with the row version each was read at.
    pub(crate) sagas: HashMap<SagaId, (Instance, i64)>,
    /// The message ids applied before.
    pub(crate) seen: HashSet<uuid::Uuid>,
}

/// Read the instances `ids` and which of the message ids `messages` were applied before, in
/// one statement (one snapshot), without locking anything: a write after it names each saga's
/// row version in its [`Guard`] and writes only the sagas still at it. With no `messages`, only
/// the instances are read.
pub(crate) async fn read_batch(pool: &PgPool, ids: &[uuid::Uuid], messages: &[uuid::Uuid]) -> Result<ReadBatch, sqlx::Error> {
    let query = if messages.is_empty() { sqlx::query(READ_SAGAS) } else { sqlx::query(READ_SAGAS_AND_SEEN).bind(messages) };
    let rows = query.bind(ids).fetch_all(pool).await?;
    let mut batch = ReadBatch { sagas: HashMap::with_capacity(ids.len()), seen: HashSet::new() };
    for row in rows {
        if let Some(m) = row.try_get::<Option<uuid::Uuid>, _>(4)? {
            batch.seen.insert(m);
            continue;
        }
        let id: uuid::Uuid = row.try_get(0)?;
        let state: SagaState = serde_json::from_str(row.try_get(1)?).map_err(|e| sqlx::Error::Decode(e.into()))?;
        batch.sagas.insert(SagaId(id), (Instance { state, traceparent: row.try_get(2)? }, row.try_get(3)?));
    }
    Ok(batch)
}

/// [`read_batch`] without message ids: the instances `$1`, each with its row version.
const READ_SAGAS: &str = "SELECT id, state::text, traceparent, xmin::text::int8 AS row_version, NULL::uuid AS seen
    FROM sagaflow.instances WHERE id = ANY($1)";

/// [`read_batch`] with message ids: the instances `$2`, and which of the message ids `$1` the
/// inbox holds.
const READ_SAGAS_AND_SEEN: &str = "SELECT id, state::text, traceparent, xmin::text::int8 AS row_version, NULL::uuid AS seen
    FROM sagaflow.instances WHERE id = ANY($2)
    UNION ALL SELECT NULL, NULL, NULL, NULL, message_id FROM sagaflow.inbox WHERE message_id = ANY($1)";

/// The id of the saga started with idempotency key `key`, if any.
pub(crate) async fn by_idempotency_key(pool: &PgPool, key: &str) -> Result<Option<SagaId>, sqlx::Error> {
    let id: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM sagaflow.instances WHERE idempotency_key = $1").bind(key).fetch_optional(pool).await?;
    Ok(id.map(SagaId))
}

/// A saga to create with its first decision (whose state it takes).
pub(crate) struct NewInstance {
    pub(crate) definition: String,
    pub(crate) version: u32,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) traceparent: String,
    /// `(key, value)`: what the saga is found by (its definition's search keys).
    pub(crate) search_keys: Vec<(String, String)>,
}

/// What one decision writes, serialized (see [`write`]).
#[derive(Default)]
pub(crate) struct DecisionRows {
    /// The new state (JSON) and status, when the input applied.
    pub(crate) applied: Option<(String, SagaStatus)>,
    /// Its history row.
    pub(crate) history: HistoryRow,
    /// The messages to publish.
    pub(crate) outbox: Vec<OutboxRow>,
    /// Timers to schedule (or move).
    pub(crate) schedule: Vec<TimerRow>,
    /// Keys of timers to cancel (none also scheduled: a statement cannot both move and delete
    /// a row).
    pub(crate) cancel: Vec<String>,
    /// Resource slots queued for and given back.
    pub(crate) slots: slots::SlotRows,
}

impl DecisionRows {
    /// Whether writing it would change nothing: an input that did not apply and whose history
    /// row is not recorded (a stale heartbeat).
    pub(crate) fn writes_nothing(&self) -> bool {
        self.applied.is_none()
            && !self.history.recorded()
            && self.outbox.is_empty()
            && self.schedule.is_empty()
            && self.cancel.is_empty()
            && self.slots.is_empty()
    }
}

/// A timer to schedule.
pub(crate) struct TimerRow {
    pub(crate) key: String,
    /// The [`TimerKey`] as JSON.
    pub(crate) timer: String,
    pub(crate) due_ms: i64,
}

/// The timer rows of a decision that schedules `schedule` and cancels `cancel`: a timer
/// scheduled twice is scheduled once, at the later time asked; a timer both cancelled and
/// scheduled is scheduled (moved).
pub(crate) fn timer_rows(
    schedule: &[(TimerKey, Timestamp)],
    cancel: &[TimerKey],
) -> Result<(Vec<TimerRow>, Vec<String>), serde_json::Error> {
    let mut rows: Vec<TimerRow> = Vec::with_capacity(schedule.len());
    for (k, due) in schedule {
        let key = k.id();
        rows.retain(|r| r.key != key);
        rows.push(TimerRow { key, timer: serde_json::to_string(k)?, due_ms: i64::try_from(due.0).unwrap_or(i64::MAX) });
    }
    let cancel = cancel.iter().map(TimerKey::id).filter(|id| !rows.iter().any(|r| r.key == *id)).collect();
    Ok((rows, cancel))
}

/// Wake the relays (when this node could not publish what it wrote).
pub(crate) async fn notify_relays(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify('sagaflow_outbox', '')").execute(pool).await.map(drop)
}

/// One history row (the node is the writer's).
#[derive(Default)]
pub(crate) struct HistoryRow {
    pub(crate) saga: SagaId,
    pub(crate) input_kind: &'static str,
    /// The input, as JSON.
    pub(crate) input: String,
    pub(crate) outcome: &'static str,
    pub(crate) detail: Option<String>,
    pub(crate) status: &'static str,
    /// What the decision did, as JSON.
    pub(crate) effects: String,
    pub(crate) state_bytes: usize,
}

impl HistoryRow {
    /// Whether the row is written: every input's but a heartbeat's (`INSERT_HISTORY` in
    /// write.rs says the same in SQL).
    pub(crate) fn recorded(&self) -> bool {
        self.input_kind != "heartbeat"
    }
}

/// A message to publish.
pub(crate) struct OutboxRow {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) mandatory: bool,
    /// The message's properties and headers as JSON (its body is stored as it is).
    pub(crate) envelope: String,
    pub(crate) msg: WireMessage,
}

impl OutboxRow {
    /// A row for `msg`.
    pub(crate) fn new(exchange: String, routing_key: String, mandatory: bool, msg: WireMessage) -> Result<Self, serde_json::Error> {
        Ok(Self { exchange, routing_key, mandatory, envelope: serde_json::to_string(&msg)?, msg })
    }
}

/// Delete a timer that is firing; `None` when another node fired or cancelled it first.
pub(crate) async fn take_timer(tx: &mut PgConnection, saga: SagaId, key: &str) -> Result<Option<TimerKey>, sqlx::Error> {
    let v: Option<Value> = sqlx::query_scalar("DELETE FROM sagaflow.timers WHERE saga_id = $1 AND key = $2 RETURNING timer")
        .bind(saga.0)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
    v.map(|v| serde_json::from_value(v).map_err(|e| sqlx::Error::Decode(e.into()))).transpose()
}

/// Make a timer due at `due` instead (it stays otherwise as it is).
pub(crate) async fn postpone_timer(pool: &PgPool, saga: SagaId, key: &str, due: Timestamp) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE sagaflow.timers SET due_ms = $3 WHERE saga_id = $1 AND key = $2")
        .bind(saga.0)
        .bind(key)
        .bind(i64::try_from(due.0).unwrap_or(i64::MAX))
        .execute(pool)
        .await
        .map(drop)
}

/// What one retention round removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Completed or compensated sagas (with their history and timers).
    pub sagas: u64,
    /// Inbox entries (ids of messages already applied).
    pub inbox: u64,
}

/// Delete what is older than `days`: sagas that finished (`completed` or `compensated`) before
/// then, with their history, and inbox entries received before then, at most `batch` sagas
/// and `batch` inbox rows. Running, compensating and stopped sagas are never touched, nor a
/// child saga whose parent has not finished (the parent may still undo it). An old
/// message that arrives again after its inbox entry is gone is still recognised by `decide`
/// as a duplicate or stale input of its saga, or dead-lettered (`unknown_saga`) when the saga
/// is gone too.
pub async fn prune(pool: &PgPool, days: u32, batch: i64) -> Result<Pruned, sqlx::Error> {
    let sagas: i64 = sqlx::query_scalar(
        "WITH gone AS (
             DELETE FROM sagaflow.instances WHERE id IN (
                 SELECT id FROM sagaflow.instances c
                  WHERE finished_at < now() - make_interval(days => $1)
                    -- a child saga stays while its parent runs: the parent may still undo it
                    AND NOT EXISTS (SELECT 1 FROM sagaflow.instances p
                                     WHERE p.id = (c.state #>> '{parent,saga_id}')::uuid AND p.finished_at IS NULL)
                  ORDER BY finished_at LIMIT $2 FOR UPDATE OF c SKIP LOCKED)
             RETURNING id
         ), history AS (
             DELETE FROM sagaflow.history WHERE saga_id IN (SELECT id FROM gone)
         ), timers AS (
             DELETE FROM sagaflow.timers WHERE saga_id IN (SELECT id FROM gone)
         )
         SELECT count(*) FROM gone",
    )
    .bind(i32::try_from(days).unwrap_or(i32::MAX))
    .bind(batch)
    .fetch_one(pool)
    .await?;
    let inbox = sqlx::query(
        "DELETE FROM sagaflow.inbox WHERE message_id IN (
             SELECT message_id FROM sagaflow.inbox WHERE received_at < now() - make_interval(days => $1) LIMIT $2)",
    )
    .bind(i32::try_from(days).unwrap_or(i32::MAX))
    .bind(batch)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(Pruned { sagas: u64::try_from(sagas).unwrap_or(0), inbox })
}

/// Timers due by `now_ms`: `(saga, key)`.
pub(crate) async fn due_timers(pool: &PgPool, now_ms: i64, limit: i64) -> Result<Vec<(SagaId, String)>, sqlx::Error> {
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT saga_id, key FROM sagaflow.timers WHERE due_ms <= $1 ORDER BY due_ms LIMIT $2")
            .bind(now_ms)
            .bind(limit)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|(s, k)| (SagaId(s), k)).collect())
}

/// A claimed outbox row.
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) saga: SagaId,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) mandatory: bool,
    pub(crate) msg: WireMessage,
}

/// Lock up to `limit` outbox rows at least `min_age_ms` old for this transaction (other relays
/// skip them).
pub(crate) async fn claim_outbox(tx: &mut PgConnection, limit: i64, min_age_ms: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, saga_id, exchange, routing_key, mandatory, envelope, body FROM sagaflow.outbox
         WHERE created_at <= now() - make_interval(secs => $2::float8 / 1000)
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .bind(min_age_ms)
    .fetch_all(&mut *tx)
    .await?;
    let mut claimed = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for r in rows {
        let id: i64 = r.try_get("id")?;
        let envelope: Value = r.try_get("envelope")?;
        let Some(msg) = sagaflow_amqp::outbox::message(id, &envelope, r.try_get("body")?) else {
            unreadable.push(id);
            continue;
        };
        claimed.push(Claimed {
            id,
            saga: SagaId(r.try_get("saga_id")?),
            exchange: r.try_get("exchange")?,
            routing_key: r.try_get("routing_key")?,
            mandatory: r.try_get("mandatory")?,
            msg,
        });
    }
    if !unreadable.is_empty() {
        delete_outbox(&mut *tx, &unreadable).await?;
    }
    Ok(claimed)
}

pub(crate) async fn delete_outbox<'c>(ex: impl sqlx::PgExecutor<'c>, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM sagaflow.outbox WHERE id = ANY($1)").bind(ids).execute(ex).await.map(drop)
}

/// An instance's status and state, unlocked (for the client and the operator surface).
pub async fn load(pool: &PgPool, id: SagaId) -> Result<Option<SagaState>, sqlx::Error> {
    let v: Option<Value> = sqlx::query_scalar("SELECT state FROM sagaflow.instances WHERE id = $1").bind(id.0).fetch_optional(pool).await?;
    v.map(|v| serde_json::from_value(v).map_err(|e| sqlx::Error::Decode(e.into()))).transpose()
}

/// One saga's history, oldest first.
pub async fn history(pool: &PgPool, id: SagaId) -> Result<Vec<HistoryEntry>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT node, input_kind, input, outcome, detail, status, effects, (extract(epoch FROM at) * 1000)::int8
         FROM sagaflow.history WHERE saga_id = $1 ORDER BY id",
    )
    .bind(id.0)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(HistoryEntry {
                node: r.try_get(0)?,
                input_kind: r.try_get(1)?,
                input: r.try_get(2)?,
                outcome: r.try_get(3)?,
                detail: r.try_get(4)?,
                status: r.try_get(5)?,
                effects: r.try_get(6)?,
                at: r.try_get(7)?,
            })
        })
        .collect()
}

/// One input in a saga's history and what it decided.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HistoryEntry {
    /// The node that decided.
    pub node: String,
    /// `start`, `reply`, `timer`, `event` or `operator`.
    pub input_kind: String,
    /// The input.
    pub input: Value,
    /// `applied`, `duplicate`, `stale` or `refused`.
    pub outcome: String,
    /// Why, for inputs that did not apply.
    pub detail: Option<String>,
    /// The status after the input.
    pub status: String,
    /// What the decision did.
    pub effects: Value,
    /// When it was written, in milliseconds since the epoch.
    pub at: i64,
}
