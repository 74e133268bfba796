//! Hostile input: every class of poison found so far, and the next ones we could think of, on
//! all four input paths (the inbound queue, the replies queue, a participant's queue, the HTTP
//! API), sent while normal sagas run against a node and participants running as child
//! processes. Each kind states its fate: dead-lettered with a documented reason, refused with a
//! 4xx JSON error, or taken as harmless (a malformed trace context is dropped). Then: no process
//! crashed, none reconnected in a loop, no queue or outbox holds anything, every normal saga
//! settled as it should, and the p99 of the normal sagas is reported beside a clean run's.
//! (A fifth path, the queue of the built-in participant `sagaflow.child`, is taken only by nodes
//! whose sagas start child sagas: its hostile commands are in `runtime.rs`'s child saga test.)
//!
//! It prints `hostile: kinds=N dead_lettered=N refused=N crashes=0 loops=0 stalled=0 normal=N p99_ratio=X`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use sagaflow_amqp::transport::{self, Names};
use sagas::protocol::{
    DEFAULT_MAX_BODY_BYTES, H_ATTEMPT, H_IDEMPOTENCY_KEY, H_KIND, H_SAGA_ID, H_STEP_NAME, H_TRACEPARENT, HeaderValue, ReplyOutcome,
    SagaRef, TYPE_EVENT, WireMessage, encode_command, encode_reply,
};
use sagas::{CommandKind, MessageId, OutgoingCommand, SagaId, SagaStatus, StepIndex, Timestamp};
use serde_json::{Value, json};
use testkit::http::{self, Response};
use testkit::messages::start_message as start_msg;
use testkit::{Node, TestEnv, wait};

/// Normal sagas per phase (a clean one, then one beside the hostile input).
const NORMAL: u32 = 60;
/// Normal sagas in flight at once.
const NORMAL_CONCURRENCY: usize = 6;
/// A normal saga not settled after this is stalled.
const STALLED_AFTER: Duration = Duration::from_secs(60);
/// Commands whose `reply_to` queue does not exist: more than the participant's sweep reads at
/// once (100), so leftovers that could never be sent would block every later one.
const ORPHAN_REPLIES: usize = 120;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn order_input(i: u32) -> Value {
    json!({"order_id": format!("normal-{i}-{}", uuid::Uuid::now_v7()), "sku": "widget", "quantity": 1, "amount_cents": 100,
           "destination": if i.is_multiple_of(5) { order_fulfilment::UNREACHABLE } else { "Main St 1" }})
}

