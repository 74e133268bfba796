//! What operators see and do, shared by the HTTP API and the CLI: views of sagas, lists with
//! filters and cursors, waiting for an outcome, delivering events, and the operator actions.

use std::time::Duration;

use sagas::{Input, InputOutcome, OperatorCommand, SagaId, SagaState, SagaStatus, StepAction};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgPool, Row};

use crate::intake::{Engine, Handled};
use crate::store;

pub use crate::error::ErrorKind;

/// Why an operator request failed.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct OpsError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// In words.
    pub message: String,
}

impl OpsError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.kind.as_str()
    }
}

impl From<sqlx::Error> for OpsError {
    fn from(e: sqlx::Error) -> Self {
        // The same request would fail the same way: the caller's to mend, not a retry.
        if store::is_unstorable(&e) {
            return Self::new(ErrorKind::InvalidRequest, format!("PostgreSQL cannot store the request: {e}"));
        }
        Self::new(ErrorKind::Unavailable, format!("database: {e}"))
    }
}

impl From<crate::intake::StartError> for OpsError {
    fn from(e: crate::intake::StartError) -> Self {
        Self::new(e.kind(), e.to_string())
    }
}

/// Latest time a filter may name, in ms since the epoch: its microseconds must fit in 64 bits
/// (year 294247; PostgreSQL's timestamps end in 294276).
const MAX_TIME_MS: u64 = i64::MAX as u64 / 1000;

/// One step as an operator sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepView {
    /// Its name.
    pub name: String,
    /// `command` or `wait`.
    pub kind: String,
    /// The participant it goes to, for a command step.
    pub participant: Option<String>,
    /// Its status (`pending`, `running`, `completed`, `compensated`, …).
    pub status: String,
    /// Command attempts sent.
    pub attempts: u32,
    /// Compensation attempts sent.
    pub compensation_attempts: u32,
    /// When it started (ms since the epoch).
    pub started_at: Option<u64>,
    /// When it finished.
    pub finished_at: Option<u64>,
    /// When it was compensated.
    pub compensated_at: Option<u64>,
    /// Whether its timeout escalated.
    pub escalated: bool,
    /// The last error.
    pub last_error: Option<String>,
    /// Its output.
    pub output: Option<Value>,
    /// What the participant reported of its progress in the last heartbeat (of any attempt).
    pub progress: Option<Value>,
    /// When that heartbeat was applied (ms since the epoch).
    pub heartbeat_at: Option<u64>,
    /// The child sagas the step started (a child step: one per attempt that started one; empty
    /// for other steps).
    #[serde(default)]
    pub children: Vec<ChildView>,
}

/// A child saga a step started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChildView {
    /// The child saga.
    pub saga_id: SagaId,
    /// The attempt of the step that started it.
    pub attempt: u32,
    /// Its status.
    pub status: String,
}

/// The parent saga's step that started a child saga.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ParentView {
    /// The parent saga.
    pub saga_id: SagaId,
    /// Its definition.
    pub definition: String,
    /// Its step that started this saga.
    pub step: String,
    /// The attempt of that step.
    pub attempt: u32,
}

/// One saga as an operator sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SagaView {
    /// Its id.
    pub id: SagaId,
    /// Definition name.
    pub definition: String,
    /// Definition version it is pinned to.
    pub version: u32,
    /// Status.
    pub status: String,
    /// The step (or group) it is at, by name.
    pub current: Option<String>,
    /// Its data: the input and the steps' outputs.
    pub data: Value,
    /// Why it failed, if it did.
    pub failure: Option<Value>,
    /// Why it stopped, if it did (code, step, message).
    pub stop: Option<Value>,
    /// Compensations still to run, in order.
    pub pending_compensations: Vec<String>,
    /// Every step.
    pub steps: Vec<StepView>,
    /// Created (ms since the epoch).
    pub created_at: u64,
    /// Last decision (ms since the epoch).
    pub updated_at: u64,
    /// Node that made the last decision.
    pub decided_by: String,
    /// Size of the saga's state, in bytes.
    pub state_bytes: usize,
    /// Inputs in its history.
    pub history_len: i64,
    /// When it is a child saga: the parent saga's step that started it.
    #[serde(default)]
    pub parent: Option<ParentView>,
}

