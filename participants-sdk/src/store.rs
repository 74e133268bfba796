//! The participant's own tables (schema `sagaflow_participant`): the inbox that records each
//! step's final outcome, and the outbox where earlier versions kept replies until the broker
//! confirmed them (now only drained).

use sagas::protocol::{InboundCommand, ReplyOutcome, WireMessage};
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres, Row};

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

/// What retention needs: records found by age. A BRIN index (records are appended in time
/// order), which costs the hot path next to nothing; created only by participants that prune.
const RETENTION_INDEX: &str = "CREATE INDEX IF NOT EXISTS inbox_recorded_at ON sagaflow_participant.inbox USING brin (recorded_at)";

/// Create the participant tables if they do not exist (safe to run concurrently); with
/// `retention`, the index that pruning by age uses too.
pub async fn ensure_schema(pool: &PgPool, retention: bool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
    if retention {
        sqlx::raw_sql(RETENTION_INDEX).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// Delete up to `limit` records of `participant` older than `days` days; returns how many.
pub(crate) async fn prune(pool: &PgPool, participant: &str, days: u32, limit: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM sagaflow_participant.inbox WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM sagaflow_participant.inbox
             WHERE participant = $1 AND recorded_at < now() - make_interval(days => $2) LIMIT $3))",
    )
    .bind(participant)
    .bind(i32::try_from(days).unwrap_or(i32::MAX))
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// A transaction on a connection of its own, begun by [`begin_read`]: committed or rolled back
/// explicitly. Dropped without either (a handler panicked, the task was cancelled), its
/// connection is closed rather than returned to the pool in the middle of a transaction.
pub(crate) struct Tx {
    conn: PoolConnection<Postgres>,
    open: bool,
}

