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
//! parameters are numbered the same in every statement: $1 the node, $2–$34 the decisions'
//! rows (bound by every mode, referenced or not), $35 on those of the mode's gate, then (starts
//! with search keys only) $43–$45 the keys.

use sqlx::{AssertSqlSafe, PgExecutor};

use super::{DecisionRows, NewInstance};

/// Starts: insert the instances; `ok` is the sagas inserted (not those whose id or idempotency
/// key is taken, by an earlier saga or an earlier start of the same statement).
const GATE_NEW: &str = "ins AS (
    INSERT INTO sagaflow.instances (id, definition, version, status, state, idempotency_key, traceparent, decided_by, finished_at)
    SELECT id, d, v, st, state::json, k, t, $1, CASE WHEN f THEN now() END
    FROM UNNEST($35::uuid[], $36::text[], $37::int4[], $38::text[], $39::text[], $40::text[], $41::text[], $42::bool[])
        AS n(id, d, v, st, state, k, t, f)
    ON CONFLICT DO NOTHING RETURNING id, xmin::text::int8 AS v
), ok AS (SELECT id FROM ins)";

/// Starts' search keys, for the sagas inserted.
const INSERT_SEARCH_KEYS: &str = "sk AS (
    INSERT INTO sagaflow.search_keys (saga_id, key, value)
    SELECT s, k, v FROM UNNEST($43::uuid[], $44::text[], $45::text[]) AS x(s, k, v) WHERE x.s IN (SELECT id FROM ok)
)";

/// Guarded: lock the sagas still at the version read (`cas`), in id order; `ok` is those.
const GATE_GUARDED: &str = "cas AS (
    SELECT i.id FROM sagaflow.instances i JOIN UNNEST($35::uuid[], $36::int8[]) AS g(id, v) ON i.id = g.id
    WHERE i.xmin::text::int8 = g.v ORDER BY i.id FOR UPDATE OF i
), ok AS (SELECT id FROM cas)";

/// Guarded, with message ids to record: `ok` is the sagas still at their version whose ids
/// were all recorded now (an id recorded meanwhile means another delivery was applied).
const GATE_GUARDED_MARKED: &str = "cas AS (
    SELECT i.id FROM sagaflow.instances i JOIN UNNEST($35::uuid[], $36::int8[]) AS g(id, v) ON i.id = g.id
    WHERE i.xmin::text::int8 = g.v ORDER BY i.id FOR UPDATE OF i
), marked AS (
    INSERT INTO sagaflow.inbox (message_id, saga_id)
    SELECT m, s FROM UNNEST($37::uuid[], $38::uuid[]) AS u(m, s) WHERE u.s IN (SELECT id FROM cas)
    ON CONFLICT DO NOTHING RETURNING message_id
), ok AS (
    SELECT c.id FROM cas c WHERE NOT EXISTS (
        SELECT 1 FROM UNNEST($37::uuid[], $38::uuid[]) AS u(m, s)
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
    RETURNING i.xmin::text::int8 AS v
)";

/// One history row per decision, except on a heartbeat: the state keeps the last one, and a
/// long step's heartbeats would bury its history (see [`super::HistoryRow::recorded`]).
const INSERT_HISTORY: &str = "h AS (
    INSERT INTO sagaflow.history (saga_id, node, input_kind, input, outcome, detail, status, effects, input_bytes, state_bytes)
    SELECT s, $1, k, i::json, o, d, st, e::json, ib, sb
    FROM UNNEST($6::uuid[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::int4[], $14::int4[])
         AS x(s, k, i, o, d, st, e, ib, sb)
    WHERE x.s IN (SELECT id FROM ok) AND x.k <> 'heartbeat'
)";

/// The messages to publish.
const INSERT_OUTBOX: &str = "o AS (
    INSERT INTO sagaflow.outbox (saga_id, exchange, routing_key, mandatory, envelope, body)
    SELECT s, ex, k, m, env::json, b FROM UNNEST($15::uuid[], $16::text[], $17::text[], $18::bool[], $19::text[], $20::bytea[])
        AS x(s, ex, k, m, env, b) WHERE x.s IN (SELECT id FROM ok)
    RETURNING id
)";

