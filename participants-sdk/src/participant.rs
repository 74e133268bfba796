//! A participant: its handlers, its configuration, and the loop that consumes its queue.
//!
//! For each command: decode (refused → dead letter) → find the handler (none → dead letter)
//! → in one transaction: answer from the inbox record if the step already has an outcome,
//! else run the handler, record its outcome, write the reply to the outbox → commit →
//! publish the reply with a confirm → ack the command; the reply's outbox row is deleted in a
//! batch with others (a crash before that republishes it; the orchestrator dedupes). Commands
//! that arrive together share that transaction (a failing handler undoes only its own writes).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sagas::protocol::{InboundCommand, ReplyOutcome, WireMessage, decode_command, encode_reply};
use sagas::{Command, CommandKind, Timestamp};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::handler::{Context, ErasedHandler, Handler, HandlerError, Typed};
use crate::store;
use sagaflow_amqp::outbox::BatchDeleter;
use sagaflow_amqp::transport::{self, Names, QueueOptions};

/// How a participant runs. Every field has a default.
#[derive(Clone, Debug)]
pub struct ParticipantConfig {
    /// Namespace of the AMQP names; must match the orchestrator's. Default `sagaflow`.
    pub namespace: String,
    /// Unacked commands the broker may send ahead; commands that arrived together run together,
    /// so this bounds the batches too. Default 256.
    pub prefetch: u16,
    /// Transactions at once (each runs one command, or a batch of them). Default 8.
    pub concurrency: usize,
    /// Most commands run in one transaction: the commands that arrived while every
    /// transaction slot was busy run together (a failing handler undoes only its own writes).
    /// 1 runs every command in its own transaction. Default 64.
    pub batch_max: usize,
    /// Largest command body accepted; larger ones are dead-lettered. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Declare quorum queues (must match the orchestrator). Default false.
    pub quorum_queues: bool,
    /// How long to keep retrying to connect before giving up. Default 60 s.
    pub connect_timeout: Duration,
    /// How often leftover replies (a crash between commit and publish) are republished. Default 5 s.
    pub sweep_interval: Duration,
}

impl Default for ParticipantConfig {
    fn default() -> Self {
        Self {
            namespace: "sagaflow".into(),
            prefetch: 256,
            concurrency: 8,
            batch_max: 64,
            max_body_bytes: sagas::protocol::DEFAULT_MAX_BODY_BYTES,
            quorum_queues: false,
            connect_timeout: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(5),
        }
    }
}

/// Errors starting or running a participant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The participant's tables could not be created or used.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// RabbitMQ could not be reached or refused the topology.
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    /// A misconfiguration found by [`ParticipantBuilder::build`].
    #[error("invalid participant: {0}")]
    Invalid(String),
}

type CrashHook = Arc<dyn Fn(&InboundCommand) -> bool + Send + Sync>;

struct Registered {
    kind: CommandKind,
    handler: Box<dyn ErasedHandler>,
}

/// Builds a [`Participant`].
pub struct ParticipantBuilder {
    name: String,
    handlers: HashMap<String, Registered>,
    config: ParticipantConfig,
    problems: Vec<String>,
    crash_after_commit: Option<CrashHook>,
}

impl ParticipantBuilder {
    /// Handle command `C` (a step's command) with `handler`.
    pub fn handle<C: Command>(self, handler: impl Handler<C>) -> Self {
        self.register::<C>(CommandKind::Invoke, handler)
    }

    /// Handle compensation `C` with `handler`. It must be idempotent and succeed when there is
    /// nothing to undo.
    pub fn compensate<C: Command>(self, handler: impl Handler<C>) -> Self {
        self.register::<C>(CommandKind::Compensate, handler)
    }

    fn register<C: Command>(mut self, kind: CommandKind, handler: impl Handler<C>) -> Self {
        if C::PARTICIPANT != self.name {
            self.problems.push(format!("`{}` belongs to participant `{}`, not `{}`", C::NAME, C::PARTICIPANT, self.name));
        }
        let typed = Typed::<C, _> { handler, _command: PhantomData };
        if self.handlers.insert(C::NAME.to_owned(), Registered { kind, handler: Box::new(typed) }).is_some() {
            self.problems.push(format!("`{}` is registered twice", C::NAME));
        }
        self
    }

