//! `Input::Timer`: a retry, timeout, heartbeat timeout, wait deadline or saga deadline came due. A timer that no
//! longer matches the saga (its step moved on) is ignored as stale.

use super::{Cx, IgnoreReason, InputOutcome, SagaEvent, TimerKey};
use crate::definition::{StepAction, StepKind};
use crate::ids::{CommandKind, StepIndex};
use crate::policy::{OnDeadline, OnTimeout};
use crate::state::{Failure, FailureCode, SagaStatus, StepStatus, StopCode};

pub(super) fn handle(cx: &mut Cx<'_>, key: &TimerKey) -> InputOutcome {
    let stale = |what: &str| Cx::ignored(IgnoreReason::Stale, format!("timer {} no longer applies: {what}", key.id()));
    match *key {
        TimerKey::SagaDeadline => {
            if cx.st.status != SagaStatus::Running || cx.st.deadline_at.is_none() {
                return stale("the saga is not going forward, or its deadline was handled");
            }
            // Consumed: a resumed saga is not stopped again by the same deadline.
            cx.st.deadline_at = None;
            if cx.st.past_pivot {
                cx.stop(StopCode::TimedOut, None, "the saga deadline passed after the pivot".into());
            } else {
                cx.fail(Failure { step: None, code: FailureCode::DeadlineExceeded, message: "the saga deadline passed".into() });
            }
            InputOutcome::Applied
        }
        _ if key.step().is_some_and(|step| step.get() >= cx.def.steps.len()) => stale("no such step"),
        TimerKey::SlotGranted { step } => {
            if cx.st.status != SagaStatus::Running || cx.st.steps[step.get()].status != StepStatus::AwaitingSlot {
                return stale("the step is not waiting for a slot");
            }
            cx.step_mut(step).slot = true;
            cx.send_invoke(step);
            InputOutcome::Applied
        }
        TimerKey::Retry { step, kind: CommandKind::Invoke, attempt } => {
            let s = &cx.st.steps[step.get()];
            if cx.st.status != SagaStatus::Running || s.status != StepStatus::RetryScheduled || attempt != s.attempts + 1 {
                return stale("the step is not waiting for this retry");
            }
            cx.send_invoke(step);
            InputOutcome::Applied
        }
        TimerKey::Retry { step, kind: CommandKind::Compensate, attempt } => {
            let s = &cx.st.steps[step.get()];
            if cx.st.status != SagaStatus::Compensating
                || s.status != StepStatus::CompensationRetryScheduled
                || attempt != s.compensation_attempts + 1
            {
                return stale("the compensation is not waiting for this retry");
            }
            cx.send_compensation(step);
            InputOutcome::Applied
        }
        TimerKey::StepTimeout { step, kind: CommandKind::Invoke, attempt } => {
            invoke_timeout(cx, key, step, attempt).unwrap_or_else(|| stale("the attempt was answered"))
        }
        TimerKey::Heartbeat { step, attempt } => {
            invoke_timeout(cx, key, step, attempt).unwrap_or_else(|| stale("the attempt was answered"))
        }
        TimerKey::StepTimeout { step, kind: CommandKind::Compensate, attempt } => {
            let s = &cx.st.steps[step.get()];
            if s.status != StepStatus::Compensating || attempt != s.compensation_attempts {
                return stale("the compensation attempt was answered");
            }
            cx.compensation_attempt_failed(step, format!("compensation attempt {attempt} got no reply in time"));
            InputOutcome::Applied
        }
        TimerKey::WaitDeadline { step } => wait_deadline(cx, step).unwrap_or_else(|| stale("the wait is over")),
    }
}

