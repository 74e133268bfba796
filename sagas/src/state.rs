//! The state of one saga instance: what the store keeps and `decide` reads and returns.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::Definition;
use crate::ids::{CommandKind, SagaId, StepIndex, Timestamp};

/// Where a saga is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Stored, not yet started.
    Created,
    /// Going forward.
    Running,
    /// A step failed (or the saga was aborted); undoing the completed steps.
    Compensating,
    /// Every step completed. Terminal.
    Completed,
    /// Failed and every completed step was compensated. Terminal.
    Compensated,
    /// Waiting for an operator; [`SagaState::stop`] says why and what can be done.
    Stopped,
}

impl SagaStatus {
    /// Every status.
    pub const ALL: [Self; 6] = [Self::Created, Self::Running, Self::Compensating, Self::Completed, Self::Compensated, Self::Stopped];

    /// The database names of the statuses for which `pred` holds (to bind to a query).
    pub fn names_where(pred: impl Fn(Self) -> bool) -> Vec<&'static str> {
        Self::ALL.into_iter().filter(|s| pred(*s)).map(Self::as_str).collect()
    }

    /// `completed` or `compensated`: nothing more will ever happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated)
    }

    /// Terminal, or `stopped` for an operator: nothing more happens on its own, so a caller
    /// waiting for an outcome can stop waiting.
    pub fn is_settled(self) -> bool {
        self.is_terminal() || self == Self::Stopped
    }

    /// The wire / database name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Stopped => "stopped",
        }
    }
}

/// Why a saga stopped. Stable codes, each documented in `docs/errors/<code>.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopCode {
    /// A compensation was rejected or spent its retries. Operator: `retry` or `skip`.
    CompensationFailed,
    /// A step after the pivot was rejected, spent its retries or replied unusably.
    /// Operator: `resume` (sends the step again).
    StepFailedAfterPivot,
    /// The saga deadline passed after the pivot, or a retriable step timed out with
    /// `OnTimeout::Fail`. Operator: `resume`.
    TimedOut,
}

impl StopCode {
    /// Every stop code (each has its page in docs/errors/; a test checks).
    pub const ALL: [Self; 3] = [Self::CompensationFailed, Self::StepFailedAfterPivot, Self::TimedOut];

    /// The stable code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CompensationFailed => "compensation_failed",
            Self::StepFailedAfterPivot => "step_failed_after_pivot",
            Self::TimedOut => "timed_out",
        }
    }
}

/// A stop, with enough to act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopReason {
    /// The stable code.
    pub code: StopCode,
    /// The step concerned, if any.
    pub step: Option<String>,
    /// What happened, in words.
    pub message: String,
}

/// Why a saga failed (and so compensated).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The step that failed, if a step did.
    pub step: Option<String>,
    /// Why: a code of the orchestrator's own, or the participant's rejection code.
    pub code: FailureCode,
    /// What happened, in words.
    pub message: String,
}

/// Why a saga failed. Serialized as its code, a string: the orchestrator's own codes, or the
/// code a participant rejected a command with (a participant's code that is one of the
/// orchestrator's reads back as that variant: the string is what counts).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FailureCode {
    /// A step spent its retries.
    RetriesExhausted,
    /// A step's attempt timed out (`OnTimeout::Fail`).
    StepTimedOut,
    /// A wait step's deadline passed.
    WaitExpired,
    /// The saga's deadline passed.
    DeadlineExceeded,
    /// An operator aborted the saga.
    Aborted,
    /// A step's reply could not be applied to the saga's data.
    InvalidReply,
    /// A step's command or condition could not be built from the saga's data.
    InvalidData,
    /// The orchestrator refused a command for the participant: it could never be published
    /// (docs/protocol.md).
    Unpublishable,
    /// The saga was a child saga, and its parent compensated the step that started it.
    ParentCompensated,
    /// The code a participant rejected the command with.
    Participant(String),
}

