//! Property tests of `decide`: random definitions (steps, parallel groups, waits, conditions,
//! pivots, retry and timeout policies) driven by random inputs, including duplicate and stale
//! replies, heartbeats (current and stale), timers fired in any order, events and operator
//! commands.
//!
//! Invariants:
//! 1. an ignored or refused input changes neither state nor effects;
//! 2. every state is terminal, stopped with a reason, or waiting on something that can move
//!    it (a command in flight, a scheduled timer, an awaited event); a terminal saga keeps no
//!    timer;
//! 3. no command or compensation is sent more often than its retry policy allows;
//! 4. compensations are issued exactly for the compensatable steps that completed (or may
//!    have: timed out), in reverse order of completion (steps that settle in the same
//!    transition, such as branches marked timed out when their group fails, in any order);
//! 5. a fair continuation (every command answered, every timer fired, every slot granted) ends
//!    every saga in `completed` or `compensated`;
//! 6. a resource slot is acquired and released once per wait, held only by a step that waits
//!    for it or runs with it, and none is left by a saga that ended;
//! 7. a child saga (some run as one, undone by their parent at random) answers its parent's
//!    command once, when it ends (its data when completed, its failure when compensated without
//!    being undone), and the parent's last compensation once: done when compensated, refused
//!    when past its pivot; a saga that is not a child answers nothing.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;
use sagas::definition::StepBuilder;
use sagas::testing::SagaTest;
use sagas::{
    Command, CommandKind, Definition, Effect, Heartbeat, Input, InputOutcome, NoCommand, OnDeadline, OnTimeout, OperatorCommand, Reply,
    ReplyOutcome, RetryPolicy, SagaDefinition, SagaStatus, StepAction, StepKind, StepStatus, TimerKey,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Serialize, Deserialize)]
struct Do;
impl Command for Do {
    const NAME: &'static str = "prop.do";
    const PARTICIPANT: &'static str = "prop";
    type Reply = Value;
}
#[derive(Serialize, Deserialize)]
struct Undo;
impl Command for Undo {
    const NAME: &'static str = "prop.undo";
    const PARTICIPANT: &'static str = "prop";
    type Reply = ();
}

#[derive(Debug, Clone)]
struct CmdSpec {
    comp: bool,
    max: u32,
    comp_max: u32,
    timeout: Option<OnTimeout>,
    comp_timeout: bool,
    cond: Option<usize>,
    heartbeat: bool,
    limit: bool,
}

#[derive(Debug, Clone)]
enum NodeSpec {
    Cmd(CmdSpec),
    Wait(Option<OnDeadline>, Option<usize>),
    Par(Vec<CmdSpec>),
}

#[derive(Debug, Clone)]
struct SagaSpec {
    nodes: Vec<NodeSpec>,
    pivot: Option<usize>,
    deadline: bool,
    flags: Vec<bool>,
    child: bool,
}

fn cmd_spec() -> impl Strategy<Value = CmdSpec> {
    (
        any::<bool>(),
        1u32..4,
        1u32..4,
        prop_oneof![Just(None), Just(Some(OnTimeout::Retry)), Just(Some(OnTimeout::Fail)), Just(Some(OnTimeout::Escalate))],
        any::<bool>(),
        prop_oneof![3 => Just(None), 1 => (0usize..4).prop_map(Some)],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(comp, max, comp_max, timeout, comp_timeout, cond, heartbeat, limit)| CmdSpec {
            comp,
            max,
            comp_max,
            timeout,
            comp_timeout,
            cond,
            heartbeat,
            limit,
        })
}

fn node_spec() -> impl Strategy<Value = NodeSpec> {
    prop_oneof![
        5 => cmd_spec().prop_map(NodeSpec::Cmd),
        1 => (prop_oneof![Just(None), Just(Some(OnDeadline::Fail)), Just(Some(OnDeadline::Continue))], prop_oneof![Just(None), (0usize..4).prop_map(Some)])
            .prop_map(|(d, c)| NodeSpec::Wait(d, c)),
        2 => prop::collection::vec(cmd_spec(), 2..4).prop_map(NodeSpec::Par),
    ]
}

