//! The node: intake consumers, the outbox relay and the timers, in one `JoinSet` under a
//! `CancellationToken`. [`Orchestrator::start`] returns a handle whose `shutdown` stops
//! consuming, lets in-flight inputs finish, flushes the outbox and closes the connections.
//! When RabbitMQ goes away the AMQP loops are restarted on a new connection; the database
//! pool reconnects on its own. [`Orchestrator::client`] runs a client instead: no consumers,
//! only a connection on which it publishes what its engine wrote.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use backon::{ExponentialBuilder, Retryable};
use lapin::{Connection, ExchangeKind};
use participants_sdk::transport::{self, Names, QueueOptions};
use sagas::{Registry, SagaId, SagaState};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, redact};
use crate::consumers::{Consumer, Queue};
use crate::intake::Engine;
use crate::{relay, store, timers};

/// A node of the orchestrator, connected to PostgreSQL (migrated) but not yet running.
pub struct Orchestrator {
    config: Config,
    engine: Engine,
    names: Names,
}

/// A client: what its [`Engine`] writes (starts, events, operator actions) it publishes itself,
/// right after the commit, instead of waking the nodes' relays. It consumes nothing; the nodes
/// apply the replies. See [`Orchestrator::client`].
pub struct ClientHandle {
    engine: Engine,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A running node.
pub struct OrchestratorHandle {
    engine: Engine,
    api_addr: Option<std::net::SocketAddr>,
    api: Option<tokio::task::JoinHandle<()>>,
    intake: CancellationToken,
    relay: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Connect a pool to `url`, retrying for up to `timeout`.
pub async fn connect_pool(url: &str, max_connections: u32, timeout: Duration) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse().with_context(|| format!("database_url {}", redact(url)))?;
    // The statements are prepared once per connection, and PostgreSQL soon reuses one generic
    // plan for them. Chosen while the tables were small (a new deployment, or statistics
    // autovacuum has not refreshed), that plan scans whole tables and keeps doing so as they
    // grow. Every statement of a node finds its rows through an index, so sequential scans are
    // off for its connections; planning every execution instead (`plan_cache_mode`) cost ~8 %
    // of the machine's CPU in the benchmark.
    let options = options.options([("enable_seqscan", "off")]);
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
        match tokio::time::timeout(left, <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer from PostgreSQL"))),
        }
    };
    let conn = probe
        .retry(ExponentialBuilder::default().with_max_delay(Duration::from_secs(5)).with_total_delay(Some(timeout)).without_max_times())
        .when(|e| matches!(e, sqlx::Error::Io(_) | sqlx::Error::Tls(_)) && tokio::time::Instant::now() < deadline)
        .notify(|e, wait| tracing::warn!(error = %e, retry_in_ms = wait.as_millis(), "cannot reach PostgreSQL; retrying"))
        .await
        .with_context(|| format!("connecting to PostgreSQL at {} (connect_timeout_s {})", redact(url), timeout.as_secs()))?;
    let _ = sqlx::Connection::close(conn).await;
    pool.connect_with(options).await.with_context(|| format!("connecting to PostgreSQL at {}", redact(url)))
}

impl Orchestrator {
    /// Validate `config`, connect to PostgreSQL and run the migrations.
    pub async fn connect(config: Config, registry: Registry) -> anyhow::Result<Self> {
        config.validate()?;
        let pool = connect_pool(&config.database_url, config.database_max_connections, config.connect_timeout()).await?;
        store::migrate(&pool).await.context("running the migrations")?;
        let names = Names::new(config.namespace.clone());
        let engine = Engine::new(pool, Arc::new(registry), names.clone(), &config.node_id, config.step_events);
        Ok(Self { config, engine, names })
    }

    /// The engine, to start sagas and apply inputs from Rust.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Connect to RabbitMQ, declare the topology and run in the background.
    pub async fn start(self) -> anyhow::Result<OrchestratorHandle> {
        let conn = self.connect_declared().await?;
        let (intake, relay) = (CancellationToken::new(), CancellationToken::new());
        let engine = self.engine.clone();
        let (api_addr, api) = self.serve_api(intake.clone()).await?;
        let (i, r) = (intake.clone(), relay.clone());
        let task = tokio::spawn(async move { self.supervise(conn, i, r).await });
        Ok(OrchestratorHandle { engine, api_addr, api, intake, relay, task })
    }