impl FailureCode {
    /// The orchestrator's own codes (each documented in docs/concepts.md; a test checks).
    pub const OWN: [Self; 9] = [
        Self::RetriesExhausted,
        Self::StepTimedOut,
        Self::WaitExpired,
        Self::DeadlineExceeded,
        Self::Aborted,
        Self::InvalidReply,
        Self::InvalidData,
        Self::Unpublishable,
        Self::ParentCompensated,
    ];

    /// The code.
    pub fn as_str(&self) -> &str {
        match self {
            Self::RetriesExhausted => "retries_exhausted",
            Self::StepTimedOut => "step_timed_out",
            Self::WaitExpired => "wait_expired",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Aborted => "aborted",
            Self::InvalidReply => "invalid_reply",
            Self::InvalidData => "invalid_data",
            Self::Unpublishable => "unpublishable",
            Self::ParentCompensated => "parent_compensated",
            Self::Participant(code) => code,
        }
    }

    /// The failure code `code` names.
    pub fn parse(code: &str) -> Self {
        Self::OWN.into_iter().find(|c| c.as_str() == code).unwrap_or_else(|| Self::Participant(code.to_owned()))
    }
}

impl std::fmt::Display for FailureCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for FailureCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for FailureCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for FailureCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FailureCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|code| Self::parse(&code))
    }
}

/// Where one step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not reached.
    Pending,
    /// Its condition was false, or its wait passed the deadline with `OnDeadline::Continue`.
    Skipped,
    /// Waiting for a slot of the shared resource its command holds (see `StepBuilder::limit`).
    AwaitingSlot,
    /// Command sent (attempt [`StepState::attempts`]), waiting for the reply.
    Running,
    /// The last attempt failed transiently; the next one is due by a timer.
    RetryScheduled,
    /// Waiting for an external event.
    Waiting,
    /// Succeeded.
    Completed,
    /// Failed without effect (rejected, or every attempt failed transiently).
    Failed,
    /// No reply in time; the command may have run, so it counts as possibly completed.
    TimedOut,
    /// Never ran: the saga failed before it could.
    Cancelled,
    /// Compensation sent (attempt [`StepState::compensation_attempts`]).
    Compensating,
    /// The last compensation attempt failed; the next one is due by a timer.
    CompensationRetryScheduled,
    /// Undone.
    Compensated,
    /// The compensation gave up; the saga is stopped in `compensation_failed`.
    CompensationFailed,
    /// An operator marked the compensation as done by hand.
    CompensationSkipped,
}

/// The state of one step of one instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// Where the step is.
    pub status: StepStatus,
    /// Command attempts sent so far (the current attempt's number).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Attempts made before the current retry budget (an operator `resume` starts a new budget).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub budget_from: u32,
    /// Compensation attempts sent so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compensation_attempts: u32,
    /// Compensation attempts made before the current budget (an operator `retry` starts one).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compensation_budget_from: u32,
    /// Set when an attempt timed out: the command may have run even if the step later fails.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maybe_applied: bool,
    /// Whether the current attempt's timeout escalated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub escalated: bool,
    /// When the first attempt was sent (or the wait began).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When the step completed, failed or was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// When the compensation completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensated_at: Option<Timestamp>,
    /// The last failure, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The reply's output (or the event's payload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The details of the last heartbeat of any attempt (what the participant reported of its
    /// progress); the next attempt's command carries them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
    /// When the last heartbeat was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_at: Option<Timestamp>,
    /// Whether the step holds a slot of its resource.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub slot: bool,
}

impl StepState {
    fn new() -> Self {
        Self {
            status: StepStatus::Pending,
            attempts: 0,
            budget_from: 0,
            compensation_attempts: 0,
            compensation_budget_from: 0,
            maybe_applied: false,
            escalated: false,
            started_at: None,
            finished_at: None,
            compensated_at: None,
            last_error: None,
            output: None,
            progress: None,
            heartbeat_at: None,
            slot: false,
        }
    }

