//! A batch of commands in one transaction: lock the steps and read what they recorded, answer
//! from the record or run the handlers, record the outcomes, commit; the handlers' results
//! become replies here, in one place.

use std::time::{Duration, Instant};

use lapin::Channel;
use lapin::message::Delivery;
use sagaflow_amqp::transport;
use sagas::protocol::{InboundCommand, ReplyOutcome, WireMessage, decode_command, encode_reply};
use sagas::{CommandKind, Timestamp};
use sqlx::PgPool;
use tracing::Instrument as _;

use super::Participant;
use super::builder::Registered;
use super::reply::Replies;
use crate::handler::{Beats, Context, HandlerError, HandlerResult};
use crate::store;

/// How a run of [`Participant::execute`] ended.
enum Run {
    /// Committed: each command's reply, in order.
    Done(Vec<WireMessage>),
    /// Another delivery recorded one of the steps first; nothing was written.
    Conflict,
    /// The handler of command `at`, which used the transaction, did not succeed, and there was
    /// no savepoint to undo its writes alone: nothing was written. Its outcome is `outcome`.
    Undo { at: usize, outcome: ReplyOutcome },
    /// The handler of command `at` ran past `slow_handler` in a batch: it was stopped, nothing
    /// was written.
    Slow { at: usize },
}

/// What [`Participant::execute`] did with a batch.
enum Executed {
    /// Committed: each command's reply, in order.
    Done(Vec<WireMessage>),
    /// Nothing was written: command `at` is slow; run it alone, and the others without it.
    Split(usize),
}

/// A command ready to run: its delivery, the command, its handler.
type Item<'a> = (Delivery, InboundCommand, &'a Registered);

impl Participant {
    /// Handle one batch of deliveries: refuse what cannot be handled, run the commands (one per
    /// step in a transaction), publish the replies, ack.
    pub(super) async fn process(&self, pool: &PgPool, ch: &Channel, replies: &Replies, batch: Vec<Delivery>) {
        let queue = self.inner.names.participant_queue(&self.inner.name);
        tracing::debug!(participant = %self.inner.name, commands = batch.len(), "handling a batch of commands");
        let mut valid = Vec::with_capacity(batch.len());
        for d in batch {
            match self.check(&d) {
                Ok((cmd, reg)) => valid.push((d, cmd, reg)),
                Err((code, detail)) => self.refuse(ch, &queue, &d, code, &detail).await,
            }
        }
        // A command whose handler was slow last time runs alone, beside the others (unless
        // another command of its step is here: they keep their order, in rounds).
        let step = |c: &InboundCommand| (c.saga.saga_id, c.step);
        let (alone, valid): (Vec<Item<'_>>, Vec<Item<'_>>) = {
            let slow = self.inner.slow.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let steps: Vec<_> = valid.iter().map(|(_, c, _)| step(c)).collect();
            valid.into_iter().partition(|(_, c, _)| slow.contains(&c.command) && steps.iter().filter(|s| **s == step(c)).count() == 1)
        };
        // One command per step in a transaction: another of the same step (its compensation, a
        // redelivery) runs after it, in a transaction of its own.
        let mut rounds: Vec<Vec<Item<'_>>> = Vec::new();
        for item in valid {
            match rounds.iter_mut().find(|r| !r.iter().any(|(_, c, _)| step(c) == step(&item.1))) {
                Some(round) => round.push(item),
                None => rounds.push(vec![item]),
            }
        }
        let batched = async {
            for round in rounds {
                self.process_round(pool, ch, replies, round).await;
            }
        };
        let mut alone_runs = Vec::with_capacity(alone.len());
        for item in alone {
            alone_runs.push(self.process_alone(pool, ch, replies, item));
        }
        tokio::join!(batched, futures_util::future::join_all(alone_runs));
    }

    /// [`Self::process_round`] of one command, once fewer than `concurrency` commands run alone
    /// in the whole participant (each holds a connection beside the batches').
    async fn process_alone(&self, pool: &PgPool, ch: &Channel, replies: &Replies, item: Item<'_>) {
        let _permit = self.inner.alone.acquire().await;
        self.process_round(pool, ch, replies, vec![item]).await;
    }

