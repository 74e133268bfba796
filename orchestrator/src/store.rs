//! The PostgreSQL store (schema `sagaflow`): migrations, and the reads and writes the runtime
//! makes inside the transaction of an input or of a batch of replies.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use sagas::protocol::WireMessage;
use sagas::{SagaId, SagaState, TimerKey, Timestamp};
use serde_json::Value;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row, SqlSafeStr};

/// The embedded migrations, recorded in `sagaflow._sqlx_migrations`.
pub fn migrator() -> Migrator {
    let migration = |version, name, sql: &'static str| {
        Migration::new(version, Cow::Borrowed(name), MigrationType::Simple, AssertSqlSafe(sql).into_sql_str(), false)
    };
    let migrations = vec![
        migration(1, "initial", include_str!("../migrations/0001_initial.sql")),
        migration(2, "retention", include_str!("../migrations/0002_retention.sql")),
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

/// An instance row as read: its state and trace context.
pub use sagaflow_amqp::is_unstorable;

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
pub(crate) struct ReadBatch {
    /// The instances that exist, by id, with the row version each was read at.
    pub(crate) sagas: HashMap<SagaId, (Instance, i64)>,
    /// The message ids applied before.
    pub(crate) seen: HashSet<uuid::Uuid>,
}

/// Read the instances `ids` and which of the message ids `messages` were applied before, in
/// one statement (one snapshot), without locking anything: a write after it names each saga's
/// row version in its [`Guard`] and writes only the sagas still at it.
pub(crate) async fn read_batch(pool: &PgPool, ids: &[uuid::Uuid], messages: &[uuid::Uuid]) -> Result<ReadBatch, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, state, traceparent, xmin::text::int8 AS row_version, NULL::uuid AS seen FROM sagaflow.instances WHERE id = ANY($1)
         UNION ALL SELECT NULL, NULL, NULL, NULL, message_id FROM sagaflow.inbox WHERE message_id = ANY($2)",
    )
    .bind(ids)
    .bind(messages)
    .fetch_all(pool)
    .await?;
    let mut batch = ReadBatch { sagas: HashMap::with_capacity(ids.len()), seen: HashSet::new() };
    for row in rows {
        if let Some(m) = row.try_get::<Option<uuid::Uuid>, _>(4)? {
            batch.seen.insert(m);
            continue;
        }
        let id: uuid::Uuid = row.try_get(0)?;
        let state: SagaState = serde_json::from_value(row.try_get(1)?).map_err(|e| sqlx::Error::Decode(e.into()))?;
        batch.sagas.insert(SagaId(id), (Instance { state, traceparent: row.try_get(2)? }, row.try_get(3)?));
    }
    Ok(batch)
}

/// The condition of a write after [`read_batch`]: each decision's saga is written only if its
/// row is still at the version it was read at (`xmin`: any other write of the row changes it),
/// and together with the ids of the messages that carried its input.
pub(crate) struct Guard {
    /// `(saga, row version)`, one per decision.
    pub(crate) versions: Vec<(uuid::Uuid, i64)>,
    /// `(message, saga)`: the ids to record in the inbox.
    pub(crate) marks: Vec<(uuid::Uuid, uuid::Uuid)>,
}

/// What [`write_decisions`] wrote.
#[derive(Default)]
pub(crate) struct Wrote {
    /// The outbox row ids, in the order of the decisions written and their rows.
    pub(crate) outbox: Vec<i64>,
    /// With a [`Guard`]: the sagas still at their version, locked by the write ...
    pub(crate) locked: HashSet<uuid::Uuid>,
    /// ... and of those, the ones written (the others' message id was recorded meanwhile).
    pub(crate) written: HashSet<uuid::Uuid>,
}

/// The id of the saga started with idempotency key `key`, if any.
pub(crate) async fn by_idempotency_key(pool: &PgPool, key: &str) -> Result<Option<SagaId>, sqlx::Error> {
    let id: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM sagaflow.instances WHERE idempotency_key = $1").bind(key).fetch_optional(pool).await?;
    Ok(id.map(SagaId))
}

/// A saga to create with its first decision (whose state it takes).
pub(crate) struct NewInstance<'a> {
    pub(crate) definition: &'a str,
    pub(crate) version: u32,
    pub(crate) idempotency_key: Option<&'a str>,
    pub(crate) traceparent: &'a str,
}

