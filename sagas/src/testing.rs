//! Unit-test a saga definition without a broker: a given/when/then driver on top of
//! [`decide`](crate::decide()). It keeps the instance, the timers `decide` scheduled and
//! everything it sent, and lets a test answer commands, move time and play the operator.
//!
//! ```
//! # use serde::{Deserialize, Serialize};
//! # use sagas::{Command, SagaDefinition, SagaStatus};
//! # #[derive(Serialize, Deserialize)] struct Pay { cents: u64 }
//! # impl Command for Pay { const NAME: &'static str = "payment.charge"; const PARTICIPANT: &'static str = "payment"; type Reply = (); }
//! # #[derive(Serialize, Deserialize)] struct Refund;
//! # impl Command for Refund { const NAME: &'static str = "payment.refund"; const PARTICIPANT: &'static str = "payment"; type Reply = (); }
//! # #[derive(Serialize, Deserialize)] struct Ship;
//! # impl Command for Ship { const NAME: &'static str = "shipping.ship"; const PARTICIPANT: &'static str = "shipping"; type Reply = (); }
//! use sagas::testing::SagaTest;
//! let def = SagaDefinition::<u64>::builder("pay_then_ship", 1)
//!     .step("charge", |s| s.invoke(|c: &u64| Pay { cents: *c }).compensate(|_| Refund))
//!     .step("ship", |s| s.invoke(|_| Ship))
//!     .build().unwrap();
//! let mut t = SagaTest::start(&def, &1999).unwrap();   // given a started saga
//! t.succeed("charge", serde_json::Value::Null);          // when the charge succeeds
//! t.reject("ship", "no_address");                        // and shipping refuses
//! t.succeed_compensation("charge");                      // and the refund goes through
//! assert_eq!(t.status(), SagaStatus::Compensated);       // then the saga is compensated
//! assert_eq!(t.compensations_sent(), vec!["charge"]);
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::decide::{
    Effect, Heartbeat, Input, InputOutcome, OperatorCommand, OutgoingCommand, Reply, SagaEvent, TimerKey, Transition, decide,
};
use crate::definition::{Definition, SagaData, SagaDefinition};
use crate::error::Result;
use crate::ids::{CommandKind, MessageId, SagaId, StepIndex, Timestamp};
use crate::protocol::ReplyOutcome;
use crate::state::{ParentLink, SagaState, SagaStatus, StepStatus};

/// Drives one saga instance through `decide`.
pub struct SagaTest {
    def: Arc<Definition>,
    state: SagaState,
    now: Timestamp,
    timers: BTreeMap<String, (TimerKey, Timestamp)>,
    sent: Vec<OutgoingCommand>,
    events: Vec<SagaEvent>,
    last: Option<InputOutcome>,
    slots: std::collections::BTreeSet<StepIndex>,
    answers: Vec<(CommandKind, u32, ReplyOutcome)>,
}

impl SagaTest {
    /// Given: a saga of `def` started with `input` at time 0.
    pub fn start<D: SagaData>(def: &SagaDefinition<D>, input: &D) -> Result<Self> {
        let data = def.encode_input(input)?;
        Self::start_erased(def.erased(), data)
    }

    /// Given: a saga of `def` started with `input` at time 0 as the child saga of attempt 1 of
    /// step 0 (`child`) of a parent saga: [`answers`](Self::answers) shows what it replies to
    /// its parent, [`undo`](Self::undo) plays the parent compensating it.
    pub fn start_child<D: SagaData>(def: &SagaDefinition<D>, input: &D) -> Result<Self> {
        let parent = ParentLink {
            saga_id: SagaId(uuid::Uuid::from_u128(0x9a7e)),
            definition: "parent".into(),
            version: 1,
            step: StepIndex(0),
            step_name: "child".into(),
            attempt: 1,
            undo: None,
            depth: 1,
        };
        Self::begin(def.erased(), def.encode_input(input)?, Some(parent))
    }

    /// Like [`start`](Self::start), with a type-erased definition and JSON input.
    pub fn start_erased(def: Arc<Definition>, input: Value) -> Result<Self> {
        Self::begin(def, input, None)
    }

