//! A participant: its handlers, its configuration, and the loop that consumes its queue.
//!
//! For each command: decode (refused → dead letter) → find the handler (none → dead letter)
//! → in one transaction: answer from the inbox record if the step already has an outcome,
//! else run the handler, record its outcome, write the reply to the outbox → commit →
//! publish the reply with a confirm → ack the command; the reply's outbox row is deleted in a
//! batch with others (a crash before that republishes it; the orchestrator dedupes).

use std::collections::HashMap;
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
use crate::outbox::BatchDeleter;
use crate::store;
use crate::transport::{self, Names, QueueOptions};

/// How a participant runs. Every field has a default.
#[derive(Clone, Debug)]
pub struct ParticipantConfig {
    /// Namespace of the AMQP names; must match the orchestrator's. Default `sagaflow`.
    pub namespace: String,
    /// Unacked commands the broker may send ahead. Default 32.
    pub prefetch: u16,
    /// Commands handled at once. Default 16.
    pub concurrency: usize,
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
            prefetch: 32,
            concurrency: 16,
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
        if self.handlers.is_empty() {
            problems.push("no handlers".into());
        }
        if self.config.prefetch == 0 || self.config.concurrency == 0 {
            problems.push("prefetch and concurrency must be at least 1".into());
        }
        if !problems.is_empty() {
            return Err(Error::Invalid(format!("participant `{}`: {}", self.name, problems.join("; "))));
        }
        let names = Names::new(self.config.namespace.clone());
        Ok(Participant {
            inner: Arc::new(Inner {
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
            let deleter = BatchDeleter::spawn(pool.clone(), "sagaflow_participant.outbox");
            this.serve(pool, &deleter, &url, Some(conn), t).await
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
        let result = transport::run_consumer(&ch, consumer, inner.config.concurrency, token, |delivery| {
            let (this, ch, pool, deleter) = (self.clone(), ch.clone(), pool.clone(), deleter.clone());
            async move { this.process(&pool, &deleter, &ch, delivery).await }
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

    async fn process(&self, pool: &PgPool, deleter: &BatchDeleter, ch: &Channel, d: Delivery) {
        let inner = &self.inner;
        let queue = inner.names.participant_queue(&inner.name);
        let msg = transport::wire_from_delivery(&d);
        let cmd = match decode_command(&msg, inner.config.max_body_bytes) {
            Ok(cmd) => cmd,
            Err(e) => return self.refuse(ch, &queue, &d, e.code(), &e.to_string()).await,
        };
        let Some(reg) = inner.handlers.get(&cmd.command) else {
            let detail = format!("participant `{}` has no handler for `{}`", inner.name, cmd.command);
            return self.refuse(ch, &queue, &d, "unknown_command", &detail).await;
        };
        if reg.kind != cmd.kind {
            let detail = format!("`{}` is registered as {} but arrived as {}", cmd.command, reg.kind.as_str(), cmd.kind.as_str());
            return self.refuse(ch, &queue, &d, "unknown_command", &detail).await;
        }
        let trace_id = cmd.traceparent.as_deref().and_then(|t| t.split('-').nth(1)).unwrap_or("");
        let span = tracing::info_span!("command", participant = %inner.name, saga.id = %cmd.saga.saga_id, step.name = %cmd.step_name, kind = cmd.kind.as_str(), attempt = cmd.attempt, message.id = %cmd.message_id, trace.id = trace_id);
        async {
            match self.execute(pool, reg, &cmd).await {
                Ok(_) if inner.crash_after_commit.as_ref().is_some_and(|crash| crash(&cmd)) => {
                    tracing::warn!("fault injection: crashing after the commit, before the reply and the ack");
                    let _ = transport::requeue(&d).await;
                }
                Ok((id, reply)) => {
                    match transport::publish_confirmed(ch, "", &cmd.reply_to, &reply, true).await {
                        Ok(()) => deleter.delete(id),
                        Err(e) => tracing::warn!(error = %e, "reply not sent now; it stays in the outbox and is retried"),
                    }
                    if let Err(e) = transport::ack(&d).await {
                        tracing::warn!(error = %e, "ack failed; the command will be redelivered and answered from the inbox");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "database unavailable; the command goes back to the queue");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let _ = transport::requeue(&d).await;
                }
            }
        }
        .instrument(span)
        .await;
    }

    async fn refuse(&self, ch: &Channel, queue: &str, d: &Delivery, reason: &str, detail: &str) {
        if let Err(e) = transport::dead_letter(ch, &self.inner.names, queue, d, reason, detail).await {
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
            let mut tx = pool.begin().await?;
            // A step's command and its compensation never run at the same time here: a
            // compensation waits for a slow command to finish, and a command that arrives
            // after its compensation is refused without running.
            store::lock_step(&mut tx, name, cmd).await?;
            let prior = store::prior(&mut tx, name, cmd).await?;
            if cmd.kind == CommandKind::Invoke && prior.compensated {
                tracing::info!("the step was already compensated; refusing the late command");
                let outcome = ReplyOutcome::Rejected {
                    code: "already_compensated".into(),
                    message: "this step was compensated before the command arrived".into(),
                };
                return enqueue_only(tx, name, cmd, &outcome).await;
            }
            if let Some(outcome) = prior.outcome {
                tracing::info!("already handled; answering from the inbox");
                return enqueue_only(tx, name, cmd, &outcome).await;
            }
            let outcome = match refusal.take() {
                Some(outcome) => outcome,
                None => {
                    let result = {
                        let mut cx = Context { tx: &mut tx, cmd };
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
                            let outcome = ReplyOutcome::TransientFailure { message: format!("{e:#}") };
                            return enqueue_only(pool.begin().await?, name, cmd, &outcome).await;
                        }
                    }
                }
            };
            let reply = encode_reply(cmd, &outcome, Timestamp::now());
            match store::record_and_enqueue(&mut tx, name, cmd, &outcome, &cmd.reply_to, &reply).await? {
                Some(id) => {
                    tx.commit().await?;
                    return Ok((id, reply));
                }
                // Another delivery of this step committed first: undo ours, answer from its record.
                None => tx.rollback().await?,
            }
        }
    }

    /// Republish replies a crash left in the outbox.
    async fn sweep(&self, pool: &PgPool, ch: &Channel) -> Result<(), Error> {
        let age = i64::try_from(self.inner.config.sweep_interval.as_millis()).unwrap_or(i64::MAX);
        let mut tx = pool.begin().await?;
        let pending = store::claim_stale(&mut tx, &self.inner.name, age, 100).await?;
        let batch: Vec<(&str, &str, &WireMessage, bool)> = pending.iter().map(|p| ("", p.routing_key.as_str(), &p.msg, true)).collect();
        let results = transport::publish_batch(ch, batch).await;
        let mut sent = Vec::new();
        for (p, result) in pending.iter().zip(results) {
            match result {
                Ok(()) => sent.push(p.id),
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

/// Enqueue the reply for `outcome` without recording it, and commit.
async fn enqueue_only(
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    participant: &str,
    cmd: &InboundCommand,
    outcome: &ReplyOutcome,
) -> Result<(i64, WireMessage), sqlx::Error> {
    let reply = encode_reply(cmd, outcome, Timestamp::now());
    let id = store::enqueue(&mut tx, participant, &cmd.reply_to, &reply).await?;
    tx.commit().await?;
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
