//! `Input::Reply`: a participant answered a command or a compensation.
//!
//! A reply must answer a command this saga sent: its `in_reply_to` must be the deterministic id
//! of `(saga, step, kind, attempt)`. A success settles the step whichever attempt it answers
//! (the command ran); a failure only counts for the attempt the saga is waiting on. Anything
//! else is ignored as stale or duplicate, leaving state and effects untouched.

use serde_json::Value;

use super::{Cx, IgnoreReason, InputOutcome, Reply, SagaEvent, TimerKey};
use crate::definition::StepKind;
use crate::ids::{CommandKind, StepIndex};
use crate::protocol::ReplyOutcome;
use crate::state::{Failure, FailureCode, SagaStatus, StepStatus, StopCode};

pub(super) fn handle(cx: &mut Cx<'_>, r: &Reply) -> InputOutcome {
    let i = r.step;
    if let Err(stale) = cx.about_command("the reply does not answer", i, r.kind, r.attempt, r.in_reply_to) {
        return stale;
    }
    match r.kind {
        CommandKind::Invoke => invoke(cx, i, r),
        CommandKind::Compensate => compensate(cx, i, r),
    }
}

fn invoke(cx: &mut Cx<'_>, i: StepIndex, r: &Reply) -> InputOutcome {
    let s = &cx.st.steps[i.get()];
    if r.attempt == 0 || r.attempt > s.attempts {
        return Cx::ignored(IgnoreReason::Stale, format!("attempt {} of step {i} was never sent", r.attempt));
    }
    match s.status {
        StepStatus::Running | StepStatus::RetryScheduled => {}
        StepStatus::Pending | StepStatus::Skipped | StepStatus::Waiting | StepStatus::Cancelled => {
            return Cx::ignored(IgnoreReason::Stale, format!("step {i} is not waiting for a reply"));
        }
        _ => return Cx::ignored(IgnoreReason::Duplicate, format!("step {i} is already settled ({:?})", s.status)),
    }
    let current = r.attempt == s.attempts && s.status == StepStatus::Running;
    match &r.outcome {
        ReplyOutcome::Success { output } => success(cx, i, output),
        _ if !current => Cx::ignored(IgnoreReason::Stale, format!("the failure answers attempt {} but step {i} is past it", r.attempt)),
        ReplyOutcome::Rejected { code, message } => rejected(cx, i, code, message),
        ReplyOutcome::TransientFailure { message } => transient(cx, i, message),
    }
}

/// Cancel the timers that wait on the step's current attempt.
fn cancel_attempt_timers(cx: &mut Cx<'_>, i: StepIndex) {
    let s = &cx.st.steps[i.get()];
    let attempt = s.attempts;
    match s.status {
        StepStatus::Running => cx.cancel_attempt_timers(i, None),
        StepStatus::RetryScheduled => cx.cancel(TimerKey::Retry { step: i, kind: CommandKind::Invoke, attempt: attempt + 1 }),
        _ => {}
    }
}

fn past_pivot(cx: &Cx<'_>, i: StepIndex) -> bool {
    cx.st.past_pivot || cx.def.steps[i.get()].kind == StepKind::Retriable
}

