//! Inputs applied to sagas: read the instances (and, for inputs deduplicated by message id,
//! the inbox), or take this node's copy of those it wrote last (`recent`) → `sagas::decide`
//! for each input → one statement writes the states, history,
//! outbox, timers and inbox entries of the sagas still as they were read, and the others are
//! decided again ([`Engine::apply_batch`]; one input, or a batch of replies of distinct sagas).
//! Starts are one statement; timers fire under a row lock (the write modes: `store::write`).
//! What a decision wrote is handed to the publisher after the commit. The caller acks the
//! messages after this returns.

use std::collections::HashSet;
use std::sync::Arc;

use sagaflow_amqp::telemetry;
use sagaflow_amqp::transport::Names;
use sagas::protocol::{LifecycleEvent, SagaRef, StartRequest, encode_child_reply, encode_command, encode_lifecycle, valid_traceparent};
use sagas::{Definition, Effect, Input, InputOutcome, MessageId, Registry, SagaId, SagaState, SagaStatus, Timestamp, Transition, decide};
use serde_json::json;
use sqlx::PgPool;

use crate::error::ErrorKind;
use crate::metrics::Metrics;
use crate::outbound::Publisher;
use crate::recent::Recent;
use crate::starts::Starts;
use crate::store::{self, Claimed, DecisionRows, HistoryRow, OutboxRow};
use crate::waiters::Waiters;

/// How far a due timer of a definition version this node does not have is pushed back.
const UNKNOWN_VERSION_TIMER_DELAY_MS: u64 = 30_000;

/// What happened to an input.
#[derive(Clone, Debug, PartialEq)]
pub enum Handled {
    /// `decide` saw it; the outcome says whether it changed the saga.
    Decided {
        /// Applied, ignored (stale or duplicate) or refused.
        outcome: InputOutcome,
        /// The saga's status afterwards.
        status: SagaStatus,
    },
    /// Its message id was already applied: nothing was done.
    Duplicate,
    /// No saga has this id.
    UnknownSaga,
    /// The saga's definition version is not registered on this node; it was left untouched.
    UnknownVersion {
        /// Definition name.
        definition: String,
        /// Version.
        version: u32,
    },
    /// A timer that another node fired or that was cancelled, or a saga another node holds.
    Skipped,
    /// The input names something the saga's definition does not have (a step index past its
    /// last step); the message carrying it is dead-lettered with `code`.
    Invalid {
        /// The dead-letter reason (`unknown_step`).
        code: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// Why a start request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// No such definition (or version) is registered.
    #[error("unknown definition `{definition}`{}", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    UnknownDefinition {
        /// The name asked for.
        definition: String,
        /// The version asked for.
        version: Option<u32>,
    },
    /// The input does not decode as the definition's data.
    #[error("invalid input for `{definition}`: {reason}")]
    InvalidInput {
        /// The definition.
        definition: String,
        /// What is wrong.
        reason: String,
    },
    /// PostgreSQL refused the data itself ([`store::is_unstorable`]): the same request fails
    /// the same way every time.
    #[error("the request cannot be stored: {0}")]
    Unstorable(String),
    /// The database failed; the request can be retried.
    #[error("database: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for StartError {
    fn from(e: sqlx::Error) -> Self {
        if store::is_unstorable(&e) { Self::Unstorable(sagas::protocol::clip(&e.to_string(), 512).into_owned()) } else { Self::Database(e) }
    }
}

impl StartError {
    /// What kind of failure it is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::UnknownDefinition { .. } => ErrorKind::UnknownDefinition,
            Self::InvalidInput { .. } => ErrorKind::InvalidInput,
            Self::Unstorable(_) => ErrorKind::Unstorable,
            Self::Database(_) => ErrorKind::Unavailable,
        }
    }

    /// The stable code (dead-letter reason, API error code).
    pub fn code(&self) -> &'static str {
        self.kind().as_str()
    }
}