/// A line of a list.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SagaSummary {
    /// Its id.
    pub id: SagaId,
    /// Definition name.
    pub definition: String,
    /// Version.
    pub version: u32,
    /// Status.
    pub status: String,
    /// Created (ms since the epoch).
    pub created_at: u64,
    /// Last decision (ms since the epoch).
    pub updated_at: u64,
}

/// Filters for [`list`]; every field is optional.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListFilter {
    /// Only this status.
    pub status: Option<String>,
    /// Only this definition.
    pub definition: Option<String>,
    /// Created at or after (ms since the epoch).
    pub since: Option<u64>,
    /// Created before (ms since the epoch).
    pub until: Option<u64>,
    /// Only sagas whose search key `key` (declared by their definition) has `value`; the two go
    /// together.
    pub key: Option<String>,
    /// See `key`.
    pub value: Option<String>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size (1..=500, default 50).
    pub limit: Option<u32>,
}

/// A page of a list, newest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Page {
    /// The sagas.
    pub items: Vec<SagaSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

const STATUSES: [&str; 6] = ["created", "running", "compensating", "completed", "compensated", "stopped"];

/// PostgreSQL gives times here as microseconds since the epoch; views use milliseconds.
fn us_to_ms(us: i64) -> u64 {
    u64::try_from(us / 1000).unwrap_or(0)
}

/// One definition version: whether this node serves it and how many sagas run on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionUse {
    /// Definition name.
    pub definition: String,
    /// Definition version.
    pub version: u32,
    /// The registry of this node has it.
    pub served: bool,
    /// Its sagas that may still need it: every status but `completed` and `compensated`
    /// (a `stopped` saga can be resumed or retried).
    pub open: i64,
    /// All its sagas in the database.
    pub total: i64,
}

impl VersionUse {
    /// No open saga needs it and a newer version of the same definition is served: a release
    /// may leave it out of its registry.
    pub fn retirable(&self, all: &[VersionUse]) -> bool {
        self.open == 0 && all.iter().any(|v| v.definition == self.definition && v.version > self.version && v.served)
    }
}

/// Every definition version the registry serves or the database holds sagas of, by name and
/// version: what an upgrade needs to know before it drops a version (docs/versioning.md).
pub async fn versions(pool: &PgPool, registry: &sagas::Registry) -> Result<Vec<VersionUse>, OpsError> {
    let rows: Vec<(String, i32, i64, i64)> = sqlx::query_as(
        "SELECT definition, version, count(*) FILTER (WHERE status <> ALL($1)), count(*)
           FROM sagaflow.instances GROUP BY definition, version",
    )
    .bind(SagaStatus::names_where(SagaStatus::is_terminal))
    .fetch_all(pool)
    .await?;
    let mut out: std::collections::BTreeMap<(String, u32), VersionUse> = registry
        .iter()
        .map(|d| {
            let v = VersionUse { definition: d.name.clone(), version: d.version, served: true, open: 0, total: 0 };
            ((d.name.clone(), d.version), v)
        })
        .collect();
    for (definition, version, open, total) in rows {
        let version = u32::try_from(version).unwrap_or(0);
        let v = out.entry((definition.clone(), version)).or_insert(VersionUse { definition, version, served: false, open: 0, total: 0 });
        v.open = open;
        v.total = total;
    }
    Ok(out.into_values().collect())
}