/// Steps queued for a slot of a shared resource (see `store::slots`); a step already queued
/// stays where it is.
const ACQUIRE_SLOTS: &str = "acquired AS (
    INSERT INTO sagaflow.slot_waiters (saga_id, step, resource, capacity, priority)
    SELECT s, st, r, c, p FROM UNNEST($28::uuid[], $29::int4[], $30::text[], $31::int4[], $32::int4[]) AS x(s, st, r, c, p)
    WHERE x.s IN (SELECT id FROM ok)
    ON CONFLICT (saga_id, step) DO NOTHING
)";

/// Slots given back, and places in a queue given up: the step's row goes, whichever it is.
const RELEASE_SLOTS: &str = "released_waiting AS (
    DELETE FROM sagaflow.slot_waiters w USING UNNEST($33::uuid[], $34::int4[]) AS x(s, st)
    WHERE w.saga_id = x.s AND w.step = x.st AND x.s IN (SELECT id FROM ok)
), released_held AS (
    DELETE FROM sagaflow.slot_holders h USING UNNEST($33::uuid[], $34::int4[]) AS x(s, st)
    WHERE h.saga_id = x.s AND h.step = x.st AND x.s IN (SELECT id FROM ok)
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

/// What [`write_guarded`] or [`insert_new`] wrote.
#[derive(Default)]
pub(crate) struct Wrote {
    /// The outbox row ids, in the order of the decisions written and their rows.
    pub(crate) outbox: Vec<i64>,
    /// The sagas still at their version, locked by a guarded write ...
    pub(crate) locked: Vec<uuid::Uuid>,
    /// ... and of those, the ones written (the others' message id was recorded meanwhile);
    /// for starts, the sagas created.
    pub(crate) written: Vec<uuid::Uuid>,
    /// The row version (`xmin`) of the instances it inserted or updated: the statement's
    /// transaction id, the same for each. `None` when it changed no instance.
    pub(crate) version: Option<i64>,
}

/// Start sagas: insert each instance with the decision that starts it (whose state it takes),
/// its history row, outbox rows and timers, all in one statement. A start whose saga id or
/// idempotency key is taken writes nothing. Returns the sagas created, and the outbox row ids
/// of their decisions in order.
pub(crate) async fn insert_new<'c>(
    ex: impl PgExecutor<'c>,
    node: &str,
    starts: &[(&DecisionRows, &NewInstance)],
    wake_relays: bool,
) -> Result<Wrote, sqlx::Error> {
    let n = starts.len();
    let (mut ids, mut defs, mut versions, mut statuses) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut states, mut keys, mut traces, mut finished) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for (d, new) in starts {
        let Some((state, status)) = &d.applied else {
            return Err(sqlx::Error::Protocol("a new saga is written with the applied decision that starts it".into()));
        };
        ids.push(d.history.saga.0);
        defs.push(new.definition.as_str());
        versions.push(i32::try_from(new.version).unwrap_or(i32::MAX));
        statuses.push(status.as_str());
        states.push(state.as_str());
        keys.push(new.idempotency_key.as_deref());
        traces.push(new.traceparent.as_str());
        finished.push(status.is_terminal());
    }
    let decisions: Vec<&DecisionRows> = starts.iter().map(|(d, _)| *d).collect();
    let params = Params::of(&decisions, false);
    let (mut sk_saga, mut sk_key, mut sk_value) = (Vec::new(), Vec::new(), Vec::new());
    for (d, new) in starts {
        for (k, v) in &new.search_keys {
            sk_saga.push(d.history.saga.0);
            sk_key.push(k.as_str());
            sk_value.push(v.as_str());
        }
    }
    // Only starts of definitions with search keys pay for the part that writes them.
    let extra: &[&str] = if sk_saga.is_empty() { &[] } else { &[INSERT_SEARCH_KEYS] };
    let sql = statement(GATE_NEW, extra, &params, wake_relays, true);
    let query = params
        .bind(sqlx::query_as(AssertSqlSafe(sql)), node, wake_relays)
        .bind(ids)
        .bind(defs)
        .bind(versions)
        .bind(statuses)
        .bind(states)
        .bind(keys)
        .bind(traces)
        .bind(finished);
    let query = if sk_saga.is_empty() { query } else { query.bind(sk_saga).bind(sk_key).bind(sk_value) };
    let (outbox, _, created, version): Row = query.fetch_one(ex).await?;
    Ok(Wrote { outbox, locked: Vec::new(), written: created, version })
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
    let sql = statement(gate, &[], &params, wake_relays, true);
    let (g_saga, g_version): (Vec<uuid::Uuid>, Vec<i64>) = guard.versions.iter().copied().unzip();
    let query = params.bind(sqlx::query_as(AssertSqlSafe(sql)), node, wake_relays).bind(g_saga).bind(g_version);
    let query = if marked {
        let (m_message, m_saga): (Vec<uuid::Uuid>, Vec<uuid::Uuid>) = guard.marks.iter().copied().unzip();
        query.bind(m_message).bind(m_saga)
    } else {
        query
    };
    let (outbox, locked, written, version): Row = query.fetch_one(ex).await?;
    Ok(Wrote { outbox, locked, written, version })
}

