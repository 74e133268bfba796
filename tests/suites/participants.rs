//! The participants SDK against real RabbitMQ and PostgreSQL: dedupe, crash safety,
//! dead-lettering, compensation retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use order_fulfilment::commands::ReserveStock;
use participants_sdk::{Participant, ParticipantHandle};
use sagaflow_amqp::transport::{self, Names};
use sagas::protocol::{DEFAULT_MAX_BODY_BYTES, InboundReply, ReplyOutcome, SagaRef, WireMessage, decode_reply, encode_command};
use sagas::{CommandKind, MessageId, OutgoingCommand, Registry, SagaDefinition, SagaId, SagaStatus, StepIndex, Timestamp};
use serde_json::json;
use testkit::probe::{self, Behavior, Plan};
use testkit::{TestEnv, wait};

/// One running participant, a channel to send it commands, and a queue to collect its replies.
struct Rig {
    env: TestEnv,
    conn: Connection,
    ch: Channel,
    replies: String,
    /// The participant's name, and the name of the step its commands are for.
    participant: &'static str,
    step_name: &'static str,
    handle: Option<ParticipantHandle>,
}

/// The inventory participant alone, and a queue to collect its replies.
async fn rig(crash_first: bool) -> Rig {
    let env = TestEnv::start().await.unwrap();
    order_fulfilment::setup(&env.pool, &["widget"], 100).await.unwrap();
    let crashed = Arc::new(AtomicBool::new(!crash_first));
    let mut builder = inventory_participant(env.participant_config());
    if crash_first {
        builder = builder.crash_after_commit(move |_| !crashed.swap(true, Ordering::SeqCst));
    }
    let inventory = builder.build().unwrap().start(env.pool.clone(), &env.amqp_url).await.unwrap();
    Rig::attach(env, "inventory", "reserve_stock", inventory).await
}

/// The example's inventory participant, configured by `cfg`.
fn inventory_participant(cfg: participants_sdk::ParticipantConfig) -> participants_sdk::ParticipantBuilder {
    Participant::builder("inventory")
        .handle::<ReserveStock>(order_fulfilment::inventory::Inventory)
        .compensate::<order_fulfilment::commands::ReleaseStock>(order_fulfilment::inventory::Inventory)
        .config(cfg)
}