/// Sagas matching `f`, newest first.
pub async fn list(pool: &PgPool, f: &ListFilter) -> Result<Page, OpsError> {
    check_filter(f.status.as_deref(), f.definition.as_deref(), f.since, f.until)?;
    match (&f.key, &f.value) {
        (Some(k), Some(v)) => {
            sagas::protocol::check_name("key", k).map_err(|e| OpsError::new(ErrorKind::InvalidRequest, e))?;
            sagas::check_search_value(k, v).map_err(|e| OpsError::new(ErrorKind::InvalidRequest, e))?;
        }
        (None, None) => {}
        _ => return Err(OpsError::new(ErrorKind::InvalidRequest, "key and value go together")),
    }
    let limit = i64::from(f.limit.unwrap_or(50));
    if !(1..=500).contains(&limit) {
        return Err(OpsError::new(ErrorKind::InvalidRequest, "limit must be between 1 and 500"));
    }
    let cursor = match &f.cursor {
        Some(c) => {
            let (at, id) = c.split_once('_').ok_or_else(|| OpsError::new(ErrorKind::InvalidRequest, "malformed cursor"))?;
            let at: i64 = at.parse().map_err(|_| OpsError::new(ErrorKind::InvalidRequest, "malformed cursor"))?;
            let id: uuid::Uuid = id.parse().map_err(|_| OpsError::new(ErrorKind::InvalidRequest, "malformed cursor"))?;
            Some((at, id))
        }
        None => None,
    };
    let rows = sqlx::query(
        "SELECT id, definition, version, status,
                (extract(epoch FROM created_at) * 1000000)::bigint AS created_us,
                (extract(epoch FROM updated_at) * 1000000)::bigint AS updated_us
         FROM sagaflow.instances
         WHERE ($1::text IS NULL OR status = $1)
           AND ($2::text IS NULL OR definition = $2)
           AND ($3::bigint IS NULL OR created_at >= to_timestamp($3::float8 / 1000000))
           AND ($4::bigint IS NULL OR created_at < to_timestamp($4::float8 / 1000000))
           AND ($5::bigint IS NULL OR ((extract(epoch FROM created_at) * 1000000)::bigint, id) < ($5, $6))
           AND ($8::text IS NULL OR id IN (SELECT saga_id FROM sagaflow.search_keys WHERE key = $8 AND value = $9))
         ORDER BY created_at DESC, id DESC
         LIMIT $7",
    )
    .bind(&f.status)
    .bind(&f.definition)
    .bind(to_us(f.since))
    .bind(to_us(f.until))
    .bind(cursor.map(|c| c.0))
    .bind(cursor.map(|c| c.1))
    .bind(limit + 1)
    .bind(&f.key)
    .bind(&f.value)
    .fetch_all(pool)
    .await?;
    let mut items = Vec::with_capacity(rows.len());
    let mut last = None;
    for r in rows.iter().take(usize::try_from(limit).unwrap_or(50)) {
        let created: i64 = r.try_get("created_us")?;
        let item = summary(r)?;
        last = Some(format!("{created}_{}", item.id));
        items.push(item);
    }
    let more = rows.len() > items.len();
    Ok(Page { items, next_cursor: if more { last } else { None } })
}

/// The fields both [`ListFilter`] and [`BulkFilter`] have, checked.
fn check_filter(status: Option<&str>, definition: Option<&str>, since: Option<u64>, until: Option<u64>) -> Result<(), OpsError> {
    let bad = |m: String| OpsError::new(ErrorKind::InvalidRequest, m);
    if let Some(s) = status
        && !STATUSES.contains(&s)
    {
        return Err(bad(format!("status `{s}` is not one of {}", STATUSES.join(", "))));
    }
    if let Some(d) = definition {
        sagas::protocol::check_name("definition", d).map_err(bad)?;
    }
    if since.into_iter().chain(until).any(|t| t > MAX_TIME_MS) {
        return Err(bad(format!("since and until must be at most {MAX_TIME_MS} (ms since the epoch)")));
    }
    Ok(())
}

