//! Chaos: thousands of order sagas (every 5th compensates, every 7th retries its shipment) on two
//! orchestrator nodes and three participant processes, while faults hit at random moments:
//! connections cut, nodes and participants SIGKILLed, the broker and the database restarted.
//! Then every saga is checked: outcome, each effect exactly once, compensations in reverse
//! order, nothing left in any outbox, nothing dead-lettered but the bad input injected.
//!
//! `SAGAFLOW_CHAOS_SAGAS` (default 2000) sets the size; `SAGAFLOW_CHAOS_SEED` replays a run.
//! Runs on containers of its own, so restarts touch nothing else.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sagaflow_amqp::transport::{self, Names};
use sagas::protocol::{TYPE_START, WireMessage};
use sagas::{MessageId, Registry, SagaId};
use testkit::{Node, Proxy, TestEnv};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Cluster<'a> {
    env: &'a TestEnv,
    amqp: String,
    db: String,
    nodes: Vec<Node>,
    participants: Vec<(String, Node)>,
    spawned: u32,
}

impl Cluster<'_> {
    fn vars(&self, id: &str) -> Vec<(String, String)> {
        let mut v = self.env.node_env(id);
        for (k, val) in &mut v {
            match k.as_str() {
                "SAGAFLOW_AMQP_URL" => val.clone_from(&self.amqp),
                "SAGAFLOW_DATABASE_URL" => val.clone_from(&self.db),
                _ => {}
            }
        }
        v
    }

    fn spawn_node(&mut self) {
        self.spawned += 1;
        let id = format!("node-{}", self.spawned);
        self.nodes.push(Node::spawn_with(env!("CARGO_BIN_EXE_sagaflow-node"), &["serve"], self.vars(&id), &id).unwrap());
    }

    fn spawn_participant(&mut self, name: &str) {
        self.spawned += 1;
        let id = format!("{name}-{}", self.spawned);
        let p = Node::spawn_with(env!("CARGO_BIN_EXE_testkit-order-participant"), &[name], self.vars(&id), &id).unwrap();
        self.participants.push((name.to_owned(), p));
    }
}