fn saga_spec() -> impl Strategy<Value = SagaSpec> {
    (
        prop::collection::vec(node_spec(), 1..6),
        prop::option::of(0usize..6),
        any::<bool>(),
        prop::collection::vec(any::<bool>(), 4),
        any::<bool>(),
    )
        .prop_map(|(mut nodes, pivot, deadline, flags, child)| {
            let pivot = pivot.filter(|p| *p < nodes.len());
            if let Some(p) = pivot {
                if let NodeSpec::Cmd(_) = nodes[p] {
                } else {
                    nodes[p] = NodeSpec::Cmd(CmdSpec {
                        comp: true,
                        max: 2,
                        comp_max: 2,
                        timeout: None,
                        comp_timeout: false,
                        cond: None,
                        heartbeat: false,
                        limit: false,
                    });
                }
                for n in nodes.iter_mut().skip(p + 1) {
                    match n {
                        NodeSpec::Cmd(c) => c.comp = false,
                        NodeSpec::Par(bs) => bs.iter_mut().for_each(|c| c.comp = false),
                        NodeSpec::Wait(d, _) => {
                            if *d == Some(OnDeadline::Fail) {
                                *d = Some(OnDeadline::Continue)
                            }
                        }
                    }
                }
            }
            SagaSpec { nodes, pivot, deadline, flags, child }
        })
}

fn configure(s: StepBuilder<Value, NoCommand>, c: &CmdSpec, kind: Option<StepKind>) -> StepBuilder<Value, Do> {
    let mut s = s.invoke(|_: &Value| Do).retry(RetryPolicy::exponential(Duration::from_millis(10), 2.0, c.max).jitter(0.5));
    if c.comp {
        s = s.compensate(|_| Undo).compensation_retry(RetryPolicy::fixed(Duration::from_millis(10), c.comp_max));
        if c.comp_timeout {
            s = s.compensation_timeout(Duration::from_millis(500));
        }
    }
    if let Some(t) = c.timeout {
        s = s.timeout(Duration::from_millis(300), t);
    }
    if c.heartbeat {
        s = s.heartbeat_timeout(Duration::from_millis(120));
    }
    if c.limit {
        s = s.limit("pool", 2);
    }
    if let Some(k) = c.cond {
        s = s.when(move |d: &Value| d["flags"][k].as_bool().unwrap_or(true));
    }
    match kind {
        Some(StepKind::Pivot) => s.pivot(),
        Some(StepKind::Retriable) => s.retriable(),
        _ => s,
    }
}

fn build(spec: &SagaSpec) -> SagaDefinition<Value> {
    let mut b = SagaDefinition::<Value>::builder("prop", 1);
    for (n, node) in spec.nodes.iter().enumerate() {
        let kind = match spec.pivot {
            Some(p) if p == n => Some(StepKind::Pivot),
            Some(p) if n > p => Some(StepKind::Retriable),
            _ => None,
        };
        b = match node {
            NodeSpec::Cmd(c) => {
                let c = c.clone();
                b.step(format!("s{n}"), move |s| configure(s, &c, kind))
            }
            NodeSpec::Wait(deadline, cond) => {
                let (deadline, cond) = (*deadline, *cond);
                b.wait(format!("w{n}"), move |mut w| {
                    w = w.event(format!("ev{n}"));
                    if let Some(d) = deadline {
                        w = w.deadline(Duration::from_millis(1_000), d);
                    }
                    if let Some(k) = cond {
                        w = w.when(move |d: &Value| d["flags"][k].as_bool().unwrap_or(true));
                    }
                    w
                })
            }
            NodeSpec::Par(bs) => {
                let bs = bs.clone();
                b.parallel(format!("g{n}"), move |mut p| {
                    for (j, c) in bs.iter().enumerate() {
                        let c = c.clone();
                        p = p.branch(format!("s{n}_{j}"), move |s| configure(s, &c, kind));
                    }
                    p
                })
            }
        };
    }
    if spec.deadline {
        b = b.deadline(Duration::from_millis(5_000));
    }
    b.build().expect("generated definitions are valid")
}