/// A time in ms since the epoch as the µs the queries compare with.
fn to_us(ms: Option<u64>) -> Option<i64> {
    ms.map(|m| i64::try_from(m).unwrap_or(i64::MAX).saturating_mul(1000))
}

/// A list line from a row with `id`, `definition`, `version`, `status`, `created_us`, `updated_us`.
fn summary(r: &sqlx::postgres::PgRow) -> Result<SagaSummary, sqlx::Error> {
    Ok(SagaSummary {
        id: SagaId(r.try_get("id")?),
        definition: r.try_get("definition")?,
        version: u32::try_from(r.try_get::<i32, _>("version")?).unwrap_or(0),
        status: r.try_get("status")?,
        created_at: us_to_ms(r.try_get("created_us")?),
        updated_at: us_to_ms(r.try_get("updated_us")?),
    })
}

/// One saga, with its steps.
pub async fn get(engine: &Engine, id: SagaId) -> Result<SagaView, OpsError> {
    let row = sqlx::query("SELECT state, decided_by, (SELECT count(*) FROM sagaflow.history h WHERE h.saga_id = i.id) AS n FROM sagaflow.instances i WHERE id = $1")
        .bind(id.0)
        .fetch_optional(engine.pool())
        .await?
        .ok_or_else(|| OpsError::new(ErrorKind::NotFound, format!("no saga {id}")))?;
    let state_json: Value = row.try_get("state")?;
    let state_bytes = state_json.to_string().len();
    let st: SagaState =
        serde_json::from_value(state_json).map_err(|e| OpsError::new(ErrorKind::Unavailable, format!("saga {id} does not decode: {e}")))?;
    let mut v = view(engine, &st, row.try_get("decided_by")?, state_bytes, row.try_get("n")?);
    link_children(engine, &st, &mut v).await?;
    Ok(v)
}

/// Fill in the child sagas each child step of `st` started (their ids are derived from the
/// step and attempt: one read of those that exist).
async fn link_children(engine: &Engine, st: &SagaState, v: &mut SagaView) -> Result<(), sqlx::Error> {
    let Some(def) = engine.registry().get(&st.definition, st.version) else { return Ok(()) };
    let mut candidates = Vec::new();
    for (s, step) in def.steps.iter().zip(&st.steps) {
        if matches!(&s.action, StepAction::Command(c) if c.child().is_some()) {
            candidates.extend((1..=step.attempts).map(|a| (s.index, a, SagaId::for_child(st.id, s.index, a))));
        }
    }
    if candidates.is_empty() {
        return Ok(());
    }
    let ids: Vec<uuid::Uuid> = candidates.iter().map(|c| c.2.0).collect();
    let found: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM sagaflow.instances WHERE id = ANY($1)").bind(&ids).fetch_all(engine.pool()).await?;
    for (step, attempt, id) in candidates {
        if let Some((_, status)) = found.iter().find(|(f, _)| *f == id.0) {
            v.steps[step.get()].children.push(ChildView { saga_id: id, attempt, status: status.clone() });
        }
    }
    Ok(())
}

