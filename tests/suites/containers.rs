//! The path users take: no service URLs in the environment, RabbitMQ and PostgreSQL started by
//! testcontainers from the official image names. Each test here ignores
//! `SAGAFLOW_TEST_*_URL` and starts its own containers.

use std::time::Duration;

use sagas::SagaStatus;
use testkit::orders;
use testkit::{Proxy, TestEnv, wait};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_saga_runs_on_containers_and_survives_a_broker_restart() {
    let env = TestEnv::with_containers().await.unwrap();
    let containers = env.containers().unwrap();
    // Everything talks to the broker through a proxy, so a restarted container on a new port
    // is the same address to them.
    let proxy = Proxy::start(containers.amqp_addr().await.unwrap()).await.unwrap();
    let amqp = proxy.url(&env.amqp_url);
    let mut cfg = env.config("n1");
    cfg.amqp_url = amqp.clone();
    let node = orchestrator::Orchestrator::connect(cfg, orders::registry()).await.unwrap().start().await.unwrap();
    let parts = orders::start_participants(&env, &amqp, &order_fulfilment::PARTICIPANTS, 1000).await.unwrap();
    let start = |i: u32| testkit::orders::mixed("c", i, 4);
    let mut ids = Vec::new();
    for i in 1..=20 {
        ids.push(node.engine().start(&start(i), None).await.unwrap().saga_id);
    }
    wait::all_settled(&env.pool, &ids, Duration::from_secs(60)).await.unwrap();

    // Restart the broker container (durable queues and persistent messages survive it).
    containers.rabbitmq.stop().await.unwrap();
    for i in 21..=40 {
        ids.push(node.engine().start(&start(i), None).await.unwrap().saga_id);
    }
    containers.rabbitmq.start().await.unwrap();
    proxy.set_upstream(containers.amqp_addr().await.unwrap());
    let _ = std::io::Write::write_all(&mut std::io::stderr(), b"testkit: restarted the rabbitmq container\n");

    let states = wait::all_settled(&env.pool, &ids, Duration::from_secs(120)).await.unwrap();
    assert_eq!(states.iter().filter(|s| s.status == SagaStatus::Completed).count(), 30);
    assert_eq!(states.iter().filter(|s| s.status == SagaStatus::Compensated).count(), 10);
    let shipped: i64 = sqlx::query_scalar("SELECT count(*) FROM example_shipping.shipments").fetch_one(&env.pool).await.unwrap();
    assert_eq!(shipped, 30);

    orders::stop_participants(parts).await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_run_over_tls_to_both_services_and_a_certificate_that_does_not_verify_is_refused() {
    let tls = testkit::tls::TlsServices::start().await.unwrap();
    let (amqp, db) = (tls.amqp_url(&tls.ca_file).await.unwrap(), tls.database_url(&tls.ca_file).await.unwrap());
    let env = TestEnv::on_services(amqp.clone(), db).await.unwrap();
    let on_tls: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetch_one(&env.pool).await.unwrap();
    assert!(on_tls, "the test's own connection is TLS");

    // A node and the participants over TLS (the broker publishes only its TLS port).
    let node = orchestrator::Orchestrator::connect(env.config("tls-node"), orders::registry()).await.unwrap().start().await.unwrap();
    let parts = orders::start_participants(&env, &amqp, &order_fulfilment::PARTICIPANTS, 1000).await.unwrap();
    let mut ids = Vec::new();
    for i in 1..=10 {
        ids.push(node.engine().start(&testkit::orders::mixed("tls", i, 5), None).await.unwrap().saga_id);
    }
    let states = wait::all_settled(&env.pool, &ids, Duration::from_secs(60)).await.unwrap();
    assert_eq!(states.iter().filter(|s| s.status == SagaStatus::Completed).count(), 8);
    assert_eq!(states.iter().filter(|s| s.status == SagaStatus::Compensated).count(), 2);
    let node_tls: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'sagaflow node tls-node' AND s.ssl",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(node_tls > 0, "the node's connections are TLS");

    // Trusting another CA: refused at once, with the setting to look at.
    let started = std::time::Instant::now();
    let mut cfg = env.config("distrustful-node");
    cfg.amqp_url = tls.amqp_url(&tls.other_ca_file).await.unwrap();
    let refused = orchestrator::Orchestrator::connect(cfg, orders::registry()).await.unwrap().start().await.err().expect("refused");
    let text = format!("{refused:#}");
    assert!(text.contains("certificate does not verify") && text.contains("cacertfile"), "{text}");
    let mut cfg = env.config("distrustful-node");
    cfg.database_url = tls.database_url(&tls.other_ca_file).await.unwrap();
    let refused = orchestrator::Orchestrator::connect(cfg, orders::registry()).await.err().expect("refused");
    let text = format!("{refused:#}");
    assert!(text.contains("certificate does not verify") && text.contains("sslrootcert"), "{text}");
    let participant = order_fulfilment::participant("payment", env.participant_config()).unwrap();
    let refused = participant.start(env.pool.clone(), &tls.amqp_url(&tls.other_ca_file).await.unwrap()).await.err().expect("refused");
    assert!(refused.to_string().contains("cacertfile"), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(15), "a certificate that does not verify is not retried for connect_timeout_s");

    orders::stop_participants(parts).await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_starts_rabbitmq_and_postgresql_in_docker_when_nothing_answers_on_their_addresses_and_removes_them() {
    // Two loopback ports nothing listens on, as on a machine without the services.
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (amqp_port, pg_port) = (free(), free());
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagaflow-node"))
        .args(["demo", "--sagas", "10", "--fail-every", "5"])
        .env_remove("SAGAFLOW_CONFIG")
        .env("SAGAFLOW_AMQP_URL", format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f"))
        .env("SAGAFLOW_DATABASE_URL", format!("postgres://postgres@127.0.0.1:{pg_port}/postgres"))
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output()).await.expect("the demo ends").unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("demo: sagas=10 completed=8 compensated=2 stopped=0"), "{stdout}");
    assert!(
        stderr.contains(&format!("nothing answers on 127.0.0.1:{amqp_port} (RabbitMQ); starting rabbitmq:4-management in Docker")),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("nothing answers on 127.0.0.1:{pg_port} (PostgreSQL); starting postgres:17 in Docker")), "{stderr}");
    assert!(stderr.contains(&format!("removed sagaflow-demo-rabbitmq-{pid}, sagaflow-demo-postgres-{pid}")), "{stderr}");
    let left = std::process::Command::new("docker")
        .args(["ps", "--all", "--quiet", "--filter", &format!("name=sagaflow-demo-.*-{pid}$")])
        .output()
        .unwrap();
    assert!(left.status.success() && left.stdout.is_empty(), "no container is left: {}", String::from_utf8_lossy(&left.stdout));
}
