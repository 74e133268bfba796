//! The wire protocol's serialized forms are pinned by golden files in `tests/golden/`; the
//! decoders accept what the encoders produce and refuse bad input with a stable code.
//!
//! Regenerate the golden files after a deliberate protocol change with
//! `UPDATE_GOLDEN=1 cargo test -p sagas --test protocol`, and update docs/protocol.md with it.

use std::path::PathBuf;

use sagas::protocol::{
    DEFAULT_MAX_BODY_BYTES, EventDelivery, H_DEFINITION, H_IDEMPOTENCY_KEY, H_KIND, H_PROGRESS, H_SAGA_ID, H_STEP_NAME, HeaderValue,
    InboundReplyOrHeartbeat, LifecycleEvent, MAX_HEARTBEAT_BYTES, ReplyOutcome, SagaRef, TYPE_EVENT, TYPE_START, WireMessage,
    decode_command, decode_event, decode_reply, decode_reply_or_heartbeat, decode_start, encode_command, encode_heartbeat,
    encode_lifecycle, encode_reply,
};
use sagas::{CommandKind, MessageId, OutgoingCommand, SagaEvent, SagaId, StepIndex, StopCode, Timestamp};
use serde_json::{Value, json};

const NOW: Timestamp = Timestamp(1_767_225_600_000);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn saga_id() -> SagaId {
    "01936f3e-8c2a-7b4d-9e1f-3a5b7c9d1e2f".parse().unwrap()
}

fn saga() -> SagaRef {
    SagaRef { saga_id: saga_id(), definition: "order_fulfilment".into(), version: 2 }
}

fn command(kind: CommandKind, attempt: u32) -> OutgoingCommand {
    let step = StepIndex(1);
    OutgoingCommand {
        message_id: MessageId::for_command(saga_id(), step, kind, attempt),
        step,
        step_name: "charge_payment".into(),
        kind,
        attempt,
        participant: "payment".into(),
        command: match kind {
            CommandKind::Invoke => "payment.charge".into(),
            CommandKind::Compensate => "payment.refund".into(),
        },
        body: json!({"order_id": "o-42", "amount_cents": 1999}),
        heartbeat_ms: None,
        progress: None,
    }
}

fn golden(name: &str, actual: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.json"));
    let rendered = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &rendered).unwrap();
        return;
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create it)", path.display()));
    assert_eq!(
        rendered, expected,
        "{name} changed on the wire; if that is deliberate, run with UPDATE_GOLDEN=1 and update docs/protocol.md"
    );
}

#[test]
fn command_and_compensation_envelopes_are_pinned() {
    let msg = encode_command(&saga(), &command(CommandKind::Invoke, 1), "sagaflow.replies", Some(TRACEPARENT), NOW);
    golden("command", &msg.to_json());
    let msg = encode_command(&saga(), &command(CommandKind::Compensate, 3), "sagaflow.replies", None, NOW);
    golden("compensation", &msg.to_json());
}

