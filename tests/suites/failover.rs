//! PostgreSQL fails over in the middle of the order sagas: a primary and a synchronous
//! streaming standby in containers; two orchestrator nodes, the three participants and the
//! client get both addresses. While the sagas run the primary is stopped and the standby
//! promoted: nothing committed may be lost (every saga whose start returned is there and
//! settles), each effect once, nothing left in the outbox.
//!
//! `SAGAFLOW_FAILOVER_SAGAS` (default 1000) sets the size. Needs Docker and the PostgreSQL image
//! (`scripts/setup.sh`).

use std::time::Instant;

use orchestrator::Orchestrator;
use testkit::cluster::PgPair;
use testkit::orders::{self, Tally};
use testkit::{Node, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_fails_over_and_nothing_committed_is_lost() {
    let n: u32 = std::env::var("SAGAFLOW_FAILOVER_SAGAS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let pg = PgPair::start().await.unwrap();
    let (amqp, _) = testkit::env::service_urls().unwrap().unwrap_or_else(|| (orchestrator::Config::default().amqp_url, String::new()));
    let env = TestEnv::on_services(amqp, pg.url(0, "postgres")).await.unwrap();
    order_fulfilment::setup(&env.pool, &["widget"], i64::from(n) * 10).await.unwrap();
    participants_sdk::ensure_schema(&env.pool, false).await.unwrap();
    let database = pg.urls(env.database());
    let vars = |id: &str| {
        let mut v = env.node_env(id);
        v.retain(|(k, _)| k != "SAGAFLOW_DATABASE_URL" && k != "SAGAFLOW_API_ADDR");
        v.extend([("SAGAFLOW_DATABASE_URL".to_owned(), database.clone()), ("SAGAFLOW_API_ADDR".to_owned(), String::new())]);
        v
    };
    let mut procs: Vec<Node> = ["failover-node-a", "failover-node-b"]
        .iter()
        .map(|id| Node::spawn_with(env!("CARGO_BIN_EXE_sagaflow-node"), &["serve"], vars(id), id).unwrap())
        .collect();
    for p in order_fulfilment::PARTICIPANTS {
        procs.push(Node::spawn_with(env!("CARGO_BIN_EXE_testkit-order-participant"), &[p], vars(p), &format!("failover-{p}")).unwrap());
    }
    let config = orchestrator::Config { database_url: database.clone(), ..env.config("failover-client") };
    let client = Orchestrator::connect(config, orders::registry()).await.unwrap().client().await.unwrap();
    let engine = client.engine().clone();

    let started = Instant::now();
    let mut ids = Vec::new();
    let cut = n * 2 / 5;
    orders::start_numbered(&engine, "failover", 1, cut, &mut ids).await;
    // Sagas are in flight: the primary goes, the standby takes over.
    pg.fail_over().await.unwrap();
    orders::start_numbered(&engine, "failover", cut + 1, n, &mut ids).await;

    // From here on the test reads the promoted standby.
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&pg.url(1, env.database())).await.unwrap();
    let logs = || procs.iter().map(|p| format!("{}:\n{}", p.id, p.logged())).collect::<Vec<_>>().join("\n");
    orders::wait_all_settled(&pool, n, logs).await;
    let elapsed = started.elapsed();
    let outbox_left = orders::outbox_left(&pool).await;
    // Every saga whose start returned was committed on both servers: it is here.
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
    let present: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sagaflow.instances WHERE id = ANY($1)").bind(&uuids).fetch_one(&pool).await.unwrap();
    let Tally { lost, duplicate_effects, misordered, stuck } = orders::tally(&pool, "failover", n).await.unwrap();
    let line =
        format!("failover: sagas={n} promoted=1 lost={lost} duplicate_effects={duplicate_effects} misordered={misordered} stuck={stuck}");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("elapsed_s={:.1} outbox_left={outbox_left} started_and_present={present}\n{line}\n", elapsed.as_secs_f64()).as_bytes(),
    );
    assert_eq!(present, i64::try_from(ids.len()).unwrap(), "a saga whose start returned is missing");
    assert_eq!((lost, duplicate_effects, misordered, stuck), (0, 0, 0, 0), "{line}");
    assert_eq!(outbox_left, 0, "messages left unpublished");

    client.shutdown().await.unwrap();
    for p in procs {
        assert!(p.terminate().await.unwrap(), "a graceful exit");
    }
    // The database went with the containers.
    env.cleanup_broker(&order_fulfilment::PARTICIPANTS).await.unwrap();
}
