//! Saga definitions in Rust code: a typed builder checked at compile time where it can be and
//! at [`build`](SagaBuilder::build) where it cannot.
//!
//! A definition is typed over the saga's data `D` while it is built ([`SagaDefinition<D>`]);
//! the runtime works with its type-erased form ([`Definition`]), whose step closures read and
//! write the data as JSON. The closures must be pure: `decide` calls them and stays pure only
//! if they do.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::ids::StepIndex;
use crate::policy::{OnDeadline, OnTimeout, RetryPolicy, TimeoutPolicy, millis};

/// A command a participant executes. The type's name on the wire is [`NAME`](Command::NAME)
/// (the AMQP `type` property; the participant is the routing key); its reply body decodes as
/// [`Reply`](Command::Reply), so a step's `on_reply` is checked against it at compile time.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a saga command",
    label = "a step's `invoke` and `compensate` take a closure returning a type that implements `sagas::Command`",
    note = "implement `sagas::Command` for `{Self}`: `const NAME`, `const PARTICIPANT` and `type Reply`"
)]
pub trait Command: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Wire name, e.g. `inventory.reserve_stock`: the AMQP `type` of the command message.
    const NAME: &'static str;
    /// The participant that handles it, e.g. `inventory`.
    const PARTICIPANT: &'static str;
    /// What a successful reply carries (use `()` for nothing).
    type Reply: Serialize + DeserializeOwned + Send + 'static;
}

/// An external event a saga can wait for (e.g. "customer updated card").
pub trait Event: Serialize + DeserializeOwned + Send + 'static {
    /// Wire name of the event, e.g. `customer.card_updated`.
    const NAME: &'static str;
}

/// What the saga's data must be: JSON in the store, a Rust type in the definition.
pub trait SagaData: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> SagaData for T {}

pub(crate) type BuildFn = Arc<dyn Fn(&Value) -> std::result::Result<Value, String> + Send + Sync>;
pub(crate) type ApplyFn = Arc<dyn Fn(&mut Value, &Value) -> std::result::Result<(), String> + Send + Sync>;
pub(crate) type PredicateFn = Arc<dyn Fn(&Value) -> std::result::Result<bool, String> + Send + Sync>;
/// A start's input decoded as the definition's data, and its search keys read from it:
/// `(key, value)` pairs (none when it declares none).
type KeysFn = Arc<dyn Fn(&Value) -> std::result::Result<Vec<(String, String)>, String> + Send + Sync>;
/// One search key of a builder: its name and how its value is read from the saga's data.
type KeyFn<D> = (String, Arc<dyn Fn(&D) -> String + Send + Sync>);

/// The participant of child steps: the orchestrator's nodes handle its commands, starting the
/// child saga (the command's name is the child's definition) and undoing it.
pub const CHILD_PARTICIPANT: &str = "sagaflow.child";
/// The compensation command of a child step: compensate the child saga.
pub const CHILD_UNDO: &str = "sagaflow.child.undo";

/// Most search keys a definition declares.
pub const MAX_SEARCH_KEYS: usize = 8;
/// Most bytes of a search key's value.
pub const MAX_SEARCH_VALUE_BYTES: usize = 256;

/// Whether `value` can be a search key's value: at most [`MAX_SEARCH_VALUE_BYTES`] bytes and no
/// U+0000 (PostgreSQL's text cannot hold it).
pub fn check_search_value(key: &str, value: &str) -> std::result::Result<(), String> {
    if value.len() > MAX_SEARCH_VALUE_BYTES {
        return Err(format!("search key `{key}` is {} bytes; at most {MAX_SEARCH_VALUE_BYTES}", value.len()));
    }
    if value.contains('\u{0}') {
        return Err(format!("search key `{key}` holds U+0000"));
    }
    Ok(())
}

/// How a step relates to the point of no return.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Undone by its compensation (if it has one) when a later step fails.
    Compensatable,
    /// The go/no-go step: once it succeeds the saga can only go forward.
    Pivot,
    /// After the pivot: retried until it succeeds instead of compensating.
    Retriable,
}

/// One step of a definition.
#[derive(Clone)]
pub struct StepDef {
    /// Unique name within the definition.
    pub name: String,
    /// Position, counting every step once.
    pub index: StepIndex,
    /// Compensatable, pivot or retriable.
    pub kind: StepKind,
    /// What the step does.
    pub action: StepAction,
    pub(crate) condition: Option<PredicateFn>,
}

impl StepDef {
    /// Whether the step runs only when a predicate on the data holds.
    pub fn is_conditional(&self) -> bool {
        self.condition.is_some()
    }
}

/// What a step does: send a command, or wait for an external event.
#[derive(Clone)]
pub enum StepAction {
    /// Send a command to a participant.
    Command(Box<CommandStep>),
    /// Wait for an external event.
    Wait(WaitStep),
}