fn success(cx: &mut Cx<'_>, i: StepIndex, output: &Value) -> InputOutcome {
    cancel_attempt_timers(cx, i);
    let apply = cx.command_step(i).and_then(|c| c.on_reply.clone());
    let applied = apply.map_or(Ok(()), |f| f(&mut cx.st.data, output));
    let now = cx.now;
    let s = cx.step_mut(i);
    s.status = StepStatus::Completed;
    s.finished_at = Some(now);
    s.output = Some(output.clone());
    cx.st.completed.push(i);
    if let Err(e) = applied {
        // The command ran but its reply is unusable: the step counts as completed (it is
        // compensated), and the saga fails.
        let message = format!("the reply could not be used: {e}");
        cx.step_mut(i).last_error = Some(message.clone());
        match cx.st.status {
            SagaStatus::Running if past_pivot(cx, i) => cx.stop(StopCode::StepFailedAfterPivot, Some(i), message),
            SagaStatus::Running => cx.fail(Failure { step: Some(cx.name(i)), code: FailureCode::InvalidReply, message }),
            _ => cx.begin_compensation_if_drained(),
        }
        return InputOutcome::Applied;
    }
    let step = cx.name(i);
    cx.emit(SagaEvent::StepCompleted { step });
    if cx.def.steps[i.get()].kind == StepKind::Pivot {
        cx.st.past_pivot = true;
    }
    match cx.st.status {
        SagaStatus::Running => cx.advance_if_node_done(),
        SagaStatus::Compensating => cx.begin_compensation_if_drained(),
        SagaStatus::Stopped => resume_if_node_done(cx),
        _ => {}
    }
    InputOutcome::Applied
}

/// A saga stopped after its pivot whose in-flight step then succeeded carries on by itself
/// once its node is done.
fn resume_if_node_done(cx: &mut Cx<'_>) {
    if cx.st.stop.as_ref().is_some_and(|s| s.code == StopCode::CompensationFailed) {
        return;
    }
    let done =
        cx.def.nodes[cx.st.node].steps().iter().all(|s| matches!(cx.st.steps[s.get()].status, StepStatus::Completed | StepStatus::Skipped));
    if done {
        cx.st.stop = None;
        cx.st.status = SagaStatus::Running;
        cx.emit(SagaEvent::Resumed);
        cx.advance_if_node_done();
    }
}

fn rejected(cx: &mut Cx<'_>, i: StepIndex, code: &str, message: &str) -> InputOutcome {
    cancel_attempt_timers(cx, i);
    let now = cx.now;
    let s = cx.step_mut(i);
    // A rejection is final for every attempt of the step (participants answer a repeated step
    // with its first outcome), so nothing ran.
    s.status = StepStatus::Failed;
    s.finished_at = Some(now);
    s.last_error = Some(format!("{code}: {message}"));
    match cx.st.status {
        SagaStatus::Running if past_pivot(cx, i) => {
            cx.stop(StopCode::StepFailedAfterPivot, Some(i), format!("step was rejected after the pivot: {code}: {message}"));
        }
        SagaStatus::Running => cx.fail(Failure { step: Some(cx.name(i)), code: FailureCode::parse(code), message: message.to_owned() }),
        SagaStatus::Compensating => {
            let step = cx.name(i);
            cx.emit(SagaEvent::StepFailed { step, code: code.to_owned(), message: message.to_owned() });
            cx.begin_compensation_if_drained();
        }
        _ => {}
    }
    InputOutcome::Applied
}

fn transient(cx: &mut Cx<'_>, i: StepIndex, message: &str) -> InputOutcome {
    cancel_attempt_timers(cx, i);
    let Some(policy) = cx.command_step(i).map(|c| c.retry.clone()) else { return InputOutcome::Applied };
    let s = &cx.st.steps[i.get()];
    let (attempt, used, maybe_applied) = (s.attempts, s.used(CommandKind::Invoke), s.maybe_applied);
    if cx.st.status == SagaStatus::Running && policy.allows_after(used) {
        let due = cx.now.plus_ms(policy.delay_after(used, cx.st.id, i, CommandKind::Invoke));
        let st = cx.step_mut(i);
        st.status = StepStatus::RetryScheduled;
        st.last_error = Some(message.to_owned());
        cx.schedule(TimerKey::Retry { step: i, kind: CommandKind::Invoke, attempt: attempt + 1 }, due);
        let step = cx.name(i);
        cx.emit(SagaEvent::StepRetrying { step, attempt: attempt + 1, due_at: due, error: message.to_owned() });
        return InputOutcome::Applied;
    }
    let error = format!("attempt {attempt} failed: {message}");
    if maybe_applied {
        cx.mark_maybe_applied(i, error.clone());
    } else {
        let now = cx.now;
        let st = cx.step_mut(i);
        st.status = StepStatus::Failed;
        st.finished_at = Some(now);
        st.last_error = Some(error.clone());
    }
    match cx.st.status {
        SagaStatus::Running if past_pivot(cx, i) => {
            cx.stop(StopCode::StepFailedAfterPivot, Some(i), format!("retries exhausted after the pivot: {error}"));
        }
        SagaStatus::Running => {
            let message = format!("retries exhausted after {used} attempts: {message}");
            cx.fail(Failure { step: Some(cx.name(i)), code: FailureCode::RetriesExhausted, message });
        }
        SagaStatus::Compensating => cx.begin_compensation_if_drained(),
        _ => {}
    }
    InputOutcome::Applied
}