    /// Fault injection for tests: for each command where `crash` returns true, behave as if the
    /// process died right after the commit: the reply stays in the outbox (published later by
    /// the sweep) and the command is not acked but requeued, as the broker does when a
    /// consumer's connection drops.
    pub fn crash_after_commit(mut self, crash: impl Fn(&InboundCommand) -> bool + Send + Sync + 'static) -> Self {
        self.crash_after_commit = Some(Arc::new(crash));
        self
    }

    /// Replace the configuration.
    pub fn config(mut self, config: ParticipantConfig) -> Self {
        self.config = config;
        self
    }

    /// Check and build.
    pub fn build(self) -> Result<Participant, Error> {
        let mut problems = self.problems;
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            problems.push("the name must be non-empty ASCII letters, digits, `_`, `-` or `.`".into());
        }
        if self.handlers.is_empty() {
            problems.push("no handlers".into());
        }
        if self.config.prefetch == 0 || self.config.concurrency == 0 || self.config.batch_max == 0 {
            problems.push("prefetch, concurrency and batch_max must be at least 1".into());
        }
        if !problems.is_empty() {
            return Err(Error::Invalid(format!("participant `{}`: {}", self.name, problems.join("; "))));
        }
        let names = Names::new(self.config.namespace.clone());
        Ok(Participant {
            inner: Arc::new(Inner {
                publishing: tokio::sync::Mutex::new(()),
                name: self.name,
                handlers: self.handlers,
                config: self.config,
                names,
                crash_after_commit: self.crash_after_commit,
            }),
        })
    }
}

struct Inner {
    /// Held while publishing on the channel and waiting for the confirms: one batch at a time,
    /// so a message the broker returns is carried by a confirm of its own batch (see
    /// [`transport::publish_batch`]).
    publishing: tokio::sync::Mutex<()>,
    name: String,
    handlers: HashMap<String, Registered>,
    config: ParticipantConfig,
    names: Names,
    crash_after_commit: Option<CrashHook>,
}

/// A service taking part in sagas. Cheap to clone.
#[derive(Clone)]
pub struct Participant {
    inner: Arc<Inner>,
}

/// A running participant, from [`Participant::start`].
pub struct ParticipantHandle {
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl ParticipantHandle {
    /// Stop consuming, finish the commands in hand, and return.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.token.cancel();
        self.task.await.unwrap_or_else(|e| Err(Error::Invalid(format!("participant task failed: {e}"))))
    }
}

impl Participant {
    /// A participant named `name` (its queue is `{ns}.participant.{name}`).
    pub fn builder(name: impl Into<String>) -> ParticipantBuilder {
        ParticipantBuilder {
            name: name.into(),
            handlers: HashMap::new(),
            config: ParticipantConfig::default(),
            problems: Vec::new(),
            crash_after_commit: None,
        }
    }

    /// The participant's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Create the tables, connect, declare the queue, and run in the background. Commands
    /// published once this returns reach the participant.
    pub async fn start(&self, pool: PgPool, amqp_url: &str) -> Result<ParticipantHandle, Error> {
        store::ensure_schema(&pool).await?;
        let conn = transport::connect(amqp_url, self.inner.config.connect_timeout).await?;
        // Declared before returning, so commands published after `start` reach the queue.
        let ch = conn.create_channel().await?;
        transport::declare_participant(&ch, &self.inner.names, &self.inner.name, QueueOptions { quorum: self.inner.config.quorum_queues })
            .await?;
        ch.close(200, "declared".into()).await?;
        let token = CancellationToken::new();
        let this = self.clone();
        let (url, t) = (amqp_url.to_owned(), token.clone());
        let task = tokio::spawn(async move {
            let (deleter, deleting) = BatchDeleter::new(pool.clone(), "sagaflow_participant.outbox");
            let serving = async move { this.serve(pool, &deleter, &url, Some(conn), t).await };
            // The deleter ends once serving has ended (dropping its handle) and it deleted the rest.
            tokio::join!(serving, deleting).0
        });
        Ok(ParticipantHandle { token, task })
    }

