//! `Input::Event`: an external event was delivered. Only a saga waiting for that event at
//! that moment takes it; anything else is refused, so the sender learns it was not used.

use serde_json::Value;

use super::{Cx, InputOutcome, SagaEvent, TimerKey};
use crate::definition::StepAction;
use crate::state::{SagaStatus, StepStatus};

pub(super) fn handle(cx: &mut Cx<'_>, name: &str, payload: &Value) -> InputOutcome {
    if cx.st.status != SagaStatus::Running {
        return Cx::refused(format!("the saga is {}, not waiting for events", cx.st.status.as_str()));
    }
    let waiting = cx.def.nodes.get(cx.st.node).and_then(|n| {
        n.steps().iter().copied().find(|i| {
            cx.st.steps[i.get()].status == StepStatus::Waiting
                && matches!(&cx.def.steps[i.get()].action, StepAction::Wait(w) if w.event == name)
        })
    });
    let Some(i) = waiting else {
        return Cx::refused(format!("the saga is not waiting for event `{name}`"));
    };
    let StepAction::Wait(w) = &cx.def.steps[i.get()].action else { unreachable!("found as a wait above") };
    let (apply, has_deadline) = (w.on_event.clone(), w.deadline.is_some());
    if let Some(f) = apply
        && let Err(e) = f(&mut cx.st.data, payload)
    {
        return Cx::refused(format!("event `{name}` does not fit the wait: {e}"));
    }
    let now = cx.now;
    let s = cx.step_mut(i);
    s.status = StepStatus::Completed;
    s.finished_at = Some(now);
    s.output = Some(payload.clone());
    if has_deadline {
        cx.cancel(TimerKey::WaitDeadline { step: i });
    }
    let step = cx.name(i);
    cx.emit(SagaEvent::StepCompleted { step });
    cx.advance_if_node_done();
    InputOutcome::Applied
}