    fn begin(def: Arc<Definition>, input: Value, parent: Option<ParentLink>) -> Result<Self> {
        let id = SagaId(uuid::Uuid::from_u128(0x5a6a));
        let now = Timestamp(1_000_000);
        let mut state = SagaState::new(&def, id, input, now);
        state.parent = parent;
        let mut t = Self {
            def,
            state,
            now,
            timers: BTreeMap::new(),
            sent: Vec::new(),
            events: Vec::new(),
            last: None,
            slots: std::collections::BTreeSet::new(),
            answers: Vec::new(),
        };
        t.apply(&Input::Start)?;
        Ok(t)
    }

    /// Feed any input; returns the transition.
    pub fn apply(&mut self, input: &Input) -> Result<Transition> {
        let t = decide(&self.def, &self.state, input, self.now)?;
        if let Input::Timer(key) = input {
            // a timer fires once: the runtime deletes its row in the same transaction
            self.timers.remove(&key.id());
        }
        for e in &t.effects {
            match e {
                Effect::Send(c) => self.sent.push(c.clone()),
                Effect::Schedule { key, due } => {
                    self.timers.insert(key.id(), (key.clone(), *due));
                }
                Effect::Cancel { key } => {
                    self.timers.remove(&key.id());
                }
                Effect::Emit(ev) => self.events.push(ev.clone()),
                Effect::Acquire { step, .. } => {
                    self.slots.insert(*step);
                }
                Effect::Release { step, .. } => {
                    self.slots.remove(step);
                }
                Effect::ReplyToParent { kind, attempt, outcome } => self.answers.push((*kind, *attempt, outcome.clone())),
            }
        }
        self.state = t.state.clone();
        self.last = Some(t.outcome.clone());
        Ok(t)
    }

    fn step_index(&self, name: &str) -> StepIndex {
        self.def.step_named(name).unwrap_or_else(|| panic!("no step named `{name}` in {}", self.def.name)).index
    }

    /// A reply to the current attempt of `step`'s command (`kind`).
    pub fn reply_to(&self, step: &str, kind: CommandKind, outcome: ReplyOutcome) -> Reply {
        let i = self.step_index(step);
        let s = &self.state.steps[i.get()];
        let attempt = match kind {
            CommandKind::Invoke => s.attempts,
            CommandKind::Compensate => s.compensation_attempts,
        };
        Reply { in_reply_to: MessageId::for_command(self.state.id, i, kind, attempt), step: i, kind, attempt, outcome }
    }

    fn answer(&mut self, step: &str, kind: CommandKind, outcome: ReplyOutcome) -> InputOutcome {
        let r = self.reply_to(step, kind, outcome);
        self.apply(&Input::Reply(r)).expect("decide").outcome
    }

    /// When: `step`'s current attempt succeeds with `output`.
    pub fn succeed(&mut self, step: &str, output: Value) -> InputOutcome {
        self.answer(step, CommandKind::Invoke, ReplyOutcome::Success { output })
    }

    /// When: `step`'s current attempt is rejected with `code`.
    pub fn reject(&mut self, step: &str, code: &str) -> InputOutcome {
        self.answer(step, CommandKind::Invoke, ReplyOutcome::Rejected { code: code.into(), message: format!("{code} (test)") })
    }

    /// When: `step`'s current attempt fails transiently.
    pub fn fail_transiently(&mut self, step: &str) -> InputOutcome {
        self.answer(step, CommandKind::Invoke, ReplyOutcome::TransientFailure { message: "transient (test)".into() })
    }

    /// When: the participant running `step`'s current attempt sends a heartbeat with `details`.
    pub fn heartbeat(&mut self, step: &str, details: Value) -> InputOutcome {
        let i = self.step_index(step);
        let attempt = self.state.steps[i.get()].attempts;
        let in_reply_to = MessageId::for_command(self.state.id, i, CommandKind::Invoke, attempt);
        let h = Heartbeat { in_reply_to, step: i, kind: CommandKind::Invoke, attempt, details };
        self.apply(&Input::Heartbeat(h)).expect("decide").outcome
    }

    /// When: `step`'s current compensation attempt succeeds.
    pub fn succeed_compensation(&mut self, step: &str) -> InputOutcome {
        self.answer(step, CommandKind::Compensate, ReplyOutcome::Success { output: Value::Null })
    }

