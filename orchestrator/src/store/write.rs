//! How decisions are written: one statement per write, in one of three modes.
//!
//! - [`insert_new`] (a start): the instance is inserted with its first decision, or nothing is
//!   written when the saga id or the idempotency key is taken.
//! - [`write_guarded`] (a batch of replies or an event, no transaction around it): each
//!   decision is written only if its saga's row is still at the version it was read at, and,
//!   for inputs deduplicated by message id, only if that id was not recorded meanwhile. The
//!   sagas are locked in id order, so writers on several nodes never deadlock.
//! - [`write_locked`] (a timer, an operator action): the caller holds the saga's row lock.
//!
//! Each statement is a `WITH` of a gate, which says which sagas may be written (`ok`), and the
//! parts a write needs, each a named constant below that writes only the sagas in `ok`:
//! their states, history rows, outbox rows and timers. Every part costs PostgreSQL executor
//! work even with no rows, so a statement carries only the parts its decisions need. The
//! parameters are numbered the same in every statement: $1 the node, $2–$27 the decisions'
//! rows (bound by every mode, referenced or not), $28 on those of the mode's gate.

use sqlx::{AssertSqlSafe, PgExecutor};

use super::{DecisionRows, NewInstance};

/// Start: insert the instance; `ok` is the saga, or nothing when its id or key is taken.
const GATE_NEW: &str = "ins AS (
    INSERT INTO sagaflow.instances (id, definition, version, status, state, idempotency_key, traceparent, decided_by, finished_at)
    VALUES ($28, $29, $30, $31, $32::json, $33, $34, $1, CASE WHEN $35 THEN now() END)
    ON CONFLICT DO NOTHING RETURNING id
), ok AS (SELECT id FROM ins)";

/// Guarded: lock the sagas still at the version read (`cas`), in id order; `ok` is those.
const GATE_GUARDED: &str = "cas AS (
    SELECT i.id FROM sagaflow.instances i JOIN UNNEST($28::uuid[], $29::int8[]) AS g(id, v) ON i.id = g.id
    WHERE i.xmin::text::int8 = g.v ORDER BY i.id FOR UPDATE OF i
), ok AS (SELECT id FROM cas)";

/// Guarded, with message ids to record: `ok` is the sagas still at their version whose ids
/// were all recorded now (an id recorded meanwhile means another delivery was applied).
const GATE_GUARDED_MARKED: &str = "cas AS (
    SELECT i.id FROM sagaflow.instances i JOIN UNNEST($28::uuid[], $29::int8[]) AS g(id, v) ON i.id = g.id
    WHERE i.xmin::text::int8 = g.v ORDER BY i.id FOR UPDATE OF i
), marked AS (
    INSERT INTO sagaflow.inbox (message_id, saga_id)
    SELECT m, s FROM UNNEST($30::uuid[], $31::uuid[]) AS u(m, s) WHERE u.s IN (SELECT id FROM cas)
    ON CONFLICT DO NOTHING RETURNING message_id
), ok AS (
    SELECT c.id FROM cas c WHERE NOT EXISTS (
        SELECT 1 FROM UNNEST($30::uuid[], $31::uuid[]) AS u(m, s)
        WHERE u.s = c.id AND u.m NOT IN (SELECT message_id FROM marked))
)";

/// Locked: the caller holds the rows; `ok` is every saga decided on.
const GATE_LOCKED: &str = "ok AS (SELECT DISTINCT s AS id FROM UNNEST($6::uuid[]) AS x(s))";

/// The new states and statuses.
const UPDATE_STATES: &str = "upd AS (
    UPDATE sagaflow.instances i
    SET state = u.state::json, status = u.status, updated_at = now(), decided_by = $1,
        finished_at = CASE WHEN u.finished THEN COALESCE(i.finished_at, now()) END
    FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::bool[]) AS u(id, state, status, finished)
    WHERE i.id = u.id AND u.id IN (SELECT id FROM ok)
)";

