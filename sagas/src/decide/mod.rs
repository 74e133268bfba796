//! The pure decision core: `decide(definition, state, input, now) -> Transition`.
//!
//! `decide` sees one instance and one input and returns the new state and the effects the
//! runtime must carry out (send commands, schedule or cancel timers, emit lifecycle events).
//! It does no IO and reads no clock, so every saga semantic is tested without a broker.
//! One file per kind of input: `on_start`, `on_reply`, `on_heartbeat`, `on_timer`,
//! `on_event`, `on_operator`, `on_undo`; this file holds what they share.

mod on_event;
mod on_heartbeat;
mod on_operator;
mod on_reply;
mod on_start;
mod on_timer;
mod on_undo;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::{CommandStep, Definition, StepAction, StepKind};
use crate::error::{Error, Result};
use crate::ids::{CommandKind, MessageId, StepIndex, Timestamp};
use crate::protocol::ReplyOutcome;
use crate::state::{Failure, FailureCode, SagaState, SagaStatus, StepStatus, StopCode, StopReason};

/// One input to a saga instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Input {
    /// Start the instance (it must be in `created`).
    Start,
    /// A participant's reply.
    Reply(Reply),
    /// A participant working on a command reported that it is alive, with its progress.
    Heartbeat(Heartbeat),
    /// A timer came due.
    Timer(TimerKey),
    /// An external event was delivered.
    Event {
        /// The event's wire name.
        name: String,
        /// What it carries.
        payload: Value,
    },
    /// An operator's command.
    Operator(OperatorCommand),
    /// The parent saga compensates the step that started this child saga: undo it, and answer
    /// attempt `attempt` of that step's compensation once undone.
    Undo {
        /// The attempt of the parent step's compensation.
        attempt: u32,
    },
}

impl Input {
    /// A short name for logs and history (`start`, `reply`, `heartbeat`, `timer`, `event`,
    /// `operator`, `undo`).
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Start => "start",
            Input::Reply(_) => "reply",
            Input::Heartbeat(_) => "heartbeat",
            Input::Timer(_) => "timer",
            Input::Event { .. } => "event",
            Input::Operator(_) => "operator",
            Input::Undo { .. } => "undo",
        }
    }
}

/// A participant's reply to one command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The message id of the command it answers (AMQP `correlation_id`).
    pub in_reply_to: MessageId,
    /// The step.
    pub step: StepIndex,
    /// Whether it answers the step's command or its compensation.
    pub kind: CommandKind,
    /// The attempt it answers.
    pub attempt: u32,
    /// What happened.
    pub outcome: ReplyOutcome,
}

/// A participant's heartbeat for one command attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The message id of the command it is about (AMQP `correlation_id`).
    pub in_reply_to: MessageId,
    /// The step.
    pub step: StepIndex,
    /// Command or compensation (only a step's command keeps heartbeats).
    pub kind: CommandKind,
    /// The attempt.
    pub attempt: u32,
    /// What the participant reports of its progress (`null` when nothing).
    pub details: Value,
}

/// A durable timer of one instance. The runtime stores one row per `(saga, key)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "timer", rename_all = "snake_case")]
pub enum TimerKey {
    /// Send attempt `attempt` of a command or compensation.
    Retry {
        /// The step.
        step: StepIndex,
        /// Command or compensation.
        kind: CommandKind,
        /// The attempt to send.
        attempt: u32,
    },
    /// Attempt `attempt` got no reply in time.
    StepTimeout {
        /// The step.
        step: StepIndex,
        /// Command or compensation.
        kind: CommandKind,
        /// The attempt.
        attempt: u32,
    },
    /// A slot of the resource step `step` waits for was granted to it.
    SlotGranted {
        /// The step.
        step: StepIndex,
    },
    /// Attempt `attempt` of a step's command sent no heartbeat in time.
    Heartbeat {
        /// The step.
        step: StepIndex,
        /// The attempt.
        attempt: u32,
    },
    /// A wait for an external event passed its deadline.
    WaitDeadline {
        /// The wait step.
        step: StepIndex,
    },
    /// The saga deadline passed.
    SagaDeadline,
}

