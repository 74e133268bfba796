//! For `sagaflow demo`: a RabbitMQ or PostgreSQL that the configuration places on this machine
//! (`127.0.0.1` or `localhost`) and that nothing answers for is started in Docker, published on
//! that very address with the URL's user, password and vhost or database, and removed when the
//! demo ends. A newcomer with Docker needs nothing else. `serve` never does this: a node whose
//! database is down must wait for it, not start an empty one.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sagaflow_amqp::transport::percent_decode;
use tokio::process::Command;

/// The images, the same the test suites' containers use.
const RABBITMQ_IMAGE: &str = "rabbitmq:4-management";
const POSTGRES_IMAGE: &str = "postgres:17";
/// How long a started service may take to answer.
const READY_WITHIN: Duration = Duration::from_secs(120);

/// Containers started for the demo, removed by [`Self::remove`] (or, failing that, on drop).
#[derive(Default)]
pub(crate) struct LocalServices {
    containers: Vec<String>,
}

/// The parts of a service URL the container needs.
#[derive(Debug, PartialEq, Eq)]
struct Address {
    host: String,
    port: u16,
    user: Option<String>,
    password: Option<String>,
    /// The vhost (AMQP) or database (PostgreSQL), percent-decoded; `None` when absent.
    path: Option<String>,
}

impl LocalServices {
    /// Start what `config` places on this machine and nothing answers for; `Ok` with nothing
    /// started when both answer or are elsewhere. Says on stderr what it starts.
    pub(crate) async fn start_missing(config: &orchestrator::Config) -> anyhow::Result<Self> {
        let mut local = Self::default();
        let (amqp, database) = (missing(&config.amqp_url, 5672).await, missing(&config.database_url, 5432).await);
        // Both start at once; then each is waited for.
        let started = async {
            if let Some(a) = &amqp {
                local.rabbitmq(a).await?;
            }
            if let Some(a) = &database {
                local.postgres(a).await?;
            }
            if amqp.is_some() {
                wait_ready("RabbitMQ", || async {
                    lapin::Connection::connect(&config.amqp_url, lapin::ConnectionProperties::default()).await.map(drop)
                })
                .await?;
            }
            if database.is_some() {
                wait_ready("PostgreSQL", || async {
                    use sqlx::Connection as _;
                    sqlx::PgConnection::connect(&config.database_url).await.map(drop)
                })
                .await?;
            }
            anyhow::Ok(())
        }
        .await;
        match started {
            Ok(()) => Ok(local),
            Err(e) => {
                local.remove().await;
                Err(e)
            }
        }
    }

    async fn rabbitmq(&mut self, a: &Address) -> anyhow::Result<()> {
        let mut env = Vec::new();
        if let Some(user) = a.user.as_deref().filter(|u| *u != "guest") {
            env.push(format!("RABBITMQ_DEFAULT_USER={user}"));
            env.push(format!("RABBITMQ_DEFAULT_PASS={}", a.password.as_deref().unwrap_or_default()));
        }
        if let Some(vhost) = a.path.as_deref().filter(|v| *v != "/" && !v.is_empty()) {
            env.push(format!("RABBITMQ_DEFAULT_VHOST={vhost}"));
        }
        self.run("RabbitMQ", RABBITMQ_IMAGE, a, 5672, &env).await
    }

    async fn postgres(&mut self, a: &Address) -> anyhow::Result<()> {
        let user = a.user.clone().unwrap_or_else(|| "postgres".into());
        let mut env = vec![format!("POSTGRES_USER={user}")];
        match a.password.as_deref() {
            Some(p) if !p.is_empty() => env.push(format!("POSTGRES_PASSWORD={p}")),
            _ => env.push("POSTGRES_HOST_AUTH_METHOD=trust".into()),
        }
        if let Some(db) = a.path.as_deref().filter(|d| !d.is_empty()) {
            env.push(format!("POSTGRES_DB={db}"));
        }
        self.run("PostgreSQL", POSTGRES_IMAGE, a, 5432, &env).await
    }

