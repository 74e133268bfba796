//! A participant: its handlers, its configuration, and the loop that consumes its queue.
//!
//! For each batch of commands that arrived together: decode (refused → dead letter) → find the
//! handler (none → dead letter) → in one transaction: take the steps' locks and read what they
//! recorded (one round trip), answer from the record where a step already has an outcome, else
//! run the handler, record the outcomes → commit → publish the replies with confirms → ack the
//! commands. A crash after the commit leaves the commands unacked: the broker redelivers them
//! and they are answered from the record (the orchestrator dedupes a reply sent twice).
//!
//! - `config`: [`ParticipantConfig`] and [`Error`];
//! - `builder`: [`ParticipantBuilder`], the handlers checked once;
//! - `execute`: a batch of commands in one transaction, the handlers' results as replies;
//! - `reply`: publishing the replies and acking, dead letters, leftovers of earlier versions.

mod builder;
mod config;
mod execute;
mod reply;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sagaflow_amqp::transport::{self, Names, QueueOptions};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use builder::ParticipantBuilder;
pub use config::{Error, ParticipantConfig};

use builder::{CrashHook, Registered};

/// How often a participant with `retention_days` deletes its old records.
const RETENTION_EVERY: Duration = Duration::from_secs(600);

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
    /// Times the participant reconnected to RabbitMQ after losing it.
    reconnects: std::sync::atomic::AtomicU64,
    /// Commands (by name) whose handler ran longer than `slow_handler` last time: they run
    /// alone, each in its own transaction.
    slow: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Room for commands running alone: `concurrency` at once.
    alone: tokio::sync::Semaphore,
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
        ParticipantBuilder::new(name.into())
    }

    /// The participant's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// How many times it reconnected to RabbitMQ after losing it (for a metric of the service's).
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Create the tables, connect, declare the queue, and run in the background. Commands
    /// published once this returns reach the participant.
    pub async fn start(&self, pool: PgPool, amqp_url: &str) -> Result<ParticipantHandle, Error> {
        let retention_days = self.inner.config.retention_days;
        crate::store::ensure_schema(&pool, retention_days > 0).await?;
        let conn = transport::connect(amqp_url, self.inner.config.connect_timeout).await?;
        // Declared before returning, so commands published after `start` reach the queue.
        let ch = conn.create_channel().await?;
        transport::declare_participant(&ch, &self.inner.names, &self.inner.name, self.queue_options()).await?;
        ch.close(200, "declared".into()).await?;
        let token = CancellationToken::new();
        let (this, url, t) = (self.clone(), amqp_url.to_owned(), token.clone());
        let task = tokio::spawn(async move {
            if retention_days == 0 {
                return this.serve(pool, &url, Some(conn), t).await;
            }
            let pruning = this.clone().retention(pool.clone(), retention_days, t.clone());
            tokio::join!(this.serve(pool, &url, Some(conn), t), pruning).0
        });
        Ok(ParticipantHandle { token, task })
    }

    /// Delete the records older than `days`, at start and every [`RETENTION_EVERY`], until `stop`.
    async fn retention(self, pool: PgPool, days: u32, stop: CancellationToken) {
        const BATCH: i64 = 1000;
        let name = &self.inner.name;
        loop {
            let mut deleted = 0;
            loop {
                let pruned = tokio::select! {
                    () = stop.cancelled() => return,
                    r = crate::store::prune(&pool, name, days, BATCH) => r,
                };
                match pruned {
                    Ok(n) => {
                        deleted += n;
                        if n < BATCH as u64 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(participant = %name, error = %e, "retention: database error; trying again later");
                        break;
                    }
                }
            }
            if deleted > 0 {
                tracing::info!(participant = %name, records = deleted, days, "retention: deleted old step records");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RETENTION_EVERY) => {}
            }
        }
    }

    /// Run until `shutdown` completes (for a service: [`shutdown_signal`]).
    pub async fn run(&self, pool: PgPool, amqp_url: &str, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let handle = self.start(pool, amqp_url).await?;
        shutdown.await;
        handle.shutdown().await
    }

    fn queue_options(&self) -> QueueOptions {
        QueueOptions { quorum: self.inner.config.quorum_queues, single_active: false, priorities: self.inner.config.priority_queues }
    }

    /// Consume until cancelled, reconnecting when the connection drops.
    async fn serve(&self, pool: PgPool, url: &str, mut conn: Option<Connection>, token: CancellationToken) -> Result<(), Error> {
        let name = &self.inner.name;
        loop {
            let c = match conn.take() {
                Some(c) => c,
                // Once running, a participant keeps trying until it is shut down.
                None => tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    c = transport::connect(url, Duration::from_secs(24 * 3600)) => match c {
                        Ok(c) => {
                            self.inner.reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::info!(participant = %name, "reconnected to RabbitMQ");
                            c
                        }
                        Err(e) => {
                            // A refusal that retrying within `connect` cannot cure (a certificate
                            // that does not verify): tried again after a pause, not in a loop.
                            tracing::error!(participant = %name, error = %e, "cannot reconnect to RabbitMQ; trying again in 5 s");
                            tokio::select! {
                                () = token.cancelled() => return Ok(()),
                                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                            }
                            continue;
                        }
                    },
                },
            };
            match self.consume(&pool, &c, &token).await {
                Ok(()) => {
                    transport::close_connection(&c, "shutdown").await;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(participant = %name, error = %e, "lost RabbitMQ; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// One connection's life: returns `Ok` on shutdown, `Err` when the connection failed.
    async fn consume(&self, pool: &PgPool, conn: &Connection, token: &CancellationToken) -> Result<(), Error> {
        let inner = &self.inner;
        let ch = transport::confirm_channel(conn).await?;
        transport::declare_participant(&ch, &inner.names, &inner.name, self.queue_options()).await?;
        ch.basic_qos(inner.config.prefetch, BasicQosOptions::default()).await?;
        let queue = inner.names.participant_queue(&inner.name);
        let tag = format!("{}-{}", inner.name, std::process::id());
        let consumer = ch.basic_consume(queue.as_str().into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
        tracing::info!(participant = %inner.name, queue, "consuming commands");
        let _ready = inner.config.ready_file.clone().map(|path| Ready::keep(path, token.child_token()));
        let sweeping = token.child_token();
        let sweeper = tokio::spawn(self.clone().sweep_leftovers(pool.clone(), ch.clone(), sweeping.clone()));
        let (replies, committed) = tokio::sync::mpsc::unbounded_channel();
        let replying = tokio::spawn(self.clone().send_replies(ch.clone(), committed));
        // The closure holds the last sender: once the consumer returned (its batches ended), the
        // reply task publishes what they handed over and ends.
        let (this, batch_ch) = (self.clone(), ch.clone());
        let result = transport::run_batch_consumer(&ch, consumer, inner.config.batch_max, inner.config.concurrency, token, move |batch| {
            let (this, ch, pool, replies) = (this.clone(), batch_ch.clone(), pool.clone(), replies.clone());
            async move { this.process(&pool, &ch, &replies, batch).await }
        })
        .await;
        if let Err(e) = replying.await {
            tracing::error!(participant = %inner.name, error = %e, "the reply task panicked; its commands will be redelivered");
        }
        // A sweep stuck on a dead connection must not hold the reconnect: stop it where it is
        // (its transaction rolls back; what it published is sent again and deduped).
        sweeping.cancel();
        sweeper.abort();
        let _ = sweeper.await;
        if result.is_ok() {
            transport::close_channel(&ch, "shutdown").await;
        }
        result.map_err(Error::Amqp)
    }

    /// Publish, every `sweep_interval` until `stop`, the replies an earlier version of the SDK
    /// left in its outbox.
    async fn sweep_leftovers(self, pool: PgPool, ch: Channel, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.config.sweep_interval);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.sweep(&pool, &ch).await {
                        tracing::warn!(participant = %self.inner.name, error = %e, "could not publish leftover replies");
                    }
                }
            }
        }
    }
}

