//! The participant's own tables (schema `sagaflow_participant`): the inbox that records each
//! step's final outcome, and the outbox that holds replies until the broker confirmed them.

use sagas::protocol::{InboundCommand, ReplyOutcome, WireMessage};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};

const SCHEMA: &str = r"
SELECT pg_advisory_xact_lock(7210504914411);
CREATE SCHEMA IF NOT EXISTS sagaflow_participant;
CREATE TABLE IF NOT EXISTS sagaflow_participant.inbox (
    participant text NOT NULL,
    saga_id uuid NOT NULL,
    step integer NOT NULL,
    kind text NOT NULL,
    command_id uuid NOT NULL,
    outcome jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (participant, saga_id, step, kind)
);
CREATE TABLE IF NOT EXISTS sagaflow_participant.outbox (
    id bigserial PRIMARY KEY,
    participant text NOT NULL,
    routing_key text NOT NULL,
    envelope jsonb NOT NULL,
    body bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outbox_participant_created ON sagaflow_participant.outbox (participant, created_at);
";

/// Create the participant tables if they do not exist (safe to run concurrently).
pub async fn ensure_schema(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
    tx.commit().await
}

/// Serialize the command and the compensation of one step in this participant.
pub(crate) async fn lock_step(tx: &mut PgConnection, participant: &str, cmd: &InboundCommand) -> Result<(), sqlx::Error> {
    let key = format!("{participant}/{}/{}", cmd.saga.saga_id, cmd.step.0);
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))").bind(key).execute(&mut *tx).await.map(drop)
}

/// What this participant already recorded for `cmd`'s step, read after [`lock_step`].
pub(crate) struct Prior {
    /// The final outcome recorded for this command's kind (invoke or compensate), if any.
    pub(crate) outcome: Option<ReplyOutcome>,
    /// The step has a recorded compensation.
    pub(crate) compensated: bool,
}

/// Read [`Prior`] in one round trip. Call it after [`lock_step`], in its own statement: a
/// statement's snapshot is taken when it starts, so reading in the locking statement could miss
/// what the previous lock holder committed.
pub(crate) async fn prior(tx: &mut PgConnection, participant: &str, cmd: &InboundCommand) -> Result<Prior, sqlx::Error> {
    let (outcome, compensated): (Option<Value>, bool) = sqlx::query_as(
        "SELECT (SELECT outcome FROM sagaflow_participant.inbox WHERE participant = $1 AND saga_id = $2 AND step = $3 AND kind = $4),
                EXISTS (SELECT 1 FROM sagaflow_participant.inbox WHERE participant = $1 AND saga_id = $2 AND step = $3 AND kind = 'compensate')",
    )
    .bind(participant)
    .bind(cmd.saga.saga_id.0)
    .bind(step_i32(cmd))
    .bind(cmd.kind.as_str())
    .fetch_one(&mut *tx)
    .await?;
    let outcome = outcome.map(serde_json::from_value).transpose().map_err(|e| sqlx::Error::Decode(e.into()))?;
    Ok(Prior { outcome, compensated })
}

/// Record `outcome` for `cmd`'s step and put `reply` in the outbox, in one statement; returns
/// the outbox row id, or `None` when another delivery recorded an outcome first (nothing is
/// written; the caller rolls back and answers from that record).
pub(crate) async fn record_and_enqueue(
    tx: &mut PgConnection,
    participant: &str,
    cmd: &InboundCommand,
    outcome: &ReplyOutcome,
    routing_key: &str,
    reply: &WireMessage,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH recorded AS (
             INSERT INTO sagaflow_participant.inbox (participant, saga_id, step, kind, command_id, outcome)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1
         )
         INSERT INTO sagaflow_participant.outbox (participant, routing_key, envelope, body)
         SELECT $1, $7, $8, $9 WHERE EXISTS (SELECT 1 FROM recorded) RETURNING id",
    )
    .bind(participant)
    .bind(cmd.saga.saga_id.0)
    .bind(step_i32(cmd))
    .bind(cmd.kind.as_str())
    .bind(cmd.message_id.0)
    .bind(serde_json::to_value(outcome).unwrap_or(Value::Null))
    .bind(routing_key)
    .bind(serde_json::to_value(reply).unwrap_or(Value::Null))
    .bind(&reply.body)
    .fetch_optional(&mut *tx)
    .await
}

/// Put a reply in the outbox; returns its row id.
pub(crate) async fn enqueue(tx: &mut PgConnection, participant: &str, routing_key: &str, msg: &WireMessage) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO sagaflow_participant.outbox (participant, routing_key, envelope, body) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(participant)
    .bind(routing_key)
    .bind(serde_json::to_value(msg).unwrap_or(Value::Null))
    .bind(&msg.body)
    .fetch_one(&mut *tx)
    .await
}

/// A reply left in the outbox.
pub(crate) struct Pending {
    pub(crate) id: i64,
    pub(crate) routing_key: String,
    pub(crate) msg: WireMessage,
}

/// Replies older than `age_ms` (left by a crash between commit and publish), locked for the
/// caller's transaction.
pub(crate) async fn claim_stale(tx: &mut PgConnection, participant: &str, age_ms: i64, limit: i64) -> Result<Vec<Pending>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, routing_key, envelope, body FROM sagaflow_participant.outbox
         WHERE participant = $1 AND created_at < now() - make_interval(secs => $2::float8 / 1000)
         ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED",
    )
    .bind(participant)
    .bind(age_ms)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    rows.into_iter()
        .map(|r| {
            let envelope: Value = r.try_get("envelope")?;
            let mut msg: WireMessage = serde_json::from_value(envelope).map_err(|e| sqlx::Error::Decode(e.into()))?;
            msg.body = r.try_get("body")?;
            Ok(Pending { id: r.try_get("id")?, routing_key: r.try_get("routing_key")?, msg })
        })
        .collect()
}

fn step_i32(cmd: &InboundCommand) -> i32 {
    // Step indexes come from a definition's step count; a header beyond i32 would not name a step.
    i32::try_from(cmd.step.0).unwrap_or(i32::MAX)
}
