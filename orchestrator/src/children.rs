//! Child sagas: the nodes' side of the built-in participant `sagaflow.child`
//! ([`sagas::CHILD_PARTICIPANT`]). A child step's command starts the child saga, whose id is
//! derived from the parent's step and attempt ([`SagaId::for_child`]), so a start delivered
//! twice starts one child; the step's compensation applies `Input::Undo` to that child. The
//! child answers its parent itself, through its outbox, when it ends (`Effect::ReplyToParent`,
//! to the parent's reply queue). What is refused here (an unknown definition, an input the
//! child's data cannot take, a child deeper than [`MAX_CHILD_DEPTH`]), or found with nothing to
//! undo, is answered at once: the reply is applied to the parent directly.
//!
//! A command is acted on only when it is one the parent sent and still waits for (its id is
//! the deterministic id of the step's current attempt): a forged or stale one starts nothing.

use sagas::protocol::{InboundCommand, StartRequest};
use sagas::{
    CHILD_PARTICIPANT, CommandKind, Input, InputOutcome, MAX_CHILD_DEPTH, MessageId, ParentLink, Reply, ReplyOutcome, SagaId, SagaState,
    StepAction, StepStatus,
};

use crate::intake::{Engine, Handled, StartError};
use crate::store;

/// What became of a command of `sagaflow.child`.
#[derive(Debug)]
pub(crate) enum ChildVerdict {
    /// Done (or nothing to do): ack it.
    Done,
    /// Not a command any saga sent: dead-letter it with the reason.
    Refused(&'static str, String),
    /// Try again later (the database failed, or this node does not know the parent's version).
    Later(String),
}

impl Engine {
    /// Act on `cmd`, a command to `sagaflow.child`: start the child saga, or undo it.
    pub(crate) async fn child_command(&self, cmd: &InboundCommand) -> ChildVerdict {
        let (parent, step_name) = match self.parent_waiting(cmd).await {
            Ok(Some(p)) => p,
            Ok(None) => return ChildVerdict::Done,
            Err(v) => return v,
        };
        match cmd.kind {
            CommandKind::Invoke => self.start_child(cmd, &parent, step_name).await,
            CommandKind::Compensate => self.undo_child(cmd, &parent).await,
        }
    }

    /// The parent saga of `cmd` and the name of its step, from its definition (not the
    /// command's header), when it sent `cmd` and still waits for its answer; `None` for a
    /// command it no longer waits for (answered, or redelivered after the saga moved on).
    async fn parent_waiting(&self, cmd: &InboundCommand) -> Result<Option<(SagaState, String)>, ChildVerdict> {
        let id = cmd.saga.saga_id;
        let refused = |why: String| Err(ChildVerdict::Refused("invalid_command", why));
        if cmd.message_id != MessageId::for_command(id, cmd.step, cmd.kind, cmd.attempt) {
            return refused(format!("message id {} is not that of any command of saga {id}", cmd.message_id));
        }
        let parent = match store::load(&self.pool, id).await {
            Ok(Some(p)) => p,
            Ok(None) => return Err(ChildVerdict::Refused("unknown_saga", format!("no saga has id {id}"))),
            Err(e) => return Err(ChildVerdict::Later(format!("database error: {e}"))),
        };
        let Some(def) = self.registry().get(&parent.definition, parent.version) else {
            return Err(ChildVerdict::Later(format!(
                "saga {id} is on `{}` version {}, which this node does not know",
                parent.definition, parent.version
            )));
        };
        let child = def.step(cmd.step).and_then(|s| match &s.action {
            StepAction::Command(c) => c.child(),
            StepAction::Wait(_) => None,
        });
        if child.is_none_or(|c| cmd.kind == CommandKind::Invoke && c != cmd.command) {
            return refused(format!("step {} of `{}` does not start child saga `{}`", cmd.step, def.name, cmd.command));
        }
        let step = &parent.steps[cmd.step.get()];
        let waiting = match cmd.kind {
            CommandKind::Invoke => step.status == StepStatus::Running && step.attempts == cmd.attempt,
            CommandKind::Compensate => step.status == StepStatus::Compensating && step.compensation_attempts == cmd.attempt,
        };
        if !waiting {
            tracing::debug!(saga.id = %id, step = cmd.step.0, kind = cmd.kind.as_str(), attempt = cmd.attempt, "a child command its saga no longer waits for; dropped");
            return Ok(None);
        }
        let step_name = def.steps[cmd.step.get()].name.clone();
        Ok(Some((parent, step_name)))
    }