/// How often a participant's ready file is touched while it consumes.
pub const READY_TOUCH: Duration = Duration::from_secs(5);

/// The ready file of a consuming participant: touched every [`READY_TOUCH`] until dropped, then
/// removed.
struct Ready {
    path: std::path::PathBuf,
    stop: CancellationToken,
}

impl Ready {
    fn keep(path: std::path::PathBuf, stop: CancellationToken) -> Self {
        let (p, t) = (path.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(READY_TOUCH);
            loop {
                tokio::select! {
                    () = t.cancelled() => {
                        // Also here: a touch racing the drop must not leave the file behind.
                        let _ = std::fs::remove_file(&p);
                        return;
                    }
                    _ = tick.tick() => {
                        if let Err(e) = std::fs::write(&p, format!("{}\n", std::process::id())) {
                            tracing::warn!(path = %p.display(), error = %e, "cannot write the ready file");
                        }
                    }
                }
            }
        });
        Self { path, stop }
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether the participant whose [`ParticipantConfig::ready_file`] is `path` is consuming: the
/// file exists and was touched within `max_age` (give it a few [`READY_TOUCH`]es, e.g. 15 s).
pub fn ready_file_is_fresh(path: &std::path::Path, max_age: Duration) -> bool {
    std::fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age <= max_age))
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
    use crate::{Context, Handler};
    use sagas::Command;

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