fn view(engine: &Engine, st: &SagaState, decided_by: String, state_bytes: usize, history_len: i64) -> SagaView {
    let def = engine.registry().get(&st.definition, st.version);
    let step_name = |i: usize| def.and_then(|d| d.steps.get(i)).map_or_else(|| format!("#{i}"), |s| s.name.clone());
    let current = def.and_then(|d| d.nodes.get(st.node)).map(|n| match n {
        sagas::definition::Node::Step { step } => step_name(step.get()),
        sagas::definition::Node::Parallel { name, .. } => name.clone(),
    });
    let steps = st
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let action = def.and_then(|d| d.steps.get(i)).map(|d| &d.action);
            StepView {
                name: step_name(i),
                kind: if matches!(action, Some(StepAction::Wait(_))) { "wait".into() } else { "command".into() },
                participant: match action {
                    Some(StepAction::Command(c)) => Some(c.participant.clone()),
                    _ => None,
                },
                status: serde_json::to_value(s.status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
                attempts: s.attempts,
                compensation_attempts: s.compensation_attempts,
                started_at: s.started_at.map(|t| t.0),
                finished_at: s.finished_at.map(|t| t.0),
                compensated_at: s.compensated_at.map(|t| t.0),
                escalated: s.escalated,
                last_error: s.last_error.clone(),
                output: s.output.clone(),
                progress: s.progress.clone(),
                heartbeat_at: s.heartbeat_at.map(|t| t.0),
                children: Vec::new(),
            }
        })
        .collect();
    SagaView {
        id: st.id,
        definition: st.definition.clone(),
        version: st.version,
        status: st.status.as_str().into(),
        current: if st.status.is_terminal() { None } else { current },
        data: st.data.clone(),
        failure: st.failure.as_ref().and_then(|f| serde_json::to_value(f).ok()),
        stop: st.stop.as_ref().and_then(|s| serde_json::to_value(s).ok()),
        pending_compensations: st.compensation.as_ref().map(|c| c.iter().map(|i| step_name(i.get())).collect()).unwrap_or_default(),
        steps,
        created_at: st.created_at.0,
        updated_at: st.updated_at.0,
        decided_by,
        state_bytes,
        history_len,
        parent: st.parent.as_ref().map(|p| ParentView {
            saga_id: p.saga_id,
            definition: p.definition.clone(),
            step: p.step_name.clone(),
            attempt: p.attempt,
        }),
    }
}

/// Wait up to `timeout` for saga `id` to settle (completed, compensated or stopped); returns
/// its view either way, and whether it settled.
///
/// The wait costs no database work while it sleeps: it reads the saga, then again only when the
/// node says the saga may have settled (see `waiters`). At most `max_waiters` wait at once on a
/// node; beyond that the wait is refused as [`ErrorKind::Busy`].
pub async fn wait(engine: &Engine, id: SagaId, timeout: Duration) -> Result<(SagaView, bool), OpsError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut waiter = engine.waiters.enter(id).ok_or_else(|| {
        let n = engine.waiters.waiting();
        OpsError::new(ErrorKind::Busy, format!("{n} clients already wait on this node (max_waiters); try again shortly"))
    })?;
    loop {
        // Read the state alone; build the full view (history count, step names) once.
        let st = store::load(engine.pool(), id).await?.ok_or_else(|| OpsError::new(ErrorKind::NotFound, format!("no saga {id}")))?;
        let settled = st.status.is_settled();
        if settled || tokio::time::Instant::now() >= deadline {
            return Ok((get(engine, id).await?, settled));
        }
        // Until it may have settled, or the deadline.
        let _ = tokio::time::timeout_at(deadline, waiter.woken()).await;
    }
}

/// Apply an operator command or an event; refused inputs come back as `conflict`.
pub async fn act(engine: &Engine, id: SagaId, input: Input) -> Result<SagaView, OpsError> {
    match engine.apply(id, &input, None).await? {
        Handled::Decided { outcome: InputOutcome::Applied, .. } => get(engine, id).await,
        Handled::Decided { outcome: InputOutcome::Refused { reason }, .. } => Err(OpsError::new(ErrorKind::Conflict, reason)),
        Handled::Decided { outcome: InputOutcome::Ignored { detail, .. }, .. } => Err(OpsError::new(ErrorKind::Conflict, detail)),
        Handled::UnknownSaga => Err(OpsError::new(ErrorKind::NotFound, format!("no saga {id}"))),
        Handled::UnknownVersion { definition, version } => {
            Err(OpsError::new(ErrorKind::Unavailable, format!("this node does not know `{definition}` version {version}")))
        }
        Handled::Duplicate | Handled::Skipped => get(engine, id).await,
        Handled::Invalid { code, detail } => Err(OpsError::new(ErrorKind::InvalidRequest, format!("{code}: {detail}"))),
    }
}