impl TimerKey {
    /// The step the timer is about (`None` for the saga's deadline).
    pub fn step(&self) -> Option<StepIndex> {
        match *self {
            TimerKey::Retry { step, .. }
            | TimerKey::StepTimeout { step, .. }
            | TimerKey::SlotGranted { step }
            | TimerKey::Heartbeat { step, .. }
            | TimerKey::WaitDeadline { step } => Some(step),
            TimerKey::SagaDeadline => None,
        }
    }

    /// A stable text key, unique per instance (`retry/2/invoke/3`, `saga_deadline`), for the
    /// timer table's unique index.
    pub fn id(&self) -> String {
        match self {
            TimerKey::Retry { step, kind, attempt } => format!("retry/{step}/{}/{attempt}", kind.as_str()),
            TimerKey::StepTimeout { step, kind, attempt } => format!("timeout/{step}/{}/{attempt}", kind.as_str()),
            TimerKey::Heartbeat { step, attempt } => format!("heartbeat/{step}/{attempt}"),
            TimerKey::SlotGranted { step } => format!("slot/{step}"),
            TimerKey::WaitDeadline { step } => format!("wait_deadline/{step}"),
            TimerKey::SagaDeadline => "saga_deadline".to_owned(),
        }
    }
}

/// An operator's command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum OperatorCommand {
    /// Stop going forward and compensate (refused after the pivot).
    Abort {
        /// Why, for the record.
        reason: String,
    },
    /// Send a failed compensation again with a fresh retry budget.
    RetryCompensation,
    /// Mark a failed compensation as done by hand and carry on compensating.
    SkipCompensation,
    /// Carry on a saga stopped after the pivot: send its failed step again with a fresh
    /// budget. On `compensation_failed` it does what `RetryCompensation` does.
    Resume,
}

/// A command to send, produced by `decide`; the runtime adds the envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutgoingCommand {
    /// Deterministic id: [`MessageId::for_command`].
    pub message_id: MessageId,
    /// The step.
    pub step: StepIndex,
    /// The step's name.
    pub step_name: String,
    /// Command or compensation.
    pub kind: CommandKind,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The participant.
    pub participant: String,
    /// The command's wire name (the AMQP `type`).
    pub command: String,
    /// The JSON body.
    pub body: Value,
    /// The step's heartbeat timeout (ms), for the participant to pace its heartbeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    /// The progress an earlier attempt reported in its last heartbeat, for this attempt to
    /// carry on from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
}

/// A lifecycle event, published on the events exchange for listeners.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum SagaEvent {
    Started,
    StepStarted { step: String, attempt: u32 },
    StepCompleted { step: String },
    StepSkipped { step: String },
    StepRetrying { step: String, attempt: u32, due_at: Timestamp, error: String },
    StepFailed { step: String, code: String, message: String },
    Escalated { step: String, attempt: u32 },
    Compensating { code: String, message: String },
    StepCompensated { step: String, skipped: bool },
    Completed,
    Compensated,
    Stopped { code: StopCode, message: String },
    Resumed,
}

impl SagaEvent {
    /// Whether the event is about one step (`step_*`) rather than the saga as a whole.
    pub fn is_step_level(&self) -> bool {
        matches!(
            self,
            Self::StepStarted { .. }
                | Self::StepCompleted { .. }
                | Self::StepSkipped { .. }
                | Self::StepRetrying { .. }
                | Self::StepFailed { .. }
                | Self::StepCompensated { .. }
        )
    }

    /// The wire name (`step_completed`, ...), also the last part of the routing key.
    pub fn name(&self) -> &'static str {
        match self {
            SagaEvent::Started => "started",
            SagaEvent::StepStarted { .. } => "step_started",
            SagaEvent::StepCompleted { .. } => "step_completed",
            SagaEvent::StepSkipped { .. } => "step_skipped",
            SagaEvent::StepRetrying { .. } => "step_retrying",
            SagaEvent::StepFailed { .. } => "step_failed",
            SagaEvent::Escalated { .. } => "escalated",
            SagaEvent::Compensating { .. } => "compensating",
            SagaEvent::StepCompensated { .. } => "step_compensated",
            SagaEvent::Completed => "completed",
            SagaEvent::Compensated => "compensated",
            SagaEvent::Stopped { .. } => "stopped",
            SagaEvent::Resumed => "resumed",
        }
    }
}

