//! Services of more than one machine, in containers, each on a Docker network of its own and
//! published on fixed host ports (an address survives a restart): [`RabbitCluster`], n RabbitMQ
//! nodes formed by classic peer discovery with `pause_minority` partition handling (a node cut
//! off from the majority pauses itself); [`PgPair`], a PostgreSQL primary and a synchronous
//! streaming standby. Removed when dropped.

use std::time::Duration;

use anyhow::Context as _;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, Image as _, ImageExt};

/// The cluster's nodes, in the order they were started.
pub struct RabbitCluster {
    /// The containers.
    pub nodes: Vec<ContainerAsync<GenericImage>>,
    /// Each node's container (and host) name.
    pub names: Vec<String>,
    /// Each node's AMQP port on 127.0.0.1.
    pub ports: Vec<u16>,
    /// The Docker network they share.
    pub network: String,
}

/// A port nothing listens on now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `docker` with `args`; an error with its output when it fails.
pub fn docker(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("docker").args(args).output().context("running docker")?;
    anyhow::ensure!(out.status.success(), "docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

impl RabbitCluster {
    /// Start `n` nodes and wait until each says it started.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        let tag = &uuid::Uuid::now_v7().simple().to_string()[20..];
        let network = format!("sagaflow-rmq-{tag}");
        let names: Vec<String> = (1..=n).map(|i| format!("rmq{i}-{tag}")).collect();
        let mut conf =
            String::from("cluster_formation.peer_discovery_backend = classic_config\ncluster_partition_handling = pause_minority\n");
        for (i, name) in names.iter().enumerate() {
            conf.push_str(&format!("cluster_formation.classic_config.nodes.{} = rabbit@{name}\n", i + 1));
        }
        let image = crate::env::image("SAGAFLOW_TEST_RABBITMQ_IMAGE", "rabbitmq:4-management");
        let shown = format!("{}:{}", image.name(), image.tag());
        // All at once: a new node waits for the peers its configuration lists before it boots.
        let ports: Vec<u16> = names.iter().map(|_| free_port()).collect::<anyhow::Result<_>>()?;
        let starts = names.iter().zip(&ports).map(|(name, &port)| {
            let request = image
                .clone()
                .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
                .with_network(network.clone())
                .with_container_name(name.clone())
                .with_hostname(name.clone())
                .with_mapped_port(port, 5672.tcp())
                .with_env_var("RABBITMQ_ERLANG_COOKIE", format!("sagaflow-test-cookie-{tag}"))
                .with_env_var("RABBITMQ_NODENAME", format!("rabbit@{name}"))
                .with_copy_to("/etc/rabbitmq/conf.d/20-cluster.conf", conf.clone().into_bytes())
                .with_startup_timeout(Duration::from_secs(120));
            let shown = &shown;
            async move {
                request
                    .start()
                    .await
                    .with_context(|| format!("starting RabbitMQ node {name} (is docker running and the image {shown} available?)"))
            }
        });
        let nodes = futures_util::future::try_join_all(starts).await?;
        Ok(Self { nodes, names, ports, network })
    }

    /// Node `i`'s AMQP URL (vhost `/`, user guest), with `query` appended (e.g. `heartbeat=5`).
    pub fn url(&self, i: usize, query: &str) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f?{query}", self.ports[i])
    }

    /// Every node's URL, separated by commas: the `amqp_url` of a process that uses the cluster.
    pub fn urls(&self, query: &str) -> String {
        (0..self.nodes.len()).map(|i| self.url(i, query)).collect::<Vec<_>>().join(",")
    }

    /// How many nodes node `i` sees running in its cluster (`rabbitmqctl`).
    pub async fn running_nodes(&self, i: usize) -> anyhow::Result<usize> {
        let out = tokio::process::Command::new("docker")
            .args(["exec", self.names[i].as_str(), "rabbitmqctl", "-q", "--formatter", "json", "cluster_status"])
            .output()
            .await?;
        anyhow::ensure!(out.status.success(), "rabbitmqctl cluster_status: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["running_nodes"].as_array().map_or(0, Vec::len))
    }

    /// Wait until node `i` sees every node running (the cluster formed, or healed).
    pub async fn wait_whole(&self, i: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.running_nodes(i).await {
                Ok(n) if n == self.nodes.len() => return Ok(()),
                r => anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "node {} sees {r:?} of {} running",
                    self.names[i],
                    self.nodes.len()
                ),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Cut node `i` off the network (no packet in or out: its peers and its clients see it go
    /// silent), or put it back.
    pub fn cut(&self, i: usize, off: bool) -> anyhow::Result<()> {
        let verb = if off { "disconnect" } else { "connect" };
        docker(&["network", verb, self.network.as_str(), self.names[i].as_str()])
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        remove(&self.names, &self.network);
    }
}

/// Remove the containers `names` and then their `network`. A drop runs before the containers'
/// own (which would remove them), so they are removed here to free the network.
fn remove(names: &[String], network: &str) {
    for name in names {
        let _ = docker(&["rm", "-f", "-v", name.as_str()]);
    }
    let _ = docker(&["network", "rm", network]);
}

/// A PostgreSQL primary and a streaming standby in containers on a Docker network of their own,
/// with synchronous replication (a commit returns once the standby has it), each published on a
/// fixed host port. Removed when dropped.
pub struct PgPair {
    /// The primary, then the standby.
    pub servers: Vec<ContainerAsync<GenericImage>>,
    /// Their container (and host) names.
    pub names: Vec<String>,
    /// Their ports on 127.0.0.1.
    pub ports: Vec<u16>,
    /// The Docker network they share.
    pub network: String,
}

impl PgPair {
    /// Start the primary, then the standby from a base backup of it, then make the replication
    /// synchronous.
    pub async fn start() -> anyhow::Result<Self> {
        let tag = &uuid::Uuid::now_v7().simple().to_string()[20..];
        let network = format!("sagaflow-pg-{tag}");
        let names = vec![format!("pg1-{tag}"), format!("pg2-{tag}")];
        let ports = vec![free_port()?, free_port()?];
        let image = crate::env::image("SAGAFLOW_TEST_POSTGRES_IMAGE", "postgres:17");
        let shown = format!("{}:{}", image.name(), image.tag());
        let primary = image
            .clone()
            .with_wait_for(WaitFor::message_on_stderr("database system is ready to accept connections"))
            .with_network(network.clone())
            .with_container_name(names[0].clone())
            .with_hostname(names[0].clone())
            .with_mapped_port(ports[0], 5432.tcp())
            .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
            .with_copy_to(
                "/docker-entrypoint-initdb.d/10-replication.sh",
                b"echo 'host replication all all trust' >> \"$PGDATA/pg_hba.conf\"\n".to_vec(),
            )
            .with_cmd(["postgres", "-c", "wal_level=replica", "-c", "max_wal_senders=10", "-c", "wal_keep_size=256MB"])
            .with_startup_timeout(Duration::from_secs(120))
            .start()
            .await
            .with_context(|| format!("starting the PostgreSQL primary (is docker running and the image {shown} available?)"))?;
        let standby_script = format!(
            "set -e; chown postgres \"$PGDATA\"; chmod 700 \"$PGDATA\"; \
             until gosu postgres pg_basebackup -h {} -U postgres -D \"$PGDATA\" -R -X stream -c fast; do sleep 1; rm -rf \"$PGDATA\"/*; done; \
             exec gosu postgres postgres -c hot_standby=on",
            names[0]
        );
        let standby = image
            .with_wait_for(WaitFor::message_on_stderr("database system is ready to accept read-only connections"))
            .with_network(network.clone())
            .with_container_name(names[1].clone())
            .with_hostname(names[1].clone())
            .with_mapped_port(ports[1], 5432.tcp())
            .with_cmd(["bash", "-c", standby_script.as_str()])
            .with_startup_timeout(Duration::from_secs(120))
            .start()
            .await
            .context("starting the PostgreSQL standby")?;
        let pair = Self { servers: vec![primary, standby], names, ports, network };
        // Synchronous from now on: a commit waits for the standby to have it on disk.
        let admin = sqlx::PgPool::connect(&pair.url(0, "postgres")).await?;
        sqlx::query("ALTER SYSTEM SET synchronous_standby_names = '*'").execute(&admin).await?;
        sqlx::query("SELECT pg_reload_conf()").execute(&admin).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let sync: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'").fetch_one(&admin).await?;
            if sync == 1 {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the standby did not become synchronous");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        admin.close().await;
        Ok(pair)
    }

    /// Server `i`'s URL for `database` (user postgres, trust).
    pub fn url(&self, i: usize, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.ports[i])
    }

    /// Both servers' URLs for `database`, separated by commas: the `database_url` of a process.
    pub fn urls(&self, database: &str) -> String {
        format!("{},{}", self.url(0, database), self.url(1, database))
    }

    /// Fail over: stop the primary, promote the standby, wait until it accepts writes.
    pub async fn fail_over(&self) -> anyhow::Result<()> {
        self.servers[0].stop().await?;
        let standby = sqlx::PgPool::connect(&self.url(1, "postgres")).await?;
        sqlx::query("SELECT pg_promote()").execute(&standby).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()").fetch_one(&standby).await? {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the standby was not promoted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        standby.close().await;
        Ok(())
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        remove(&self.names, &self.network);
    }
}