    /// Run as a client, not a node: connect to RabbitMQ and publish what the engine writes
    /// right after its commit (one round trip to the broker instead of a notification, a relay's
    /// transaction and a publish), on a connection kept open and reopened when lost. While it
    /// is lost, and for what is still unpublished when the client stops, the nodes' relays
    /// publish the rows: nothing written is lost.
    pub async fn client(self) -> anyhow::Result<ClientHandle> {
        let (conn, ch) = self.open_publisher().await?;
        self.engine.publisher.set_channel(Some(ch.clone()));
        let stop = CancellationToken::new();
        let (engine, token) = (self.engine.clone(), stop.clone());
        let task = tokio::spawn(async move { self.keep_publishing(conn, ch, token).await });
        Ok(ClientHandle { engine, stop, task })
    }

    /// Connect to RabbitMQ (retrying for up to `connect_timeout`) and declare the topology.
    async fn connect_declared(&self) -> anyhow::Result<Connection> {
        let conn = transport::connect(&self.config.amqp_url, self.config.connect_timeout())
            .await
            .with_context(|| format!("connecting to RabbitMQ at {}", redact(&self.config.amqp_url)))?;
        self.declare(&conn).await.context("declaring the AMQP topology")?;
        Ok(conn)
    }

    /// Connect, declare the topology, open a confirm channel.
    async fn open_publisher(&self) -> anyhow::Result<(Connection, lapin::Channel)> {
        let conn = self.connect_declared().await?;
        let ch = transport::confirm_channel(&conn).await.context("opening a channel")?;
        Ok((conn, ch))
    }