    /// Attempts used in the current budget (of `kind`).
    pub fn used(&self, kind: CommandKind) -> u32 {
        match kind {
            CommandKind::Invoke => self.attempts - self.budget_from,
            CommandKind::Compensate => self.compensation_attempts - self.compensation_budget_from,
        }
    }
}

/// One saga instance. Stored as a JSON document that leaves out what is at its default (a
/// count at zero, a flag not set, a time or reason not there yet) and reads it back as that
/// default: a running saga's document is about half as long, and it is rewritten by every
/// decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    /// Instance id.
    pub id: SagaId,
    /// Definition name it is pinned to.
    pub definition: String,
    /// Definition version it is pinned to.
    pub version: u32,
    /// Where it is.
    pub status: SagaStatus,
    /// The saga's data: its input, plus what steps stored from their replies.
    pub data: Value,
    /// The current node of the definition (`nodes.len()` once every node completed).
    pub node: usize,
    /// One entry per step of the definition.
    pub steps: Vec<StepState>,
    /// Command steps that completed or may have (timed out), in order of completion.
    pub completed: Vec<StepIndex>,
    /// Compensations still to run, next first; `None` until compensation begins (a failing
    /// parallel group first waits for its in-flight branches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Vec<StepIndex>>,
    /// Whether the pivot step completed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub past_pivot: bool,
    /// Why the saga failed, once it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// Why it is stopped, while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopReason>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// When the saga deadline passes; cleared once the deadline was handled or cannot matter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<Timestamp>,
    /// Its priority (higher first; default 0): waiting steps take freed resource slots by
    /// priority, then by arrival.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// The parent saga's step that started this saga, when it is a child saga: it answers that
    /// step's command when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentLink>,
}

/// The step of a parent saga a child saga was started by, and the commands of it the child
/// answers: the attempt that started it, and the compensation that undoes it, once sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentLink {
    /// The parent saga.
    pub saga_id: SagaId,
    /// The parent's definition name.
    pub definition: String,
    /// The parent's definition version.
    pub version: u32,
    /// The parent's step.
    pub step: StepIndex,
    /// The step's name.
    pub step_name: String,
    /// The attempt of the step's command that started this saga.
    pub attempt: u32,
    /// The attempt of the step's compensation this saga answers when it is compensated, once
    /// the parent asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo: Option<u32>,
    /// How many sagas this one descends from: 1 for the child of a saga that has no parent
    /// (0 in links written before depths were kept). A child may be at most
    /// [`MAX_CHILD_DEPTH`] deep.
    #[serde(default)]
    pub depth: u32,
}

/// How deep child sagas may nest: a child step whose child would be deeper is refused
/// (`child_too_deep`). Definitions that start each other's newest versions can form a cycle no
/// registry check sees; this ends it.
pub const MAX_CHILD_DEPTH: u32 = 32;

fn is_zero<N: Default + PartialEq>(n: &N) -> bool {
    *n == N::default()
}

impl SagaState {
    /// A new instance of `def` with input `data`, not yet started: feed it `Input::Start`.
    pub fn new(def: &Definition, id: SagaId, data: Value, now: Timestamp) -> Self {
        Self {
            id,
            definition: def.name.clone(),
            version: def.version,
            status: SagaStatus::Created,
            data,
            node: 0,
            steps: def.steps.iter().map(|_| StepState::new()).collect(),
            completed: Vec::new(),
            compensation: None,
            past_pivot: false,
            failure: None,
            stop: None,
            created_at: now,
            updated_at: now,
            deadline_at: def.deadline_ms.map(|ms| now.plus_ms(ms)),
            priority: 0,
            parent: None,
        }
    }

