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