/// A started saga.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Started {
    /// Its id.
    pub saga_id: SagaId,
    /// `false` when the idempotency key named an existing saga.
    pub created: bool,
}

/// The messages and timers of a decision: outbox rows, timers to schedule, keys to cancel.
/// What a decision's effects write besides its state and history.
#[derive(Default)]
struct Outgoing {
    outbox: Vec<OutboxRow>,
    schedule: Vec<store::TimerRow>,
    cancel: Vec<String>,
    slots: store::slots::SlotRows,
}

/// The serialized parts of a decision (see [`Engine::rows`]).
struct Rows {
    input: String,
    state: String,
    effects: String,
    out: Outgoing,
}

/// One decision, ready to write.
struct Decided<'r> {
    def: &'r Definition,
    rows: DecisionRows,
    handled: Handled,
    /// The state after the input, what it did and when: for the metrics once committed.
    state: SagaState,
    effects: Vec<Effect>,
    now: Timestamp,
    /// The saga's trace context, kept with its state in [`Recent`].
    traceparent: Option<String>,
}

/// Applies inputs to sagas. Shared by the consumers, the timers, the relay and the client.
#[derive(Clone)]
pub struct Engine {
    pub(crate) pool: PgPool,
    registry: Arc<Registry>,
    names: Names,
    node: Arc<str>,
    metrics: Metrics,
    pub(crate) publisher: Publisher,
    starts: Starts,
    events: Events,
    /// The sagas this node wrote last, to decide their next input without reading them.
    pub(crate) recent: Recent,
    /// Who waits for sagas to settle (woken by this node's decisions and the lifecycle events).
    pub(crate) waiters: Waiters,
    /// Wakes this node's timers before their next poll (a resource slot was granted).
    pub(crate) timers_wake: Arc<tokio::sync::Notify>,
    /// The largest body a reply queue takes (`max_body_bytes`): a child saga's answer to its
    /// parent must fit.
    max_body: usize,
}

/// The sizes an engine keeps to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most callers waiting for sagas to settle.
    pub(crate) waiters: usize,
    /// The largest message body a node takes (`max_body_bytes`).
    pub(crate) body: usize,
}

/// Which optional lifecycle events a node publishes (the others it always does).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Events {
    /// The `step_*` events.
    pub(crate) steps: bool,
    /// The `started` event.
    pub(crate) started: bool,
}

impl Events {
    fn publishes(self, event: &sagas::SagaEvent) -> bool {
        match event {
            sagas::SagaEvent::Started => self.started,
            e if e.is_step_level() => self.steps,
            _ => true,
        }
    }
}

impl Engine {
    /// An engine that hands what it writes to `publisher` (whose task the runtime runs).
    pub(crate) fn new(
        pool: PgPool,
        registry: Arc<Registry>,
        names: Names,
        node: &str,
        events: Events,
        outbound: (Publisher, Starts),
        limits: Limits,
    ) -> Self {
        let (publisher, starts) = outbound;
        let (recent, waiters) = (Recent::default(), Waiters::new(limits.waiters));
        Self {
            pool,
            registry,
            names,
            node: node.into(),
            metrics: Metrics::new(),
            publisher,
            starts,
            events,
            recent,
            waiters,
            timers_wake: Arc::default(),
            max_body: limits.body,
        }
    }

    /// This node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The AMQP names.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The registered definitions.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Start a saga. The same idempotency key twice starts one saga.
    pub async fn start(&self, req: &StartRequest, traceparent: Option<&str>) -> Result<Started, StartError> {
        self.start_as(req, traceparent, None).await
    }

