//! A participant for testing saga shapes: each step's behaviour (succeed, reject, fail
//! transiently N times, answer slowly) comes from the saga's data, and every effect and undo
//! is recorded in `probe.effects` in the order it committed.

use std::collections::BTreeMap;
use std::time::Duration;

use participants_sdk::{Context, Handler, HandlerError, HandlerResult, Participant, ParticipantConfig};
use sagas::definition::StepBuilder;
use sagas::{Command, NoCommand, SagaDefinition, SagaId};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// What a probe step does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Behavior {
    /// Succeed.
    #[default]
    Ok,
    /// Refuse (code `probe_rejected`).
    Reject,
    /// Fail transiently for the first `n` attempts, then succeed.
    Flaky {
        /// Failing attempts.
        n: u32,
    },
    /// Succeed after `ms` milliseconds.
    Slow {
        /// The delay.
        ms: u64,
    },
    /// Record the effect, then refuse (code `probe_rejected`): the refusal must undo the write.
    WriteThenReject,
    /// Work for `ms` milliseconds, calling `cx.heartbeat({"done_ms": ..})` every `every_ms`,
    /// then succeed.
    Beating {
        /// The work's length.
        ms: u64,
        /// How often the handler calls `heartbeat`.
        every_ms: u64,
    },
    /// Succeed after `ms` milliseconds, counted while it runs in [`running`] (how many
    /// commands of the step's key run at once in this process, and the most seen).
    Held {
        /// The delay.
        ms: u64,
    },
    /// A worker that dies on the first attempt: it reports `{"done": n}` for n = 1..=`beats`
    /// (one heartbeat every `every_ms`), then goes silent for `silent_ms` and fails
    /// transiently (nothing recorded). Later attempts succeed at once.
    BeatThenDie {
        /// Heartbeats before it goes silent.
        beats: u32,
        /// Between heartbeats.
        every_ms: u64,
        /// How long it stays silent before failing.
        silent_ms: u64,
    },
}

/// One step's plan: the command's behaviour and how often its undo fails first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    /// The command.
    #[serde(default)]
    pub behavior: Behavior,
    /// The undo fails transiently this many times first.
    #[serde(default)]
    pub undo_flaky: u32,
    /// The undo refuses (code `probe_undo_blocked`) while `probe.blocks` holds this token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_blocked_by: Option<String>,
}

/// The data of a probe saga: a plan per step name (absent = succeed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Plans by step name.
    #[serde(default)]
    pub steps: BTreeMap<String, StepPlan>,
    /// Payloads of the events received by wait steps.
    #[serde(default)]
    pub events: BTreeMap<String, serde_json::Value>,
    /// A business key, for definitions that declare it as their search key `case`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<String>,
}

impl Plan {
    /// Set step `name`'s behaviour.
    pub fn with(mut self, name: &str, behavior: Behavior) -> Self {
        self.steps.entry(name.into()).or_default().behavior = behavior;
        self
    }

    /// Make step `name`'s undo fail transiently `n` times first.
    pub fn undo_flaky(mut self, name: &str, n: u32) -> Self {
        self.steps.entry(name.into()).or_default().undo_flaky = n;
        self
    }

    /// Give the saga the business key `case`.
    pub fn case(mut self, case: &str) -> Self {
        self.case = Some(case.into());
        self
    }

    /// Make step `name`'s undo refuse while `probe.blocks` holds `token` ([`block`]).
    pub fn undo_blocked_by(mut self, name: &str, token: &str) -> Self {
        self.steps.entry(name.into()).or_default().undo_blocked_by = Some(token.into());
        self
    }

    fn plan(&self, name: &str) -> StepPlan {
        self.steps.get(name).cloned().unwrap_or_default()
    }
}

/// The probe command.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Probe {
    /// The step.
    pub key: String,
    /// What to do.
    pub behavior: Behavior,
}
/// The probe's reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Probed {
    /// The step.
    pub key: String,
    /// The progress an earlier attempt reported ([`Context::progress`]), when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<serde_json::Value>,
}
impl Command for Probe {
    const NAME: &'static str = "probe.do";
    const PARTICIPANT: &'static str = "probe";
    type Reply = Probed;
}

