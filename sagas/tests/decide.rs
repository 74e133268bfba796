//! Given/when/then tests of `decide`: every saga semantic, without a broker.

mod common;

use std::time::Duration;

use common::*;
use sagas::testing::SagaTest;
use sagas::{
    Command, CommandKind, Effect, Heartbeat, IgnoreReason, Input, InputOutcome, MessageId, OnDeadline, OnTimeout, OperatorCommand, Reply,
    ReplyOutcome, SagaDefinition, SagaEvent, SagaState, SagaStatus, StepIndex, StepStatus, StopCode, TimerKey, Timestamp, decide,
};
use serde_json::{Value, json};

fn ignored(o: &InputOutcome, reason: IgnoreReason) -> bool {
    matches!(o, InputOutcome::Ignored { reason: r, .. } if *r == reason)
}

#[test]
fn happy_path_runs_steps_in_order_and_stores_outputs() {
    let def = order_saga();
    let mut t = SagaTest::start(&def, &order()).unwrap();
    assert_eq!(t.invocations_sent(), vec!["reserve"]);
    assert_eq!(t.sent()[0].command, "inventory.reserve");
    assert_eq!(t.sent()[0].participant, "inventory");
    assert_eq!(t.sent()[0].body, json!({"order": 42}));

    assert_eq!(t.succeed("reserve", json!({"reservation": "r-1"})), InputOutcome::Applied);
    assert_eq!(t.succeed("charge", json!({"charge": "c-1"})), InputOutcome::Applied);
    assert_eq!(t.sent()[1].body, json!({"amount": 1999}));
    assert_eq!(t.succeed("ship", Value::Null), InputOutcome::Applied);

    assert_eq!(t.status(), SagaStatus::Completed);
    assert_eq!(t.invocations_sent(), vec!["reserve", "charge", "ship"]);
    let data = def.decode_data(&t.state().data).unwrap();
    assert_eq!(data.reservation.as_deref(), Some("r-1"));
    assert_eq!(data.charge.as_deref(), Some("c-1"));
    assert!(t.compensations_sent().is_empty());
    assert_eq!(t.events().first(), Some(&SagaEvent::Started));
    assert_eq!(t.events().last(), Some(&SagaEvent::Completed));
    assert!(t.timers().is_empty(), "no timer outlives the saga: {:?}", t.timers());
}