impl Tx {
    /// The connection, inside the transaction.
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Commit.
    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        sqlx::raw_sql("COMMIT").execute(&mut *self.conn).await?;
        self.open = false;
        Ok(())
    }

    /// Record the final outcomes of `records` in the inbox and commit, in one round trip (the
    /// updates of the records replaced, the insert of the new ones and the `COMMIT` sent
    /// together); `false` when another delivery recorded one of
    /// these steps first: nothing is committed, and the caller answers from that record.
    /// Everything in the text is a literal made here from checked values; each outcome is
    /// dollar-quoted with a tag it does not contain.
    pub(crate) async fn record_and_commit(mut self, participant: &str, records: &[Record<'_>]) -> Result<bool, sqlx::Error> {
        if records.is_empty() {
            self.commit().await?;
            return Ok(true);
        }
        let mut rows = Vec::with_capacity(records.len());
        let mut replaced = Vec::new();
        for r in records {
            let outcome = serde_json::to_string(r.outcome).map_err(|e| sqlx::Error::Encode(e.into()))?;
            let tag = loop {
                let tag = format!("$sf{}$", uuid::Uuid::now_v7().simple());
                if !outcome.contains(&tag) {
                    break tag;
                }
            };
            let c = r.cmd;
            let (saga, step, kind, id) = (c.saga.saga_id, step_i32(c), c.kind.as_str(), c.message_id);
            if r.replaces {
                replaced.push(format!(
                    "UPDATE sagaflow_participant.inbox SET command_id = '{id}'::uuid, outcome = {tag}{outcome}{tag}::jsonb, recorded_at = now()
                     WHERE participant = '{participant}' AND saga_id = '{saga}'::uuid AND step = {step} AND kind = '{kind}';"
                ));
            } else {
                rows.push(format!("('{participant}', '{saga}'::uuid, {step}, '{kind}', '{id}'::uuid, {tag}{outcome}{tag}::jsonb)"));
            }
        }
        let inserted = if rows.is_empty() {
            String::new()
        } else {
            format!(
                "INSERT INTO sagaflow_participant.inbox (participant, saga_id, step, kind, command_id, outcome) VALUES {};",
                rows.join(", ")
            )
        };
        let sql = format!("{}{inserted} COMMIT", replaced.concat());
        match sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *self.conn).await {
            Ok(_) => {
                self.open = false;
                Ok(true)
            }
            // A step already recorded: the insert failed, so nothing was committed.
            Err(e) if e.as_database_error().is_some_and(|d| d.is_unique_violation()) => {
                self.rollback().await?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Roll back.
    pub(crate) async fn rollback(mut self) -> Result<(), sqlx::Error> {
        sqlx::raw_sql("ROLLBACK").execute(&mut *self.conn).await?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

/// Begin a transaction that holds, for each of `cmds`, the lock that serializes the command
/// and the compensation of its step in this participant, and read what each step recorded
/// before ([`Prior`], in `cmds` order): one round trip, three statements sent together. The
/// read is a statement of its own, after the locks: in `READ COMMITTED` each statement takes
/// its snapshot when it starts, so it sees what the previous holder of a lock committed. The
/// locks are taken in one order (of their keys), so concurrent batches never deadlock on them.
/// Everything in the text is a literal this function made from checked values: the
/// participant's name (letters, digits, `_`, `-`, `.`), saga ids, step numbers and kinds.
pub(crate) async fn begin_read(pool: &PgPool, participant: &str, cmds: &[&InboundCommand]) -> Result<(Tx, Vec<Prior>), sqlx::Error> {
    let mut keys: Vec<String> = cmds.iter().map(|c| format!("'{participant}/{}/{}'", c.saga.saga_id, c.step.0)).collect();
    keys.sort_unstable();
    let wanted: Vec<String> = cmds
        .iter()
        .enumerate()
        .map(|(n, c)| format!("({n}, '{}'::uuid, {}, '{}')", c.saga.saga_id, step_i32(c), c.kind.as_str()))
        .collect();
    let sql = format!(
        "BEGIN;
         SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) FROM unnest(ARRAY[{keys}]::text[]) AS k
           HAVING count(*) < 0;
         SELECT u.n, r.outcome, r.command_id,
                EXISTS (SELECT 1 FROM sagaflow_participant.inbox x
                        WHERE x.participant = '{participant}' AND x.saga_id = u.s AND x.step = u.st AND x.kind = 'compensate')
         FROM (VALUES {wanted}) AS u(n, s, st, k)
         LEFT JOIN sagaflow_participant.inbox r ON r.participant = '{participant}' AND r.saga_id = u.s AND r.step = u.st AND r.kind = u.k
         ORDER BY u.n",
        keys = keys.join(","),
        wanted = wanted.join(","),
    );
    let mut tx = Tx { conn: pool.acquire().await?, open: true };
    // The locking statement returns no rows (its `HAVING` is never true, but needs every lock
    // taken to be evaluated): every row is the read's.
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).fetch_all(tx.conn()).await?;
    let mut priors = Vec::with_capacity(rows.len());
    for row in rows {
        let outcome: Option<Value> = row.try_get(1)?;
        let outcome = outcome.map(serde_json::from_value).transpose().map_err(|e| sqlx::Error::Decode(e.into()))?;
        priors.push(Prior { outcome, command_id: row.try_get(2)?, compensated: row.try_get(3)? });
    }
    if priors.len() != cmds.len() {
        return Err(sqlx::Error::Protocol(format!("read {} step records for {} commands", priors.len(), cmds.len())));
    }
    Ok((tx, priors))
}

/// What this participant already recorded for a command's step, read by [`begin_read`].
pub(crate) struct Prior {
    /// The final outcome recorded for this command's kind (invoke or compensate), if any.
    pub(crate) outcome: Option<ReplyOutcome>,
    /// The id of the command whose outcome that is.
    pub(crate) command_id: Option<uuid::Uuid>,
    /// The step has a recorded compensation.
    pub(crate) compensated: bool,
}

/// A step outcome to record.
pub(crate) struct Record<'a> {
    pub(crate) cmd: &'a InboundCommand,
    pub(crate) outcome: &'a ReplyOutcome,
    /// The step already has a record of this kind, which this one replaces (a rejected
    /// compensation run again by a new message: see `execute::answer_from`). The step's lock,
    /// held since the record was read, keeps anyone else from writing it in between.
    pub(crate) replaces: bool,
}

/// A reply left in the outbox by an earlier version of the SDK, which published replies from
/// there (replies are now published after the commit, and a crash in between leaves the
/// command unacked: redelivered, it is answered from the record).
pub(crate) struct Pending {
    pub(crate) id: i64,
    pub(crate) routing_key: String,
    pub(crate) msg: WireMessage,
}

/// Leftover replies older than `age_ms`, locked for the caller's transaction.
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

/// A pool of at most `max_connections` on `urls`: one PostgreSQL server, or a primary and its
/// standbys separated by commas, in which case the pool connects to the one that accepts writes
/// and follows a failover ([`sagaflow_amqp::pg`]). Use it (or any pool of your own on the
/// primary) for [`crate::Participant::run`].
pub async fn connect_pool(urls: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let servers = sagaflow_amqp::pg::parse_servers(urls, |o| o).map_err(|why| sqlx::Error::Configuration(why.into()))?;
    let (primary, conn) = sagaflow_amqp::pg::find_primary(&servers).await?;
    let _ = sqlx::Connection::close(conn).await;
    let options = sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .acquire_timeout(std::time::Duration::from_secs(10));
    sagaflow_amqp::pg::pool_following(options, servers, primary).await
}

#[cfg(test)]
mod tests {
    //! The step locks and the read of `begin_read` against PostgreSQL
    //! (`SAGAFLOW_TEST_DATABASE_URL`, else the local default), each test on a database of its own.

    use std::time::Duration;

    use sagaflow_amqp::pg::ScratchDatabase;
    use sagas::protocol::SagaRef;
    use sagas::{CommandKind, MessageId, SagaId, StepIndex};

    use super::*;

    /// A fresh database with the participant's tables.
    async fn database() -> (PgPool, ScratchDatabase) {
        let db = ScratchDatabase::create("sagaflow_participant").await.expect("PostgreSQL for the store's tests");
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(30).connect(db.url()).await.unwrap();
        ensure_schema(&pool, false).await.unwrap();
        (pool, db)
    }

    async fn drop_database(pool: PgPool, db: ScratchDatabase) {
        pool.close().await;
        db.drop().await.unwrap();
    }

    fn command(saga: SagaId, step: u32, kind: CommandKind) -> InboundCommand {
        InboundCommand {
            message_id: MessageId::for_command(saga, StepIndex(step), kind, 1),
            command: "charge".into(),
            saga: SagaRef { saga_id: saga, definition: "order".into(), version: 1 },
            step: StepIndex(step),
            step_name: format!("step-{step}"),
            kind,
            attempt: 1,
            reply_to: "replies".into(),
            traceparent: None,
            body: Value::Null,
            heartbeat_ms: None,
            progress: None,
        }
    }

    fn success(n: u32) -> ReplyOutcome {
        ReplyOutcome::Success { output: serde_json::json!({ "n": n }) }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_waits_for_its_holder_and_then_reads_what_it_committed() {
        let (pool, db) = database().await;
        let saga = SagaId(uuid::Uuid::now_v7());
        let cmd = command(saga, 1, CommandKind::Invoke);
        let (tx, priors) = begin_read(&pool, "p", &[&cmd]).await.unwrap();
        assert!(priors[0].outcome.is_none() && priors[0].command_id.is_none() && !priors[0].compensated);

        // A redelivery of the same command waits for the step's lock.
        let second = tokio::spawn({
            let (pool, cmd) = (pool.clone(), cmd.clone());
            async move {
                let (tx, priors) = begin_read(&pool, "p", &[&cmd]).await.unwrap();
                tx.rollback().await.unwrap();
                priors
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "the second reader did not wait for the step's lock");

        // Another step of the saga, and the same step in another participant, do not wait.
        for (participant, other) in [("p", command(saga, 2, CommandKind::Invoke)), ("q", cmd.clone())] {
            let (tx, _) = tokio::time::timeout(Duration::from_secs(10), begin_read(&pool, participant, &[&other]))
                .await
                .expect("a step no one holds is not locked")
                .unwrap();
            tx.rollback().await.unwrap();
        }

        let outcome = success(1);
        assert!(tx.record_and_commit("p", &[Record { cmd: &cmd, outcome: &outcome, replaces: false }]).await.unwrap());
        let priors = tokio::time::timeout(Duration::from_secs(10), second).await.expect("the lock was released").unwrap();
        assert_eq!(priors[0].outcome, Some(outcome));
        assert_eq!(priors[0].command_id, Some(cmd.message_id.0));
        drop_database(pool, db).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_reads_each_steps_record_in_the_order_of_its_commands() {
        let (pool, db) = database().await;
        let saga = SagaId(uuid::Uuid::now_v7());
        let (done, undone) = (command(saga, 1, CommandKind::Invoke), command(saga, 1, CommandKind::Compensate));
        let refused = command(saga, 2, CommandKind::Invoke);
        let rejected = ReplyOutcome::Rejected { code: "out_of_stock".into(), message: String::new() };
        let (tx, _) = begin_read(&pool, "p", &[&done, &refused]).await.unwrap();
        let (one, two) = (success(1), success(2));
        let records =
            [Record { cmd: &done, outcome: &one, replaces: false }, Record { cmd: &refused, outcome: &rejected, replaces: false }];
        assert!(tx.record_and_commit("p", &records).await.unwrap());
        let (tx, _) = begin_read(&pool, "p", &[&undone]).await.unwrap();
        assert!(tx.record_and_commit("p", &[Record { cmd: &undone, outcome: &two, replaces: false }]).await.unwrap());

        // A step past i32 (no definition has one) reads as never recorded, beside the others.
        let (huge, fresh) = (command(saga, u32::MAX, CommandKind::Invoke), command(saga, 3, CommandKind::Invoke));
        let (tx, priors) = begin_read(&pool, "p", &[&refused, &huge, &undone, &fresh, &done]).await.unwrap();
        tx.rollback().await.unwrap();
        let seen: Vec<_> = priors.iter().map(|p| (p.outcome.clone(), p.command_id, p.compensated)).collect();
        assert_eq!(
            seen,
            [
                (Some(rejected), Some(refused.message_id.0), false),
                (None, None, false),
                (Some(two), Some(undone.message_id.0), true),
                (None, None, false),
                (Some(one), Some(done.message_id.0), true),
            ]
        );
        // Another participant's records are its own.
        let (tx, priors) = begin_read(&pool, "q", &[&done]).await.unwrap();
        tx.rollback().await.unwrap();
        assert!(priors[0].outcome.is_none() && !priors[0].compensated);
        drop_database(pool, db).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_locking_the_same_steps_in_any_order_never_deadlock() {
        let (pool, db) = database().await;
        let sagas: Vec<SagaId> = (0..6).map(|_| SagaId(uuid::Uuid::now_v7())).collect();
        let mut tasks = Vec::new();
        for t in 0..24usize {
            let pool = pool.clone();
            // Each batch takes four of the six steps, starting at a different one, forwards or backwards.
            let mut picked: Vec<SagaId> = (0..4).map(|i| sagas[(t + i) % sagas.len()]).collect();
            if t % 2 == 1 {
                picked.reverse();
            }
            tasks.push(tokio::spawn(async move {
                let cmds: Vec<InboundCommand> = picked.iter().map(|s| command(*s, 0, CommandKind::Invoke)).collect();
                let refs: Vec<&InboundCommand> = cmds.iter().collect();
                for _ in 0..5 {
                    let (tx, _) = begin_read(&pool, "p", &refs).await?;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    tx.rollback().await?;
                }
                Ok::<_, sqlx::Error>(())
            }));
        }
        for task in tasks {
            task.await.unwrap().expect("no batch failed (a deadlock is an error)");
        }
        drop_database(pool, db).await;
    }
}