/// The reason an abort records when the operator gives none.
pub const ABORTED_BY_AN_OPERATOR: &str = "aborted by an operator";

/// The operator command named `action` (`abort`, `retry`, `skip`, `resume`), as the API's path
/// names it.
pub fn operator_command(action: &str, reason: Option<String>) -> Result<OperatorCommand, OpsError> {
    Ok(match action {
        "abort" => OperatorCommand::Abort { reason: reason.unwrap_or_else(|| ABORTED_BY_AN_OPERATOR.into()) },
        "retry" => OperatorCommand::RetryCompensation,
        "skip" => OperatorCommand::SkipCompensation,
        "resume" => OperatorCommand::Resume,
        other => return Err(OpsError::new(ErrorKind::InvalidRequest, format!("unknown action `{other}` (abort, retry, skip, resume)"))),
    })
}

/// One saga's history.
pub async fn history(pool: &PgPool, id: SagaId) -> Result<Vec<store::HistoryEntry>, OpsError> {
    let h = store::history(pool, id).await?;
    if h.is_empty() && store::load(pool, id).await?.is_none() {
        return Err(OpsError::new(ErrorKind::NotFound, format!("no saga {id}")));
    }
    Ok(h)
}

/// How many sagas of one definition version are in one status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Count {
    /// Definition name.
    pub definition: String,
    /// Version.
    pub version: u32,
    /// Status.
    pub status: String,
    /// How many.
    pub count: i64,
}

/// How many stopped sagas of one definition stopped for one reason.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoppedCount {
    /// The stop code (`compensation_failed`, ...).
    pub code: String,
    /// Definition name.
    pub definition: String,
    /// How many.
    pub count: i64,
}

/// Sagas that settled in one minute of the last hour.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Minute {
    /// The minute's start (ms since the epoch).
    pub at: u64,
    /// Completed in it.
    pub completed: i64,
    /// Compensated in it.
    pub compensated: i64,
}

/// What the console's overview shows: what is open and what is stuck, the oldest running sagas,
/// and what settled in the last hour. Each part reads an index (open sagas by status, settled
/// ones by when they finished), so its cost grows with what is open and recent, not with every
/// saga ever kept.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Overview {
    /// When this was read (ms since the epoch).
    pub at: u64,
    /// Sagas not yet completed or compensated, by definition version and status.
    pub open: Vec<Count>,
    /// Stopped sagas by stop code and definition, most first: what needs an operator.
    pub stopped: Vec<StoppedCount>,
    /// The oldest running or compensating sagas (up to 10), oldest first.
    pub oldest_running: Vec<SagaSummary>,
    /// Sagas that completed or compensated in the last hour, by definition version and status.
    pub last_hour: Vec<Count>,
    /// The same per minute, oldest first (minutes with none are left out).
    pub per_minute: Vec<Minute>,
    /// Compensated out of settled in the last hour (0 when none settled).
    pub failure_rate: f64,
}

