//! The node and the client: what they run and who owns it. [`Orchestrator::start`] runs a node:
//! the supervisor of its RabbitMQ connection (intake consumers and the outbox relay, restarted
//! on a new connection when RabbitMQ goes away), the publisher, the timers, retention, the loop
//! that tells sagas of undeliverable commands, and the API. Every one of them is a task of the
//! handle's [`JoinSet`] under a child of the handle's [`CancellationToken`]; `shutdown` cancels,
//! lets in-flight inputs commit and ack, flushes the outbox, joins every task and closes the
//! connections and the pool. [`Orchestrator::client`] runs a client instead: no consumers, only
//! a connection on which it publishes what its engine wrote.

mod consumers;
mod partitions;
mod timers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use backon::{ExponentialBuilder, Retryable};
use lapin::{Connection, ExchangeKind};
use sagaflow_amqp::pg;
use sagaflow_amqp::transport::{self, Names, QueueOptions};
use sagas::{Input, Registry, SagaId, SagaState};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, redact};
use crate::error::{Error, Result};
use crate::intake::{Engine, Events, Limits};
use crate::outbound::{self, Publisher, Publishing, Undeliverable, UndeliverableTx};
use crate::starts::{Starting, Starts};
use crate::{store, waiters};
use consumers::{Consumer, Queue};

/// A node of the orchestrator, connected to PostgreSQL (migrated) but not yet running.
pub struct Orchestrator {
    node: Arc<Node>,
    publishing: Publishing,
    starting: Starting,
}

/// What a node's tasks share.
struct Node {
    config: Config,
    engine: Engine,
    names: Names,
}

/// The tasks of a running node or client: each ends with its name and how it ended.
type Tasks = JoinSet<(&'static str, anyhow::Result<()>)>;

/// A client: what its [`Engine`] writes (starts, events, operator actions) it publishes itself,
/// right after the commit, instead of waking the nodes' relays. It consumes nothing; the nodes
/// apply the replies. See [`Orchestrator::client`].
pub struct ClientHandle {
    engine: Engine,
    stop: CancellationToken,
    tasks: Tasks,
}

/// A running node.
pub struct OrchestratorHandle {
    engine: Engine,
    api_addr: Option<std::net::SocketAddr>,
    stop: CancellationToken,
    tasks: Tasks,
}

/// Connect a pool to `url` (one server, or a primary and its standbys separated by commas: the
/// pool follows the one that accepts writes, see [`sagaflow_amqp::pg`]), retrying for up to
/// `timeout`. Its connections show in `pg_stat_activity` as `application_name` (unless the URL
/// names one).
pub async fn connect_pool(url: &str, application_name: &str, max_connections: u32, timeout: Duration) -> Result<PgPool> {
    // The statements are prepared once per connection, and PostgreSQL soon reuses one generic
    // plan for them. Chosen while the tables were small (a new deployment, or statistics
    // autovacuum has not refreshed), that plan scans whole tables and keeps doing so as they
    // grow. Every statement of a node finds its rows through an index, so sequential scans are
    // off for its connections; planning every execution instead (`plan_cache_mode`) cost ~8 %
    // of the machine's CPU in the benchmark.
    let servers = pg::parse_servers(url, |o: PgConnectOptions| {
        let o = if o.get_application_name().is_none() { o.application_name(application_name) } else { o };
        o.options([("enable_seqscan", "off")])
    })
    .map_err(|why| Error::database(format!("database_url {}", redact(url)))(sqlx::Error::Configuration(why.into())))?;
    // No ping before each use: it would cost a round trip per transaction, and a connection
    // that died shows as an error of the statement, which every caller handles anyway.
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .acquire_timeout(timeout.clamp(Duration::from_secs(1), Duration::from_secs(30)));
    // One connection first, made by hand within `timeout` in all: its error says what is wrong
    // (refused, unknown host, bad password), where a pool's says only that it timed out.
    let deadline = tokio::time::Instant::now() + timeout;
    let probe = || async {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_millis(100));
        match tokio::time::timeout(left, pg::find_primary(&servers)).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer from PostgreSQL"))),
        }
    };
    let (primary, conn) = probe
        .retry(ExponentialBuilder::default().with_max_delay(Duration::from_secs(5)).with_total_delay(Some(timeout)).without_max_times())
        .when(|e| {
            matches!(e, sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Configuration(_))
                && !certificate_refused(e)
                && tokio::time::Instant::now() < deadline
        })
        .notify(|e, wait| tracing::warn!(error = %e, retry_in_ms = wait.as_millis(), "cannot reach PostgreSQL; retrying"))
        .await
        .map_err(|e| {
            let hint = if certificate_refused(&e) {
                ": the server's certificate does not verify (with sslmode=verify-ca or verify-full it must chain to the CA in the URL's `sslrootcert`, and with verify-full name the URL's host)"
            } else {
                ""
            };
            Error::database(format!("connecting to PostgreSQL at {} (connect_timeout_s {}){hint}", redact(url), timeout.as_secs()))(e)
        })?;
    let _ = sqlx::Connection::close(conn).await;
    pg::pool_following(pool, servers, primary).await.map_err(Error::database(format!("connecting to PostgreSQL at {}", redact(url))))
}

