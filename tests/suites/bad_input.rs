//! Bad input: malformed JSON, wrong types, unknown saga, step, definition and version, oversized
//! bodies, replies for sagas that do not exist, random bytes. Each one is dead-lettered with its
//! reason, no node or participant stops, and good sagas running at the same time are unaffected.

use std::time::Duration;

use sagaflow_amqp::transport::{self, Names};
use sagas::protocol::{DEFAULT_MAX_BODY_BYTES, HeaderValue, ReplyOutcome, StartRequest, TYPE_EVENT, WireMessage, encode_reply};
use sagas::{SagaId, SagaStatus, Timestamp};
use serde_json::json;
use testkit::messages::start_message as start_msg;
use testkit::orders;
use testkit::{TestEnv, wait};

fn order(i: u32) -> StartRequest {
    testkit::orders::mixed("good", i, 5)
}

fn json_start(v: serde_json::Value) -> WireMessage {
    start_msg(&serde_json::to_vec(&v).unwrap())
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_message_is_dead_lettered_with_its_reason_while_good_sagas_complete() {
    let env = TestEnv::start().await.unwrap();
    let node = env.orchestrator("n1", orders::registry()).await.unwrap();
    let parts = orders::start_participants(&env, &env.amqp_url, &order_fulfilment::PARTICIPANTS, 10_000).await.unwrap();
    let names = env.names();
    let conn = env.amqp().await.unwrap();
    let ch = transport::confirm_channel(&conn).await.unwrap();

    // Good sagas, started before and after the bad input.
    let mut good = Vec::new();
    for i in 1..=25 {
        good.push(node.engine().start(&order(i), None).await.unwrap().saga_id);
    }
    let real = good[0];
    wait::settled(&env.pool, real, Duration::from_secs(30)).await.unwrap();

    // To the inbound queue.
    let oversized = json_start(json!({"definition": "order_fulfilment", "input": {"pad": "x".repeat(DEFAULT_MAX_BODY_BYTES)}}));
    let inbound = [
        (start_msg(b"{\"definition\": \"order_fulfilment\", \"input\": "), "malformed_body"),
        (json_start(json!({"definition": "order_fulfilment", "input": {"order_id": 42, "quantity": "two"}})), "invalid_input"),
        (json_start(json!({"definition": "no_such_saga", "input": {}})), "unknown_definition"),
        (json_start(json!({"definition": "order_fulfilment", "version": 99, "input": {}})), "unknown_definition"),
        (json_start(json!({"definition": 7, "input": {}})), "malformed_body"),
        (start_msg(&random_bytes(512, 7)), "malformed_body"),
        (oversized, "oversized"),
        (WireMessage { kind: Some("sagaflow.teleport".into()), ..json_start(json!({})) }, "unknown_type"),
        (WireMessage { kind: None, ..json_start(json!({})) }, "invalid_properties"),
        (
            WireMessage { kind: Some(TYPE_EVENT.into()), ..json_start(json!({"saga_id": SagaId::new(), "event": "approved"})) },
            "unknown_saga",
        ),
        (
            WireMessage { kind: Some(TYPE_EVENT.into()), ..json_start(json!({"saga_id": "not-a-uuid", "event": "approved"})) },
            "malformed_body",
        ),
    ];
    for (m, _) in &inbound {
        transport::publish_confirmed(&ch, "", &names.inbound_queue(), m, true).await.unwrap();
    }

    // To the replies queue.
    let cmd = |saga: SagaId, step: u32| testkit::messages::charge_command(saga, step, &names.replies_queue());
    let ok = ReplyOutcome::Success { output: json!(null) };
    let reply = |saga, step| encode_reply(&cmd(saga, step), &ok, Timestamp(0));
    let mut wrong_header = reply(real, 1);
    wrong_header.headers.insert("x-saga-attempt".into(), HeaderValue::Str("first".into()));
    let replies = [
        (reply(SagaId::new(), 1), "unknown_saga"),
        (reply(real, 42), "unknown_step"),
        (WireMessage { body: b"{\"type\": \"success\"".to_vec(), ..reply(real, 1) }, "malformed_body"),
        (WireMessage { body: random_bytes(256, 11), ..reply(real, 1) }, "malformed_body"),
        (WireMessage { body: vec![b' '; DEFAULT_MAX_BODY_BYTES + 1], ..reply(real, 1) }, "oversized"),
        (wrong_header, "invalid_headers"),
        (WireMessage { correlation_id: Some("nope".into()), ..reply(real, 1) }, "invalid_properties"),
    ];
    for (m, _) in &replies {
        transport::publish_confirmed(&ch, "", &names.replies_queue(), m, true).await.unwrap();
    }

    // To a participant's queue.
    let mut unknown_cmd = reply(real, 1);
    unknown_cmd.kind = Some("payment.launder".into());
    unknown_cmd.reply_to = Some(names.replies_queue());
    let to_payment = [
        (WireMessage { body: random_bytes(64, 3), reply_to: Some(names.replies_queue()), ..reply(real, 1) }, "malformed_body"),
        (unknown_cmd, "unknown_command"),
    ];
    for (m, _) in &to_payment {
        transport::publish_confirmed(&ch, &names.commands_exchange(), "payment", m, true).await.unwrap();
    }

    for i in 26..=50 {
        good.push(node.engine().start(&order(i), None).await.unwrap().saga_id);
    }
    let states = wait::all_settled(&env.pool, &good, Duration::from_secs(60)).await.unwrap();
    for (i, st) in states.iter().enumerate() {
        let expected = if (i + 1) % 5 == 0 { SagaStatus::Compensated } else { SagaStatus::Completed };
        assert_eq!(st.status, expected, "good saga {} was disturbed", i + 1);
    }

    let check = |queue: String, sent: Vec<&'static str>| {
        let ch = ch.clone();
        async move {
            let mut want: Vec<String> = sent.iter().map(|s| (*s).to_owned()).collect();
            want.sort();
            // Ask for one more than was sent, so an extra dead letter would show (waits 4 s).
            let got =
                wait::dead_letter_reasons(&ch, &Names::dead_letter_queue(&queue), want.len() + 1, Duration::from_secs(4)).await.unwrap();
            assert_eq!(got, want, "dead letters of {queue}");
            got.len()
        }
    };
    let mut dead = check(names.inbound_queue(), inbound.iter().map(|(_, r)| *r).collect()).await;
    dead += check(names.replies_queue(), replies.iter().map(|(_, r)| *r).collect()).await;
    dead += check(names.participant_queue("payment"), to_payment.iter().map(|(_, r)| *r).collect()).await;
    let sent = inbound.len() + replies.len() + to_payment.len();

    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.instances").fetch_one(&env.pool).await.unwrap();
    assert_eq!(total, 50, "no bad message started a saga");
    // Everyone is still up: one more saga goes through.
    let last = node.engine().start(&order(51), None).await.unwrap().saga_id;
    assert_eq!(wait::settled(&env.pool, last, Duration::from_secs(30)).await.unwrap().status, SagaStatus::Completed);
    let line =
        format!("bad-input: messages={sent} dead_lettered={dead} with_reason={dead} good_sagas={} unaffected={}\n", good.len(), good.len());
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());

    conn.close(200, "done".into()).await.unwrap();
    orders::stop_participants(parts).await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}