    /// Run commands of distinct steps in one transaction, then hand them to the reply task; on
    /// a database failure, each goes back to the queue (or, refused by PostgreSQL, to the dead
    /// letters).
    async fn process_round(&self, pool: &PgPool, ch: &Channel, replies: &Replies, mut round: Vec<Item<'_>>) {
        let cmds: Vec<(&Registered, &InboundCommand)> = round.iter().map(|(_, c, r)| (*r, c)).collect();
        let started = Instant::now();
        let result = self.execute(pool, ch, &cmds).await;
        drop(cmds);
        if let ([(_, cmd, _)], Ok(_)) = (round.as_slice(), &result) {
            self.timed(&cmd.command, started.elapsed());
        }
        match result {
            Ok(Executed::Done(answers)) => {
                let done = round.into_iter().map(|(d, c, _)| (d, c)).zip(answers).collect();
                self.finish(replies, done).await;
            }
            Ok(Executed::Split(at)) => {
                let slow = round.remove(at);
                tracing::info!(
                    participant = %self.inner.name, command = %slow.1.command, saga.id = %slow.1.saga.saga_id,
                    slow_handler_ms = self.inner.config.slow_handler.as_millis(),
                    "a handler ran past slow_handler in a batch: the batch runs again without it, and it runs alone"
                );
                self.inner.slow.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(slow.1.command.clone());
                tokio::join!(
                    Box::pin(self.process_round(pool, ch, replies, vec![slow])),
                    Box::pin(self.process_round(pool, ch, replies, round))
                );
            }
            // PostgreSQL refuses the data itself (SQLSTATE class 22 or 54): the same every time.
            Err(e) if store::is_unstorable(&e) && round.len() > 1 => {
                tracing::info!(participant = %self.inner.name, error = %e, "PostgreSQL refused a batch of commands; running them one by one");
                for item in round {
                    Box::pin(self.process_round(pool, ch, replies, vec![item])).await;
                }
            }
            Err(e) if store::is_unstorable(&e) => {
                let (d, ..) = &round[0];
                let queue = self.inner.names.participant_queue(&self.inner.name);
                self.refuse(ch, &queue, d, "unstorable", &format!("PostgreSQL cannot store it: {e}")).await;
            }
            Err(e) => {
                tracing::warn!(participant = %self.inner.name, commands = round.len(), error = %e, "database unavailable; the commands go back to the queue");
                tokio::time::sleep(Duration::from_millis(500)).await;
                for (d, ..) in round {
                    let _ = transport::requeue(&d).await;
                }
            }
        }
    }

    /// A command named `command` ran alone in `took`: it is batched again once it is fast.
    fn timed(&self, command: &str, took: Duration) {
        let limit = self.inner.config.slow_handler;
        if !limit.is_zero() && took < limit {
            self.inner.slow.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(command);
        }
    }

    /// Decode `d` and find its handler; `Err((reason, detail))` for a dead letter.
    fn check(&self, d: &Delivery) -> Result<(InboundCommand, &Registered), (&'static str, String)> {
        let inner = &self.inner;
        let max = inner.config.max_body_bytes;
        let cmd = transport::wire_from_delivery(d, max).and_then(|m| decode_command(&m, max)).map_err(|e| (e.code(), e.to_string()))?;
        let Some(reg) = inner.handlers.get(&cmd.command) else {
            return Err(("unknown_command", format!("participant `{}` has no handler for `{}`", inner.name, cmd.command)));
        };
        if reg.kind != cmd.kind {
            let detail = format!("`{}` is registered as {} but arrived as {}", cmd.command, reg.kind.as_str(), cmd.kind.as_str());
            return Err(("unknown_command", detail));
        }
        Ok((cmd, reg))
    }

    /// The span of one command's handling.
    fn span(&self, cmd: &InboundCommand) -> tracing::Span {
        let trace_id = cmd.traceparent.as_deref().and_then(|t| t.split('-').nth(1)).unwrap_or("");
        let span = tracing::info_span!("command", participant = %self.inner.name, saga.id = %cmd.saga.saga_id, step.name = %cmd.step_name, kind = cmd.kind.as_str(), attempt = cmd.attempt, message.id = %cmd.message_id, trace.id = trace_id);
        sagaflow_amqp::telemetry::follow(&span, cmd.traceparent.as_deref());
        span
    }