/// Write `decisions` of sagas whose rows the caller holds locked. Returns the outbox row ids.
pub(crate) async fn write_locked<'c>(
    ex: impl PgExecutor<'c>,
    node: &str,
    decisions: &[&DecisionRows],
    wake_relays: bool,
) -> Result<Vec<i64>, sqlx::Error> {
    let params = Params::of(decisions, true);
    let sql = statement(GATE_LOCKED, &[], &params, wake_relays, false);
    let (outbox, ..): Row = params.bind(sqlx::query_as(AssertSqlSafe(sql)), node, wake_relays).fetch_one(ex).await?;
    Ok(outbox)
}

/// What every statement returns: the outbox ids, (see [`statement`]) the sagas locked and
/// written, and the version of the instances it wrote.
type Row = (Vec<i64>, Vec<uuid::Uuid>, Vec<uuid::Uuid>, Option<i64>);

type Query<'q> = sqlx::query::QueryAs<'q, sqlx::Postgres, Row, sqlx::postgres::PgArguments>;

/// The statement of `gate`, the `extra` parts after it, and the parts `params` needs; with
/// `written`, it returns which sagas were locked (a guarded gate) and written; it always
/// returns the version of the instances it inserted or updated.
fn statement(gate: &str, extra: &[&str], params: &Params<'_>, wake_relays: bool, written: bool) -> String {
    let mut parts = vec![gate];
    parts.extend_from_slice(extra);
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
    if !params.w_saga.is_empty() {
        parts.push(ACQUIRE_SLOTS);
    }
    if !params.r_saga.is_empty() {
        parts.push(RELEASE_SLOTS);
    }
    let ids = if outbox { "COALESCE((SELECT array_agg(id ORDER BY id) FROM o), '{}')" } else { "'{}'::int8[]" };
    let locked = if gate == GATE_NEW { "'{}'::uuid[]" } else { "COALESCE((SELECT array_agg(id) FROM cas), '{}')" };
    let sagas = if written {
        format!("{locked}, COALESCE((SELECT array_agg(id) FROM ok), '{{}}')")
    } else {
        "'{}'::uuid[], '{}'::uuid[]".to_owned()
    };
    let version = match (gate == GATE_NEW, params.upd_ids.is_empty()) {
        (true, _) => "(SELECT max(v) FROM ins)",
        (false, false) => "(SELECT max(v) FROM upd)",
        (false, true) => "NULL::int8",
    };
    // `wake` is not a write, so it runs only when the query reads it.
    let from = if outbox && wake_relays { " FROM (SELECT count(*) FROM wake) AS w" } else { "" };
    format!("WITH {} SELECT {ids}, {sagas}, {version}{from}", parts.join(", "))
}