/// A step that sends a command.
#[derive(Clone)]
pub struct CommandStep {
    /// Participant that handles the command.
    pub participant: String,
    /// Wire name of the command.
    pub command: String,
    /// Retry policy for transient failures.
    pub retry: RetryPolicy,
    /// Per-attempt timeout and its consequence.
    pub timeout: Option<TimeoutPolicy>,
    /// Longest time (ms) an attempt may go without a heartbeat from the participant; a missed
    /// heartbeat is a timeout of the attempt, with the consequence of [`Self::timeout`]
    /// (`OnTimeout::Retry` when the step has no timeout).
    pub heartbeat_ms: Option<u64>,
    /// The shared resource the step's command holds a slot of while it runs, if any.
    pub limit: Option<Limit>,
    /// The compensation, if the step changed something that must be undone.
    pub compensation: Option<Compensation>,
    pub(crate) build: BuildFn,
    pub(crate) on_reply: Option<ApplyFn>,
}

impl CommandStep {
    /// The definition of the child saga the step starts, when it is a child step
    /// ([`StepBuilder::child`]).
    pub fn child(&self) -> Option<&str> {
        (self.participant == CHILD_PARTICIPANT).then_some(self.command.as_str())
    }
}

/// A shared resource a step holds while its command runs, and how many steps (of any saga, on
/// any node) may hold it at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    /// The resource's name (`gpu-pool`): the same name in several definitions is one resource.
    pub resource: String,
    /// How many may hold it at once (at least 1).
    pub capacity: u32,
}

/// A step's compensation.
#[derive(Clone)]
pub struct Compensation {
    /// Participant that handles the compensation command.
    pub participant: String,
    /// Wire name of the compensation command.
    pub command: String,
    /// Retry policy; when spent the saga stops in `compensation_failed`.
    pub retry: RetryPolicy,
    /// Per-attempt timeout; a compensation that times out is retried under its policy.
    pub timeout_ms: Option<u64>,
    pub(crate) build: BuildFn,
}

/// A step that waits for an external event.
#[derive(Clone)]
pub struct WaitStep {
    /// Wire name of the awaited event.
    pub event: String,
    /// How long to wait (ms) and what happens then; `None` waits forever.
    pub deadline: Option<(u64, OnDeadline)>,
    pub(crate) on_event: Option<ApplyFn>,
}

/// The sequence a definition runs: single steps and parallel groups, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Node {
    /// One step.
    Step {
        /// The step.
        step: StepIndex,
    },
    /// Several commands in flight at once; the group fails if any branch fails.
    Parallel {
        /// Name of the group.
        name: String,
        /// The branches.
        branches: Vec<StepIndex>,
    },
}

impl Node {
    /// The steps of this node.
    pub fn steps(&self) -> &[StepIndex] {
        match self {
            Node::Step { step } => std::slice::from_ref(step),
            Node::Parallel { branches, .. } => branches,
        }
    }
}

/// A type-erased saga definition, as the runtime and `decide` see it.
pub struct Definition {
    /// Definition name (`order_fulfilment`).
    pub name: String,
    /// Version; an instance stays on the version it started with.
    pub version: u32,
    /// Steps in definition order, indexed by [`StepIndex`].
    pub steps: Vec<StepDef>,
    /// What runs in which order.
    pub nodes: Vec<Node>,
    /// Time allowed for the whole saga, in milliseconds.
    pub deadline_ms: Option<u64>,
    /// The keys its sagas are found by (`order_id`), in declaration order.
    pub search_keys: Vec<String>,
    read_input: KeysFn,
}

impl fmt::Debug for Definition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Definition").field("name", &self.name).field("version", &self.version).finish_non_exhaustive()
    }
}

impl Definition {
    /// Check that `input` is valid data for this saga (it decodes as the definition's data
    /// type), before an instance is created for it.
    pub fn check_input(&self, input: &Value) -> std::result::Result<(), String> {
        (self.read_input)(input).map(drop)
    }

    /// [`Self::check_input`], and (decoded once) the search keys of a saga started with
    /// `input`: `(key, value)` for each declared key whose value is not empty. A value longer
    /// than [`MAX_SEARCH_VALUE_BYTES`] or holding U+0000 refuses the start (the error says
    /// which key).
    pub fn search_key_values(&self, input: &Value) -> std::result::Result<Vec<(String, String)>, String> {
        let pairs = (self.read_input)(input)?;
        for (k, v) in &pairs {
            check_search_value(k, v)?;
        }
        Ok(pairs.into_iter().filter(|(_, v)| !v.is_empty()).collect())
    }

    /// The step at `index`.
    pub fn step(&self, index: StepIndex) -> Option<&StepDef> {
        self.steps.get(index.get())
    }