    /// `docker run` `image` published on `a`'s port of the loopback interface.
    async fn run(&mut self, what: &str, image: &str, a: &Address, inner_port: u16, env: &[String]) -> anyhow::Result<()> {
        let name = format!("sagaflow-demo-{}-{}", image.split(':').next().unwrap_or(image), std::process::id());
        eprintln!(
            "demo: nothing answers on {}:{} ({what}); starting {image} in Docker as `{name}`, removed when the demo ends",
            a.host, a.port
        );
        let mut cmd = Command::new("docker");
        cmd.args(["run", "--detach", "--rm", "--name", &name, "--label", "sagaflow.demo=1"]);
        cmd.args(["--publish", &format!("127.0.0.1:{}:{inner_port}", a.port)]);
        for e in env {
            cmd.args(["--env", e]);
        }
        cmd.arg(image);
        let out = match cmd.output().await {
            Ok(out) => out,
            Err(e) => bail!(
                "nothing answers on {}:{} ({what}) and Docker cannot be run ({e}): start {what} there, point the URL at one, or install Docker",
                a.host,
                a.port
            ),
        };
        if !out.status.success() {
            bail!(
                "nothing answers on {}:{} ({what}) and Docker could not start {image}: {}",
                a.host,
                a.port,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.containers.push(name);
        Ok(())
    }

    /// Remove the containers started (they keep nothing).
    pub(crate) async fn remove(&mut self) {
        if self.containers.is_empty() {
            return;
        }
        let names = std::mem::take(&mut self.containers);
        match Command::new("docker").args(["rm", "--force"]).args(&names).output().await {
            Ok(out) if out.status.success() => eprintln!("demo: removed {}", names.join(", ")),
            Ok(out) => eprintln!("demo: could not remove {}: {}", names.join(", "), String::from_utf8_lossy(&out.stderr).trim()),
            Err(e) => eprintln!("demo: could not remove {}: {e}", names.join(", ")),
        }
    }
}

impl Drop for LocalServices {
    fn drop(&mut self) {
        if !self.containers.is_empty() {
            let _ = std::process::Command::new("docker").args(["rm", "--force"]).args(&self.containers).output();
        }
    }
}

/// `url`'s address when it is on this machine and nothing accepts connections there.
async fn missing(url: &str, default_port: u16) -> Option<Address> {
    // A list of brokers is a cluster somewhere: nothing to start here.
    if url.contains(',') {
        return None;
    }
    let a = address(url, default_port)?;
    if !matches!(a.host.as_str(), "127.0.0.1" | "localhost") {
        return None;
    }
    let connect = tokio::net::TcpStream::connect(("127.0.0.1", a.port));
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(a),
        _ => None,
    }
}

/// Wait until `attempt` succeeds (a started container answers), at most [`READY_WITHIN`].
async fn wait_ready<F, Fut, E>(what: &str, attempt: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let since = Instant::now();
    loop {
        let last = match tokio::time::timeout(Duration::from_secs(5), attempt()).await {
            Ok(Ok(())) => {
                eprintln!("demo: {what} answers (after {:.1} s)", since.elapsed().as_secs_f64());
                return Ok(());
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 5 s".into(),
        };
        if since.elapsed() > READY_WITHIN {
            return Err(anyhow::anyhow!("{last}"))
                .with_context(|| format!("{what} started in Docker did not answer within {READY_WITHIN:?}"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The host, port, user, password and path of `scheme://user:password@host:port/path?query`.
fn address(url: &str, default_port: u16) -> Option<Address> {
    let rest = url.split_once("://")?.1;
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(percent_decode(p, false))),
        None => (rest, None),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((u, p)) => (Some(percent_decode(u, false)), Some(percent_decode(p, false))),
            None => (Some(percent_decode(u, false)), None),
        },
        None => (None, None),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (hostport, default_port),
    };
    Some(Address { host: host.to_owned(), port, user, password, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gives_its_address_and_credentials() {
        let a = address("amqp://guest:guest@127.0.0.1:5672/%2f", 5672).unwrap();
        assert_eq!(
            a,
            Address {
                host: "127.0.0.1".into(),
                port: 5672,
                user: Some("guest".into()),
                password: Some("guest".into()),
                path: Some("/".into())
            }
        );
        let p = address("postgres://postgres@localhost/app?sslmode=disable", 5432).unwrap();
        assert_eq!(
            p,
            Address { host: "localhost".into(), port: 5432, user: Some("postgres".into()), password: None, path: Some("app".into()) }
        );
        let q = address("postgres://u:p%40ss@db.example:6543", 5432).unwrap();
        assert_eq!((q.host.as_str(), q.port, q.password.as_deref(), q.path), ("db.example", 6543, Some("p@ss"), None));
        assert!(address("not a url", 1).is_none());
        assert!(address("amqp://h:notaport/", 1).is_none());
    }
}