/// The arrays of a statement's parameters $2–$26 and $28–$34, one entry per row to write.
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
    w_saga: Vec<uuid::Uuid>,
    w_step: Vec<i32>,
    w_resource: Vec<&'a str>,
    w_capacity: Vec<i32>,
    w_priority: Vec<i32>,
    r_saga: Vec<uuid::Uuid>,
    r_step: Vec<i32>,
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
            for a in &d.slots.acquire {
                p.w_saga.push(h.saga.0);
                p.w_step.push(a.step);
                p.w_resource.push(&a.resource);
                p.w_capacity.push(a.capacity);
                p.w_priority.push(a.priority);
            }
            for (step, _) in &d.slots.release {
                p.r_saga.push(h.saga.0);
                p.r_step.push(*step);
            }
        }
        p
    }

    /// Bind $1–$34.
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
            .bind(self.w_saga)
            .bind(self.w_step)
            .bind(self.w_resource)
            .bind(self.w_capacity)
            .bind(self.w_priority)
            .bind(self.r_saga)
            .bind(self.r_step)
    }
}

#[cfg(test)]
mod tests {
    //! Each write mode against PostgreSQL (`SAGAFLOW_TEST_DATABASE_URL`, else the local
    //! default), on a database of its own: the races each mode must lose or win.

    use sagaflow_amqp::pg::ScratchDatabase;
    use sagas::protocol::WireMessage;
    use sagas::{SagaId, SagaStatus, StepIndex, TimerKey, Timestamp};
    use sqlx::PgPool;

    use super::*;
    use crate::store::{self, HistoryRow, OutboxRow};

    /// A fresh database with the orchestrator's tables.
    async fn database() -> (PgPool, ScratchDatabase) {
        let db = ScratchDatabase::create("sagaflow_store").await.expect("PostgreSQL for the store's tests");
        let pool = PgPool::connect(db.url()).await.unwrap();
        store::migrate(&pool).await.unwrap();
        (pool, db)
    }

    async fn drop_database(pool: PgPool, db: ScratchDatabase) {
        pool.close().await;
        db.drop().await.unwrap();
    }

    /// A decision of saga `saga` that sets its state to `{"n": n}` and sends one message.
    fn decision(saga: SagaId, n: u32, status: SagaStatus) -> DecisionRows {
        let msg = WireMessage { message_id: Some(format!("m-{n}")), body: b"{}".to_vec(), ..WireMessage::default() };
        DecisionRows {
            applied: Some((format!("{{\"n\": {n}}}"), status)),
            history: HistoryRow {
                saga,
                input_kind: "reply",
                input: "{}".into(),
                outcome: "applied",
                detail: None,
                status: status.as_str(),
                effects: "[]".into(),
                state_bytes: 8,
            },
            outbox: vec![OutboxRow::new("x".into(), "k".into(), false, msg).unwrap()],
            schedule: Vec::new(),
            cancel: Vec::new(),
            slots: Default::default(),
        }
    }

    fn new_instance(key: Option<&str>) -> NewInstance {
        NewInstance {
            definition: "d".into(),
            version: 1,
            idempotency_key: key.map(str::to_owned),
            traceparent: "t".into(),
            search_keys: Vec::new(),
        }
    }