    /// The step named `name`.
    pub fn step_named(&self, name: &str) -> Option<&StepDef> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// A serializable description: what the store keeps next to the instances and what the
    /// operator API shows.
    pub fn spec(&self) -> DefinitionSpec {
        DefinitionSpec {
            name: self.name.clone(),
            version: self.version,
            deadline_ms: self.deadline_ms,
            search_keys: self.search_keys.clone(),
            nodes: self.nodes.clone(),
            steps: self
                .steps
                .iter()
                .map(|s| StepSpec {
                    name: s.name.clone(),
                    kind: s.kind,
                    conditional: s.condition.is_some(),
                    action: match &s.action {
                        StepAction::Command(c) => StepActionSpec::Command {
                            participant: c.participant.clone(),
                            command: c.command.clone(),
                            retry: c.retry.clone(),
                            timeout: c.timeout,
                            heartbeat_ms: c.heartbeat_ms,
                            limit: c.limit.clone(),
                            compensation: c.compensation.as_ref().map(|k| {
                                Box::new(CompensationSpec {
                                    participant: k.participant.clone(),
                                    command: k.command.clone(),
                                    retry: k.retry.clone(),
                                    timeout_ms: k.timeout_ms,
                                })
                            }),
                        },
                        StepAction::Wait(w) => StepActionSpec::Wait {
                            event: w.event.clone(),
                            deadline_ms: w.deadline.map(|d| d.0),
                            on_deadline: w.deadline.map(|d| d.1),
                        },
                    },
                })
                .collect(),
        }
    }
}

/// Serializable description of a definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DefinitionSpec {
    pub name: String,
    pub version: u32,
    pub deadline_ms: Option<u64>,
    #[serde(default)]
    pub search_keys: Vec<String>,
    pub nodes: Vec<Node>,
    pub steps: Vec<StepSpec>,
}

/// Serializable description of a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct StepSpec {
    pub name: String,
    pub kind: StepKind,
    pub conditional: bool,
    pub action: StepActionSpec,
}

/// Serializable description of what a step does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum StepActionSpec {
    Command {
        participant: String,
        command: String,
        retry: RetryPolicy,
        timeout: Option<TimeoutPolicy>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<Limit>,
        compensation: Option<Box<CompensationSpec>>,
    },
    Wait {
        event: String,
        deadline_ms: Option<u64>,
        on_deadline: Option<OnDeadline>,
    },
}

/// Serializable description of a compensation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct CompensationSpec {
    pub participant: String,
    pub command: String,
    pub retry: RetryPolicy,
    pub timeout_ms: Option<u64>,
}

/// A saga definition typed over its data `D`. Cheap to clone.
pub struct SagaDefinition<D> {
    inner: Arc<Definition>,
    _data: PhantomData<fn(D) -> D>,
}

impl<D> Clone for SagaDefinition<D> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), _data: PhantomData }
    }
}

impl<D> fmt::Debug for SagaDefinition<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl<D: SagaData> SagaDefinition<D> {
    /// Start building definition `name`, version `version` (≥ 1).
    pub fn builder(name: impl Into<String>, version: u32) -> SagaBuilder<D> {
        SagaBuilder { name: name.into(), version, items: Vec::new(), deadline_ms: None, keys: Vec::new(), _data: PhantomData }
    }

    /// The type-erased definition the runtime runs.
    pub fn erased(&self) -> Arc<Definition> {
        self.inner.clone()
    }

    /// Encode a saga's input for a start request.
    pub fn encode_input(&self, data: &D) -> Result<Value> {
        serde_json::to_value(data).map_err(|e| Error::InvalidData(format!("saga data does not encode: {e}")))
    }

    /// Decode a saga's data (its result, once completed).
    pub fn decode_data(&self, data: &Value) -> Result<D> {
        D::deserialize(data).map_err(|e| Error::InvalidData(format!("saga data does not decode: {e}")))
    }
}

impl<D> std::ops::Deref for SagaDefinition<D> {
    type Target = Definition;
    fn deref(&self) -> &Definition {
        &self.inner
    }
}

/// Builds a [`SagaDefinition`].
pub struct SagaBuilder<D> {
    name: String,
    version: u32,
    items: Vec<Item>,
    deadline_ms: Option<u64>,
    keys: Vec<KeyFn<D>>,
    _data: PhantomData<fn(D) -> D>,
}

enum Item {
    Step(Box<PendingStep>),
    Parallel(String, Vec<PendingStep>),
}

struct PendingStep {
    name: String,
    kind: StepKind,
    action: StepAction,
    condition: Option<PredicateFn>,
}

impl<D: SagaData> SagaBuilder<D> {
    /// Add a step that sends a command. The closure configures it; it must call
    /// [`invoke`](StepBuilder::invoke), or [`child`](StepBuilder::child) to start a child saga.
    pub fn step<C: StepCommand>(mut self, name: impl Into<String>, f: impl FnOnce(StepBuilder<D, NoCommand>) -> StepBuilder<D, C>) -> Self {
        let built = f(StepBuilder::new(name.into()));
        self.items.push(Item::Step(Box::new(built.finish())));
        self
    }

    /// Add a group of steps whose commands are in flight together. The group completes when
    /// every branch has; it fails when any branch fails, and then only the branches that
    /// completed are compensated, in reverse order of completion.
    pub fn parallel(mut self, name: impl Into<String>, f: impl FnOnce(ParallelBuilder<D>) -> ParallelBuilder<D>) -> Self {
        let group = f(ParallelBuilder { branches: Vec::new(), _data: PhantomData });
        self.items.push(Item::Parallel(name.into(), group.branches));
        self
    }