#[derive(Debug, Clone)]
enum Action {
    Reply(usize, u8),
    Replay(usize, u8),
    Heartbeat(usize),
    Grant(usize),
    Timer(usize),
    OldTimer(usize),
    Event(usize),
    Operator(u8),
    Advance(u16),
    /// The parent compensates the child (the next attempt, or `Some` one it sent before).
    Undo(Option<u32>),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (any::<usize>(), 0u8..10).prop_map(|(p, o)| Action::Reply(p, o)),
        1 => (any::<usize>(), 0u8..10).prop_map(|(p, o)| Action::Replay(p, o)),
        2 => any::<usize>().prop_map(Action::Heartbeat),
        2 => any::<usize>().prop_map(Action::Grant),
        3 => any::<usize>().prop_map(Action::Timer),
        1 => any::<usize>().prop_map(Action::OldTimer),
        1 => any::<usize>().prop_map(Action::Event),
        1 => (0u8..4).prop_map(Action::Operator),
        1 => (0u16..2000).prop_map(Action::Advance),
        1 => prop_oneof![3 => Just(None), 1 => (1u32..3).prop_map(Some)].prop_map(Action::Undo),
    ]
}

fn outcome(o: u8) -> ReplyOutcome {
    match o {
        0..=5 => ReplyOutcome::Success { output: json!({"n": o}) },
        6 | 7 => ReplyOutcome::TransientFailure { message: "flaky".into() },
        _ => ReplyOutcome::Rejected { code: "no".into(), message: "refused".into() },
    }
}

/// The commands the saga is waiting on: (step name, kind).
fn outstanding(def: &Definition, t: &SagaTest) -> Vec<(String, CommandKind)> {
    let mut v = Vec::new();
    for (i, s) in t.state().steps.iter().enumerate() {
        match s.status {
            StepStatus::Running => v.push((def.steps[i].name.clone(), CommandKind::Invoke)),
            StepStatus::Compensating => v.push((def.steps[i].name.clone(), CommandKind::Compensate)),
            _ => {}
        }
    }
    v
}

/// What the checker learns along the way.
#[derive(Default)]
struct Observed {
    /// command steps seen to complete or time out, in order
    completed: Vec<Vec<String>>,
    /// sends per (step, kind) in the current budget
    budget: BTreeMap<(String, CommandKind), u32>,
    all_timers: Vec<TimerKey>,
    /// steps queued for or holding a resource slot (acquired, not yet released)
    slots: HashSet<sagas::StepIndex>,
    /// what the saga answered its parent, in order
    answers: Vec<(CommandKind, u32, ReplyOutcome)>,
}

struct Checker<'a> {
    def: &'a Definition,
    obs: Observed,
}

