//! [`TestEnv`]: RabbitMQ and PostgreSQL for one test, isolated from every other test by a
//! database of its own and an AMQP namespace of its own.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use orchestrator::{Config, Orchestrator, OrchestratorHandle};
use participants_sdk::ParticipantConfig;
use sagaflow_amqp::transport::Names;
use sagas::Registry;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, Image as _, ImageExt};

/// The services named by `SAGAFLOW_TEST_AMQP_URL` and `SAGAFLOW_TEST_DATABASE_URL`: both, or
/// `None` when neither is set. One without the other is an error naming the missing one (it
/// would otherwise be ignored along with the one that is set).
pub fn service_urls() -> anyhow::Result<Option<(String, String)>> {
    services_from(std::env::var(AMQP).ok(), std::env::var(DATABASE).ok())
}

const AMQP: &str = "SAGAFLOW_TEST_AMQP_URL";
const DATABASE: &str = "SAGAFLOW_TEST_DATABASE_URL";

/// [`service_urls`] from the two variables' values.
fn services_from(amqp: Option<String>, db: Option<String>) -> anyhow::Result<Option<(String, String)>> {
    match (amqp, db) {
        (Some(amqp), Some(db)) => Ok(Some((amqp, db))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(anyhow::anyhow!("{AMQP} is set but {DATABASE} is not: set both (the services to use) or neither")),
        (None, Some(_)) => Err(anyhow::anyhow!("{DATABASE} is set but {AMQP} is not: set both (the services to use) or neither")),
    }
}

/// RabbitMQ and PostgreSQL started with testcontainers for one test, from the official images
/// (`SAGAFLOW_TEST_RABBITMQ_IMAGE`, default `rabbitmq:4-management`; `SAGAFLOW_TEST_POSTGRES_IMAGE`,
/// default `postgres:17`). Removed when dropped.
pub struct Containers {
    /// The broker container.
    pub rabbitmq: ContainerAsync<GenericImage>,
    /// The database container.
    pub postgres: ContainerAsync<GenericImage>,
}

/// The image `var` names (`repo:tag`), else `default`.
pub(crate) fn image(var: &str, default: &str) -> GenericImage {
    let name = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    let (repo, tag) = name.rsplit_once(':').unwrap_or((name.as_str(), "latest"));
    GenericImage::new(repo, tag)
}

impl Containers {
    /// Start both and wait until they accept connections.
    pub async fn start() -> anyhow::Result<Self> {
        let rabbitmq = image("SAGAFLOW_TEST_RABBITMQ_IMAGE", "rabbitmq:4-management")
            .with_exposed_port(5672.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
            .start()
            .await
            .context("starting RabbitMQ with testcontainers (is docker running and the image available?)")?;
        let postgres = image("SAGAFLOW_TEST_POSTGRES_IMAGE", "postgres:17")
            .with_exposed_port(5432.tcp())
            .with_wait_for(WaitFor::message_on_stderr("database system is ready to accept connections"))
            .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
            .start()
            .await
            .context("starting PostgreSQL with testcontainers (is docker running and the image available?)")?;
        tracing::info!(rabbitmq = rabbitmq.id(), postgres = postgres.id(), "containers started");
        // Written past the test harness's capture, so CI logs show the containers started.
        let _ = writeln!(
            std::io::stderr(),
            "testkit: started containers rabbitmq={} ({}) postgres={} ({})",
            rabbitmq.id(),
            rabbitmq.image().name(),
            postgres.id(),
            postgres.image().name()
        );
        Ok(Self { rabbitmq, postgres })
    }

    /// `host:port` of the broker (changes when the container restarts).
    pub async fn amqp_addr(&self) -> anyhow::Result<String> {
        Ok(format!("127.0.0.1:{}", self.rabbitmq.get_host_port_ipv4(5672.tcp()).await?))
    }

    /// `host:port` of the database.
    pub async fn postgres_addr(&self) -> anyhow::Result<String> {
        Ok(format!("127.0.0.1:{}", self.postgres.get_host_port_ipv4(5432.tcp()).await?))
    }

    async fn urls(&self) -> anyhow::Result<(String, String)> {
        Ok((
            format!("amqp://guest:guest@{}/%2f", self.amqp_addr().await?),
            format!("postgres://postgres@{}/postgres", self.postgres_addr().await?),
        ))
    }
}

/// One test's services.
pub struct TestEnv {
    /// The broker.
    pub amqp_url: String,
    /// This test's own database.
    pub database_url: String,
    /// This test's AMQP namespace.
    pub namespace: String,
    /// A pool on this test's database.
    pub pool: PgPool,
    admin_url: String,
    database: String,
    containers: Option<Containers>,
    /// Ends the test process if the test outlives its limit ([`Watchdog`]); `None` for a
    /// harness's environment ([`TestEnv::on_services`]).
    _watchdog: Option<Watchdog>,
}

impl TestEnv {
    /// The services from the environment (see [`service_urls`]), else containers of its own.
    /// Either way: a fresh database and a fresh namespace.
    /// A test still running after its limit (`SAGAFLOW_TEST_TIMEOUT_MINUTES`, default 25) ends
    /// its process, naming the test.
    pub async fn start() -> anyhow::Result<Self> {
        let env = match service_urls()? {
            Some((amqp, db)) => Self::on(amqp, db, None).await,
            None => Self::containers_of_its_own().await,
        }?;
        Ok(Self { _watchdog: Watchdog::start(), ..env })
    }

    /// Containers of its own, whatever the environment says; watched as [`TestEnv::start`].
    pub async fn with_containers() -> anyhow::Result<Self> {
        let env = Self::containers_of_its_own().await?;
        Ok(Self { _watchdog: Watchdog::start(), ..env })
    }

    async fn containers_of_its_own() -> anyhow::Result<Self> {
        init_logs();
        let c = Containers::start().await?;
        let (amqp, db) = c.urls().await?;
        Self::on(amqp, db, Some(c)).await
    }

    /// The services at these URLs (PostgreSQL: a database to create others from).
    pub async fn on_services(amqp_url: String, admin_database_url: String) -> anyhow::Result<Self> {
        Self::on(amqp_url, admin_database_url, None).await
    }

    /// The name of this test's database.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The containers, when this environment started them.
    pub fn containers(&self) -> Option<&Containers> {
        self.containers.as_ref()
    }

    async fn on(amqp_url: String, admin_url: String, containers: Option<Containers>) -> anyhow::Result<Self> {
        init_logs();
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let database = format!("sagaflow_test_{}", &tag[20..]);
        let admin = connect_retrying(&admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&admin).await?;
        admin.close().await;
        let database_url = sagaflow_amqp::pg::with_database(&admin_url, &database);
        let pool = PgPoolOptions::new().max_connections(8).connect(&database_url).await?;
        Ok(Self { amqp_url, database_url, namespace: format!("t{}", &tag[20..]), pool, admin_url, database, containers, _watchdog: None })
    }

    /// A node configuration for this environment.
    pub fn config(&self, node_id: &str) -> Config {
        Config {
            amqp_url: self.amqp_url.clone(),
            database_url: self.database_url.clone(),
            namespace: self.namespace.clone(),
            node_id: node_id.into(),
            timer_poll_ms: 20,
            relay_poll_ms: 200,
            database_max_connections: 8,
            connect_timeout_s: 20,
            api_addr: "127.0.0.1:0".into(),
            ..Config::default()
        }
    }

    /// The environment variables that give a child `sagaflow` process this configuration.
    pub fn node_env(&self, node_id: &str) -> Vec<(String, String)> {
        let cfg = self.config(node_id);
        vec![
            ("SAGAFLOW_AMQP_URL".into(), cfg.amqp_url),
            ("SAGAFLOW_DATABASE_URL".into(), cfg.database_url),
            ("SAGAFLOW_NAMESPACE".into(), cfg.namespace),
            ("SAGAFLOW_NODE_ID".into(), cfg.node_id),
            ("SAGAFLOW_TIMER_POLL_MS".into(), cfg.timer_poll_ms.to_string()),
            ("SAGAFLOW_RELAY_POLL_MS".into(), cfg.relay_poll_ms.to_string()),
            ("SAGAFLOW_DATABASE_MAX_CONNECTIONS".into(), cfg.database_max_connections.to_string()),
            ("SAGAFLOW_API_ADDR".into(), cfg.api_addr),
        ]
    }

    /// A participant configuration for this environment.
    pub fn participant_config(&self) -> ParticipantConfig {
        ParticipantConfig { namespace: self.namespace.clone(), sweep_interval: Duration::from_millis(500), ..ParticipantConfig::default() }
    }

    /// The AMQP names of this environment.
    pub fn names(&self) -> Names {
        Names::new(self.namespace.clone())
    }

    /// Run an orchestrator node in this process.
    pub async fn orchestrator(&self, node_id: &str, registry: Registry) -> anyhow::Result<OrchestratorHandle> {
        Ok(Orchestrator::connect(self.config(node_id), registry).await?.start().await?)
    }

    /// A connection to the broker.
    pub async fn amqp(&self) -> anyhow::Result<lapin::Connection> {
        Ok(sagaflow_amqp::transport::connect(&self.amqp_url, Duration::from_secs(20)).await?)
    }

    /// Drop the database and delete this namespace's queues and exchanges.
    /// Containers are simply removed.
    pub async fn cleanup(self, participants: &[&str]) -> anyhow::Result<()> {
        if self.containers.is_some() {
            close_pool(&self.pool).await;
            return Ok(());
        }
        self.cleanup_broker(participants).await?;
        close_pool(&self.pool).await;
        let admin = connect_retrying(&self.admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database))).execute(&admin).await?;
        Ok(())
    }

    /// Delete this test's queues (those of `participants` and of up to 16 reply partitions
    /// among them) and exchanges on the broker; the database stays (a test whose database
    /// server is gone ends with this).
    pub async fn cleanup_broker(&self, participants: &[&str]) -> anyhow::Result<()> {
        let names = self.names();
        let conn = self.amqp().await?;
        let ch = conn.create_channel().await?;
        let mut queues = vec![names.replies_queue(), names.inbound_queue()];
        queues.extend((0..16).map(|p| names.partition_queue(p)));
        queues.extend(participants.iter().map(|p| names.participant_queue(p)));
        for q in queues {
            for name in [Names::dead_letter_queue(&q), q] {
                let _ = ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
            }
        }
        for x in [names.commands_exchange(), names.events_exchange(), names.dead_letter_exchange()] {
            let _ = ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
        let _ = conn.close(200, "cleanup".into()).await;
        Ok(())
    }
}

/// PostgreSQL just started (or restarted) may refuse connections for a moment.
async fn connect_retrying(url: &str) -> anyhow::Result<PgPool> {
    let mut last = None;
    for _ in 0..50 {
        match PgPoolOptions::new().max_connections(1).connect(url).await {
            Ok(p) => return Ok(p),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(anyhow::anyhow!("PostgreSQL at {url}: {}", last.map(|e| e.to_string()).unwrap_or_default()))
}

/// Log to the test output at `RUST_LOG` (default `warn`), once per process.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// Ends the test process when the test that started it is still running after its limit
/// (`SAGAFLOW_TEST_TIMEOUT_MINUTES`, default 25; `0`: never), with the test's name on stderr
/// (past the harness's capture): a test stuck in a wait with no bound of its own fails with a
/// name instead of holding CI until its own limit. Dropped with the [`TestEnv`], which a test's
/// cleanup consumes last, so the limit covers the test's shutdown too.
struct Watchdog {
    /// Dropped with the watchdog: its thread then ends without a word.
    _done: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    fn start() -> Option<Self> {
        use std::sync::mpsc::RecvTimeoutError;
        let (minutes, after) = match std::env::var("SAGAFLOW_TEST_TIMEOUT_MINUTES") {
            Ok(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(|m| Some((m, Duration::try_from_secs_f64(m * 60.0).ok()?)))
                .unwrap_or_else(|| panic!("SAGAFLOW_TEST_TIMEOUT_MINUTES={v:?}: expected a number of minutes")),
            Err(_) => (25.0, Duration::from_secs(25 * 60)),
        };
        if after.is_zero() {
            return None;
        }
        // The test harness names each test's thread after the test.
        let test = std::thread::current().name().unwrap_or("a test").to_owned();
        let (done, watching) = std::sync::mpsc::channel::<()>();
        // A limit past what the clock can count is waited for without end.
        std::thread::spawn(move || {
            if watching.recv_timeout(after) == Err(RecvTimeoutError::Timeout) {
                let _ = writeln!(
                    std::io::stderr(),
                    "testkit: {test} is still running after {minutes} minutes (SAGAFLOW_TEST_TIMEOUT_MINUTES); ending the test process"
                );
                std::process::exit(101);
            }
        });
        Some(Self { _done: done })
    }
}

/// Close `pool`, waiting at most 10 s: sqlx's `close` can miss a connection handed back in the
/// same moment and wait for ever, and a test's cleanup must not hang on that.
async fn close_pool(pool: &PgPool) {
    let _ = tokio::time::timeout(Duration::from_secs(10), pool.close()).await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Run by [`a_test_past_its_limit_ends_its_process_with_its_name`] only.
    #[test]
    #[ignore = "a stuck test, run by another test"]
    fn a_stuck_test() {
        let _watchdog = super::Watchdog::start();
        std::thread::sleep(Duration::from_secs(60));
    }

    #[test]
    fn a_test_past_its_limit_ends_its_process_with_its_name() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["env::tests::a_stuck_test", "--exact", "--ignored"])
            .env("SAGAFLOW_TEST_TIMEOUT_MINUTES", "0.02")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(101), "{stderr}");
        assert!(stderr.contains("testkit: env::tests::a_stuck_test is still running after 0.02 minutes"), "{stderr}");
    }

    #[test]
    fn both_service_variables_or_neither() {
        let url = |s: &str| Some(s.to_owned());
        assert_eq!(super::services_from(url("amqp://a"), url("postgres://d")).unwrap(), Some(("amqp://a".into(), "postgres://d".into())));
        assert_eq!(super::services_from(None, None).unwrap(), None);
        let alone = super::services_from(None, url("postgres://d")).unwrap_err().to_string();
        assert!(alone.starts_with("SAGAFLOW_TEST_DATABASE_URL is set but SAGAFLOW_TEST_AMQP_URL is not"), "{alone}");
        let alone = super::services_from(url("amqp://a"), None).unwrap_err().to_string();
        assert!(alone.starts_with("SAGAFLOW_TEST_AMQP_URL is set but SAGAFLOW_TEST_DATABASE_URL is not"), "{alone}");
    }
}