    /// Start a saga, as the child saga of `parent` when given (see `children`).
    pub(crate) async fn start_as(
        &self,
        req: &StartRequest,
        traceparent: Option<&str>,
        parent: Option<sagas::ParentLink>,
    ) -> Result<Started, StartError> {
        let def = match req.version {
            Some(v) => self.registry.get(&req.definition, v),
            None => self.registry.latest(&req.definition),
        }
        .ok_or_else(|| StartError::UnknownDefinition { definition: req.definition.clone(), version: req.version })?;
        req.check().map_err(|reason| StartError::InvalidInput { definition: def.name.clone(), reason })?;
        // Decodes the input as the definition's data (refusing what does not) and reads its keys.
        let search_keys =
            def.search_key_values(&req.input).map_err(|reason| StartError::InvalidInput { definition: def.name.clone(), reason })?;
        let id = req.saga_id.unwrap_or_default();
        let mut state = SagaState::new(def, id, req.input.clone(), Timestamp::now());
        state.priority = req.priority.unwrap_or(0);
        state.parent = parent;
        // A malformed trace context is dropped and a new trace started (W3C): it is copied
        // into every command of the saga, so it must be one a broker and a participant can carry.
        let traceparent = traceparent.filter(|t| valid_traceparent(t)).map_or_else(|| new_traceparent(id), str::to_owned);
        // The history shows what the saga was started with.
        let mut start = json!({"type": "start", "input": req.input});
        if let Some(p) = req.priority.filter(|p| *p != 0) {
            start["priority"] = json!(p);
        }
        if let Some(p) = &state.parent {
            start["parent"] = json!({"saga_id": p.saga_id, "step": p.step_name, "attempt": p.attempt});
        }
        let start = start.to_string();
        let mut d = self.decide(def, &state, Some(&traceparent), &Input::Start, Some(start)).map_err(|h| StartError::InvalidInput {
            definition: def.name.clone(),
            reason: format!("the definition cannot start: {h:?}"),
        })?;
        // One statement, shared with the starts that wait with it: the instance, its history,
        // its first messages and timers, or nothing when the id or the idempotency key is taken.
        let new = store::NewInstance {
            definition: def.name.clone(),
            version: def.version,
            idempotency_key: req.idempotency_key.clone(),
            traceparent,
            search_keys,
        };
        let (rows, created) = self.starts.insert(std::mem::take(&mut d.rows), new, self.wake_relays()).await?;
        d.rows = rows;
        let Some(ids) = created else {
            let existing = match req.idempotency_key.as_deref() {
                Some(key) => store::by_idempotency_key(&self.pool, key).await?.unwrap_or(id),
                None => id,
            };
            return Ok(Started { saga_id: existing, created: false });
        };
        let written = self.to_publish(std::slice::from_mut(&mut d), ids.outbox, ids.woken);
        self.committed(&d, &Input::Start);
        tracing::info!(saga.id = %id, saga.name = %def.name, "saga started");
        if let Some(version) = ids.version {
            self.recent.keep(d.state, d.traceparent, version);
        }
        self.publish_written(written).await;
        Ok(Started { saga_id: id, created: true })
    }

    /// Apply `input` to saga `id`. `inbox` is the id of the message that carried it, for dedupe.
    pub async fn apply(&self, id: SagaId, input: &Input, inbox: Option<MessageId>) -> Result<Handled, sqlx::Error> {
        let mut handled = self.apply_batch(&[(id, input, inbox)]).await?;
        Ok(handled.pop().expect("one result per input"))
    }

    /// Apply several inputs, each `(saga, input, id of the message that carried it)`, in as few
    /// transactions as they allow: one for all the inputs of distinct sagas, and one more for
    /// each further input of a saga already in it (a saga's inputs apply in the order given).
    /// Returns what happened to each, in order. Each input is decided as if alone: a duplicate,
    /// an unknown saga or an invalid input does not hold up the others.
    pub async fn apply_batch(&self, inputs: &[(SagaId, &Input, Option<MessageId>)]) -> Result<Vec<Handled>, sqlx::Error> {
        let mut results: Vec<Option<Handled>> = vec![None; inputs.len()];
        let mut pending: Vec<usize> = (0..inputs.len()).collect();
        while !pending.is_empty() {
            // A saga, and a message id, at most once per round.
            let (mut sagas, mut messages) = (HashSet::with_capacity(pending.len()), HashSet::with_capacity(pending.len()));
            let (round, mut rest): (Vec<usize>, Vec<usize>) = pending.into_iter().partition(|&i| {
                let (saga, _, message) = inputs[i];
                let now = !sagas.contains(&saga) && !message.is_some_and(|m| messages.contains(&m));
                // A deferred input holds back its saga's later inputs too.
                sagas.insert(saga);
                if now {
                    messages.extend(message);
                }
                now
            });
            // Inputs whose saga changed since it was read go again, before their saga's later ones.
            rest.extend(self.apply_round(inputs, &round, &mut results).await?);
            rest.sort_unstable();
            pending = rest;
        }
        Ok(results.into_iter().map(|h| h.expect("every input is handled in some round")).collect())
    }