/// One history row per decision.
const INSERT_HISTORY: &str = "h AS (
    INSERT INTO sagaflow.history (saga_id, node, input_kind, input, outcome, detail, status, effects, input_bytes, state_bytes)
    SELECT s, $1, k, i::json, o, d, st, e::json, ib, sb
    FROM UNNEST($6::uuid[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::int4[], $14::int4[])
         AS x(s, k, i, o, d, st, e, ib, sb)
    WHERE x.s IN (SELECT id FROM ok)
)";

/// The messages to publish.
const INSERT_OUTBOX: &str = "o AS (
    INSERT INTO sagaflow.outbox (saga_id, exchange, routing_key, mandatory, envelope, body)
    SELECT s, ex, k, m, env::json, b FROM UNNEST($15::uuid[], $16::text[], $17::text[], $18::bool[], $19::text[], $20::bytea[])
        AS x(s, ex, k, m, env, b) WHERE x.s IN (SELECT id FROM ok)
    RETURNING id
)";

/// Wake the relays when the outbox rows commit (for a writer that cannot publish them).
const WAKE_RELAYS: &str = "wake AS (SELECT pg_notify('sagaflow_outbox', '') WHERE $27 AND EXISTS (SELECT 1 FROM o))";

/// Timers cancelled.
const CANCEL_TIMERS: &str = "cancelled AS (
    DELETE FROM sagaflow.timers t USING UNNEST($21::uuid[], $22::text[]) AS c(s, k)
    WHERE t.saga_id = c.s AND t.key = c.k AND c.s IN (SELECT id FROM ok)
)";

/// Timers scheduled, or moved when they exist.
const SCHEDULE_TIMERS: &str = "scheduled AS (
    INSERT INTO sagaflow.timers (saga_id, key, timer, due_ms)
    SELECT s, k, t::json, d FROM UNNEST($23::uuid[], $24::text[], $25::text[], $26::int8[]) AS x(s, k, t, d)
    WHERE x.s IN (SELECT id FROM ok)
    ON CONFLICT (saga_id, key) DO UPDATE SET timer = EXCLUDED.timer, due_ms = EXCLUDED.due_ms
)";

/// The inbox's guard for [`write_guarded`]: each decision's saga is written only if its row is
/// still at the version it was read at (`xmin`: any other write of the row changes it), and
/// together with the ids of the messages that carried its input.
pub(crate) struct Guard {
    /// `(saga, row version)`, one per decision.
    pub(crate) versions: Vec<(uuid::Uuid, i64)>,
    /// `(message, saga)`: the ids to record in the inbox (inputs deduplicated by message id).
    pub(crate) marks: Vec<(uuid::Uuid, uuid::Uuid)>,
}

/// What [`write_guarded`] wrote.
#[derive(Default)]
pub(crate) struct Wrote {
    /// The outbox row ids, in the order of the decisions written and their rows.
    pub(crate) outbox: Vec<i64>,
    /// The sagas still at their version, locked by the write ...
    pub(crate) locked: Vec<uuid::Uuid>,
    /// ... and of those, the ones written (the others' message id was recorded meanwhile).
    pub(crate) written: Vec<uuid::Uuid>,
}

/// Start a saga: insert its instance with the decision that starts it (whose state it takes),
/// its history row, outbox rows and timers. Returns the outbox row ids, or `None` when the saga
/// id or the idempotency key is taken (nothing was written).
pub(crate) async fn insert_new<'c>(
    ex: impl PgExecutor<'c>,
    node: &str,
    decision: &DecisionRows,
    new: NewInstance<'_>,
    wake_relays: bool,
) -> Result<Option<Vec<i64>>, sqlx::Error> {
    let Some((state, status)) = &decision.applied else {
        return Err(sqlx::Error::Protocol("a new saga is written with the applied decision that starts it".into()));
    };
    let params = Params::of(&[decision], false);
    let sql = statement(GATE_NEW, &params, wake_relays, false);
    let version = i32::try_from(new.version).unwrap_or(i32::MAX);
    let (ok, outbox, ..): Row = params
        .bind(sqlx::query_as(AssertSqlSafe(sql)), node, wake_relays)
        .bind(decision.history.saga.0)
        .bind(new.definition)
        .bind(version)
        .bind(status.as_str())
        .bind(state.as_str())
        .bind(new.idempotency_key)
        .bind(new.traceparent)
        .bind(status.is_terminal())
        .fetch_one(ex)
        .await?;
    Ok(ok.then_some(outbox))
}