/// What one decision writes.
pub(crate) struct DecisionRows {
    /// The new state and status, when the input applied.
    pub(crate) applied: Option<(Value, &'static str)>,
    /// Its history row.
    pub(crate) history: HistoryRow,
    /// The messages to publish.
    pub(crate) outbox: Vec<OutboxRow>,
    /// Timers to schedule (or move).
    pub(crate) schedule: Vec<(TimerKey, Timestamp)>,
    /// Timers to cancel.
    pub(crate) cancel: Vec<TimerKey>,
}

/// Everything `decisions` write, in one statement: the new states, the history rows, the
/// outbox rows and the timers. With `new`, the one decision starts a saga: its instance is
/// inserted with the decision's state, and nothing is written (`None`) when the id or the
/// idempotency key is taken. With `guard`, each decision is written only if its saga is still
/// at the version it was decided on and its message id was not recorded meanwhile (see
/// [`Guard`]); the sagas are locked in id order, so writes on several nodes never deadlock.
/// Being one statement, neither needs a transaction around it. Without either, the caller
/// holds the sagas' locks. With `wake_relays`, the relays are notified when the rows commit
/// (for a writer that cannot publish them itself).
pub(crate) async fn write_decisions<'c>(
    ex: impl sqlx::PgExecutor<'c>,
    node: &str,
    decisions: &[&DecisionRows],
    new: Option<NewInstance<'_>>,
    guard: Option<&Guard>,
    wake_relays: bool,
) -> Result<Option<Wrote>, sqlx::Error> {
    let n = decisions.len();
    let (mut upd_ids, mut upd_states, mut upd_status) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut h_saga, mut h_kind, mut h_input, mut h_outcome) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut h_detail, mut h_status, mut h_effects) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut h_input_bytes, mut h_state_bytes) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut o_saga, mut o_exchange, mut o_key, mut o_mandatory, mut o_envelope, mut o_body) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut c_saga, mut c_key) = (Vec::new(), Vec::new());
    let (mut t_saga, mut t_key, mut t_timer, mut t_due) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut created = None;
    for d in decisions {
        let h = &d.history;
        match (&d.applied, &new) {
            (Some((state, status)), Some(_)) => created = Some((h.saga.0, state, *status)),
            (Some((state, status)), None) => {
                upd_ids.push(h.saga.0);
                upd_states.push(state);
                upd_status.push(*status);
            }
            (None, _) => {}
        }
        h_saga.push(h.saga.0);
        h_kind.push(h.input_kind);
        h_input_bytes.push(i32::try_from(h.input.to_string().len()).unwrap_or(i32::MAX));
        h_input.push(&h.input);
        h_outcome.push(h.outcome);
        h_detail.push(h.detail.as_deref());
        h_status.push(h.status);
        h_effects.push(&h.effects);
        h_state_bytes.push(i32::try_from(h.state_bytes).unwrap_or(i32::MAX));
        for r in &d.outbox {
            o_saga.push(h.saga.0);
            o_exchange.push(r.exchange.as_str());
            o_key.push(r.routing_key.as_str());
            o_mandatory.push(r.mandatory);
            o_envelope.push(serde_json::to_value(&r.msg).unwrap_or(Value::Null));
            o_body.push(r.msg.body.as_slice());
        }
        // A timer scheduled again is moved by the upsert; one statement may not also delete it.
        let mut scheduled: Vec<(String, &TimerKey, Timestamp)> = Vec::with_capacity(d.schedule.len());
        for (k, due) in &d.schedule {
            let id = k.id();
            scheduled.retain(|(other, ..)| *other != id);
            scheduled.push((id, k, *due));
        }
        for k in &d.cancel {
            let id = k.id();
            if !scheduled.iter().any(|(s, ..)| *s == id) {
                c_saga.push(h.saga.0);
                c_key.push(id);
            }
        }
        for (id, k, due) in scheduled {
            t_saga.push(h.saga.0);
            t_key.push(id);
            t_timer.push(serde_json::to_value(k).unwrap_or(Value::Null));
            t_due.push(i64::try_from(due.0).unwrap_or(i64::MAX));
        }
    }
    if new.is_some() && created.is_none() {
        return Err(sqlx::Error::Protocol("a new saga is written with the applied decision that starts it".into()));
    }
    let (new_id, new_state, new_status) = created.map_or((None, None, None), |(id, state, status)| (Some(id), Some(state), Some(status)));
    let (new_def, new_version, new_key, new_trace) = new.as_ref().map_or((None, None, None, None), |n| {
        (Some(n.definition), Some(i32::try_from(n.version).unwrap_or(i32::MAX)), n.idempotency_key, Some(n.traceparent))
    });
    let (g_saga, g_version): (Vec<uuid::Uuid>, Vec<i64>) = guard.map(|g| g.versions.iter().copied().unzip()).unwrap_or_default();
    let (m_message, m_saga): (Vec<uuid::Uuid>, Vec<uuid::Uuid>) = guard.map(|g| g.marks.iter().copied().unzip()).unwrap_or_default();
    // Only the parts this write needs: every part costs PostgreSQL executor work even when it
    // has no rows. (All parameters are bound either way; the statement text picks the prepared
    // statement, and there are few variants.)
    let gate = |saga: &str| match (&new, guard) {
        (Some(_), _) => "(SELECT ok FROM go)".to_owned(),
        (None, Some(_)) => format!("{saga} IN (SELECT id FROM ok)"),
        (None, None) => "true".to_owned(),
    };
    let mut parts: Vec<String> = Vec::new();
    if guard.is_some() {
        parts.push(
            "cas AS (
                SELECT i.id FROM sagaflow.instances i JOIN UNNEST($34::uuid[], $35::int8[]) AS g(id, v) ON i.id = g.id
                WHERE i.xmin::text::int8 = g.v ORDER BY i.id FOR UPDATE OF i
             ), marked AS (
                INSERT INTO sagaflow.inbox (message_id, saga_id)
                SELECT m, s FROM UNNEST($36::uuid[], $37::uuid[]) AS u(m, s) WHERE u.s IN (SELECT id FROM cas)
                ON CONFLICT DO NOTHING RETURNING message_id
             ), ok AS (
                SELECT c.id FROM cas c WHERE NOT EXISTS (
                    SELECT 1 FROM UNNEST($36::uuid[], $37::uuid[]) AS u(m, s)
                    WHERE u.s = c.id AND u.m NOT IN (SELECT message_id FROM marked))
             )"
            .into(),
        );
    }
    if new.is_some() {
        parts.push(
            "ins AS (
                INSERT INTO sagaflow.instances (id, definition, version, status, state, idempotency_key, traceparent, decided_by)
                SELECT $20, $21, $22, $23, $24, $25, $26, $1 WHERE $20::uuid IS NOT NULL
                ON CONFLICT DO NOTHING RETURNING id
             ), go AS (SELECT EXISTS (SELECT 1 FROM ins) AS ok)"
                .into(),
        );
    }
    if !upd_ids.is_empty() {
        parts.push(format!(
            "upd AS (
                UPDATE sagaflow.instances i SET state = u.state, status = u.status, updated_at = now(), decided_by = $1
                FROM UNNEST($2::uuid[], $3::jsonb[], $4::text[]) AS u(id, state, status) WHERE i.id = u.id AND {}
             )",
            gate("u.id")
        ));
    }
    parts.push(format!(
        "h AS (
            INSERT INTO sagaflow.history (saga_id, node, input_kind, input, outcome, detail, status, effects, input_bytes, state_bytes)
            SELECT s, $1, k, i, o, d, st, e, ib, sb
            FROM UNNEST($5::uuid[], $6::text[], $7::jsonb[], $8::text[], $9::text[], $10::text[], $11::jsonb[], $12::int4[], $13::int4[])
                 AS x(s, k, i, o, d, st, e, ib, sb)
            WHERE {}
         )",
        gate("x.s")
    ));
    if !o_saga.is_empty() {
        parts.push(format!(
            "o AS (
                INSERT INTO sagaflow.outbox (saga_id, exchange, routing_key, mandatory, envelope, body)
                SELECT * FROM UNNEST($14::uuid[], $15::text[], $16::text[], $17::bool[], $18::jsonb[], $19::bytea[])
                    AS x(s, ex, k, m, env, b) WHERE {}
                RETURNING id
             )",
            gate("x.s")
        ));
        if wake_relays {
            parts.push("wake AS (SELECT pg_notify('sagaflow_outbox', '') WHERE $33 AND EXISTS (SELECT 1 FROM o))".into());
        }
    }
    if !c_saga.is_empty() {
        parts.push(format!(
            "cancelled AS (
                DELETE FROM sagaflow.timers t USING UNNEST($27::uuid[], $28::text[]) AS c(s, k)
                WHERE t.saga_id = c.s AND t.key = c.k AND {}
             )",
            gate("c.s")
        ));
    }
    if !t_saga.is_empty() {
        parts.push(format!(
            "scheduled AS (
                INSERT INTO sagaflow.timers (saga_id, key, timer, due_ms)
                SELECT * FROM UNNEST($29::uuid[], $30::text[], $31::jsonb[], $32::int8[]) AS x(s, k, t, d) WHERE {}
                ON CONFLICT (saga_id, key) DO UPDATE SET timer = EXCLUDED.timer, due_ms = EXCLUDED.due_ms
             )",
            gate("x.s")
        ));
    }
    let ids = if o_saga.is_empty() { "'{}'::int8[]" } else { "COALESCE((SELECT array_agg(id ORDER BY id) FROM o), '{}')" };
    // `wake` is not a write, so it runs only when the query reads it.
    let from = if o_saga.is_empty() || !wake_relays { "" } else { " FROM (SELECT count(*) FROM wake) AS w" };
    let ok = if new.is_some() { "(SELECT ok FROM go)" } else { "true" };
    let guarded = if guard.is_some() {
        "COALESCE((SELECT array_agg(id) FROM cas), '{}'), COALESCE((SELECT array_agg(id) FROM ok), '{}')"
    } else {
        "'{}'::uuid[], '{}'::uuid[]"
    };
    let sql = format!("WITH {} SELECT {ok}, {ids}, {guarded}{from}", parts.join(", "));
    let (ok, outbox, locked, written): (bool, Vec<i64>, Vec<uuid::Uuid>, Vec<uuid::Uuid>) = sqlx::query_as(AssertSqlSafe(sql))
        .bind(node)
        .bind(&upd_ids)
        .bind(&upd_states)
        .bind(&upd_status)
        .bind(&h_saga)
        .bind(&h_kind)
        .bind(&h_input)
        .bind(&h_outcome)
        .bind(&h_detail)
        .bind(&h_status)
        .bind(&h_effects)
        .bind(&h_input_bytes)
        .bind(&h_state_bytes)
        .bind(&o_saga)
        .bind(&o_exchange)
        .bind(&o_key)
        .bind(&o_mandatory)
        .bind(&o_envelope)
        .bind(&o_body)
        .bind(new_id)
        .bind(new_def)
        .bind(new_version)
        .bind(new_status)
        .bind(new_state)
        .bind(new_key)
        .bind(new_trace)
        .bind(&c_saga)
        .bind(&c_key)
        .bind(&t_saga)
        .bind(&t_key)
        .bind(&t_timer)
        .bind(&t_due)
        .bind(wake_relays)
        .bind(&g_saga)
        .bind(&g_version)
        .bind(&m_message)
        .bind(&m_saga)
        .fetch_one(ex)
        .await?;
    Ok(ok.then(|| Wrote { outbox, locked: locked.into_iter().collect(), written: written.into_iter().collect() }))
}