/// The overview (see [`Overview`]).
pub async fn overview(pool: &PgPool) -> Result<Overview, OpsError> {
    let open_statuses = SagaStatus::names_where(|s| !s.is_terminal());
    let count = |r: &sqlx::postgres::PgRow| -> Result<Count, sqlx::Error> {
        Ok(Count {
            definition: r.try_get("definition")?,
            version: u32::try_from(r.try_get::<i32, _>("version")?).unwrap_or(0),
            status: r.try_get("status")?,
            count: r.try_get("n")?,
        })
    };
    let mut tx = pool.begin().await?;
    // One snapshot for every part, so the parts agree with each other.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let at: i64 = sqlx::query_scalar("SELECT (extract(epoch FROM now()) * 1000)::bigint").fetch_one(&mut *tx).await?;
    let open = sqlx::query(
        "SELECT definition, version, status, count(*) AS n FROM sagaflow.instances WHERE status = ANY($1)
         GROUP BY definition, version, status ORDER BY definition, version, status",
    )
    .bind(&open_statuses)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(count)
    .collect::<Result<Vec<_>, _>>()?;
    let stopped = sqlx::query(
        "SELECT coalesce(state->'stop'->>'code', 'unknown') AS code, definition, count(*) AS n FROM sagaflow.instances
         WHERE status = 'stopped' GROUP BY 1, 2 ORDER BY n DESC, code, definition",
    )
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| Ok(StoppedCount { code: r.try_get("code")?, definition: r.try_get("definition")?, count: r.try_get("n")? }))
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let oldest_running = sqlx::query(
        "SELECT id, definition, version, status,
                (extract(epoch FROM created_at) * 1000000)::bigint AS created_us,
                (extract(epoch FROM updated_at) * 1000000)::bigint AS updated_us
         FROM sagaflow.instances WHERE status IN ('running', 'compensating') ORDER BY created_at, id LIMIT 10",
    )
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(summary)
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let last_hour = sqlx::query(
        "SELECT definition, version, status, count(*) AS n FROM sagaflow.instances
         WHERE finished_at IS NOT NULL AND finished_at > now() - interval '1 hour'
         GROUP BY definition, version, status ORDER BY definition, version, status",
    )
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(count)
    .collect::<Result<Vec<_>, _>>()?;
    let per_minute = sqlx::query(
        "SELECT (extract(epoch FROM date_trunc('minute', finished_at)) * 1000)::bigint AS at,
                count(*) FILTER (WHERE status = 'completed') AS completed, count(*) FILTER (WHERE status = 'compensated') AS compensated
         FROM sagaflow.instances WHERE finished_at IS NOT NULL AND finished_at > now() - interval '1 hour'
         GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| {
        Ok(Minute {
            at: u64::try_from(r.try_get::<i64, _>("at")?).unwrap_or(0),
            completed: r.try_get("completed")?,
            compensated: r.try_get("compensated")?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    tx.commit().await?;
    let settled: i64 = last_hour.iter().map(|c| c.count).sum();
    let compensated: i64 = last_hour.iter().filter(|c| c.status == "compensated").map(|c| c.count).sum();
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    let failure_rate = if settled == 0 { 0.0 } else { compensated as f64 / settled as f64 };
    Ok(Overview { at: u64::try_from(at).unwrap_or(0), open, stopped, oldest_running, last_hour, per_minute, failure_rate })
}

/// Most sagas one bulk action touches; a filter matching more is refused (narrow it, or act in
/// turns: what was acted on no longer matches a `stopped` filter).
pub const BULK_MAX: i64 = 1000;

/// Which sagas a bulk action acts on; every field is optional, and they all must match.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkFilter {
    /// Only this status.
    pub status: Option<String>,
    /// Only this definition.
    pub definition: Option<String>,
    /// Only sagas stopped with this stop code (`compensation_failed`, ...).
    pub stop_code: Option<String>,
    /// Created at or after (ms since the epoch).
    pub since: Option<u64>,
    /// Created before (ms since the epoch).
    pub until: Option<u64>,
}

/// What a bulk action did, or (a preview) would do.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BulkOutcome {
    /// How many sagas the filter matches.
    pub matched: usize,
    /// The sagas it matches (a preview) or acted on, oldest first.
    pub ids: Vec<SagaId>,
    /// Those the action applied to (0 for a preview).
    pub applied: usize,
    /// Those that refused it, with why (a saga that moved on since the preview, say).
    pub refused: Vec<BulkRefusal>,
}

/// A saga a bulk action did not apply to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BulkRefusal {
    /// The saga.
    pub id: SagaId,
    /// The error's code (`conflict`, ...).
    pub code: String,
    /// Why, in words.
    pub message: String,
}