    /// Add a step that waits for an external event.
    pub fn wait(mut self, name: impl Into<String>, f: impl FnOnce(WaitBuilder<D>) -> WaitBuilder<D>) -> Self {
        let w = f(WaitBuilder { event: None, on_event: None, deadline: None, condition: None, _data: PhantomData });
        self.items.push(Item::Step(Box::new(PendingStep {
            name: name.into(),
            kind: StepKind::Compensatable,
            action: StepAction::Wait(WaitStep { event: w.event.unwrap_or_default(), deadline: w.deadline, on_event: w.on_event }),
            condition: w.condition,
        })));
        self
    }

    /// Time allowed for the whole saga. When it passes before the pivot the saga compensates
    /// (failure code `deadline_exceeded`); after the pivot it stops in `timed_out`.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline_ms = Some(millis(d));
        self
    }

    /// A key its sagas are found by in the API, the CLI and the web page (`order_id`), read
    /// from the saga's data at start and stored with it, indexed; an empty value is not
    /// stored. At most [`MAX_SEARCH_KEYS`]; a value longer than [`MAX_SEARCH_VALUE_BYTES`]
    /// refuses the start.
    pub fn search_key(mut self, name: impl Into<String>, value: impl Fn(&D) -> String + Send + Sync + 'static) -> Self {
        self.keys.push((name.into(), Arc::new(value)));
        self
    }

    /// Check the definition and build it.
    pub fn build(self) -> Result<SagaDefinition<D>> {
        let mut steps = Vec::new();
        let mut nodes = Vec::new();
        let mut names = HashSet::new();
        let invalid = |msg: String| Error::InvalidDefinition { name: self.name.clone(), version: self.version, reason: msg };

        if !valid_name(&self.name) {
            return Err(invalid(format!("definition name `{}` must be 1-100 characters of a-z, A-Z, 0-9, `_`, `-` or `.`", self.name)));
        }
        if self.version == 0 {
            return Err(invalid("version must be at least 1".into()));
        }
        if self.items.is_empty() {
            return Err(invalid("a saga needs at least one step".into()));
        }
        if self.deadline_ms == Some(0) {
            return Err(invalid("the saga deadline must be longer than zero".into()));
        }
        let mut key_names = HashSet::new();
        for (k, _) in &self.keys {
            if !valid_name(k) || !key_names.insert(k.clone()) {
                return Err(invalid(format!("search key `{k}` is not a valid name or is declared twice")));
            }
        }
        if self.keys.len() > MAX_SEARCH_KEYS {
            return Err(invalid(format!("{} search keys; at most {MAX_SEARCH_KEYS}", self.keys.len())));
        }
        let search_keys: Vec<String> = self.keys.iter().map(|(k, _)| k.clone()).collect();
        let keys = self.keys;
        let read_input: KeysFn = Arc::new(move |v: &Value| {
            let data = D::deserialize(v).map_err(|e| e.to_string())?;
            Ok(keys.iter().map(|(k, f)| (k.clone(), f(&data))).collect())
        });
        let mut next = 0u32;
        let mut push = |p: PendingStep, steps: &mut Vec<StepDef>| -> std::result::Result<StepIndex, Error> {
            if !valid_name(&p.name) {
                return Err(invalid(format!("step name `{}` must be 1-100 characters of a-z, A-Z, 0-9, `_`, `-` or `.`", p.name)));
            }
            if !names.insert(p.name.clone()) {
                return Err(invalid(format!("two steps are named `{}`", p.name)));
            }
            let index = StepIndex(next);
            next += 1;
            steps.push(StepDef { name: p.name, index, kind: p.kind, action: p.action, condition: p.condition });
            Ok(index)
        };
        let mut group_names = HashSet::new();
        for item in self.items {
            match item {
                Item::Step(p) => {
                    let step = push(*p, &mut steps)?;
                    nodes.push(Node::Step { step });
                }
                Item::Parallel(name, branches) => {
                    if branches.is_empty() {
                        return Err(invalid(format!("parallel group `{name}` has no branches")));
                    }
                    if !valid_name(&name) || !group_names.insert(name.clone()) {
                        return Err(invalid(format!("parallel group name `{name}` is invalid or used twice")));
                    }
                    let mut idx = Vec::new();
                    for b in branches {
                        if b.kind == StepKind::Pivot {
                            return Err(invalid(format!("step `{}` in parallel group `{name}` cannot be the pivot", b.name)));
                        }
                        idx.push(push(b, &mut steps)?);
                    }
                    nodes.push(Node::Parallel { name, branches: idx });
                }
            }
        }
        if let Some(clash) = group_names.iter().find(|g| names.contains(*g)) {
            return Err(invalid(format!("`{clash}` names both a parallel group and a step")));
        }
        check_pivot_rules(&steps, &nodes).map_err(&invalid)?;
        for s in &steps {
            check_step_settings(s).map_err(&invalid)?;
        }
        Ok(SagaDefinition {
            inner: Arc::new(Definition {
                name: self.name,
                version: self.version,
                steps,
                nodes,
                deadline_ms: self.deadline_ms,
                search_keys,
                read_input,
            }),
            _data: PhantomData,
        })
    }
}

