//! A RabbitMQ cluster of three nodes (containers, quorum queues): two orchestrator nodes (with
//! reply partitions), the three participants and the client each get the three brokers'
//! addresses; while the order sagas run, one broker is stopped and started again, and another is
//! cut off the network for a while (it pauses: it is the minority). Every saga must settle as
//! its input says, each effect once, compensations in order, nothing left in an outbox.
//!
//! `SAGAFLOW_CLUSTER_SAGAS` (default 2000) sets the size. Needs Docker and the RabbitMQ image
//! (`scripts/setup.sh`).

use std::time::{Duration, Instant};

use orchestrator::Orchestrator;
use testkit::cluster::RabbitCluster;
use testkit::orders::{self, Tally};
use testkit::{Node, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_cluster_loses_a_node_and_a_partition_and_every_saga_ends_right() {
    let n: u32 = std::env::var("SAGAFLOW_CLUSTER_SAGAS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let brokers = RabbitCluster::start(3).await.unwrap();
    brokers.wait_whole(0, Duration::from_secs(60)).await.unwrap();
    let env = TestEnv::start().await.unwrap();
    order_fulfilment::setup(&env.pool, &["widget"], i64::from(n) * 10).await.unwrap();
    participants_sdk::ensure_schema(&env.pool, false).await.unwrap();
    // A silent broker (cut off the network) is noticed by the AMQP heartbeat within seconds.
    let amqp = brokers.urls("heartbeat=5");
    let vars = |id: &str| {
        let mut v = env.node_env(id);
        v.retain(|(k, _)| k != "SAGAFLOW_AMQP_URL" && k != "SAGAFLOW_API_ADDR");
        v.extend([
            ("SAGAFLOW_AMQP_URL".to_owned(), amqp.clone()),
            ("SAGAFLOW_API_ADDR".to_owned(), String::new()),
            ("SAGAFLOW_QUORUM_QUEUES".to_owned(), "true".to_owned()),
            ("SAGAFLOW_PARTITIONS".to_owned(), "4".to_owned()),
        ]);
        v
    };
    let mut procs: Vec<Node> = ["cluster-node-a", "cluster-node-b"]
        .iter()
        .map(|id| Node::spawn_with(env!("CARGO_BIN_EXE_sagaflow-node"), &["serve"], vars(id), id).unwrap())
        .collect();
    for p in order_fulfilment::PARTICIPANTS {
        procs.push(Node::spawn_with(env!("CARGO_BIN_EXE_testkit-order-participant"), &[p], vars(p), &format!("cluster-{p}")).unwrap());
    }
    let config = orchestrator::Config { amqp_url: amqp.clone(), quorum_queues: true, partitions: 4, ..env.config("cluster-client") };
    let client = Orchestrator::connect(config, orders::registry()).await.unwrap().client().await.unwrap();
    let engine = client.engine().clone();

    let started = Instant::now();
    let mut ids = Vec::new();
    let third = n / 3;
    orders::start_numbered(&engine, "cluster", 1, third, &mut ids).await;

    // A broker stops (its connections close), the sagas go on, it comes back and rejoins.
    brokers.nodes[1].stop().await.unwrap();
    orders::start_numbered(&engine, "cluster", third + 1, 2 * third, &mut ids).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    brokers.nodes[1].start().await.unwrap();
    brokers.wait_whole(0, Duration::from_secs(90)).await.unwrap();

    // Another is cut off the network: it goes silent, pauses itself (the minority), and comes
    // back when the network does.
    brokers.cut(2, true).unwrap();
    orders::start_numbered(&engine, "cluster", 2 * third + 1, n, &mut ids).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    brokers.cut(2, false).unwrap();
    brokers.wait_whole(0, Duration::from_secs(90)).await.unwrap();

    let logs = || procs.iter().map(|p| format!("{}:\n{}", p.id, p.logged())).collect::<Vec<_>>().join("\n");
    orders::wait_all_settled(&env.pool, n, logs).await;
    let elapsed = started.elapsed();
    let outbox_left = orders::outbox_left(&env.pool).await;
    let Tally { lost, duplicate_effects, misordered, stuck } = orders::tally(&env.pool, "cluster", n).await.unwrap();
    let line = format!(
        "cluster: sagas={n} broker_nodes=3 stopped=1 partitioned=1 lost={lost} duplicate_effects={duplicate_effects} misordered={misordered} stuck={stuck}"
    );
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("elapsed_s={:.1} outbox_left={outbox_left}\n{line}\n", elapsed.as_secs_f64()).as_bytes(),
    );
    assert_eq!(ids.len(), usize::try_from(n).unwrap());
    assert_eq!((lost, duplicate_effects, misordered, stuck), (0, 0, 0, 0), "{line}");
    assert_eq!(outbox_left, 0, "messages left unpublished");

    client.shutdown().await.unwrap();
    for p in procs {
        assert!(p.terminate().await.unwrap(), "a graceful exit");
    }
    env.cleanup(&[]).await.unwrap();
}