    async fn count(pool: &PgPool, sql: &str, saga: SagaId) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(sql.to_owned())).bind(saga.0).fetch_one(pool).await.unwrap()
    }

    /// The row version a read finds (what `read_batch` returns with each saga).
    async fn version(pool: &PgPool, saga: SagaId) -> i64 {
        sqlx::query_scalar("SELECT xmin::text::int8 FROM sagaflow.instances WHERE id = $1").bind(saga.0).fetch_one(pool).await.unwrap()
    }

    #[tokio::test]
    async fn starts_in_one_statement_skip_a_taken_id_or_key_and_write_the_others() {
        let (pool, db) = database().await;
        let (taken_id, keyed) = (SagaId::new(), SagaId::new());
        let first = [
            (decision(taken_id, 0, SagaStatus::Running), new_instance(None)),
            (decision(keyed, 0, SagaStatus::Running), new_instance(Some("k"))),
        ];
        let starts: Vec<_> = first.iter().map(|(d, n)| (d, n)).collect();
        let wrote = insert_new(&pool, "n1", &starts, false).await.unwrap();
        assert_eq!(wrote.written.len(), 2);
        assert_eq!(wrote.outbox.len(), 2, "one outbox row each");
        assert_eq!(wrote.version, Some(version(&pool, keyed).await), "the version the instances were inserted at");

        // Again: the id is taken, the key is taken (by another id), and two new starts share a key.
        let (fresh, twin_a, twin_b, other_key) = (SagaId::new(), SagaId::new(), SagaId::new(), SagaId::new());
        let second = [
            (decision(taken_id, 1, SagaStatus::Running), new_instance(None)),
            (decision(other_key, 1, SagaStatus::Running), new_instance(Some("k"))),
            (decision(fresh, 1, SagaStatus::Completed), new_instance(None)),
            (decision(twin_a, 1, SagaStatus::Running), new_instance(Some("twin"))),
            (decision(twin_b, 1, SagaStatus::Running), new_instance(Some("twin"))),
        ];
        let starts: Vec<_> = second.iter().map(|(d, n)| (d, n)).collect();
        let wrote = insert_new(&pool, "n1", &starts, false).await.unwrap();
        let mut created = wrote.written.clone();
        created.sort_unstable();
        let mut want = vec![fresh.0, twin_a.0];
        want.sort_unstable();
        assert_eq!(created, want, "only the starts whose id and key were free, the first of a shared key");
        assert_eq!(wrote.outbox.len(), 2, "outbox rows of the created sagas only");
        for (saga, history) in [(taken_id, 1), (keyed, 1), (other_key, 0), (fresh, 1), (twin_a, 1), (twin_b, 0)] {
            assert_eq!(count(&pool, "SELECT count(*) FROM sagaflow.history WHERE saga_id = $1", saga).await, history, "{saga}");
            assert_eq!(count(&pool, "SELECT count(*) FROM sagaflow.outbox WHERE saga_id = $1", saga).await, history, "{saga}");
        }
        let state: String =
            sqlx::query_scalar("SELECT state::text FROM sagaflow.instances WHERE id = $1").bind(taken_id.0).fetch_one(&pool).await.unwrap();
        assert_eq!(state, "{\"n\": 0}", "a taken id keeps its saga as it was");
        assert_eq!(
            count(&pool, "SELECT count(*) FROM sagaflow.instances WHERE id = $1 AND finished_at IS NOT NULL", fresh).await,
            1,
            "a saga that ends at its start is finished"
        );
        drop_database(pool, db).await;
    }

    #[tokio::test]
    async fn a_guarded_write_loses_to_a_changed_row_and_to_a_recorded_message() {
        let (pool, db) = database().await;
        let saga = SagaId::new();
        let d0 = decision(saga, 0, SagaStatus::Running);
        insert_new(&pool, "n1", &[(&d0, &new_instance(None))], false).await.unwrap();

        // Compare lost: another writer changed the row after it was read.
        let read = version(&pool, saga).await;
        sqlx::query("UPDATE sagaflow.instances SET decided_by = 'n2' WHERE id = $1").bind(saga.0).execute(&pool).await.unwrap();
        let d1 = decision(saga, 1, SagaStatus::Running);
        let guard = Guard { versions: vec![(saga.0, read)], marks: Vec::new() };
        let wrote = write_guarded(&pool, "n1", &[&d1], &guard, false).await.unwrap();
        assert!(wrote.locked.is_empty() && wrote.written.is_empty() && wrote.outbox.is_empty() && wrote.version.is_none());
        assert_eq!(count(&pool, "SELECT count(*) FROM sagaflow.history WHERE saga_id = $1", saga).await, 1, "nothing written");

        // Duplicate input: its message id was recorded meanwhile.
        let (message, read) = (uuid::Uuid::now_v7(), version(&pool, saga).await);
        sqlx::query("INSERT INTO sagaflow.inbox (message_id, saga_id) VALUES ($1, $2)")
            .bind(message)
            .bind(saga.0)
            .execute(&pool)
            .await
            .unwrap();
        let guard = Guard { versions: vec![(saga.0, read)], marks: vec![(message, saga.0)] };
        let wrote = write_guarded(&pool, "n1", &[&d1], &guard, false).await.unwrap();
        assert_eq!((wrote.locked, wrote.written), (vec![saga.0], Vec::new()), "locked, not written");
        assert_eq!(count(&pool, "SELECT count(*) FROM sagaflow.history WHERE saga_id = $1", saga).await, 1);

        // Still as read, a new message id: written, and the id recorded.
        let fresh = uuid::Uuid::now_v7();
        let guard = Guard { versions: vec![(saga.0, read)], marks: vec![(fresh, saga.0)] };
        let wrote = write_guarded(&pool, "n1", &[&d1], &guard, false).await.unwrap();
        assert_eq!(wrote.written, vec![saga.0]);
        assert_eq!(wrote.outbox.len(), 1);
        assert_eq!(wrote.version, Some(version(&pool, saga).await), "the version the write left the row at");
        assert_eq!(count(&pool, "SELECT count(*) FROM sagaflow.history WHERE saga_id = $1", saga).await, 2);
        assert_eq!(count(&pool, "SELECT count(*) FROM sagaflow.inbox WHERE saga_id = $1", saga).await, 2);
        assert_ne!(version(&pool, saga).await, read, "the write changed the row's version");
        drop_database(pool, db).await;
    }

    #[tokio::test]
    async fn a_locked_write_moves_a_timer_scheduled_and_cancelled_together() {
        let (pool, db) = database().await;
        let saga = SagaId::new();
        let (moved, gone) = (TimerKey::WaitDeadline { step: StepIndex(0) }, TimerKey::WaitDeadline { step: StepIndex(1) });
        let mut d0 = decision(saga, 0, SagaStatus::Running);
        (d0.schedule, d0.cancel) = store::timer_rows(&[(moved.clone(), Timestamp(10)), (gone.clone(), Timestamp(20))], &[]).unwrap();
        insert_new(&pool, "n1", &[(&d0, &new_instance(None))], false).await.unwrap();
        assert_eq!(count(&pool, "SELECT count(*) FROM sagaflow.timers WHERE saga_id = $1", saga).await, 2);

        // One decision cancels both and schedules one of them again, later.
        let mut d1 = decision(saga, 1, SagaStatus::Running);
        (d1.schedule, d1.cancel) = store::timer_rows(&[(moved.clone(), Timestamp(30))], &[moved.clone(), gone.clone()]).unwrap();
        assert_eq!(d1.cancel, vec![gone.id()], "a timer both cancelled and scheduled is moved, not deleted");
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM sagaflow.instances WHERE id = $1 FOR UPDATE").bind(saga.0).fetch_one(&mut *tx).await.unwrap();
        let outbox = write_locked(&mut *tx, "n1", &[&d1], false).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(outbox.len(), 1);
        let timers: Vec<(String, i64)> =
            sqlx::query_as("SELECT key, due_ms FROM sagaflow.timers WHERE saga_id = $1").bind(saga.0).fetch_all(&pool).await.unwrap();
        assert_eq!(timers, vec![(moved.id(), 30)]);
        drop_database(pool, db).await;
    }

    /// A decision of saga `saga` that queues its step 1 for a slot of `r` (capacity 2).
    fn queues(saga: SagaId, n: u32, priority: i32) -> DecisionRows {
        let mut d = decision(saga, n, SagaStatus::Running);
        d.slots.acquire.push(store::slots::Acquire { step: 1, resource: "r".into(), capacity: 2, priority });
        d
    }

    async fn holders(pool: &PgPool) -> Vec<uuid::Uuid> {
        sqlx::query_scalar("SELECT saga_id FROM sagaflow.slot_holders ORDER BY saga_id").fetch_all(pool).await.unwrap()
    }

    #[tokio::test]
    async fn slots_are_queued_and_given_back_with_their_decision_and_granted_by_priority_then_arrival() {
        let (pool, db) = database().await;
        let sagas: Vec<SagaId> = (0..5).map(|_| SagaId::new()).collect();
        // Queued in this order; the fourth with a higher priority.
        for (i, saga) in sagas.iter().enumerate() {
            let d = queues(*saga, 0, if i == 3 { 5 } else { 0 });
            insert_new(&pool, "n1", &[(&d, &new_instance(None))], false).await.unwrap();
        }
        let granted = store::slots::grant(&pool, "r").await.unwrap();
        assert_eq!(granted.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![sagas[3], sagas[0]], "priority, then arrival");
        assert_eq!(granted[0].1, StepIndex(1));
        let timer = TimerKey::SlotGranted { step: StepIndex(1) };
        for (s, _) in &granted {
            let json: String = sqlx::query_scalar("SELECT timer::text FROM sagaflow.timers WHERE saga_id = $1 AND key = $2")
                .bind(s.0)
                .bind(timer.id())
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(serde_json::from_str::<TimerKey>(&json).unwrap(), timer, "the grant is a timer the saga reads back");
        }
        assert!(store::slots::grant(&pool, "r").await.unwrap().is_empty(), "both slots are held");

        // A compare lost writes none of a decision's slot rows.
        let read = version(&pool, sagas[0]).await;
        sqlx::query("UPDATE sagaflow.instances SET decided_by = 'n2' WHERE id = $1").bind(sagas[0].0).execute(&pool).await.unwrap();
        let mut gives_back = decision(sagas[0], 1, SagaStatus::Running);
        gives_back.slots.release.push((1, "r".into()));
        let guard = Guard { versions: vec![(sagas[0].0, read)], marks: Vec::new() };
        write_guarded(&pool, "n1", &[&gives_back], &guard, false).await.unwrap();
        assert_eq!(holders(&pool).await.len(), 2, "still held");

        // Written: the slot is given back, and the next waiter in line gets it.
        let guard = Guard { versions: vec![(sagas[0].0, version(&pool, sagas[0]).await)], marks: Vec::new() };
        assert_eq!(write_guarded(&pool, "n1", &[&gives_back], &guard, false).await.unwrap().written, vec![sagas[0].0]);
        assert_eq!(store::slots::grant(&pool, "r").await.unwrap().iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![sagas[1]]);

        // A waiter that gives up its place leaves the queue; the rest keep theirs.
        let mut tx = pool.begin().await.unwrap();
        let mut leaves = decision(sagas[2], 1, SagaStatus::Running);
        leaves.slots.release.push((1, "r".into()));
        write_locked(&mut *tx, "n1", &[&leaves], false).await.unwrap();
        tx.commit().await.unwrap();
        let waiting: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT saga_id FROM sagaflow.slot_waiters").fetch_all(&pool).await.unwrap();
        assert_eq!(waiting, vec![sagas[4].0]);
        let mut want = vec![sagas[1].0, sagas[3].0];
        want.sort_unstable();
        assert_eq!(holders(&pool).await, want);
        drop_database(pool, db).await;
    }
}