    /// Run until `shutdown` completes (for a service: [`shutdown_signal`]).
    pub async fn run(&self, pool: PgPool, amqp_url: &str, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let handle = self.start(pool, amqp_url).await?;
        shutdown.await;
        handle.shutdown().await
    }

    /// Consume until cancelled, reconnecting when the connection drops.
    async fn serve(
        &self,
        pool: PgPool,
        deleter: &BatchDeleter,
        url: &str,
        mut conn: Option<Connection>,
        token: CancellationToken,
    ) -> Result<(), Error> {
        let inner = &self.inner;
        loop {
            let c = match conn.take() {
                Some(c) => c,
                // Once running, a participant keeps trying until it is shut down.
                None => tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    c = transport::connect(url, Duration::from_secs(24 * 3600)) => match c {
                        Ok(c) => {
                            tracing::info!(participant = %inner.name, "reconnected to RabbitMQ");
                            c
                        }
                        Err(e) => {
                            tracing::error!(participant = %inner.name, error = %e, "cannot reconnect to RabbitMQ; still trying");
                            continue;
                        }
                    },
                },
            };
            match self.consume(&pool, deleter, &c, &token).await {
                Ok(()) => {
                    let _ = c.close(200, "shutdown".into()).await;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(participant = %inner.name, error = %e, "lost RabbitMQ; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// One connection's life: returns `Ok` on shutdown, `Err` when the connection failed.
    async fn consume(&self, pool: &PgPool, deleter: &BatchDeleter, conn: &Connection, token: &CancellationToken) -> Result<(), Error> {
        let inner = &self.inner;
        let ch = transport::confirm_channel(conn).await?;
        let opts = QueueOptions { quorum: inner.config.quorum_queues };
        transport::declare_participant(&ch, &inner.names, &inner.name, opts).await?;
        ch.basic_qos(inner.config.prefetch, BasicQosOptions::default()).await?;
        let queue = inner.names.participant_queue(&inner.name);
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                format!("{}-{}", inner.name, std::process::id()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(participant = %inner.name, queue, "consuming commands");
        // Leftover replies are republished beside the consumer, on the same channel.
        let sweeping = token.child_token();
        let sweeper = {
            let (this, ch, pool, stop) = (self.clone(), ch.clone(), pool.clone(), sweeping.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(this.inner.config.sweep_interval);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => {
                            if let Err(e) = this.sweep(&pool, &ch).await {
                                tracing::warn!(participant = %this.inner.name, error = %e, "could not republish leftover replies");
                            }
                        }
                    }
                }
            })
        };
        let result = transport::run_batch_consumer(&ch, consumer, inner.config.batch_max, inner.config.concurrency, token, |batch| {
            let (this, ch, pool, deleter) = (self.clone(), ch.clone(), pool.clone(), deleter.clone());
            async move { this.process(&pool, &deleter, &ch, batch).await }
        })
        .await;
        // A sweep stuck on a dead connection must not hold the reconnect: stop it where it is
        // (its transaction rolls back; what it published is sent again and deduped).
        sweeping.cancel();
        sweeper.abort();
        let _ = sweeper.await;
        if result.is_ok() {
            let _ = ch.close(200, "shutdown".into()).await;
        }
        result.map_err(Error::Amqp)
    }

    /// Handle one batch of deliveries: refuse what cannot be handled, run the commands (in one
    /// transaction when there are several), publish the replies, ack.
    async fn process(&self, pool: &PgPool, deleter: &BatchDeleter, ch: &Channel, batch: Vec<Delivery>) {
        let queue = self.inner.names.participant_queue(&self.inner.name);
        tracing::debug!(participant = %self.inner.name, commands = batch.len(), "handling a batch of commands");
        let mut valid = Vec::with_capacity(batch.len());
        for d in batch {
            match self.check(&d) {
                Ok((cmd, reg)) => valid.push((d, cmd, reg)),
                Err((code, detail)) => self.refuse(ch, &queue, &d, code, &detail).await,
            }
        }
        // One command per step in a transaction: another of the same step (its compensation, a
        // redelivery) runs after it, on its own.
        let mut steps = HashSet::with_capacity(valid.len());
        let (first, later): (Vec<_>, Vec<_>) = valid.into_iter().partition(|(_, c, _)| steps.insert((c.saga.saga_id, c.step)));
        if first.len() > 1 {
            let cmds: Vec<(&Registered, &InboundCommand)> = first.iter().map(|(_, c, r)| (*r, c)).collect();
            let mut run = self.execute_batch(pool, &cmds, false).await;
            if matches!(run, Ok(BatchRun::NeedsSavepoints)) {
                run = self.execute_batch(pool, &cmds, true).await;
            }
            drop(cmds);
            match run {
                Ok(BatchRun::Done(replies)) => {
                    let done = first.into_iter().map(|(d, c, _)| (d, c)).zip(replies).collect();
                    self.finish(ch, deleter, done).await;
                }
                failed => {
                    match failed {
                        Err(e) => {
                            tracing::info!(participant = %self.inner.name, error = %e, "a batch of commands failed; running them one by one")
                        }
                        _ => {
                            tracing::info!(participant = %self.inner.name, "another delivery recorded a step of this batch first; running them one by one")
                        }
                    }
                    futures_util::future::join_all(first.into_iter().map(|(d, c, r)| self.process_one(pool, deleter, ch, d, c, r))).await;
                }
            }
        } else {
            for (d, c, r) in first {
                self.process_one(pool, deleter, ch, d, c, r).await;
            }
        }
        for (d, c, r) in later {
            self.process_one(pool, deleter, ch, d, c, r).await;
        }
    }

    /// Decode `d` and find its handler; `Err((reason, detail))` for a dead letter.
    fn check(&self, d: &Delivery) -> Result<(InboundCommand, &Registered), (&'static str, String)> {
        let inner = &self.inner;
        let max = inner.config.max_body_bytes;
        let cmd = transport::wire_from_delivery(d, max).and_then(|m| decode_command(&m, max)).map_err(|e| (e.code(), e.to_string()))?;
        let Some(reg) = inner.handlers.get(&cmd.command) else {
            return Err(("unknown_command", format!("participant `{}` has no handler for `{}`", inner.name, cmd.command)));
        };
        if reg.kind != cmd.kind {
            let detail = format!("`{}` is registered as {} but arrived as {}", cmd.command, reg.kind.as_str(), cmd.kind.as_str());
            return Err(("unknown_command", detail));
        }
        Ok((cmd, reg))
    }

    /// The span of one command's handling.
    fn span(&self, cmd: &InboundCommand) -> tracing::Span {
        let trace_id = cmd.traceparent.as_deref().and_then(|t| t.split('-').nth(1)).unwrap_or("");
        tracing::info_span!("command", participant = %self.inner.name, saga.id = %cmd.saga.saga_id, step.name = %cmd.step_name, kind = cmd.kind.as_str(), attempt = cmd.attempt, message.id = %cmd.message_id, trace.id = trace_id)
    }

    /// Handle one command in its own transaction.
    async fn process_one(&self, pool: &PgPool, deleter: &BatchDeleter, ch: &Channel, d: Delivery, cmd: InboundCommand, reg: &Registered) {
        let result = self.execute(pool, reg, &cmd).instrument(self.span(&cmd)).await;
        match result {
            Ok(reply) => self.finish(ch, deleter, vec![((d, cmd), reply)]).await,
            // PostgreSQL refuses the data itself (SQLSTATE class 22 or 54): the same every time.
            Err(e) if store::is_unstorable(&e) => {
                let queue = self.inner.names.participant_queue(&self.inner.name);
                self.refuse(ch, &queue, &d, "unstorable", &format!("PostgreSQL cannot store it: {e}")).await;
            }
            Err(e) => {
                self.span(&cmd).in_scope(|| tracing::warn!(error = %e, "database unavailable; the command goes back to the queue"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = transport::requeue(&d).await;
            }
        }
    }

    /// After the commit: publish the replies (pipelined, with confirms), then ack the commands.
    /// A reply not confirmed now stays in the outbox for the sweep.
    async fn finish(&self, ch: &Channel, deleter: &BatchDeleter, done: Vec<((Delivery, InboundCommand), (i64, WireMessage))>) {
        let mut sent = Vec::with_capacity(done.len());
        for ((d, cmd), reply) in done {
            if self.inner.crash_after_commit.as_ref().is_some_and(|crash| crash(&cmd)) {
                tracing::warn!(message.id = %cmd.message_id, "fault injection: crashing after the commit, before the reply and the ack");
                let _ = transport::requeue(&d).await;
                continue;
            }
            sent.push((d, cmd, reply));
        }
        let batch = sent.iter().map(|(_, cmd, (_, reply))| ("", cmd.reply_to.as_str(), reply, true)).collect();
        let one_batch = self.inner.publishing.lock().await;
        let results = transport::publish_batch(ch, batch).await;
        let mut settled = Vec::with_capacity(sent.len());
        for ((d, cmd, (id, reply)), result) in sent.into_iter().zip(results) {
            match result {
                Ok(()) => deleter.delete(id),
                Err(e) if self.set_aside(ch, &cmd.reply_to, &reply, &e).await => deleter.delete(id),
                Err(e) => {
                    tracing::warn!(message.id = %cmd.message_id, error = %e, "reply not sent now; it stays in the outbox and is retried")
                }
            }
            settled.push((d, cmd));
        }
        drop(one_batch);
        for (d, cmd) in settled {
            if let Err(e) = transport::ack(&d).await {
                tracing::warn!(message.id = %cmd.message_id, error = %e, "ack failed; the command will be redelivered and answered from the inbox");
            }
        }
    }

    async fn refuse(&self, ch: &Channel, queue: &str, d: &Delivery, reason: &str, detail: &str) {
        let one_batch = self.inner.publishing.lock().await;
        let refused = transport::dead_letter(ch, &self.inner.names, queue, d, reason, detail).await;
        drop(one_batch);
        if let Err(e) = refused {
            tracing::error!(error = %e, reason, "could not dead-letter a message; it goes back to the queue");
            let _ = transport::requeue(d).await;
        }
    }

    /// Run `cmd` once in effect; returns the outbox row and the reply to send.
    ///
    /// One transaction on the common path: lock the step, read what was recorded, run the
    /// handler on the same transaction, record its outcome and enqueue the reply in one
    /// statement, commit. A refusal rolls the handler's writes back and records the refusal in
    /// a second transaction (another delivery of the step may run in between: whichever outcome
    /// is recorded first is the step's, and the other delivery answers from it); a transient
    /// failure records nothing (the orchestrator retries).
    async fn execute(&self, pool: &PgPool, reg: &Registered, cmd: &InboundCommand) -> Result<(i64, WireMessage), sqlx::Error> {
        let name = &self.inner.name;
        let mut refusal: Option<ReplyOutcome> = None;
        loop {
            // A step's command and its compensation never run at the same time here: a
            // compensation waits for a slow command to finish, and a command that arrives
            // after its compensation is refused without running.
            let mut tx = store::begin_locked(pool, name, &[cmd]).await?;
            let prior = store::priors(&mut tx, name, &[cmd]).await?.pop().expect("one prior per command");
            if let Some(outcome) = answer_from(cmd, prior) {
                return enqueue_only(tx, name, cmd, &outcome).await;
            }
            let outcome = match refusal.take() {
                Some(outcome) => outcome,
                None => {
                    let result = {
                        let mut cx = Context { tx: &mut tx, cmd, touched: false };
                        reg.handler.call(&mut cx, cmd.body.clone()).await
                    };
                    match result {
                        Ok(output) => ReplyOutcome::Success { output },
                        Err(HandlerError::Reject { code, message }) => {
                            // Undo the handler's writes; record the refusal on a clean transaction.
                            tx.rollback().await?;
                            tracing::info!(code, message, "rejected");
                            refusal = Some(ReplyOutcome::Rejected { code, message });
                            continue;
                        }
                        Err(HandlerError::Transient(e)) => {
                            tx.rollback().await?;
                            tracing::warn!(error = %format!("{e:#}"), "transient failure; the orchestrator retries");
                            let outcome = storable(ReplyOutcome::TransientFailure { message: format!("{e:#}") });
                            return enqueue_only(pool.begin().await?, name, cmd, &outcome).await;
                        }
                    }
                }
            };
            let outcome = storable(outcome);
            let reply = encode_reply(cmd, &outcome, Timestamp::now());
            let row = store::ReplyRow { cmd, record: Some(&outcome), reply: &reply };
            match store::write_replies(&mut tx, name, &[row]).await? {
                Some(ids) => {
                    tx.commit().await?;
                    return Ok((ids[0], reply));
                }
                // Another delivery of this step committed first: undo ours, answer from its record.
                None => tx.rollback().await?,
            }
        }
    }

    /// Run several commands (of distinct steps) in one transaction: lock their steps, read what
    /// was recorded, run each handler that has to run, record the outcomes and enqueue the
    /// replies in one statement, commit. With `savepoints`, each handler runs inside a savepoint
    /// (a refusal or a transient failure rolls back to it, undoing that handler's writes only);
    /// without, a failing handler that used the transaction ends the run
    /// ([`BatchRun::NeedsSavepoints`]; nothing was written), and one that did not has nothing to
    /// undo. Savepoints cost a round trip per handler, so the first run goes without.
    async fn execute_batch(
        &self,
        pool: &PgPool,
        cmds: &[(&Registered, &InboundCommand)],
        savepoints: bool,
    ) -> Result<BatchRun, sqlx::Error> {
        let name = &self.inner.name;
        let all: Vec<&InboundCommand> = cmds.iter().map(|(_, c)| *c).collect();
        let mut tx = store::begin_locked(pool, name, &all).await?;
        let priors = store::priors(&mut tx, name, &all).await?;
        let mut outcomes = Vec::with_capacity(cmds.len());
        let mut savepoint = false;
        for ((reg, cmd), prior) in cmds.iter().zip(priors) {
            let span = self.span(cmd);
            if let Some(outcome) = span.in_scope(|| answer_from(cmd, prior)) {
                outcomes.push((outcome, false));
                continue;
            }
            if savepoints {
                let set = if savepoint { "RELEASE SAVEPOINT handler; SAVEPOINT handler" } else { "SAVEPOINT handler" };
                sqlx::raw_sql(set).execute(&mut *tx).await?;
                savepoint = true;
            }
            let (result, touched) = {
                let mut cx = Context { tx: &mut tx, cmd, touched: false };
                let result = reg.handler.call(&mut cx, cmd.body.clone()).instrument(span.clone()).await;
                (result, cx.touched)
            };
            if result.is_err() && touched && !savepoints {
                // Its writes cannot be undone alone: run the batch again, with savepoints.
                tx.rollback().await?;
                return Ok(BatchRun::NeedsSavepoints);
            }
            let (outcome, record) = match result {
                Ok(output) => (ReplyOutcome::Success { output }, true),
                Err(HandlerError::Reject { code, message }) => {
                    span.in_scope(|| tracing::info!(code, message, "rejected"));
                    (ReplyOutcome::Rejected { code, message }, true)
                }
                Err(HandlerError::Transient(e)) => {
                    span.in_scope(|| tracing::warn!(error = %format!("{e:#}"), "transient failure; the orchestrator retries"));
                    (ReplyOutcome::TransientFailure { message: format!("{e:#}") }, false)
                }
            };
            if savepoint && !matches!(outcome, ReplyOutcome::Success { .. }) {
                // Undo this handler's writes only.
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT handler").execute(&mut *tx).await?;
            }
            outcomes.push((storable(outcome), record));
        }
        let now = Timestamp::now();
        let replies: Vec<WireMessage> = all.iter().zip(&outcomes).map(|(cmd, (o, _))| encode_reply(cmd, o, now)).collect();
        let rows: Vec<store::ReplyRow<'_>> = all
            .iter()
            .zip(&outcomes)
            .zip(&replies)
            .map(|((cmd, (o, record)), reply)| store::ReplyRow { cmd, record: record.then_some(o), reply })
            .collect();
        let Some(ids) = store::write_replies(&mut tx, name, &rows).await? else {
            tx.rollback().await?;
            return Ok(BatchRun::Conflict);
        };
        drop(rows);
        tx.commit().await?;
        Ok(BatchRun::Done(ids.into_iter().zip(replies).collect()))
    }

    /// Republish replies a crash left in the outbox.
    async fn sweep(&self, pool: &PgPool, ch: &Channel) -> Result<(), Error> {
        let age = i64::try_from(self.inner.config.sweep_interval.as_millis()).unwrap_or(i64::MAX);
        let mut tx = pool.begin().await?;
        let pending = store::claim_stale(&mut tx, &self.inner.name, age, 100).await?;
        let batch: Vec<(&str, &str, &WireMessage, bool)> = pending.iter().map(|p| ("", p.routing_key.as_str(), &p.msg, true)).collect();
        let _one_batch = self.inner.publishing.lock().await;
        let results = transport::publish_batch(ch, batch).await;
        let mut sent = Vec::new();
        for (p, result) in pending.iter().zip(results) {
            match result {
                Ok(()) => sent.push(p.id),
                Err(e) if self.set_aside(ch, &p.routing_key, &p.msg, &e).await => sent.push(p.id),
                Err(e) => tracing::warn!(error = %e, "leftover reply not sent; retrying later"),
            }
        }
        sqlx::query("DELETE FROM sagaflow_participant.outbox WHERE id = ANY($1)").bind(&sent).execute(&mut *tx).await?;
        tx.commit().await?;
        if !sent.is_empty() {
            tracing::info!(participant = %self.inner.name, count = sent.len(), "republished leftover replies");
        }
        Ok(())
    }
}

/// How a run of [`Participant::execute_batch`] ended.
impl Participant {
    /// A reply that can never be delivered as it is (its `reply_to` queue does not exist, or it
    /// is too large to publish) goes to this participant's dead-letter queue with the reason,
    /// instead of staying in the outbox for ever; `true` once it is there (delete the row).
    async fn set_aside(&self, ch: &Channel, reply_to: &str, reply: &WireMessage, e: &transport::TransportError) -> bool {
        let reason = match e {
            transport::TransportError::Unroutable { .. } => "unroutable_reply",
            transport::TransportError::TooLarge { .. } => "unpublishable",
            _ => return false,
        };
        let queue = self.inner.names.participant_queue(&self.inner.name);
        let detail = format!("the reply to `{reply_to}` cannot be delivered: {e}");
        tracing::error!(participant = %self.inner.name, reason, detail, message.id = reply.message_id.as_deref().unwrap_or(""), "dead-lettering a reply");
        let props = transport::properties(reply);
        match transport::publish_dead_letter(ch, &self.inner.names, &queue, &props, &reply.body, reason, &detail).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "could not dead-letter the reply; it stays in the outbox");
                false
            }
        }
    }
}

enum BatchRun {
    /// Committed: each command's outbox row and reply, in order.
    Done(Vec<(i64, WireMessage)>),
    /// Another delivery recorded one of the steps first; nothing was written.
    Conflict,
    /// A handler that used the transaction failed, and there was no savepoint to undo its
    /// writes alone; nothing was written.
    NeedsSavepoints,
}

/// The answer a command gets without running, from what its step already recorded: the
/// recorded outcome, or a refusal for a command that arrives after its compensation.
/// An outcome PostgreSQL can store and the orchestrator accepts: U+0000, which neither takes,
/// becomes U+FFFD wherever a handler put it (its output, a refusal's code or message, an
/// error's text), with a warning. Left as it was, the reply could never be recorded and the
/// command would be redelivered for ever.
fn storable(mut outcome: ReplyOutcome) -> ReplyOutcome {
    fn text(s: &mut String) -> bool {
        let nul = s.contains('\0');
        if nul {
            *s = s.replace('\0', "\u{FFFD}");
        }
        nul
    }
    fn value(v: &mut serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => text(s),
            serde_json::Value::Array(a) => a.iter_mut().fold(false, |changed, v| value(v) | changed),
            serde_json::Value::Object(o) => {
                let values = o.values_mut().fold(false, |changed, v| value(v) | changed);
                let keys = o.keys().any(|k| k.contains('\0'));
                if keys {
                    *o = std::mem::take(o).into_iter().map(|(k, v)| (k.replace('\0', "\u{FFFD}"), v)).collect();
                }
                values | keys
            }
            _ => false,
        }
    }
    let changed = match &mut outcome {
        ReplyOutcome::Success { output } => value(output),
        ReplyOutcome::Rejected { code, message } => text(code) | text(message),
        ReplyOutcome::TransientFailure { message } => text(message),
    };
    if changed {
        tracing::warn!("the handler's outcome holds U+0000, which PostgreSQL cannot store; replaced with U+FFFD");
    }
    outcome
}

