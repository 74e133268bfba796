//! One transaction per input: inbox dedupe → lock the instance → `sagas::decide` → state +
//! history + outbox + timers → commit. The caller acks the message after this returns.

use std::sync::Arc;

use participants_sdk::transport::Names;
use sagas::protocol::{LifecycleEvent, SagaRef, StartRequest, encode_command, encode_lifecycle};
use sagas::{Definition, Effect, Input, InputOutcome, MessageId, Registry, SagaId, SagaState, SagaStatus, Timestamp, decide};
use serde_json::{Value, json};
use sqlx::PgPool;
use tracing::Instrument as _;

use crate::metrics::Metrics;
use crate::publisher::Publisher;
use crate::store::{self, Claimed, HistoryRow, OutboxRow};

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
    /// The database failed; the request can be retried.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl StartError {
    /// The stable code (dead-letter reason, API error code).
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownDefinition { .. } => "unknown_definition",
            Self::InvalidInput { .. } => "invalid_input",
            Self::Database(_) => "unavailable",
        }
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

/// Applies inputs to sagas. Shared by the consumers, the timers, the relay and the client.
#[derive(Clone)]
pub struct Engine {
    pub(crate) pool: PgPool,
    registry: Arc<Registry>,
    names: Names,
    node: Arc<str>,
    metrics: Metrics,
    pub(crate) publisher: Publisher,
    step_events: bool,
}

impl Engine {
    pub(crate) fn new(pool: PgPool, registry: Arc<Registry>, names: Names, node: &str, step_events: bool) -> Self {
        let (publisher, unroutable) = Publisher::new(pool.clone());
        let engine = Self { pool, registry, names, node: node.into(), metrics: Metrics::new(), publisher, step_events };
        tokio::spawn(crate::publisher::report_loop(engine.clone(), unroutable));
        engine
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
        let def = match req.version {
            Some(v) => self.registry.get(&req.definition, v),
            None => self.registry.latest(&req.definition),
        }
        .ok_or_else(|| StartError::UnknownDefinition { definition: req.definition.clone(), version: req.version })?;
        def.check_input(&req.input).map_err(|reason| StartError::InvalidInput { definition: def.name.clone(), reason })?;
        let id = req.saga_id.unwrap_or_default();
        let state = SagaState::new(def, id, req.input.clone(), Timestamp::now());
        let traceparent = traceparent.map_or_else(|| new_traceparent(id), str::to_owned);
        let mut tx = self.pool.begin().await?;
        if let Err(existing) = store::insert_instance(&mut tx, &state, req.idempotency_key.as_deref(), &traceparent, &self.node).await? {
            tx.rollback().await?;
            return Ok(Started { saga_id: existing, created: false });
        }
        let mut written = Vec::new();
        let start = json!({"type": "start", "input": req.input});
        self.decide_and_write(&mut tx, def, &state, Some(&traceparent), &Input::Start, start, &mut written).await?;
        tx.commit().await?;
        tracing::info!(saga.id = %id, saga.name = %def.name, "saga started");
        self.publish_written(written).await;
        Ok(Started { saga_id: id, created: true })
    }

