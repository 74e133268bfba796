//! Schedules (`sagaflow.schedules`): what the API and the CLI manage, and the due ones a node
//! claims (see `crate::schedules` for how they fire).

use sagas::schedule::{Missed, When};
use sagas::{SagaId, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

/// One schedule, as stored and shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Its name.
    pub name: String,
    /// The definition it starts.
    pub definition: String,
    /// The definition's version (the newest a node serves when `None`).
    pub version: Option<u32>,
    /// The saga's input.
    pub input: Value,
    /// When it fires.
    pub when: When,
    /// What happens to ticks missed while no node could fire them.
    pub missed: Missed,
    /// The sagas' priority.
    pub priority: i32,
    /// Whether it is paused (fires nothing).
    pub paused: bool,
    /// Its next tick (ms since the epoch); `None` once a one-off fired or a cron has no more.
    pub next_at: Option<u64>,
    /// The last tick it started a saga for, and that saga.
    pub last_tick: Option<u64>,
    /// The saga started for the last tick.
    pub last_saga: Option<SagaId>,
    /// Why the last tick could not start a saga, if it could not.
    pub last_error: Option<String>,
}

type Row = (
    String,
    String,
    Option<i32>,
    Value,
    Option<String>,
    Option<i64>,
    String,
    i32,
    bool,
    Option<i64>,
    Option<i64>,
    Option<uuid::Uuid>,
    Option<String>,
);

const COLUMNS: &str =
    "name, definition, version, input, cron, at_ms, missed, priority, paused, next_ms, last_tick_ms, last_saga, last_error";

fn from_row(r: Row) -> Schedule {
    let (name, definition, version, input, cron, at_ms, missed, priority, paused, next_ms, last_tick, last_saga, last_error) = r;
    let ms = |v: i64| u64::try_from(v).unwrap_or(0);
    let when = match (cron, at_ms) {
        (Some(expr), _) => When::Cron { expr },
        (None, at) => When::At { at: Timestamp(at.map_or(0, ms)) },
    };
    Schedule {
        name,
        definition,
        version: version.and_then(|v| u32::try_from(v).ok()),
        input,
        when,
        missed: Missed::parse(&missed).unwrap_or_default(),
        priority,
        paused,
        next_at: next_ms.map(ms),
        last_tick: last_tick.map(ms),
        last_saga: last_saga.map(SagaId),
        last_error,
    }
}

fn ms(t: Timestamp) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

/// Create or replace schedule `s` (its `next_at`, `paused` and the definition's fields as
/// given; the last tick and error are kept on a replace).
pub(crate) async fn put(pool: &PgPool, s: &Schedule) -> Result<(), sqlx::Error> {
    let (cron, at) = match &s.when {
        When::Cron { expr } => (Some(expr.as_str()), None),
        When::At { at } => (None, Some(ms(*at))),
    };
    sqlx::query(
        "INSERT INTO sagaflow.schedules (name, definition, version, input, cron, at_ms, missed, priority, paused, next_ms)
         VALUES ($1, $2, $3, $4::text::json, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (name) DO UPDATE SET definition = EXCLUDED.definition, version = EXCLUDED.version, input = EXCLUDED.input,
             cron = EXCLUDED.cron, at_ms = EXCLUDED.at_ms, missed = EXCLUDED.missed, priority = EXCLUDED.priority,
             paused = EXCLUDED.paused, next_ms = EXCLUDED.next_ms, last_error = NULL, updated_at = now()",
    )
    .bind(&s.name)
    .bind(&s.definition)
    .bind(s.version.map(|v| i32::try_from(v).unwrap_or(i32::MAX)))
    .bind(s.input.to_string())
    .bind(cron)
    .bind(at)
    .bind(s.missed.as_str())
    .bind(s.priority)
    .bind(s.paused)
    .bind(s.next_at.map(|t| ms(Timestamp(t))))
    .execute(pool)
    .await
    .map(drop)
}

/// Every schedule, by name.
pub(crate) async fn list(pool: &PgPool) -> Result<Vec<Schedule>, sqlx::Error> {
    let rows: Vec<Row> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM sagaflow.schedules ORDER BY name"))).fetch_all(pool).await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// Schedule `name`.
pub(crate) async fn get(pool: &PgPool, name: &str) -> Result<Option<Schedule>, sqlx::Error> {
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM sagaflow.schedules WHERE name = $1")))
        .bind(name)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(from_row))
}

/// Delete schedule `name`; whether it existed.
pub(crate) async fn delete(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM sagaflow.schedules WHERE name = $1").bind(name).execute(pool).await?.rows_affected() == 1)
}

/// Pause schedule `name`, or resume it with its next tick at `next`; whether it exists.
pub(crate) async fn set_paused(pool: &PgPool, name: &str, paused: bool, next: Option<Timestamp>) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE sagaflow.schedules SET paused = $2, next_ms = CASE WHEN $2 THEN next_ms ELSE $3 END, updated_at = now() WHERE name = $1",
    )
    .bind(name)
    .bind(paused)
    .bind(next.map(ms))
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Whether a schedule is due at `now` (one indexed read, no transaction: what each node asks
/// every second before it claims any).
pub(crate) async fn any_due(pool: &PgPool, now: Timestamp) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sagaflow.schedules WHERE NOT paused AND next_ms <= $1)")
        .bind(ms(now))
        .fetch_one(pool)
        .await
}

/// Lock up to `limit` schedules due at `now` that no other node holds.
pub(crate) async fn claim_due(tx: &mut PgConnection, now: Timestamp, limit: i64) -> Result<Vec<Schedule>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM sagaflow.schedules WHERE NOT paused AND next_ms <= $1 ORDER BY next_ms LIMIT $2 FOR UPDATE SKIP LOCKED"
    )))
    .bind(ms(now))
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// After firing a claimed schedule: its next tick, its last tick and saga, and the error, if any.
pub(crate) async fn fired(
    tx: &mut PgConnection,
    name: &str,
    next: Option<Timestamp>,
    last: Option<(Timestamp, SagaId)>,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sagaflow.schedules SET next_ms = $2, last_tick_ms = COALESCE($3, last_tick_ms), last_saga = COALESCE($4, last_saga),
             last_error = $5, updated_at = now() WHERE name = $1",
    )
    .bind(name)
    .bind(next.map(ms))
    .bind(last.map(|(t, _)| ms(t)))
    .bind(last.map(|(_, s)| s.0))
    .bind(error)
    .execute(&mut *tx)
    .await
    .map(drop)
}
