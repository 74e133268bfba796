//! The orchestrator runtime end to end, against real RabbitMQ and PostgreSQL.

use std::time::Duration;

use participants_sdk::ParticipantHandle;
use sagaflow_amqp::transport;
use sagas::protocol::{HeaderValue, ReplyOutcome, SagaRef, StartRequest, TYPE_EVENT, TYPE_START, WireMessage, encode_reply};
use sagas::{CommandKind, MessageId, OnDeadline, OnTimeout, Registry, SagaDefinition, SagaId, SagaStatus, StepIndex, StepStatus};
use serde_json::json;
use testkit::probe::{self, Behavior, Plan};
use testkit::{Node, TestEnv, wait};

const WAIT: Duration = Duration::from_secs(60);

async fn order_participants(env: &TestEnv) -> Vec<ParticipantHandle> {
    orders::start_participants(env, &env.amqp_url, &order_fulfilment::PARTICIPANTS, 1_000_000).await.unwrap()
}

async fn shutdown(participants: Vec<ParticipantHandle>) {
    orders::stop_participants(participants).await.unwrap();
}

use testkit::orders::{self, order};

async fn count(env: &TestEnv, sql: &str, order_id: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).bind(order_id).fetch_one(&env.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_completes_and_a_refused_shipment_compensates_in_reverse_order() {
    let env = TestEnv::start().await.unwrap();
    let node = env.orchestrator("n1", orders::registry()).await.unwrap();
    let parts = order_participants(&env).await;

    let ok = node.engine().start(&order("o-ok", "Main St 1", 0), None).await.unwrap().saga_id;
    let bad = node.engine().start(&order("o-bad", order_fulfilment::UNREACHABLE, 0), None).await.unwrap().saga_id;
    let states = wait::all_settled(&env.pool, &[ok, bad], WAIT).await.unwrap();
    assert_eq!(states[0].status, SagaStatus::Completed, "{:?}", states[0]);
    assert_eq!(states[1].status, SagaStatus::Compensated, "{:?}", states[1]);
    assert_eq!(states[0].data["shipment_id"].as_str().map(|s| s.ends_with("/2/invoke")), Some(true));

    // The participants' own records prove it.
    assert_eq!(
        count(&env, "SELECT count(*) FROM example_inventory.reservations WHERE order_id = $1 AND released_at IS NULL", "o-ok").await,
        1
    );
    assert_eq!(count(&env, "SELECT count(*) FROM example_payment.charges WHERE order_id = $1 AND refunded_at IS NULL", "o-ok").await, 1);
    assert_eq!(count(&env, "SELECT count(*) FROM example_shipping.shipments WHERE order_id = $1", "o-ok").await, 1);
    assert_eq!(
        count(&env, "SELECT count(*) FROM example_inventory.reservations WHERE order_id = $1 AND released_at IS NOT NULL", "o-bad").await,
        1
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM example_payment.charges WHERE order_id = $1 AND refunded_at IS NOT NULL", "o-bad").await,
        1
    );
    assert_eq!(count(&env, "SELECT count(*) FROM example_shipping.shipments WHERE order_id = $1", "o-bad").await, 0);
    // step 2 (the charge) was undone before step 1 (the reservation)
    let refunded_first: bool = sqlx::query_scalar(
        "SELECT c.refunded_at < r.released_at FROM example_payment.charges c JOIN example_inventory.reservations r USING (order_id) WHERE order_id = 'o-bad'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(refunded_first, "the refund must come before the stock release");
    let stock: i64 =
        sqlx::query_scalar("SELECT available FROM example_inventory.stock WHERE sku = 'widget'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(stock, 1_000_000 - 1, "the compensated order's stock came back");
    let failure = states[1].failure.as_ref().unwrap();
    assert_eq!((failure.step.as_deref(), failure.code.as_str()), (Some("ship"), "no_carrier"));

    // Every input is in the history, with the node that decided it.
    let h = wait::history(&env.pool, bad).await.unwrap();
    assert_eq!(h.first().map(|e| e.input_kind.as_str()), Some("start"));
    assert!(h.iter().all(|e| e.node == "n1" && e.outcome == "applied"), "{h:?}");
    assert_eq!(h.len(), 6, "start + 3 replies + 2 compensation replies: {h:?}");

    shutdown(parts).await;
    node.shutdown().await.unwrap();
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.outbox").fetch_one(&env.pool).await.unwrap();
    assert_eq!(outbox, 0, "the relay flushed the outbox");
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_with_backoff_then_succeeds() {
    let env = TestEnv::start().await.unwrap();
    let node = env.orchestrator("n1", orders::registry()).await.unwrap();
    let parts = order_participants(&env).await;

    let id = node.engine().start(&order("o-flaky", "Main St 1", 2), None).await.unwrap().saga_id;
    let st = wait::settled(&env.pool, id, WAIT).await.unwrap();
    assert_eq!(st.status, SagaStatus::Completed);
    let ship = &st.steps[2];
    assert_eq!(ship.attempts, 3, "two transient failures, then success");
    let h = wait::history(&env.pool, id).await.unwrap();
    let retries = h.iter().filter(|e| e.input_kind == "timer" && e.input["timer"] == "retry").count();
    assert_eq!(retries, 2, "each retry came from a durable timer: {h:?}");
    assert_eq!(count(&env, "SELECT count(*) FROM example_shipping.shipments WHERE order_id = $1", "o-flaky").await, 1);

    shutdown(parts).await;
    node.shutdown().await.unwrap();
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

fn probe_registry(defs: Vec<SagaDefinition<Plan>>) -> Registry {
    let mut r = Registry::new();
    for d in defs {
        r.register(d.erased()).unwrap();
    }
    r
}

async fn probe_env(defs: Vec<SagaDefinition<Plan>>) -> (TestEnv, orchestrator::OrchestratorHandle, ParticipantHandle) {
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let node = env.orchestrator("n1", probe_registry(defs)).await.unwrap();
    let p = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();
    (env, node, p)
}

async fn start_probe(node: &orchestrator::OrchestratorHandle, def: &str, plan: &Plan) -> SagaId {
    node.engine().start(&probe::start_request(def, plan), None).await.unwrap().saga_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_compensates_and_an_escalation_does_not_fail_the_saga() {
    let timeout = SagaDefinition::<Plan>::builder("timeout", 1)
        .step("a", |s| probe::step(s, "a"))
        .step("b", |s| probe::step(s, "b").timeout(Duration::from_millis(200), OnTimeout::Fail))
        .build()
        .unwrap();
    let escalate = SagaDefinition::<Plan>::builder("escalate", 1)
        .step("x", |s| probe::step(s, "x").timeout(Duration::from_millis(150), OnTimeout::Escalate))
        .build()
        .unwrap();
    let (env, node, p) = probe_env(vec![timeout, escalate]).await;

    let t = start_probe(&node, "timeout", &Plan::default().with("b", Behavior::Slow { ms: 1500 })).await;
    let e = start_probe(&node, "escalate", &Plan::default().with("x", Behavior::Slow { ms: 700 })).await;
    let states = wait::all_settled(&env.pool, &[t, e], WAIT).await.unwrap();

    assert_eq!(states[0].status, SagaStatus::Compensated);
    assert_eq!(states[0].failure.as_ref().unwrap().code, "step_timed_out");
    // b may have run (it did, slowly), so it is compensated too; the participant runs a step's
    // command and its compensation one after the other.
    wait::until(&env.pool, t, WAIT, |_| true).await.unwrap();
    assert_eq!(probe::effects(&env.pool, t).await.unwrap(), ["a:do", "b:do", "b:undo", "a:undo"]);

    assert_eq!(states[1].status, SagaStatus::Completed, "an escalation only reports");
    assert!(states[1].steps[0].escalated);
    let h = wait::history(&env.pool, e).await.unwrap();
    assert!(h.iter().any(|x| x.effects.to_string().contains("\"escalated\"")), "{h:?}");

    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_30_second_step_alive_and_a_silent_worker_times_out_its_attempt() {
    // A 5 s heartbeat timeout; the step's own timeout (2 min) never comes into play.
    let def = SagaDefinition::<Plan>::builder("long", 1)
        .step("a", |s| probe::step(s, "a"))
        .step("work", |s| {
            probe::step(s, "work").heartbeat_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(120), OnTimeout::Retry)
        })
        .build()
        .unwrap();
    let (env, node, p) = probe_env(vec![def]).await;
    // 30 s of work with a heartbeat call every second (one leaves every 5/3 s at most).
    let alive = start_probe(&node, "long", &Plan::default().with("work", Behavior::Beating { ms: 30_000, every_ms: 1_000 })).await;
    // Two heartbeats 2 s apart, then silence for 8 s before the worker gives up.
    let dies = Behavior::BeatThenDie { beats: 2, every_ms: 2_000, silent_ms: 8_000 };
    let silent = start_probe(&node, "long", &Plan::default().with("work", dies)).await;

    // Well past the heartbeat timeout, the first attempt is still the one running, and the
    // API shows its progress.
    let mid = wait::until(&env.pool, alive, WAIT, |st| {
        st.steps[1].progress.as_ref().and_then(|p| p["done_ms"].as_u64()).is_some_and(|ms| ms >= 12_000)
    })
    .await
    .unwrap();
    assert_eq!((mid.status, mid.steps[1].status, mid.steps[1].attempts), (SagaStatus::Running, StepStatus::Running, 1));
    let view = orchestrator::ops::get(node.engine(), alive).await.unwrap();
    assert_eq!((view.steps[1].status.as_str(), view.steps[1].attempts), ("running", 1));
    assert!(view.steps[1].progress.as_ref().is_some_and(|p| p["done_ms"].as_u64() >= Some(12_000)), "{:?}", view.steps[1]);
    assert!(view.steps[1].heartbeat_at.is_some());

    let states = wait::all_settled(&env.pool, &[alive, silent], Duration::from_secs(90)).await.unwrap();
    let (alive_st, silent_st) = (&states[0], &states[1]);
    assert_eq!(alive_st.status, SagaStatus::Completed);
    assert_eq!(alive_st.steps[1].attempts, 1, "heartbeats kept the only attempt alive: {:?}", alive_st.steps[1]);
    assert!(alive_st.steps[1].progress.as_ref().and_then(|p| p["done_ms"].as_u64()).is_some_and(|ms| ms >= 25_000));
    assert_eq!(probe::effects(&env.pool, alive).await.unwrap(), ["a:do", "work:do"]);
    // Heartbeats are kept in the state, not as history rows.
    let h = wait::history(&env.pool, alive).await.unwrap();
    assert!(h.iter().all(|e| e.input_kind != "heartbeat"), "{h:?}");
    assert!(h.iter().all(|e| e.input_kind != "timer"), "no timer fired for the step that kept beating: {h:?}");

    // The silent worker's attempt timed out on its heartbeat (long before its 2 min timeout),
    // was retried, and the retry started from the last progress reported.
    assert_eq!(silent_st.status, SagaStatus::Completed);
    assert_eq!(silent_st.steps[1].attempts, 2, "{:?}", silent_st.steps[1]);
    assert_eq!(silent_st.steps[1].output.as_ref().unwrap()["resumed_from"], json!({"done": 2}));
    let h = wait::history(&env.pool, silent).await.unwrap();
    let timed_out = h.iter().find(|e| e.input_kind == "timer" && e.input["timer"] == "heartbeat").expect("a heartbeat timeout");
    assert_eq!((timed_out.outcome.as_str(), &timed_out.input["attempt"]), ("applied", &json!(1)));
    assert!(timed_out.effects.to_string().contains("no heartbeat within 5000 ms"), "{timed_out:?}");
    assert_eq!(probe::effects(&env.pool, silent).await.unwrap(), ["a:do", "work:do"], "the dead attempt recorded nothing");

    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_completes_on_an_external_event_and_expires_on_its_deadline() {
    let def = SagaDefinition::<Plan>::builder("approval", 1)
        .step("a", |s| probe::step(s, "a"))
        .wait("approved", |w| w.event("approved").deadline(Duration::from_millis(1500), OnDeadline::Fail))
        .step("c", |s| probe::step(s, "c"))
        .build()
        .unwrap();
    let (env, node, p) = probe_env(vec![def]).await;

    let approved = start_probe(&node, "approval", &Plan::default()).await;
    let expired = start_probe(&node, "approval", &Plan::default()).await;
    wait::until(&env.pool, approved, WAIT, |s| s.steps[1].status == StepStatus::Waiting).await.unwrap();

    // Deliver the event over AMQP, as any client would.
    let conn = env.amqp().await.unwrap();
    let ch = transport::confirm_channel(&conn).await.unwrap();
    let msg = WireMessage {
        message_id: Some(MessageId::new_random().to_string()),
        kind: Some(TYPE_EVENT.into()),
        content_type: Some("application/json".into()),
        body: serde_json::to_vec(&json!({"saga_id": approved, "event": "approved", "payload": {"by": "ops"}})).unwrap(),
        ..WireMessage::default()
    };
    transport::publish_confirmed(&ch, "", &env.names().inbound_queue(), &msg, true).await.unwrap();

    let states = wait::all_settled(&env.pool, &[approved, expired], WAIT).await.unwrap();
    assert_eq!(states[0].status, SagaStatus::Completed, "{:?}", states[0]);
    assert_eq!(states[0].steps[1].output, Some(json!({"by": "ops"})));
    assert_eq!(probe::effects(&env.pool, approved).await.unwrap(), ["a:do", "c:do"]);
    assert_eq!(states[1].status, SagaStatus::Compensated);
    assert_eq!(states[1].failure.as_ref().unwrap().code, "wait_expired");
    assert_eq!(probe::effects(&env.pool, expired).await.unwrap(), ["a:do", "a:undo"]);

    conn.close(200, "done".into()).await.unwrap();
    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_group_compensates_only_its_completed_branches_in_reverse_order() {
    let def = SagaDefinition::<Plan>::builder("fanout", 1)
        .parallel("group", |g| {
            g.branch("p1", |s| probe::step(s, "p1")).branch("p2", |s| probe::step(s, "p2")).branch("p3", |s| probe::step(s, "p3"))
        })
        .build()
        .unwrap();
    let (env, node, p) = probe_env(vec![def]).await;

    let plan = Plan::default().with("p2", Behavior::Reject).with("p3", Behavior::Slow { ms: 400 });
    let id = start_probe(&node, "fanout", &plan).await;
    let st = wait::settled(&env.pool, id, WAIT).await.unwrap();
    assert_eq!(st.status, SagaStatus::Compensated);
    assert_eq!(st.steps[1].status, StepStatus::Failed);
    // p3 was still running when p2 failed: the group waited for it, then undid p3 and p1.
    assert_eq!(probe::effects(&env.pool, id).await.unwrap(), ["p1:do", "p3:do", "p3:undo", "p1:undo"]);

    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_stale_replies_are_recorded_and_change_nothing() {
    let def =
        SagaDefinition::<Plan>::builder("pair", 1).step("a", |s| probe::step(s, "a")).step("b", |s| probe::step(s, "b")).build().unwrap();
    let (env, node, p) = probe_env(vec![def]).await;
    let id = start_probe(&node, "pair", &Plan::default()).await;
    let before = wait::settled(&env.pool, id, WAIT).await.unwrap();
    assert_eq!(before.status, SagaStatus::Completed);
    let history_before = wait::history(&env.pool, id).await.unwrap().len();

    // Rebuild the command of step a, attempt 1, as the participant received it.
    let cmd_id = MessageId::for_command(id, StepIndex(0), CommandKind::Invoke, 1);
    let saga = SagaRef { saga_id: id, definition: "pair".into(), version: 1 };
    let inbound = sagas::protocol::InboundCommand {
        message_id: cmd_id,
        command: "probe.do".into(),
        saga,
        step: StepIndex(0),
        step_name: "a".into(),
        kind: CommandKind::Invoke,
        attempt: 1,
        reply_to: env.names().replies_queue(),
        traceparent: None,
        body: json!({}),
        heartbeat_ms: None,
        progress: None,
    };
    let conn = env.amqp().await.unwrap();
    let ch = transport::confirm_channel(&conn).await.unwrap();
    // 1. the very same reply again (same message id): recorded as a duplicate (replies are
    //    deduplicated by the saga's state, not by an inbox of message ids)
    let same = encode_reply(&inbound, &ReplyOutcome::Success { output: json!({"key": "a"}) }, sagas::Timestamp(0));
    transport::publish_confirmed(&ch, "", &env.names().replies_queue(), &same, true).await.unwrap();
    // 2. a different reply to the same, finished attempt (a new id): recorded as a duplicate
    let mut other =
        encode_reply(&inbound, &ReplyOutcome::Rejected { code: "late".into(), message: "too late".into() }, sagas::Timestamp(0));
    other.message_id = Some(MessageId::new_random().to_string());
    transport::publish_confirmed(&ch, "", &env.names().replies_queue(), &other, true).await.unwrap();
    // 3. a reply to an attempt that was never sent: stale
    let mut stale = other.clone();
    stale.message_id = Some(MessageId::new_random().to_string());
    stale.headers.insert("x-saga-attempt".into(), HeaderValue::Int(7));
    transport::publish_confirmed(&ch, "", &env.names().replies_queue(), &stale, true).await.unwrap();

    let deadline = tokio::time::Instant::now() + WAIT;
    let h = loop {
        let h = wait::history(&env.pool, id).await.unwrap();
        if h.len() >= history_before + 3 || tokio::time::Instant::now() > deadline {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The consumer handles deliveries concurrently: the two rows may be in either order.
    let mut tail: Vec<&str> = h[history_before..].iter().map(|e| e.outcome.as_str()).collect();
    tail.sort_unstable();
    assert_eq!(tail, ["duplicate", "duplicate", "stale"], "each is recorded and changes nothing");
    let after = orchestrator::store::load(&env.pool, id).await.unwrap().unwrap();
    assert_eq!(after, before, "the state did not change");
    assert_eq!(probe::effects(&env.pool, id).await.unwrap(), ["a:do", "b:do"]);

    conn.close(200, "done".into()).await.unwrap();
    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_starts_one_saga_from_rust_and_over_amqp() {
    let env = TestEnv::start().await.unwrap();
    let node = env.orchestrator("n1", orders::registry()).await.unwrap();
    let parts = order_participants(&env).await;

    let mut req = order("o-key", "Main St 1", 0);
    req.idempotency_key = Some("order-o-key".into());
    let first = node.engine().start(&req, None).await.unwrap();
    let second = node.engine().start(&req, None).await.unwrap();
    assert!(first.created && !second.created);
    assert_eq!(first.saga_id, second.saga_id);

    // Over AMQP, twice, with the key in a header.
    let conn = env.amqp().await.unwrap();
    let ch = transport::confirm_channel(&conn).await.unwrap();
    let mut start = order("o-amqp", "Main St 1", 0);
    start.idempotency_key = None;
    let mut msg = WireMessage {
        message_id: Some(MessageId::new_random().to_string()),
        kind: Some(TYPE_START.into()),
        content_type: Some("application/json".into()),
        body: serde_json::to_vec(&start).unwrap(),
        ..WireMessage::default()
    };
    msg.headers.insert("x-idempotency-key".into(), HeaderValue::Str("order-o-amqp".into()));
    for _ in 0..2 {
        transport::publish_confirmed(&ch, "", &env.names().inbound_queue(), &msg, true).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let settled: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sagaflow.instances WHERE status = 'completed'").fetch_one(&env.pool).await.unwrap();
        if settled == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "sagas did not complete");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.instances").fetch_one(&env.pool).await.unwrap();
    assert_eq!(total, 2, "two keys, two sagas");
    assert_eq!(count(&env, "SELECT count(*) FROM example_payment.charges WHERE order_id = $1", "o-amqp").await, 1);

    conn.close(200, "done".into()).await.unwrap();
    shutdown(parts).await;
    node.shutdown().await.unwrap();
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

/// Starts `n` orders (every 5th refused by shipping) without running a node in this process.
async fn start_orders(env: &TestEnv, n: u32) -> Vec<SagaId> {
    let client = orchestrator::Orchestrator::connect(env.config("client"), orders::registry()).await.unwrap();
    let mut ids = Vec::new();
    for i in 1..=n {
        ids.push(client.engine().start(&testkit::orders::mixed("o", i, 5), None).await.unwrap().saga_id);
    }
    ids
}

/// Every order's participant records match its outcome exactly once.
async fn check_effects_once(env: &TestEnv, n: u32) {
    for i in 1..=n {
        let id = format!("o-{i}");
        let (res, rel, ch, refd, ship) = (
            count(env, "SELECT count(*) FROM example_inventory.reservations WHERE order_id = $1", &id).await,
            count(env, "SELECT count(*) FROM example_inventory.reservations WHERE order_id = $1 AND released_at IS NOT NULL", &id).await,
            count(env, "SELECT count(*) FROM example_payment.charges WHERE order_id = $1", &id).await,
            count(env, "SELECT count(*) FROM example_payment.charges WHERE order_id = $1 AND refunded_at IS NOT NULL", &id).await,
            count(env, "SELECT count(*) FROM example_shipping.shipments WHERE order_id = $1", &id).await,
        );
        let expected = if i.is_multiple_of(5) { (1, 1, 1, 1, 0) } else { (1, 0, 1, 0, 1) };
        assert_eq!((res, rel, ch, refd, ship), expected, "order {id}: (reserved, released, charged, refunded, shipped)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_flight_loses_nothing_and_applies_nothing_twice() {
    let env = TestEnv::start().await.unwrap();
    let exe = env!("CARGO_BIN_EXE_sagaflow-node");
    let parts = order_participants(&env).await;
    // The first node migrates; sagas start only once the schema exists.
    let ids = start_orders(&env, 200).await;
    let a = Node::spawn(exe, &env, "node-a").unwrap();
    // Kill it while sagas are in flight.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.instances WHERE status IN ('completed', 'compensated')")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        if done >= 30 {
            assert!(done < 200, "the node finished before it could be killed; the test proves nothing");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "node-a made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.kill().await.unwrap();
    let b = Node::spawn(exe, &env, "node-b").unwrap();
    let states = wait::all_settled(&env.pool, &ids, Duration::from_secs(120)).await.unwrap();
    let completed = states.iter().filter(|s| s.status == SagaStatus::Completed).count();
    let compensated = states.iter().filter(|s| s.status == SagaStatus::Compensated).count();
    assert_eq!((completed, compensated), (160, 40));
    check_effects_once(&env, 200).await;
    let nodes: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT node FROM sagaflow.history ORDER BY node").fetch_all(&env.pool).await.unwrap();
    assert!(nodes.contains(&"node-a".to_owned()) && nodes.contains(&"node-b".to_owned()), "{nodes:?}");

    assert!(b.terminate().await.unwrap(), "node-b exits cleanly on SIGTERM");
    shutdown(parts).await;
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_the_load_and_every_saga_ends_correctly() {
    let env = TestEnv::start().await.unwrap();
    let exe = env!("CARGO_BIN_EXE_sagaflow-node");
    let parts = order_participants(&env).await;
    let ids = start_orders(&env, 100).await;
    let a = Node::spawn(exe, &env, "node-a").unwrap();
    let b = Node::spawn(exe, &env, "node-b").unwrap();
    let states = wait::all_settled(&env.pool, &ids, Duration::from_secs(120)).await.unwrap();
    assert_eq!(states.iter().filter(|s| s.status == SagaStatus::Completed).count(), 80);
    assert_eq!(states.iter().filter(|s| s.status == SagaStatus::Compensated).count(), 20);
    check_effects_once(&env, 100).await;
    let per_node: Vec<(String, i64)> =
        sqlx::query_as("SELECT node, count(*) FROM sagaflow.history WHERE input_kind = 'reply' GROUP BY node ORDER BY node")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(per_node.len(), 2, "both nodes decided replies: {per_node:?}");
    assert!(a.terminate().await.unwrap() && b.terminate().await.unwrap());
    shutdown(parts).await;
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_200_sagas_with_every_fifth_failing() {
    let env = TestEnv::start().await.unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagaflow-node"))
        .args(["demo", "--sagas", "200", "--fail-every", "5"])
        .envs(env.node_env("demo"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("demo: sagas=200 completed=160 compensated=40 stopped=0 elapsed_ms="), "{last}");
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_reach_listeners_on_the_events_exchange() {
    let def =
        SagaDefinition::<Plan>::builder("pair", 1).step("a", |s| probe::step(s, "a")).step("b", |s| probe::step(s, "b")).build().unwrap();
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let mut cfg = env.config("n1");
    cfg.step_events = true;
    cfg.started_events = true;
    let node = orchestrator::Orchestrator::connect(cfg, probe_registry(vec![def])).await.unwrap().start().await.unwrap();
    let p = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let conn = env.amqp().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let listener = format!("{}.listener", env.namespace);
    ch.queue_declare(
        listener.as_str().into(),
        lapin::options::QueueDeclareOptions { exclusive: true, ..Default::default() },
        Default::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        listener.as_str().into(),
        env.names().events_exchange().as_str().into(),
        "pair.#".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();

    let id = start_probe(&node, "pair", &Plan::default()).await;
    wait::settled(&env.pool, id, WAIT).await.unwrap();
    let events = wait::drain(&ch, &listener, 6, Duration::from_secs(20)).await.unwrap();
    let kinds: Vec<String> = events.iter().map(|d| d.properties.kind().as_ref().unwrap().as_str().to_owned()).collect();
    assert_eq!(
        kinds,
        [
            "sagaflow.lifecycle.started",
            "sagaflow.lifecycle.step_started",
            "sagaflow.lifecycle.step_completed",
            "sagaflow.lifecycle.step_started",
            "sagaflow.lifecycle.step_completed",
            "sagaflow.lifecycle.completed"
        ]
    );
    let last: serde_json::Value = serde_json::from_slice(&events[5].data).unwrap();
    assert_eq!(
        (last["saga_id"].as_str(), last["definition"].as_str(), last["type"].as_str()),
        (Some(id.to_string().as_str()), Some("pair"), Some("completed"))
    );
    assert_eq!(events[5].routing_key.as_str(), "pair.completed");

    conn.close(200, "done".into()).await.unwrap();
    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_publishes_what_it_starts_itself_and_a_node_finishes_the_saga() {
    let env = TestEnv::start().await.unwrap();
    // A client and no node: no relay runs, so only the client can publish the first command.
    let client = orchestrator::Orchestrator::connect(env.config("client"), orders::registry()).await.unwrap().client().await.unwrap();
    let id = client.engine().start(&order("o-client", "Main St 1", 0), None).await.unwrap().saga_id;
    let conn = env.amqp().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let queue = env.names().participant_queue("inventory");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let q = ch
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.outbox").fetch_one(&env.pool).await.unwrap();
        // The command waits in inventory's queue, and the client deleted the rows the broker confirmed.
        if q.message_count() == 1 && outbox == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "queued: {}, outbox rows: {outbox}", q.message_count());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A node and the participants take it from there.
    let node = env.orchestrator("n1", orders::registry()).await.unwrap();
    let parts = order_participants(&env).await;
    let st = wait::settled(&env.pool, id, WAIT).await.unwrap();
    assert_eq!(st.status, SagaStatus::Completed, "{st:?}");
    assert_eq!(count(&env, "SELECT count(*) FROM example_inventory.reservations WHERE order_id = $1", "o-client").await, 1);

    // A stopped client's engine still writes; the nodes' relays publish for it.
    client.shutdown().await.unwrap();
    let later = orchestrator::Orchestrator::connect(env.config("client"), orders::registry()).await.unwrap();
    let id = later.engine().start(&order("o-after", "Main St 1", 0), None).await.unwrap().saga_id;
    assert_eq!(wait::settled(&env.pool, id, WAIT).await.unwrap().status, SagaStatus::Completed);

    conn.close(200, "done".into()).await.unwrap();
    shutdown(parts).await;
    node.shutdown().await.unwrap();
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

/// Starts made at the same moment share statements: each caller still gets its own answer, a
/// shared idempotency key or saga id starts one saga, and every saga runs to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_are_written_together_and_each_gets_its_answer() {
    let env = TestEnv::start().await.unwrap();
    let node = env.orchestrator("n1", orders::registry()).await.unwrap();
    let parts = order_participants(&env).await;
    let shared_id = SagaId::new();
    let mut starts = tokio::task::JoinSet::new();
    for i in 0..60 {
        let engine = node.engine().clone();
        let mut req = order(&format!("o-together-{i}"), "Main St 1", 0);
        match i % 6 {
            0 => req.idempotency_key = Some("together".into()),
            1 => req.saga_id = Some(shared_id),
            _ => {}
        }
        starts.spawn(async move { (i, engine.start(&req, None).await.unwrap()) });
    }
    let mut by_key = std::collections::HashSet::new();
    let (mut created, mut ids) = (0, Vec::new());
    while let Some(r) = starts.join_next().await {
        let (i, started) = r.unwrap();
        created += usize::from(started.created);
        match i % 6 {
            0 => drop(by_key.insert(started.saga_id)),
            1 => assert_eq!(started.saga_id, shared_id),
            _ => assert!(started.created, "start {i} had nothing shared"),
        }
        ids.push(started.saga_id);
    }
    assert_eq!(by_key.len(), 1, "one saga for the shared key");
    assert_eq!(created, 40 + 1 + 1, "the 40 others, one for the key, one for the id");
    ids.sort_unstable();
    ids.dedup();
    for st in wait::all_settled(&env.pool, &ids, WAIT).await.unwrap() {
        assert_eq!(st.status, SagaStatus::Completed, "{st:?}");
    }
    let history: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sagaflow.history WHERE input_kind = 'start'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(history, 42, "one start in the history per saga created");
    shutdown(parts).await;
    node.shutdown().await.unwrap();
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_command_is_a_failed_attempt_the_saga_sees() {
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let def = SagaDefinition::<Plan>::builder("nowhere", 1)
        .step("a", |s| probe::step(s, "a").retry(sagas::RetryPolicy::fixed(Duration::from_millis(50), 3)))
        .build()
        .unwrap();
    // No node declares the probe's queue and no probe runs: nothing is bound for it.
    let mut cfg = env.config("n1");
    cfg.declare_participant_queues = false;
    let node = orchestrator::Orchestrator::connect(cfg, probe_registry(vec![def])).await.unwrap().start().await.unwrap();
    let id = start_probe(&node, "nowhere", &Plan::default()).await;
    let st = wait::settled(&env.pool, id, WAIT).await.unwrap();
    assert_eq!(st.status, SagaStatus::Compensated);
    assert_eq!(st.steps[0].attempts, 3, "each attempt came back unroutable and was retried");
    let failure = st.failure.unwrap();
    assert_eq!(failure.code, "retries_exhausted");
    assert!(failure.message.contains("unroutable"), "{}", failure.message);
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_of_an_unknown_version_is_left_untouched_and_its_reply_waits() {
    let v1 = SagaDefinition::<Plan>::builder("versioned", 1).step("a", |s| probe::step(s, "a")).build().unwrap();
    let v2 = SagaDefinition::<Plan>::builder("versioned", 2)
        .step("a", |s| probe::step(s, "a"))
        .step("b", |s| probe::step(s, "b"))
        .build()
        .unwrap();
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    // A client that knows v1 starts a saga; the only node running knows v2 alone.
    let client = orchestrator::Orchestrator::connect(env.config("client"), probe_registry(vec![v1])).await.unwrap();
    let req = StartRequest { version: Some(1), ..probe::start_request("versioned", &Plan::default()) };
    let id = client.engine().start(&req, None).await.unwrap().saga_id;
    let node = env.orchestrator("v2-only", probe_registry(vec![v2.clone()])).await.unwrap();
    let p = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();
    // The command goes out (it was written at start); its reply cannot be decided here.
    let before = wait::until(&env.pool, id, WAIT, |s| s.steps[0].attempts == 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let still = orchestrator::store::load(&env.pool, id).await.unwrap().unwrap();
    assert_eq!(still, before, "the v2-only node left the v1 saga untouched");
    assert!(wait::history(&env.pool, id).await.unwrap().iter().all(|h| h.node != "v2-only"));
    // A node that knows v1 picks the waiting reply up and finishes the saga.
    let mut both = Registry::new();
    both.register(SagaDefinition::<Plan>::builder("versioned", 1).step("a", |s| probe::step(s, "a")).build().unwrap().erased()).unwrap();
    both.register(v2.erased()).unwrap();
    let node2 = env.orchestrator("v1-and-v2", both).await.unwrap();
    let st = wait::settled(&env.pool, id, WAIT).await.unwrap();
    assert_eq!(st.status, SagaStatus::Completed);
    assert_eq!(st.version, 1, "the saga stayed on its version");
    assert_eq!(probe::effects(&env.pool, id).await.unwrap(), ["a:do"]);

    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    node2.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

/// docs/versioning.md step by step: sagas started on v1 finish on v1 after a release that adds
/// v2 replaces the v1-only node; new sagas start on v2; `ops::versions` says when v1 can go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_rolls_out_while_old_sagas_finish_on_theirs() {
    fn v1() -> SagaDefinition<Plan> {
        SagaDefinition::<Plan>::builder("approval_flow", 1)
            .step("a", |s| probe::step(s, "a"))
            .wait("approved", |w| w.event("approved").deadline(Duration::from_secs(600), OnDeadline::Fail))
            .build()
            .unwrap()
    }
    fn v2() -> SagaDefinition<Plan> {
        SagaDefinition::<Plan>::builder("approval_flow", 2)
            .step("a", |s| probe::step(s, "a"))
            .wait("approved", |w| w.event("approved").deadline(Duration::from_secs(600), OnDeadline::Fail))
            .step("c", |s| probe::step(s, "c"))
            .build()
            .unwrap()
    }
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let p = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();

    // Release 1 serves v1; two sagas start and wait for their approval.
    let release1 = env.orchestrator("release-1", probe_registry(vec![v1()])).await.unwrap();
    let early =
        [start_probe(&release1, "approval_flow", &Plan::default()).await, start_probe(&release1, "approval_flow", &Plan::default()).await];
    for id in early {
        wait::until(&env.pool, id, WAIT, |s| s.steps[1].status == StepStatus::Waiting).await.unwrap();
    }

    // Release 2 serves v1 and v2 and replaces release 1; a new saga starts on v2.
    let release2 = env.orchestrator("release-2", probe_registry(vec![v1(), v2()])).await.unwrap();
    release1.shutdown().await.unwrap();
    let late = start_probe(&release2, "approval_flow", &Plan::default()).await;
    wait::until(&env.pool, late, WAIT, |s| s.steps[1].status == StepStatus::Waiting).await.unwrap();
    let versions = orchestrator::ops::versions(&env.pool, release2.engine().registry()).await.unwrap();
    let open: Vec<(u32, i64, bool)> = versions.iter().map(|v| (v.version, v.open, v.retirable(&versions))).collect();
    assert_eq!(open, [(1, 2, false), (2, 1, false)], "v1 still has open sagas: it must stay");

    // The approvals arrive: each saga finishes on the version it started on.
    for id in early.iter().chain([&late]) {
        let approve = sagas::Input::Event { name: "approved".into(), payload: json!({"by": "ops"}) };
        orchestrator::ops::act(release2.engine(), *id, approve).await.unwrap();
    }
    let states = wait::all_settled(&env.pool, &[early[0], early[1], late], WAIT).await.unwrap();
    for (st, version) in states.iter().zip([1, 1, 2]) {
        assert_eq!((st.status, st.version), (SagaStatus::Completed, version), "{st:?}");
    }
    assert_eq!(probe::effects(&env.pool, early[0]).await.unwrap(), ["a:do"], "v1 has no step c");
    assert_eq!(probe::effects(&env.pool, late).await.unwrap(), ["a:do", "c:do"]);
    assert!(wait::history(&env.pool, early[1]).await.unwrap().iter().any(|h| h.node == "release-2"), "release 2 finished a v1 saga");

    // Nothing needs v1 any more: the next release may drop it.
    let versions = orchestrator::ops::versions(&env.pool, release2.engine().registry()).await.unwrap();
    let open: Vec<(u32, i64, i64, bool)> = versions.iter().map(|v| (v.version, v.open, v.total, v.retirable(&versions))).collect();
    assert_eq!(open, [(1, 0, 2, true), (2, 0, 1, false)]);

    p.shutdown().await.unwrap();
    release2.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

/// A due timer of a version no running node has is pushed back, not re-read on every poll
/// (and so cannot crowd out the timers this node can fire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_timer_of_an_unknown_version_is_postponed() {
    let timed = SagaDefinition::<Plan>::builder("timed", 1)
        .wait("approval", |w| w.event("approved").deadline(Duration::from_millis(200), OnDeadline::Fail))
        .build()
        .unwrap();
    let other = SagaDefinition::<Plan>::builder("other", 1).step("a", |s| probe::step(s, "a")).build().unwrap();
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let client = orchestrator::Orchestrator::connect(env.config("client"), probe_registry(vec![timed])).await.unwrap();
    let id = client.engine().start(&probe::start_request("timed", &Plan::default()), None).await.unwrap().saga_id;
    let node = env.orchestrator("without-timed", probe_registry(vec![other])).await.unwrap();

    // The deadline passes on a node that cannot decide for this saga.
    let due = || async {
        let due: i64 =
            sqlx::query_scalar("SELECT due_ms FROM sagaflow.timers WHERE saga_id = $1").bind(id.0).fetch_one(&env.pool).await.unwrap();
        u64::try_from(due).unwrap()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while due().await < sagas::Timestamp::now().0 + 10_000 {
        assert!(tokio::time::Instant::now() < deadline, "the timer was not postponed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = orchestrator::store::load(&env.pool, id).await.unwrap().unwrap();
    assert_eq!(st.status, SagaStatus::Running, "the saga is left as it was");
    assert!(wait::history(&env.pool, id).await.unwrap().iter().all(|h| h.node != "without-timed"));

    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

/// With `retention_days`, a node deletes sagas that finished before then (with their history)
/// and inbox entries as old; running sagas are untouched and carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_finished_sagas_and_keeps_running_ones() {
    let quick = SagaDefinition::<Plan>::builder("quick", 1).step("a", |s| probe::step(s, "a")).build().unwrap();
    let waiting = SagaDefinition::<Plan>::builder("waiting", 1)
        .step("a", |s| probe::step(s, "a"))
        .wait("approval", |w| w.event("approved").deadline(Duration::from_secs(3600), OnDeadline::Fail))
        .build()
        .unwrap();
    let (env, node, p) = probe_env(vec![quick.clone(), waiting.clone()]).await;
    let done = [start_probe(&node, "quick", &Plan::default()).await, start_probe(&node, "quick", &Plan::default()).await];
    wait::all_settled(&env.pool, &done, WAIT).await.unwrap();
    let open = start_probe(&node, "waiting", &Plan::default()).await;
    wait::until(&env.pool, open, WAIT, |s| s.steps[1].status == StepStatus::Waiting).await.unwrap();
    node.shutdown().await.unwrap();

    // Everything so far happened 40 days ago.
    sqlx::query(
        "UPDATE sagaflow.instances SET updated_at = now() - interval '40 days',
                finished_at = CASE WHEN finished_at IS NOT NULL THEN now() - interval '40 days' END",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    // Events are deduplicated by message id (replies by their saga's state): an old entry.
    sqlx::query("INSERT INTO sagaflow.inbox (message_id, saga_id) VALUES (gen_random_uuid(), $1)")
        .bind(open.0)
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE sagaflow.inbox SET received_at = now() - interval '40 days'").execute(&env.pool).await.unwrap();
    let count = |sql: &'static str| {
        let pool = env.pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    assert_eq!(count("SELECT count(*) FROM sagaflow.instances").await, 3);
    assert!(count("SELECT count(*) FROM sagaflow.inbox").await > 0);

    // A node keeping 30 days prunes when it starts.
    let mut cfg = env.config("pruner");
    cfg.retention_days = 30;
    let pruner = orchestrator::Orchestrator::connect(cfg, probe_registry(vec![quick, waiting])).await.unwrap().start().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while count("SELECT count(*) FROM sagaflow.instances").await > 1 || count("SELECT count(*) FROM sagaflow.inbox").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "retention did not run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT DISTINCT saga_id FROM sagaflow.history").fetch_all(&env.pool).await.unwrap();
    assert_eq!(left, [open.0], "only the running saga's history is left");

    // The running saga is whole: its event completes it.
    let approve = sagas::Input::Event { name: "approved".into(), payload: json!({}) };
    orchestrator::ops::act(pruner.engine(), open, approve).await.unwrap();
    assert_eq!(wait::settled(&env.pool, open, WAIT).await.unwrap().status, SagaStatus::Completed);

    p.shutdown().await.unwrap();
    pruner.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

/// Two writers (as two nodes would be) race sixteen deliveries at one saga: eight replies to the
/// same attempt, each delivered twice. Each writer reads without a lock and writes only if the
/// saga is still as it read it, so exactly one reply applies, every other is decided on the
/// state that one left, and no message id applies twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_inputs_to_one_saga_are_each_decided_on_the_latest_state() {
    use orchestrator::Handled;
    use sagas::{Input, InputOutcome, Reply};

    let env = TestEnv::start().await.unwrap();
    let def = || SagaDefinition::<Plan>::builder("pair", 1).step("a", |s| probe::step(s, "a")).step("b", |s| probe::step(s, "b")).build();
    let one = orchestrator::Orchestrator::connect(env.config("one"), probe_registry(vec![def().unwrap()])).await.unwrap();
    let two = orchestrator::Orchestrator::connect(env.config("two"), probe_registry(vec![def().unwrap()])).await.unwrap();
    let x = one.engine().start(&probe::start_request("pair", &Plan::default()), None).await.unwrap().saga_id;
    let reply = Input::Reply(Reply {
        in_reply_to: MessageId::for_command(x, StepIndex(0), CommandKind::Invoke, 1),
        step: StepIndex(0),
        kind: CommandKind::Invoke,
        attempt: 1,
        outcome: ReplyOutcome::Success { output: json!({"key": "a"}) },
    });
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..8 {
        let m = MessageId::new_random();
        for copy in 0..2 {
            let engine = if (k + copy) % 2 == 0 { one.engine().clone() } else { two.engine().clone() };
            let input = reply.clone();
            tasks.spawn(async move { engine.apply(x, &input, Some(m)).await.unwrap() });
        }
    }
    let handled = tasks.join_all().await;
    let applied = handled.iter().filter(|h| matches!(h, Handled::Decided { outcome: InputOutcome::Applied, .. })).count();
    let decided = handled.iter().filter(|h| matches!(h, Handled::Decided { .. })).count();
    let dropped = handled.iter().filter(|h| **h == Handled::Duplicate).count();
    assert_eq!((applied, decided, dropped), (1, 8, 8), "{handled:?}");
    let outcomes: Vec<String> = wait::history(&env.pool, x).await.unwrap().into_iter().skip(1).map(|e| e.outcome).collect();
    assert_eq!(outcomes.iter().filter(|o| *o == "applied").count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| *o == "duplicate").count(), 7, "{outcomes:?}");
    let st = orchestrator::store::load(&env.pool, x).await.unwrap().unwrap();
    assert_eq!((st.steps[0].status, st.steps[1].status), (StepStatus::Completed, StepStatus::Running), "{st:?}");
    // No node runs: the outbox holds every command written, step a's and one of step b's.
    let commands: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.outbox WHERE mandatory").fetch_one(&env.pool).await.unwrap();
    assert_eq!(commands, 2);
    env.cleanup(&["probe"]).await.unwrap();
}

/// Replies applied as one batch are each decided as if alone: distinct sagas share a
/// transaction, a saga's further inputs go to the next one in order, and a duplicate, an unknown
/// saga or an invalid reply neither holds up the others nor leaves its message id behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_replies_is_applied_input_by_input() {
    use orchestrator::Handled;
    use sagas::{IgnoreReason, Input, InputOutcome, Reply};

    let env = TestEnv::start().await.unwrap();
    let def =
        SagaDefinition::<Plan>::builder("pair", 1).step("a", |s| probe::step(s, "a")).step("b", |s| probe::step(s, "b")).build().unwrap();
    // A client: it writes sagas and their commands, and no node publishes or consumes here.
    let client = orchestrator::Orchestrator::connect(env.config("client"), probe_registry(vec![def])).await.unwrap();
    let engine = client.engine();
    let x = engine.start(&probe::start_request("pair", &Plan::default()), None).await.unwrap().saga_id;
    let y = engine.start(&probe::start_request("pair", &Plan::default()), None).await.unwrap().saga_id;
    let reply = |saga: SagaId, step: u32, outcome: ReplyOutcome| {
        Input::Reply(Reply {
            in_reply_to: MessageId::for_command(saga, StepIndex(step), CommandKind::Invoke, 1),
            step: StepIndex(step),
            kind: CommandKind::Invoke,
            attempt: 1,
            outcome,
        })
    };
    let done = || ReplyOutcome::Success { output: json!({"key": "a"}) };
    let (x_done, x_other) = (reply(x, 0, done()), reply(x, 0, ReplyOutcome::Rejected { code: "late".into(), message: "late".into() }));
    let (y_done, y_bad) = (reply(y, 0, done()), reply(y, 9, done()));
    let [m1, m2, m3, m4, m5] = std::array::from_fn(|_| MessageId::new_random());
    let nobody = SagaId::new();
    let inputs = [
        (x, &x_done, Some(m1)),
        // The same message id for another saga: it waits for the next transaction (and finds
        // the id taken), and y's later inputs wait behind it.
        (y, &y_done, Some(m1)),
        (y, &y_bad, Some(m5)),
        (nobody, &y_done, Some(m4)),
        (x, &x_done, Some(m1)),
        (y, &y_done, Some(m2)),
        (x, &x_other, Some(m3)),
    ];
    let handled = engine.apply_batch(&inputs).await.unwrap();

    let running = |h: &Handled| matches!(h, Handled::Decided { outcome: InputOutcome::Applied, status: SagaStatus::Running });
    assert!(running(&handled[0]), "{handled:?}");
    assert_eq!(handled[1], Handled::Duplicate, "a message id applies once, whichever saga it names");
    assert!(matches!(&handled[2], Handled::Invalid { code: "unknown_step", .. }), "{handled:?}");
    assert_eq!(handled[3], Handled::UnknownSaga);
    assert_eq!(handled[4], Handled::Duplicate, "the same message again, after the first applied");
    assert!(running(&handled[5]), "y's good reply applies after its bad one: {handled:?}");
    assert!(
        matches!(&handled[6], Handled::Decided { outcome: InputOutcome::Ignored { reason: IgnoreReason::Duplicate, .. }, .. }),
        "another reply to x's finished attempt is recorded as a duplicate: {handled:?}"
    );
    for id in [x, y] {
        let st = orchestrator::store::load(&env.pool, id).await.unwrap().unwrap();
        assert_eq!((st.steps[0].status, st.steps[1].status), (StepStatus::Completed, StepStatus::Running), "{st:?}");
    }
    let outcomes = |id: SagaId| {
        let pool = env.pool.clone();
        async move { wait::history(&pool, id).await.unwrap().into_iter().map(|e| e.outcome).collect::<Vec<_>>() }
    };
    assert_eq!(outcomes(x).await, ["applied", "applied", "duplicate"]);
    assert_eq!(outcomes(y).await, ["applied", "applied"]);
    let kept: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT message_id FROM sagaflow.inbox WHERE message_id = ANY($1) ORDER BY message_id")
        .bind([m1.0, m2.0, m3.0, m4.0, m5.0])
        .fetch_all(&env.pool)
        .await
        .unwrap();
    let mut want = vec![m1.0, m2.0, m3.0];
    want.sort_unstable();
    assert_eq!(kept, want, "only the ids of applied messages are kept");
    env.cleanup(&["probe"]).await.unwrap();
}

/// Definitions that start each other (here through the newest version of a name) would nest
/// child sagas for ever: the child past `MAX_CHILD_DEPTH` is refused with `child_too_deep`, and
/// that failure unwinds every level, each compensating what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_sagas_that_start_each_other_stop_at_the_depth_limit_and_unwind() {
    let a1 = SagaDefinition::<Plan>::builder("loop_a", 1).step("a", |s| probe::step(s, "a")).build().unwrap();
    let b1 = SagaDefinition::<Plan>::builder("loop_b", 1).step("down", |s| s.child(&a1, |p: &Plan| p.clone())).build().unwrap();
    // Version 2 of `loop_a` starts `loop_b`, whose child is the newest `loop_a`: a cycle.
    let a2 = SagaDefinition::<Plan>::builder("loop_a", 2)
        .step("a", |s| probe::step(s, "a"))
        .step("down", |s| s.child(&b1, |p: &Plan| p.clone()))
        .build()
        .unwrap();
    let (env, node, p) = probe_env(vec![a1, b1, a2]).await;
    let root = start_probe(&node, "loop_a", &Plan::default()).await;
    let st = wait::settled(&env.pool, root, WAIT).await.unwrap();
    assert_eq!(st.status, SagaStatus::Compensated);
    assert_eq!(st.failure.as_ref().unwrap().code, "child_too_deep", "{:?}", st.failure);
    // The root and one saga at each depth up to the limit; none is left running.
    let counts = wait::status_counts(&env.pool).await.unwrap();
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    assert_eq!(total, i64::from(sagas::MAX_CHILD_DEPTH) + 1, "{counts:?}");
    assert!(counts.iter().all(|(status, _)| *status == SagaStatus::Compensated), "{counts:?}");
    // Every `loop_a` (depths 0, 2, ..., 32) did step a and undid it.
    let effects: Vec<(String, i64)> =
        sqlx::query_as("SELECT kind, count(*) FROM probe.effects GROUP BY kind ORDER BY kind").fetch_all(&env.pool).await.unwrap();
    let levels = i64::from(sagas::MAX_CHILD_DEPTH / 2 + 1);
    assert_eq!(effects, [("do".to_owned(), levels), ("undo".to_owned(), levels)]);
    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe", sagas::CHILD_PARTICIPANT]).await.unwrap();
}

/// A step that starts a child saga waits for its outcome: a completed child completes the
/// step with its data, compensating the parent step compensates the completed child (its own
/// steps undone in reverse, before the parent's earlier steps), the child's failure fails the
/// step, and parent and child link to each other. A forged command to the child participant
/// starts nothing, and every hostile one is dead-lettered with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_saga_is_compensated_with_its_parent_and_its_failure_fails_the_parent_step() {
    let child = SagaDefinition::<Plan>::builder("child_pay", 1)
        .step("c1", |s| probe::step(s, "c1"))
        .step("c2", |s| probe::step(s, "c2"))
        .build()
        .unwrap();
    let parent = SagaDefinition::<Plan>::builder("parent_order", 1)
        .step("a", |s| probe::step(s, "a"))
        .step("pay", |s| s.child(&child, |p: &Plan| p.clone()))
        .step("b", |s| probe::step(s, "b"))
        .build()
        .unwrap();
    let (env, node, p) = probe_env(vec![child, parent]).await;
    let ok = start_probe(&node, "parent_order", &Plan::default()).await;
    // The parent's last step refuses: the parent compensates `pay`, which undoes the child.
    let undone = start_probe(&node, "parent_order", &Plan::default().with("b", Behavior::Reject)).await;
    // The child's second step refuses: the child compensates, and its failure fails `pay`.
    let failed = start_probe(&node, "parent_order", &Plan::default().with("c2", Behavior::Reject)).await;
    let states = wait::all_settled(&env.pool, &[ok, undone, failed], WAIT).await.unwrap();
    let child_of = |id| SagaId::for_child(id, StepIndex(1), 1);
    let children = wait::all_settled(&env.pool, &[child_of(ok), child_of(undone), child_of(failed)], WAIT).await.unwrap();
    // Every effect of a parent and its child, in the order they committed.
    let family = |id: SagaId| {
        let pool = env.pool.clone();
        async move {
            let rows: Vec<String> = sqlx::query_scalar("SELECT key || ':' || kind FROM probe.effects WHERE saga_id = ANY($1) ORDER BY id")
                .bind(vec![id.0, child_of(id).0])
                .fetch_all(&pool)
                .await
                .unwrap();
            rows
        }
    };

    assert_eq!((states[0].status, children[0].status), (SagaStatus::Completed, SagaStatus::Completed));
    assert_eq!(states[0].steps[1].output.as_ref(), Some(&children[0].data), "the step's output is the child's data");
    assert_eq!(family(ok).await, ["a:do", "c1:do", "c2:do", "b:do"]);

    assert_eq!((states[1].status, children[1].status), (SagaStatus::Compensated, SagaStatus::Compensated));
    assert_eq!(children[1].failure.as_ref().unwrap().code, "parent_compensated");
    assert_eq!(family(undone).await, ["a:do", "c1:do", "c2:do", "c2:undo", "c1:undo", "a:undo"]);
    assert_eq!(states[1].steps[1].status, StepStatus::Compensated);

    assert_eq!((states[2].status, children[2].status), (SagaStatus::Compensated, SagaStatus::Compensated));
    let failure = states[2].failure.as_ref().unwrap();
    assert_eq!((failure.step.as_deref(), failure.code.as_str()), (Some("pay"), "probe_rejected"), "the child's code fails the step");
    assert_eq!(family(failed).await, ["a:do", "c1:do", "c1:undo", "a:undo"]);

    // They link to each other (what the API and the page show).
    let view = orchestrator::ops::get(node.engine(), undone).await.unwrap();
    let linked: Vec<_> = view.steps[1].children.iter().map(|c| (c.saga_id, c.attempt, c.status.as_str())).collect();
    assert_eq!(linked, [(child_of(undone), 1, "compensated")]);
    let back = orchestrator::ops::get(node.engine(), child_of(undone)).await.unwrap().parent.unwrap();
    assert_eq!((back.saga_id, back.step.as_str(), back.attempt), (undone, "pay", 1));

    // A command to the child participant that its saga did not send starts nothing: one with a
    // made-up id is dead-lettered, one for an attempt the saga does not wait for is dropped.
    let names = env.names();
    let conn = env.amqp().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let forge = |message_id, attempt| {
        let cmd = sagas::OutgoingCommand {
            message_id,
            step: StepIndex(1),
            step_name: "pay".into(),
            kind: CommandKind::Invoke,
            attempt,
            participant: sagas::CHILD_PARTICIPANT.into(),
            command: "child_pay".into(),
            body: serde_json::to_value(Plan::default()).unwrap(),
            heartbeat_ms: None,
            progress: None,
        };
        let saga = SagaRef { saga_id: ok, definition: "parent_order".into(), version: 1 };
        sagas::protocol::encode_command(&saga, &cmd, &names.replies_queue(), None, sagas::Timestamp(0))
    };
    let stale = MessageId::for_command(ok, StepIndex(1), CommandKind::Invoke, 7);
    // Hostile commands, each dead-lettered with its reason before anything is read or started:
    // the ids below are the ones a command of that saga, step, kind and attempt would carry.
    use sagas::protocol::{H_ATTEMPT, H_KIND, H_SAGA_ID, HeaderValue};
    let with = |mut m: sagas::protocol::WireMessage, f: &dyn Fn(&mut sagas::protocol::WireMessage)| {
        f(&mut m);
        m
    };
    let id_of = |saga, step, kind| MessageId::for_command(saga, StepIndex(step), kind, 1).to_string();
    let hostile = [
        ("a made-up message id", "invalid_command", forge(MessageId::new_random(), 1)),
        ("truncated JSON", "malformed_body", with(forge(stale, 7), &|m| m.body = b"{\"steps\":".to_vec())),
        ("U+0000 in the child's input", "malformed_body", with(forge(stale, 7), &|m| m.body = br#"{"x":"\u0000"}"#.to_vec())),
        (
            "a body over max_body_bytes",
            "oversized",
            with(forge(stale, 7), &|m| m.body = vec![b' '; sagas::protocol::DEFAULT_MAX_BODY_BYTES + 1]),
        ),
        ("no saga id", "invalid_headers", with(forge(stale, 7), &|m| drop(m.headers.remove(H_SAGA_ID)))),
        (
            "a 70 KB kind",
            "invalid_headers",
            with(forge(stale, 7), &|m| drop(m.headers.insert(H_KIND.into(), HeaderValue::Str("k".repeat(70_000))))),
        ),
        (
            "a negative attempt",
            "invalid_headers",
            with(forge(stale, 7), &|m| drop(m.headers.insert(H_ATTEMPT.into(), HeaderValue::Int(-1)))),
        ),
        (
            "an unknown saga",
            "unknown_saga",
            with(forge(stale, 1), &|m| {
                let nobody = SagaId::new();
                m.headers.insert(H_SAGA_ID.into(), HeaderValue::Str(nobody.to_string()));
                m.message_id = Some(id_of(nobody, 1, CommandKind::Invoke));
            }),
        ),
        (
            "a step past the definition's last",
            "invalid_command",
            with(forge(stale, 1), &|m| {
                m.headers.insert(sagas::protocol::H_STEP.into(), HeaderValue::Int(4_000_000));
                m.message_id = Some(id_of(ok, 4_000_000, CommandKind::Invoke));
            }),
        ),
        (
            "a compensation of a step that starts no child",
            "invalid_command",
            with(forge(stale, 1), &|m| {
                m.headers.insert(sagas::protocol::H_STEP.into(), HeaderValue::Int(0));
                m.headers.insert(H_KIND.into(), HeaderValue::Str("compensate".into()));
                m.message_id = Some(id_of(ok, 0, CommandKind::Compensate));
            }),
        ),
        (
            "another definition than the step's child",
            "invalid_command",
            with(forge(stale, 1), &|m| {
                m.kind = Some("parent_order".into());
                m.message_id = Some(id_of(ok, 1, CommandKind::Invoke));
            }),
        ),
    ];
    for (_, _, m) in &hostile {
        transport::publish_confirmed(&ch, &names.commands_exchange(), sagas::CHILD_PARTICIPANT, m, true).await.unwrap();
    }
    transport::publish_confirmed(&ch, &names.commands_exchange(), sagas::CHILD_PARTICIPANT, &forge(stale, 7), true).await.unwrap();
    let dlq = transport::Names::dead_letter_queue(&names.participant_queue(sagas::CHILD_PARTICIPANT));
    let mut want: Vec<&str> = hostile.iter().map(|(_, reason, _)| *reason).collect();
    want.sort_unstable();
    let kinds: Vec<&str> = hostile.iter().map(|(kind, _, _)| *kind).collect();
    let got = wait::dead_letter_reasons(&ch, &dlq, hostile.len() + 1, Duration::from_secs(4)).await.unwrap();
    assert_eq!(got, want, "the stale command is dropped, each other one dead-lettered with its reason ({kinds:?})");
    let forged_child = orchestrator::store::load(&env.pool, SagaId::for_child(ok, StepIndex(1), 7)).await.unwrap();
    assert!(forged_child.is_none(), "a stale command started a child");
    assert_eq!(wait::status_counts(&env.pool).await.unwrap().iter().map(|(_, n)| n).sum::<i64>(), 6, "three parents, three children");

    let _ = conn.close(200, "done".into()).await;
    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe", sagas::CHILD_PARTICIPANT]).await.unwrap();
}