/// Whether `e` is the server's certificate failing to verify (sqlx reports rustls's refusal as
/// an I/O error or a TLS one): retrying cannot help.
fn certificate_refused(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Tls(_) | sqlx::Error::Io(_)) && transport::certificate_refused(e)
}

impl Orchestrator {
    /// Validate `config`, connect to PostgreSQL and run the migrations.
    pub async fn connect(config: Config, registry: Registry) -> Result<Self> {
        config.validate()?;
        if let Some((definition, step, child)) = registry.missing_children().into_iter().next() {
            return Err(Error::Definitions(format!(
                "step `{step}` of `{definition}` starts child saga `{child}`, which is not registered: register its definition too"
            )));
        }
        let name = application_name(&config.node_id);
        let pool = connect_pool(&config.database_url, &name, config.database_max_connections, config.connect_timeout()).await?;
        store::migrate(&pool).await?;
        let names = Names::new(config.namespace.clone()).with_partitions(config.partitions);
        let (publisher, publishing) = Publisher::new(pool.clone());
        let (starts, starting) = Starts::new(pool.clone(), config.node_id.as_str().into());
        let events = Events { steps: config.step_events, started: config.started_events };
        let limits = Limits { waiters: config.max_waiters, body: config.max_body_bytes };
        let engine = Engine::new(pool, Arc::new(registry), names.clone(), &config.node_id, events, (publisher, starts), limits);
        Ok(Self { node: Arc::new(Node { config, engine, names }), publishing, starting })
    }

    /// The engine, to start sagas and apply inputs from Rust.
    pub fn engine(&self) -> &Engine {
        &self.node.engine
    }

    /// Connect to RabbitMQ, declare the topology and run in the background.
    pub async fn start(self) -> Result<OrchestratorHandle> {
        let Self { node, publishing, starting } = self;
        let conn = node.connect_declared().await?;
        // A node applies replies: it keeps the sagas it wrote (a client does not).
        node.engine.recent.enable();
        let stop = CancellationToken::new();
        let mut tasks = Tasks::new();
        tasks.spawn(named("the start writer", ends(starting.run(stop.child_token()))));
        let api_addr = node.serve_api(&mut tasks, stop.child_token()).await?;
        // The publisher stops once the supervisor has stopped the consumers, or has ended.
        let outbound = CancellationToken::new();
        let undeliverable = spawn_outbound(&mut tasks, &node.engine, publishing, outbound.clone());
        let cfg = &node.config;
        let (engine, poll, batch, t) = (node.engine.clone(), Duration::from_millis(cfg.timer_poll_ms), cfg.timer_batch, stop.child_token());
        tasks.spawn(named("the timers", ends(timers::run(engine, poll, batch, t))));
        if cfg.retention_days > 0 {
            let (pool, days, t) = (node.engine.pool().clone(), cfg.retention_days, stop.child_token());
            tasks.spawn(named("retention", ends(retention(pool, days, t))));
        }
        let (n, t) = (Arc::clone(&node), stop.child_token());
        let supervise = async move { n.supervise(conn, undeliverable, t, outbound.drop_guard()).await };
        tasks.spawn(named("the connection supervisor", supervise));
        Ok(OrchestratorHandle { engine: node.engine.clone(), api_addr, stop, tasks })
    }

