//! Shared-resource limits (`StepBuilder::limit`) and priorities against real RabbitMQ and
//! PostgreSQL: a limit holds across two node processes while one is SIGKILLed, no slot is
//! leaked, and a saga of a higher priority takes a freed slot before the ones queued earlier.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use orchestrator::Orchestrator;
use sagas::{Registry, SagaId, SagaStatus};
use testkit::node::Node;
use testkit::probe::{self, Behavior, Plan};
use testkit::{TestEnv, wait};

fn registry() -> Registry {
    let mut r = Registry::new();
    for d in probe::limited_definitions() {
        r.register(d.erased()).unwrap();
    }
    r
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(pool).await.unwrap()
}

/// Sample how many steps hold a slot of `resource` every few milliseconds until `stop`; the
/// most seen.
fn watch_holders(pool: sqlx::PgPool, resource: &'static str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let mut most = 0;
        while !stop.load(Ordering::Relaxed) {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.slot_holders WHERE resource = $1")
                .bind(resource)
                .fetch_one(&pool)
                .await
                .unwrap();
            most = most.max(n);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        most
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_of_two_holds_under_50_sagas_on_two_nodes_with_one_killed() {
    const SAGAS: usize = 50;
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let vars = |id: &str| {
        let mut v = env.node_env(id);
        v.retain(|(k, _)| k != "SAGAFLOW_API_ADDR");
        v.push(("SAGAFLOW_API_ADDR".into(), String::new()));
        v
    };
    let node = |id: &str| Node::spawn_with(env!("CARGO_BIN_EXE_probe-node"), &["serve"], vars(id), id).unwrap();
    let (a, b) = (node("node-a"), node("node-b"));
    let p = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let client = Orchestrator::connect(env.config("client"), registry()).await.unwrap().client().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_holders(env.pool.clone(), "gpu-pool", stop.clone());

    // 50 sagas at once, each holding a slot of `gpu-pool` (2 at once) for 200 ms.
    let plan = Plan::default().with("gpu", Behavior::Held { ms: 200 });
    let req = probe::start_request("limited", &plan);
    let starts = (0..SAGAS).map(|_| client.engine().start(&req, None));
    let ids: Vec<SagaId> = futures_util::future::join_all(starts).await.into_iter().map(|s| s.unwrap().saga_id).collect();

    // Part-way through, node-b dies (with whatever it was granting or deciding).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count(&env.pool, "SELECT count(*) FROM probe.effects WHERE key = 'gpu'").await < 10 {
        assert!(tokio::time::Instant::now() < deadline, "the limited steps do not run:\n{}\n{}", a.logged(), b.logged());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waiting = count(&env.pool, "SELECT count(*) FROM sagaflow.slot_waiters WHERE resource = 'gpu-pool'").await;
    b.kill().await.unwrap();

    let states = wait::all_settled(&env.pool, &ids, Duration::from_secs(180)).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let max_holders = watcher.await.unwrap();
    for (id, st) in ids.iter().zip(&states) {
        assert_eq!(st.status, SagaStatus::Completed, "{id}: {st:?}");
        assert_eq!(probe::effects(&env.pool, *id).await.unwrap(), ["a:do", "gpu:do", "b:do"], "{id}: each effect once");
    }
    let leaked = count(&env.pool, "SELECT count(*) FROM sagaflow.slot_holders").await
        + count(&env.pool, "SELECT count(*) FROM sagaflow.slot_waiters").await;
    let (_, max_running) = probe::running("gpu");
    println!(
        "limits: sagas={SAGAS} limit=2 nodes=2 killed=1 waiting_at_kill={waiting} max_holders={max_holders} max_running={max_running} leaked={leaked}"
    );
    assert!(waiting > 0, "the kill came while sagas waited for a slot");
    assert_eq!(max_holders, 2, "at most 2 hold a slot at once, and the limit was used");
    assert!(max_running <= 2, "at most 2 limited commands ran at once: {max_running}");
    assert_eq!(leaked, 0, "no slot or place in a queue is left");

    p.shutdown().await.unwrap();
    client.shutdown().await.unwrap();
    assert!(a.terminate().await.unwrap(), "node-a exits cleanly");
    env.cleanup(&["probe"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_of_a_higher_priority_take_a_freed_slot_before_those_queued_earlier() {
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let node = env.orchestrator("n1", registry()).await.unwrap();
    let p = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let start = |ms: u64, priority: Option<i32>| {
        let req =
            sagas::protocol::StartRequest { priority, ..probe::start_request("solo", &Plan::default().with("x", Behavior::Held { ms })) };
        let engine = node.engine().clone();
        async move { engine.start(&req, None).await.unwrap().saga_id }
    };

    // The only slot of `solo-pool` is taken for 1.5 s ...
    let first = start(1_500, None).await;
    wait::until(&env.pool, first, Duration::from_secs(30), |st| st.steps[0].status == sagas::StepStatus::Running).await.unwrap();
    // ... five sagas queue for it, then two of a higher priority.
    let mut lows = Vec::new();
    for _ in 0..5 {
        lows.push(start(50, None).await);
    }
    let highs = vec![start(50, Some(10)).await, start(50, Some(10)).await];
    // The waiting ones are shown as waiting.
    for id in lows.iter().chain(&highs) {
        let view = orchestrator::ops::get(node.engine(), *id).await.unwrap();
        assert_eq!((view.status.as_str(), view.steps[0].status.as_str()), ("running", "awaiting_slot"), "{id}");
    }
    assert_eq!(count(&env.pool, "SELECT count(*) FROM sagaflow.slot_waiters WHERE resource = 'solo-pool'").await, 7);

    let all: Vec<SagaId> = std::iter::once(first).chain(lows.iter().copied()).chain(highs.iter().copied()).collect();
    wait::all_settled(&env.pool, &all, Duration::from_secs(60)).await.unwrap();
    let rows: Vec<(uuid::Uuid,)> =
        sqlx::query_as("SELECT saga_id FROM probe.effects WHERE key = 'x' ORDER BY id").fetch_all(&env.pool).await.unwrap();
    let ran: Vec<SagaId> = rows.into_iter().map(|(id,)| SagaId(id)).collect();
    let want: Vec<SagaId> = std::iter::once(first).chain(highs.iter().copied()).chain(lows.iter().copied()).collect();
    assert_eq!(ran, want, "the slot went to the first saga, then by priority, then in the order they queued");
    assert_eq!(probe::running("x").1, 1, "one at a time");

    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_queue_delivers_the_commands_of_higher_priority_sagas_first() {
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let def = sagas::SagaDefinition::<Plan>::builder("queued", 1).step("p", |s| probe::step(s, "p")).build().unwrap();
    let mut r = Registry::new();
    r.register(def.erased()).unwrap();
    // The node declares the participant's queue as a priority queue; the participant is not
    // running yet, so the commands wait in it.
    let config = orchestrator::Config { priority_queues: true, ..env.config("n1") };
    let node = Orchestrator::connect(config, r).await.unwrap().start().await.unwrap();
    let start = |priority: Option<i32>| {
        let req = sagas::protocol::StartRequest { priority, ..probe::start_request("queued", &Plan::default()) };
        let engine = node.engine().clone();
        async move { engine.start(&req, None).await.unwrap().saga_id }
    };
    let mut lows = Vec::new();
    for _ in 0..5 {
        lows.push(start(None).await);
    }
    let highs = vec![start(Some(9)).await, start(Some(100)).await];
    let ch = env.amqp().await.unwrap().create_channel().await.unwrap();
    let queue = env.names().participant_queue("probe");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while testkit::messages::queue_depth(&ch, &queue).await.unwrap() < 7 {
        assert!(tokio::time::Instant::now() < deadline, "the commands did not reach the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One command at a time: the order they are taken is the order they are delivered.
    let cfg = participants_sdk::ParticipantConfig {
        priority_queues: true,
        prefetch: 1,
        concurrency: 1,
        batch_max: 1,
        ..env.participant_config()
    };
    let p = probe::participant(cfg).start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let all: Vec<SagaId> = lows.iter().chain(&highs).copied().collect();
    wait::all_settled(&env.pool, &all, Duration::from_secs(60)).await.unwrap();
    let rows: Vec<(uuid::Uuid,)> =
        sqlx::query_as("SELECT saga_id FROM probe.effects WHERE key = 'p' ORDER BY id").fetch_all(&env.pool).await.unwrap();
    let ran: Vec<SagaId> = rows.into_iter().map(|(id,)| SagaId(id)).collect();
    assert_eq!(&ran[..2], &highs[..], "the high-priority commands first (priority 100 is delivered as 9, after the first 9)");
    // (Sagas started one after the other need not publish in that order: a start whose
    // command the node's publisher did not take yet is published by the relay.)
    let (mut rest, mut want) = (ran[2..].to_vec(), lows.clone());
    rest.sort_by_key(|s| s.0);
    want.sort_by_key(|s| s.0);
    assert_eq!(rest, want, "then the others");

    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}