/// The settings of step `s` that can never work: an invalid retry policy, a zero timeout or
/// deadline, empty names, a wait without an event.
fn check_step_settings(s: &StepDef) -> std::result::Result<(), String> {
    match &s.action {
        StepAction::Command(c) => {
            c.retry.validate().map_err(|e| format!("step `{}`: {e}", s.name))?;
            if let Some(k) = &c.compensation {
                k.retry.validate().map_err(|e| format!("step `{}` compensation: {e}", s.name))?;
                if k.timeout_ms == Some(0) {
                    return Err(format!("step `{}`: compensation timeout must be longer than zero", s.name));
                }
            }
            if c.timeout.is_some_and(|t| t.after_ms == 0) {
                return Err(format!("step `{}`: timeout must be longer than zero", s.name));
            }
            if c.heartbeat_ms == Some(0) {
                return Err(format!("step `{}`: heartbeat timeout must be longer than zero", s.name));
            }
            if let Some(l) = &c.limit {
                if !valid_name(&l.resource) {
                    return Err(format!(
                        "step `{}`: resource name `{}` must be 1-100 characters of a-z, A-Z, 0-9, `_`, `-` or `.`",
                        s.name, l.resource
                    ));
                }
                if l.capacity == 0 {
                    return Err(format!("step `{}`: resource `{}` needs a capacity of at least 1", s.name, l.resource));
                }
            }
            if c.command.is_empty() || c.participant.is_empty() {
                return Err(format!("step `{}`: command and participant names must not be empty", s.name));
            }
            if c.participant == CHILD_PARTICIPANT {
                check_child_step(s, c)?;
            }
        }
        StepAction::Wait(w) => {
            if w.event.is_empty() {
                return Err(format!("wait `{}` names no event: call `.event(name)` or `.on_event::<E>(..)`", s.name));
            }
            if w.deadline.is_some_and(|d| d.0 == 0) {
                return Err(format!("wait `{}`: deadline must be longer than zero", s.name));
            }
        }
    }
    Ok(())
}

/// A child step: its command names a definition, it has no timeout (a new attempt would start a
/// second child beside one that may still run: the child's deadline bounds it instead), and its
/// compensation is the child's undo.
fn check_child_step(s: &StepDef, c: &CommandStep) -> std::result::Result<(), String> {
    if !valid_name(&c.command) {
        return Err(format!("step `{}`: `{}` cannot name the child saga's definition", s.name, c.command));
    }
    if c.timeout.is_some() || c.heartbeat_ms.is_some() {
        return Err(format!(
            "step `{}` starts a child saga and takes no timeout or heartbeat timeout: give the child a `.deadline(..)`",
            s.name
        ));
    }
    if c.compensation.as_ref().is_some_and(|k| k.participant != CHILD_PARTICIPANT || k.command != CHILD_UNDO) {
        return Err(format!("step `{}` starts a child saga: compensating it compensates the child, it takes no `.compensate(..)`", s.name));
    }
    Ok(())
}

/// Whether `s` can name a definition, step, group, search key, resource or schedule: 1–100
/// characters of `A-Z a-z 0-9 _ - .`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Pivot rules: at most one pivot, not in a parallel group; retriable steps only after it, and
/// every command step after it retriable (nothing after the point of no return compensates).
fn check_pivot_rules(steps: &[StepDef], nodes: &[Node]) -> std::result::Result<(), String> {
    let pivots: Vec<&StepDef> = steps.iter().filter(|s| s.kind == StepKind::Pivot).collect();
    if pivots.len() > 1 {
        return Err(format!("a saga has at most one pivot; `{}` and `{}` are both pivots", pivots[0].name, pivots[1].name));
    }
    let mut past_pivot = false;
    for node in nodes {
        for &i in node.steps() {
            let s = &steps[i.get()];
            match (&s.action, s.kind, past_pivot) {
                (_, StepKind::Pivot, _) => {}
                (StepAction::Command(_), StepKind::Retriable, false) => {
                    return Err(format!(
                        "step `{}` is retriable but comes before any pivot; mark the go/no-go step with `.pivot()`",
                        s.name
                    ));
                }
                (StepAction::Command(c), StepKind::Retriable, true) if c.compensation.is_some() => {
                    return Err(format!("step `{}` is retriable (after the pivot) so its compensation could never run", s.name));
                }
                (StepAction::Command(_), StepKind::Retriable, true) => {}
                (StepAction::Command(_), _, true) => {
                    return Err(format!("step `{}` comes after the pivot and must be `.retriable()`", s.name));
                }
                (StepAction::Wait(w), _, true) => {
                    if matches!(w.deadline, Some((_, OnDeadline::Fail))) {
                        return Err(format!(
                            "wait `{}` comes after the pivot, so its deadline cannot fail the saga; use OnDeadline::Continue",
                            s.name
                        ));
                    }
                }
                _ => {}
            }
        }
        if node.steps().iter().any(|i| steps[i.get()].kind == StepKind::Pivot) {
            past_pivot = true;
        }
    }
    Ok(())
}