fn answer_from(cmd: &InboundCommand, prior: store::Prior) -> Option<ReplyOutcome> {
    if cmd.kind == CommandKind::Invoke && prior.compensated {
        tracing::info!("the step was already compensated; refusing the late command");
        return Some(ReplyOutcome::Rejected {
            code: "already_compensated".into(),
            message: "this step was compensated before the command arrived".into(),
        });
    }
    let outcome = prior.outcome?;
    tracing::info!("already handled; answering from the inbox");
    Some(outcome)
}

/// Enqueue the reply for `outcome` without recording it, and commit.
async fn enqueue_only(
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    participant: &str,
    cmd: &InboundCommand,
    outcome: &ReplyOutcome,
) -> Result<(i64, WireMessage), sqlx::Error> {
    let reply = encode_reply(cmd, outcome, Timestamp::now());
    let ids = store::write_replies(&mut tx, participant, &[store::ReplyRow { cmd, record: None, reply: &reply }]).await?;
    tx.commit().await?;
    let id = ids.and_then(|ids| ids.first().copied()).ok_or_else(|| sqlx::Error::Protocol("the reply was not enqueued".into()))?;
    Ok((id, reply))
}

/// Completes on SIGTERM or Ctrl-C: what a service process waits for before it shuts down
/// (`participant.run(pool, url, shutdown_signal())`). Where SIGTERM cannot be listened for, it
/// says so and waits for Ctrl-C alone.
pub async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        tracing::warn!("cannot listen for SIGTERM; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Noop;
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Ping;
    impl Command for Ping {
        const NAME: &'static str = "svc.ping";
        const PARTICIPANT: &'static str = "svc";
        type Reply = ();
    }
    impl Handler<Ping> for Noop {
        async fn handle(&self, _cx: &mut Context<'_>, _cmd: Ping) -> crate::HandlerResult<()> {
            Ok(())
        }
    }

    fn problems(b: ParticipantBuilder) -> String {
        match b.build() {
            Err(Error::Invalid(p)) => p,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => String::new(),
        }
    }

    #[test]
    fn an_outcome_postgresql_cannot_store_has_its_nul_replaced_and_a_clean_one_is_left_alone() {
        let output = serde_json::json!({"id\u{0}": ["a\u{0}b", {"k": "\u{0}"}], "n": 1});
        let scrubbed = storable(ReplyOutcome::Success { output });
        assert_eq!(
            scrubbed,
            ReplyOutcome::Success { output: serde_json::json!({"id\u{FFFD}": ["a\u{FFFD}b", {"k": "\u{FFFD}"}], "n": 1}) }
        );
        let refusal = storable(ReplyOutcome::Rejected { code: "c\u{0}".into(), message: "\u{0}".into() });
        assert_eq!(refusal, ReplyOutcome::Rejected { code: "c\u{FFFD}".into(), message: "\u{FFFD}".into() });
        let clean = ReplyOutcome::TransientFailure { message: "the database is away".into() };
        assert_eq!(storable(clean.clone()), clean);
    }

    #[test]
    fn the_builder_names_every_problem() {
        assert_eq!(problems(Participant::builder("svc").handle::<Ping>(Noop)), "");
        let p = problems(Participant::builder("svc").handle::<Ping>(Noop).handle::<Ping>(Noop));
        assert!(p.contains("`svc.ping` is registered twice"), "{p}");
        let p = problems(Participant::builder("other").handle::<Ping>(Noop));
        assert!(p.contains("belongs to participant `svc`, not `other`"), "{p}");
        let p = problems(Participant::builder("s'vc"));
        assert!(p.contains("the name must be") && p.contains("no handlers"), "{p}");
        let config = ParticipantConfig { batch_max: 0, ..ParticipantConfig::default() };
        let p = problems(Participant::builder("svc").handle::<Ping>(Noop).config(config));
        assert!(p.contains("batch_max must be at least 1"), "{p}");
    }
}