    /// The inputs `round` of `inputs` (distinct sagas) in at most two statements and no
    /// transaction around them: read the sagas (and which message ids were applied before) that
    /// this node did not write last, decide, then write every decision whose saga is still as
    /// it was read or written (see [`store::Guard`]). Returns the inputs whose saga another
    /// writer changed in between, to be decided again (read, then: their copy is gone).
    async fn apply_round(
        &self,
        inputs: &[(SagaId, &Input, Option<MessageId>)],
        round: &[usize],
        results: &mut [Option<Handled>],
    ) -> Result<Vec<usize>, sqlx::Error> {
        // The sagas this node wrote last are decided on its copy (an input whose message id was
        // applied meanwhile is then caught by the write's guard instead of the read).
        let mut kept = std::collections::HashMap::new();
        let (mut ids, mut messages) = (Vec::with_capacity(round.len()), Vec::new());
        for &i in round {
            let (saga, _, inbox) = inputs[i];
            match self.recent.take(saga) {
                Some(copy) => {
                    kept.insert(saga, copy);
                }
                None => {
                    ids.push(saga.0);
                    messages.extend(inbox.map(|m| m.0));
                }
            }
        }
        let mut read = if ids.is_empty() { store::ReadBatch::default() } else { store::read_batch(&self.pool, &ids, &messages).await? };
        read.sagas.extend(kept);
        let (mut decided, mut at) = (Vec::new(), Vec::new());
        let mut guard = store::Guard { versions: Vec::new(), marks: Vec::new() };
        for &i in round {
            let (id, input, inbox) = inputs[i];
            let Some((saga, version)) = read.sagas.remove(&id) else {
                results[i] = Some(Handled::UnknownSaga);
                continue;
            };
            if inbox.is_some_and(|m| read.seen.contains(&m.0)) {
                results[i] = Some(Handled::Duplicate);
                continue;
            }
            // `Err`: nothing of it is written, its message id is not kept either.
            match self.decide_on(saga, input) {
                // A stale heartbeat: nothing to write, and no history row either.
                Ok(d) if d.rows.writes_nothing() => {
                    results[i] = Some(d.handled);
                    self.recent.keep(d.state, d.traceparent, version);
                }
                Ok(d) => {
                    guard.versions.push((id.0, version));
                    guard.marks.extend(inbox.map(|m| (m.0, id.0)));
                    decided.push(d);
                    at.push(i);
                }
                Err(h) => results[i] = Some(h),
            }
        }
        if decided.is_empty() {
            return Ok(Vec::new());
        }
        // Message ids are recorded in one order, as the sagas are locked in one: writes on
        // several nodes that share an id wait for each other instead of deadlocking.
        guard.marks.sort_unstable();
        let wake = self.wake_relays();
        let rows: Vec<&DecisionRows> = decided.iter().map(|d| &d.rows).collect();
        let wrote = store::write::write_guarded(&self.pool, &self.node, &rows, &guard, wake).await?;
        drop(rows);
        let (locked, written): (HashSet<uuid::Uuid>, HashSet<uuid::Uuid>) =
            (wrote.locked.into_iter().collect(), wrote.written.into_iter().collect());
        let mut mine: Vec<Decided<'_>> = Vec::with_capacity(decided.len());
        let mut again = Vec::new();
        // Each written decision's input, and the row version its saga is at now.
        let mut applied_at = Vec::with_capacity(decided.len());
        for ((i, d), (_, read_at)) in at.into_iter().zip(decided).zip(&guard.versions) {
            let saga = inputs[i].0.0;
            if written.contains(&saga) {
                // An input that did not apply left the row as it was.
                let version = if d.rows.applied.is_some() { wrote.version } else { Some(*read_at) };
                applied_at.push((i, version));
                mine.push(d);
            } else if locked.contains(&saga) {
                // Another delivery of the same message was applied meanwhile.
                results[i] = Some(Handled::Duplicate);
            } else {
                again.push(i);
            }
        }
        let to_publish = self.to_publish(&mut mine, wrote.outbox, wake);
        for ((i, version), d) in applied_at.into_iter().zip(mine) {
            self.committed(&d, inputs[i].1);
            results[i] = Some(d.handled);
            if let Some(version) = version {
                self.recent.keep(d.state, d.traceparent, version);
            }
        }
        if !again.is_empty() {
            tracing::debug!(inputs = again.len(), "sagas changed since they were read; deciding again");
        }
        self.publish_written(to_publish).await;
        Ok(again)
    }

