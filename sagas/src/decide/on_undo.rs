//! `Input::Undo`: the parent saga compensates the step that started this child saga. A child
//! that completed (or still runs) before its pivot compensates, and answers the parent's
//! compensation once compensated (`Cx::answer_parent`); one already compensated answers at
//! once; one past its pivot cannot be undone, and says so (the parent's compensation is
//! rejected, and the parent stops for an operator).

use serde_json::Value;

use super::{Cx, Effect, IgnoreReason, InputOutcome};
use crate::ids::CommandKind;
use crate::protocol::ReplyOutcome;
use crate::state::{Failure, FailureCode, SagaStatus, StopCode};

pub(super) fn handle(cx: &mut Cx<'_>, attempt: u32) -> InputOutcome {
    let Some(parent) = cx.st.parent.as_mut() else {
        return Cx::refused("the saga is not a child saga: no parent can undo it");
    };
    match parent.undo {
        Some(asked) if asked == attempt => {
            return Cx::ignored(IgnoreReason::Duplicate, format!("compensation attempt {attempt} already asked"));
        }
        Some(asked) if asked > attempt => {
            return Cx::ignored(IgnoreReason::Stale, format!("compensation attempt {attempt} came after attempt {asked}"));
        }
        _ => {}
    }
    parent.undo = Some(attempt);
    let why = format!("its parent saga {} compensated step `{}`", parent.saga_id, parent.step_name);
    let answer = |outcome| Effect::ReplyToParent { kind: CommandKind::Compensate, attempt, outcome };
    let stop = cx.st.stop.as_ref().map(|s| s.code);
    match (cx.st.status, cx.st.past_pivot, stop) {
        (SagaStatus::Created, ..) => return Cx::refused("the saga has not started"),
        // Nothing of it is left to undo.
        (SagaStatus::Compensated, ..) => cx.fx.push(answer(ReplyOutcome::Success { output: Value::Null })),
        (SagaStatus::Completed | SagaStatus::Running, false, _) => {
            cx.fail(Failure { step: None, code: FailureCode::ParentCompensated, message: why });
        }
        // Undoing already: answered when compensated.
        (SagaStatus::Compensating, ..) | (SagaStatus::Stopped, _, Some(StopCode::CompensationFailed)) => {}
        _ => {
            let message = format!("the child saga {} is past its pivot and can only go forward; it cannot be undone", cx.st.id);
            cx.fx.push(answer(ReplyOutcome::Rejected { code: "child_past_pivot".into(), message }));
        }
    }
    InputOutcome::Applied
}
