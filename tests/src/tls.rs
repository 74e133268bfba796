//! RabbitMQ and PostgreSQL that speak TLS only, in containers, with certificates made here: a
//! test CA, a server certificate it signed (for `127.0.0.1` and `localhost`), and a second CA
//! that signed nothing the servers use (a client that trusts only it must refuse them).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, CopyTargetOptions, GenericImage, ImageExt};

/// The TLS settings RabbitMQ reads (beside the image's own `conf.d`): a TLS listener on 5671;
/// the plain one is not published.
const RABBITMQ_TLS_CONF: &str = "listeners.ssl.default = 5671
ssl_options.cacertfile = /etc/rabbitmq/tls/ca.pem
ssl_options.certfile = /etc/rabbitmq/tls/server.pem
ssl_options.keyfile = /etc/rabbitmq/tls/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
";

/// PostgreSQL refuses a key file others can read, and a root-owned one it cannot read: the key is
/// installed for the server's user before the image's entrypoint starts it with TLS on.
const POSTGRES_TLS_START: &str = "install -o postgres -g postgres -m 600 /tls/server.key /var/lib/postgresql/server.key && \
     exec docker-entrypoint.sh postgres -c ssl=on -c ssl_cert_file=/tls/server.pem -c ssl_key_file=/var/lib/postgresql/server.key";

/// Both services over TLS, and the files a client needs. Removed when dropped.
pub struct TlsServices {
    /// The broker (TLS on its published port).
    pub rabbitmq: ContainerAsync<GenericImage>,
    /// The database (`ssl = on`).
    pub postgres: ContainerAsync<GenericImage>,
    /// The CA that signed the servers' certificate (PEM).
    pub ca_file: PathBuf,
    /// A CA that signed nothing here (PEM).
    pub other_ca_file: PathBuf,
    dir: PathBuf,
}

impl TlsServices {
    /// Make the certificates and start both services; ready when this returns.
    pub async fn start() -> anyhow::Result<Self> {
        let (ca, ca_key) = new_ca("Sagaflow test CA")?;
        let (other_ca, _) = new_ca("Some other CA")?;
        let server_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let server = params.signed_by(&server_key, &ca, &ca_key)?;
        let (ca_pem, cert_pem, key_pem) = (ca.pem(), server.pem(), server_key.serialize_pem());

        let dir = std::env::temp_dir().join(format!("sagaflow-tls-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        let (ca_file, other_ca_file) = (dir.join("ca.pem"), dir.join("other-ca.pem"));
        std::fs::write(&ca_file, &ca_pem)?;
        std::fs::write(&other_ca_file, other_ca.pem())?;

        let file = |path: &str, mode| CopyTargetOptions::new(path).with_mode(mode);
        let rabbitmq = GenericImage::new("rabbitmq", "4-management")
            .with_exposed_port(5671.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
            .with_copy_to(file("/etc/rabbitmq/conf.d/20-tls.conf", 0o644), RABBITMQ_TLS_CONF.as_bytes().to_vec())
            .with_copy_to(file("/etc/rabbitmq/tls/ca.pem", 0o644), ca_pem.clone().into_bytes())
            .with_copy_to(file("/etc/rabbitmq/tls/server.pem", 0o644), cert_pem.clone().into_bytes())
            .with_copy_to(file("/etc/rabbitmq/tls/server.key", 0o644), key_pem.clone().into_bytes())
            .start()
            .await
            .context("starting RabbitMQ with TLS (is docker running and rabbitmq:4-management available?)")?;
        let postgres = GenericImage::new("postgres", "17")
            .with_exposed_port(5432.tcp())
            .with_wait_for(WaitFor::message_on_stderr("database system is ready to accept connections"))
            .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
            .with_copy_to(file("/tls/server.pem", 0o644), cert_pem.into_bytes())
            .with_copy_to(file("/tls/server.key", 0o600), key_pem.into_bytes())
            .with_cmd(["bash", "-c", POSTGRES_TLS_START])
            .start()
            .await
            .context("starting PostgreSQL with TLS (is docker running and postgres:17 available?)")?;
        let _ = writeln!(std::io::stderr(), "testkit: started rabbitmq={} postgres={} with TLS", rabbitmq.id(), postgres.id());
        Ok(Self { rabbitmq, postgres, ca_file, other_ca_file, dir })
    }

    /// `amqps://` to the broker, trusting the CA in `ca_file`.
    pub async fn amqp_url(&self, ca_file: &std::path::Path) -> anyhow::Result<String> {
        let port = self.rabbitmq.get_host_port_ipv4(5671.tcp()).await?;
        Ok(format!("amqps://guest:guest@127.0.0.1:{port}/%2f?cacertfile={}", ca_file.display()))
    }

    /// `postgres://` to the database with `sslmode=verify-full`, trusting the CA in `ca_file`.
    pub async fn database_url(&self, ca_file: &std::path::Path) -> anyhow::Result<String> {
        let port = self.postgres.get_host_port_ipv4(5432.tcp()).await?;
        Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={}", ca_file.display()))
    }
}

impl Drop for TlsServices {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed CA named `name`, and its key.
fn new_ca(name: &str) -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    Ok((params.self_signed(&key)?, key))
}
