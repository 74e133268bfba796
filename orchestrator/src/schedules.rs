//! Schedules: sagas started by the clock, on a cron expression (UTC) or once at a time.
//!
//! A schedule is a row of `sagaflow.schedules` with its next tick. Every node looks for due
//! schedules every second (`fire_due`): it locks the due rows no other node holds, asks
//! `sagas::schedule::due` which ticks to start a saga for (the missed-tick policy decides for
//! ticks found more than a minute late), starts one saga per tick with the idempotency key
//! `schedule/{name}/{tick}`, and moves the next tick on, in one transaction. A tick therefore
//! starts one saga across all nodes: the row lock keeps two nodes from firing it at once, and
//! the idempotency key makes a node that died between a start and its commit start nothing
//! the second time. The API ([`put`], [`list`], …) and the CLI manage them.

use sagas::protocol::{StartRequest, json_has_nul};
use sagas::schedule::{Missed, When, due, tick_key};
use sagas::{SagaId, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorKind;
use crate::intake::{Engine, StartError};
use crate::ops::OpsError;
use crate::store::schedules as table;
pub use crate::store::schedules::Schedule;

/// How often a node looks for due schedules.
pub(crate) const POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// A schedule to create or replace (the body of `PUT /schedules/{name}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// The definition to start.
    pub definition: String,
    /// Its version (the newest a node serves when absent).
    #[serde(default)]
    pub version: Option<u32>,
    /// The input of every saga it starts.
    #[serde(default)]
    pub input: Value,
    /// A cron expression (5 fields, or 6 with seconds first; UTC). Give this or `at`.
    #[serde(default)]
    pub cron: Option<String>,
    /// A time to fire once (ms since the epoch). Give this or `cron`.
    #[serde(default)]
    pub at: Option<u64>,
    /// What happens to ticks missed while no node could fire them (default `fire_once`).
    #[serde(default)]
    pub missed: Option<Missed>,
    /// The sagas' priority (default 0).
    #[serde(default)]
    pub priority: Option<i32>,
    /// Create it paused.
    #[serde(default)]
    pub paused: bool,
}

fn invalid(m: impl Into<String>) -> OpsError {
    OpsError::new(ErrorKind::InvalidRequest, m)
}

/// Whether `name` can name a schedule: 1–100 characters of `A-Z a-z 0-9 _ - .` (it is part of
/// each saga's idempotency key and of the API's paths).
fn check_name(name: &str) -> Result<(), OpsError> {
    if sagas::definition::valid_name(name) {
        Ok(())
    } else {
        Err(invalid(format!("schedule name {} must be 1-100 characters of a-z, A-Z, 0-9, `_`, `-` or `.`", sagas::protocol::quote(name))))
    }
}

/// Create or replace schedule `name`. Refused: a bad name, an unknown definition, an input the
/// definition refuses, neither or both of `cron` and `at`, a cron expression that does not
/// parse or never matches, a time that has passed.
pub async fn put(engine: &Engine, name: &str, req: ScheduleRequest) -> Result<Schedule, OpsError> {
    check_name(name)?;
    let def = match req.version {
        Some(v) => engine.registry().get(&req.definition, v),
        None => engine.registry().latest(&req.definition),
    }
    .ok_or_else(|| OpsError::from(StartError::UnknownDefinition { definition: req.definition.clone(), version: req.version }))?;
    if json_has_nul(req.input.to_string().as_bytes()) {
        return Err(invalid("the input holds U+0000, which PostgreSQL cannot store"));
    }
    def.search_key_values(&req.input)
        .map_err(|reason| OpsError::from(StartError::InvalidInput { definition: def.name.clone(), reason }))?;
    let when = match (req.cron, req.at) {
        (Some(expr), None) => When::Cron { expr },
        (None, Some(at)) => When::At { at: Timestamp(at) },
        _ => return Err(invalid("give exactly one of `cron` (a cron expression) and `at` (ms since the epoch)")),
    };
    when.check().map_err(invalid)?;
    let now = Timestamp::now();
    let next = when.next_after(now).ok_or_else(|| invalid("`at` has passed"))?;
    let schedule = Schedule {
        name: name.to_owned(),
        definition: req.definition,
        version: req.version,
        input: req.input,
        when,
        missed: req.missed.unwrap_or_default(),
        priority: req.priority.unwrap_or(0),
        paused: req.paused,
        next_at: Some(next.0),
        last_tick: None,
        last_saga: None,
        last_error: None,
    };
    table::put(engine.pool(), &schedule).await?;
    tracing::info!(schedule = name, definition = %schedule.definition, next_at = next.0, "schedule set");
    get(engine, name).await
}

