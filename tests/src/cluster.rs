//! A RabbitMQ cluster in containers: n nodes of the RabbitMQ image on a Docker network of their
//! own, formed by RabbitMQ's classic peer discovery, with `pause_minority` partition handling
//! (a node cut off from the majority pauses itself), each node's AMQP port published on a fixed
//! host port so it keeps its address across a restart. Removed when dropped.

use std::time::Duration;

use anyhow::Context as _;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

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
        let image = std::env::var("SAGAFLOW_TEST_RABBITMQ_IMAGE").unwrap_or_else(|_| "rabbitmq:4-management".into());
        let (repo, version) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
        // All at once: a new node waits for the peers its configuration lists before it boots.
        let ports: Vec<u16> = names.iter().map(|_| free_port()).collect::<anyhow::Result<_>>()?;
        let starts = names.iter().zip(&ports).map(|(name, &port)| {
            let request = GenericImage::new(repo, version)
                .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
                .with_network(network.clone())
                .with_container_name(name.clone())
                .with_hostname(name.clone())
                .with_mapped_port(port, 5672.tcp())
                .with_env_var("RABBITMQ_ERLANG_COOKIE", format!("sagaflow-test-cookie-{tag}"))
                .with_env_var("RABBITMQ_NODENAME", format!("rabbit@{name}"))
                .with_copy_to("/etc/rabbitmq/conf.d/20-cluster.conf", conf.clone().into_bytes())
                .with_startup_timeout(Duration::from_secs(120));
            let image = &image;
            async move {
                request
                    .start()
                    .await
                    .with_context(|| format!("starting RabbitMQ node {name} (is docker running and the image {image} available?)"))
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
        // The containers go first (their own drop), then the network; this runs before them,
        // so remove them here to free the network.
        for name in &self.names {
            let _ = docker(&["rm", "-f", "-v", name.as_str()]);
        }
        let _ = docker(&["network", "rm", self.network.as_str()]);
    }
}