/// Write `decisions` of sagas read without a lock, each only as [`Guard`] allows.
pub(crate) async fn write_guarded<'c>(
    ex: impl PgExecutor<'c>,
    node: &str,
    decisions: &[&DecisionRows],
    guard: &Guard,
    wake_relays: bool,
) -> Result<Wrote, sqlx::Error> {
    let (gate, marked) = if guard.marks.is_empty() { (GATE_GUARDED, false) } else { (GATE_GUARDED_MARKED, true) };
    let params = Params::of(decisions, true);
    let sql = statement(gate, &params, wake_relays, true);
    let (g_saga, g_version): (Vec<uuid::Uuid>, Vec<i64>) = guard.versions.iter().copied().unzip();
    let query = params.bind(sqlx::query_as(AssertSqlSafe(sql)), node, wake_relays).bind(g_saga).bind(g_version);
    let query = if marked {
        let (m_message, m_saga): (Vec<uuid::Uuid>, Vec<uuid::Uuid>) = guard.marks.iter().copied().unzip();
        query.bind(m_message).bind(m_saga)
    } else {
        query
    };
    let (_, outbox, locked, written): Row = query.fetch_one(ex).await?;
    Ok(Wrote { outbox, locked, written })
}

/// Write `decisions` of sagas whose rows the caller holds locked. Returns the outbox row ids.
pub(crate) async fn write_locked<'c>(
    ex: impl PgExecutor<'c>,
    node: &str,
    decisions: &[&DecisionRows],
    wake_relays: bool,
) -> Result<Vec<i64>, sqlx::Error> {
    let params = Params::of(decisions, true);
    let sql = statement(GATE_LOCKED, &params, wake_relays, false);
    let (_, outbox, ..): Row = params.bind(sqlx::query_as(AssertSqlSafe(sql)), node, wake_relays).fetch_one(ex).await?;
    Ok(outbox)
}

/// What every statement returns: whether any saga was written, the outbox ids, and for a
/// guarded write the sagas locked and written.
type Row = (bool, Vec<i64>, Vec<uuid::Uuid>, Vec<uuid::Uuid>);

type Query<'q> = sqlx::query::QueryAs<'q, sqlx::Postgres, Row, sqlx::postgres::PgArguments>;

/// The statement of `gate` and the parts `params` needs.
fn statement(gate: &str, params: &Params<'_>, wake_relays: bool, guarded: bool) -> String {
    let mut parts = vec![gate];
    if !params.upd_ids.is_empty() {
        parts.push(UPDATE_STATES);
    }
    parts.push(INSERT_HISTORY);
    let outbox = !params.o_saga.is_empty();
    if outbox {
        parts.push(INSERT_OUTBOX);
        if wake_relays {
            parts.push(WAKE_RELAYS);
        }
    }
    if !params.c_saga.is_empty() {
        parts.push(CANCEL_TIMERS);
    }
    if !params.t_saga.is_empty() {
        parts.push(SCHEDULE_TIMERS);
    }
    let ids = if outbox { "COALESCE((SELECT array_agg(id ORDER BY id) FROM o), '{}')" } else { "'{}'::int8[]" };
    let sagas = if guarded {
        "COALESCE((SELECT array_agg(id) FROM cas), '{}'), COALESCE((SELECT array_agg(id) FROM ok), '{}')"
    } else {
        "'{}'::uuid[], '{}'::uuid[]"
    };
    // `wake` is not a write, so it runs only when the query reads it.
    let from = if outbox && wake_relays { " FROM (SELECT count(*) FROM wake) AS w" } else { "" };
    format!("WITH {} SELECT EXISTS (SELECT 1 FROM ok), {ids}, {sagas}{from}", parts.join(", "))
}