    /// The step state at `index`.
    pub fn step(&self, index: StepIndex) -> Option<&StepState> {
        self.steps.get(index.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_code_is_its_string_both_ways() {
        for code in FailureCode::OWN {
            assert_eq!(FailureCode::parse(code.as_str()), code);
            let json = serde_json::to_value(&code).unwrap();
            assert_eq!(json, Value::String(code.as_str().into()));
            assert_eq!(serde_json::from_value::<FailureCode>(json).unwrap(), code);
        }
        let refused = FailureCode::parse("out_of_stock");
        assert_eq!(refused, FailureCode::Participant("out_of_stock".into()));
        assert_eq!(refused, "out_of_stock");
        assert_eq!(serde_json::from_value::<FailureCode>(serde_json::json!("out_of_stock")).unwrap(), refused);
        // A participant's code that is one of the orchestrator's reads back as it.
        assert_eq!(serde_json::from_value::<FailureCode>(serde_json::json!("aborted")).unwrap(), FailureCode::Aborted);
        assert_eq!(SagaStatus::names_where(SagaStatus::is_terminal), ["completed", "compensated"]);
    }

    /// A running saga's document as versions before the compact one wrote it: every field, at
    /// its default or not.
    const FULL_DOCUMENT: &str = r#"{"id":"01a23141-45f9-7072-9958-9dfe25254b0c","definition":"order_saga_3","version":1,
        "status":"running","data":{"fail":false,"n":4771},"node":1,
        "steps":[{"status":"completed","attempts":1,"budget_from":0,"compensation_attempts":0,"compensation_budget_from":0,
                  "maybe_applied":false,"escalated":false,"started_at":1796122691065,"finished_at":1796122691070,
                  "compensated_at":null,"last_error":null,"output":{"reserved":2}},
                 {"status":"running","attempts":2,"budget_from":0,"compensation_attempts":0,"compensation_budget_from":0,
                  "maybe_applied":true,"escalated":false,"started_at":1796122691071,"finished_at":null,
                  "compensated_at":null,"last_error":"timed out","output":null},
                 {"status":"pending","attempts":0,"budget_from":0,"compensation_attempts":0,"compensation_budget_from":0,
                  "maybe_applied":false,"escalated":false,"started_at":null,"finished_at":null,
                  "compensated_at":null,"last_error":null,"output":null}],
        "completed":[0],"compensation":null,"past_pivot":false,"failure":null,"stop":null,
        "created_at":1796122691065,"updated_at":1796122691071,"deadline_at":null}"#;

    #[test]
    fn a_state_leaves_out_its_defaults_and_reads_documents_that_have_them() {
        let state: SagaState = serde_json::from_str(FULL_DOCUMENT).unwrap();
        let compact = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<SagaState>(&compact).unwrap(), state);
        assert!(compact.len() * 2 < FULL_DOCUMENT.split_whitespace().collect::<String>().len(), "{compact}");
        // What is set is kept; what is at its default is not written.
        let doc: Value = serde_json::from_str(&compact).unwrap();
        assert_eq!(doc["steps"][1]["attempts"], 2);
        assert_eq!(doc["steps"][1]["maybe_applied"], true);
        assert_eq!(doc["steps"][1]["last_error"], "timed out");
        assert_eq!(doc["steps"][0]["output"]["reserved"], 2);
        assert_eq!(doc["steps"][2], serde_json::json!({ "status": "pending" }));
        for key in ["compensation", "past_pivot", "failure", "stop", "deadline_at", "priority", "parent"] {
            assert!(doc.get(key).is_none(), "{key} in {compact}");
        }
        // Set, they are written and read back.
        let mut set = state;
        set.past_pivot = true;
        set.compensation = Some(vec![StepIndex(0)]);
        set.deadline_at = Some(Timestamp(1_796_122_700_000));
        set.steps[2].compensation_attempts = 1;
        set.steps[2].escalated = true;
        let again = serde_json::to_string(&set).unwrap();
        assert_eq!(serde_json::from_str::<SagaState>(&again).unwrap(), set);
    }
}