    /// The client's connection: watch it, reopen it when lost, close it on `stop`.
    async fn keep_publishing(self, conn: Connection, ch: lapin::Channel, stop: CancellationToken) {
        let mut current = Some((conn, ch));
        loop {
            let (conn, ch) = match current.take() {
                Some(c) => c,
                None => tokio::select! {
                    () = stop.cancelled() => return,
                    c = self.open_publisher() => match c {
                        Ok((conn, ch)) => {
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
            while conn.status().connected() && ch.status().connected() {
                tokio::select! {
                    () = stop.cancelled() => {
                        self.engine.publisher.set_channel(None);
                        let _ = conn.close(200, "shutdown".into()).await;
                        return;
                    }
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            self.engine.publisher.set_channel(None);
            tracing::warn!("lost RabbitMQ; the relays publish until the client reconnects");
            let _ = conn.close(200, "reconnecting".into()).await;
        }
    }

    /// Run until `shutdown` completes, then shut down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let handle = self.start().await?;
        tokio::select! {
            () = shutdown => handle.shutdown().await,
            r = handle.task_finished() => r,
        }
    }

    /// Bind the API (when `api_addr` is set) and serve it until `stop`.
    async fn serve_api(
        &self,
        stop: CancellationToken,
    ) -> anyhow::Result<(Option<std::net::SocketAddr>, Option<tokio::task::JoinHandle<()>>)> {
        if self.config.api_addr.is_empty() {
            return Ok((None, None));
        }
        let listener = tokio::net::TcpListener::bind(&self.config.api_addr)
            .await
            .with_context(|| format!("binding the API to {}", self.config.api_addr))?;
        let addr = listener.local_addr()?;
        let state = crate::api::ApiState::new(
            self.engine.clone(),
            Some(self.config.api_token.clone()).filter(|t| !t.is_empty()),
            self.config.amqp_url.clone(),
            self.config.max_body_bytes,
        );
        let app = crate::api::app(state);
        tracing::info!(%addr, "serving the API, the web page and /metrics");
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await {
                tracing::error!(error = %e, "the API server stopped");
            }
        });
        Ok((Some(addr), Some(task)))
    }

    async fn declare(&self, conn: &Connection) -> Result<(), lapin::Error> {
        let ch = conn.create_channel().await?;
        transport::declare_exchange(&ch, &self.names.commands_exchange(), ExchangeKind::Direct).await?;
        transport::declare_exchange(&ch, &self.names.events_exchange(), ExchangeKind::Topic).await?;
        let opts = QueueOptions { quorum: self.config.quorum_queues };
        transport::declare_queue(&ch, &self.names, &self.names.replies_queue(), opts).await?;
        transport::declare_queue(&ch, &self.names, &self.names.inbound_queue(), opts).await?;
        if self.config.declare_participant_queues {
            for p in self.engine.registry().participants() {
                transport::declare_participant(&ch, &self.names, p, opts).await?;
            }
        }
        ch.close(200, "declared".into()).await
    }

    async fn supervise(self, first: Connection, intake: CancellationToken, relay_token: CancellationToken) -> anyhow::Result<()> {
        let cfg = &self.config;
        let timers =
            tokio::spawn(timers::run(self.engine.clone(), Duration::from_millis(cfg.timer_poll_ms), cfg.timer_batch, intake.clone()));
        let retention =
            (cfg.retention_days > 0).then(|| tokio::spawn(retention(self.engine.pool().clone(), cfg.retention_days, intake.clone())));
        let mut conn = Some(first);
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => tokio::select! {
                    () = intake.cancelled() => break,
                    c = transport::connect(&cfg.amqp_url, Duration::from_secs(3600)) => match c {
                        Ok(c) => { tracing::info!("reconnected to RabbitMQ"); c }
                        Err(e) => { tracing::error!(error = %e, "cannot reconnect to RabbitMQ"); continue; }
                    },
                },
            };
            if let Err(e) = self.declare(&c).await {
                tracing::warn!(error = %e, "declaring the topology failed; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // Loops of this connection stop on their own tokens, children of the node's.
            let (ci, cr) = (intake.child_token(), relay_token.child_token());
            let mut consumers = JoinSet::new();
            let consumer = Consumer {
                engine: self.engine.clone(),
                names: self.names.clone(),
                max_body: cfg.max_body_bytes,
                prefetch: cfg.prefetch,
                concurrency: cfg.concurrency,
                batch_max: cfg.batch_max,
            };
            let channels = async {
                Ok::<_, lapin::Error>((
                    transport::confirm_channel(&c).await?,
                    transport::confirm_channel(&c).await?,
                    transport::confirm_channel(&c).await?,
                    transport::confirm_channel(&c).await?,
                ))
            };
            let (replies_ch, inbound_ch, ch, publish_ch) = match channels.await {
                Ok(chs) => chs,
                Err(e) => {
                    tracing::warn!(error = %e, "opening channels failed; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            self.engine.publisher.set_channel(Some(publish_ch));
            for (q, qch) in [(Queue::Replies, replies_ch), (Queue::Inbound, inbound_ch)] {
                let (consumer, t) = (consumer.clone(), ci.clone());
                consumers.spawn(async move { consumer.run(qch, q, t).await });
            }
            let mut relay =
                tokio::spawn(relay::run(self.engine.clone(), ch, cfg.relay_batch, Duration::from_millis(cfg.relay_poll_ms), cr.clone()));
            let failed = tokio::select! {
                biased;
                () = intake.cancelled() => None,
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
            // A consumer that ended because shutdown began is not a failure.
            let failed = failed.filter(|_| !intake.is_cancelled());
            // Stop consuming and let in-flight inputs commit and ack ...
            ci.cancel();
            while consumers.join_next().await.is_some() {}
            // ... from here on, what is written waits for a relay ...
            self.engine.publisher.set_channel(None);
            // ... then flush the outbox and stop the relay.
            if failed.is_none() {
                relay_token.cancel();
            }
            cr.cancel();
            if !relay.is_finished() || failed.is_none() {
                match relay.await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "the relay stopped with an error"),
                    Err(e) => tracing::error!(error = %e, "the relay panicked"),
                    Ok(Ok(())) => {}
                }
            }
            match failed {
                None => {
                    let _ = c.close(200, "shutdown".into()).await;
                    break;
                }
                Some(why) => {
                    tracing::warn!(why, "lost RabbitMQ; reconnecting");
                    let _ = c.close(200, "reconnecting".into()).await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let _ = timers.await;
        if let Some(r) = retention {
            let _ = r.await;
        }
        Ok(())
    }
}

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

    /// Stop publishing and close the connection; rows not yet published stay for the relays.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.context("the client task panicked")
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

    /// Stop consuming, finish in-flight inputs, flush the outbox, close.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.intake.cancel();
        let _ = &self.relay;
        if let Some(api) = self.api {
            let _ = api.await;
        }
        self.task.await.context("the node task panicked")?
    }

    async fn task_finished(&self) -> anyhow::Result<()> {
        while !self.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(anyhow::anyhow!("the node stopped on its own"))
    }
}

/// Wait until saga `id` is settled (completed, compensated or stopped) or `timeout` passes.
pub async fn wait_settled(pool: &PgPool, id: SagaId, timeout: Duration) -> anyhow::Result<SagaState> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let st = store::load(pool, id).await?.with_context(|| format!("no saga {id}"))?;
        if st.status.is_settled() {
            return Ok(st);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("saga {id} is still {} after {timeout:?}", st.status.as_str());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