    /// Start the child saga of `cmd`'s step and attempt, as the newest version of its definition
    /// this node knows, with the parent's priority.
    async fn start_child(&self, cmd: &InboundCommand, parent: &SagaState, step_name: String) -> ChildVerdict {
        let child_id = SagaId::for_child(parent.id, cmd.step, cmd.attempt);
        let depth = parent.parent.as_ref().map_or(0, |l| l.depth).saturating_add(1);
        if depth > MAX_CHILD_DEPTH {
            let message = format!(
                "child saga `{}` would be {depth} sagas deep, past the limit of {MAX_CHILD_DEPTH} (do definitions start each other?)",
                cmd.command
            );
            return self.answer(cmd, ReplyOutcome::Rejected { code: "child_too_deep".into(), message }).await;
        }
        let Some(def) = self.registry().latest(&cmd.command) else {
            let message = format!("no definition `{}` is registered on the node that took the command", cmd.command);
            return self.answer(cmd, ReplyOutcome::Rejected { code: "unknown_definition".into(), message }).await;
        };
        let req = StartRequest {
            definition: def.name.clone(),
            version: Some(def.version),
            input: cmd.body.clone(),
            idempotency_key: None,
            saga_id: Some(child_id),
            priority: Some(parent.priority).filter(|p| *p != 0),
        };
        let link = ParentLink {
            saga_id: parent.id,
            definition: parent.definition.clone(),
            version: parent.version,
            step: cmd.step,
            step_name,
            attempt: cmd.attempt,
            undo: None,
            depth,
        };
        match self.start_as(&req, cmd.traceparent.as_deref(), Some(link.clone())).await {
            Ok(s) if s.created => {
                tracing::info!(saga.id = %child_id, parent.id = %parent.id, step = %link.step_name, "child saga started");
                ChildVerdict::Done
            }
            // Started before (the command was delivered again): it answers when it ends. An id
            // taken by a saga that is not this child (started by hand with it) can never answer.
            Ok(_) => match store::load(&self.pool, child_id).await {
                Ok(Some(c)) if c.parent.as_ref().is_some_and(|p| p.saga_id == link.saga_id && p.step == link.step) => ChildVerdict::Done,
                Ok(_) => {
                    let message = format!("saga id {child_id} is taken by a saga that is not this step's child");
                    self.answer(cmd, ReplyOutcome::Rejected { code: "child_id_taken".into(), message }).await
                }
                Err(e) => ChildVerdict::Later(format!("database error: {e}")),
            },
            Err(StartError::Database(e)) => ChildVerdict::Later(format!("database error: {e}")),
            Err(e) => {
                let code = e.code();
                self.answer(cmd, ReplyOutcome::Rejected { code: code.into(), message: format!("the child saga cannot start: {e}") }).await
            }
        }
    }

    /// Undo the child the step's last attempt started; when there is none (the parent compensates
    /// a step whose child never started), there is nothing to undo.
    async fn undo_child(&self, cmd: &InboundCommand, parent: &SagaState) -> ChildVerdict {
        let started = parent.steps[cmd.step.get()].attempts;
        let child_id = SagaId::for_child(parent.id, cmd.step, started);
        match self.apply(child_id, &Input::Undo { attempt: cmd.attempt }, None).await {
            Ok(Handled::UnknownSaga) => {
                let output = serde_json::json!({"undone": false, "why": "no child saga was started"});
                self.answer(cmd, ReplyOutcome::Success { output }).await
            }
            Ok(Handled::Decided { outcome: InputOutcome::Refused { reason }, status }) => {
                let message = format!("child saga {child_id} ({}) cannot be undone: {reason}", status.as_str());
                self.answer(cmd, ReplyOutcome::Rejected { code: "child_not_undone".into(), message }).await
            }
            Ok(Handled::UnknownVersion { definition, version }) => {
                ChildVerdict::Later(format!("child saga {child_id} is on `{definition}` version {version}, which this node does not know"))
            }
            Ok(Handled::Decided { outcome: InputOutcome::Applied, status }) => {
                tracing::info!(saga.id = %child_id, parent.id = %parent.id, status = status.as_str(), "child saga undone by its parent");
                ChildVerdict::Done
            }
            Ok(_) => ChildVerdict::Done,
            Err(e) => ChildVerdict::Later(format!("database error: {e}")),
        }
    }

    /// Answer `cmd` with `outcome` by applying the reply to its saga, as if the participant
    /// had replied.
    async fn answer(&self, cmd: &InboundCommand, outcome: ReplyOutcome) -> ChildVerdict {
        if let ReplyOutcome::Rejected { code, message } = &outcome {
            tracing::warn!(saga.id = %cmd.saga.saga_id, step = %cmd.step_name, code, message, "a child saga command was refused");
        }
        let reply = Reply { in_reply_to: cmd.message_id, step: cmd.step, kind: cmd.kind, attempt: cmd.attempt, outcome };
        match self.apply(cmd.saga.saga_id, &Input::Reply(reply), None).await {
            Ok(_) => ChildVerdict::Done,
            Err(e) => ChildVerdict::Later(format!("database error: {e}")),
        }
    }
}

/// The participant whose queue a node consumes when its definitions start child sagas.
pub(crate) fn participant(registry: &sagas::Registry) -> Option<&'static str> {
    registry.participants().contains(&CHILD_PARTICIPANT).then_some(CHILD_PARTICIPANT)
}