/// Wake the relays (when this node could not publish what it wrote).
pub(crate) async fn notify_relays(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify('sagaflow_outbox', '')").execute(pool).await.map(drop)
}

/// One history row (the node is the writer's).
pub(crate) struct HistoryRow {
    pub(crate) saga: SagaId,
    pub(crate) input_kind: &'static str,
    pub(crate) input: Value,
    pub(crate) outcome: &'static str,
    pub(crate) detail: Option<String>,
    pub(crate) status: &'static str,
    pub(crate) effects: Value,
    pub(crate) state_bytes: usize,
}

/// A message to publish.
pub(crate) struct OutboxRow {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) mandatory: bool,
    pub(crate) msg: WireMessage,
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
/// and `batch` inbox rows. Running, compensating and stopped sagas are never touched. An old
/// message that arrives again after its inbox entry is gone is still recognised by `decide`
/// as a duplicate or stale input of its saga, or dead-lettered (`unknown_saga`) when the saga
/// is gone too.
pub async fn prune(pool: &PgPool, days: u32, batch: i64) -> Result<Pruned, sqlx::Error> {
    let sagas: i64 = sqlx::query_scalar(
        "WITH gone AS (
             DELETE FROM sagaflow.instances WHERE id IN (
                 SELECT id FROM sagaflow.instances
                  WHERE status IN ('completed', 'compensated') AND updated_at < now() - make_interval(days => $1)
                  ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED)
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
        "SELECT node, input_kind, input, outcome, detail, status, effects FROM sagaflow.history WHERE saga_id = $1 ORDER BY id",
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
}
