//! `Input::Heartbeat`: a participant working on a command reported that it is alive.
//!
//! A heartbeat for the attempt the step waits on keeps its details as the step's progress (the
//! next attempt's command carries them) and, when the step has a heartbeat timeout, moves that
//! timer to `now` + the timeout. Any other heartbeat (an attempt that was answered, timed out
//! or never sent; a compensation) is ignored as stale.

use super::{Cx, Heartbeat, IgnoreReason, InputOutcome, TimerKey};
use crate::ids::CommandKind;
use crate::state::StepStatus;

pub(super) fn handle(cx: &mut Cx<'_>, h: &Heartbeat) -> InputOutcome {
    let i = h.step;
    if let Err(stale) = cx.about_command("the heartbeat is not about", i, h.kind, h.attempt, h.in_reply_to) {
        return stale;
    }
    let stale = |detail: String| Cx::ignored(IgnoreReason::Stale, detail);
    let heartbeat_ms = cx.command_step(i).and_then(|c| c.heartbeat_ms);
    if h.kind == CommandKind::Compensate {
        return stale("only a step's command keeps heartbeats, not its compensation".into());
    }
    let s = &cx.st.steps[i.get()];
    if s.status != StepStatus::Running || h.attempt != s.attempts {
        return stale(format!("attempt {} of step {i} is not running", h.attempt));
    }
    let now = cx.now;
    let s = cx.step_mut(i);
    s.progress = Some(h.details.clone());
    s.heartbeat_at = Some(now);
    if let Some(ms) = heartbeat_ms {
        cx.schedule(TimerKey::Heartbeat { step: i, attempt: h.attempt }, now.plus_ms(ms));
    }
    InputOutcome::Applied
}