/// Every schedule.
pub async fn list(engine: &Engine) -> Result<Vec<Schedule>, OpsError> {
    Ok(table::list(engine.pool()).await?)
}

/// Schedule `name`.
pub async fn get(engine: &Engine, name: &str) -> Result<Schedule, OpsError> {
    table::get(engine.pool(), name)
        .await?
        .ok_or_else(|| OpsError::new(ErrorKind::NotFound, format!("no schedule named {}", sagas::protocol::quote(name))))
}

/// Delete schedule `name` (the sagas it started are not touched).
pub async fn delete(engine: &Engine, name: &str) -> Result<(), OpsError> {
    if table::delete(engine.pool(), name).await? {
        tracing::info!(schedule = name, "schedule deleted");
        Ok(())
    } else {
        Err(OpsError::new(ErrorKind::NotFound, format!("no schedule named {}", sagas::protocol::quote(name))))
    }
}

/// Pause schedule `name`, or resume it: it then fires from its first tick after now (the ticks
/// while it was paused are not missed ones).
pub async fn set_paused(engine: &Engine, name: &str, paused: bool) -> Result<Schedule, OpsError> {
    let s = get(engine, name).await?;
    let next = s.when.next_after(Timestamp::now());
    table::set_paused(engine.pool(), name, paused, next).await?;
    tracing::info!(schedule = name, paused, "schedule {}", if paused { "paused" } else { "resumed" });
    get(engine, name).await
}

/// Fire the schedules due now that no other node holds; returns the sagas started.
pub(crate) async fn fire_due(engine: &Engine) -> Result<usize, sqlx::Error> {
    let now = Timestamp::now();
    if !table::any_due(engine.pool(), now).await? {
        return Ok(0);
    }
    let mut tx = engine.pool().begin().await?;
    let due_now = table::claim_due(&mut tx, now, 16).await?;
    if due_now.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let mut started = 0;
    for s in due_now {
        let Some(next) = s.next_at else { continue };
        let (ticks, after) = due(&s.when, Timestamp(next), now, s.missed);
        let mut last: Option<(Timestamp, SagaId)> = None;
        let mut error = None;
        let mut keep = false;
        for tick in ticks {
            let req = StartRequest {
                definition: s.definition.clone(),
                version: s.version,
                input: s.input.clone(),
                idempotency_key: Some(tick_key(&s.name, tick)),
                saga_id: None,
                priority: Some(s.priority),
            };
            match engine.start(&req, None).await {
                Ok(st) => {
                    started += usize::from(st.created);
                    last = Some((tick, st.saga_id));
                    tracing::info!(schedule = %s.name, tick = tick.0, saga.id = %st.saga_id, created = st.created, "schedule fired");
                }
                // Worth another try: this tick stays due (a later try starts it once).
                Err(StartError::Database(e)) => return Err(e),
                // Another node may serve it: the tick stays due for one that does.
                Err(e @ StartError::UnknownDefinition { .. }) => {
                    error = Some(e.to_string());
                    keep = true;
                    break;
                }
                // The same every time: the tick is given up, and said so.
                Err(e) => {
                    tracing::error!(schedule = %s.name, tick = tick.0, error = %e, "a schedule's tick cannot start its saga");
                    error = Some(e.to_string());
                }
            }
        }
        if keep {
            if s.last_error.as_deref() != error.as_deref() {
                tracing::warn!(schedule = %s.name, error = error.as_deref().unwrap_or(""), "this node cannot start the schedule's saga; leaving it to a node that can");
            }
            table::fired(&mut tx, &s.name, Some(Timestamp(next)), None, error.as_deref()).await?;
        } else {
            table::fired(&mut tx, &s.name, after, last, error.as_deref()).await?;
        }
    }
    tx.commit().await?;
    Ok(started)
}