/// Start `NORMAL` orders over HTTP, `NORMAL_CONCURRENCY` at a time; each one's time from start
/// to settled (or `None`: not settled within `STALLED_AFTER`), and whether it settled as its
/// order says (every 5th compensated, the rest completed).
async fn normal_sagas(api: &str, pool: &sqlx::PgPool, phase: &str) -> Vec<(Option<Duration>, bool)> {
    let (api, pool) = (api.to_owned(), pool.clone());
    let mut out = Vec::new();
    let mut next = 1..=NORMAL;
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < NORMAL_CONCURRENCY {
            let Some(i) = next.next() else { break };
            let (api, pool, phase) = (api.clone(), pool.clone(), phase.to_owned());
            running.spawn(async move {
                let body = json!({"definition": "order_fulfilment", "input": order_input(i), "idempotency_key": format!("{phase}-{i}-{}", uuid::Uuid::now_v7())});
                let t0 = Instant::now();
                let r = http::request(&api, "POST", "/sagas", &[("Content-Type", "application/json")], body.to_string().as_bytes()).await.unwrap();
                assert_eq!(r.status, 202, "a normal start is accepted: {:?}", String::from_utf8_lossy(&r.body));
                let id: SagaId = r.json()["saga_id"].as_str().unwrap().parse().unwrap();
                let want = if i.is_multiple_of(5) { SagaStatus::Compensated } else { SagaStatus::Completed };
                loop {
                    let st = sagaflow_status(&pool, id).await;
                    if st.is_some_and(|s| s.is_settled()) {
                        return (Some(t0.elapsed()), st == Some(want));
                    }
                    if t0.elapsed() > STALLED_AFTER {
                        return (None, false);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
        match running.join_next().await {
            Some(r) => out.push(r.unwrap()),
            None => return out,
        }
    }
}

async fn sagaflow_status(pool: &sqlx::PgPool, id: SagaId) -> Option<SagaStatus> {
    let s: Option<String> =
        sqlx::query_scalar("SELECT status FROM sagaflow.instances WHERE id = $1").bind(id.0).fetch_optional(pool).await.unwrap();
    s.map(|s| serde_json::from_value(Value::String(s)).unwrap())
}

fn p99(runs: &[(Option<Duration>, bool)]) -> f64 {
    let mut ms: Vec<f64> = runs.iter().filter_map(|(d, _)| d.map(|d| d.as_secs_f64() * 1000.0)).collect();
    ms.sort_by(f64::total_cmp);
    ms.get((ms.len() * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or(f64::NAN)
}

/// What should become of one hostile input.
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    /// Dead-lettered from this queue with this reason.
    DeadLetter(String, &'static str),
    /// Refused over HTTP with this status and error code.
    Refused(u16, &'static str),
    /// Taken without harm (a normal result follows).
    Absorbed,
}

/// The test's own header on each hostile message, to find its dead letter.
const H_HOSTILE: &str = "x-hostile";

/// How a dead letter is known: its `x-hostile` header, or (a reply the participant made) its id.
fn dead_letter_key(d: &lapin::message::Delivery) -> String {
    match transport::delivery_header(d, H_HOSTILE) {
        Some(HeaderValue::Str(tag)) => tag,
        _ => d.properties.message_id().as_ref().map(|m| m.as_str().to_owned()).unwrap_or_default(),
    }
}

struct Barrage {
    names: Names,
    /// Expected dead letters by `x-hostile` tag or message id.
    dead: HashMap<String, (String, &'static str, &'static str)>,
    kinds: Vec<(&'static str, Fate)>,
}

impl Barrage {
    /// `m`, expected on `queue`'s dead letters with `reason`: known by its `x-hostile` header
    /// (a dead letter keeps its headers; short ones even when long ones are cut).
    fn msg(&mut self, kind: &'static str, queue: &str, reason: &'static str, mut m: WireMessage) -> WireMessage {
        let tag = format!("h{}", self.kinds.len());
        m.headers.insert(H_HOSTILE.into(), HeaderValue::Str(tag.clone()));
        self.dead.insert(tag, (queue.to_owned(), reason, kind));
        self.kinds.push((kind, Fate::DeadLetter(queue.to_owned(), reason)));
        m
    }
}

fn event_msg(v: Value) -> WireMessage {
    WireMessage { kind: Some(TYPE_EVENT.into()), ..start_msg(v.to_string().as_bytes()) }
}

fn command(saga: SagaId, reply_to: &str, attempt: u32) -> WireMessage {
    let cmd = OutgoingCommand {
        message_id: MessageId::for_command(saga, StepIndex(1), CommandKind::Invoke, attempt),
        step: StepIndex(1),
        step_name: "charge_payment".into(),
        kind: CommandKind::Invoke,
        attempt,
        participant: "payment".into(),
        command: "payment.charge".into(),
        body: json!({"order_id": format!("hostile-{saga}"), "amount_cents": 100}),
        heartbeat_ms: None,
        progress: None,
    };
    let saga = SagaRef { saga_id: saga, definition: "order_fulfilment".into(), version: 1 };
    encode_command(&saga, &cmd, reply_to, None, Timestamp::now())
}

fn reply(saga: SagaId, step: u32, outcome: &ReplyOutcome, replies: &str) -> WireMessage {
    let cmd = testkit::messages::charge_command(saga, step, replies);
    let mut m = encode_reply(&cmd, outcome, Timestamp::now());
    // A fresh id: the same command id twice would be deduped as one reply.
    m.message_id = Some(MessageId::new_random().to_string());
    m
}

/// A heartbeat about step `step` of `saga`'s charge command.
fn heartbeat(saga: SagaId, step: u32, details: &Value, replies: &str) -> WireMessage {
    let cmd = testkit::messages::charge_command(saga, step, replies);
    sagas::protocol::encode_heartbeat(&cmd, details, MessageId::new_random(), Timestamp::now())
}

fn with_header(mut m: WireMessage, name: &str, v: HeaderValue) -> WireMessage {
    m.headers.insert(name.into(), v);
    m
}

/// Publish `m` to the default exchange with routing key `queue`, with `extra` AMQP headers of
/// types the protocol does not use.
async fn send(ch: &lapin::Channel, queue: &str, m: &WireMessage, extra: Option<(&str, AMQPValue)>) {
    let mut props = transport::properties(m);
    if let Some((k, v)) = extra {
        let mut h = props.headers().clone().unwrap_or_default();
        h.insert(k.into(), v);
        props = props.with_headers(h);
    }
    let confirm = ch
        .basic_publish("".into(), queue.into(), lapin::options::BasicPublishOptions { mandatory: true, immediate: false }, &m.body, props)
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(confirm, lapin::Confirmation::Ack(None)), "the broker took the hostile message for {queue}: {confirm:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_single_input_stalls_loops_or_crashes_anything_while_normal_sagas_run() {
    let env = TestEnv::start().await.unwrap();
    order_fulfilment::setup(&env.pool, &["widget"], 1_000_000).await.unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let mut vars = env.node_env("hostile-node");
    vars.retain(|(k, _)| k != "SAGAFLOW_API_ADDR");
    vars.push(("SAGAFLOW_API_ADDR".into(), api.clone()));
    let mut procs = vec![Node::spawn_with(env!("CARGO_BIN_EXE_sagaflow-node"), &["serve"], vars.clone(), "hostile-node").unwrap()];
    for p in order_fulfilment::PARTICIPANTS {
        let id = format!("hostile-{p}");
        procs.push(Node::spawn_with(env!("CARGO_BIN_EXE_testkit-order-participant"), &[p], vars.clone(), &id).unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http::request(&api, "GET", "/ready", &[], b"").await.is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline, "the node did not come up: {}", procs[0].logged());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The participants declare their queues when they start.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A clean run first, for the p99 to compare with.
    let clean = normal_sagas(&api, &env.pool, "clean").await;
    assert!(clean.iter().all(|(d, ok)| d.is_some() && *ok), "the clean run settled as it should: {clean:?}");

    let names = env.names();
    let conn = env.amqp().await.unwrap();
    let ch = transport::confirm_channel(&conn).await.unwrap();
    let (inbound, replies, payment) = (names.inbound_queue(), names.replies_queue(), names.participant_queue("payment"));
    let mut b = Barrage { names: names.clone(), dead: HashMap::new(), kinds: Vec::new() };

    // A saga that settled, for stale and misdirected replies, and a running one for events.
    let settled: SagaId =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM sagaflow.instances LIMIT 1").fetch_one(&env.pool).await.map(SagaId).unwrap();
    let ok = ReplyOutcome::Success { output: json!(null) };

    // The normal sagas of the hostile phase run beside everything below.
    let normal = tokio::spawn({
        let (api, pool) = (api.clone(), env.pool.clone());
        async move { normal_sagas(&api, &pool, "hostile").await }
    });

    // --- The inbound queue: starts and events.
    let start = |v: Value| start_msg(v.to_string().as_bytes());
    let good_input = order_input(1);
    let mut inbound_msgs = vec![
        b.msg("start: truncated JSON", &inbound, "malformed_body", start_msg(b"{\"definition\": \"order_fulfilment\", \"input\": ")),
        b.msg("start: random bytes", &inbound, "malformed_body", start_msg(&[0xff, 0x00, 0xfe, 0x13, 0x37, 0x00])),
        b.msg("start: body over max_body_bytes", &inbound, "oversized", start(json!({"definition": "order_fulfilment", "input": {"pad": "x".repeat(DEFAULT_MAX_BODY_BYTES)}}))),
        b.msg("start: unknown definition", &inbound, "unknown_definition", start(json!({"definition": "no_such_saga", "input": {}}))),
        b.msg("start: unknown version", &inbound, "unknown_definition", start(json!({"definition": "order_fulfilment", "version": 4_000_000_000u32, "input": good_input}))),
        b.msg("start: input of the wrong shape", &inbound, "invalid_input", start(json!({"definition": "order_fulfilment", "input": {"order_id": 42}}))),
        b.msg("start: unknown field", &inbound, "malformed_body", start(json!({"definition": "order_fulfilment", "input": good_input, "urgency": 9}))),
        b.msg(
            "start: priority past 32 bits",
            &inbound,
            "malformed_body",
            start(json!({"definition": "order_fulfilment", "input": good_input, "priority": 1_u64 << 40})),
        ),
        b.msg("start: U+0000 in the input", &inbound, "malformed_body", start(json!({"definition": "order_fulfilment", "input": {"order_id": "a\u{0}b", "sku": "widget", "quantity": 1, "amount_cents": 1, "destination": "x"}}))),
        b.msg("start: U+0000 in a key of the input", &inbound, "malformed_body", start(json!({"definition": "order_fulfilment", "input": {"\u{0}": 1}}))),
        b.msg("start: U+0000 in x-idempotency-key", &inbound, "invalid_headers", with_header(start(json!({"definition": "order_fulfilment", "input": good_input})), H_IDEMPOTENCY_KEY, HeaderValue::Str("k\0".into()))),
        b.msg("start: 12,000-character x-idempotency-key", &inbound, "invalid_headers", with_header(start(json!({"definition": "order_fulfilment", "input": good_input})), H_IDEMPOTENCY_KEY, HeaderValue::Str("k".repeat(12_000)))),
        b.msg("start: 600-byte idempotency_key in the body", &inbound, "malformed_body", start(json!({"definition": "order_fulfilment", "input": good_input, "idempotency_key": "k".repeat(600)}))),
        b.msg("start: 100 KB definition name", &inbound, "malformed_body", start(json!({"definition": "d".repeat(100_000), "input": {}}))),
        b.msg("start: empty definition", &inbound, "malformed_body", start(json!({"definition": "", "input": {}}))),
        b.msg("start: a number for the saga id", &inbound, "malformed_body", start(json!({"definition": "order_fulfilment", "input": good_input, "saga_id": 7}))),
        b.msg("start: nested 200 deep", &inbound, "malformed_body", start_msg(format!("{{\"definition\":\"order_fulfilment\",\"input\":{}{}}}", "[".repeat(200), "]".repeat(200)).as_bytes())),
        b.msg("start: a number out of range", &inbound, "malformed_body", start_msg(br#"{"definition":"order_fulfilment","input":{"quantity":1e400}}"#)),
        b.msg("unknown message type", &inbound, "unknown_type", WireMessage { kind: Some("sagaflow.teleport".into()), ..start(json!({})) }),
        b.msg("no message type", &inbound, "invalid_properties", WireMessage { kind: None, ..start(json!({})) }),
        b.msg("U+0000 in the message type", &inbound, "unknown_type", WireMessage { kind: Some("sagaflow.start\0".into()), ..start(json!({})) }),
        b.msg("event: unknown saga", &inbound, "unknown_saga", event_msg(json!({"saga_id": SagaId::new(), "event": "approved"}))),
        b.msg("event: U+0000 in the name", &inbound, "malformed_body", event_msg(json!({"saga_id": settled, "event": "appro\u{0}ved"}))),
        b.msg("event: 300-byte name", &inbound, "malformed_body", event_msg(json!({"saga_id": settled, "event": "e".repeat(300)}))),
        b.msg("event: U+0000 in the payload", &inbound, "malformed_body", event_msg(json!({"saga_id": settled, "event": "approved", "payload": {"x": "\u{0}"}}))),
        b.msg("event: saga id not a UUID", &inbound, "malformed_body", event_msg(json!({"saga_id": "not-a-uuid", "event": "approved"}))),
    ];
    // Headers a few bytes short of the frame limit: the dead letter's reason and detail would
    // push them over, so its long headers are cut (and named in `x-dead-letter-trimmed`).
    let base = start_msg(b"{");
    let room = transport::max_properties_bytes() - transport::properties_size(&transport::properties(&base));
    let tag = 1 + H_HOSTILE.len() + 1 + 4 + 4;
    let padding = HeaderValue::Str("p".repeat(room - (1 + "x-padding".len() + 1 + 4) - tag - 16));
    let near_frame =
        b.msg("start: headers 16 bytes short of a frame, a bad body", &inbound, "malformed_body", with_header(base, "x-padding", padding));
    for m in inbound_msgs.drain(..) {
        send(&ch, &inbound, &m, None).await;
    }
    send(&ch, &inbound, &near_frame, None).await;

    // --- The replies queue.
    let to_replies = vec![
        b.msg(
            "reply: 70 KB x-saga-kind",
            &replies,
            "invalid_headers",
            with_header(reply(settled, 1, &ok, &replies), H_KIND, HeaderValue::Str("k".repeat(70_000))),
        ),
        b.msg(
            "reply: U+0000 in a stale reply's output",
            &replies,
            "malformed_body",
            reply(settled, 1, &ReplyOutcome::Success { output: json!({"charge_id": "\u{0}"}) }, &replies),
        ),
        b.msg(
            "reply: U+0000 in a refusal's code",
            &replies,
            "malformed_body",
            reply(settled, 1, &ReplyOutcome::Rejected { code: "x\u{0}".into(), message: String::new() }, &replies),
        ),
        b.msg(
            "reply: U+0000 in a step name",
            &replies,
            "invalid_headers",
            with_header(reply(settled, 1, &ok, &replies), H_STEP_NAME, HeaderValue::Str("\0".into())),
        ),
        b.msg("reply: unknown saga", &replies, "unknown_saga", reply(SagaId::new(), 1, &ok, &replies)),
        b.msg("heartbeat: unknown saga", &replies, "unknown_saga", heartbeat(SagaId::new(), 1, &json!({"done": 1}), &replies)),
        b.msg("heartbeat: unknown step", &replies, "unknown_step", heartbeat(settled, 4_000_000, &json!(null), &replies)),
        b.msg(
            "heartbeat: details over 4 KiB",
            &replies,
            "oversized",
            heartbeat(settled, 1, &json!("x".repeat(sagas::protocol::MAX_HEARTBEAT_BYTES)), &replies),
        ),
        b.msg("heartbeat: U+0000 in its details", &replies, "malformed_body", heartbeat(settled, 1, &json!({"at": "\u{0}"}), &replies)),
        b.msg(
            "heartbeat: a body that is not {details}",
            &replies,
            "malformed_body",
            WireMessage { body: br#"{"type":"success"}"#.to_vec(), ..heartbeat(settled, 1, &json!(1), &replies) },
        ),
        b.msg("reply: unknown step", &replies, "unknown_step", reply(settled, 4_000_000, &ok, &replies)),
        b.msg(
            "reply: truncated JSON",
            &replies,
            "malformed_body",
            WireMessage { body: b"{\"type\": \"success\"".to_vec(), ..reply(settled, 1, &ok, &replies) },
        ),
        b.msg(
            "reply: unknown outcome",
            &replies,
            "malformed_body",
            WireMessage { body: br#"{"type":"maybe"}"#.to_vec(), ..reply(settled, 1, &ok, &replies) },
        ),
        b.msg(
            "reply: body over max_body_bytes",
            &replies,
            "oversized",
            WireMessage { body: vec![b' '; DEFAULT_MAX_BODY_BYTES + 1], ..reply(settled, 1, &ok, &replies) },
        ),
        b.msg(
            "reply: correlation id not a UUID",
            &replies,
            "invalid_properties",
            WireMessage { correlation_id: Some("nope".into()), ..reply(settled, 1, &ok, &replies) },
        ),
        b.msg(
            "reply: attempt as words",
            &replies,
            "invalid_headers",
            with_header(reply(settled, 1, &ok, &replies), H_ATTEMPT, HeaderValue::Str("first".into())),
        ),
        b.msg(
            "reply: negative attempt",
            &replies,
            "invalid_headers",
            with_header(reply(settled, 1, &ok, &replies), H_ATTEMPT, HeaderValue::Int(-1)),
        ),
        b.msg(
            "reply: 100 KB traceparent",
            &replies,
            "invalid_headers",
            with_header(reply(settled, 1, &ok, &replies), H_TRACEPARENT, HeaderValue::Str("0".repeat(100_000))),
        ),
        b.msg("reply: no message id", &replies, "invalid_properties", WireMessage { message_id: None, ..reply(settled, 1, &ok, &replies) }),
    ];
    for m in &to_replies {
        send(&ch, &replies, m, None).await;
    }
    // A saga id that is an AMQP table, not a string.
    let mut table_id = reply(settled, 1, &ok, &replies);
    table_id.headers.remove(H_SAGA_ID);
    let table_id = b.msg("reply: saga id as an AMQP table", &replies, "invalid_headers", table_id);
    send(&ch, &replies, &table_id, Some((H_SAGA_ID, AMQPValue::FieldTable(FieldTable::default())))).await;

    // --- A participant's queue.
    let to_payment = vec![
        b.msg(
            "command: unknown command",
            &payment,
            "unknown_command",
            WireMessage { kind: Some("payment.teleport".into()), ..command(SagaId::new(), &replies, 1) },
        ),
        b.msg(
            "command: 70 KB x-saga-kind",
            &payment,
            "invalid_headers",
            with_header(command(SagaId::new(), &replies, 1), H_KIND, HeaderValue::Str("k".repeat(70_000))),
        ),
        b.msg(
            "command: U+0000 in the body",
            &payment,
            "malformed_body",
            WireMessage { body: br#"{"order_id":"\u0000","amount_cents":1}"#.to_vec(), ..command(SagaId::new(), &replies, 1) },
        ),
        b.msg("command: U+0000 in reply_to", &payment, "invalid_properties", command(SagaId::new(), "q\0", 1)),
        b.msg(
            "command: a compensation's kind on a command",
            &payment,
            "unknown_command",
            with_header(command(SagaId::new(), &replies, 1), H_KIND, HeaderValue::Str("compensate".into())),
        ),
        b.msg(
            "command: body over max_body_bytes",
            &payment,
            "oversized",
            WireMessage { body: vec![b' '; DEFAULT_MAX_BODY_BYTES + 1], ..command(SagaId::new(), &replies, 1) },
        ),
        b.msg("command: no saga id", &payment, "invalid_headers", {
            let mut m = command(SagaId::new(), &replies, 1);
            m.headers.remove(H_SAGA_ID);
            m
        }),
    ];
    for m in &to_payment {
        send(&ch, &payment, m, None).await;
    }
    // Commands whose replies can reach no queue: each reply is dead-lettered beside the
    // participant's queue, and none blocks the sweep.
    let orphan_queue = format!("{}.no-such-queue", names.namespace());
    let mut orphan_ids = Vec::new();
    for _ in 0..ORPHAN_REPLIES {
        let m = command(SagaId::new(), &orphan_queue, 1);
        let reply_id = MessageId::for_reply(m.message_id.as_deref().unwrap().parse().unwrap()).to_string();
        b.dead.insert(reply_id.clone(), (payment.clone(), "unroutable_reply", "command: reply_to a queue that does not exist"));
        orphan_ids.push(reply_id);
        send(&ch, &payment, &m, None).await;
    }
    b.kinds.push(("command: reply_to a queue that does not exist", Fate::DeadLetter(payment.clone(), "unroutable_reply")));

    // --- The HTTP API.
    let json_ct = ("Content-Type", "application/json");
    let start_body = json!({"definition": "order_fulfilment", "input": order_input(1)}).to_string();
    let settled_path = |action: &str| format!("/sagas/{settled}/{action}");
    let long_key = "k".repeat(12_000);
    let big = format!("{{\"definition\":\"order_fulfilment\",\"input\":{{\"pad\":\"{}\"}}}}", "x".repeat(3 * 1024 * 1024));
    type Call = (&'static str, &'static str, String, Vec<(&'static str, String)>, Vec<u8>, u16, &'static str);
    let calls: Vec<Call> = vec![
        (
            "http: U+0000 in the input",
            "POST",
            "/sagas".into(),
            vec![],
            br#"{"definition":"order_fulfilment","input":{"order_id":"\u0000","sku":"widget","quantity":1,"amount_cents":1,"destination":"x"}}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "http: 12,000-character idempotency_key",
            "POST",
            "/sagas".into(),
            vec![],
            json!({"definition": "order_fulfilment", "input": order_input(1), "idempotency_key": long_key}).to_string().into_bytes(),
            400,
            "invalid_request",
        ),
        (
            "http: 12,000-character Idempotency-Key header",
            "POST",
            "/sagas".into(),
            vec![("Idempotency-Key", long_key.clone())],
            start_body.clone().into_bytes(),
            400,
            "invalid_request",
        ),
        ("http: body of 3 MiB", "POST", "/sagas".into(), vec![], big.into_bytes(), 413, "payload_too_large"),
        (
            "http: text/plain body (a cross-site form)",
            "POST",
            "/sagas".into(),
            vec![("Content-Type", "text/plain".into())],
            start_body.clone().into_bytes(),
            415,
            "unsupported_media_type",
        ),
        (
            "http: another Origin",
            "POST",
            "/sagas".into(),
            vec![("Origin", "http://evil.example".into())],
            start_body.clone().into_bytes(),
            403,
            "forbidden",
        ),
        ("http: a rebound Host", "GET", "/sagas".into(), vec![("Host", "evil.example:8080".into())], vec![], 403, "forbidden"),
        ("http: truncated JSON", "POST", "/sagas".into(), vec![], b"{\"definition\":".to_vec(), 400, "invalid_request"),
        (
            "http: unknown definition",
            "POST",
            "/sagas".into(),
            vec![],
            br#"{"definition":"nope","input":{}}"#.to_vec(),
            400,
            "unknown_definition",
        ),
        (
            "http: U+0000 in an event name",
            "POST",
            settled_path("events"),
            vec![],
            br#"{"event":"a\u0000"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "http: 300-byte event name",
            "POST",
            settled_path("events"),
            vec![],
            json!({"event": "e".repeat(300)}).to_string().into_bytes(),
            400,
            "invalid_request",
        ),
        (
            "http: U+0000 in an abort reason",
            "POST",
            settled_path("abort"),
            vec![],
            br#"{"reason":"\u0000"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        ("http: U+0000 in a list filter", "GET", "/sagas?definition=%00".into(), vec![], vec![], 400, "invalid_request"),
        ("http: a time past year 9999", "GET", "/sagas?since=18446744073709551615".into(), vec![], vec![], 400, "invalid_request"),
        ("http: limit out of range", "GET", "/sagas?limit=100000".into(), vec![], vec![], 400, "invalid_request"),
        ("http: malformed cursor", "GET", "/sagas?cursor=%FF%FE".into(), vec![], vec![], 400, "invalid_request"),
        ("http: saga id not a UUID", "GET", "/sagas/..%2f..%2fetc".into(), vec![], vec![], 400, "invalid_request"),
        ("http: unknown action", "POST", settled_path("teleport"), vec![], vec![], 400, "invalid_request"),
        ("http: wait with a bad timeout", "GET", format!("/sagas/{settled}/wait?timeout_ms=abc"), vec![], vec![], 400, "invalid_request"),
        ("http: a method the route does not take", "DELETE", "/sagas".into(), vec![], vec![], 405, "method_not_allowed"),
        ("http: no such page", "GET", "/admin".into(), vec![], vec![], 404, "not_found"),
    ];
    let mut refused = 0;
    // Every mismatch, so that one run names every kind that is not handled as it should be.
    let mut problems: Vec<String> = Vec::new();
    for (kind, method, path, headers, body, status, code) in &calls {
        let mut hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if *method == "POST" && !hs.iter().any(|(k, _)| *k == "Content-Type") {
            hs.push(json_ct);
        }
        let r: Response = http::request(&api, method, path, &hs, body).await.unwrap();
        let got =
            (r.status, r.json()["error"]["code"].as_str().unwrap_or("").to_owned(), r.header("x-content-type-options") == Some("nosniff"));
        if got != (*status, (*code).to_owned(), true) {
            let body = String::from_utf8_lossy(&r.body);
            problems.push(format!("{kind}: want {status} {code} with nosniff, got {got:?}: {}", sagas::protocol::clip(&body, 200)));
        }
        refused += 1;
        b.kinds.push((kind, Fate::Refused(*status, code)));
    }
    // A trace context of 135 KB is dropped, not copied into every command: the saga completes.
    let tp = "0".repeat(135_000);
    let r = http::request(&api, "POST", "/sagas", &[json_ct, ("traceparent", &tp)], start_body.as_bytes()).await.unwrap();
    let traced: Option<SagaId> = r.json()["saga_id"].as_str().and_then(|s| s.parse().ok());
    if r.status != 202 {
        problems.push(format!("http: 135 KB traceparent: want 202, got {}", r.status));
    }
    b.kinds.push(("http: 135 KB traceparent", Fate::Absorbed));
    // The largest float: PostgreSQL keeps it as a 309-digit number, which must read back (a
    // saga whose state cannot be read could never take another input).
    let max_float = format!(
        r#"{{"definition":"order_fulfilment","input":{{"order_id":"max-float-{}","sku":"widget","quantity":1,"amount_cents":100,"destination":"Main St 1","note":1.7976931348623157e308}}}}"#,
        uuid::Uuid::now_v7()
    );
    let r = http::request(&api, "POST", "/sagas", &[json_ct], max_float.as_bytes()).await.unwrap();
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let max_float: SagaId = r.json()["saga_id"].as_str().unwrap().parse().unwrap();
    b.kinds.push(("http: the largest float in the input", Fate::Absorbed));
    // The page forbids framing and scripts from elsewhere.
    let page = http::request(&api, "GET", "/", &[], b"").await.unwrap();
    let csp = page.header("content-security-policy").unwrap_or("");
    if !(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'sha256-") && page.header("x-frame-options") == Some("DENY")) {
        problems.push(format!("http: the page's security headers: {:?}", page.headers));
    }

    // --- Every dead letter, by message id, with its reason.
    let expected = b.dead.len();
    let mut got: HashMap<String, String> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while got.len() < expected && Instant::now() < deadline {
        for q in [&inbound, &replies, &payment] {
            for d in wait::drain(&ch, &Names::dead_letter_queue(q), 1000, Duration::from_millis(200)).await.unwrap() {
                let id = dead_letter_key(&d);
                let reason = wait::dead_letter_reason(&d);
                match b.dead.get(&id) {
                    None => problems.push(format!("an unexpected dead letter on {q}: {id} ({reason})")),
                    Some((queue, want, kind)) if (q.as_str(), reason.as_str()) != (queue.as_str(), *want) => {
                        problems.push(format!("{kind}: want a dead letter on {queue} ({want}), got one on {q} ({reason})"));
                    }
                    Some(_) => {}
                }
                got.insert(id, reason);
            }
        }
    }
    let mut missing: Vec<_> =
        b.dead.iter().filter(|(id, _)| !got.contains_key(*id)).map(|(_, (_, r, k))| format!("{k}: not dead-lettered ({r})")).collect();
    missing.sort();
    missing.dedup();
    problems.extend(missing);

    // --- The normal sagas, and the one with the dropped trace context.
    let hostile = normal.await.unwrap();
    let stalled = hostile.iter().filter(|(d, _)| d.is_none()).count();
    let wrong = hostile.iter().filter(|(d, ok)| d.is_some() && !ok).count();
    for (kind, id) in [("http: 135 KB traceparent", traced), ("http: the largest float in the input", Some(max_float))] {
        let status = match id {
            Some(id) => wait::settled(&env.pool, id, Duration::from_secs(30)).await.map(|st| st.status).ok(),
            None => None,
        };
        if status != Some(SagaStatus::Completed) {
            problems.push(format!("{kind}: the saga did not complete: {status:?}"));
        }
    }
    let r = http::request(&api, "GET", &format!("/sagas/{max_float}/history"), &[], b"").await.unwrap();
    if r.status != 200 {
        let body = String::from_utf8_lossy(&r.body);
        problems
            .push(format!("http: the largest float in the input: its history does not read back: {}", sagas::protocol::clip(&body, 200)));
    }

    // --- Nothing left anywhere: queues, outboxes.
    let mut left = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        left.clear();
        for q in
            [inbound.clone(), replies.clone(), payment.clone(), names.participant_queue("inventory"), names.participant_queue("shipping")]
        {
            let n = testkit::messages::queue_depth(&ch, &q).await.unwrap();
            if n > 0 {
                left.push(format!("{q}: {n}"));
            }
        }
        for table in ["sagaflow.outbox", "sagaflow_participant.outbox"] {
            let n: i64 =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"))).fetch_one(&env.pool).await.unwrap();
            if n > 0 {
                left.push(format!("{table}: {n}"));
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // --- No crash, no reconnect loop.
    let crashes = procs.iter_mut().map(|p| usize::from(!p.running())).sum::<usize>();
    let loops: usize = procs.iter().map(|p| p.logged().matches("reconnecting").count()).sum();
    let ratio = p99(&hostile) / p99(&clean);
    let dead_lettered = b.kinds.iter().filter(|(_, f)| matches!(f, Fate::DeadLetter(..))).count();
    println!(
        "hostile: kinds={} dead_lettered={dead_lettered} refused={refused} crashes={crashes} loops={loops} stalled={stalled} normal={} p99_ratio={ratio:.2}",
        b.kinds.len(),
        hostile.len() - stalled - wrong,
    );
    println!(
        "hostile: clean p99 {:.1} ms, beside hostile input {:.1} ms; {} dead letters by message id",
        p99(&clean),
        p99(&hostile),
        got.len()
    );
    let logs: Vec<String> = procs.iter().filter(|p| p.logged().contains("reconnecting")).map(|p| p.log.display().to_string()).collect();
    assert!(problems.is_empty(), "{} kinds not handled as they should be:\n{}", problems.len(), problems.join("\n"));
    assert_eq!(
        (crashes, loops, stalled, wrong),
        (0, 0, 0, 0),
        "crashes, reconnect loops, stalled and wrongly settled normal sagas; logs: {logs:?}"
    );
    assert!(left.is_empty(), "nothing is left in a queue or an outbox: {left:?}");
    assert!(b.kinds.len() >= 40, "kinds: {}", b.kinds.len());
    let _ = b.names;

    for p in procs {
        let _ = p.terminate().await;
    }
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

/// Run the node binary with `vars` and `args` until it exits (at most `within`): its exit code,
/// its stderr, and how long it took.
async fn run_node(args: &[&str], vars: &[(&str, String)], within: Duration) -> (Option<i32>, String, Duration) {
    let t0 = Instant::now();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagaflow-node"));
    cmd.args(args).env("NO_COLOR", "1").kill_on_drop(true);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    match tokio::time::timeout(within, cmd.output()).await {
        Ok(out) => {
            let out = out.unwrap();
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), t0.elapsed())
        }
        Err(_) => (None, format!("still running after {within:?}"), t0.elapsed()),
    }
}

/// The node's TCP connections to port 5672, from `ss`.
fn broker_connections(pid: u32) -> usize {
    let out = std::process::Command::new("ss").args(["-tnp", "state", "established", "( dport = :5672 )"]).output().expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&format!("pid={pid},"))).count()
}

/// Bad configuration stops a node at once with the cause named, no password reaches a log,
/// and scraping `/metrics` opens no connection per scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_at_start_and_secrets_stay_out_of_logs() {
    let env = TestEnv::start().await.unwrap();
    let secret = "hunter2-secret";
    let base = |db: &str| {
        vec![
            ("SAGAFLOW_AMQP_URL", env.amqp_url.clone()),
            ("SAGAFLOW_DATABASE_URL", db.to_owned()),
            ("SAGAFLOW_NAMESPACE", env.namespace.clone()),
            ("SAGAFLOW_API_ADDR", String::new()),
        ]
    };

    // No database at that address, and 2 s to find one: the node gives up after about 2 s
    // (not the pool's 30 s) and says why.
    let mut vars = base(&format!("postgres://postgres:{secret}@127.0.0.1:1/db?password={secret}"));
    vars.push(("SAGAFLOW_CONNECT_TIMEOUT_S", "2".into()));
    let (code, err, took) = run_node(&["serve"], &vars, Duration::from_secs(60)).await;
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("refused") && err.contains("connect_timeout_s 2"), "the cause is named: {err}");
    assert!(!err.contains(secret), "no password in the output: {err}");
    assert!(took < Duration::from_secs(20), "connect_timeout_s is honoured: {took:?}");

    // Malformed settings are refused before any connection is tried.
    for (k, v, says) in [
        ("SAGAFLOW_AMQP_URL", format!("amqp://guest:{secret}@127.0.0.1:5672/%2f?heartbeat=abc"), "amqp_url"),
        ("SAGAFLOW_AMQP_URL", "amqp://:5672/".into(), "names no host"),
        ("SAGAFLOW_API_TOKN", "0123456789abcdef0123".into(), "did you mean SAGAFLOW_API_TOKEN"),
        ("SAGAFLOW_API_TOKEN", "x".into(), "at least 16 characters"),
    ] {
        let mut vars = base(&env.database_url);
        vars.retain(|(name, _)| *name != k);
        vars.push((k, v));
        let (code, err, took) = run_node(&["serve"], &vars, Duration::from_secs(30)).await;
        assert_ne!(code, Some(0), "{k}: {err}");
        assert!(err.contains(says) && !err.contains(secret), "{k}: {err}");
        assert!(took < Duration::from_secs(10), "{k}: refused at start, not after retries: {took:?}");
    }

    // A participant that cannot reach its database logs where it tried, without the password.
    let vars = vec![
        ("SAGAFLOW_AMQP_URL".to_owned(), env.amqp_url.clone()),
        ("SAGAFLOW_DATABASE_URL".to_owned(), format!("postgres://postgres:{secret}@127.0.0.1:1/db")),
        ("SAGAFLOW_NAMESPACE".to_owned(), env.namespace.clone()),
    ];
    let p = Node::spawn_with(env!("CARGO_BIN_EXE_testkit-order-participant"), &["payment"], vars, "hostile-secret-participant").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.logged().contains("connecting to PostgreSQL at") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = p.logged();
    p.kill().await.unwrap();
    assert!(log.contains("connecting to PostgreSQL at postgres://postgres:***@127.0.0.1:1/db"), "{log}");
    assert!(!log.contains(secret), "{log}");

    // `/metrics` asks the broker on one connection kept between scrapes.
    let api = format!("127.0.0.1:{}", free_port());
    let mut vars = env.node_env("hostile-metrics");
    vars.retain(|(k, _)| k != "SAGAFLOW_API_ADDR");
    vars.push(("SAGAFLOW_API_ADDR".into(), api.clone()));
    let mut node = Node::spawn_with(env!("CARGO_BIN_EXE_sagaflow-node"), &["serve"], vars, "hostile-metrics").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http::request(&api, "GET", "/ready", &[], b"").await.is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline && node.running(), "the node did not come up: {}", node.logged());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let scrape = || async { http::request(&api, "GET", "/metrics", &[], b"").await.unwrap().status };
    assert_eq!(scrape().await, 200);
    let pid = node.pid().unwrap();
    let after_one = broker_connections(pid);
    for _ in 0..5 {
        assert_eq!(scrape().await, 200);
    }
    assert_eq!(broker_connections(pid), after_one, "five more scrapes opened no connection");
    assert!(node.terminate().await.unwrap(), "the node stopped cleanly");
    env.cleanup(&[]).await.unwrap();
}

/// Schemathesis (from PyPI, beside `SAGAFLOW_PYTHON`) generates requests for every operation of
/// docs/openapi.json, U+0000 included, against a live node: none gets a 5xx. Bounded (a fixed
/// number of examples per operation, a fixed seed, so a run is repeatable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_answers_schemathesis_without_a_server_error() {
    let env = TestEnv::start().await.unwrap();
    let node = env.orchestrator("st-node", testkit::orders::registry()).await.unwrap();
    let parts = testkit::orders::start_participants(&env, &env.amqp_url, &order_fulfilment::PARTICIPANTS, 100_000).await.unwrap();
    // A settled saga for the operations that take an id (a running one would hold `wait`).
    let id = node.engine().start(&testkit::orders::mixed("st", 1, 0), None).await.unwrap().saga_id;
    wait::settled(&env.pool, id, Duration::from_secs(30)).await.unwrap();

    let python =
        std::env::var("SAGAFLOW_PYTHON").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/ci-venv/bin/python").into());
    let st = std::path::Path::new(&python).with_file_name("schemathesis");
    let dir = std::env::temp_dir().join(format!("sagaflow-schemathesis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("schemathesis.toml");
    std::fs::write(&config, format!("[parameters]\n\"path.id\" = \"{id}\"\n")).unwrap();
    let out = tokio::process::Command::new(&st)
        .arg("--config-file")
        .arg(&config)
        .args(["run", concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json")])
        .args(["--url", &format!("http://{}", node.api_addr().unwrap())])
        .args(["--checks", "not_a_server_error", "--max-examples", "25", "--seed", "1", "--generation-allow-x00", "true"])
        .args(["--phases", "examples,coverage,fuzzing", "--request-timeout", "30", "--workers", "1"])
        .current_dir(&dir)
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("running {} (pip install schemathesis beside SAGAFLOW_PYTHON, as scripts/setup.sh does): {e}", st.display())
        });
    let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let cases = log.lines().find(|l| l.contains(" generated, ")).unwrap_or("").trim().to_owned();
    println!("schemathesis: {cases}");
    assert!(out.status.success() && cases.contains("passed") && !cases.contains("failed") && !cases.contains("errored"), "{log}");
    testkit::orders::stop_participants(parts).await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

/// Outbox rows that can never be published are not retried for ever: a command whose
/// properties would not fit in a frame is never sent (the broker would close the connection)
/// and its saga sees an `unpublishable` refusal and compensates; a row that does not decode is
/// dropped. The relay keeps working, and the connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_that_can_never_be_published_is_dropped_and_its_saga_told() {
    let env = TestEnv::start().await.unwrap();
    // No participants: the saga's first command waits in the inventory queue.
    let node = env.orchestrator("outbox-node", testkit::orders::registry()).await.unwrap();
    let id = node.engine().start(&testkit::orders::mixed("outbox", 1, 0), None).await.unwrap().saga_id;
    let names = env.names();
    let conn = env.amqp().await.unwrap();
    let ch = transport::confirm_channel(&conn).await.unwrap();
    let inventory = names.participant_queue("inventory");
    let cmd = wait::drain(&ch, &inventory, 1, Duration::from_secs(30)).await.unwrap().pop().expect("the first command");
    let mut big = transport::wire_from_delivery(&cmd, usize::MAX).unwrap();
    // A trace context no command can carry, as a saga started before starts were checked has.
    big.headers.insert(H_TRACEPARENT.into(), HeaderValue::Str("0".repeat(200_000)));

    // Straight into the outbox, as a decision would have written it.
    let insert =
        "INSERT INTO sagaflow.outbox (saga_id, exchange, routing_key, mandatory, envelope, body) VALUES ($1, $2, $3, true, $4, $5)";
    for (envelope, body) in
        [(serde_json::json!({"not": "an envelope"}), b"{}".to_vec()), (serde_json::to_value(&big).unwrap(), big.body.clone())]
    {
        sqlx::query(insert)
            .bind(id.0)
            .bind(names.commands_exchange())
            .bind("inventory")
            .bind(envelope)
            .bind(body)
            .execute(&env.pool)
            .await
            .unwrap();
    }
    sqlx::query("NOTIFY sagaflow_outbox").execute(&env.pool).await.unwrap();

    let st = wait::settled(&env.pool, id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(st.status, SagaStatus::Compensated, "{st:?}");
    assert_eq!(st.failure.as_ref().map(|f| f.code.as_str()), Some("unpublishable"), "{:?}", st.failure);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.outbox").fetch_one(&env.pool).await.unwrap();
    assert_eq!(left, 0, "both rows are gone");
    let messages = testkit::messages::queue_depth(&ch, &inventory).await.unwrap();
    assert_eq!(messages, 0, "the oversized command never reached the queue");

    // The same from a publisher's side: refused before it is sent, the channel still open.
    let results = transport::publish_batch(
        &ch,
        vec![("", &inventory, &big, true), ("", &inventory, &transport::wire_from_delivery(&cmd, usize::MAX).unwrap(), true)],
    )
    .await;
    assert!(matches!(results[0], Err(transport::TransportError::TooLarge { .. })), "{:?}", results[0]);
    assert!(results[1].is_ok(), "{:?}", results[1]);
    assert!(ch.status().connected(), "the channel is still open");
    node.shutdown().await.unwrap();
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}