impl Checker<'_> {
    fn apply(&mut self, t: &mut SagaTest, input: &Input) -> Result<InputOutcome, TestCaseError> {
        let before = t.state().clone();
        let scheduled_before: HashSet<String> = t.timers().iter().map(|(k, _)| k.id()).collect();
        let tr = t.apply(input).expect("decide never errs on its own instances");
        // 1. ignored or refused inputs change nothing
        if tr.outcome != InputOutcome::Applied {
            prop_assert_eq!(&tr.state, &before, "{:?} was {:?} but changed the state", input, tr.outcome);
            prop_assert!(tr.effects.is_empty());
        }
        // a timer that was not scheduled never applies; a slot (granted by the runtime, not
        // scheduled by the saga) only to a step that waits for one
        match input {
            Input::Timer(TimerKey::SlotGranted { step }) => {
                let waited = before.steps[step.get()].status == StepStatus::AwaitingSlot && before.status == SagaStatus::Running;
                prop_assert_eq!(tr.applied(), waited, "slot for {:?} ({:?})", step, before.steps[step.get()].status);
            }
            Input::Timer(k) if !scheduled_before.contains(&k.id()) => {
                prop_assert!(tr.outcome != InputOutcome::Applied, "unscheduled timer {:?} applied", k);
            }
            _ => {}
        }
        if let Input::Operator(OperatorCommand::Resume | OperatorCommand::RetryCompensation) = input
            && tr.applied()
        {
            let kind = if before.status == SagaStatus::Stopped
                && before.compensation.is_some()
                && before.stop.as_ref().unwrap().code == sagas::StopCode::CompensationFailed
            {
                CommandKind::Compensate
            } else {
                CommandKind::Invoke
            };
            self.obs.budget.retain(|(_, k), _| *k != kind);
        }
        // 3. retry budgets
        for e in &tr.effects {
            match e {
                Effect::Send(c) => {
                    let n = self.obs.budget.entry((c.step_name.clone(), c.kind)).or_default();
                    *n += 1;
                    let step = self.def.step(c.step).unwrap();
                    let StepAction::Command(cmd) = &step.action else { panic!("sent a wait") };
                    let policy = match c.kind {
                        CommandKind::Invoke => &cmd.retry,
                        CommandKind::Compensate => &cmd.compensation.as_ref().expect("compensation sent for a step without one").retry,
                    };
                    if let Some(max) = policy.max_attempts {
                        prop_assert!(*n <= max.get(), "{} {:?} sent {} times, policy allows {}", c.step_name, c.kind, n, max);
                    }
                }
                Effect::Schedule { key, .. } => self.obs.all_timers.push(key.clone()),
                // 6. slots: acquired once, released once, never held without being acquired
                Effect::Acquire { step, .. } => prop_assert!(self.obs.slots.insert(*step), "{:?} acquired twice", step),
                Effect::Release { step, .. } => prop_assert!(self.obs.slots.remove(step), "{:?} released without a slot", step),
                // 7. a child answers its parent's command once, as it ends, and the last
                // compensation asked: done once compensated, refused past the pivot
                Effect::ReplyToParent { kind, attempt, outcome } => {
                    let parent = tr.state.parent.as_ref();
                    prop_assert!(parent.is_some(), "a saga that is not a child answered a parent");
                    let parent = parent.unwrap();
                    match (kind, outcome) {
                        (CommandKind::Invoke, ReplyOutcome::Success { output }) => {
                            prop_assert_eq!(tr.state.status, SagaStatus::Completed);
                            prop_assert_eq!(output, &tr.state.data);
                        }
                        (CommandKind::Invoke, ReplyOutcome::Rejected { code, .. }) => {
                            prop_assert_eq!(tr.state.status, SagaStatus::Compensated);
                            prop_assert!(parent.undo.is_none(), "a child undone answered its command with its failure");
                            prop_assert_eq!(code, tr.state.failure.as_ref().unwrap().code.as_str());
                        }
                        (CommandKind::Compensate, ReplyOutcome::Success { .. }) => {
                            prop_assert_eq!(tr.state.status, SagaStatus::Compensated);
                            prop_assert_eq!(Some(*attempt), parent.undo);
                        }
                        (CommandKind::Compensate, ReplyOutcome::Rejected { code, .. }) => {
                            // past the pivot, or stopped on a step after it (a skipped pivot)
                            let forward = tr.state.past_pivot
                                || (tr.state.status == SagaStatus::Stopped
                                    && tr.state.stop.as_ref().is_some_and(|s| s.code != sagas::StopCode::CompensationFailed));
                            prop_assert!(forward && code == "child_past_pivot", "undo refused: {}", code);
                            prop_assert_eq!(Some(*attempt), parent.undo);
                        }
                        other => prop_assert!(false, "a child answered {:?}", other),
                    }
                    if *kind == CommandKind::Invoke {
                        prop_assert_eq!(*attempt, parent.attempt);
                        let before = self.obs.answers.iter().filter(|a| a.0 == CommandKind::Invoke).count();
                        prop_assert_eq!(before, 0, "the parent's command answered twice: {:?}", self.obs.answers);
                    }
                    self.obs.answers.push((*kind, *attempt, outcome.clone()));
                }
                _ => {}
            }
        }
        // remember completions in order
        let mut group = Vec::new();
        for (i, (a, b)) in before.steps.iter().zip(&tr.state.steps).enumerate() {
            // a branch that succeeds while its failed group drains goes straight on to compensating
            let settled = |s: StepStatus| {
                matches!(
                    s,
                    StepStatus::Completed
                        | StepStatus::TimedOut
                        | StepStatus::Compensating
                        | StepStatus::CompensationRetryScheduled
                        | StepStatus::Compensated
                        | StepStatus::CompensationFailed
                        | StepStatus::CompensationSkipped
                )
            };
            let name = &self.def.steps[i].name;
            if !settled(a.status)
                && settled(b.status)
                && matches!(self.def.steps[i].action, StepAction::Command(_))
                && !self.obs.completed.iter().flatten().any(|n| n == name)
            {
                group.push(name.clone());
            }
        }
        if !group.is_empty() {
            self.obs.completed.push(group);
        }
        self.check_state(t)?;
        Ok(tr.outcome)
    }

    // 2. liveness and hygiene
    fn check_state(&self, t: &SagaTest) -> Result<(), TestCaseError> {
        let st = t.state();
        let timers: HashSet<String> = t.timers().iter().map(|(k, _)| k.id()).collect();
        let active = st.steps.iter().enumerate().any(|(i, s)| match s.status {
            StepStatus::Running | StepStatus::Waiting | StepStatus::Compensating | StepStatus::AwaitingSlot => true,
            StepStatus::RetryScheduled => {
                timers.contains(&TimerKey::Retry { step: step_index(i), kind: CommandKind::Invoke, attempt: s.attempts + 1 }.id())
            }
            StepStatus::CompensationRetryScheduled => timers.contains(
                &TimerKey::Retry { step: step_index(i), kind: CommandKind::Compensate, attempt: s.compensation_attempts + 1 }.id(),
            ),
            _ => false,
        });
        for (i, s) in st.steps.iter().enumerate() {
            if s.status == StepStatus::RetryScheduled {
                let k = TimerKey::Retry { step: step_index(i), kind: CommandKind::Invoke, attempt: s.attempts + 1 };
                prop_assert!(timers.contains(&k.id()), "retry scheduled without its timer: {:?}", k);
            }
            // a running attempt of a step with a heartbeat timeout is watched until it escalated
            let heartbeat = matches!(&self.def.steps[i].action, StepAction::Command(c) if c.heartbeat_ms.is_some());
            if s.status == StepStatus::Running && heartbeat && !s.escalated {
                let k = TimerKey::Heartbeat { step: step_index(i), attempt: s.attempts };
                prop_assert!(timers.contains(&k.id()), "running attempt without its heartbeat timer: {:?}", k);
            }
        }
        for (i, s) in st.steps.iter().enumerate() {
            let queued_or_held = s.status == StepStatus::AwaitingSlot || s.slot;
            prop_assert_eq!(
                queued_or_held,
                self.obs.slots.contains(&step_index(i)),
                "step {} ({:?}, slot {}) and the slots acquired disagree",
                i,
                s.status,
                s.slot
            );
        }
        match st.status {
            SagaStatus::Completed | SagaStatus::Compensated => {
                prop_assert!(!active, "terminal saga with an active step: {:?}", st.steps);
                prop_assert!(timers.is_empty(), "terminal saga keeps timers {:?}", timers);
            }
            SagaStatus::Stopped => prop_assert!(st.stop.is_some()),
            SagaStatus::Running | SagaStatus::Compensating => {
                prop_assert!(active, "{:?} saga with nothing that can move it: {:?}", st.status, st)
            }
            SagaStatus::Created => prop_assert!(false, "not started"),
        }
        if st.status == SagaStatus::Completed {
            prop_assert!(st.failure.is_none());
        }
        Ok(())
    }

    // 4. compensation order
    fn check_compensations(&self, t: &SagaTest) -> Result<(), TestCaseError> {
        let compensatable = |n: &String| {
            let s = self.def.step_named(n).unwrap();
            s.kind != StepKind::Retriable && matches!(&s.action, StepAction::Command(c) if c.compensation.is_some())
        };
        let expected: Vec<Vec<&str>> = self
            .obs
            .completed
            .iter()
            .rev()
            .map(|g| g.iter().filter(|n| compensatable(n)).map(String::as_str).collect::<Vec<_>>())
            .filter(|g| !g.is_empty())
            .collect();
        let issued = t.compensations_sent();
        let total: usize = expected.iter().map(Vec::len).sum();
        if t.status() == SagaStatus::Compensated {
            prop_assert_eq!(issued.len(), total, "issued {:?}, expected {:?} (groups reversed)", issued, expected);
        }
        prop_assert!(issued.len() <= total, "issued {:?}, expected at most {:?}", issued, expected);
        let mut rest = &issued[..];
        for g in &expected {
            let (chunk, tail) = rest.split_at(g.len().min(rest.len()));
            let mut a: Vec<&str> = chunk.to_vec();
            a.sort_unstable();
            a.dedup();
            prop_assert!(
                a.len() == chunk.len() && chunk.iter().all(|n| g.contains(n)),
                "issued {:?}, expected {:?} (groups reversed)",
                issued,
                expected
            );
            rest = tail;
        }
        if t.status() == SagaStatus::Completed {
            prop_assert!(issued.is_empty());
        }
        Ok(())
    }

    // 7. once ended, a child has answered what its parent waits for
    fn check_answers(&self, t: &SagaTest) -> Result<(), TestCaseError> {
        let st = t.state();
        let Some(parent) = &st.parent else {
            prop_assert!(self.obs.answers.is_empty());
            return Ok(());
        };
        let last = self.obs.answers.last().map(|(k, a, o)| (*k, *a, matches!(o, ReplyOutcome::Success { .. })));
        match (parent.undo, st.status) {
            (None, SagaStatus::Completed) => prop_assert_eq!(last, Some((CommandKind::Invoke, parent.attempt, true))),
            (None, SagaStatus::Compensated) => prop_assert_eq!(last, Some((CommandKind::Invoke, parent.attempt, false))),
            (Some(undo), SagaStatus::Compensated) => prop_assert_eq!(last, Some((CommandKind::Compensate, undo, true))),
            (Some(undo), SagaStatus::Completed) => {
                let refused = self
                    .obs
                    .answers
                    .iter()
                    .any(|(k, a, o)| *k == CommandKind::Compensate && *a == undo && matches!(o, ReplyOutcome::Rejected { .. }));
                prop_assert!(refused, "the undo past the pivot was not refused: {:?}", self.obs.answers);
            }
            _ => {}
        }
        Ok(())
    }
}

