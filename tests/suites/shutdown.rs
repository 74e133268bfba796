//! Shutdown: a node, a client and the participants let go of every connection, in a process
//! of its own (the check counts this process's sockets, which other tests would share).

use std::time::Duration;

use sagas::SagaStatus;
use testkit::orders::{self, order};
use testkit::{TestEnv, sockets, wait};

const WAIT: Duration = Duration::from_secs(60);

/// The port of an `amqp://` URL.
fn amqp_port(url: &str) -> u16 {
    let authority = url.split("://").nth(1).unwrap_or(url).split('/').next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or(authority);
    host.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(5672)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_joins_every_task_and_leaves_no_connection_open() {
    let env = TestEnv::start().await.unwrap();
    let port = amqp_port(&env.amqp_url);
    let before = sockets::established_to(port).unwrap();
    let node = env.orchestrator("n-stop", orders::registry()).await.unwrap();
    let client = orchestrator::Orchestrator::connect(env.config("c-stop"), orders::registry()).await.unwrap().client().await.unwrap();
    let parts = orders::start_participants(&env, &env.amqp_url, &order_fulfilment::PARTICIPANTS, 1_000).await.unwrap();
    // Every path runs: the client publishes the start, the node's publisher the rest.
    let id = client.engine().start(&order("o-stop", "Main St 1", 0), None).await.unwrap().saga_id;
    assert_eq!(wait::settled(&env.pool, id, WAIT).await.unwrap().status, SagaStatus::Completed);
    let named = [orchestrator::application_name("n-stop"), orchestrator::application_name("c-stop")];
    let connected = || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY($1)")
            .bind(&named[..])
            .fetch_one(&env.pool)
            .await
            .unwrap();
        (n, sockets::established_to(port).unwrap())
    };
    let (database, broker) = connected().await;
    assert!(database > 0 && broker > before, "running: {database} database connections, {broker} broker connections");

    orders::stop_participants(parts).await.unwrap();
    client.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    // PostgreSQL drops a backend soon after its client closed the connection, not at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (database, broker) = connected().await;
        if (database, broker) == (0, before) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after shutdown: {database} database connections, {broker} broker connections (before: {before})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}