#[test]
fn failure_at_step_three_compensates_two_then_one_with_their_outputs() {
    let def = order_saga();
    let mut t = SagaTest::start(&def, &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    t.succeed("charge", json!({"charge": "c-1"}));
    t.reject("ship", "no_address");

    assert_eq!(t.status(), SagaStatus::Compensating);
    assert_eq!(t.state().failure.as_ref().unwrap().code, "no_address");
    assert_eq!(t.compensations_sent(), vec!["charge"]);
    let refund = t.sent().last().unwrap();
    assert_eq!((refund.command.as_str(), &refund.body), ("payment.refund", &json!({"charge": "c-1"})));

    t.succeed_compensation("charge");
    assert_eq!(t.compensations_sent(), vec!["charge", "reserve"]);
    assert_eq!(t.sent().last().unwrap().body, json!({"reservation": "r-1"}));
    t.succeed_compensation("reserve");

    assert_eq!(t.status(), SagaStatus::Compensated);
    assert_eq!(t.step_status("ship"), StepStatus::Failed);
    assert_eq!(t.step_status("charge"), StepStatus::Compensated);
    assert_eq!(t.step_status("reserve"), StepStatus::Compensated);
    assert_eq!(t.events().last(), Some(&SagaEvent::Compensated));
}

#[test]
fn first_step_rejected_compensates_nothing() {
    let mut t = SagaTest::start(&order_saga(), &order()).unwrap();
    t.reject("reserve", "out_of_stock");
    assert_eq!(t.status(), SagaStatus::Compensated);
    assert!(t.compensations_sent().is_empty());
}

#[test]
fn transient_failure_is_retried_with_backoff_then_succeeds() {
    let mut t = SagaTest::start(&order_saga(), &order()).unwrap();
    t.fail_transiently("reserve");
    assert_eq!(t.step_status("reserve"), StepStatus::RetryScheduled);
    let (key, due) = t.timers()[0].clone();
    assert_eq!(key, TimerKey::Retry { step: StepIndex(0), kind: CommandKind::Invoke, attempt: 2 });
    assert_eq!(due, t.now().plus_ms(100));

    assert!(t.advance(99).is_empty(), "nothing is due before the backoff");
    assert_eq!(t.advance(1), vec![InputOutcome::Applied]);
    assert_eq!(t.invocations_sent(), vec!["reserve", "reserve"]);
    assert_ne!(t.sent()[0].message_id, t.sent()[1].message_id, "each attempt has its own id");

    t.fail_transiently("reserve");
    assert_eq!(t.timers()[0].1, t.now().plus_ms(200), "the delay doubles");
    t.advance(200);
    t.succeed("reserve", json!({"reservation": "r-1"}));
    assert_eq!(t.step_status("reserve"), StepStatus::Completed);
    assert_eq!(t.state().steps[0].attempts, 3);
    assert_eq!(t.invocations_sent(), vec!["reserve", "reserve", "reserve", "charge"]);
}

#[test]
fn spent_retries_fail_the_step_and_compensate_the_earlier_ones() {
    let mut t = SagaTest::start(&order_saga(), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    for _ in 0..3 {
        t.fail_transiently("charge");
        t.advance(10_000);
    }
    assert_eq!(t.invocations_sent().iter().filter(|s| **s == "charge").count(), 3, "max_attempts is 3");
    assert_eq!(t.step_status("charge"), StepStatus::Failed);
    assert_eq!(t.state().failure.as_ref().unwrap().code, "retries_exhausted");
    assert_eq!(t.compensations_sent(), vec!["reserve"], "a step that never succeeded is not compensated");
}

#[test]
fn timeout_with_fail_compensates_including_the_step_that_may_have_run() {
    let mut t = SagaTest::start(&order_saga_with_timeout(OnTimeout::Fail), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    assert!(t.timers().iter().any(|(k, _)| matches!(k, TimerKey::StepTimeout { .. })));
    t.advance(4_999);
    assert_eq!(t.status(), SagaStatus::Running);
    t.advance(1);
    assert_eq!(t.step_status("charge"), StepStatus::Compensating);
    assert_eq!(t.state().failure.as_ref().unwrap().code, "step_timed_out");
    t.succeed_compensation("charge");
    t.succeed_compensation("reserve");
    assert_eq!(t.compensations_sent(), vec!["charge", "reserve"]);
    assert_eq!(t.status(), SagaStatus::Compensated);

    // The late reply of the timed-out attempt changes nothing.
    let late = t.reply_to("charge", CommandKind::Invoke, ReplyOutcome::Success { output: json!({"charge": "c-late"}) });
    let before = t.state().clone();
    let tr = t.apply(&Input::Reply(late)).unwrap();
    assert!(ignored(&tr.outcome, IgnoreReason::Duplicate));
    assert_eq!(tr.state, before);
    assert!(tr.effects.is_empty());
}

#[test]
fn timeout_with_retry_resends_and_a_late_success_of_the_first_attempt_settles_the_step() {
    let mut t = SagaTest::start(&order_saga_with_timeout(OnTimeout::Retry), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    let first = t.reply_to("charge", CommandKind::Invoke, ReplyOutcome::Success { output: json!({"charge": "c-1"}) });
    t.advance(5_000); // timeout → retry scheduled
    assert_eq!(t.step_status("charge"), StepStatus::RetryScheduled);
    t.advance(100); // retry sent
    assert_eq!(t.invocations_sent(), vec!["reserve", "charge", "charge"]);
    assert_eq!(t.apply(&Input::Reply(first)).unwrap().outcome, InputOutcome::Applied);
    assert_eq!(t.step_status("charge"), StepStatus::Completed);
    assert_eq!(t.invocations_sent().last(), Some(&"ship"));
    // the second attempt's (deduplicated) success is then a duplicate
    assert!(ignored(&t.succeed("charge", json!({"charge": "c-1"})), IgnoreReason::Duplicate));
    // and no timer of the charge step is left
    assert!(
        t.timers()
            .iter()
            .all(|(k, _)| !matches!(k, TimerKey::StepTimeout { step: StepIndex(1), .. } | TimerKey::Retry { step: StepIndex(1), .. }))
    );
}

fn charge_timers(t: &SagaTest) -> Vec<TimerKey> {
    let mut keys: Vec<TimerKey> = t.timers().into_iter().map(|(k, _)| k).filter(|k| k.step() == Some(StepIndex(1))).collect();
    keys.sort_by_key(TimerKey::id);
    keys
}

#[test]
fn heartbeats_keep_a_long_step_alive_past_its_heartbeat_timeout() {
    let mut t = SagaTest::start(&order_saga_with_heartbeat(None), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    assert_eq!(charge_timers(&t), vec![TimerKey::Heartbeat { step: StepIndex(1), attempt: 1 }]);
    // 30 s of work, a heartbeat every 2 s: the 5 s heartbeat timeout never passes.
    for n in 1..=15 {
        t.advance(2_000);
        assert_eq!(t.heartbeat("charge", json!({"done": n})), InputOutcome::Applied);
        let due = t.timers().into_iter().find(|(k, _)| matches!(k, TimerKey::Heartbeat { .. })).unwrap().1;
        assert_eq!(due, t.now().plus_ms(5_000), "each heartbeat moves the timer");
    }
    assert_eq!(t.step_status("charge"), StepStatus::Running);
    assert_eq!(t.state().steps[1].progress, Some(json!({"done": 15})));
    assert_eq!(t.state().steps[1].heartbeat_at, Some(t.now()));
    assert_eq!(t.invocations_sent(), vec!["reserve", "charge"]);
    t.succeed("charge", json!({"charge": "c-1"}));
    assert!(charge_timers(&t).is_empty(), "the reply cancels the heartbeat timer: {:?}", t.timers());
    t.succeed("ship", Value::Null);
    assert_eq!(t.status(), SagaStatus::Completed);
    assert!(t.timers().is_empty());
}

#[test]
fn a_missed_heartbeat_retries_and_the_next_attempt_carries_the_progress() {
    let mut t = SagaTest::start(&order_saga_with_heartbeat(Some(OnTimeout::Retry)), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    t.advance(1_000);
    t.heartbeat("charge", json!({"rows": 500}));
    let first = t.sent().last().unwrap().clone();
    assert_eq!(first.progress, None, "a first attempt carries no progress");
    // Silence: 5 s after the last heartbeat the attempt timed out (not 5 s after the send).
    t.advance(4_999);
    assert_eq!(t.step_status("charge"), StepStatus::Running);
    t.advance(1);
    assert_eq!(t.step_status("charge"), StepStatus::RetryScheduled);
    assert!(t.state().steps[1].last_error.as_deref().unwrap().contains("no heartbeat within 5000 ms"));
    assert_eq!(
        charge_timers(&t),
        vec![TimerKey::Retry { step: StepIndex(1), kind: CommandKind::Invoke, attempt: 2 }],
        "the attempt's 60 s timeout was cancelled with it"
    );
    t.advance(100);
    let second = t.sent().last().unwrap().clone();
    assert_eq!((second.step_name.as_str(), second.attempt), ("charge", 2));
    assert_eq!(second.progress, Some(json!({"rows": 500})), "the next attempt starts from the last progress");
    // The first attempt's late heartbeat is stale and changes nothing.
    let late = Heartbeat { in_reply_to: first.message_id, step: StepIndex(1), kind: CommandKind::Invoke, attempt: 1, details: json!(1) };
    let before = t.state().clone();
    let tr = t.apply(&Input::Heartbeat(late)).unwrap();
    assert!(ignored(&tr.outcome, IgnoreReason::Stale), "{:?}", tr.outcome);
    assert_eq!(tr.state, before);
    t.heartbeat("charge", json!({"rows": 900}));
    t.succeed("charge", json!({"charge": "c-1"}));
    assert_eq!(t.state().steps[1].progress, Some(json!({"rows": 900})), "the last progress stays visible");
    assert_eq!(t.invocations_sent(), vec!["reserve", "charge", "charge", "ship"]);
}

#[test]
fn a_missed_heartbeat_with_on_timeout_fail_compensates_the_step_that_may_have_run() {
    let mut t = SagaTest::start(&order_saga_with_heartbeat(Some(OnTimeout::Fail)), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    t.advance(5_000);
    assert_eq!(t.status(), SagaStatus::Compensating);
    let failure = t.state().failure.clone().unwrap();
    assert_eq!((failure.code.as_str(), failure.step.as_deref()), ("step_timed_out", Some("charge")));
    assert!(failure.message.contains("no heartbeat"), "{}", failure.message);
    assert_eq!(t.compensations_sent(), vec!["charge"], "a timed-out attempt may have run: it is compensated");
    t.succeed_compensation("charge");
    t.succeed_compensation("reserve");
    assert_eq!(t.status(), SagaStatus::Compensated);
    assert!(t.timers().is_empty(), "{:?}", t.timers());
}

#[test]
fn a_missed_heartbeat_with_escalate_raises_an_event_and_keeps_waiting() {
    let mut t = SagaTest::start(&order_saga_with_heartbeat(Some(OnTimeout::Escalate)), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    t.advance(5_000);
    assert_eq!(t.step_status("charge"), StepStatus::Running);
    assert!(t.events().contains(&SagaEvent::Escalated { step: "charge".into(), attempt: 1 }));
    // A heartbeat after the escalation is still kept; the attempt escalates once.
    assert_eq!(t.heartbeat("charge", json!("back")), InputOutcome::Applied);
    t.advance(5_000);
    assert_eq!(t.events().iter().filter(|e| matches!(e, SagaEvent::Escalated { .. })).count(), 1);
    t.succeed("charge", json!({"charge": "c-1"}));
    t.succeed("ship", Value::Null);
    assert_eq!(t.status(), SagaStatus::Completed);
}

#[test]
fn heartbeats_of_compensations_unknown_commands_and_settled_steps_are_stale() {
    let mut t = SagaTest::start(&order_saga_with_heartbeat(None), &order()).unwrap();
    let reserve = t.sent()[0].clone();
    let stale = |t: &mut SagaTest, h: Heartbeat| {
        let before = t.state().clone();
        let tr = t.apply(&Input::Heartbeat(h)).unwrap();
        assert!(ignored(&tr.outcome, IgnoreReason::Stale), "{:?}", tr.outcome);
        assert_eq!((tr.state, tr.effects), (before, vec![]));
    };
    let hb = |m: MessageId, step: u32, kind: CommandKind, attempt: u32| Heartbeat {
        in_reply_to: m,
        step: StepIndex(step),
        kind,
        attempt,
        details: json!({}),
    };
    stale(&mut t, hb(MessageId::new_random(), 0, CommandKind::Invoke, 1));
    stale(&mut t, hb(reserve.message_id, 0, CommandKind::Invoke, 2));
    stale(&mut t, hb(reserve.message_id, 7, CommandKind::Invoke, 1));
    let id = t.state().id;
    stale(&mut t, hb(MessageId::for_command(id, StepIndex(0), CommandKind::Compensate, 1), 0, CommandKind::Compensate, 1));
    // A step without a heartbeat timeout keeps the progress but schedules nothing.
    assert_eq!(t.heartbeat("reserve", json!({"half": true})), InputOutcome::Applied);
    assert!(t.timers().is_empty());
    assert_eq!(t.state().steps[0].progress, Some(json!({"half": true})));
    t.succeed("reserve", json!({"reservation": "r-1"}));
    stale(&mut t, hb(reserve.message_id, 0, CommandKind::Invoke, 1));
}

fn slot_effects(tr: &sagas::Transition) -> Vec<String> {
    tr.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Acquire { step, resource, capacity, priority } => {
                Some(format!("acquire {resource} {capacity} step {step} p{priority}"))
            }
            Effect::Release { step, resource } => Some(format!("release {resource} step {step}")),
            _ => None,
        })
        .collect()
}

#[test]
fn a_limited_step_waits_for_its_slot_holds_it_across_retries_and_gives_it_back() {
    let mut t = SagaTest::start(&order_saga_with_limit(), &order()).unwrap();
    let r = t.reply_to("reserve", CommandKind::Invoke, ReplyOutcome::Success { output: json!({"reservation": "r-1"}) });
    let tr = t.apply(&Input::Reply(r)).unwrap();
    assert_eq!(slot_effects(&tr), ["acquire payments 2 step 1 p0"]);
    assert_eq!(t.step_status("charge"), StepStatus::AwaitingSlot);
    assert_eq!(t.invocations_sent(), vec!["reserve"], "nothing is sent before the slot");
    assert!(t.timers().is_empty(), "a waiting step has no timeout running: {:?}", t.timers());

    let tr = t.apply(&Input::Timer(TimerKey::SlotGranted { step: StepIndex(1) })).unwrap();
    assert!(slot_effects(&tr).is_empty());
    assert_eq!(t.step_status("charge"), StepStatus::Running);
    assert!(t.state().steps[1].slot);
    assert_eq!(t.invocations_sent(), vec!["reserve", "charge"]);
    // A second grant (a duplicate timer) is stale.
    assert!(ignored(&t.grant("charge"), IgnoreReason::Stale));

    // Retries keep the slot.
    t.fail_transiently("charge");
    t.advance(1_000);
    assert_eq!(t.invocations_sent(), vec!["reserve", "charge", "charge"]);
    assert_eq!(t.slots(), vec!["charge"]);
    let r = t.reply_to("charge", CommandKind::Invoke, ReplyOutcome::Success { output: json!({"charge": "c-1"}) });
    let tr = t.apply(&Input::Reply(r)).unwrap();
    assert_eq!(slot_effects(&tr), ["release payments step 1"], "completing gives the slot back");
    assert!(!t.state().steps[1].slot);
    assert!(t.slots().is_empty());
    t.succeed("ship", Value::Null);
    assert_eq!(t.status(), SagaStatus::Completed);
}

#[test]
fn a_step_that_fails_or_is_aborted_gives_its_slot_or_its_place_back() {
    // Rejected while holding the slot: released, and the saga compensates.
    let mut t = SagaTest::start(&order_saga_with_limit(), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    t.grant("charge");
    let r = t.reply_to("charge", CommandKind::Invoke, ReplyOutcome::Rejected { code: "declined".into(), message: String::new() });
    assert_eq!(slot_effects(&t.apply(&Input::Reply(r)).unwrap()), ["release payments step 1"]);
    t.succeed_compensation("reserve");
    assert_eq!(t.status(), SagaStatus::Compensated);
    assert!(t.slots().is_empty());

    // Aborted while waiting: its place in the queue is given back, nothing was sent.
    let mut t = SagaTest::start(&order_saga_with_limit(), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    let tr = t.apply(&Input::Operator(OperatorCommand::Abort { reason: "test".into() })).unwrap();
    assert_eq!(slot_effects(&tr), ["release payments step 1"]);
    assert_eq!(t.step_status("charge"), StepStatus::Cancelled);
    assert_eq!(t.compensations_sent(), vec!["reserve"], "a step that never ran is not compensated");
    // The grant that crossed the abort is stale and sends nothing.
    assert!(ignored(&t.grant("charge"), IgnoreReason::Stale));
    assert_eq!(t.invocations_sent(), vec!["reserve"]);
}

#[test]
fn a_saga_s_priority_goes_with_its_request_for_a_slot() {
    let def = order_saga_with_limit();
    let (data, d) = (def.encode_input(&order()).unwrap(), def.erased());
    let mut st = SagaState::new(&d, sagas::SagaId::new(), data, Timestamp(0));
    st.priority = 7;
    let started = decide(&d, &st, &Input::Start, Timestamp(1)).unwrap();
    let reserve = started.commands().next().unwrap().clone();
    let reply = Reply {
        in_reply_to: reserve.message_id,
        step: StepIndex(0),
        kind: CommandKind::Invoke,
        attempt: 1,
        outcome: ReplyOutcome::Success { output: json!({"reservation": "r"}) },
    };
    let tr = decide(&d, &started.state, &Input::Reply(reply), Timestamp(2)).unwrap();
    assert_eq!(slot_effects(&tr), ["acquire payments 2 step 1 p7"]);
}

#[test]
fn escalation_emits_an_event_and_keeps_waiting() {
    let mut t = SagaTest::start(&order_saga_with_timeout(OnTimeout::Escalate), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    t.advance(6_000);
    assert_eq!(t.status(), SagaStatus::Running);
    assert_eq!(t.step_status("charge"), StepStatus::Running);
    assert!(t.events().contains(&SagaEvent::Escalated { step: "charge".into(), attempt: 1 }));
    assert_eq!(t.invocations_sent(), vec!["reserve", "charge"], "escalation does not resend");
    t.succeed("charge", json!({"charge": "c-1"}));
    t.succeed("ship", Value::Null);
    assert_eq!(t.status(), SagaStatus::Completed);
}

#[test]
fn stale_and_duplicate_replies_change_nothing() {
    let def = order_saga();
    let mut t = SagaTest::start(&def, &order()).unwrap();
    let ok = t.reply_to("reserve", CommandKind::Invoke, ReplyOutcome::Success { output: json!({"reservation": "r-1"}) });
    t.apply(&Input::Reply(ok.clone())).unwrap();
    let before = t.state().clone();

    let mut cases: Vec<(Reply, IgnoreReason)> = vec![(ok.clone(), IgnoreReason::Duplicate)];
    // an attempt that was never sent
    let mut never = t.reply_to("charge", CommandKind::Invoke, ReplyOutcome::Success { output: Value::Null });
    never.attempt = 7;
    never.in_reply_to = MessageId::for_command(t.state().id, StepIndex(1), CommandKind::Invoke, 7);
    cases.push((never, IgnoreReason::Stale));
    // a correlation id that answers no command of this saga
    let mut foreign = t.reply_to("charge", CommandKind::Invoke, ReplyOutcome::Success { output: Value::Null });
    foreign.in_reply_to = MessageId::new_random();
    cases.push((foreign, IgnoreReason::Stale));
    // a step that does not exist
    let mut nostep = ok.clone();
    nostep.step = StepIndex(99);
    nostep.in_reply_to = MessageId::for_command(t.state().id, StepIndex(99), CommandKind::Invoke, 1);
    cases.push((nostep, IgnoreReason::Stale));
    // a compensation reply while nothing is compensated
    let mut comp = ok.clone();
    comp.kind = CommandKind::Compensate;
    comp.in_reply_to = MessageId::for_command(t.state().id, StepIndex(0), CommandKind::Compensate, 1);
    cases.push((comp, IgnoreReason::Stale));
    // a step not reached yet
    let mut ahead = ok;
    ahead.step = StepIndex(2);
    ahead.in_reply_to = MessageId::for_command(t.state().id, StepIndex(2), CommandKind::Invoke, 1);
    cases.push((ahead, IgnoreReason::Stale));

    for (reply, reason) in cases {
        let tr = decide(&def, &before, &Input::Reply(reply.clone()), Timestamp(2_000_000)).unwrap();
        assert!(ignored(&tr.outcome, reason), "{reply:?} → {:?}", tr.outcome);
        assert_eq!(tr.state, before, "state unchanged by {reply:?}");
        assert!(tr.effects.is_empty());
    }

    // a failure of an earlier attempt, after the step moved on to a retry, is stale
    t.fail_transiently("charge");
    t.advance(100);
    let mut old = t.reply_to("charge", CommandKind::Invoke, ReplyOutcome::Rejected { code: "x".into(), message: String::new() });
    old.attempt = 1;
    old.in_reply_to = MessageId::for_command(t.state().id, StepIndex(1), CommandKind::Invoke, 1);
    let before = t.state().clone();
    let tr = t.apply(&Input::Reply(old)).unwrap();
    assert!(ignored(&tr.outcome, IgnoreReason::Stale));
    assert_eq!(t.state(), &before);
}

#[test]
fn a_step_whose_condition_is_false_is_skipped() {
    let def = SagaDefinition::<Order>::builder("express", 1)
        .step("reserve", |s| s.invoke(|o: &Order| Reserve { order: o.id }))
        .step("express_ship", |s| s.invoke(|o: &Order| Ship { order: o.id, express: true }).when(|o| o.express))
        .step("charge", |s| s.invoke(|o: &Order| Charge { amount: o.amount }))
        .build()
        .unwrap();
    let mut t = SagaTest::start(&def, &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r"}));
    assert_eq!(t.step_status("express_ship"), StepStatus::Skipped);
    assert_eq!(t.invocations_sent(), vec!["reserve", "charge"]);

    let mut t = SagaTest::start(&def, &common::Order { express: true, ..order() }).unwrap();
    t.succeed("reserve", json!({"reservation": "r"}));
    assert_eq!(t.invocations_sent(), vec!["reserve", "express_ship"]);
}

#[test]
fn a_parallel_group_sends_every_branch_and_completes_when_all_did() {
    let mut t = SagaTest::start(&parallel_saga(), &order()).unwrap();
    t.succeed("reserve", Value::Null);
    assert_eq!(t.invocations_sent(), vec!["reserve", "email", "sms", "push"]);
    t.succeed("sms", Value::Null);
    t.succeed("email", Value::Null);
    assert_eq!(t.invocations_sent().len(), 4, "ship waits for every branch");
    t.succeed("push", Value::Null);
    assert_eq!(t.invocations_sent().last(), Some(&"ship"));
}

#[test]
fn a_parallel_group_compensates_only_its_completed_branches_in_reverse_order_of_completion() {
    let mut t = SagaTest::start(&parallel_saga(), &order()).unwrap();
    t.succeed("reserve", Value::Null);
    t.succeed("push", Value::Null);
    t.reject("email", "bounced");
    // sms is still in flight: compensation waits for it
    assert_eq!(t.status(), SagaStatus::Compensating);
    assert!(t.compensations_sent().is_empty(), "waits for the in-flight branch");
    t.succeed("sms", Value::Null); // completes late: it must be undone too
    assert_eq!(t.compensations_sent(), vec!["sms"]);
    t.succeed_compensation("sms");
    t.succeed_compensation("push");
    t.succeed_compensation("reserve");
    assert_eq!(t.compensations_sent(), vec!["sms", "push", "reserve"]);
    assert_eq!(t.step_status("email"), StepStatus::Failed);
    assert_eq!(t.status(), SagaStatus::Compensated);
    assert!(!t.invocations_sent().contains(&"ship"));
}

#[test]
fn a_failing_parallel_group_cancels_scheduled_retries_of_its_other_branches() {
    let mut t = SagaTest::start(&parallel_saga(), &order()).unwrap();
    t.succeed("reserve", Value::Null);
    t.fail_transiently("sms");
    t.succeed("push", Value::Null);
    t.reject("email", "bounced");
    assert_eq!(t.step_status("sms"), StepStatus::Failed);
    assert!(t.timers().is_empty(), "the sms retry was cancelled: {:?}", t.timers());
    assert_eq!(t.compensations_sent(), vec!["push"]);
}

#[test]
fn a_wait_completes_on_its_event_and_stores_the_payload() {
    let def = wait_saga(OnDeadline::Fail);
    let mut t = SagaTest::start(&def, &order()).unwrap();
    assert!(matches!(t.event("customer.card_updated", json!({"card": "4242"})), InputOutcome::Refused { .. }), "not waiting yet");
    t.succeed("reserve", Value::Null);
    assert_eq!(t.step_status("card"), StepStatus::Waiting);
    assert!(matches!(t.event("customer.other", json!({})), InputOutcome::Refused { .. }));
    assert!(matches!(t.event("customer.card_updated", json!({"wrong": 1})), InputOutcome::Refused { .. }), "payload must fit");
    assert_eq!(t.event("customer.card_updated", json!({"card": "4242"})), InputOutcome::Applied);
    assert_eq!(def.decode_data(&t.state().data).unwrap().card.as_deref(), Some("4242"));
    assert_eq!(t.invocations_sent(), vec!["reserve", "charge"]);
    assert!(t.timers().is_empty(), "the deadline timer was cancelled");
}

#[test]
fn a_wait_that_passes_its_deadline_fails_or_continues_as_defined() {
    let mut t = SagaTest::start(&wait_saga(OnDeadline::Fail), &order()).unwrap();
    t.succeed("reserve", Value::Null);
    t.advance(3_600_000);
    assert_eq!(t.state().failure.as_ref().unwrap().code, "wait_expired");
    assert_eq!(t.compensations_sent(), vec!["reserve"]);

    let mut t = SagaTest::start(&wait_saga(OnDeadline::Continue), &order()).unwrap();
    t.succeed("reserve", Value::Null);
    t.advance(3_600_000);
    assert_eq!(t.step_status("card"), StepStatus::Skipped);
    assert_eq!(t.invocations_sent(), vec!["reserve", "charge"]);
}

#[test]
fn the_saga_deadline_compensates_before_the_pivot_and_stops_after_it() {
    let mut t = SagaTest::start(&pivot_saga(), &order()).unwrap();
    t.succeed("reserve", Value::Null);
    t.advance(600_000);
    assert_eq!(t.state().failure.as_ref().unwrap().code, "deadline_exceeded");
    // charge was in flight: its answer decides whether it is compensated (it has no compensation)
    t.reject("charge", "declined");
    assert_eq!(t.compensations_sent(), vec!["reserve"]);

    let mut t = SagaTest::start(&pivot_saga(), &order()).unwrap();
    t.succeed("reserve", Value::Null);
    t.succeed("charge", Value::Null);
    t.advance(600_000);
    assert_eq!(t.status(), SagaStatus::Stopped);
    assert_eq!(t.state().stop.as_ref().unwrap().code, StopCode::TimedOut);
    // the in-flight shipment still lands, and the saga carries on
    t.succeed("ship", Value::Null);
    assert_eq!(t.status(), SagaStatus::Completed);
}

#[test]
fn after_the_pivot_steps_retry_instead_of_compensating() {
    let mut t = SagaTest::start(&pivot_saga(), &order()).unwrap();
    t.succeed("reserve", Value::Null);
    t.succeed("charge", Value::Null);
    assert!(t.state().past_pivot);
    assert!(matches!(t.operator(OperatorCommand::Abort { reason: "x".into() }), InputOutcome::Refused { .. }));
    for _ in 0..3 {
        t.fail_transiently("ship");
        t.advance(10_000);
    }
    assert_eq!(t.status(), SagaStatus::Stopped, "its policy allows 3 attempts");
    assert_eq!(t.state().stop.as_ref().unwrap().code, StopCode::StepFailedAfterPivot);
    assert!(t.compensations_sent().is_empty(), "nothing is compensated after the pivot");
    assert_eq!(t.operator(OperatorCommand::Resume), InputOutcome::Applied);
    assert_eq!(t.invocations_sent().iter().filter(|s| **s == "ship").count(), 4, "resume sends it again");
    t.succeed("ship", Value::Null);
    assert_eq!(t.status(), SagaStatus::Completed);
}

#[test]
fn a_rejected_pivot_compensates_the_steps_before_it() {
    let mut t = SagaTest::start(&pivot_saga(), &order()).unwrap();
    t.succeed("reserve", Value::Null);
    t.reject("charge", "declined");
    assert_eq!(t.compensations_sent(), vec!["reserve"]);
}

#[test]
fn compensations_are_retried_and_an_operator_resolves_one_that_gave_up() {
    let mut t = SagaTest::start(&order_saga(), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    t.succeed("charge", json!({"charge": "c-1"}));
    t.reject("ship", "no_address");
    t.fail_compensation("charge");
    assert_eq!(t.step_status("charge"), StepStatus::CompensationRetryScheduled);
    t.advance(100);
    t.fail_compensation("charge");
    t.advance(200);
    t.fail_compensation("charge");
    assert_eq!(t.status(), SagaStatus::Stopped);
    let stop = t.state().stop.clone().unwrap();
    assert_eq!((stop.code, stop.step.as_deref()), (StopCode::CompensationFailed, Some("charge")));
    assert_eq!(t.sent().iter().filter(|c| c.kind == CommandKind::Compensate).count(), 3);
    assert!(matches!(t.operator(OperatorCommand::Abort { reason: "x".into() }), InputOutcome::Refused { .. }));

    // retry: a fresh budget
    assert_eq!(t.operator(OperatorCommand::RetryCompensation), InputOutcome::Applied);
    assert_eq!(t.status(), SagaStatus::Compensating);
    t.fail_compensation("charge");
    t.advance(100);
    t.fail_compensation("charge");
    t.advance(200);
    t.fail_compensation("charge");
    assert_eq!(t.status(), SagaStatus::Stopped);

    // skip: handled by hand, carry on with the next compensation
    assert_eq!(t.operator(OperatorCommand::SkipCompensation), InputOutcome::Applied);
    assert_eq!(t.step_status("charge"), StepStatus::CompensationSkipped);
    t.succeed_compensation("reserve");
    assert_eq!(t.status(), SagaStatus::Compensated);
    assert!(t.events().contains(&SagaEvent::StepCompensated { step: "charge".into(), skipped: true }));
}

#[test]
fn abort_compensates_what_completed_and_is_refused_when_finished() {
    let mut t = SagaTest::start(&order_saga(), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    assert_eq!(t.operator(OperatorCommand::Abort { reason: "customer cancelled".into() }), InputOutcome::Applied);
    let f = t.state().failure.clone().unwrap();
    assert_eq!((f.code.as_str(), f.message.as_str()), ("aborted", "customer cancelled"));
    t.succeed("charge", json!({"charge": "c-1"})); // was in flight: completes, so it is undone
    assert_eq!(t.compensations_sent(), vec!["charge"]);
    t.succeed_compensation("charge");
    t.succeed_compensation("reserve");
    assert_eq!(t.status(), SagaStatus::Compensated);
    assert!(matches!(t.operator(OperatorCommand::Abort { reason: "again".into() }), InputOutcome::Refused { .. }));
    assert!(matches!(t.operator(OperatorCommand::Resume), InputOutcome::Refused { .. }));
}

#[test]
fn an_unusable_reply_fails_the_step_but_still_compensates_it() {
    let mut t = SagaTest::start(&order_saga(), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    t.succeed("charge", json!({"unexpected": true}));
    assert_eq!(t.state().failure.as_ref().unwrap().code, "invalid_reply");
    assert_eq!(t.compensations_sent(), vec!["charge"]);
}

#[test]
fn start_twice_is_a_duplicate_and_a_foreign_definition_is_an_error() {
    let def = order_saga();
    let mut t = SagaTest::start(&def, &order()).unwrap();
    assert!(ignored(&t.apply(&Input::Start).unwrap().outcome, IgnoreReason::Duplicate));
    let other = parallel_saga();
    let st = SagaState::new(&other, sagas::SagaId::new(), json!({}), Timestamp(0));
    let err = decide(&def, &st, &Input::Start, Timestamp(0)).unwrap_err();
    assert!(err.to_string().contains("pinned to parallel_order v1"), "{err}");
}

#[test]
fn effects_of_a_start_are_the_first_command_and_the_deadline() {
    let def = pivot_saga();
    let st = SagaState::new(&def, sagas::SagaId::new(), serde_json::to_value(order()).unwrap(), Timestamp(1_000));
    let tr = decide(&def, &st, &Input::Start, Timestamp(1_000)).unwrap();
    assert!(tr.effects.contains(&Effect::Schedule { key: TimerKey::SagaDeadline, due: Timestamp(601_000) }));
    let cmds: Vec<_> = tr.commands().collect();
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0].message_id, MessageId::for_command(st.id, StepIndex(0), CommandKind::Invoke, 1));
}

fn build_err<D: sagas::SagaData>(b: sagas::SagaBuilder<D>) -> String {
    b.build().unwrap_err().to_string()
}

#[test]
fn build_rejects_invalid_definitions_with_clear_errors() {
    let s = |name: &'static str| move |b: sagas::SagaBuilder<Order>| b.step(name, |s| s.invoke(|o: &Order| Reserve { order: o.id }));
    assert!(build_err(SagaDefinition::<Order>::builder("x", 1)).contains("at least one step"));
    assert!(build_err(s("a")(SagaDefinition::<Order>::builder("x", 0))).contains("version must be at least 1"));
    assert!(build_err(s("a")(SagaDefinition::<Order>::builder("bad name", 1))).contains("definition name"));
    assert!(build_err(s("a")(s("a")(SagaDefinition::<Order>::builder("x", 1)))).contains("two steps are named `a`"));
    let e = build_err(SagaDefinition::<Order>::builder("x", 1).step("a", |s| s.invoke(|o: &Order| Reserve { order: o.id }).retriable()));
    assert!(e.contains("retriable but comes before any pivot"), "{e}");
    let e = build_err(
        SagaDefinition::<Order>::builder("x", 1)
            .step("p", |s| s.invoke(|o: &Order| Charge { amount: o.amount }).pivot())
            .step("after", |s| s.invoke(|o: &Order| Reserve { order: o.id })),
    );
    assert!(e.contains("after the pivot and must be `.retriable()`"), "{e}");
    let e = build_err(
        SagaDefinition::<Order>::builder("x", 1)
            .step("p", |s| s.invoke(|o: &Order| Charge { amount: o.amount }).pivot())
            .step("q", |s| s.invoke(|o: &Order| Charge { amount: o.amount }).pivot()),
    );
    assert!(e.contains("at most one pivot"), "{e}");
    let e = build_err(SagaDefinition::<Order>::builder("x", 1).wait("w", |w| w));
    assert!(e.contains("names no event"), "{e}");
    let e = build_err(SagaDefinition::<Order>::builder("x", 1).step("a", |s| {
        s.invoke(|o: &Order| Reserve { order: o.id }).retry(sagas::RetryPolicy::exponential(Duration::from_millis(1), 0.5, 3))
    }));
    assert!(e.contains("factor must be"), "{e}");
    let e = build_err(SagaDefinition::<Order>::builder("x", 1).parallel("g", |p| p));
    assert!(e.contains("has no branches"), "{e}");
    let e = build_err(
        SagaDefinition::<Order>::builder("x", 1)
            .step("p", |s| s.invoke(|o: &Order| Charge { amount: o.amount }).pivot())
            .wait("w", |w| w.event("e").deadline(Duration::from_secs(1), OnDeadline::Fail)),
    );
    assert!(e.contains("cannot fail the saga"), "{e}");
}

#[test]
fn registry_finds_definitions_by_version_and_latest() {
    let mut r = sagas::Registry::new();
    r.register(order_saga().erased()).unwrap();
    let v2 = SagaDefinition::<Order>::builder("order", 2).step("only", |s| s.invoke(|o: &Order| Reserve { order: o.id })).build().unwrap();
    r.register(v2.erased()).unwrap();
    assert!(r.register(order_saga().erased()).is_err(), "same name and version twice");
    assert_eq!(r.get("order", 1).unwrap().steps.len(), 3);
    assert_eq!(r.latest("order").unwrap().version, 2);
    assert!(r.get("order", 3).is_none());
    assert!(r.latest("nope").is_none());
    let _ = <Reserve as Command>::NAME;
}

#[test]
fn registry_lists_every_participant_once_compensations_included() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Void {
        charge: Option<String>,
    }
    impl Command for Void {
        const NAME: &'static str = "ledger.void";
        const PARTICIPANT: &'static str = "ledger";
        type Reply = ();
    }
    let mut r = sagas::Registry::new();
    r.register(order_saga().erased()).unwrap();
    let other = SagaDefinition::<Order>::builder("refund-elsewhere", 1)
        .step("charge", |s| s.invoke(|o: &Order| Charge { amount: o.amount }).compensate(|o| Void { charge: o.charge.clone() }))
        .build()
        .unwrap();
    r.register(other.erased()).unwrap();
    assert_eq!(r.participants(), ["inventory", "ledger", "payment", "shipping"]);
}

#[test]
fn search_keys_are_read_from_the_input_checked_and_listed_in_the_spec() {
    let step = |b: sagas::SagaBuilder<Order>| b.step("a", |s| s.invoke(|o: &Order| Reserve { order: o.id }));
    let def = step(SagaDefinition::<Order>::builder("x", 1))
        .search_key("order", |o: &Order| o.id.to_string())
        .search_key("card", |o: &Order| o.card.clone().unwrap_or_default())
        .build()
        .unwrap();
    assert_eq!(def.spec().search_keys, ["order", "card"]);
    let input = serde_json::to_value(Order { id: 42, ..order() }).unwrap();
    assert_eq!(def.search_key_values(&input).unwrap(), [("order".to_owned(), "42".to_owned())], "an empty value is left out");
    let long = serde_json::to_value(Order { card: Some("c".repeat(sagas::MAX_SEARCH_VALUE_BYTES + 1)), ..order() }).unwrap();
    assert!(def.search_key_values(&long).unwrap_err().contains("search key `card` is 257 bytes"));
    let nul = serde_json::to_value(Order { card: Some("a\u{0}b".into()), ..order() }).unwrap();
    assert!(def.search_key_values(&nul).unwrap_err().contains("U+0000"));
    let none = step(SagaDefinition::<Order>::builder("y", 1)).build().unwrap();
    assert!(none.search_key_values(&input).unwrap().is_empty() && none.spec().search_keys.is_empty());

    let twice = step(SagaDefinition::<Order>::builder("x", 1))
        .search_key("k", |_: &Order| String::new())
        .search_key("k", |_: &Order| String::new());
    assert!(build_err(twice).contains("search key `k`"));
    assert!(
        build_err(step(SagaDefinition::<Order>::builder("x", 1)).search_key("bad key", |_: &Order| String::new()))
            .contains("search key `bad key`")
    );
    let mut many = step(SagaDefinition::<Order>::builder("x", 1));
    for i in 0..=sagas::MAX_SEARCH_KEYS {
        many = many.search_key(format!("k{i}"), |_: &Order| String::new());
    }
    assert!(build_err(many).contains("at most 8"));
}

#[test]
fn a_child_step_sends_its_input_to_the_child_participant_and_completes_with_the_childs_data() {
    let def = parent_saga();
    let mut t = SagaTest::start(&def, &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    let start = t.sent().last().unwrap().clone();
    assert_eq!((start.participant.as_str(), start.command.as_str()), ("sagaflow.child", "order"));
    assert_eq!(start.body["id"], 42, "the child's input is built from the parent's data: {}", start.body);
    assert_eq!(start.body["reservation"], "r-1");
    let mut child = order();
    child.charge = Some("c-9".into());
    assert_eq!(t.succeed("pay", serde_json::to_value(&child).unwrap()), InputOutcome::Applied);
    assert_eq!(def.decode_data(&t.state().data).unwrap().charge.as_deref(), Some("c-9"), "on_reply got the child's data");
    t.reject("ship", "no_address");
    assert_eq!(t.compensations_sent(), vec!["pay"]);
    let undo = t.sent().last().unwrap();
    assert_eq!((undo.participant.as_str(), undo.command.as_str()), ("sagaflow.child", "sagaflow.child.undo"));
    t.succeed_compensation("pay");
    t.succeed_compensation("reserve");
    assert_eq!(t.status(), SagaStatus::Compensated);
}

#[test]
fn a_child_answers_its_parent_with_its_data_and_compensates_when_undone() {
    let mut t = SagaTest::start_child(&order_saga(), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    t.succeed("charge", json!({"charge": "c-1"}));
    assert!(t.answers().is_empty(), "no answer before it ends");
    t.succeed("ship", Value::Null);
    assert_eq!(t.status(), SagaStatus::Completed);
    let [(CommandKind::Invoke, 1, ReplyOutcome::Success { output })] = t.answers() else { panic!("{:?}", t.answers()) };
    assert_eq!(output, &t.state().data);

    assert_eq!(t.undo(), InputOutcome::Applied);
    assert_eq!(t.status(), SagaStatus::Compensating);
    assert_eq!(t.state().failure.as_ref().unwrap().code, "parent_compensated");
    assert_eq!(t.compensations_sent(), vec!["charge"]);
    assert!(ignored(&t.apply(&Input::Undo { attempt: 1 }).unwrap().outcome, IgnoreReason::Duplicate));
    t.succeed_compensation("charge");
    assert_eq!(t.answers().len(), 1, "answered once compensated, not before");
    t.succeed_compensation("reserve");
    assert_eq!(t.status(), SagaStatus::Compensated);
    assert_eq!(t.answers()[1], (CommandKind::Compensate, 1, ReplyOutcome::Success { output: Value::Null }));
    // The parent retrying its compensation hears at once that nothing is left to undo.
    assert_eq!(t.undo(), InputOutcome::Applied);
    assert_eq!(t.answers()[2], (CommandKind::Compensate, 2, ReplyOutcome::Success { output: Value::Null }));
}

#[test]
fn a_failed_child_answers_its_parent_with_its_failure_code() {
    let mut t = SagaTest::start_child(&order_saga(), &order()).unwrap();
    t.succeed("reserve", json!({"reservation": "r-1"}));
    t.reject("charge", "card_declined");
    t.succeed_compensation("reserve");
    assert_eq!(t.status(), SagaStatus::Compensated);
    let [(CommandKind::Invoke, 1, ReplyOutcome::Rejected { code, .. })] = t.answers() else { panic!("{:?}", t.answers()) };
    assert_eq!(code, "card_declined");
}

#[test]
fn a_child_past_its_pivot_refuses_to_be_undone_and_a_saga_without_a_parent_refuses_undo() {
    let mut t = SagaTest::start_child(&pivot_saga(), &order()).unwrap();
    t.succeed("reserve", Value::Null);
    t.succeed("charge", Value::Null);
    assert_eq!(t.undo(), InputOutcome::Applied);
    let [(CommandKind::Compensate, 1, ReplyOutcome::Rejected { code, .. })] = t.answers() else { panic!("{:?}", t.answers()) };
    assert_eq!(code, "child_past_pivot");
    assert_eq!(t.status(), SagaStatus::Running, "it goes on forward");
    t.succeed("ship", Value::Null);
    assert!(matches!(t.answers()[1], (CommandKind::Invoke, 1, ReplyOutcome::Success { .. })));

    let mut alone = SagaTest::start(&order_saga(), &order()).unwrap();
    assert!(matches!(alone.undo(), InputOutcome::Refused { .. }));
}

#[test]
fn a_child_step_takes_no_timeout_and_no_compensation_of_its_own() {
    let with_timeout = SagaDefinition::<Order>::builder("p", 1)
        .step("pay", |s| s.child(&order_saga(), |o: &Order| o.clone()).timeout(Duration::from_secs(5), OnTimeout::Retry))
        .build();
    assert!(with_timeout.err().unwrap().to_string().contains("deadline"));
    let with_compensation = SagaDefinition::<Order>::builder("p", 1)
        .step("pay", |s| s.child(&order_saga(), |o: &Order| o.clone()).compensate(|o| Refund { charge: o.charge.clone() }))
        .build();
    assert!(with_compensation.err().unwrap().to_string().contains("compensates the child"));
}