    /// When: `step`'s current compensation attempt fails transiently.
    pub fn fail_compensation(&mut self, step: &str) -> InputOutcome {
        self.answer(step, CommandKind::Compensate, ReplyOutcome::TransientFailure { message: "compensation failed (test)".into() })
    }

    /// When: the resource `step` waits for grants it a slot.
    pub fn grant(&mut self, step: &str) -> InputOutcome {
        let i = self.step_index(step);
        self.apply(&Input::Timer(TimerKey::SlotGranted { step: i })).expect("decide").outcome
    }

    /// Then: the steps queued for or holding a resource slot (acquired and not released).
    pub fn slots(&self) -> Vec<&str> {
        self.slots.iter().map(|i| self.def.steps[i.get()].name.as_str()).collect()
    }

    /// When: external event `name` arrives.
    pub fn event(&mut self, name: &str, payload: Value) -> InputOutcome {
        self.apply(&Input::Event { name: name.into(), payload }).expect("decide").outcome
    }

    /// When: an operator sends `cmd`.
    pub fn operator(&mut self, cmd: OperatorCommand) -> InputOutcome {
        self.apply(&Input::Operator(cmd)).expect("decide").outcome
    }

    /// When: the parent of this child saga compensates the step that started it (the next
    /// attempt of that step's compensation).
    pub fn undo(&mut self) -> InputOutcome {
        let attempt = self.state.parent.as_ref().and_then(|p| p.undo).unwrap_or(0) + 1;
        self.apply(&Input::Undo { attempt }).expect("decide").outcome
    }

    /// Then: what this child saga replied to its parent's step, in order: the parent's command
    /// or compensation, its attempt, the answer.
    pub fn answers(&self) -> &[(CommandKind, u32, ReplyOutcome)] {
        &self.answers
    }

    /// When: `ms` milliseconds pass; every timer that comes due fires, earliest first.
    pub fn advance(&mut self, ms: u64) -> Vec<InputOutcome> {
        let until = self.now.plus_ms(ms);
        let mut outcomes = Vec::new();
        while let Some((id, key, due)) = self.next_timer_before(until) {
            self.timers.remove(&id);
            self.now = self.now.max(due);
            outcomes.push(self.apply(&Input::Timer(key)).expect("decide").outcome);
        }
        self.now = until;
        outcomes
    }

    fn next_timer_before(&self, until: Timestamp) -> Option<(String, TimerKey, Timestamp)> {
        self.timers
            .iter()
            .filter(|(_, (_, due))| *due <= until)
            .min_by_key(|(_, (_, due))| *due)
            .map(|(id, (k, d))| (id.clone(), k.clone(), *d))
    }

    /// Then: the saga's status.
    pub fn status(&self) -> SagaStatus {
        self.state.status
    }

    /// Then: the instance.
    pub fn state(&self) -> &SagaState {
        &self.state
    }

    /// Then: the status of `step`.
    pub fn step_status(&self, step: &str) -> StepStatus {
        self.state.steps[self.step_index(step).get()].status
    }

    /// Then: every command sent, in order.
    pub fn sent(&self) -> &[OutgoingCommand] {
        &self.sent
    }

    /// Then: the steps whose command was sent (each attempt once), in order.
    pub fn invocations_sent(&self) -> Vec<&str> {
        self.sent.iter().filter(|c| c.kind == CommandKind::Invoke).map(|c| c.step_name.as_str()).collect()
    }

    /// Then: the steps whose compensation was first sent, in order.
    pub fn compensations_sent(&self) -> Vec<&str> {
        self.sent.iter().filter(|c| c.kind == CommandKind::Compensate && c.attempt == 1).map(|c| c.step_name.as_str()).collect()
    }

    /// Then: every lifecycle event, in order.
    pub fn events(&self) -> &[SagaEvent] {
        &self.events
    }

    /// Then: the timers still scheduled.
    pub fn timers(&self) -> Vec<(TimerKey, Timestamp)> {
        self.timers.values().cloned().collect()
    }

    /// Then: the outcome of the last input.
    pub fn last_outcome(&self) -> Option<&InputOutcome> {
        self.last.as_ref()
    }

    /// The current test time.
    pub fn now(&self) -> Timestamp {
        self.now
    }
}