    /// Run `cmds` (of distinct steps) once in effect; returns their replies, in order.
    ///
    /// A step's command and its compensation never run at the same time here: a compensation
    /// waits for a slow command to finish, and a command that arrives after its compensation is
    /// refused without running. The first run goes without savepoints (they cost a round trip
    /// per handler): a handler that did not succeed after using the transaction undoes the
    /// run, and the run is made again with its outcome known (it does not run twice) and the
    /// other handlers in savepoints, so a refusal undoes only its own writes. A conflict (another
    /// delivery recorded a step first) runs again too, answering from that record.
    ///
    /// In a batch of several, a handler that runs past `slow_handler` is stopped and nothing is
    /// written ([`Executed::Split`]).
    async fn execute(&self, pool: &PgPool, ch: &Channel, cmds: &[(&Registered, &InboundCommand)]) -> Result<Executed, sqlx::Error> {
        let mut known: Vec<Option<ReplyOutcome>> = vec![None; cmds.len()];
        let mut savepoints = false;
        let limit = self.inner.config.slow_handler;
        let deadline = (cmds.len() > 1 && !limit.is_zero()).then_some(limit);
        loop {
            match self.execute_once(pool, ch, cmds, &mut known, savepoints, deadline).await? {
                Run::Done(replies) => return Ok(Executed::Done(replies)),
                Run::Slow { at } => return Ok(Executed::Split(at)),
                Run::Conflict => {
                    tracing::info!(participant = %self.inner.name, "another delivery recorded a step first; answering from its record")
                }
                Run::Undo { at, outcome } => {
                    known[at] = Some(outcome);
                    savepoints = true;
                }
            }
        }
    }

    /// One run of [`Self::execute`]: lock and read, answer or run each command, record, commit.
    async fn execute_once(
        &self,
        pool: &PgPool,
        ch: &Channel,
        cmds: &[(&Registered, &InboundCommand)],
        known: &mut [Option<ReplyOutcome>],
        savepoints: bool,
        deadline: Option<Duration>,
    ) -> Result<Run, sqlx::Error> {
        let name = &self.inner.name;
        let all: Vec<&InboundCommand> = cmds.iter().map(|(_, c)| *c).collect();
        let (mut tx, priors) = store::begin_read(pool, name, &all).await?;
        let mut outcomes: Vec<(ReplyOutcome, bool)> = Vec::with_capacity(cmds.len());
        // Whether each command's step has a record of its kind already (one this run replaces).
        let replaces: Vec<bool> = priors.iter().map(|p| p.outcome.is_some()).collect();
        let mut savepoint = false;
        for (i, ((reg, cmd), prior)) in cmds.iter().zip(priors).enumerate() {
            let span = self.span(cmd);
            if let Some(outcome) = span.in_scope(|| answer_from(cmd, prior)) {
                outcomes.push((outcome, false));
                continue;
            }
            if let Some(outcome) = known[i].clone() {
                outcomes.push(recorded(storable(outcome)));
                continue;
            }
            if savepoints {
                let set = if savepoint { "RELEASE SAVEPOINT handler; SAVEPOINT handler" } else { "SAVEPOINT handler" };
                sqlx::raw_sql(set).execute(tx.conn()).await?;
                savepoint = true;
            }
            let beats = Beats { ch, publishing: &self.inner.publishing, last: None };
            let mut cx = Context { tx: tx.conn(), cmd, touched: false, beats };
            let call = reg.handler.call(&mut cx, cmd.body.clone()).instrument(span.clone());
            let result = match deadline {
                None => call.await,
                Some(limit) => match tokio::time::timeout(limit, call).await {
                    Ok(result) => result,
                    // Stopped where it was: the transaction is dropped open, so its connection is
                    // closed and everything the batch wrote rolls back.
                    Err(_) => return Ok(Run::Slow { at: i }),
                },
            };
            let touched = cx.touched;
            let (outcome, record) = span.in_scope(|| outcome_of(result));
            let failed = !matches!(outcome, ReplyOutcome::Success { .. });
            if failed && touched && !savepoints {
                // Its writes cannot be undone alone: undo the run, and run it again knowing this.
                tx.rollback().await?;
                return Ok(Run::Undo { at: i, outcome });
            }
            if failed && savepoint {
                // Undo this handler's writes only.
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT handler").execute(tx.conn()).await?;
            }
            outcomes.push((storable(outcome), record));
        }
        let records: Vec<store::Record<'_>> = all
            .iter()
            .zip(&outcomes)
            .zip(replaces)
            .filter(|((_, (_, record)), _)| *record)
            .map(|((cmd, (outcome, _)), replaces)| store::Record { cmd, outcome, replaces })
            .collect();
        if !tx.record_and_commit(name, &records).await? {
            return Ok(Run::Conflict);
        }
        drop(records);
        let now = Timestamp::now();
        Ok(Run::Done(all.iter().zip(&outcomes).map(|(cmd, (o, _))| encode_reply(cmd, o, now)).collect()))
    }
}

