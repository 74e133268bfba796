//! `Input::Operator`: abort, retry or skip a failed compensation, resume a stopped saga.
//! A command that does not fit the saga's state is refused with the reason.

use super::{Cx, InputOutcome, OperatorCommand, SagaEvent};
use crate::state::{Failure, FailureCode, SagaStatus, StepStatus, StopCode};

pub(super) fn handle(cx: &mut Cx<'_>, op: &OperatorCommand) -> InputOutcome {
    let stop = cx.st.stop.as_ref().map(|s| s.code);
    match (op, cx.st.status, stop) {
        (OperatorCommand::Abort { reason }, SagaStatus::Running, _) => {
            if cx.st.past_pivot {
                return Cx::refused("the saga is past its pivot and can only go forward");
            }
            cx.fail(Failure { step: None, code: FailureCode::Aborted, message: reason.clone() });
            InputOutcome::Applied
        }
        (OperatorCommand::Abort { .. }, SagaStatus::Stopped, _) => {
            Cx::refused("the saga is stopped; use retry or skip (compensation_failed) or resume")
        }
        (OperatorCommand::RetryCompensation | OperatorCommand::Resume, SagaStatus::Stopped, Some(StopCode::CompensationFailed)) => {
            let Some(i) = cx.st.compensation.as_ref().and_then(|c| c.first().copied()) else {
                return Cx::refused("no compensation is pending");
            };
            let s = cx.step_mut(i);
            s.compensation_budget_from = s.compensation_attempts;
            cx.st.stop = None;
            cx.st.status = SagaStatus::Compensating;
            cx.emit(SagaEvent::Resumed);
            cx.send_compensation(i);
            InputOutcome::Applied
        }
        (OperatorCommand::SkipCompensation, SagaStatus::Stopped, Some(StopCode::CompensationFailed)) => {
            let Some(i) = cx.st.compensation.as_ref().and_then(|c| c.first().copied()) else {
                return Cx::refused("no compensation is pending");
            };
            let now = cx.now;
            let s = cx.step_mut(i);
            s.status = StepStatus::CompensationSkipped;
            s.compensated_at = Some(now);
            if let Some(c) = cx.st.compensation.as_mut() {
                c.remove(0);
            }
            cx.st.stop = None;
            cx.st.status = SagaStatus::Compensating;
            let step = cx.name(i);
            cx.emit(SagaEvent::StepCompensated { step, skipped: true });
            cx.next_compensation();
            InputOutcome::Applied
        }
        (OperatorCommand::Resume, SagaStatus::Stopped, Some(_)) => {
            cx.st.stop = None;
            cx.st.status = SagaStatus::Running;
            cx.emit(SagaEvent::Resumed);
            for i in cx.def.nodes[cx.st.node].steps().to_vec() {
                if matches!(cx.st.steps[i.get()].status, StepStatus::Failed | StepStatus::TimedOut) {
                    let s = cx.step_mut(i);
                    s.budget_from = s.attempts;
                    s.finished_at = None;
                    cx.st.completed.retain(|&c| c != i);
                    if !cx.send_invoke(i) {
                        return InputOutcome::Applied;
                    }
                }
            }
            cx.advance_if_node_done();
            InputOutcome::Applied
        }
        (OperatorCommand::RetryCompensation | OperatorCommand::SkipCompensation, _, _) => {
            Cx::refused(format!("the saga is {} and has no failed compensation", describe(cx)))
        }
        (OperatorCommand::Resume, _, _) => Cx::refused(format!("the saga is {}, not stopped", describe(cx))),
        (OperatorCommand::Abort { .. }, _, _) => Cx::refused(format!("the saga is {} and cannot be aborted", describe(cx))),
    }
}

fn describe(cx: &Cx<'_>) -> String {
    match &cx.st.stop {
        Some(s) => format!("stopped ({})", s.code.as_str()),
        None => cx.st.status.as_str().to_owned(),
    }
}