#[test]
fn a_command_decodes_to_what_was_sent() {
    let sent = command(CommandKind::Invoke, 2);
    let msg = encode_command(&saga(), &sent, "sagaflow.replies", Some(TRACEPARENT), NOW);
    let got = decode_command(&msg, DEFAULT_MAX_BODY_BYTES).unwrap();
    assert_eq!(got.message_id, sent.message_id);
    assert_eq!(got.command, "payment.charge");
    assert_eq!(got.saga, saga());
    assert_eq!((got.step, got.kind, got.attempt), (sent.step, sent.kind, 2));
    assert_eq!(got.step_name, "charge_payment");
    assert_eq!(got.reply_to, "sagaflow.replies");
    assert_eq!(got.traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(got.body, sent.body);
}

#[test]
fn reply_envelopes_are_pinned_and_round_trip() {
    let cmd = decode_command(
        &encode_command(&saga(), &command(CommandKind::Invoke, 1), "sagaflow.replies", Some(TRACEPARENT), NOW),
        DEFAULT_MAX_BODY_BYTES,
    )
    .unwrap();
    let outcomes = [
        ("reply_success", ReplyOutcome::Success { output: json!({"charge_id": "ch_1"}) }),
        ("reply_rejected", ReplyOutcome::Rejected { code: "card_declined".into(), message: "the card was declined".into() }),
        ("reply_transient_failure", ReplyOutcome::TransientFailure { message: "payment gateway timed out".into() }),
    ];
    for (name, outcome) in outcomes {
        let msg = encode_reply(&cmd, &outcome, NOW);
        golden(name, &msg.to_json());
        let got = decode_reply(&msg, DEFAULT_MAX_BODY_BYTES).unwrap();
        assert_eq!(got.message_id, MessageId::for_reply(cmd.message_id));
        assert_eq!(got.saga_id, saga_id());
        assert_eq!(got.reply.in_reply_to, cmd.message_id);
        assert_eq!((got.reply.step, got.reply.kind, got.reply.attempt), (StepIndex(1), CommandKind::Invoke, 1));
        assert_eq!(got.reply.outcome, outcome);
        assert_eq!(got.traceparent.as_deref(), Some(TRACEPARENT));
    }
}

#[test]
fn a_long_step_s_command_carries_its_heartbeat_timeout_and_the_last_progress() {
    let sent = OutgoingCommand { heartbeat_ms: Some(5_000), progress: Some(json!({"rows": 500})), ..command(CommandKind::Invoke, 2) };
    let msg = encode_command(&saga(), &sent, "sagaflow.replies.1", Some(TRACEPARENT), NOW);
    golden("command_with_progress", &msg.to_json());
    let got = decode_command(&msg, DEFAULT_MAX_BODY_BYTES).unwrap();
    assert_eq!((got.heartbeat_ms, got.progress), (Some(5_000), Some(json!({"rows": 500}))));
    // A first attempt of a step without a heartbeat timeout carries neither.
    let plain = decode_command(&encode_command(&saga(), &command(CommandKind::Invoke, 1), "r", None, NOW), DEFAULT_MAX_BODY_BYTES).unwrap();
    assert_eq!((plain.heartbeat_ms, plain.progress), (None, None));
    // Progress that is not JSON is refused like any bad header.
    let mut bad = msg.clone();
    bad.headers.insert(H_PROGRESS.into(), HeaderValue::Str("{rows".into()));
    assert_eq!(decode_command(&bad, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "invalid_headers");
}

#[test]
fn heartbeats_are_pinned_round_trip_and_are_refused_when_too_large() {
    let cmd = decode_command(
        &encode_command(&saga(), &command(CommandKind::Invoke, 1), "sagaflow.replies", Some(TRACEPARENT), NOW),
        DEFAULT_MAX_BODY_BYTES,
    )
    .unwrap();
    let id: MessageId = "5b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d".parse().unwrap();
    let msg = encode_heartbeat(&cmd, &json!({"rows": 500, "of": 2000}), id, NOW);
    golden("heartbeat", &msg.to_json());
    let InboundReplyOrHeartbeat::Heartbeat(saga, h) = decode_reply_or_heartbeat(&msg, DEFAULT_MAX_BODY_BYTES).unwrap() else {
        panic!("a heartbeat decodes as one")
    };
    assert_eq!(saga, saga_id());
    assert_eq!((h.in_reply_to, h.step, h.kind, h.attempt), (cmd.message_id, StepIndex(1), CommandKind::Invoke, 1));
    assert_eq!(h.details, json!({"rows": 500, "of": 2000}));
    // A reply on the same queue still decodes as a reply.
    let reply = encode_reply(&cmd, &ReplyOutcome::Success { output: Value::Null }, NOW);
    assert!(matches!(decode_reply_or_heartbeat(&reply, DEFAULT_MAX_BODY_BYTES), Ok(InboundReplyOrHeartbeat::Reply(_))));
    // Details over the limit, U+0000, another field in the body, or no command id: refused.
    let big = encode_heartbeat(&cmd, &json!("x".repeat(MAX_HEARTBEAT_BYTES)), id, NOW);
    assert_eq!(decode_reply_or_heartbeat(&big, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "oversized");
    let nul = encode_heartbeat(&cmd, &json!("a\u{0}b"), id, NOW);
    assert_eq!(decode_reply_or_heartbeat(&nul, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "malformed_body");
    let mut extra = msg.clone();
    extra.body = br#"{"details": 1, "done": true}"#.to_vec();
    assert_eq!(decode_reply_or_heartbeat(&extra, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "malformed_body");
    let mut orphan = msg.clone();
    orphan.correlation_id = None;
    assert_eq!(decode_reply_or_heartbeat(&orphan, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "invalid_properties");
}

#[test]
fn a_reply_id_is_the_same_every_time_it_is_sent() {
    let cmd =
        decode_command(&encode_command(&saga(), &command(CommandKind::Compensate, 1), "r", None, NOW), DEFAULT_MAX_BODY_BYTES).unwrap();
    let a = encode_reply(&cmd, &ReplyOutcome::Success { output: Value::Null }, NOW);
    let b = encode_reply(&cmd, &ReplyOutcome::Success { output: Value::Null }, Timestamp(NOW.0 + 60_000));
    assert_eq!(a.message_id, b.message_id);
}

fn start_message(body: Value, key: Option<&str>) -> WireMessage {
    let mut msg = WireMessage {
        message_id: Some("7d0c1f3a-2b4e-4c6d-8e9f-0a1b2c3d4e5f".into()),
        kind: Some(TYPE_START.into()),
        content_type: Some("application/json".into()),
        body: serde_json::to_vec(&body).unwrap(),
        ..WireMessage::default()
    };
    if let Some(k) = key {
        msg.headers.insert(H_IDEMPOTENCY_KEY.into(), HeaderValue::Str(k.into()));
    }
    msg
}

#[test]
fn start_and_event_envelopes_are_pinned() {
    let start = start_message(
        json!({"definition": "order_fulfilment", "input": {"order_id": "o-42", "sku": "sku-1", "quantity": 2}}),
        Some("order-o-42"),
    );
    golden("start", &start.to_json());
    let req = decode_start(&start, DEFAULT_MAX_BODY_BYTES).unwrap();
    assert_eq!(req.definition, "order_fulfilment");
    assert_eq!(req.version, None);
    assert_eq!(req.idempotency_key.as_deref(), Some("order-o-42"));

    let delivery = EventDelivery { saga_id: saga_id(), event: "card_updated".into(), payload: json!({"card": "tok_visa"}) };
    let event = WireMessage {
        message_id: Some("0f1e2d3c-4b5a-4968-8776-655443322110".into()),
        kind: Some(TYPE_EVENT.into()),
        content_type: Some("application/json".into()),
        body: serde_json::to_vec(&delivery).unwrap(),
        ..WireMessage::default()
    };
    golden("event", &event.to_json());
    assert_eq!(decode_event(&event, DEFAULT_MAX_BODY_BYTES).unwrap(), delivery);
}

#[test]
fn lifecycle_envelopes_are_pinned() {
    let events = [
        ("lifecycle_completed", SagaEvent::Completed),
        (
            "lifecycle_step_failed",
            SagaEvent::StepFailed { step: "ship".into(), code: "no_carrier".into(), message: "no carrier for the address".into() },
        ),
        (
            "lifecycle_stopped",
            SagaEvent::Stopped { code: StopCode::CompensationFailed, message: "refund gave up after 10 attempts".into() },
        ),
    ];
    for (name, event) in events {
        let ev = LifecycleEvent { saga_id: saga_id(), definition: "order_fulfilment".into(), version: 2, at: NOW, event };
        let msg = encode_lifecycle(&ev, "018f0000-0000-7000-8000-000000000007".parse::<MessageId>().unwrap());
        golden(name, &msg.to_json());
        let back: LifecycleEvent = serde_json::from_slice(&msg.body).unwrap();
        assert_eq!(back, ev);
    }
}

#[test]
fn bad_commands_are_refused_with_a_stable_code() {
    let good = encode_command(&saga(), &command(CommandKind::Invoke, 1), "sagaflow.replies", None, NOW);
    type Mutation = Box<dyn Fn(&mut WireMessage)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        ("oversized", Box::new(|m| m.body = vec![b' '; DEFAULT_MAX_BODY_BYTES + 1]), "oversized"),
        ("no message id", Box::new(|m| m.message_id = None), "invalid_properties"),
        ("message id not a uuid", Box::new(|m| m.message_id = Some("42".into())), "invalid_properties"),
        ("no type", Box::new(|m| m.kind = None), "invalid_properties"),
        ("no reply_to", Box::new(|m| m.reply_to = None), "invalid_properties"),
        ("no saga id", Box::new(|m| drop(m.headers.remove(H_SAGA_ID))), "invalid_headers"),
        ("saga id is a number", Box::new(|m| drop(m.headers.insert(H_SAGA_ID.into(), HeaderValue::Int(1)))), "invalid_headers"),
        ("unknown kind", Box::new(|m| drop(m.headers.insert(H_KIND.into(), HeaderValue::Str("undo".into())))), "invalid_headers"),
        ("body not json", Box::new(|m| m.body = b"{not json".to_vec()), "malformed_body"),
        ("random bytes", Box::new(|m| m.body = vec![0xff, 0x00, 0x13, 0x37]), "malformed_body"),
    ];
    for (what, mutate, code) in cases {
        let mut m = good.clone();
        mutate(&mut m);
        let err = decode_command(&m, DEFAULT_MAX_BODY_BYTES).expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err}");
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn bad_replies_starts_and_events_are_refused() {
    let cmd = decode_command(&encode_command(&saga(), &command(CommandKind::Invoke, 1), "r", None, NOW), DEFAULT_MAX_BODY_BYTES).unwrap();
    let mut reply = encode_reply(&cmd, &ReplyOutcome::Success { output: Value::Null }, NOW);
    reply.body = br#"{"type":"maybe"}"#.to_vec();
    assert_eq!(decode_reply(&reply, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "malformed_body");
    reply.kind = Some("payment.charge".into());
    assert_eq!(decode_reply(&reply, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "unknown_type");
    reply.correlation_id = None;
    reply.kind = Some("sagaflow.reply".into());
    assert_eq!(decode_reply(&reply, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "invalid_properties");

    let unknown_field = start_message(json!({"definition": "order_fulfilment", "input": {}, "urgency": 1}), None);
    assert_eq!(decode_start(&unknown_field, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "malformed_body");
    let priority = start_message(json!({"definition": "order_fulfilment", "input": {}, "priority": 7}), None);
    assert_eq!(decode_start(&priority, DEFAULT_MAX_BODY_BYTES).unwrap().priority, Some(7));
    let too_high = start_message(json!({"definition": "order_fulfilment", "input": {}, "priority": 1_u64 << 31}), None);
    assert_eq!(decode_start(&too_high, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "malformed_body");
    let empty = start_message(json!({"definition": "", "input": {}}), None);
    assert_eq!(decode_start(&empty, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "malformed_body");
    let small_limit = start_message(json!({"definition": "d", "input": {"pad": "x".repeat(100)}}), None);
    assert_eq!(decode_start(&small_limit, 64).unwrap_err().code(), "oversized");

    let mut event = start_message(json!({"saga_id": "nope", "event": "e"}), None);
    event.kind = Some(TYPE_EVENT.into());
    assert_eq!(decode_event(&event, DEFAULT_MAX_BODY_BYTES).unwrap_err().code(), "malformed_body");
}

/// What PostgreSQL and RabbitMQ cannot carry is refused by the decoders, before anything is
/// written or republished, and a refusal never repeats a large value whole.
#[test]
fn what_postgresql_or_rabbitmq_cannot_carry_is_refused_and_never_quoted_whole() {
    let good = encode_command(&saga(), &command(CommandKind::Invoke, 1), "sagaflow.replies", Some(TRACEPARENT), NOW);
    let cmd = decode_command(&good, DEFAULT_MAX_BODY_BYTES).unwrap();
    let reply = encode_reply(&cmd, &ReplyOutcome::Success { output: Value::Null }, NOW);
    type Mutation = Box<dyn Fn(&mut WireMessage)>;
    let huge = "k".repeat(70_000);
    let cases: Vec<(&str, Mutation, &str)> = vec![
        ("a 70 KB kind", Box::new(move |m| drop(m.headers.insert(H_KIND.into(), HeaderValue::Str(huge.clone())))), "invalid_headers"),
        (
            "NUL in a step name",
            Box::new(|m| drop(m.headers.insert(H_STEP_NAME.into(), HeaderValue::Str("a\0b".into())))),
            "invalid_headers",
        ),
        (
            "NUL in the definition",
            Box::new(|m| drop(m.headers.insert(H_DEFINITION.into(), HeaderValue::Str("\0".into())))),
            "invalid_headers",
        ),
        ("NUL in reply_to", Box::new(|m| m.reply_to = Some("q\0".into())), "invalid_properties"),
        ("NUL in the type", Box::new(|m| m.kind = Some("sagaflow.reply\0".into())), "invalid_properties"),
        ("NUL in the body", Box::new(|m| m.body = br#"{"type":"success","output":{"a":"x\u0000y"}}"#.to_vec()), "malformed_body"),
        ("NUL in a key", Box::new(|m| m.body = br#"{"type":"success","output":{"\u0000":1}}"#.to_vec()), "malformed_body"),
    ];
    for (what, mutate, code) in cases {
        let mut m = reply.clone();
        mutate(&mut m);
        let err = decode_reply(&m, DEFAULT_MAX_BODY_BYTES).expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err}");
        assert!(err.to_string().len() < 400, "{what}: the refusal quotes at most a little: {} bytes", err.to_string().len());
        let mut c = good.clone();
        mutate(&mut c);
        c.kind = c.kind.filter(|k| k.contains('\0')).or(Some("payment.charge".into()));
        if c.body.starts_with(br#"{"type""#) {
            c.body = br#"{"amount":"\u0000"}"#.to_vec();
        }
        assert_eq!(decode_command(&c, DEFAULT_MAX_BODY_BYTES).expect_err(what).code(), code, "command: {what}");
    }
    // An escaped backslash before `u0000` is text, not NUL.
    let mut text = reply.clone();
    text.body = br#"{"type":"success","output":"C:\\u0000"}"#.to_vec();
    decode_reply(&text, DEFAULT_MAX_BODY_BYTES).unwrap();
}

#[test]
fn a_malformed_traceparent_is_dropped_not_carried() {
    let cmd = command(CommandKind::Invoke, 1);
    for bad in [
        "x".repeat(135_000),
        "00-0000000000000000000000000000000-00f067aa0ba902b7-01".into(),
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".into(),
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01".into(),
    ] {
        let mut m = encode_command(&saga(), &cmd, "r", Some(TRACEPARENT), NOW);
        m.headers.insert("traceparent".into(), HeaderValue::Str(bad.clone()));
        let got = decode_command(&m, DEFAULT_MAX_BODY_BYTES);
        // Too long to be a protocol header at all, or well-formed but not a valid trace context.
        match got {
            Ok(c) => assert_eq!(c.traceparent, None, "{bad:.60}"),
            Err(e) => assert_eq!(e.code(), "invalid_headers", "{bad:.60}"),
        }
    }
    assert!(sagas::protocol::valid_traceparent(TRACEPARENT));
}

#[test]
fn starts_and_events_are_checked_for_what_postgresql_can_index_and_store() {
    let start = |body: Value, key: Option<&str>| decode_start(&start_message(body, key), DEFAULT_MAX_BODY_BYTES);
    let long_key = "k".repeat(sagas::protocol::MAX_IDEMPOTENCY_KEY_BYTES + 1);
    assert_eq!(start(json!({"definition": "d", "input": {}}), Some(&long_key)).unwrap_err().code(), "malformed_body");
    assert_eq!(start(json!({"definition": "d", "input": {}, "idempotency_key": long_key}), None).unwrap_err().code(), "malformed_body");
    assert_eq!(start(json!({"definition": "d", "input": {}}), Some("a\0b")).unwrap_err().code(), "invalid_headers");
    assert_eq!(start(json!({"definition": "d", "input": {"note": "\u{0}"}}), None).unwrap_err().code(), "malformed_body");
    assert_eq!(start(json!({"definition": "d".repeat(300), "input": {}}), None).unwrap_err().code(), "malformed_body");
    let ok_key = "k".repeat(sagas::protocol::MAX_IDEMPOTENCY_KEY_BYTES);
    start(json!({"definition": "d", "input": {}}), Some(&ok_key)).unwrap();

    let event = |name: &str| {
        let mut m = start_message(json!({"saga_id": saga_id(), "event": name}), None);
        m.kind = Some(TYPE_EVENT.into());
        decode_event(&m, DEFAULT_MAX_BODY_BYTES)
    };
    for bad in ["", "a\0", &"e".repeat(300)] {
        assert_eq!(event(bad).unwrap_err().code(), "malformed_body", "{bad:.20}");
    }
    event("approved").unwrap();
}