/// The type-state of a [`StepBuilder`] before `invoke` was called: not a command, so a step
/// without `invoke` does not compile.
pub struct NoCommand;

/// What a step's builder must have been given to be a step: a command ([`StepBuilder::invoke`])
/// or a child saga ([`StepBuilder::child`]).
#[diagnostic::on_unimplemented(
    message = "the step sends no command",
    label = "call `.invoke(..)` (or `.child(..)`) in the step's closure",
    note = "a step sends a command to a participant, or starts a child saga"
)]
pub trait StepCommand: sealed::Sealed {}
impl<C: Command> StepCommand for C {}
impl<C: SagaData> StepCommand for Child<C> {}

mod sealed {
    pub trait Sealed {}
    impl<C: super::Command> Sealed for C {}
    impl<C: super::SagaData> Sealed for super::Child<C> {}
}

/// Configures one command step. `C` is the command type once [`invoke`](Self::invoke) set it.
pub struct StepBuilder<D, C> {
    name: String,
    kind: StepKind,
    build: Option<BuildFn>,
    on_reply: Option<ApplyFn>,
    compensation: Option<(String, String, BuildFn)>,
    retry: Option<RetryPolicy>,
    compensation_retry: Option<RetryPolicy>,
    compensation_timeout: Option<u64>,
    timeout: Option<TimeoutPolicy>,
    heartbeat: Option<u64>,
    limit: Option<Limit>,
    condition: Option<PredicateFn>,
    meta: Option<(String, String)>,
    _types: PhantomData<fn(D, C)>,
}

impl<D: SagaData> StepBuilder<D, NoCommand> {
    fn new(name: String) -> Self {
        Self {
            name,
            kind: StepKind::Compensatable,
            build: None,
            on_reply: None,
            compensation: None,
            retry: None,
            compensation_retry: None,
            compensation_timeout: None,
            timeout: None,
            heartbeat: None,
            limit: None,
            condition: None,
            meta: None,
            _types: PhantomData,
        }
    }

    /// The command this step sends, computed from the saga's data (its input and the outputs
    /// earlier steps stored in it).
    pub fn invoke<C: Command>(self, f: impl Fn(&D) -> C + Send + Sync + 'static) -> StepBuilder<D, C> {
        self.sending(erase_build(f), C::NAME.to_owned(), C::PARTICIPANT.to_owned())
    }

    /// Start child saga `def` with the input computed from the saga's data, and wait for its
    /// outcome: the step completes when the child completes (its reply is the child's final
    /// data, see [`on_reply`](StepBuilder::on_reply)) and fails when the child fails (the
    /// child's failure code is the step's). Compensating the step compensates the child. The
    /// child is started by whichever node takes the command, with the newest version of `def`
    /// that node knows and the parent's priority. A child step takes no timeout (the child's
    /// own [`deadline`](SagaBuilder::deadline) bounds it) and no compensation of its own.
    pub fn child<C: SagaData>(self, def: &SagaDefinition<C>, f: impl Fn(&D) -> C + Send + Sync + 'static) -> StepBuilder<D, Child<C>> {
        self.sending(erase_build(f), def.name.clone(), CHILD_PARTICIPANT.to_owned())
    }

    /// The step, now sending `command` (built by `build`) to `participant`, typed as `C`.
    fn sending<C>(self, build: BuildFn, command: String, participant: String) -> StepBuilder<D, C> {
        StepBuilder {
            name: self.name,
            kind: self.kind,
            build: Some(build),
            on_reply: None,
            compensation: self.compensation,
            retry: self.retry,
            compensation_retry: self.compensation_retry,
            compensation_timeout: self.compensation_timeout,
            timeout: self.timeout,
            heartbeat: self.heartbeat,
            limit: self.limit,
            condition: self.condition,
            meta: Some((command, participant)),
            _types: PhantomData,
        }
    }
}

/// The type-state of a [`StepBuilder`] of a child step (see [`StepBuilder::child`]): its
/// reply is the child saga's data, a `C`.
pub struct Child<C>(PhantomData<fn() -> C>);

impl<D: SagaData, C: SagaData> StepBuilder<D, Child<C>> {
    /// Store what the child saga ended with (its data) in this saga's data.
    pub fn on_reply(mut self, f: impl Fn(&mut D, C) + Send + Sync + 'static) -> Self {
        self.on_reply = Some(erase_apply::<D, C>(f));
        self
    }
}