/// Something the runtime must do, in the same transaction as the new state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Put a command in the outbox.
    Send(OutgoingCommand),
    /// Store a timer (replacing one with the same key).
    Schedule {
        /// Which timer.
        key: TimerKey,
        /// When it is due.
        due: Timestamp,
    },
    /// Delete a timer that can no longer matter.
    Cancel {
        /// Which timer.
        key: TimerKey,
    },
    /// Publish a lifecycle event.
    Emit(SagaEvent),
    /// Queue step `step` for a slot of `resource` (at most `capacity` holders): the runtime
    /// grants it, in order of `priority` then arrival, with a [`TimerKey::SlotGranted`].
    Acquire {
        /// The step.
        step: StepIndex,
        /// The resource.
        resource: String,
        /// How many may hold it at once.
        capacity: u32,
        /// The saga's priority.
        priority: i32,
    },
    /// Give back step `step`'s slot of `resource`, or its place in the queue for one.
    Release {
        /// The step.
        step: StepIndex,
        /// The resource.
        resource: String,
    },
    /// Answer a command of the parent saga's step that started this child saga
    /// ([`SagaState::parent`]): the runtime puts a reply to attempt `attempt` of its `kind` in
    /// the outbox, to the parent's reply queue.
    ReplyToParent {
        /// The parent step's command or compensation.
        kind: CommandKind,
        /// Its attempt.
        attempt: u32,
        /// The answer.
        outcome: ReplyOutcome,
    },
}

/// Whether an input was applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputOutcome {
    /// The input changed the saga.
    Applied,
    /// A reply or timer that no longer matters: the state and effects are unchanged, the
    /// runtime records it in the history and drops it.
    Ignored {
        /// Duplicate or stale.
        reason: IgnoreReason,
        /// Why, in words.
        detail: String,
    },
    /// An event or operator command the saga cannot take now (the API answers 409).
    Refused {
        /// Why, in words.
        reason: String,
    },
}

/// Why an input was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IgnoreReason {
    /// It answers something already settled.
    Duplicate,
    /// It answers something the saga is not waiting for.
    Stale,
}

impl IgnoreReason {
    /// Both reasons (each explained in docs/protocol.md; a test checks).
    pub const ALL: [Self; 2] = [Self::Duplicate, Self::Stale];

    /// `duplicate` or `stale`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
        }
    }
}

/// What `decide` returns: the new state, the effects, and whether the input applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The new state (equal to the old one unless `outcome` is `Applied`).
    pub state: SagaState,
    /// What the runtime must do (empty unless `outcome` is `Applied`).
    pub effects: Vec<Effect>,
    /// Whether the input applied.
    pub outcome: InputOutcome,
}

impl Transition {
    /// Whether the input changed the saga.
    pub fn applied(&self) -> bool {
        self.outcome == InputOutcome::Applied
    }

    /// The commands to send.
    pub fn commands(&self) -> impl Iterator<Item = &OutgoingCommand> {
        self.effects.iter().filter_map(|e| match e {
            Effect::Send(c) => Some(c),
            _ => None,
        })
    }
}

/// Decide what `input` does to the instance `state` of `def` at time `now`.
///
/// Returns `Err` only when an invariant breaks: the state belongs to another definition or
/// version, or its shape does not match the definition. Everything else, including replies
/// that make no sense for this saga, comes back as a [`Transition`] whose outcome says so.
pub fn decide(def: &Definition, state: &SagaState, input: &Input, now: Timestamp) -> Result<Transition> {
    if state.definition != def.name || state.version != def.version {
        return Err(Error::DefinitionMismatch {
            state_name: state.definition.clone(),
            state_version: state.version,
            def_name: def.name.clone(),
            def_version: def.version,
        });
    }
    if state.steps.len() != def.steps.len() || state.node > def.nodes.len() {
        return Err(Error::InvalidData(format!(
            "instance {} has {} steps at node {} but {} v{} has {} steps and {} nodes",
            state.id,
            state.steps.len(),
            state.node,
            def.name,
            def.version,
            def.steps.len(),
            def.nodes.len()
        )));
    }
    let mut cx = Cx { def, st: state.clone(), fx: Vec::new(), now };
    let outcome = match input {
        Input::Start => on_start::handle(&mut cx),
        Input::Reply(r) => on_reply::handle(&mut cx, r),
        Input::Heartbeat(h) => on_heartbeat::handle(&mut cx, h),
        Input::Timer(t) => on_timer::handle(&mut cx, t),
        Input::Event { name, payload } => on_event::handle(&mut cx, name, payload),
        Input::Operator(op) => on_operator::handle(&mut cx, op),
        Input::Undo { attempt } => on_undo::handle(&mut cx, *attempt),
    };
    Ok(cx.finish(state, outcome))
}