/// Wait step `step`'s deadline passed: skip it or fail the saga, as the step says; `None` when
/// the wait is over.
fn wait_deadline(cx: &mut Cx<'_>, step: StepIndex) -> Option<InputOutcome> {
    let StepAction::Wait(w) = &cx.def.steps[step.get()].action else { return None };
    let then = w.deadline.map_or(OnDeadline::Fail, |d| d.1);
    if cx.st.steps[step.get()].status != StepStatus::Waiting {
        return None;
    }
    let now = cx.now;
    let name = cx.name(step);
    match then {
        OnDeadline::Continue => {
            let s = cx.step_mut(step);
            s.status = StepStatus::Skipped;
            s.finished_at = Some(now);
            s.last_error = Some("the wait passed its deadline".into());
            cx.emit(SagaEvent::StepSkipped { step: name });
            cx.advance_if_node_done();
        }
        OnDeadline::Fail => {
            let s = cx.step_mut(step);
            s.status = StepStatus::Failed;
            s.finished_at = Some(now);
            s.last_error = Some("the wait passed its deadline".into());
            if cx.st.status == SagaStatus::Running {
                let message = format!("event `{}` did not arrive before the deadline", w.event);
                cx.fail(Failure { step: Some(name), code: FailureCode::WaitExpired, message });
            }
        }
    }
    Some(InputOutcome::Applied)
}

/// Attempt `attempt` of step `i`'s command timed out: timer `key` (its timeout, or its heartbeat
/// timeout) fired. The step's timeout policy says what follows (a heartbeat timeout on a step
/// without one retries); `None` when the attempt is no longer running.
fn invoke_timeout(cx: &mut Cx<'_>, key: &TimerKey, i: StepIndex, attempt: u32) -> Option<InputOutcome> {
    let s = &cx.st.steps[i.get()];
    if s.status != StepStatus::Running || attempt != s.attempts {
        return None;
    }
    let c = cx.command_step(i)?;
    let (then, error) = match key {
        TimerKey::Heartbeat { .. } => {
            let then = c.timeout.map_or(OnTimeout::Retry, |t| t.then);
            (then, format!("attempt {attempt} sent no heartbeat within {} ms", c.heartbeat_ms?))
        }
        _ => {
            let policy = c.timeout?;
            (policy.then, format!("attempt {attempt} got no reply within {} ms", policy.after_ms))
        }
    };
    let retry = c.retry.clone();
    let (escalated, used) = (s.escalated, s.used(CommandKind::Invoke));
    let after_pivot = cx.st.past_pivot || cx.def.steps[i.get()].kind == StepKind::Retriable;

    if then == OnTimeout::Escalate {
        if escalated {
            return Some(Cx::ignored(IgnoreReason::Duplicate, "the attempt already escalated"));
        }
        cx.step_mut(i).escalated = true;
        let step = cx.name(i);
        cx.emit(SagaEvent::Escalated { step, attempt });
        return Some(InputOutcome::Applied);
    }
    // The attempt is over: its other timer no longer matters.
    cx.cancel_attempt_timers(i, Some(key));
    cx.step_mut(i).maybe_applied = true;
    match cx.st.status {
        SagaStatus::Running if then == OnTimeout::Retry && retry.allows_after(used) => {
            let due = cx.now.plus_ms(retry.delay_after(used, cx.st.id, i, CommandKind::Invoke));
            let s = cx.step_mut(i);
            s.status = StepStatus::RetryScheduled;
            s.last_error = Some(error.clone());
            cx.schedule(TimerKey::Retry { step: i, kind: CommandKind::Invoke, attempt: attempt + 1 }, due);
            let step = cx.name(i);
            cx.emit(SagaEvent::StepRetrying { step, attempt: attempt + 1, due_at: due, error });
        }
        SagaStatus::Running => {
            cx.mark_maybe_applied(i, error.clone());
            if after_pivot {
                cx.stop(StopCode::TimedOut, Some(i), error);
            } else {
                cx.fail(Failure { step: Some(cx.name(i)), code: FailureCode::StepTimedOut, message: error });
            }
        }
        SagaStatus::Compensating => {
            cx.mark_maybe_applied(i, error);
            cx.begin_compensation_if_drained();
        }
        _ => cx.mark_maybe_applied(i, error),
    }
    Some(InputOutcome::Applied)
}