impl<D: SagaData, C: Command> StepBuilder<D, C> {
    /// Store what the reply carries in the saga's data, for later steps and the final result.
    pub fn on_reply(mut self, f: impl Fn(&mut D, C::Reply) + Send + Sync + 'static) -> Self {
        self.on_reply = Some(erase_apply::<D, C::Reply>(f));
        self
    }
}

impl<D: SagaData, C> StepBuilder<D, C> {
    fn finish(self) -> PendingStep {
        let (command, participant) = self.meta.unwrap_or_default();
        // A child step's compensation undoes the child (none after the pivot, where nothing is
        // compensated).
        let compensation = match self.compensation {
            None if participant == CHILD_PARTICIPANT && self.kind != StepKind::Retriable => {
                Some((CHILD_UNDO.to_owned(), CHILD_PARTICIPANT.to_owned(), Arc::new(|_: &Value| Ok(Value::Null)) as BuildFn))
            }
            other => other,
        };
        let default_retry = if self.kind == StepKind::Retriable { RetryPolicy::default_retriable() } else { RetryPolicy::default_invoke() };
        PendingStep {
            name: self.name,
            kind: self.kind,
            condition: self.condition,
            action: StepAction::Command(Box::new(CommandStep {
                participant,
                command,
                retry: self.retry.unwrap_or(default_retry),
                timeout: self.timeout,
                heartbeat_ms: self.heartbeat,
                limit: self.limit,
                compensation: compensation.map(|(command, participant, build)| Compensation {
                    participant,
                    command,
                    retry: self.compensation_retry.clone().unwrap_or_else(RetryPolicy::default_compensate),
                    timeout_ms: self.compensation_timeout,
                    build,
                }),
                build: self.build.unwrap_or_else(|| Arc::new(|_| Err("step has no command".into()))),
                on_reply: self.on_reply,
            })),
        }
    }
}

impl<D: SagaData, C> StepBuilder<D, C> {
    /// The command that undoes this step, computed from the saga's data. Compensation handlers
    /// must be idempotent and must tolerate a step whose command never ran.
    pub fn compensate<K: Command>(mut self, f: impl Fn(&D) -> K + Send + Sync + 'static) -> Self {
        self.compensation = Some((K::NAME.to_owned(), K::PARTICIPANT.to_owned(), erase_build(f)));
        self
    }

    /// Retry policy for transient failures of the command (default
    /// [`RetryPolicy::default_invoke`], or without limit for retriable steps).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Retry policy of the compensation (default [`RetryPolicy::default_compensate`]).
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = Some(policy);
        self
    }

    /// Time allowed for each compensation attempt; a compensation that times out is retried.
    pub fn compensation_timeout(mut self, after: Duration) -> Self {
        self.compensation_timeout = Some(millis(after));
        self
    }

    /// Time allowed for each attempt, and the consequence when it passes.
    pub fn timeout(mut self, after: Duration, then: OnTimeout) -> Self {
        self.timeout = Some(TimeoutPolicy { after_ms: millis(after), then });
        self
    }

    /// Longest time each attempt may go without a heartbeat (`cx.heartbeat(details)` in the
    /// participants SDK, a `sagaflow.heartbeat` message on the wire). A missed heartbeat is a
    /// timeout of the attempt, with the consequence given to [`timeout`](Self::timeout)
    /// (retried when the step has no timeout). For long steps: the overall timeout can be
    /// hours while a worker that died is noticed within `after`.
    pub fn heartbeat_timeout(mut self, after: Duration) -> Self {
        self.heartbeat = Some(millis(after));
        self
    }

    /// The step's command holds a slot of shared resource `resource` while it runs: at most
    /// `capacity` steps (of any saga and definition naming it, across all nodes) hold one at
    /// once. A step reaching it when every slot is taken waits (status `awaiting_slot`) and
    /// takes a freed slot in order of its saga's priority, then of arrival. The slot is held
    /// across the command's retries and given back when the step completes, fails, times out
    /// or is cancelled.
    pub fn limit(mut self, resource: impl Into<String>, capacity: u32) -> Self {
        self.limit = Some(Limit { resource: resource.into(), capacity });
        self
    }

    /// Run the step only when `predicate` holds for the saga's data when the step is reached;
    /// otherwise it is skipped.
    pub fn when(mut self, predicate: impl Fn(&D) -> bool + Send + Sync + 'static) -> Self {
        self.condition = Some(erase_predicate(predicate));
        self
    }

    /// Mark this step as the pivot: once it succeeds the saga can only go forward.
    pub fn pivot(mut self) -> Self {
        self.kind = StepKind::Pivot;
        self
    }

    /// Mark this step as retriable: it comes after the pivot and is retried until it
    /// succeeds (its retry policy defaults to no attempt limit).
    pub fn retriable(mut self) -> Self {
        self.kind = StepKind::Retriable;
        self
    }
}

/// Configures a parallel group.
pub struct ParallelBuilder<D> {
    branches: Vec<PendingStep>,
    _data: PhantomData<fn(D) -> D>,
}