/// The working state of one decision.
pub(crate) struct Cx<'a> {
    def: &'a Definition,
    st: SagaState,
    fx: Vec<Effect>,
    now: Timestamp,
}

impl Cx<'_> {
    fn finish(mut self, before: &SagaState, outcome: InputOutcome) -> Transition {
        if outcome == InputOutcome::Applied {
            self.st.updated_at = self.now;
            self.account_slots(before);
            self.answer_parent(before);
            Transition { state: self.st, effects: self.fx, outcome }
        } else {
            Transition { state: before.clone(), effects: Vec::new(), outcome }
        }
    }

    /// The resource slots the decision takes and gives back, from what it did to each limited
    /// step: one that starts waiting for a slot queues for one (`Acquire`); one that waited or
    /// held one and no longer does (it completed, failed, timed out, was cancelled) gives it
    /// back (`Release`). Derived here, in one place, so no path that moves a step can leak a
    /// slot.
    fn account_slots(&mut self, before: &SagaState) {
        let active = |s: &crate::state::StepState| {
            s.status == StepStatus::AwaitingSlot || (s.slot && matches!(s.status, StepStatus::Running | StepStatus::RetryScheduled))
        };
        for (i, step) in self.def.steps.iter().enumerate() {
            let StepAction::Command(c) = &step.action else { continue };
            let Some(limit) = &c.limit else { continue };
            let (was, now) = (&before.steps[i], &self.st.steps[i]);
            let step = StepIndex(u32::try_from(i).unwrap_or(u32::MAX));
            let resource = limit.resource.clone();
            if !active(was) && now.status == StepStatus::AwaitingSlot {
                let (capacity, priority) = (limit.capacity, self.st.priority);
                self.fx.push(Effect::Acquire { step, resource, capacity, priority });
            } else if (was.slot || was.status == StepStatus::AwaitingSlot) && !active(now) {
                self.st.steps[i].slot = false;
                self.fx.push(Effect::Release { step, resource });
            }
        }
    }

    /// A child saga's answer to its parent, derived here, in one place, from how the decision
    /// ended it: completed answers the step's command with its data; compensated answers the
    /// step's compensation when the parent asked for it (`Input::Undo`), else the step's
    /// command with the failure's code (the child failed, so the step did).
    fn answer_parent(&mut self, before: &SagaState) {
        let Some(parent) = &self.st.parent else { return };
        if before.status == self.st.status {
            return;
        }
        let answer = match (self.st.status, parent.undo) {
            (SagaStatus::Completed, _) => (CommandKind::Invoke, parent.attempt, ReplyOutcome::Success { output: self.st.data.clone() }),
            (SagaStatus::Compensated, Some(undo)) => (CommandKind::Compensate, undo, ReplyOutcome::Success { output: Value::Null }),
            (SagaStatus::Compensated, None) => {
                let (code, message) = self
                    .st
                    .failure
                    .as_ref()
                    .map_or_else(|| ("failed".to_owned(), String::new()), |f| (f.code.to_string(), f.message.clone()));
                (CommandKind::Invoke, parent.attempt, ReplyOutcome::Rejected { code, message: format!("the child saga failed: {message}") })
            }
            _ => return,
        };
        let (kind, attempt, outcome) = answer;
        self.fx.push(Effect::ReplyToParent { kind, attempt, outcome });
    }

    fn ignored(reason: IgnoreReason, detail: impl Into<String>) -> InputOutcome {
        InputOutcome::Ignored { reason, detail: detail.into() }
    }

    fn refused(reason: impl Into<String>) -> InputOutcome {
        InputOutcome::Refused { reason: reason.into() }
    }

    fn name(&self, i: StepIndex) -> String {
        self.def.steps[i.get()].name.clone()
    }

    /// Whether a message about `kind` attempt `attempt` of step `i`, carrying the command id
    /// `in_reply_to`, is about a command this saga sent (a reply or a heartbeat): `Err` with the
    /// stale outcome when the step does not exist, sends no command, or the id is another's.
    /// `mismatch` begins the detail when the id is another's ("the reply does not answer").
    fn about_command(
        &self,
        mismatch: &str,
        i: StepIndex,
        kind: CommandKind,
        attempt: u32,
        in_reply_to: MessageId,
    ) -> Result<(), InputOutcome> {
        let stale = |detail: String| Err(Self::ignored(IgnoreReason::Stale, detail));
        if i.get() >= self.def.steps.len() {
            return stale(format!("the definition has no step {i}"));
        }
        if self.command_step(i).is_none() {
            return stale(format!("step {i} waits for an event and sends no command"));
        }
        if in_reply_to != MessageId::for_command(self.st.id, i, kind, attempt) {
            return stale(format!("{mismatch} {} attempt {attempt} of step {i}", kind.as_str()));
        }
        Ok(())
    }

    fn command_step(&self, i: StepIndex) -> Option<&CommandStep> {
        match &self.def.steps[i.get()].action {
            StepAction::Command(c) => Some(c),
            StepAction::Wait(_) => None,
        }
    }

    fn emit(&mut self, e: SagaEvent) {
        self.fx.push(Effect::Emit(e));
    }

    fn schedule(&mut self, key: TimerKey, due: Timestamp) {
        self.fx.push(Effect::Schedule { key, due });
    }

    fn cancel(&mut self, key: TimerKey) {
        self.fx.push(Effect::Cancel { key });
    }

    fn step_mut(&mut self, i: StepIndex) -> &mut crate::state::StepState {
        &mut self.st.steps[i.get()]
    }

    /// Enter node `n`: start its steps, skipping those whose condition is false; move on while
    /// a node has nothing to do; complete the saga after the last node.
    fn enter_node(&mut self, mut n: usize) {
        loop {
            self.st.node = n;
            if n >= self.def.nodes.len() {
                self.complete();
                return;
            }
            let steps = self.def.nodes[n].steps().to_vec();
            let mut active = false;
            for i in steps {
                let cond = self.def.steps[i.get()].condition.clone();
                let runs = match cond.map(|c| c(&self.st.data)) {
                    None | Some(Ok(true)) => true,
                    Some(Ok(false)) => false,
                    Some(Err(e)) => {
                        self.fail_step_without_effect(i, FailureCode::InvalidData, &format!("condition could not be evaluated: {e}"));
                        return;
                    }
                };
                if !runs {
                    let now = self.now;
                    let s = self.step_mut(i);
                    s.status = StepStatus::Skipped;
                    s.finished_at = Some(now);
                    let step = self.name(i);
                    self.emit(SagaEvent::StepSkipped { step });
                    continue;
                }
                active = true;
                self.step_mut(i).started_at = Some(self.now);
                match &self.def.steps[i.get()].action {
                    StepAction::Command(_) => {
                        if !self.send_invoke(i) {
                            return;
                        }
                    }
                    StepAction::Wait(w) => {
                        let deadline = w.deadline;
                        self.step_mut(i).status = StepStatus::Waiting;
                        if let Some((ms, _)) = deadline {
                            self.schedule(TimerKey::WaitDeadline { step: i }, self.now.plus_ms(ms));
                        }
                    }
                }
            }
            if active {
                return;
            }
            n += 1;
        }
    }

    /// When every step of the current node completed or was skipped, move to the next node.
    fn advance_if_node_done(&mut self) {
        if self.st.status != SagaStatus::Running {
            return;
        }
        let done = self.def.nodes[self.st.node]
            .steps()
            .iter()
            .all(|i| matches!(self.st.steps[i.get()].status, StepStatus::Completed | StepStatus::Skipped));
        if done {
            self.enter_node(self.st.node + 1);
        }
    }

    /// Send the next attempt of step `i`'s command. Returns `false` when the command could not
    /// be built (the step then failed and the saga is failing).
    fn send_invoke(&mut self, i: StepIndex) -> bool {
        let Some(c) = self.command_step(i) else { return false };
        let body = match (c.build)(&self.st.data) {
            Ok(b) => b,
            Err(e) => {
                self.fail_step_without_effect(i, FailureCode::InvalidData, &format!("command could not be built: {e}"));
                return false;
            }
        };
        let (participant, command, timeout, heartbeat) = (c.participant.clone(), c.command.clone(), c.timeout, c.heartbeat_ms);
        if c.limit.is_some() && !self.st.steps[i.get()].slot {
            // Sent once a slot is granted (`account_slots` queues the step for one).
            self.step_mut(i).status = StepStatus::AwaitingSlot;
            return true;
        }
        let attempt = self.st.steps[i.get()].attempts + 1;
        let s = self.step_mut(i);
        s.attempts = attempt;
        s.status = StepStatus::Running;
        s.escalated = false;
        let progress = s.progress.clone();
        let step_name = self.name(i);
        self.fx.push(Effect::Send(OutgoingCommand {
            message_id: MessageId::for_command(self.st.id, i, CommandKind::Invoke, attempt),
            step: i,
            step_name: step_name.clone(),
            kind: CommandKind::Invoke,
            attempt,
            participant,
            command,
            body,
            heartbeat_ms: heartbeat,
            progress,
        }));
        if let Some(t) = timeout {
            self.schedule(TimerKey::StepTimeout { step: i, kind: CommandKind::Invoke, attempt }, self.now.plus_ms(t.after_ms));
        }
        if let Some(ms) = heartbeat {
            self.schedule(TimerKey::Heartbeat { step: i, attempt }, self.now.plus_ms(ms));
        }
        self.emit(SagaEvent::StepStarted { step: step_name, attempt });
        true
    }

    /// Cancel the timers that wait on the running attempt of step `i`'s command (its timeout
    /// and its heartbeat), except `but` (the one firing, which is consumed).
    fn cancel_attempt_timers(&mut self, i: StepIndex, but: Option<&TimerKey>) {
        let attempt = self.st.steps[i.get()].attempts;
        let Some(c) = self.command_step(i) else { return };
        let mut keys = Vec::with_capacity(2);
        if c.timeout.is_some() {
            keys.push(TimerKey::StepTimeout { step: i, kind: CommandKind::Invoke, attempt });
        }
        if c.heartbeat_ms.is_some() {
            keys.push(TimerKey::Heartbeat { step: i, attempt });
        }
        for key in keys {
            if Some(&key) != but {
                self.cancel(key);
            }
        }
    }

    /// Step `i` failed in a way that did not change anything (its command could not be built,
    /// its condition could not be evaluated): fail it and the saga.
    fn fail_step_without_effect(&mut self, i: StepIndex, code: FailureCode, message: &str) {
        let now = self.now;
        let s = self.step_mut(i);
        s.status = StepStatus::Failed;
        s.finished_at = Some(now);
        s.last_error = Some(message.to_owned());
        let failure = Failure { step: Some(self.name(i)), code, message: message.to_owned() };
        if self.def.steps[i.get()].kind == StepKind::Retriable || self.st.past_pivot {
            self.stop(StopCode::StepFailedAfterPivot, Some(i), message.to_owned());
        } else {
            self.fail(failure);
        }
    }

    /// Mark step `i` as possibly completed (it timed out, or its retries ran out after an
    /// attempt that timed out): it is compensated like a completed step.
    fn mark_maybe_applied(&mut self, i: StepIndex, error: String) {
        let now = self.now;
        let s = self.step_mut(i);
        s.status = StepStatus::TimedOut;
        s.maybe_applied = true;
        s.finished_at = Some(now);
        s.last_error = Some(error);
        if !self.st.completed.contains(&i) {
            self.st.completed.push(i);
        }
    }

    /// The saga failed: stop going forward and compensate. In-flight commands of the current
    /// node are waited for first (a branch that completes late is compensated too); scheduled
    /// retries and waits of the node are cancelled.
    fn fail(&mut self, failure: Failure) {
        debug_assert!(!self.st.past_pivot, "a saga past its pivot never compensates");
        self.emit(SagaEvent::Compensating { code: failure.code.to_string(), message: failure.message.clone() });
        if let Some(step) = &failure.step {
            self.emit(SagaEvent::StepFailed { step: step.clone(), code: failure.code.to_string(), message: failure.message.clone() });
        }
        self.st.failure = Some(failure);
        self.st.status = SagaStatus::Compensating;
        if self.st.deadline_at.take().is_some() {
            self.cancel(TimerKey::SagaDeadline);
        }
        if self.st.node < self.def.nodes.len() {
            for i in self.def.nodes[self.st.node].steps().to_vec() {
                match self.st.steps[i.get()].status {
                    StepStatus::RetryScheduled => {
                        let attempt = self.st.steps[i.get()].attempts + 1;
                        self.cancel(TimerKey::Retry { step: i, kind: CommandKind::Invoke, attempt });
                        if self.st.steps[i.get()].maybe_applied {
                            self.mark_maybe_applied(i, "cancelled after an attempt that timed out".into());
                        } else {
                            let now = self.now;
                            let s = self.step_mut(i);
                            s.status = StepStatus::Failed;
                            s.finished_at = Some(now);
                        }
                    }
                    StepStatus::Waiting => {
                        self.step_mut(i).status = StepStatus::Cancelled;
                        self.cancel(TimerKey::WaitDeadline { step: i });
                    }
                    StepStatus::Pending | StepStatus::AwaitingSlot => self.step_mut(i).status = StepStatus::Cancelled,
                    _ => {}
                }
            }
        }
        self.begin_compensation_if_drained();
    }

    /// Once no command of the current node is in flight, start compensating.
    fn begin_compensation_if_drained(&mut self) {
        if self.st.status != SagaStatus::Compensating || self.st.compensation.is_some() {
            return;
        }
        if self.st.node < self.def.nodes.len()
            && self.def.nodes[self.st.node].steps().iter().any(|i| self.st.steps[i.get()].status == StepStatus::Running)
        {
            return;
        }
        let pending: Vec<StepIndex> = self
            .st
            .completed
            .iter()
            .rev()
            .copied()
            .filter(|&i| self.command_step(i).is_some_and(|c| c.compensation.is_some()))
            .filter(|&i| self.def.steps[i.get()].kind != StepKind::Retriable)
            .collect();
        self.st.compensation = Some(pending);
        self.next_compensation();
    }

    /// Send the next compensation, or end compensated.
    fn next_compensation(&mut self) {
        let next = self.st.compensation.as_ref().and_then(|c| c.first().copied());
        match next {
            Some(i) => self.send_compensation(i),
            None => {
                self.st.status = SagaStatus::Compensated;
                self.emit(SagaEvent::Compensated);
            }
        }
    }

    fn send_compensation(&mut self, i: StepIndex) {
        let Some(k) = self.command_step(i).and_then(|c| c.compensation.clone()) else {
            return;
        };
        let body = match (k.build)(&self.st.data) {
            Ok(b) => b,
            Err(e) => {
                self.step_mut(i).status = StepStatus::CompensationFailed;
                self.stop(StopCode::CompensationFailed, Some(i), format!("compensation could not be built: {e}"));
                return;
            }
        };
        let attempt = self.st.steps[i.get()].compensation_attempts + 1;
        let s = self.step_mut(i);
        s.compensation_attempts = attempt;
        s.status = StepStatus::Compensating;
        self.fx.push(Effect::Send(OutgoingCommand {
            message_id: MessageId::for_command(self.st.id, i, CommandKind::Compensate, attempt),
            step: i,
            step_name: self.name(i),
            kind: CommandKind::Compensate,
            attempt,
            participant: k.participant,
            command: k.command,
            body,
            heartbeat_ms: None,
            progress: None,
        }));
        if let Some(ms) = k.timeout_ms {
            self.schedule(TimerKey::StepTimeout { step: i, kind: CommandKind::Compensate, attempt }, self.now.plus_ms(ms));
        }
    }

    /// A compensation attempt failed (transiently, or timed out): retry under its policy or
    /// stop in `compensation_failed`.
    fn compensation_attempt_failed(&mut self, i: StepIndex, error: String) {
        let Some(k) = self.command_step(i).and_then(|c| c.compensation.clone()) else { return };
        let s = &self.st.steps[i.get()];
        let attempt = s.compensation_attempts;
        if k.retry.allows_after(s.used(CommandKind::Compensate)) {
            let due = self.now.plus_ms(k.retry.delay_after(s.used(CommandKind::Compensate), self.st.id, i, CommandKind::Compensate));
            let st = self.step_mut(i);
            st.status = StepStatus::CompensationRetryScheduled;
            st.last_error = Some(error);
            self.schedule(TimerKey::Retry { step: i, kind: CommandKind::Compensate, attempt: attempt + 1 }, due);
        } else {
            let st = self.step_mut(i);
            st.status = StepStatus::CompensationFailed;
            st.last_error = Some(error.clone());
            self.stop(StopCode::CompensationFailed, Some(i), format!("compensation gave up after {attempt} attempts: {error}"));
        }
    }

    /// Every node completed.
    fn complete(&mut self) {
        self.st.status = SagaStatus::Completed;
        if self.st.deadline_at.take().is_some() {
            self.cancel(TimerKey::SagaDeadline);
        }
        self.emit(SagaEvent::Completed);
    }

    /// Stop for an operator. In-flight replies are still recorded; scheduled retries of the
    /// current node are cancelled (a `resume` sends them again).
    fn stop(&mut self, code: StopCode, step: Option<StepIndex>, message: String) {
        if code != StopCode::CompensationFailed && self.st.node < self.def.nodes.len() {
            for i in self.def.nodes[self.st.node].steps().to_vec() {
                match self.st.steps[i.get()].status {
                    StepStatus::RetryScheduled => {
                        let attempt = self.st.steps[i.get()].attempts + 1;
                        self.cancel(TimerKey::Retry { step: i, kind: CommandKind::Invoke, attempt });
                        self.step_mut(i).status = StepStatus::Failed;
                    }
                    // Not sent: it waits for a slot again when resumed.
                    StepStatus::AwaitingSlot => self.step_mut(i).status = StepStatus::Failed,
                    _ => {}
                }
            }
        }
        self.st.status = SagaStatus::Stopped;
        self.st.stop = Some(StopReason { code, step: step.map(|i| self.name(i)), message: message.clone() });
        self.emit(SagaEvent::Stopped { code, message });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReplyOutcome;

    #[test]
    fn every_input_and_effect_survives_a_json_round_trip() {
        let inputs = [
            Input::Start,
            Input::Reply(Reply {
                in_reply_to: MessageId::new_random(),
                step: StepIndex(1),
                kind: CommandKind::Compensate,
                attempt: 2,
                outcome: ReplyOutcome::Rejected { code: "c".into(), message: "m".into() },
            }),
            Input::Timer(TimerKey::Retry { step: StepIndex(2), kind: CommandKind::Invoke, attempt: 3 }),
            Input::Timer(TimerKey::SagaDeadline),
            Input::Event { name: "approved".into(), payload: serde_json::json!({"by": "ops"}) },
            Input::Operator(OperatorCommand::Abort { reason: "customer cancelled".into() }),
            Input::Operator(OperatorCommand::SkipCompensation),
        ];
        let effects = [
            Effect::Emit(SagaEvent::Completed),
            Effect::Cancel { key: TimerKey::SagaDeadline },
            Effect::Schedule { key: TimerKey::WaitDeadline { step: StepIndex(1) }, due: crate::Timestamp(5) },
        ];
        for e in effects {
            let json = serde_json::to_value(&e).unwrap();
            assert_eq!(serde_json::from_value::<Effect>(json.clone()).unwrap(), e, "{json}");
        }
        for input in inputs {
            let json = serde_json::to_value(&input).unwrap();
            assert_eq!(json["type"], input.kind(), "{json}");
            let back: Input = serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(back, input);
        }
    }
}