    /// Run as a client, not a node: connect to RabbitMQ and publish what the engine writes
    /// right after its commit (one round trip to the broker instead of a notification, a relay's
    /// transaction and a publish), on a connection kept open and reopened when lost. While it
    /// is lost, and for what is still unpublished when the client stops, the nodes' relays
    /// publish the rows: nothing written is lost.
    pub async fn client(self) -> Result<ClientHandle> {
        let Self { node, publishing, starting } = self;
        let (conn, ch) = node.open_publisher().await?;
        node.engine.publisher.set_channel(Some(ch.clone()));
        let stop = CancellationToken::new();
        let mut tasks = Tasks::new();
        tasks.spawn(named("the start writer", ends(starting.run(stop.child_token()))));
        let outbound = stop.child_token();
        drop(spawn_outbound(&mut tasks, &node.engine, publishing, outbound));
        let (n, t) = (Arc::clone(&node), stop.child_token());
        tasks.spawn(named("the client connection", ends(async move { n.keep_publishing(conn, ch, t).await })));
        Ok(ClientHandle { engine: node.engine.clone(), stop, tasks })
    }

    /// Run until `shutdown` completes, then shut down gracefully; a task that ends on its own
    /// before that stops the node with an error naming it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut handle = self.start().await?;
        let ended = tokio::select! {
            () = shutdown => None,
            ended = handle.tasks.join_next() => ended,
        };
        let Some(ended) = ended else { return handle.shutdown().await };
        let why = match ended {
            Ok((task, Ok(()))) => format!("{task} stopped on its own"),
            Ok((task, Err(e))) => format!("{task} failed: {e:#}"),
            Err(e) => format!("a task panicked: {e}"),
        };
        tracing::error!(why, "the node is stopping");
        if let Err(e) = handle.shutdown().await {
            tracing::warn!(error = %format!("{e:#}"), "shutting down after the failure");
        }
        Err(Error::Task(format!("the node stopped: {why}")))
    }
}

/// Run the publisher (until `stop`) and the loop that tells sagas of undeliverable commands (until
/// every sender of the one returned is gone) as tasks of `tasks`.
fn spawn_outbound(tasks: &mut Tasks, engine: &Engine, publishing: Publishing, stop: CancellationToken) -> UndeliverableTx {
    let (undeliverable, told) = mpsc::unbounded_channel();
    let u = undeliverable.clone();
    tasks.spawn(named("the undeliverable-command loop", tell_undeliverable(engine.clone(), told, stop.clone())));
    tasks.spawn(named("the publisher", ends(publishing.run(u, stop))));
    undeliverable
}

/// What a node's connections are called in `pg_stat_activity`: `sagaflow node <node_id>`.
pub fn application_name(node_id: &str) -> String {
    // PostgreSQL keeps 63 bytes of it.
    sagas::protocol::clip(&format!("sagaflow node {node_id}"), 63).into_owned()
}

/// `task`, ending with `name`.
async fn named(name: &'static str, task: impl Future<Output = anyhow::Result<()>>) -> (&'static str, anyhow::Result<()>) {
    (name, task.await)
}

/// `task`, a loop that cannot fail, as a task that can.
async fn ends(task: impl Future<Output = ()>) -> anyhow::Result<()> {
    task.await;
    Ok(())
}