/// The arrays of a statement's parameters $2–$26, one entry per row to write.
#[derive(Default)]
struct Params<'a> {
    upd_ids: Vec<uuid::Uuid>,
    upd_states: Vec<&'a str>,
    upd_status: Vec<&'static str>,
    upd_finished: Vec<bool>,
    h_saga: Vec<uuid::Uuid>,
    h_kind: Vec<&'static str>,
    h_input: Vec<&'a str>,
    h_outcome: Vec<&'static str>,
    h_detail: Vec<Option<&'a str>>,
    h_status: Vec<&'static str>,
    h_effects: Vec<&'a str>,
    h_input_bytes: Vec<i32>,
    h_state_bytes: Vec<i32>,
    o_saga: Vec<uuid::Uuid>,
    o_exchange: Vec<&'a str>,
    o_key: Vec<&'a str>,
    o_mandatory: Vec<bool>,
    o_envelope: Vec<&'a str>,
    o_body: Vec<&'a [u8]>,
    c_saga: Vec<uuid::Uuid>,
    c_key: Vec<&'a str>,
    t_saga: Vec<uuid::Uuid>,
    t_key: Vec<&'a str>,
    t_timer: Vec<&'a str>,
    t_due: Vec<i64>,
}

impl<'a> Params<'a> {
    /// The rows of `decisions`; with `update`, their applied states are updates (else the one
    /// decision's state is the new instance's).
    fn of(decisions: &[&'a DecisionRows], update: bool) -> Self {
        let mut p = Self::default();
        for d in decisions {
            let h = &d.history;
            if let (Some((state, status)), true) = (&d.applied, update) {
                p.upd_ids.push(h.saga.0);
                p.upd_states.push(state);
                p.upd_status.push(status.as_str());
                p.upd_finished.push(status.is_terminal());
            }
            p.h_saga.push(h.saga.0);
            p.h_kind.push(h.input_kind);
            p.h_input.push(&h.input);
            p.h_outcome.push(h.outcome);
            p.h_detail.push(h.detail.as_deref());
            p.h_status.push(h.status);
            p.h_effects.push(&h.effects);
            p.h_input_bytes.push(i32::try_from(h.input.len()).unwrap_or(i32::MAX));
            p.h_state_bytes.push(i32::try_from(h.state_bytes).unwrap_or(i32::MAX));
            for r in &d.outbox {
                p.o_saga.push(h.saga.0);
                p.o_exchange.push(&r.exchange);
                p.o_key.push(&r.routing_key);
                p.o_mandatory.push(r.mandatory);
                p.o_envelope.push(&r.envelope);
                p.o_body.push(&r.msg.body);
            }
            for t in &d.cancel {
                p.c_saga.push(h.saga.0);
                p.c_key.push(t);
            }
            for t in &d.schedule {
                p.t_saga.push(h.saga.0);
                p.t_key.push(&t.key);
                p.t_timer.push(&t.timer);
                p.t_due.push(t.due_ms);
            }
        }
        p
    }

    /// Bind $1–$27.
    fn bind(self, query: Query<'a>, node: &'a str, wake_relays: bool) -> Query<'a> {
        query
            .bind(node)
            .bind(self.upd_ids)
            .bind(self.upd_states)
            .bind(self.upd_status)
            .bind(self.upd_finished)
            .bind(self.h_saga)
            .bind(self.h_kind)
            .bind(self.h_input)
            .bind(self.h_outcome)
            .bind(self.h_detail)
            .bind(self.h_status)
            .bind(self.h_effects)
            .bind(self.h_input_bytes)
            .bind(self.h_state_bytes)
            .bind(self.o_saga)
            .bind(self.o_exchange)
            .bind(self.o_key)
            .bind(self.o_mandatory)
            .bind(self.o_envelope)
            .bind(self.o_body)
            .bind(self.c_saga)
            .bind(self.c_key)
            .bind(self.t_saga)
            .bind(self.t_key)
            .bind(self.t_timer)
            .bind(self.t_due)
            .bind(wake_relays)
    }
}
