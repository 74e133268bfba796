//! `Input::Start`: begin the first node.

use super::{Cx, IgnoreReason, InputOutcome, SagaEvent, TimerKey};
use crate::state::SagaStatus;

pub(super) fn handle(cx: &mut Cx<'_>) -> InputOutcome {
    if cx.st.status != SagaStatus::Created {
        return Cx::ignored(IgnoreReason::Duplicate, "the saga has already started");
    }
    cx.st.status = SagaStatus::Running;
    cx.emit(SagaEvent::Started);
    if let Some(at) = cx.st.deadline_at {
        cx.schedule(TimerKey::SagaDeadline, at);
    }
    cx.enter_node(0);
    InputOutcome::Applied
}