impl Rig {
    /// Connect to `participant` (running as `handle`) and declare the replies queue.
    async fn attach(env: TestEnv, participant: &'static str, step_name: &'static str, handle: ParticipantHandle) -> Rig {
        let conn = env.amqp().await.unwrap();
        let ch = transport::confirm_channel(&conn).await.unwrap();
        // Exclusive: gone with this connection (auto-delete needs a consumer, and this queue is read with basic.get).
        let replies = format!("{}.test-replies", env.namespace);
        ch.queue_declare(replies.as_str().into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
        Rig { env, conn, ch, replies, participant, step_name, handle: Some(handle) }
    }

    fn command(&self, saga: SagaId, attempt: u32, quantity: i64) -> WireMessage {
        let body = json!({"order_id": format!("o-{saga}"), "sku": "widget", "quantity": quantity});
        self.message(saga, CommandKind::Invoke, "inventory.reserve_stock", body, attempt)
    }

    /// The compensation of step 0 (`inventory.release_stock`).
    fn compensation(&self, saga: SagaId) -> WireMessage {
        self.message(saga, CommandKind::Compensate, "inventory.release_stock", json!({"order_id": format!("o-{saga}")}), 1)
    }

    fn message(&self, saga: SagaId, kind: CommandKind, command: &str, body: serde_json::Value, attempt: u32) -> WireMessage {
        let cmd = OutgoingCommand {
            message_id: MessageId::for_command(saga, StepIndex(0), kind, attempt),
            step: StepIndex(0),
            step_name: self.step_name.into(),
            kind,
            attempt,
            participant: self.participant.into(),
            command: command.into(),
            body,
            heartbeat_ms: None,
            progress: None,
        };
        encode_command(
            &SagaRef { saga_id: saga, definition: "order_fulfilment".into(), version: 1 },
            &cmd,
            &self.replies,
            None,
            Timestamp(0),
        )
    }

    async fn send(&self, msg: &WireMessage) {
        let names = self.env.names();
        transport::publish_confirmed(&self.ch, &names.commands_exchange(), self.participant, msg, true).await.unwrap();
    }

    /// Collect replies for `window`, stopping early once `want` arrived.
    async fn replies(&self, want: usize, window: Duration) -> Vec<(String, ReplyOutcome)> {
        self.decoded_replies(want, window).await.into_iter().map(|r| (r.message_id.to_string(), r.reply.outcome)).collect()
    }

    /// The replies as decoded, for `window`, stopping early once `want` arrived.
    async fn decoded_replies(&self, want: usize, window: Duration) -> Vec<InboundReply> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        while tokio::time::Instant::now() < deadline && out.len() < want {
            match self.ch.basic_get(self.replies.as_str().into(), BasicGetOptions::default()).await.unwrap() {
                Some(m) => {
                    let wire = transport::wire_from_delivery(&m.delivery, usize::MAX).unwrap();
                    out.push(decode_reply(&wire, DEFAULT_MAX_BODY_BYTES).unwrap());
                    m.delivery.ack(BasicAckOptions::default()).await.unwrap();
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        out
    }

    async fn reservations(&self, saga: SagaId) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM example_inventory.reservations WHERE order_id = $1")
            .bind(format!("o-{saga}"))
            .fetch_one(&self.env.pool)
            .await
            .unwrap()
    }

    async fn stock(&self) -> i64 {
        sqlx::query_scalar("SELECT available FROM example_inventory.stock WHERE sku = 'widget'").fetch_one(&self.env.pool).await.unwrap()
    }

    async fn finish(mut self) {
        self.handle.take().unwrap().shutdown().await.unwrap();
        self.conn.close(200, "done".into()).await.unwrap();
        self.env.cleanup(&[self.participant]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_is_applied_once() {
    let rig = rig(false).await;
    let saga = SagaId::new();
    let msg = rig.command(saga, 1, 3);
    rig.send(&msg).await;
    rig.send(&msg).await;
    let replies = rig.replies(2, Duration::from_secs(20)).await;
    assert_eq!(replies.len(), 2, "both deliveries are answered");
    assert_eq!(replies[0], replies[1], "with the same reply (same id, same outcome)");
    assert!(matches!(&replies[0].1, ReplyOutcome::Success { output } if output["reservation_id"].is_string()));
    // A later attempt of the same step is answered from the record, not run again.
    rig.send(&rig.command(saga, 2, 3)).await;
    let third = rig.replies(1, Duration::from_secs(20)).await;
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].1, replies[0].1);
    assert_ne!(third[0].0, replies[0].0, "a reply to another attempt has its own id");
    assert_eq!(rig.reservations(saga).await, 1);
    assert_eq!(rig.stock().await, 97, "the stock went down once");
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_commit_before_the_ack_yields_one_effect_and_one_reply() {
    let rig = rig(true).await;
    let saga = SagaId::new();
    rig.send(&rig.command(saga, 1, 5)).await;
    // The command went back to the queue unacked after the commit (as when the process dies);
    // its redelivery is answered from the record: one effect, one reply.
    let replies = rig.replies(2, Duration::from_secs(5)).await;
    assert_eq!(replies.len(), 1, "one reply: {replies:?}");
    assert!(matches!(replies[0].1, ReplyOutcome::Success { .. }), "{replies:?}");
    assert_eq!(rig.reservations(saga).await, 1, "one effect");
    assert_eq!(rig.stock().await, 95);

    // A reply an earlier version of the SDK left in its outbox is published, and its row deleted.
    let cmd = sagas::protocol::decode_command(&rig.command(SagaId::new(), 1, 1), DEFAULT_MAX_BODY_BYTES).unwrap();
    let leftover = sagas::protocol::encode_reply(&cmd, &ReplyOutcome::Success { output: json!({"left": "over"}) }, Timestamp(0));
    sqlx::query(
        "INSERT INTO sagaflow_participant.outbox (participant, routing_key, envelope, body, created_at)
         VALUES ('inventory', $1, $2, $3, now() - interval '1 hour')",
    )
    .bind(&rig.replies)
    .bind(serde_json::to_value(&leftover).unwrap())
    .bind(&leftover.body)
    .execute(&rig.env.pool)
    .await
    .unwrap();
    let sent = rig.replies(1, Duration::from_secs(20)).await;
    assert_eq!(sent.len(), 1, "the leftover reply was published");
    assert_eq!(Some(sent[0].0.as_str()), leftover.message_id.as_deref());
    // Deleted in the sweep's transaction, which commits after the publish is confirmed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow_participant.outbox").fetch_one(&rig.env.pool).await.unwrap();
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the leftover reply's row was never deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_commands_are_dead_lettered_with_a_reason_and_the_consumer_keeps_going() {
    let rig = rig(false).await;
    let good = rig.command(SagaId::new(), 1, 1);
    let mut malformed = rig.command(SagaId::new(), 1, 1);
    malformed.body = b"{not json".to_vec();
    let mut unknown = rig.command(SagaId::new(), 1, 1);
    unknown.kind = Some("inventory.teleport".into());
    let mut headless = rig.command(SagaId::new(), 1, 1);
    headless.headers.clear();
    let mut oversized = rig.command(SagaId::new(), 1, 1);
    oversized.body = serde_json::to_vec(&json!({"pad": "x".repeat(DEFAULT_MAX_BODY_BYTES)})).unwrap();
    for m in [&malformed, &unknown, &headless, &oversized, &good] {
        rig.send(m).await;
    }
    let replies = rig.replies(1, Duration::from_secs(20)).await;
    assert_eq!(replies.len(), 1, "the good command after the bad ones was handled");

    let dlq = Names::dead_letter_queue(&rig.env.names().participant_queue("inventory"));
    let reasons = wait::dead_letter_reasons(&rig.ch, &dlq, 4, Duration::from_secs(10)).await.unwrap();
    assert_eq!(reasons, ["invalid_headers", "malformed_body", "oversized", "unknown_command"]);
    assert_eq!(rig.stock().await, 99, "only the good command took effect");
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_fails_transiently_is_retried_until_it_succeeds() {
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let def = SagaDefinition::<Plan>::builder("undo", 1)
        .step("a", |s| probe::step(s, "a").compensation_retry(sagas::RetryPolicy::fixed(Duration::from_millis(100), 10)))
        .step("b", |s| probe::step(s, "b"))
        .build()
        .unwrap();
    let mut registry = Registry::new();
    registry.register(def.erased()).unwrap();
    let node = env.orchestrator("n1", registry).await.unwrap();
    let p = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();

    let plan = Plan::default().with("b", Behavior::Reject).undo_flaky("a", 3);
    let req = probe::start_request("undo", &plan);
    let id = node.engine().start(&req, None).await.unwrap().saga_id;
    let st = wait::settled(&env.pool, id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(st.status, SagaStatus::Compensated, "{st:?}");
    assert_eq!(st.steps[0].compensation_attempts, 4, "three transient failures, then success");
    assert_eq!(probe::effects(&env.pool, id).await.unwrap(), ["a:do", "a:undo"]);

    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

/// The broker connection drops while every handler slot is busy: the participant notices,
/// reconnects, answers every command once, and still shuts down promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_every_handler_is_busy_is_noticed_and_nothing_is_lost() {
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let def = SagaDefinition::<Plan>::builder("busy", 1).step("a", |s| probe::step(s, "a")).build().unwrap();
    let mut registry = Registry::new();
    registry.register(def.erased()).unwrap();
    let node = env.orchestrator("n1", registry).await.unwrap();
    let broker = env.amqp_url.rsplit('@').next().and_then(|rest| rest.split('/').next()).expect("host:port in the AMQP URL");
    let proxy = testkit::Proxy::start(broker).await.unwrap();
    let config = participants_sdk::ParticipantConfig { concurrency: 2, ..env.participant_config() };
    let p = probe::participant(config).start(env.pool.clone(), &proxy.url(&env.amqp_url)).await.unwrap();

    let plan = Plan::default().with("a", Behavior::Slow { ms: 1500 });
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(node.engine().start(&probe::start_request("busy", &plan), None).await.unwrap().saga_id);
    }
    // Both slots are taken by slow handlers when the connection goes.
    wait::until(&env.pool, ids[0], Duration::from_secs(30), |s| s.steps[0].attempts >= 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut();

    let states = wait::all_settled(&env.pool, &ids, Duration::from_secs(90)).await.unwrap();
    for (id, st) in ids.iter().zip(&states) {
        assert_eq!(st.status, SagaStatus::Completed, "{st:?}");
        assert_eq!(probe::effects(&env.pool, *id).await.unwrap(), ["a:do"], "applied once");
    }
    tokio::time::timeout(Duration::from_secs(60), p.shutdown()).await.expect("the participant shuts down").unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}

/// A compensation can overtake its command (the saga timed out and compensated while the
/// command sat in a queue): the compensation undoes nothing, and the command, arriving late, is
/// refused `already_compensated` without running. A refusal is recorded like any outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_arriving_after_its_compensation_is_refused_and_refusals_are_recorded() {
    let rig = rig(false).await;
    let late = SagaId::new();
    rig.send(&rig.compensation(late)).await;
    let undone = rig.replies(1, Duration::from_secs(20)).await;
    assert!(matches!(&undone[..], [(_, ReplyOutcome::Success { .. })]), "{undone:?}");
    rig.send(&rig.command(late, 1, 3)).await;
    let refused = rig.replies(1, Duration::from_secs(20)).await;
    assert!(matches!(&refused[..], [(_, ReplyOutcome::Rejected { code, .. })] if code == "already_compensated"), "{refused:?}");
    assert_eq!((rig.reservations(late).await, rig.stock().await), (0, 100), "the late command did not run");

    // A business refusal: recorded, and a redelivery is answered from the record.
    let greedy = SagaId::new();
    rig.send(&rig.command(greedy, 1, 1000)).await;
    let mut replies = rig.replies(1, Duration::from_secs(20)).await;
    // Once that reply is out the refusal is recorded: a later attempt that could succeed is
    // answered from the record instead of running.
    rig.send(&rig.command(greedy, 2, 1)).await;
    replies.extend(rig.replies(1, Duration::from_secs(20)).await);
    assert_eq!(replies.len(), 2);
    for (_, outcome) in &replies {
        assert!(matches!(outcome, ReplyOutcome::Rejected { code, .. } if code == "out_of_stock"), "{outcome:?}");
    }
    assert_eq!((rig.reservations(greedy).await, rig.stock().await), (0, 100), "the second attempt was answered, not run");
    rig.finish().await;
}

/// Commands that arrive while every transaction slot is busy run as one batch: a refusal undoes
/// only its own handler's writes (the batch runs again with savepoints) and is recorded, a transient
/// failure is answered and not recorded, a second command of a step already in the batch (a
/// redelivery, a compensation overtaking its command) runs after the batch, and every command
/// gets its reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_commands_runs_each_once_and_a_refusal_undoes_only_its_own_writes() {
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let config = participants_sdk::ParticipantConfig { concurrency: 1, ..env.participant_config() };
    let p = probe::participant(config).start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let rig = Rig::attach(env, "probe", "a", p).await;
    let probe_cmd = |saga: SagaId, kind: CommandKind, behavior: Behavior| match kind {
        CommandKind::Invoke => rig.message(saga, kind, "probe.do", json!({"key": "a", "behavior": behavior}), 1),
        CommandKind::Compensate => rig.message(saga, kind, "probe.undo", json!({"key": "a", "flaky": 0}), 1),
    };
    let [slow, ok, refused, flaky, twice, undone] = std::array::from_fn(|_| SagaId::new());
    // The slow command holds the only slot while the others arrive.
    rig.send(&probe_cmd(slow, CommandKind::Invoke, Behavior::Slow { ms: 1500 })).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.send(&probe_cmd(ok, CommandKind::Invoke, Behavior::Ok)).await;
    rig.send(&probe_cmd(refused, CommandKind::Invoke, Behavior::WriteThenReject)).await;
    rig.send(&probe_cmd(flaky, CommandKind::Invoke, Behavior::Flaky { n: 1 })).await;
    rig.send(&probe_cmd(twice, CommandKind::Invoke, Behavior::Ok)).await;
    rig.send(&probe_cmd(twice, CommandKind::Invoke, Behavior::Ok)).await;
    rig.send(&probe_cmd(undone, CommandKind::Compensate, Behavior::Ok)).await;
    rig.send(&probe_cmd(undone, CommandKind::Invoke, Behavior::Ok)).await;

    let got: Vec<(SagaId, String)> = rig
        .decoded_replies(8, Duration::from_secs(30))
        .await
        .into_iter()
        .map(|r| {
            let kind = r.reply.kind.as_str();
            let outcome = match r.reply.outcome {
                ReplyOutcome::Success { .. } => format!("{kind}:success"),
                ReplyOutcome::Rejected { code, .. } => format!("{kind}:rejected:{code}"),
                ReplyOutcome::TransientFailure { .. } => format!("{kind}:transient"),
            };
            (r.saga_id, outcome)
        })
        .collect();
    let of = |saga: SagaId| got.iter().filter(|(s, _)| *s == saga).map(|(_, o)| o.as_str()).collect::<Vec<_>>();
    assert_eq!(got.len(), 8, "every command is answered: {got:?}");
    assert_eq!(of(slow), ["invoke:success"]);
    assert_eq!(of(ok), ["invoke:success"]);
    assert_eq!(of(refused), ["invoke:rejected:probe_rejected"]);
    assert_eq!(of(flaky), ["invoke:transient"]);
    assert_eq!(of(twice), ["invoke:success", "invoke:success"], "the redelivery is answered from the record");
    assert_eq!(of(undone), ["compensate:success", "invoke:rejected:already_compensated"]);

    // Effects: once each; the refused handler's write is gone, the late command never ran.
    for (saga, want) in [(slow, &["a:do"][..]), (ok, &["a:do"]), (refused, &[]), (flaky, &[]), (twice, &["a:do"]), (undone, &["a:undo"])] {
        assert_eq!(probe::effects(&rig.env.pool, saga).await.unwrap(), want, "saga {saga}");
    }
    // The commands that arrived together were recorded by one transaction (`now()` is the
    // transaction's start); the transient failure was not recorded.
    let (rows, transactions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT recorded_at) FROM sagaflow_participant.inbox WHERE participant = 'probe' AND saga_id = ANY($1)",
    )
    .bind([ok.0, refused.0, flaky.0, twice.0])
    .fetch_one(&rig.env.pool)
    .await
    .unwrap();
    assert_eq!((rows, transactions), (3, 1), "ok, refused and twice are recorded, by one transaction; the transient failure is not");

    rig.finish().await;
}

/// A command whose reply (or refusal) repeats its text.
#[derive(serde::Serialize, serde::Deserialize)]
struct Say {
    text: String,
}

impl sagas::Command for Say {
    const NAME: &'static str = "echo.say";
    const PARTICIPANT: &'static str = "echo";
    type Reply = serde_json::Value;
}

struct Echo;

impl participants_sdk::Handler<Say> for Echo {
    async fn handle(&self, _cx: &mut participants_sdk::Context<'_>, cmd: Say) -> participants_sdk::HandlerResult<serde_json::Value> {
        if cmd.text.starts_with("refuse") {
            return Err(participants_sdk::HandlerError::reject(cmd.text.clone(), cmd.text));
        }
        Ok(json!({ "text": cmd.text }))
    }
}

/// An outcome is recorded with whatever text a handler put in it (quotes, dollar quotes, SQL,
/// backslashes, emoji): the record holds it as it was, and a redelivery is answered from it alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_holding_any_text_is_recorded_as_it_is_and_answered_again_from_the_record() {
    let env = TestEnv::start().await.unwrap();
    let echo = Participant::builder("echo").handle::<Say>(Echo).config(env.participant_config()).build().unwrap();
    let handle = echo.start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let rig = Rig::attach(env, "echo", "say", handle).await;
    let tricky = "it's $sf$ $$ $sf0188$ '); DELETE FROM sagaflow_participant.inbox; -- \\ \" \u{1F600} \u{2028}";
    for text in [tricky.to_owned(), format!("refuse {tricky}")] {
        let saga = SagaId::new();
        let msg = rig.message(saga, CommandKind::Invoke, "echo.say", json!({ "text": text }), 1);
        rig.send(&msg).await;
        rig.send(&msg).await;
        let replies = rig.replies(2, Duration::from_secs(20)).await;
        assert_eq!(replies.len(), 2, "{replies:?}");
        assert_eq!(replies[0], replies[1], "the redelivery is answered from the record");
        let want = if text.starts_with("refuse") {
            ReplyOutcome::Rejected { code: text.clone(), message: text.clone() }
        } else {
            ReplyOutcome::Success { output: json!({ "text": text }) }
        };
        assert_eq!(replies[0].1, want);
        let recorded: serde_json::Value =
            sqlx::query_scalar("SELECT outcome FROM sagaflow_participant.inbox WHERE participant = 'echo' AND saga_id = $1")
                .bind(saga.0)
                .fetch_one(&rig.env.pool)
                .await
                .unwrap();
        assert_eq!(serde_json::from_value::<ReplyOutcome>(recorded).unwrap(), want);
    }
    let records: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow_participant.inbox").fetch_one(&rig.env.pool).await.unwrap();
    assert_eq!(records, 2, "one record per step, nothing deleted");
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_the_old_records_of_its_own_participant_only() {
    let env = TestEnv::start().await.unwrap();
    order_fulfilment::setup(&env.pool, &["widget"], 100).await.unwrap();
    participants_sdk::ensure_schema(&env.pool, false).await.unwrap();
    // Inventory's records of 30 and 2 days ago, and another participant's of 30 days ago.
    let (old, recent, others) = (SagaId::new(), SagaId::new(), SagaId::new());
    for (participant, saga, age_days) in [("inventory", old, 30), ("inventory", recent, 2), ("payment", others, 30)] {
        sqlx::query(
            "INSERT INTO sagaflow_participant.inbox (participant, saga_id, step, kind, command_id, outcome, recorded_at)
             VALUES ($1, $2, 0, 'invoke', $3, '{}', now() - make_interval(days => $4))",
        )
        .bind(participant)
        .bind(saga.0)
        .bind(uuid::Uuid::now_v7())
        .bind(age_days)
        .execute(&env.pool)
        .await
        .unwrap();
    }
    let pool = env.pool.clone();
    let records = move |saga: SagaId| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sagaflow_participant.inbox WHERE saga_id = $1")
                .bind(saga.0)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let mut cfg = env.participant_config();
    cfg.retention_days = 7;
    let inventory = inventory_participant(cfg).build().unwrap().start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while records(old).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the 30-day-old record was never deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(records(recent).await, 1, "a record younger than retention_days stays");
    assert_eq!(records(others).await, 1, "another participant's records are its own to prune");

    // It still serves commands, and records them.
    let rig = Rig::attach(env, "inventory", "reserve_stock", inventory).await;
    let saga = SagaId::new();
    rig.send(&rig.command(saga, 1, 2)).await;
    assert_eq!(rig.replies(1, Duration::from_secs(20)).await.len(), 1);
    assert_eq!(records(saga).await, 1);
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ready_file_is_fresh_while_consuming_and_gone_after_shutdown() {
    let env = TestEnv::start().await.unwrap();
    order_fulfilment::setup(&env.pool, &["widget"], 100).await.unwrap();
    let path = std::env::temp_dir().join(format!("ready-{}", uuid::Uuid::now_v7()));
    let cfg = participants_sdk::ParticipantConfig { ready_file: Some(path.clone()), ..env.participant_config() };
    assert!(!participants_sdk::ready_file_is_fresh(&path, Duration::from_secs(15)), "not ready before it starts");
    let inventory = inventory_participant(cfg).build().unwrap().start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !participants_sdk::ready_file_is_fresh(&path, Duration::from_secs(15)) {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    inventory.shutdown().await.unwrap();
    assert!(!path.exists(), "removed when it stopped consuming");
    env.cleanup(&["inventory"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_does_not_hold_the_replies_of_its_batch() {
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let conn = env.amqp().await.unwrap();
    let ch = transport::confirm_channel(&conn).await.unwrap();
    transport::declare_participant(&ch, &env.names(), "probe", transport::QueueOptions::default()).await.unwrap();
    let replies = format!("{}.test-replies", env.namespace);
    ch.queue_declare(replies.as_str().into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let mut rig = Rig { env, conn, ch, replies, participant: "probe", step_name: "a", handle: None };
    // The participant runs one batch at a time. A first command goes alone (it takes 1 s, below
    // `slow_handler` of 2 s): the rest are sent once the broker handed it over, so they arrive
    // while it runs and form the next batch: one whose handler takes 5 s, then ten that take
    // nothing. (Queued before the participant started, any number of them could have joined the
    // first batch, as many as had reached the client when its first delivery was taken.)
    let (first, slow) = (SagaId::new(), SagaId::new());
    let fast: Vec<SagaId> = (0..10).map(|_| SagaId::new()).collect();
    rig.send(&rig.message(first, CommandKind::Invoke, "probe.do", json!({"key": "a", "behavior": Behavior::Slow { ms: 1000 }}), 1)).await;
    let cfg = participants_sdk::ParticipantConfig { concurrency: 1, slow_handler: Duration::from_secs(2), ..rig.env.participant_config() };
    rig.handle = Some(probe::participant(cfg).start(rig.env.pool.clone(), &rig.env.amqp_url).await.unwrap());
    let queue = rig.env.names().participant_queue("probe");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    while rig.ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await.unwrap().message_count() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the first command was never handed to the participant");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (saga, behavior) in std::iter::once((slow, Behavior::Slow { ms: 5000 })).chain(fast.iter().map(|s| (*s, Behavior::Ok))) {
        let body = json!({"key": "a", "behavior": behavior});
        rig.send(&rig.message(saga, CommandKind::Invoke, "probe.do", body, 1)).await;
    }

    let got = rig.decoded_replies(12, Duration::from_secs(30)).await;
    let order: Vec<SagaId> = got.iter().map(|r| r.saga_id).collect();
    assert_eq!(order.len(), 12, "every command is answered: {order:?}");
    assert_eq!(order.first(), Some(&first), "{order:?}");
    assert_eq!(order.last(), Some(&slow), "the ten fast replies of its batch come before the slow one: {order:?}");
    assert!(got.iter().all(|r| matches!(r.reply.outcome, ReplyOutcome::Success { .. })), "{got:?}");
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM probe.effects").fetch_one(&rig.env.pool).await.unwrap();
    assert_eq!(effects, 12, "each command's effect once: the stopped batch rolled back");
    rig.finish().await;
}