/// A handler's result as the reply's outcome, and whether the step records it: a success and a
/// refusal are final (a redelivery gets the same answer), a transient failure is not (the
/// orchestrator retries, and the next attempt runs the handler again).
fn outcome_of(result: HandlerResult<serde_json::Value>) -> (ReplyOutcome, bool) {
    match result {
        Ok(output) => recorded(ReplyOutcome::Success { output }),
        Err(HandlerError::Reject { code, message }) => {
            tracing::info!(code, message, "rejected");
            recorded(ReplyOutcome::Rejected { code, message })
        }
        Err(HandlerError::Transient(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "transient failure; the orchestrator retries");
            (ReplyOutcome::TransientFailure { message: format!("{e:#}") }, false)
        }
    }
}

/// `outcome`, with whether the step records it (all but a transient failure).
fn recorded(outcome: ReplyOutcome) -> (ReplyOutcome, bool) {
    let record = !matches!(outcome, ReplyOutcome::TransientFailure { .. });
    (outcome, record)
}

/// The answer a command gets without running, from what its step already recorded: the
/// recorded outcome, or a refusal for a command that arrives after its compensation.
///
/// One exception: a compensation whose step recorded a refusal runs again when it arrives as a
/// new message (another attempt: an operator's retry once the cause is fixed). A refusal wrote
/// nothing, so running it again cannot undo twice; its new outcome replaces the refusal. The
/// same message delivered again is answered from the record, as always.
fn answer_from(cmd: &InboundCommand, prior: store::Prior) -> Option<ReplyOutcome> {
    if cmd.kind == CommandKind::Invoke && prior.compensated {
        tracing::info!("the step was already compensated; refusing the late command");
        return Some(ReplyOutcome::Rejected {
            code: "already_compensated".into(),
            message: "this step was compensated before the command arrived".into(),
        });
    }
    let outcome = prior.outcome?;
    let retried = cmd.kind == CommandKind::Compensate
        && matches!(outcome, ReplyOutcome::Rejected { .. })
        && prior.command_id != Some(cmd.message_id.0);
    if retried {
        tracing::info!(attempt = cmd.attempt, "the compensation was refused before; this attempt runs it again");
        return None;
    }
    tracing::info!("already handled; answering from the inbox");
    Some(outcome)
}

/// An outcome PostgreSQL can store and the orchestrator accepts: U+0000, which neither takes,
/// becomes U+FFFD wherever a handler put it (its output, a refusal's code or message, an
/// error's text), with a warning. Left as it was, the reply could never be recorded and the
/// command would be redelivered for ever.
fn storable(mut outcome: ReplyOutcome) -> ReplyOutcome {
    fn text(s: &mut String) -> bool {
        let nul = s.contains('\0');
        if nul {
            *s = s.replace('\0', "\u{FFFD}");
        }
        nul
    }
    fn value(v: &mut serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => text(s),
            serde_json::Value::Array(a) => a.iter_mut().fold(false, |changed, v| value(v) | changed),
            serde_json::Value::Object(o) => {
                let values = o.values_mut().fold(false, |changed, v| value(v) | changed);
                let keys = o.keys().any(|k| k.contains('\0'));
                if keys {
                    *o = std::mem::take(o).into_iter().map(|(k, v)| (k.replace('\0', "\u{FFFD}"), v)).collect();
                }
                values | keys
            }
            _ => false,
        }
    }
    let changed = match &mut outcome {
        ReplyOutcome::Success { output } => value(output),
        ReplyOutcome::Rejected { code, message } => text(code) | text(message),
        ReplyOutcome::TransientFailure { message } => text(message),
    };
    if changed {
        tracing::warn!("the handler's outcome holds U+0000, which PostgreSQL cannot store; replaced with U+FFFD");
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_postgresql_cannot_store_has_its_nul_replaced_and_a_clean_one_is_left_alone() {
        let output = serde_json::json!({"id\u{0}": ["a\u{0}b", {"k": "\u{0}"}], "n": 1});
        let scrubbed = storable(ReplyOutcome::Success { output });
        assert_eq!(
            scrubbed,
            ReplyOutcome::Success { output: serde_json::json!({"id\u{FFFD}": ["a\u{FFFD}b", {"k": "\u{FFFD}"}], "n": 1}) }
        );
        let refusal = storable(ReplyOutcome::Rejected { code: "c\u{0}".into(), message: "\u{0}".into() });
        assert_eq!(refusal, ReplyOutcome::Rejected { code: "c\u{FFFD}".into(), message: "\u{FFFD}".into() });
        let clean = ReplyOutcome::TransientFailure { message: "the database is away".into() };
        assert_eq!(storable(clean.clone()), clean);
    }
}