    /// Apply `input` to saga `id`. `inbox` is the id of the message that carried it, for dedupe.
    pub async fn apply(&self, id: SagaId, input: &Input, inbox: Option<MessageId>) -> Result<Handled, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let locked = match inbox {
            Some(m) => match store::lock_marking(&mut tx, id, m.0).await? {
                store::Marked::Fresh(l) => Some(*l),
                store::Marked::Duplicate => {
                    tx.rollback().await?;
                    return Ok(Handled::Duplicate);
                }
                store::Marked::Missing => None,
            },
            None => store::lock(&mut tx, id, false).await?,
        };
        let Some(locked) = locked else {
            tx.rollback().await?;
            return Ok(Handled::UnknownSaga);
        };
        let mut written = Vec::new();
        let handled = self.decide_locked(&mut tx, locked, input, &mut written).await?;
        if matches!(handled, Handled::UnknownVersion { .. } | Handled::Invalid { .. }) {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
            self.publish_written(written).await;
        }
        Ok(handled)
    }

    /// Fire timer `key` of saga `id` if it is still there and no other node holds the saga.
    pub(crate) async fn fire_timer(&self, id: SagaId, key: &str) -> Result<Handled, sqlx::Error> {
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
        let mut written = Vec::new();
        let handled = self.decide_locked(&mut tx, locked, &Input::Timer(timer), &mut written).await?;
        if matches!(handled, Handled::UnknownVersion { .. }) {
            tx.rollback().await?;
            // Not due again for a while: a node that has the version may fire it meanwhile, and
            // this node neither re-reads it every poll nor lets such timers crowd out the others.
            let later = Timestamp::now().plus_ms(UNKNOWN_VERSION_TIMER_DELAY_MS);
            store::postpone_timer(&self.pool, id, key, later).await?;
        } else {
            tx.commit().await?;
            self.publish_written(written).await;
        }
        Ok(handled)
    }

    async fn decide_locked(
        &self,
        tx: &mut sqlx::PgConnection,
        locked: store::Locked,
        input: &Input,
        written: &mut Vec<Claimed>,
    ) -> Result<Handled, sqlx::Error> {
        let st = &locked.state;
        let Some(def) = self.registry.get(&st.definition, st.version) else {
            tracing::error!(
                saga.id = %st.id, saga.name = %st.definition, version = st.version,
                "this node does not know the saga's definition version; leaving the saga untouched until a node that does handles it"
            );
            return Ok(Handled::UnknownVersion { definition: st.definition.clone(), version: st.version });
        };
        if let Input::Reply(r) = input
            && def.step(r.step).is_none()
        {
            let detail = format!("`{}` version {} has no step {}", def.name, def.version, r.step.0);
            return Ok(Handled::Invalid { code: "unknown_step", detail });
        }
        let input_json = serde_json::to_value(input).unwrap_or(Value::Null);
        self.decide_and_write(tx, def, st, locked.traceparent.as_deref(), input, input_json, written).await
    }

    #[allow(clippy::too_many_arguments)] // the pieces of one decision, passed down once
    async fn decide_and_write(
        &self,
        tx: &mut sqlx::PgConnection,
        def: &Definition,
        st: &SagaState,
        traceparent: Option<&str>,
        input: &Input,
        input_json: Value,
        written: &mut Vec<Claimed>,
    ) -> Result<Handled, sqlx::Error> {
        let trace_id = traceparent.and_then(|t| t.split('-').nth(1)).unwrap_or("");
        let span = tracing::info_span!("decide", saga.id = %st.id, saga.name = %def.name, input = input.kind(), trace.id = trace_id, node = %self.node);
        async move {
            let now = Timestamp::now();
            let t = match decide(def, st, input, now) {
                Ok(t) => t,
                Err(e) => {
                    // Only an invariant break gets here (the state names another definition).
                    tracing::error!(saga.id = %st.id, error = %e, "decide refused the input");
                    return Ok(Handled::UnknownVersion { definition: st.definition.clone(), version: st.version });
                }
            };
            let (outcome, detail) = match &t.outcome {
                InputOutcome::Applied => ("applied", None),
                InputOutcome::Ignored { reason, detail } => (reason.as_str(), Some(detail.clone())),
                InputOutcome::Refused { reason } => ("refused", Some(reason.clone())),
            };
            let status = t.state.status;
            let applied = t.outcome == InputOutcome::Applied;
            let state_json = serde_json::to_value(&t.state).unwrap_or(Value::Null);
            let state_bytes = state_json.to_string().len();
            let (rows, schedule, cancel) = if applied { self.effects(def, &t.state, traceparent, &t.effects, now) } else { Default::default() };
            let history = HistoryRow {
                saga: st.id,
                node: &self.node,
                input_kind: input.kind(),
                input: input_json,
                outcome,
                detail: detail.clone(),
                status: status.as_str(),
                effects: serde_json::to_value(&t.effects).unwrap_or(Value::Null),
                state_bytes,
            };
            let ids = store::write_decision(tx, applied.then_some((&state_json, status.as_str())), history, &rows).await?;
            if !schedule.is_empty() || !cancel.is_empty() {
                store::set_timers(tx, st.id, &schedule, &cancel).await?;
            }
            written.extend(ids.into_iter().zip(rows).map(|(id, r)| Claimed {
                id,
                saga: st.id,
                exchange: r.exchange,
                routing_key: r.routing_key,
                mandatory: r.mandatory,
                msg: r.msg,
            }));
            if applied {
                self.metrics.record(def, input, &t.state, &t.effects, now.0);
                if status.is_settled() {
                    tracing::info!(saga.id = %st.id, saga.name = %def.name, status = status.as_str(), "saga settled");
                }
            } else {
                tracing::info!(saga.id = %st.id, input = input.kind(), outcome, detail = detail.as_deref().unwrap_or(""), "input did not apply");
            }
            Ok(Handled::Decided { outcome: t.outcome, status })
        }
        .instrument(span)
        .await
    }

    /// The outbox rows and timer changes of `effects` (no IO).
    fn effects(
        &self,
        def: &Definition,
        st: &SagaState,
        traceparent: Option<&str>,
        effects: &[Effect],
        now: Timestamp,
    ) -> (Vec<OutboxRow>, Vec<(sagas::TimerKey, Timestamp)>, Vec<sagas::TimerKey>) {
        let saga = SagaRef { saga_id: st.id, definition: def.name.clone(), version: def.version };
        let reply_to = self.names.replies_queue();
        let mut outbox = Vec::new();
        let (mut schedule, mut cancel) = (Vec::new(), Vec::new());
        for e in effects {
            match e {
                Effect::Send(cmd) => outbox.push(OutboxRow {
                    exchange: self.names.commands_exchange(),
                    routing_key: cmd.participant.clone(),
                    mandatory: true,
                    msg: encode_command(&saga, cmd, &reply_to, traceparent, now),
                }),
                Effect::Schedule { key, due } => schedule.push((key.clone(), *due)),
                Effect::Cancel { key } => cancel.push(key.clone()),
                Effect::Emit(ev) if !self.step_events && ev.is_step_level() => {}
                Effect::Emit(ev) => {
                    let ev =
                        LifecycleEvent { saga_id: st.id, definition: def.name.clone(), version: def.version, at: now, event: ev.clone() };
                    outbox.push(OutboxRow {
                        exchange: self.names.events_exchange(),
                        routing_key: format!("{}.{}", def.name, ev.event.name()),
                        mandatory: false,
                        msg: encode_lifecycle(&ev, MessageId::new_random()),
                    });
                }
            }
        }
        (outbox, schedule, cancel)
    }

    /// Publish what a committed decision wrote, now, instead of waiting for a relay; what
    /// cannot be published now stays in the outbox for the relays (woken by NOTIFY).
    async fn publish_written(&self, written: Vec<Claimed>) {
        if written.is_empty() {
            return;
        }
        if let Err(rows) = self.publisher.publish(written).await {
            tracing::debug!(rows, "publishing after the commit failed; the relays will");
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