    /// Fire timer `key` of saga `id` if it is still there and no other node holds the saga.
    pub(crate) async fn fire_timer(&self, id: SagaId, key: &str) -> Result<Handled, sqlx::Error> {
        // Written under the row lock, not a guard: the next input reads the saga.
        self.recent.forget(id);
        let mut tx = self.pool.begin().await?;
        let Some(locked) = store::lock(&mut tx, id, true).await? else {
            // The saga is being handled by someone else right now (or is gone): later.
            tx.rollback().await?;
            return Ok(Handled::Skipped);
        };
        let Some(timer) = store::take_timer(&mut tx, id, key).await? else {
            tx.rollback().await?;
            return Ok(Handled::Skipped);
        };
        let input = Input::Timer(timer);
        match self.decide_on(locked, &input) {
            Ok(mut d) => {
                let wake = self.wake_relays();
                let ids = store::write::write_locked(&mut *tx, &self.node, &[&d.rows], wake).await?;
                tx.commit().await?;
                let written = self.to_publish(std::slice::from_mut(&mut d), ids, wake);
                self.committed(&d, &input);
                self.publish_written(written).await;
                Ok(d.handled)
            }
            Err(h) => {
                tx.rollback().await?;
                if matches!(h, Handled::UnknownVersion { .. }) {
                    // Not due again for a while: a node that has the version may fire it
                    // meanwhile, and this node neither re-reads it every poll nor lets such
                    // timers crowd out the others.
                    let later = Timestamp::now().plus_ms(UNKNOWN_VERSION_TIMER_DELAY_MS);
                    store::postpone_timer(&self.pool, id, key, later).await?;
                }
                Ok(h)
            }
        }
    }

