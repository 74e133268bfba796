//! Schedules against real RabbitMQ and PostgreSQL: two nodes fire a schedule once per tick (and
//! one carries on when the other stops), and ticks missed while no node ran follow each
//! schedule's policy.

use std::time::Duration;

use orchestrator::schedules::{self, ScheduleRequest};
use sagas::schedule::Missed;
use sagas::{Registry, SagaDefinition, SagaId, SagaStatus};
use testkit::probe::{self, Plan};
use testkit::{TestEnv, wait};

fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(SagaDefinition::<Plan>::builder("ticked", 1).step("t", |s| probe::step(s, "t")).build().unwrap().erased()).unwrap();
    r
}

fn request(cron: &str, missed: Missed) -> ScheduleRequest {
    ScheduleRequest {
        definition: "ticked".into(),
        input: serde_json::to_value(Plan::default()).unwrap(),
        cron: Some(cron.into()),
        missed: Some(missed),
        ..ScheduleRequest::default()
    }
}

/// The sagas schedule `name` started: (tick, saga), by tick.
async fn started(pool: &sqlx::PgPool, name: &str) -> Vec<(u64, SagaId)> {
    let rows: Vec<(String, uuid::Uuid)> =
        sqlx::query_as("SELECT idempotency_key, id FROM sagaflow.instances WHERE idempotency_key LIKE $1")
            .bind(format!("schedule/{name}/%"))
            .fetch_all(pool)
            .await
            .unwrap();
    let mut v: Vec<(u64, SagaId)> = rows.into_iter().map(|(k, id)| (k.rsplit('/').next().unwrap().parse().unwrap(), SagaId(id))).collect();
    v.sort_unstable();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_once_per_tick_on_two_nodes() {
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let (n1, n2) = (env.orchestrator("n1", registry()).await.unwrap(), env.orchestrator("n2", registry()).await.unwrap());
    let p = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();

    schedules::put(n1.engine(), "every-second", request("* * * * * *", Missed::FireOnce)).await.unwrap();
    // Both nodes look for it every second; then n1 stops and n2 carries on alone.
    tokio::time::sleep(Duration::from_secs(4)).await;
    n1.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let shown = schedules::get(n2.engine(), "every-second").await.unwrap();
    schedules::delete(n2.engine(), "every-second").await.unwrap();
    let fired = started(&env.pool, "every-second").await;

    let ticks: Vec<u64> = fired.iter().map(|(t, _)| *t).collect();
    let gaps = ticks.windows(2).filter(|w| w[1] - w[0] != 1000).count();
    let ids: Vec<SagaId> = fired.iter().map(|(_, id)| *id).collect();
    let states = wait::all_settled(&env.pool, &ids, Duration::from_secs(60)).await.unwrap();
    let mut effects = 0;
    for (id, st) in ids.iter().zip(&states) {
        assert_eq!(st.status, SagaStatus::Completed);
        effects += probe::effects(&env.pool, *id).await.unwrap().len();
    }
    let starters: Vec<(String, i64)> = sqlx::query_as(
        "SELECT node, count(*) FROM sagaflow.history WHERE input_kind = 'start' AND saga_id = ANY($1) GROUP BY node ORDER BY node",
    )
    .bind(ids.iter().map(|i| i.0).collect::<Vec<_>>())
    .fetch_all(&env.pool)
    .await
    .unwrap();
    println!("schedules: ticks={} sagas={} nodes=2 gaps={gaps} started_by={starters:?}", ticks.len(), ids.len());
    assert!(ticks.len() >= 6, "a tick a second for 8 s: {ticks:?}");
    assert!(starters.iter().any(|(n, _)| n == "n2"), "n2 took over: {starters:?}");
    assert_eq!(gaps, 0, "every second had its saga: {ticks:?}");
    assert_eq!(effects, ids.len(), "one saga, one effect, per tick");
    // Shown before the schedule was deleted: its last tick is one that fired, with its saga.
    let last = fired.iter().find(|(t, _)| Some(*t) == shown.last_tick).expect("the last tick shown fired");
    assert_eq!((shown.last_saga, shown.last_error.as_deref()), (Some(last.1), None), "{shown:?}");

    p.shutdown().await.unwrap();
    n2.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_missed_while_no_node_ran_follow_each_schedule_s_policy() {
    const HOUR: u64 = 3_600_000;
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    // Not in the first two minutes of an hour: the last hourly tick is then a missed one.
    while sagas::Timestamp::now().0 % HOUR < 120_000 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Created through a client (which fires nothing), then made 5 hours behind, as if every
    // node had been down since.
    let client = orchestrator::Orchestrator::connect(env.config("client"), registry()).await.unwrap().client().await.unwrap();
    for (name, missed) in [("all", Missed::FireAll), ("once", Missed::FireOnce), ("skip", Missed::Skip)] {
        schedules::put(client.engine(), name, request("0 0 * * * *", missed)).await.unwrap();
    }
    let now = sagas::Timestamp::now().0;
    let last_hour = now - now % HOUR;
    let five_hours_ago = last_hour - 4 * HOUR;
    sqlx::query("UPDATE sagaflow.schedules SET next_ms = $1")
        .bind(i64::try_from(five_hours_ago).unwrap())
        .execute(&env.pool)
        .await
        .unwrap();

    let node = env.orchestrator("n1", registry()).await.unwrap();
    let p = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let behind: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.schedules WHERE next_ms <= $1")
            .bind(i64::try_from(now).unwrap())
            .fetch_one(&env.pool)
            .await
            .unwrap();
        if behind == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the schedules were not fired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ticks = |v: Vec<(u64, SagaId)>| v.into_iter().map(|(t, _)| t).collect::<Vec<_>>();
    let all = ticks(started(&env.pool, "all").await);
    let once = ticks(started(&env.pool, "once").await);
    let skip = ticks(started(&env.pool, "skip").await);
    println!("schedules: missed=5 fire_all={} fire_once={} skip={}", all.len(), once.len(), skip.len());
    assert_eq!(all, (0..5).map(|h| five_hours_ago + h * HOUR).collect::<Vec<_>>(), "fire_all: every missed hour");
    assert_eq!(once, vec![last_hour], "fire_once: the latest missed hour");
    assert!(skip.is_empty(), "skip: none");
    for name in ["all", "once", "skip"] {
        let s = schedules::get(node.engine(), name).await.unwrap();
        assert_eq!(s.next_at, Some(last_hour + HOUR), "{name}: on to the next hour");
    }

    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    client.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}