/// A count, retried while the database restarts.
async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    let mut last = None;
    for _ in 0..300 {
        match sqlx::query_scalar(sql).fetch_one(pool).await {
            Ok(n) => return n,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{sql}: {last:?}")
}

/// Publish one bad message, `id`, on a fresh connection; `false` when the broker did not confirm
/// it (it may still have arrived).
async fn inject_bad(amqp: &str, queue: &str, i: u32, id: MessageId) -> bool {
    let attempt = async {
        let conn = lapin::Connection::connect(amqp, lapin::ConnectionProperties::default()).await?;
        let ch = transport::confirm_channel(&conn).await?;
        let bad = WireMessage {
            message_id: Some(id.to_string()),
            kind: Some(TYPE_START.into()),
            body: format!("{{not json {i}").into_bytes(),
            ..WireMessage::default()
        };
        transport::publish_confirmed(&ch, "", queue, &bad, true).await?;
        let _ = conn.close(200, "done".into()).await;
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt).await.is_ok_and(|r| r.is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_saga_ends_right_with_each_effect_once() {
    let n: u32 = std::env::var("SAGAFLOW_CHAOS_SAGAS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let seed: u64 = std::env::var("SAGAFLOW_CHAOS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % u128::from(u64::MAX))
            .unwrap()
            | 1
    });
    let mut rng = Rng(seed);
    let env = TestEnv::with_containers().await.unwrap();
    let containers = env.containers().unwrap();
    let amqp_proxy = Proxy::start(containers.amqp_addr().await.unwrap()).await.unwrap();
    let pg_proxy = Proxy::start(containers.postgres_addr().await.unwrap()).await.unwrap();

    // Everything, this process included, reaches the services through the proxies: a restarted
    // container comes back on another port.
    let (amqp, db) = (amqp_proxy.url(&env.amqp_url), pg_proxy.url(&env.database_url));
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&db).await.unwrap();
    let mut registry = Registry::new();
    registry.register(order_fulfilment::definition().unwrap().erased()).unwrap();
    let mut client_cfg = env.config("client");
    client_cfg.database_url.clone_from(&db);
    client_cfg.amqp_url.clone_from(&amqp);
    let client = orchestrator::Orchestrator::connect(client_cfg, registry).await.unwrap();
    order_fulfilment::setup(&pool, &["widget"], i64::from(n) * 10).await.unwrap();
    participants_sdk::ensure_schema(&pool, false).await.unwrap();

    let mut cluster = Cluster { env: &env, amqp: amqp.clone(), db: db.clone(), nodes: Vec::new(), participants: Vec::new(), spawned: 0 };
    cluster.spawn_node();
    cluster.spawn_node();
    for p in order_fulfilment::PARTICIPANTS {
        cluster.spawn_participant(p);
    }
    let names = env.names();

    let started = Instant::now();
    let mut ids: Vec<SagaId> = Vec::with_capacity(n as usize);
    let mut faults = Vec::new();
    // Every bad message sent, and those the broker confirmed.
    let (mut bad_sent, mut bad_confirmed) = (HashSet::new(), HashSet::new());
    let mut next_fault = Instant::now() + Duration::from_millis(500);
    let mut i = 0;
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        // Start sagas in batches while faults happen.
        for _ in 0..50 {
            if i < n {
                // Starting is idempotent by key, so a start that failed mid-restart is retried.
                let req = testkit::orders::numbered("chaos", i + 1);
                match client.engine().start(&req, None).await {
                    Ok(s) => {
                        ids.push(s.saga_id);
                        i += 1;
                    }
                    Err(_) => break,
                }
                if i % 250 == 0 {
                    // The broker may be restarting: try again (a new message each time) for a while.
                    let give_up = Instant::now() + Duration::from_secs(15);
                    while Instant::now() < give_up {
                        let id = MessageId::new_random();
                        bad_sent.insert(id.to_string());
                        if inject_bad(&amqp, &names.inbound_queue(), i, id).await {
                            bad_confirmed.insert(id.to_string());
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
        let settled = count(&pool, "SELECT count(*) FROM sagaflow.instances WHERE status IN ('completed', 'compensated', 'stopped')").await;
        if i >= n && settled >= i64::from(n) {
            break;
        }
        assert!(Instant::now() < deadline, "chaos: {settled} of {n} settled before the deadline; faults so far: {faults:?}");
        if Instant::now() >= next_fault && faults.len() < 40 {
            let compensating = count(&pool, "SELECT count(*) FROM sagaflow.instances WHERE status = 'compensating'").await;
            let kind = rng.below(7);
            let what = match kind {
                0 => {
                    amqp_proxy.cut();
                    "cut every RabbitMQ connection".to_owned()
                }
                1 => {
                    pg_proxy.cut();
                    "cut every PostgreSQL connection".to_owned()
                }
                2 | 3 => {
                    let k = usize::try_from(rng.below(cluster.nodes.len() as u64)).unwrap();
                    let node = cluster.nodes.remove(k);
                    let id = node.id.clone();
                    node.kill().await.unwrap();
                    cluster.spawn_node();
                    format!("SIGKILL {id}, start a new node")
                }
                4 => {
                    let k = usize::try_from(rng.below(cluster.participants.len() as u64)).unwrap();
                    let (name, p) = cluster.participants.remove(k);
                    let id = p.id.clone();
                    p.kill().await.unwrap();
                    cluster.spawn_participant(&name);
                    format!("SIGKILL {id}, restart {name}")
                }
                5 => {
                    containers.rabbitmq.stop().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(rng.below(2000))).await;
                    containers.rabbitmq.start().await.unwrap();
                    amqp_proxy.set_upstream(containers.amqp_addr().await.unwrap());
                    amqp_proxy.cut();
                    "restart the RabbitMQ container".to_owned()
                }
                _ => {
                    containers.postgres.stop().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(rng.below(2000))).await;
                    containers.postgres.start().await.unwrap();
                    pg_proxy.set_upstream(containers.postgres_addr().await.unwrap());
                    pg_proxy.cut();
                    "restart the PostgreSQL container".to_owned()
                }
            };
            faults.push(format!("{what} ({compensating} sagas compensating)"));
            next_fault = Instant::now() + Duration::from_millis(500 + rng.below(2500));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();

    // Let the last replies and lifecycle events drain, then check everything. A publisher or
    // relay caught on a connection that died without closing waits up to `BROKER_WAIT` (30 s)
    // before it gives the rows back, so the drain may take longer than that.
    let mut outbox_left = 0;
    for _ in 0..300 {
        outbox_left = count(&pool, "SELECT count(*) FROM sagaflow.outbox").await
            + count(&pool, "SELECT count(*) FROM sagaflow_participant.outbox").await;
        if outbox_left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let testkit::orders::Tally { lost, duplicate_effects, misordered, stuck } = testkit::orders::tally(&pool, "chaos", n).await.unwrap();
    let conn = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let dead = |q: String| {
        let ch = ch.clone();
        async move {
            ch.queue_declare(q.as_str().into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
                .await
                .map(|q| q.message_count())
                .unwrap_or(0)
        }
    };
    // A bad message is dead-lettered at least once: a node that dies between the dead letter's
    // confirm and the original's ack dead-letters it again on redelivery.
    // The last one may still be on its way: read until every confirmed one is there, for a while.
    let inbound_dlq = Names::dead_letter_queue(&names.inbound_queue());
    let (mut inbound_dead, mut bad_dead, mut unexpected_dead) = (0, HashSet::new(), Vec::new());
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = usize::try_from(dead(inbound_dlq.clone()).await).unwrap();
        for d in testkit::wait::drain(&ch, &inbound_dlq, ready, Duration::from_secs(10)).await.unwrap() {
            inbound_dead += 1;
            let id = d.properties.message_id().as_ref().map(|m| m.as_str().to_owned()).unwrap_or_default();
            let reason = testkit::wait::dead_letter_reason(&d);
            if bad_sent.contains(&id) && reason == "malformed_body" {
                bad_dead.insert(id);
            } else {
                unexpected_dead.push(format!("{id} ({reason})"));
            }
        }
        if bad_confirmed.is_subset(&bad_dead) || Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let bad_missing = bad_confirmed.difference(&bad_dead).count();
    let mut other_dead = dead(Names::dead_letter_queue(&names.replies_queue())).await;
    for p in order_fulfilment::PARTICIPANTS {
        other_dead += dead(Names::dead_letter_queue(&names.participant_queue(p))).await;
    }

    let summary = format!(
        "chaos: sagas={n} faults={} lost={lost} duplicate_effects={duplicate_effects} misordered={misordered} stuck={stuck}",
        faults.len()
    );
    let detail = format!(
        "seed={seed} elapsed_s={:.1} outbox_left={outbox_left} dead_letters: bad messages confirmed={} of {} sent, inbound={inbound_dead} dead letters of {} distinct bad messages, missing={bad_missing} unexpected={unexpected_dead:?} elsewhere={other_dead}\nfaults:\n  {}",
        elapsed.as_secs_f64(),
        bad_confirmed.len(),
        bad_sent.len(),
        bad_dead.len(),
        faults.join("\n  ")
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{detail}\n{summary}\n").as_bytes());
    assert!(faults.len() >= 5, "too few faults to prove anything: {detail}");
    assert!(!bad_confirmed.is_empty(), "no bad message reached the broker: {detail}");
    assert_eq!((lost, duplicate_effects, misordered, stuck), (0, 0, 0, 0), "{summary}\n{detail}");
    assert_eq!(outbox_left, 0, "messages left unpublished: {detail}");
    assert!(
        unexpected_dead.is_empty() && bad_missing == 0 && other_dead == 0,
        "dead letters hold the injected bad input, all of it, and nothing else: {detail}"
    );

    for node in cluster.nodes {
        node.kill().await.unwrap();
    }
    for (_, p) in cluster.participants {
        p.kill().await.unwrap();
    }
    conn.close(200, "done".into()).await.ok();
    pool.close().await;
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}