impl<D: SagaData> ParallelBuilder<D> {
    /// Add a branch: a command step configured like [`SagaBuilder::step`].
    pub fn branch<C: StepCommand>(
        mut self,
        name: impl Into<String>,
        f: impl FnOnce(StepBuilder<D, NoCommand>) -> StepBuilder<D, C>,
    ) -> Self {
        self.branches.push(f(StepBuilder::new(name.into())).finish());
        self
    }
}

/// Configures a wait for an external event.
pub struct WaitBuilder<D> {
    event: Option<String>,
    on_event: Option<ApplyFn>,
    deadline: Option<(u64, OnDeadline)>,
    condition: Option<PredicateFn>,
    _data: PhantomData<fn(D) -> D>,
}

impl<D: SagaData> WaitBuilder<D> {
    /// Wait for the event named `name`; its payload is not used.
    pub fn event(mut self, name: impl Into<String>) -> Self {
        self.event = Some(name.into());
        self
    }

    /// Wait for event `E` and store what it carries in the saga's data.
    pub fn on_event<E: Event>(mut self, f: impl Fn(&mut D, E) + Send + Sync + 'static) -> Self {
        self.event = Some(E::NAME.to_owned());
        self.on_event = Some(erase_apply::<D, E>(f));
        self
    }

    /// How long to wait, and what happens when the time passes.
    pub fn deadline(mut self, after: Duration, then: OnDeadline) -> Self {
        self.deadline = Some((millis(after), then));
        self
    }

    /// Wait only when `predicate` holds for the saga's data; otherwise skip the wait.
    pub fn when(mut self, predicate: impl Fn(&D) -> bool + Send + Sync + 'static) -> Self {
        self.condition = Some(erase_predicate(predicate));
        self
    }
}

fn decode<D: DeserializeOwned>(data: &Value) -> std::result::Result<D, String> {
    D::deserialize(data).map_err(|e| format!("saga data does not decode: {e}"))
}

fn erase_build<D: SagaData, C: Serialize>(f: impl Fn(&D) -> C + Send + Sync + 'static) -> BuildFn {
    Arc::new(move |data| {
        let d: D = decode(data)?;
        serde_json::to_value(f(&d)).map_err(|e| format!("command does not encode: {e}"))
    })
}

fn erase_apply<D: SagaData, R: DeserializeOwned>(f: impl Fn(&mut D, R) + Send + Sync + 'static) -> ApplyFn {
    Arc::new(move |data, payload| {
        let mut d: D = decode(data)?;
        let r = R::deserialize(payload).map_err(|e| format!("reply does not decode as the expected type: {e}"))?;
        f(&mut d, r);
        *data = serde_json::to_value(&d).map_err(|e| format!("saga data does not encode: {e}"))?;
        Ok(())
    })
}

fn erase_predicate<D: SagaData>(f: impl Fn(&D) -> bool + Send + Sync + 'static) -> PredicateFn {
    Arc::new(move |data| decode::<D>(data).map(|d| f(&d)))
}

/// The definitions a node knows, by name and version.
#[derive(Default, Clone)]
pub struct Registry {
    defs: BTreeMap<(String, u32), Arc<Definition>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a definition; fails if the same name and version is already registered.
    pub fn register(&mut self, def: Arc<Definition>) -> Result<()> {
        let key = (def.name.clone(), def.version);
        if self.defs.contains_key(&key) {
            return Err(Error::InvalidDefinition { name: def.name.clone(), version: def.version, reason: "registered twice".into() });
        }
        self.defs.insert(key, def);
        Ok(())
    }

    /// The definition `name` at `version`.
    pub fn get(&self, name: &str, version: u32) -> Option<&Arc<Definition>> {
        self.defs.get(&(name.to_owned(), version))
    }

    /// The newest version of `name`, used when a start request names no version.
    pub fn latest(&self, name: &str) -> Option<&Arc<Definition>> {
        self.defs.range((name.to_owned(), 0)..=(name.to_owned(), u32::MAX)).next_back().map(|(_, d)| d)
    }

    /// Every registered definition.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Definition>> {
        self.defs.values()
    }

    /// The child sagas that registered definitions start and that are not registered:
    /// `(definition, step, child definition)`.
    pub fn missing_children(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for d in self.iter() {
            for s in &d.steps {
                if let StepAction::Command(c) = &s.action
                    && let Some(child) = c.child()
                    && self.latest(child).is_none()
                {
                    out.push((d.name.clone(), s.name.clone(), child.to_owned()));
                }
            }
        }
        out
    }

    /// Every participant the registered definitions send commands to, compensations included,
    /// sorted and without repeats.
    pub fn participants(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .iter()
            .flat_map(|d| d.steps.iter())
            .filter_map(|s| match &s.action {
                StepAction::Command(c) => Some(c),
                StepAction::Wait(_) => None,
            })
            .flat_map(|c| std::iter::once(c.participant.as_str()).chain(c.compensation.as_ref().map(|k| k.participant.as_str())))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.defs.keys()).finish()
    }
}
