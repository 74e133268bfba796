//! The participant's own tables (schema `sagaflow_participant`): the inbox that records each
//! step's final outcome, and the outbox that holds replies until the broker confirmed them.

use sagas::protocol::{InboundCommand, ReplyOutcome, WireMessage};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};

pub use sagaflow_amqp::is_unstorable;

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

/// Begin a transaction that holds, for each of `cmds`, the lock that serializes the command
/// and the compensation of its step in this participant, in one round trip (the locks are taken
/// by the `BEGIN` statement itself). The locks are taken in one order (of their keys), so
/// concurrent batches never deadlock on them. `participant` is a checked name (letters,
/// digits, `_`, `-`, `.`), so the keys are safe literals.
pub(crate) async fn begin_locked(
    pool: &PgPool,
    participant: &str,
    cmds: &[&InboundCommand],
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut keys: Vec<String> = cmds.iter().map(|c| format!("'{participant}/{}/{}'", c.saga.saga_id, c.step.0)).collect();
    keys.sort_unstable();
    let sql =
        format!("BEGIN; SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) FROM unnest(ARRAY[{}]::text[]) AS k", keys.join(","));
    pool.begin_with(sqlx::AssertSqlSafe(sql)).await
}

/// What this participant already recorded for a command's step, read after [`begin_locked`].
pub(crate) struct Prior {
    /// The final outcome recorded for this command's kind (invoke or compensate), if any.
    pub(crate) outcome: Option<ReplyOutcome>,
    /// The step has a recorded compensation.
    pub(crate) compensated: bool,
}

/// Read the [`Prior`] of each of `cmds`, in order, in one round trip. Call it after
/// [`begin_locked`], in its own statement: a statement's snapshot is taken when it starts, so
/// reading in the locking statement could miss what the previous lock holder committed.
pub(crate) async fn priors(tx: &mut PgConnection, participant: &str, cmds: &[&InboundCommand]) -> Result<Vec<Prior>, sqlx::Error> {
    let sagas: Vec<uuid::Uuid> = cmds.iter().map(|c| c.saga.saga_id.0).collect();
    let steps: Vec<i32> = cmds.iter().map(|c| step_i32(c)).collect();
    let kinds: Vec<&str> = cmds.iter().map(|c| c.kind.as_str()).collect();
    let rows: Vec<(Option<Value>, bool)> = sqlx::query_as(
        "SELECT (SELECT outcome FROM sagaflow_participant.inbox x WHERE x.participant = $1 AND x.saga_id = u.s AND x.step = u.st AND x.kind = u.k),
                EXISTS (SELECT 1 FROM sagaflow_participant.inbox x
                        WHERE x.participant = $1 AND x.saga_id = u.s AND x.step = u.st AND x.kind = 'compensate')
         FROM UNNEST($2::uuid[], $3::int4[], $4::text[]) WITH ORDINALITY AS u(s, st, k, n) ORDER BY n",
    )
    .bind(participant)
    .bind(&sagas)
    .bind(&steps)
    .bind(&kinds)
    .fetch_all(&mut *tx)
    .await?;
    rows.into_iter()
        .map(|(outcome, compensated)| {
            let outcome = outcome.map(serde_json::from_value).transpose().map_err(|e| sqlx::Error::Decode(e.into()))?;
            Ok(Prior { outcome, compensated })
        })
        .collect()
}

/// A reply to put in the outbox, and the step outcome to record with it (`None`: an answer
/// from an earlier record, or a transient failure, which is not recorded).
pub(crate) struct ReplyRow<'a> {
    pub(crate) cmd: &'a InboundCommand,
    pub(crate) record: Option<&'a ReplyOutcome>,
    pub(crate) reply: &'a WireMessage,
}

/// Record the outcomes and put the replies of `rows` in the outbox, in one statement; returns
/// the outbox row ids in `rows` order, or `None` when another delivery recorded one of these
/// steps first (nothing is enqueued; the caller rolls back and answers from that record).
pub(crate) async fn write_replies(
    tx: &mut PgConnection,
    participant: &str,
    rows: &[ReplyRow<'_>],
) -> Result<Option<Vec<i64>>, sqlx::Error> {
    let recorded: Vec<&ReplyRow<'_>> = rows.iter().filter(|r| r.record.is_some()).collect();
    let sagas: Vec<uuid::Uuid> = recorded.iter().map(|r| r.cmd.saga.saga_id.0).collect();
    let steps: Vec<i32> = recorded.iter().map(|r| step_i32(r.cmd)).collect();
    let kinds: Vec<&str> = recorded.iter().map(|r| r.cmd.kind.as_str()).collect();
    let commands: Vec<uuid::Uuid> = recorded.iter().map(|r| r.cmd.message_id.0).collect();
    let outcomes: Vec<Value> = recorded.iter().map(|r| serde_json::to_value(r.record).unwrap_or(Value::Null)).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r.cmd.reply_to.as_str()).collect();
    let envelopes: Vec<Value> = rows.iter().map(|r| serde_json::to_value(r.reply).unwrap_or(Value::Null)).collect();
    let bodies: Vec<&[u8]> = rows.iter().map(|r| r.reply.body.as_slice()).collect();
    let (ids, count): (Vec<i64>, i64) = sqlx::query_as(
        "WITH recorded AS (
             INSERT INTO sagaflow_participant.inbox (participant, saga_id, step, kind, command_id, outcome)
             SELECT $1, * FROM UNNEST($2::uuid[], $3::int4[], $4::text[], $5::uuid[], $6::jsonb[])
             ON CONFLICT DO NOTHING RETURNING 1
         ), n AS (SELECT count(*) AS n FROM recorded), enqueued AS (
             INSERT INTO sagaflow_participant.outbox (participant, routing_key, envelope, body)
             SELECT $1, * FROM UNNEST($7::text[], $8::jsonb[], $9::bytea[]) WHERE (SELECT n FROM n) = $10
             RETURNING id
         )
         SELECT COALESCE((SELECT array_agg(id ORDER BY id) FROM enqueued), '{}'), (SELECT n FROM n)",
    )
    .bind(participant)
    .bind(&sagas)
    .bind(&steps)
    .bind(&kinds)
    .bind(&commands)
    .bind(&outcomes)
    .bind(&keys)
    .bind(&envelopes)
    .bind(&bodies)
    .bind(i64::try_from(recorded.len()).unwrap_or(i64::MAX))
    .fetch_one(&mut *tx)
    .await?;
    Ok((usize::try_from(count).ok() == Some(recorded.len())).then_some(ids))
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
    let mut pending = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for r in rows {
        let id: i64 = r.try_get("id")?;
        let envelope: Value = r.try_get("envelope")?;
        match sagaflow_amqp::outbox::message(id, &envelope, r.try_get("body")?) {
            Some(msg) => pending.push(Pending { id, routing_key: r.try_get("routing_key")?, msg }),
            None => unreadable.push(id),
        }
    }
    if !unreadable.is_empty() {
        sqlx::query("DELETE FROM sagaflow_participant.outbox WHERE id = ANY($1)").bind(&unreadable).execute(&mut *tx).await?;
    }
    Ok(pending)
}

fn step_i32(cmd: &InboundCommand) -> i32 {
    // Step indexes come from a definition's step count; a header beyond i32 would not name a step.
    i32::try_from(cmd.step.0).unwrap_or(i32::MAX)
}