/// Apply commands that could not be delivered as failed attempts of their steps, off the
/// publishing paths, until every path has stopped, retrying while the database is away; once
/// `stopping`, a command that cannot be recorded is given up with an error (its step's timeout,
/// or an operator, moves the saga on) rather than holding the shutdown.
async fn tell_undeliverable(
    engine: Engine,
    mut rx: mpsc::UnboundedReceiver<Undeliverable>,
    stopping: CancellationToken,
) -> anyhow::Result<()> {
    while let Some((saga, reply)) = rx.recv().await {
        let mut delay = Duration::from_millis(100);
        let input = Input::Reply(reply);
        while let Err(e) = engine.apply(saga, &input, None).await {
            if stopping.is_cancelled() {
                tracing::error!(error = %e, saga.id = %saga, "shutting down: an undeliverable command could not be recorded; its saga waits for the step's timeout or an operator");
                break;
            }
            tracing::warn!(error = %e, saga.id = %saga, "could not record an undeliverable command; retrying");
            tokio::select! {
                () = stopping.cancelled() => {}
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
    Ok(())
}

/// How one connection's run ended.
enum Ended {
    /// The node is shutting down.
    Shutdown,
    /// The connection or a loop on it failed: reconnect.
    Lost(String),
}

impl Node {
    /// Connect to RabbitMQ (retrying for up to `connect_timeout`) and declare the topology.
    async fn connect_declared(&self) -> Result<Connection> {
        let conn = transport::connect(&self.config.amqp_url, self.config.connect_timeout())
            .await
            .map_err(Error::amqp(format!("connecting to RabbitMQ at {}", redact(&self.config.amqp_url))))?;
        self.declare(&conn).await.map_err(Error::amqp("declaring the AMQP topology"))?;
        Ok(conn)
    }

    /// Connect, declare the topology, open a confirm channel.
    async fn open_publisher(&self) -> Result<(Connection, lapin::Channel)> {
        let conn = self.connect_declared().await?;
        let ch = transport::confirm_channel(&conn).await.map_err(Error::amqp("opening a channel"))?;
        Ok((conn, ch))
    }

    /// The client's connection: watch it, reopen it when lost, close it on `stop`.
    async fn keep_publishing(&self, conn: Connection, ch: lapin::Channel, stop: CancellationToken) {
        let mut current = Some((conn, ch));
        loop {
            let (conn, ch) = match current.take() {
                Some(c) => c,
                None => tokio::select! {
                    () = stop.cancelled() => return,
                    c = self.open_publisher() => match c {
                        Ok((conn, ch)) => {
                            self.engine.metrics().reconnected();
                            tracing::info!("reconnected to RabbitMQ; publishing again");
                            self.engine.publisher.set_channel(Some(ch.clone()));
                            (conn, ch)
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "cannot reconnect to RabbitMQ; the relays publish meanwhile");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    },
                },
            };
            let stopped = tokio::select! {
                () = stop.cancelled() => true,
                () = transport::closed(&conn, &ch) => false,
            };
            self.engine.publisher.set_channel(None);
            if stopped {
                transport::close_connection(&conn, "shutdown").await;
                return;
            }
            tracing::warn!("lost RabbitMQ; the relays publish until the client reconnects");
            transport::close_connection(&conn, "reconnecting").await;
        }
    }

    /// Bind the API (when `api_addr` is set) and serve it as a task of `tasks` until `stop`.
    async fn serve_api(&self, tasks: &mut Tasks, stop: CancellationToken) -> Result<Option<std::net::SocketAddr>> {
        if self.config.api_addr.is_empty() {
            return Ok(None);
        }
        let listener = tokio::net::TcpListener::bind(&self.config.api_addr)
            .await
            .map_err(Error::io(format!("binding the API to {}", self.config.api_addr)))?;
        let addr = listener.local_addr().map_err(Error::io("reading the API's address"))?;
        let state = crate::api::ApiState::new(
            self.engine.clone(),
            Some(self.config.api_token.clone()).filter(|t| !t.is_empty()),
            self.config.amqp_url.clone(),
            self.config.max_body_bytes,
        );
        let app = crate::api::app(state);
        tracing::info!(%addr, "serving the API, the web page and /metrics");
        let serve = async move {
            axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await.context("the API server stopped")
        };
        tasks.spawn(named("the API", serve));
        Ok(Some(addr))
    }

    /// Declare the exchanges and queues this node uses.
    async fn declare(&self, conn: &Connection) -> Result<(), lapin::Error> {
        let ch = conn.create_channel().await?;
        transport::declare_exchange(&ch, &self.names.commands_exchange(), ExchangeKind::Direct).await?;
        transport::declare_exchange(&ch, &self.names.events_exchange(), ExchangeKind::Topic).await?;
        let opts = QueueOptions { quorum: self.config.quorum_queues, single_active: false, priorities: false };
        // The one replies queue stays with partitions too: replies to commands written before
        // they were turned on, or by a client without them, still arrive there.
        transport::declare_queue(&ch, &self.names, &self.names.replies_queue(), opts).await?;
        let partition = QueueOptions { single_active: true, ..opts };
        for p in 0..self.names.partitions() {
            transport::declare_queue(&ch, &self.names, &self.names.partition_queue(p), partition).await?;
        }
        transport::declare_queue(&ch, &self.names, &self.names.inbound_queue(), opts).await?;
        let opts = QueueOptions { priorities: self.config.priority_queues, ..opts };
        if self.config.declare_participant_queues {
            for p in self.engine.registry().participants() {
                transport::declare_participant(&ch, &self.names, p, opts).await?;
            }
        } else if let Some(p) = crate::children::participant(self.engine.registry()) {
            // The nodes are this participant: its queue is theirs to declare.
            transport::declare_participant(&ch, &self.names, p, opts).await?;
        }
        ch.close(200, "declared".into()).await
    }

    /// Keep a connection to RabbitMQ and run the intake consumers and the relay on it until
    /// `stop`, reconnecting when it is lost. `outbound` stops the publisher when this returns.
    async fn supervise(
        &self,
        first: Connection,
        undeliverable: UndeliverableTx,
        stop: CancellationToken,
        outbound: tokio_util::sync::DropGuard,
    ) -> anyhow::Result<()> {
        let mut conn = Some(first);
        let mut lost_at = None;
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => tokio::select! {
                    () = stop.cancelled() => break,
                    c = transport::connect(&self.config.amqp_url, Duration::from_secs(3600)) => match c {
                        Ok(c) => {
                            self.engine.metrics().reconnected();
                            tracing::info!(down_ms = lost_at.map_or(0, |t: tokio::time::Instant| t.elapsed().as_millis()), "reconnected to RabbitMQ");
                            c
                        }
                        Err(e) => {
                            // A refusal that retrying within `connect` cannot cure (a certificate
                            // that does not verify): tried again after a pause, not in a loop.
                            tracing::error!(error = %e, "cannot reconnect to RabbitMQ; trying again in 5 s");
                            tokio::select! {
                                () = stop.cancelled() => break,
                                () = tokio::time::sleep(RECONNECT_PAUSE) => {}
                            }
                            continue;
                        }
                    },
                },
            };
            let c = Arc::new(c);
            match self.run_connection(&c, &undeliverable, &stop).await {
                Ended::Shutdown => {
                    transport::close_connection(&c, "shutdown").await;
                    break;
                }
                Ended::Lost(why) => {
                    tracing::warn!(why, "lost RabbitMQ; reconnecting");
                    lost_at = Some(tokio::time::Instant::now());
                    transport::close_connection(&c, "reconnecting").await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        drop(outbound);
        Ok(())
    }

    /// One connection's life: declare, open the channels, run the consumers and the relay until
    /// `stop` or a failure, then stop consuming, let in-flight inputs commit and ack, and flush
    /// the outbox.
    async fn run_connection(&self, c: &Arc<Connection>, undeliverable: &UndeliverableTx, stop: &CancellationToken) -> Ended {
        if let Err(e) = self.declare(c).await {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Ended::Lost(format!("declaring the topology failed: {e}"));
        }
        // The queue of child steps' commands is consumed only when the definitions start child
        // sagas: its channel is opened then only.
        let children = crate::children::participant(self.engine.registry()).is_some();
        let channels = async {
            Ok::<_, lapin::Error>((
                [
                    transport::confirm_channel(c).await?,
                    transport::confirm_channel(c).await?,
                    transport::confirm_channel(c).await?,
                    transport::confirm_channel(c).await?,
                    c.create_channel().await?,
                ],
                if children { Some(transport::confirm_channel(c).await?) } else { None },
            ))
        };
        let ([replies_ch, inbound_ch, relay_ch, publish_ch, events_ch], children_ch) = match channels.await {
            Ok(chs) => chs,
            Err(e) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Ended::Lost(format!("opening channels failed: {e}"));
            }
        };
        let cfg = &self.config;
        // The loops of this connection stop on tokens of their own, children of the node's.
        let (consuming, relaying) = (stop.child_token(), stop.child_token());
        self.engine.publisher.set_channel(Some(publish_ch));
        let mut consumers = JoinSet::new();
        let children = children_ch.map(|ch| (Queue::Children, ch));
        for (q, qch) in [(Queue::Replies, replies_ch), (Queue::Inbound, inbound_ch)].into_iter().chain(children) {
            let (consumer, t) = (self.consumer(), consuming.clone());
            consumers.spawn(async move { consumer.run(qch, q, t).await });
        }
        if self.names.partitions() > 0 {
            let (consumer, conn, pool, t) = (self.consumer(), Arc::clone(c), self.engine.pool().clone(), consuming.clone());
            let (node, n) = (self.config.node_id.clone(), self.names.partitions());
            consumers.spawn(partitions::run(consumer, conn, pool, node, n, t));
        }
        // The lifecycle events that wake the clients waiting for sagas to settle.
        // Without them the node still serves waits (each reads its saga every second): a failure
        // here does not take the consumers down.
        let (waiters, names, t) = (self.engine.waiters.clone(), self.names.clone(), consuming.clone());
        consumers.spawn(async move {
            if let Err(e) = waiters::listen(waiters, events_ch, names, t.clone()).await {
                tracing::warn!(error = %format!("{e:#}"), "cannot hear the lifecycle events; clients waiting on this node read their saga every second");
                t.cancelled().await;
            }
            Ok(())
        });
        let poll = Duration::from_millis(cfg.relay_poll_ms);
        let relay = outbound::relay(self.engine.pool().clone(), relay_ch, cfg.relay_batch, poll, undeliverable.clone(), relaying.clone());
        let mut relay = tokio::spawn(relay);
        let failed = tokio::select! {
            biased;
            () = stop.cancelled() => None,
            Some(r) = consumers.join_next() => Some(match r {
                Ok(Ok(())) => "a consumer stopped".to_owned(),
                Ok(Err(e)) => format!("a consumer failed: {e:#}"),
                Err(e) => format!("a consumer panicked: {e}"),
            }),
            r = &mut relay => Some(match r {
                Ok(Ok(())) => "the relay stopped".to_owned(),
                Ok(Err(e)) => format!("the relay failed: {e:#}"),
                Err(e) => format!("the relay panicked: {e}"),
            }),
        };
        // A loop that ended because shutdown began is not a failure.
        let failed = failed.filter(|_| !stop.is_cancelled());
        // Stop consuming and let in-flight inputs commit and ack ...
        consuming.cancel();
        while consumers.join_next().await.is_some() {}
        // ... from here on, what is written waits for a relay ...
        self.engine.publisher.set_channel(None);
        // ... which flushes the outbox and stops.
        relaying.cancel();
        if !relay.is_finished() || failed.is_none() {
            match relay.await {
                Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "the relay stopped with an error"),
                Err(e) => tracing::error!(error = %e, "the relay panicked"),
                Ok(Ok(())) => {}
            }
        }
        failed.map_or(Ended::Shutdown, Ended::Lost)
    }

    /// A consumer of the intake queues, configured as this node is.
    fn consumer(&self) -> Consumer {
        let cfg = &self.config;
        Consumer {
            engine: self.engine.clone(),
            names: self.names.clone(),
            max_body: cfg.max_body_bytes,
            prefetch: cfg.prefetch,
            concurrency: cfg.concurrency,
            batch_max: cfg.batch_max,
        }
    }
}

/// The pause before trying again when reconnecting to RabbitMQ failed for good.
const RECONNECT_PAUSE: Duration = Duration::from_secs(5);

/// How often a node deletes what is past `retention_days` (and once when it starts).
const RETENTION_EVERY: Duration = Duration::from_secs(600);

/// Delete finished sagas and inbox entries older than `days`, in batches, until `token` is
/// cancelled. Every node runs it; the batches skip rows another node is deleting.
async fn retention(pool: sqlx::PgPool, days: u32, token: CancellationToken) {
    loop {
        let mut total = store::Pruned::default();
        loop {
            match store::prune(&pool, days, 1000).await {
                Ok(p) => {
                    total.sagas += p.sagas;
                    total.inbox += p.inbox;
                    if p.sagas < 1000 && p.inbox < 1000 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention: database error; trying again later");
                    break;
                }
            }
            if token.is_cancelled() {
                return;
            }
        }
        if total != store::Pruned::default() {
            tracing::info!(sagas = total.sagas, inbox = total.inbox, days, "retention: deleted finished sagas and old inbox entries");
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(RETENTION_EVERY) => {}
        }
    }
}

impl ClientHandle {
    /// The engine, to start sagas and send events from Rust.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Stop publishing, close the connection and the pool; rows not yet published stay for the
    /// relays.
    pub async fn shutdown(self) -> Result<()> {
        wind_down(&self.engine, &self.stop, self.tasks).await
    }
}

impl OrchestratorHandle {
    /// The engine, to start sagas and apply inputs from Rust.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Where the API listens, when it is served.
    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.api_addr
    }

    /// Stop consuming, finish in-flight inputs, flush the outbox, join every task, close the
    /// connections and the pool.
    pub async fn shutdown(self) -> Result<()> {
        wind_down(&self.engine, &self.stop, self.tasks).await
    }
}

/// Cancel `stop`, join every task of `tasks`, close the pool; the first failure is returned
/// once everything has stopped.
async fn wind_down(engine: &Engine, stop: &CancellationToken, mut tasks: Tasks) -> Result<()> {
    stop.cancel();
    let mut first = None;
    while let Some(ended) = tasks.join_next().await {
        let failure = match ended {
            Ok((_, Ok(()))) => continue,
            Ok((task, Err(e))) => Error::Task(format!("{task} failed: {e:#}")),
            Err(e) => Error::Task(format!("a task panicked: {e}")),
        };
        tracing::warn!(error = %failure, "while shutting down");
        first.get_or_insert(failure);
    }
    close_pool(engine.pool()).await;
    first.map_or(Ok(()), Err)
}

/// How long closing the pool may wait for its connections at shutdown.
const POOL_CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Close `pool`, waiting at most [`POOL_CLOSE_WAIT`] for its connections. sqlx's `close` waits
/// for every connection to come back, and one handed back in the same moment can be missed
/// (it then waits for ever): a shutdown must not hang on that, and what is left open is closed
/// with the process (or when the pool's last handle goes).
async fn close_pool(pool: &PgPool) {
    if tokio::time::timeout(POOL_CLOSE_WAIT, pool.close()).await.is_err() {
        tracing::warn!(open = pool.size(), "the database pool did not close within 10 s; leaving its last connections to be dropped");
    }
}

/// Wait until saga `id` is settled (completed, compensated or stopped) or `timeout` passes.
pub async fn wait_settled(pool: &PgPool, id: SagaId, timeout: Duration) -> Result<SagaState> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let st = store::load(pool, id).await.map_err(Error::database("reading a saga"))?.ok_or(Error::NoSuchSaga(id))?;
        if st.status.is_settled() {
            return Ok(st);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::NotSettled { id, status: st.status, waited: timeout });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