    /// Decide `input` on the saga as read; `Err` for an input nothing may be written for (the
    /// saga's version is unknown here, or the input names a step the definition lacks).
    fn decide_on(&self, saga: store::Instance, input: &Input) -> Result<Decided<'_>, Handled> {
        let st = &saga.state;
        let Some(def) = self.registry.get(&st.definition, st.version) else {
            tracing::error!(
                saga.id = %st.id, saga.name = %st.definition, version = st.version,
                "this node does not know the saga's definition version; leaving the saga untouched until a node that does handles it"
            );
            return Err(Handled::UnknownVersion { definition: st.definition.clone(), version: st.version });
        };
        let step = match input {
            Input::Reply(r) => Some(r.step),
            Input::Heartbeat(h) => Some(h.step),
            _ => None,
        };
        if let Some(step) = step
            && def.step(step).is_none()
        {
            let detail = format!("`{}` version {} has no step {}", def.name, def.version, step.0);
            return Err(Handled::Invalid { code: "unknown_step", detail });
        }
        self.decide(def, st, saga.traceparent.as_deref(), input, None)
    }

    /// Run `decide` and turn its transition into the rows to write (no IO).
    fn decide<'r>(
        &self,
        def: &'r Definition,
        st: &SagaState,
        traceparent: Option<&str>,
        input: &Input,
        input_json: Option<String>,
    ) -> Result<Decided<'r>, Handled> {
        let trace_id = traceparent.and_then(|t| t.split('-').nth(1)).unwrap_or("");
        let span = tracing::info_span!("decide", saga.id = %st.id, saga.name = %def.name, input = input.kind(), trace.id = trace_id, node = %self.node);
        telemetry::follow(&span, traceparent);
        let _entered = span.enter();
        let now = Timestamp::now();
        let t = match decide(def, st, input, now) {
            Ok(t) => t,
            Err(e) => {
                // Only an invariant break gets here (the state names another definition).
                tracing::error!(saga.id = %st.id, error = %e, "decide refused the input");
                return Err(Handled::UnknownVersion { definition: st.definition.clone(), version: st.version });
            }
        };
        let (outcome, detail) = match &t.outcome {
            InputOutcome::Applied => ("applied", None),
            InputOutcome::Ignored { reason, detail } => (reason.as_str(), Some(detail.clone())),
            InputOutcome::Refused { reason } => ("refused", Some(reason.clone())),
        };
        let status = t.state.status;
        let applied = t.outcome == InputOutcome::Applied;
        let rows = self.rows(def, &t, traceparent, input, input_json, now).map_err(|e| {
            tracing::error!(saga.id = %st.id, error = %e, "a decision cannot be serialized; nothing is written");
            Handled::Invalid { code: "unencodable", detail: format!("the decision cannot be serialized: {e}") }
        })?;
        let history = HistoryRow {
            saga: st.id,
            input_kind: input.kind(),
            input: rows.input,
            outcome,
            detail: detail.clone(),
            status: status.as_str(),
            effects: rows.effects,
            state_bytes: rows.state.len(),
        };
        if !applied && !matches!(input, Input::Heartbeat(_)) {
            tracing::info!(saga.id = %st.id, input = input.kind(), outcome, detail = detail.as_deref().unwrap_or(""), "input did not apply");
        } else if !applied {
            // A heartbeat that crossed its attempt's reply or timeout: routine, and frequent.
            tracing::debug!(saga.id = %st.id, outcome, detail = detail.as_deref().unwrap_or(""), "heartbeat did not apply");
        }
        Ok(Decided {
            def,
            rows: DecisionRows {
                applied: applied.then_some((rows.state, status)),
                history,
                outbox: rows.out.outbox,
                schedule: rows.out.schedule,
                cancel: rows.out.cancel,
                slots: rows.out.slots,
            },
            handled: Handled::Decided { outcome: t.outcome, status },
            state: t.state,
            effects: t.effects,
            now,
            traceparent: traceparent.map(str::to_owned),
        })
    }

    /// The serialized parts of transition `t` (the decision on `input`, shown in the history as
    /// `input_json` when given): the input, the new state, the effects, and when it applied, its
    /// outbox rows and timers (no IO).
    fn rows(
        &self,
        def: &Definition,
        t: &Transition,
        traceparent: Option<&str>,
        input: &Input,
        input_json: Option<String>,
        now: Timestamp,
    ) -> Result<Rows, serde_json::Error> {
        let applied = t.outcome == InputOutcome::Applied;
        let out = if applied { self.effects(def, &t.state, traceparent, &t.effects, now)? } else { Outgoing::default() };
        Ok(Rows {
            input: match input_json {
                Some(json) => json,
                None => serde_json::to_string(input)?,
            },
            state: serde_json::to_string(&t.state)?,
            effects: serde_json::to_string(&t.effects)?,
            out,
        })
    }

    /// Whether this engine's writes wake the relays: a writer without a channel (a client
    /// that is not connected) cannot publish its rows itself.
    fn wake_relays(&self) -> bool {
        !self.publisher.has_channel()
    }

    /// The outbox rows `decided` wrote, with their ids `ids` (in the same order), to publish
    /// after the commit; none when the relays will (`woken`).
    fn to_publish(&self, decided: &mut [Decided<'_>], ids: Vec<i64>, woken: bool) -> Vec<Claimed> {
        if woken {
            return Vec::new();
        }
        let mut ids = ids.into_iter();
        let mut rows = Vec::new();
        for d in decided {
            let saga = d.rows.history.saga;
            for (r, id) in std::mem::take(&mut d.rows.outbox).into_iter().zip(ids.by_ref()) {
                rows.push(Claimed { id, saga, exchange: r.exchange, routing_key: r.routing_key, mandatory: r.mandatory, msg: r.msg });
            }
        }
        rows
    }

    /// After the commit of `d` (the decision on `input`): the metrics, and a line when the saga settled.
    fn committed(&self, d: &Decided<'_>, input: &Input) {
        if !matches!(d.handled, Handled::Decided { outcome: InputOutcome::Applied, .. }) {
            return;
        }
        if !d.rows.slots.is_empty() {
            self.grant_slots(d.rows.slots.resources());
        }
        self.metrics.record(d.def, input, &d.state, &d.effects, d.now.0);
        if d.state.status.is_settled() {
            tracing::info!(saga.id = %d.state.id, saga.name = %d.def.name, status = d.state.status.as_str(), "saga settled");
            self.waiters.settled(d.state.id);
        }
    }

    /// Grant what `resources` have free, in a task of its own (a decision does not wait for it),
    /// and wake this node's timers to deliver the grants. A grant that does not happen here
    /// (the node dies first, the database fails) happens at the next sweep (`sweep_slots`).
    pub(crate) fn grant_slots(&self, resources: Vec<String>) {
        let (pool, wake) = (self.pool.clone(), self.timers_wake.clone());
        tokio::spawn(async move {
            for r in resources {
                match store::slots::grant(&pool, &r).await {
                    Ok(granted) if !granted.is_empty() => {
                        tracing::debug!(resource = %r, granted = granted.len(), "resource slots granted");
                        wake.notify_one();
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(resource = %r, error = %e, "cannot grant resource slots now; the next sweep will"),
                }
            }
        });
    }

    /// Grant what every resource with waiters has free (a safety net for grants lost with a
    /// node that died between a commit and its grant).
    pub(crate) async fn sweep_slots(&self) -> Result<(), sqlx::Error> {
        let resources = store::slots::waiting_resources(&self.pool).await?;
        let mut granted = 0;
        for r in &resources {
            granted += store::slots::grant(&self.pool, r).await?.len();
        }
        if granted > 0 {
            tracing::info!(granted, "resource slots granted by the sweep");
            self.timers_wake.notify_one();
        }
        Ok(())
    }

    /// The outbox rows and timer changes of `effects` (no IO).
    fn effects(
        &self,
        def: &Definition,
        st: &SagaState,
        traceparent: Option<&str>,
        effects: &[Effect],
        now: Timestamp,
    ) -> Result<Outgoing, serde_json::Error> {
        let saga = SagaRef { saga_id: st.id, definition: def.name.clone(), version: def.version };
        let reply_to = self.names.reply_queue_for(st.id);
        // Commands name the decision's span as their parent when spans are exported; else they
        // carry the saga's context, unless it was stored before starts were checked and is one no
        // command can carry.
        let exported = telemetry::traceparent_of(&tracing::Span::current());
        let traceparent = exported.as_deref().or(traceparent.filter(|t| valid_traceparent(t)));
        let mut outbox = Vec::new();
        let (mut schedule, mut cancel) = (Vec::new(), Vec::new());
        let mut slots = store::slots::SlotRows::default();
        let int = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        // Commands carry their saga's priority (a priority queue delivers higher ones first).
        let priority = Some(sagaflow_amqp::transport::amqp_priority(st.priority)).filter(|p| *p > 0);
        for e in effects {
            match e {
                Effect::Send(cmd) => outbox.push(OutboxRow::new(
                    self.names.commands_exchange(),
                    cmd.participant.clone(),
                    true,
                    sagas::protocol::WireMessage { priority, ..encode_command(&saga, cmd, &reply_to, traceparent, now) },
                )?),
                Effect::Schedule { key, due } => schedule.push((key.clone(), *due)),
                Effect::Cancel { key } => cancel.push(key.clone()),
                Effect::Emit(ev) if !self.events.publishes(ev) => {}
                Effect::Emit(ev) => {
                    let ev =
                        LifecycleEvent { saga_id: st.id, definition: def.name.clone(), version: def.version, at: now, event: ev.clone() };
                    let key = format!("{}.{}", def.name, ev.event.name());
                    outbox.push(OutboxRow::new(self.names.events_exchange(), key, false, encode_lifecycle(&ev, MessageId::new_random()))?);
                }
                Effect::Acquire { step, resource, capacity, priority } => slots.acquire.push(store::slots::Acquire {
                    step: int(step.0),
                    resource: resource.clone(),
                    capacity: int(*capacity),
                    priority: *priority,
                }),
                Effect::Release { step, resource } => slots.release.push((int(step.0), resource.clone())),
                Effect::ReplyToParent { kind, attempt, outcome } => {
                    let Some(parent) = &st.parent else { continue };
                    outbox.push(OutboxRow::new(
                        String::new(),
                        self.names.reply_queue_for(parent.saga_id),
                        false,
                        self.child_reply(st.id, parent, *kind, *attempt, outcome, now),
                    )?);
                }
            }
        }
        let (schedule, cancel) = store::timer_rows(&schedule, &cancel)?;
        Ok(Outgoing { outbox, schedule, cancel, slots })
    }

    /// The reply of child saga `child` to its parent's step: `outcome`, unless the child's data
    /// is too large for a reply queue to take (`max_body_bytes`). Then the reply says so in
    /// place of the data, a string the parent's `on_reply` cannot take as the child's data: the
    /// step fails with `invalid_reply` and the parent compensates it, undoing the child.
    fn child_reply(
        &self,
        child: SagaId,
        parent: &sagas::ParentLink,
        kind: sagas::CommandKind,
        attempt: u32,
        outcome: &sagas::ReplyOutcome,
        now: Timestamp,
    ) -> sagas::protocol::WireMessage {
        let msg = encode_child_reply(parent, kind, attempt, outcome, now);
        if msg.body.len() <= self.max_body {
            return msg;
        }
        let why = format!(
            "the data of child saga {child} is {} bytes, over the {} bytes a reply may carry (max_body_bytes)",
            msg.body.len(),
            self.max_body
        );
        tracing::error!(saga.id = %child, parent.id = %parent.saga_id, "{why}; the parent is told so in place of the data");
        encode_child_reply(parent, kind, attempt, &sagas::ReplyOutcome::Success { output: json!(why) }, now)
    }

    /// Hand what a committed decision wrote to this node's publisher, instead of waiting for a
    /// relay; what it cannot take stays in the outbox for the relays (woken by NOTIFY).
    async fn publish_written(&self, written: Vec<Claimed>) {
        if written.is_empty() {
            return;
        }
        if let Err(rows) = self.publisher.publish(written) {
            tracing::debug!(rows, "the rows were not handed to the publisher; the relays will publish them");
            if let Err(e) = store::notify_relays(&self.pool).await {
                tracing::warn!(error = %e, "cannot wake the relays; their poll will find the rows");
            }
        }
    }
}

/// A W3C trace context whose trace id is derived from the saga id, so one saga is one trace.
fn new_traceparent(id: SagaId) -> String {
    let trace = id.0.simple().to_string();
    let span = &MessageId::new_random().0.simple().to_string()[16..];
    format!("00-{trace}-{span}-01")
}