fn run(spec: SagaSpec, actions: Vec<Action>) -> Result<(), TestCaseError> {
    let def = build(&spec);
    let erased = def.erased();
    let input = json!({"flags": spec.flags});
    let mut t = if spec.child { SagaTest::start_child(&def, &input) } else { SagaTest::start(&def, &input) }.unwrap();
    let mut ck = Checker { def: &erased, obs: Observed::default() };
    // what the start (applied before the checker watched) queued for
    ck.obs.slots = t.slots().into_iter().map(|n| erased.step_named(n).unwrap().index).collect();
    ck.obs.answers = t.answers().to_vec();
    ck.check_state(&t)?;
    for a in actions {
        let input = match a {
            Action::Reply(p, o) => {
                let out = outstanding(&erased, &t);
                if out.is_empty() {
                    continue;
                }
                let (step, kind) = &out[p % out.len()];
                Input::Reply(t.reply_to(step, *kind, outcome(o)))
            }
            Action::Replay(p, o) => {
                if t.sent().is_empty() {
                    continue;
                }
                let c = &t.sent()[p % t.sent().len()];
                Input::Reply(Reply { in_reply_to: c.message_id, step: c.step, kind: c.kind, attempt: c.attempt, outcome: outcome(o) })
            }
            // a heartbeat about any command sent: current, stale or a compensation's
            Action::Heartbeat(p) => {
                if t.sent().is_empty() {
                    continue;
                }
                let c = &t.sent()[p % t.sent().len()];
                let details = json!({"done": p % 100});
                Input::Heartbeat(Heartbeat { in_reply_to: c.message_id, step: c.step, kind: c.kind, attempt: c.attempt, details })
            }
            // a slot granted to any step: mostly one that waits for it, sometimes any other
            Action::Grant(p) => {
                let waiting: Vec<usize> =
                    t.state().steps.iter().enumerate().filter(|(_, s)| s.status == StepStatus::AwaitingSlot).map(|(i, _)| i).collect();
                let i = if !waiting.is_empty() && p % 4 != 0 { waiting[p % waiting.len()] } else { p % erased.steps.len() };
                Input::Timer(TimerKey::SlotGranted { step: step_index(i) })
            }
            Action::Timer(p) => {
                let timers = t.timers();
                if timers.is_empty() {
                    continue;
                }
                Input::Timer(timers[p % timers.len()].0.clone())
            }
            Action::OldTimer(p) => {
                if ck.obs.all_timers.is_empty() {
                    continue;
                }
                Input::Timer(ck.obs.all_timers[p % ck.obs.all_timers.len()].clone())
            }
            Action::Event(p) => Input::Event { name: format!("ev{}", p % (spec.nodes.len() + 1)), payload: json!({}) },
            Action::Operator(o) => Input::Operator(match o {
                0 => OperatorCommand::Abort { reason: "prop".into() },
                1 => OperatorCommand::RetryCompensation,
                2 => OperatorCommand::SkipCompensation,
                _ => OperatorCommand::Resume,
            }),
            Action::Undo(attempt) => {
                let next = t.state().parent.as_ref().and_then(|p| p.undo).unwrap_or(0) + 1;
                Input::Undo { attempt: attempt.unwrap_or(next) }
            }
            Action::Advance(ms) => {
                // fire due timers in time order, checking each
                let until = t.now().plus_ms(u64::from(ms));
                while let Some((k, _)) = t.timers().into_iter().filter(|(_, d)| *d <= until).min_by_key(|(_, d)| *d) {
                    ck.apply(&mut t, &Input::Timer(k))?;
                }
                continue;
            }
        };
        ck.apply(&mut t, &input)?;
    }
    ck.check_compensations(&t)?;

    // 5. a fair continuation ends every saga
    for _ in 0..500 {
        if t.status().is_terminal() {
            break;
        }
        let out = outstanding(&erased, &t);
        let input = if let Some((step, kind)) = out.first() {
            Input::Reply(t.reply_to(step, *kind, ReplyOutcome::Success { output: json!({}) }))
        } else if let Some((k, _)) = t.timers().into_iter().min_by_key(|(_, d)| *d) {
            Input::Timer(k)
        } else if let Some(i) = t.state().steps.iter().position(|s| s.status == StepStatus::AwaitingSlot) {
            Input::Timer(TimerKey::SlotGranted { step: step_index(i) })
        } else if t.status() == SagaStatus::Stopped {
            Input::Operator(OperatorCommand::Resume)
        } else if let Some(i) = t.state().steps.iter().position(|s| s.status == StepStatus::Waiting) {
            let StepAction::Wait(w) = &erased.steps[i].action else { unreachable!() };
            Input::Event { name: w.event.clone(), payload: json!({}) }
        } else {
            prop_assert!(false, "stuck: {:?}", t.state());
            unreachable!()
        };
        ck.apply(&mut t, &input)?;
    }
    prop_assert!(t.status().is_terminal(), "not terminal after a fair continuation: {:?}", t.state());
    ck.check_compensations(&t)?;
    ck.check_answers(&t)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512), max_shrink_iters: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn decide_keeps_its_invariants(spec in saga_spec(), actions in prop::collection::vec(action(), 0..80)) {
        run(spec, actions)?;
    }
}

fn step_index(i: usize) -> sagas::StepIndex {
    sagas::StepIndex(u32::try_from(i).expect("few steps"))
}