fn compensate(cx: &mut Cx<'_>, i: StepIndex, r: &Reply) -> InputOutcome {
    let s = &cx.st.steps[i.get()];
    if r.attempt == 0 || r.attempt > s.compensation_attempts {
        return Cx::ignored(IgnoreReason::Stale, format!("compensation attempt {} of step {i} was never sent", r.attempt));
    }
    match s.status {
        StepStatus::Compensating | StepStatus::CompensationRetryScheduled | StepStatus::CompensationFailed => {}
        StepStatus::Compensated | StepStatus::CompensationSkipped => {
            return Cx::ignored(IgnoreReason::Duplicate, format!("step {i} is already compensated"));
        }
        _ => return Cx::ignored(IgnoreReason::Stale, format!("step {i} is not being compensated")),
    }
    if cx.st.compensation.as_ref().and_then(|c| c.first()) != Some(&i) {
        return Cx::ignored(IgnoreReason::Stale, format!("step {i} is not the compensation in progress"));
    }
    let current = r.attempt == s.compensation_attempts && s.status == StepStatus::Compensating;
    let (attempt, status) = (s.compensation_attempts, s.status);
    let timeout = cx.command_step(i).and_then(|c| c.compensation.as_ref()).and_then(|k| k.timeout_ms);
    let cancel_timers = |cx: &mut Cx<'_>| match status {
        StepStatus::Compensating if timeout.is_some() => {
            cx.cancel(TimerKey::StepTimeout { step: i, kind: CommandKind::Compensate, attempt });
        }
        StepStatus::CompensationRetryScheduled => {
            cx.cancel(TimerKey::Retry { step: i, kind: CommandKind::Compensate, attempt: attempt + 1 });
        }
        _ => {}
    };
    match &r.outcome {
        ReplyOutcome::Success { .. } => {
            cancel_timers(cx);
            let now = cx.now;
            let st = cx.step_mut(i);
            st.status = StepStatus::Compensated;
            st.compensated_at = Some(now);
            if let Some(c) = cx.st.compensation.as_mut() {
                c.remove(0);
            }
            if cx.st.status == SagaStatus::Stopped {
                cx.st.stop = None;
                cx.st.status = SagaStatus::Compensating;
                cx.emit(SagaEvent::Resumed);
            }
            let step = cx.name(i);
            cx.emit(SagaEvent::StepCompensated { step, skipped: false });
            cx.next_compensation();
            InputOutcome::Applied
        }
        _ if !current => {
            Cx::ignored(IgnoreReason::Stale, format!("the failure answers compensation attempt {} but step {i} is past it", r.attempt))
        }
        ReplyOutcome::Rejected { code, message } => {
            cancel_timers(cx);
            let st = cx.step_mut(i);
            st.status = StepStatus::CompensationFailed;
            st.last_error = Some(format!("{code}: {message}"));
            cx.stop(StopCode::CompensationFailed, Some(i), format!("compensation was rejected: {code}: {message}"));
            InputOutcome::Applied
        }
        ReplyOutcome::TransientFailure { message } => {
            cancel_timers(cx);
            cx.compensation_attempt_failed(i, message.clone());
            InputOutcome::Applied
        }
    }
}