/// The sagas `f` matches, oldest first (at most [`BULK_MAX`]).
async fn bulk_matches(pool: &PgPool, f: &BulkFilter) -> Result<Vec<SagaId>, OpsError> {
    let bad = |m: String| OpsError::new(ErrorKind::InvalidRequest, m);
    check_filter(f.status.as_deref(), f.definition.as_deref(), f.since, f.until)?;
    let stop_codes = sagas::StopCode::ALL.map(sagas::StopCode::as_str);
    if let Some(c) = &f.stop_code
        && !stop_codes.contains(&c.as_str())
    {
        return Err(bad(format!("stop_code `{c}` is not one of {}", stop_codes.join(", "))));
    }
    if f.status.is_none() && f.definition.is_none() && f.stop_code.is_none() && f.since.is_none() && f.until.is_none() {
        return Err(bad("a bulk action needs a filter (status, definition, stop_code, since or until)".into()));
    }
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM sagaflow.instances
         WHERE ($1::text IS NULL OR status = $1)
           AND ($2::text IS NULL OR definition = $2)
           AND ($3::text IS NULL OR (status = 'stopped' AND state->'stop'->>'code' = $3))
           AND ($4::bigint IS NULL OR created_at >= to_timestamp($4::float8 / 1000000))
           AND ($5::bigint IS NULL OR created_at < to_timestamp($5::float8 / 1000000))
         ORDER BY created_at, id LIMIT $6",
    )
    .bind(&f.status)
    .bind(&f.definition)
    .bind(&f.stop_code)
    .bind(to_us(f.since))
    .bind(to_us(f.until))
    .bind(BULK_MAX + 1)
    .fetch_all(pool)
    .await?;
    if i64::try_from(ids.len()).unwrap_or(i64::MAX) > BULK_MAX {
        return Err(bad(format!("the filter matches more than {BULK_MAX} sagas; narrow it, or act in turns")));
    }
    Ok(ids.into_iter().map(SagaId).collect())
}

/// Preview `action` on the sagas `f` matches: how many and which, nothing changed.
pub async fn bulk_preview(pool: &PgPool, action: &str, f: &BulkFilter) -> Result<BulkOutcome, OpsError> {
    operator_command(action, None)?;
    let ids = bulk_matches(pool, f).await?;
    Ok(BulkOutcome { matched: ids.len(), ids, applied: 0, refused: Vec::new() })
}

/// Apply `action` to every saga `f` matches, one after the other, each as its own operator
/// input (recorded in its history like a single action). `expect` is the count the preview
/// showed: when the filter now matches another number, nothing is done (`conflict`), so what
/// is confirmed is what is acted on.
pub async fn bulk_apply(
    engine: &Engine,
    action: &str,
    reason: Option<String>,
    f: &BulkFilter,
    expect: usize,
) -> Result<BulkOutcome, OpsError> {
    let cmd = operator_command(action, reason)?;
    let ids = bulk_matches(engine.pool(), f).await?;
    if ids.len() != expect {
        return Err(OpsError::new(
            ErrorKind::Conflict,
            format!("the filter now matches {} sagas, not the {expect} confirmed; preview again", ids.len()),
        ));
    }
    let mut out = BulkOutcome { matched: ids.len(), ids: ids.clone(), applied: 0, refused: Vec::new() };
    for id in ids {
        match act(engine, id, Input::Operator(cmd.clone())).await {
            Ok(_) => out.applied += 1,
            Err(e) if matches!(e.kind, ErrorKind::Conflict | ErrorKind::NotFound) => {
                out.refused.push(BulkRefusal { id, code: e.code().into(), message: e.message });
            }
            Err(e) => {
                // The database or the node is in trouble: stop here; what was applied is in
                // each saga's history, the rest is untouched and matches the filter still.
                tracing::warn!(action, saga.id = %id, error = %e, "a bulk operator action stopped");
                out.refused.push(BulkRefusal { id, code: e.code().into(), message: format!("{}; the action stopped here", e.message) });
                break;
            }
        }
    }
    tracing::info!(action, matched = out.matched, applied = out.applied, refused = out.refused.len(), "bulk operator action");
    Ok(out)
}
