//! Reply partitions (`partitions` = 4) with two nodes as child processes: the nodes share the
//! partitions out, the replies of each saga reach the node that owns its partition (it makes
//! the saga's last decision), a node killed with SIGKILL hands its partitions to the other, and
//! one that comes back gets its share again; events published to the inbound queue are applied
//! by the owner of their saga's partition.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use orchestrator::Orchestrator;
use sagaflow_amqp::transport::partition_of;
use sagas::{SagaId, SagaStatus};
use testkit::node::Node;
use testkit::{TestEnv, orders, wait};

const PARTITIONS: u16 = 4;

/// Each live node's partitions, from `sagaflow.nodes` (rows written in the last 3 s).
async fn owners(pool: &sqlx::PgPool) -> BTreeMap<String, Vec<u16>> {
    let rows: Vec<(String, Vec<i32>)> =
        sqlx::query_as("SELECT node_id, partitions FROM sagaflow.nodes WHERE seen_at > now() - interval '3 seconds'")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter().map(|(n, ps)| (n, ps.into_iter().map(|p| u16::try_from(p).unwrap()).collect())).collect()
}

/// Wait until the live nodes' partitions are `want` (each node's sorted), each partition once.
async fn wait_owners(
    pool: &sqlx::PgPool,
    nodes: &[&Node],
    want: impl Fn(&BTreeMap<String, Vec<u16>>) -> bool,
) -> BTreeMap<String, Vec<u16>> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let got = owners(pool).await;
        let all: Vec<u16> = got.values().flatten().copied().collect();
        let once = all.len() == usize::from(PARTITIONS) && all.iter().collect::<BTreeSet<_>>().len() == all.len();
        if once && want(&got) {
            return got;
        }
        let logs: Vec<String> = nodes.iter().map(|n| n.logged()).collect();
        assert!(Instant::now() < deadline, "the partitions did not settle: {got:?}\n{}", logs.join("\n---\n"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Start `n` mixed orders (every fifth refused by shipping) through `client`, wait for all to
/// settle as they should, and return each saga with the node that made its last decision.
async fn run_orders(env: &TestEnv, client: &orchestrator::Engine, prefix: &str, n: u32) -> Vec<(SagaId, String)> {
    let mut ids = Vec::new();
    for i in 1..=n {
        ids.push(client.start(&orders::mixed(prefix, i, 5), None).await.unwrap().saga_id);
    }
    let states = wait::all_settled(&env.pool, &ids, Duration::from_secs(90)).await.unwrap();
    for (i, st) in states.iter().enumerate() {
        let want = if (i + 1) % 5 == 0 { SagaStatus::Compensated } else { SagaStatus::Completed };
        assert_eq!(st.status, want, "{prefix}-{}", i + 1);
    }
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, decided_by FROM sagaflow.instances WHERE id = ANY($1)").bind(&uuids).fetch_all(&env.pool).await.unwrap();
    rows.into_iter().map(|(id, by)| (SagaId(id), by)).collect()
}

/// Every saga's last decision was made by the node owning its partition in `owners`.
fn decided_by_owners(decided: &[(SagaId, String)], owners: &BTreeMap<String, Vec<u16>>) {
    for (id, by) in decided {
        let p = partition_of(*id, PARTITIONS);
        let owner = owners.iter().find(|(_, ps)| ps.contains(&p)).map(|(n, _)| n.as_str());
        assert_eq!(Some(by.as_str()), owner, "saga {id} (partition {p}) decided by {by}; owners {owners:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_the_reply_partitions_and_take_over_from_a_killed_node() {
    let env = TestEnv::start().await.unwrap();
    order_fulfilment::setup(&env.pool, &["widget"], 1_000_000).await.unwrap();
    let vars = |id: &str| {
        let mut v = env.node_env(id);
        v.retain(|(k, _)| k != "SAGAFLOW_API_ADDR");
        v.push(("SAGAFLOW_API_ADDR".into(), String::new()));
        v.push(("SAGAFLOW_PARTITIONS".into(), PARTITIONS.to_string()));
        v
    };
    let node = |id: &str| Node::spawn_with(env!("CARGO_BIN_EXE_sagaflow-node"), &["serve"], vars(id), id).unwrap();
    let (a, b) = (node("node-a"), node("node-b"));
    let participants: Vec<Node> = order_fulfilment::PARTICIPANTS
        .iter()
        .map(|p| Node::spawn_with(env!("CARGO_BIN_EXE_testkit-order-participant"), &[p], vars(p), &format!("part-{p}")).unwrap())
        .collect();
    let client = Orchestrator::connect(orchestrator::Config { partitions: PARTITIONS, ..env.config("client") }, orders::registry())
        .await
        .unwrap()
        .client()
        .await
        .unwrap();

    // Both nodes take a share; each saga's replies reach the owner of its partition.
    let shared = wait_owners(&env.pool, &[&a, &b], |o| o.len() == 2 && o.values().all(|ps| !ps.is_empty())).await;
    let decided = run_orders(&env, client.engine(), "shared", 100).await;
    decided_by_owners(&decided, &shared);
    let by: BTreeSet<&str> = decided.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(by, BTreeSet::from(["node-a", "node-b"]), "both nodes decided");

    // node-b dies: node-a takes its partitions once node-b's row is old.
    b.kill().await.unwrap();
    let alone = wait_owners(&env.pool, &[&a], |o| o.len() == 1 && o.contains_key("node-a")).await;
    let decided = run_orders(&env, client.engine(), "alone", 60).await;
    decided_by_owners(&decided, &alone);

    // node-b comes back and gets its share again (node-a lets go of it).
    let b = node("node-b");
    let again = wait_owners(&env.pool, &[&a, &b], |o| o.len() == 2 && o.values().all(|ps| !ps.is_empty())).await;
    assert_eq!(again, shared, "the same share as before: the assignment depends only on who is alive");
    let decided = run_orders(&env, client.engine(), "again", 60).await;
    decided_by_owners(&decided, &again);

    // Each partition queue has one consumer and nothing left in it.
    let ch = env.amqp().await.unwrap().create_channel().await.unwrap();
    let names = env.names().with_partitions(PARTITIONS);
    for p in 0..PARTITIONS {
        let q = testkit::messages::queue_depth(&ch, &names.partition_queue(p)).await.unwrap();
        assert_eq!(q, 0, "partition {p} drained");
        let opts = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let q = ch.queue_declare(names.partition_queue(p).as_str().into(), opts, Default::default()).await.unwrap();
        assert_eq!(q.consumer_count(), 1, "partition {p}: one consumer (the owner)");
    }

    // A node that stops deletes its row.
    assert!(a.terminate().await.unwrap() && b.terminate().await.unwrap(), "graceful exits");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.nodes").fetch_one(&env.pool).await.unwrap();
    assert_eq!(left, 0, "the rows are gone (node-b's second run took over the row its killed run left)");
    client.shutdown().await.unwrap();
    for p in participants {
        p.terminate().await.unwrap();
    }
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

/// With partitions, an event published to the inbound queue reaches the node that owns its
/// saga's partition: whichever node takes it from `{ns}.inbound` forwards it there, so the
/// event is decided by the node that decides the saga's replies (in-process nodes here), once
/// even when it is published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_from_the_inbound_queue_is_applied_by_the_owner_of_its_sagas_partition() {
    use testkit::probe::{self, Plan};
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let approval = sagas::SagaDefinition::<Plan>::builder("approval", 1)
        .step("a", |s| probe::step(s, "a"))
        .wait("approved", |w| w.event("approved"))
        .build()
        .unwrap();
    let registry = || {
        let mut r = sagas::Registry::new();
        r.register(approval.erased()).unwrap();
        r
    };
    let node = |id: &str| {
        let config = orchestrator::Config { partitions: PARTITIONS, ..env.config(id) };
        async move { Orchestrator::connect(config, registry()).await.unwrap().start().await.unwrap() }
    };
    let (a, b) = (node("in-a").await, node("in-b").await);
    let p = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let shared = wait_owners(&env.pool, &[], |o| o.len() == 2 && o.values().all(|ps| !ps.is_empty())).await;

    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(a.engine().start(&probe::start_request("approval", &Plan::default()), None).await.unwrap().saga_id);
    }
    for id in &ids {
        wait::until(&env.pool, *id, Duration::from_secs(60), |s| s.steps[1].status == sagas::StepStatus::Waiting).await.unwrap();
    }
    let names = env.names().with_partitions(PARTITIONS);
    let ch = env.amqp().await.unwrap().create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    for id in &ids {
        let body = serde_json::json!({"saga_id": id, "event": "approved", "payload": {}}).to_string();
        let m = sagas::protocol::WireMessage {
            kind: Some(sagas::protocol::TYPE_EVENT.into()),
            ..testkit::messages::start_message(body.as_bytes())
        };
        // Twice, with one id: applied once.
        for _ in 0..2 {
            sagaflow_amqp::transport::publish_confirmed(&ch, "", &names.inbound_queue(), &m, true).await.unwrap();
        }
    }
    let states = wait::all_settled(&env.pool, &ids, Duration::from_secs(60)).await.unwrap();
    assert!(states.iter().all(|s| s.status == SagaStatus::Completed));
    let events: Vec<(uuid::Uuid, String, String)> =
        sqlx::query_as("SELECT saga_id, node, outcome FROM sagaflow.history WHERE input_kind = 'event' AND saga_id = ANY($1) ORDER BY id")
            .bind(ids.iter().map(|i| i.0).collect::<Vec<_>>())
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let applied: Vec<(SagaId, String)> =
        events.iter().filter(|(_, _, outcome)| outcome == "applied").map(|(id, node, _)| (SagaId(*id), node.clone())).collect();
    assert_eq!(applied.len(), ids.len(), "each event applied once: {events:?}");
    decided_by_owners(&applied, &shared);
    let by: BTreeSet<&str> = applied.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(by, BTreeSet::from(["in-a", "in-b"]), "both nodes own sagas");

    p.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}