/// The probe's compensation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Undo {
    /// The step.
    pub key: String,
    /// Fail transiently this many times first.
    pub flaky: u32,
    /// Refuse while `probe.blocks` holds this token.
    #[serde(default)]
    pub blocked_by: Option<String>,
}
impl Command for Undo {
    const NAME: &'static str = "probe.undo";
    const PARTICIPANT: &'static str = "probe";
    type Reply = ();
}

/// Configure `s` as probe step `name` (with an undo).
pub fn step(s: StepBuilder<Plan, NoCommand>, name: &'static str) -> StepBuilder<Plan, Probe> {
    s.invoke(move |d: &Plan| Probe { key: name.into(), behavior: d.plan(name).behavior }).compensate(move |d: &Plan| {
        let plan = d.plan(name);
        Undo { key: name.into(), flaky: plan.undo_flaky, blocked_by: plan.undo_blocked_by }
    })
}

struct ProbeService;

impl Handler<Probe> for ProbeService {
    async fn handle(&self, cx: &mut Context<'_>, cmd: Probe) -> HandlerResult<Probed> {
        match cmd.behavior {
            Behavior::Ok => {}
            Behavior::Reject => return Err(HandlerError::reject("probe_rejected", format!("step {} refuses", cmd.key))),
            Behavior::Flaky { n } if cx.attempt() <= n => {
                return Err(HandlerError::Transient(anyhow::anyhow!("step {} fails attempt {}", cmd.key, cx.attempt())));
            }
            Behavior::Flaky { .. } => {}
            Behavior::Slow { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            Behavior::WriteThenReject => {
                record(cx, &cmd.key, "do").await?;
                return Err(HandlerError::reject("probe_rejected", format!("step {} refuses after writing", cmd.key)));
            }
            Behavior::Beating { ms, every_ms } => {
                let started = tokio::time::Instant::now();
                while started.elapsed() < Duration::from_millis(ms) {
                    cx.heartbeat(&serde_json::json!({"done_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)})).await?;
                    tokio::time::sleep(Duration::from_millis(every_ms)).await;
                }
            }
            Behavior::BeatThenDie { beats, every_ms, silent_ms } if cx.attempt() == 1 => {
                for n in 1..=beats {
                    cx.heartbeat(&serde_json::json!({"done": n})).await?;
                    tokio::time::sleep(Duration::from_millis(every_ms)).await;
                }
                tokio::time::sleep(Duration::from_millis(silent_ms)).await;
                return Err(HandlerError::Transient(anyhow::anyhow!("step {} died after {beats} heartbeats", cmd.key)));
            }
            Behavior::BeatThenDie { .. } => {}
            Behavior::Held { ms } => {
                let _running = Running::start(&cmd.key);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        record(cx, &cmd.key, "do").await?;
        Ok(Probed { key: cmd.key, resumed_from: cx.progress().cloned() })
    }
}

impl Handler<Undo> for ProbeService {
    async fn handle(&self, cx: &mut Context<'_>, cmd: Undo) -> HandlerResult<()> {
        if cx.attempt() <= cmd.flaky {
            return Err(HandlerError::Transient(anyhow::anyhow!("undo {} fails attempt {}", cmd.key, cx.attempt())));
        }
        if let Some(token) = &cmd.blocked_by {
            let blocked: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM probe.blocks WHERE token = $1)").bind(token).fetch_one(cx.tx()).await?;
            if blocked {
                return Err(HandlerError::reject("probe_undo_blocked", format!("undo {} is blocked by `{token}`", cmd.key)));
            }
        }
        record(cx, &cmd.key, "undo").await
    }
}

/// Commands of each key running now in this process, and the most seen at once.
static RUNNING: std::sync::Mutex<BTreeMap<String, (usize, usize)>> = std::sync::Mutex::new(BTreeMap::new());

/// One [`Behavior::Held`] command running; counted out when dropped (also when a handler is
/// stopped where it is).
struct Running(String);

impl Running {
    fn start(key: &str) -> Self {
        let mut all = RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let e = all.entry(key.to_owned()).or_default();
        e.0 += 1;
        e.1 = e.1.max(e.0);
        Self(key.to_owned())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut all = RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = all.get_mut(&self.0) {
            e.0 -= 1;
        }
    }
}

/// `(now, most)`: how many [`Behavior::Held`] commands of `key` run in this process now, and
/// the most that ran at once.
pub fn running(key: &str) -> (usize, usize) {
    RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).copied().unwrap_or_default()
}

/// Probe definitions with shared-resource limits, served by the `probe-node` binary:
/// `limited` (a → `gpu`, holding a slot of `gpu-pool`, 2 at once → b) and `solo` (one step
/// `x`, holding `solo-pool`, 1 at once).
pub fn limited_definitions() -> Vec<SagaDefinition<Plan>> {
    let limited = SagaDefinition::<Plan>::builder("limited", 1)
        .step("a", |s| step(s, "a"))
        .step("gpu", |s| step(s, "gpu").limit("gpu-pool", 2))
        .step("b", |s| step(s, "b"))
        .build()
        .expect("a valid definition");
    let solo =
        SagaDefinition::<Plan>::builder("solo", 1).step("x", |s| step(s, "x").limit("solo-pool", 1)).build().expect("a valid definition");
    vec![limited, solo]
}

/// What the `probe-node` binary serves: the bundled example and [`limited_definitions`].
pub fn node_registry() -> anyhow::Result<sagas::Registry> {
    let mut r = sagaflow::registry()?;
    for d in limited_definitions() {
        r.register(d.erased())?;
    }
    Ok(r)
}

async fn record(cx: &mut Context<'_>, key: &str, kind: &str) -> HandlerResult<()> {
    let saga = cx.saga_id().0;
    sqlx::query("INSERT INTO probe.effects (saga_id, key, kind, attempt) VALUES ($1, $2, $3, $4)")
        .bind(saga)
        .bind(key)
        .bind(kind)
        .bind(i32::try_from(cx.attempt()).unwrap_or(i32::MAX))
        .execute(cx.tx())
        .await?;
    Ok(())
}

/// Create `probe.effects`.
pub async fn setup(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS probe;
         CREATE TABLE IF NOT EXISTS probe.effects (id bigserial PRIMARY KEY, saga_id uuid NOT NULL, key text NOT NULL, kind text NOT NULL, attempt int NOT NULL);
         CREATE TABLE IF NOT EXISTS probe.blocks (token text PRIMARY KEY);",
    )
    .execute(pool)
    .await
    .map(drop)
}

/// The probe participant.
pub fn participant(config: ParticipantConfig) -> Participant {
    Participant::builder("probe")
        .handle::<Probe>(ProbeService)
        .compensate::<Undo>(ProbeService)
        .config(config)
        .build()
        .expect("a valid participant")
}

/// Block (`true`) or unblock the undos planned with [`Plan::undo_blocked_by`] `token`.
pub async fn block(pool: &PgPool, token: &str, blocked: bool) -> Result<(), sqlx::Error> {
    let sql = if blocked {
        "INSERT INTO probe.blocks (token) VALUES ($1) ON CONFLICT DO NOTHING"
    } else {
        "DELETE FROM probe.blocks WHERE token = $1"
    };
    sqlx::query(sql).bind(token).execute(pool).await.map(drop)
}

/// A saga's effects, in commit order: `"a:do"`, `"a:undo"`, ...
pub async fn effects(pool: &PgPool, saga: SagaId) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT key, kind FROM probe.effects WHERE saga_id = $1 ORDER BY id").bind(saga.0).fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(k, kind)| format!("{k}:{kind}")).collect())
}

/// A start request for probe definition `definition` (its newest version) with `plan`.
pub fn start_request(definition: &str, plan: &Plan) -> sagas::protocol::StartRequest {
    sagas::protocol::StartRequest {
        definition: definition.into(),
        version: None,
        input: serde_json::to_value(plan).expect("a plan encodes"),
        idempotency_key: None,
        saga_id: None,
        priority: None,
    }
}
