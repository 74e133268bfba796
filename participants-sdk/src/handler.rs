//! What a participant implements: a [`Handler`] per command, given a [`Context`] with the
//! participant's open transaction.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use std::time::{Duration, Instant};

use lapin::Channel;
use sagaflow_amqp::transport;
use sagas::protocol::{InboundCommand, MAX_HEARTBEAT_BYTES, encode_heartbeat, json_has_nul};
use sagas::{Command, CommandKind, MessageId, SagaId, StepIndex, Timestamp};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;

/// Why a handler did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A business refusal: nothing changed and the saga compensates. Its business writes are
    /// rolled back; the refusal is recorded so a redelivery gets the same answer. A refused
    /// compensation runs again for a new attempt (an operator's retry once the cause is fixed).
    #[error("rejected: {code}: {message}")]
    Reject {
        /// A stable code (`out_of_stock`).
        code: String,
        /// In words.
        message: String,
    },
    /// Something that may pass (the database went away): the transaction is rolled back and
    /// the orchestrator retries the step under its policy. `?` on any error gives this.
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
}

impl HandlerError {
    /// A business refusal.
    pub fn reject(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Reject { code: code.into(), message: message.into() }
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        Self::Transient(e.into())
    }
}

impl From<anyhow::Error> for HandlerError {
    fn from(e: anyhow::Error) -> Self {
        Self::Transient(e)
    }
}

/// What a handler returns.
pub type HandlerResult<T> = Result<T, HandlerError>;

/// The command's context: the participant's open transaction and where the command comes from.
pub struct Context<'c> {
    pub(crate) tx: &'c mut PgConnection,
    pub(crate) cmd: &'c InboundCommand,
    /// The handler asked for the transaction (so a refusal may have writes to undo).
    pub(crate) touched: bool,
    /// Where heartbeats go.
    pub(crate) beats: Beats<'c>,
}

/// The channel heartbeats are published on, and when the last one left.
pub(crate) struct Beats<'c> {
    pub(crate) ch: &'c Channel,
    /// Held while publishing on the channel (one batch of confirms at a time).
    pub(crate) publishing: &'c tokio::sync::Mutex<()>,
    pub(crate) last: Option<Instant>,
}

/// Heartbeats go at most this often when the step's heartbeat timeout is not known.
const DEFAULT_HEARTBEAT_PACE: Duration = Duration::from_secs(1);

impl Context<'_> {
    /// The open transaction: business writes made here commit together with the inbox record
    /// and the reply, or not at all.
    pub fn tx(&mut self) -> &mut PgConnection {
        self.touched = true;
        self.tx
    }

    /// The saga this command belongs to.
    pub fn saga_id(&self) -> SagaId {
        self.cmd.saga.saga_id
    }

    /// The step's index and name.
    pub fn step(&self) -> (StepIndex, &str) {
        (self.cmd.step, &self.cmd.step_name)
    }

    /// Invoke or compensate.
    pub fn kind(&self) -> CommandKind {
        self.cmd.kind
    }

    /// The attempt (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.cmd.attempt
    }

    /// The step's heartbeat timeout, when it declares one: call [`heartbeat`](Self::heartbeat)
    /// well within it, or the attempt times out.
    pub fn heartbeat_timeout(&self) -> Option<Duration> {
        self.cmd.heartbeat_ms.map(Duration::from_millis)
    }

    /// What an earlier attempt of this step reported in its last heartbeat, to carry on from
    /// (`None` on a first attempt, or when no attempt reported any).
    pub fn progress(&self) -> Option<&Value> {
        self.cmd.progress.as_ref()
    }

    /// Tell the orchestrator this command is still being worked on, with `details` of the
    /// progress (any JSON, at most [`MAX_HEARTBEAT_BYTES`] encoded). It keeps the attempt
    /// alive past the step's heartbeat timeout; the saga shows the last details, and the next
    /// attempt, if there is one, gets them as [`progress`](Self::progress).
    ///
    /// Call it as often as is convenient: one heartbeat leaves per third of the heartbeat
    /// timeout (per second when the step has none), and calls in between send nothing (the
    /// details of the next one that leaves are the newest). A heartbeat is published with a
    /// confirm, outside the transaction: it reports liveness, not an effect. An error here
    /// (details too large, the broker gone) is the handler's to return or ignore; with `?` the
    /// attempt ends as a transient failure.
    pub async fn heartbeat<T: Serialize + ?Sized>(&mut self, details: &T) -> anyhow::Result<()> {
        let pace = self.cmd.heartbeat_ms.map_or(DEFAULT_HEARTBEAT_PACE, |ms| Duration::from_millis(ms) / 3);
        if self.beats.last.is_some_and(|at| at.elapsed() < pace) {
            return Ok(());
        }
        let details = serde_json::to_value(details).map_err(|e| anyhow::anyhow!("heartbeat details do not encode: {e}"))?;
        let msg = encode_heartbeat(self.cmd, &details, MessageId::new_random(), Timestamp::now());
        if msg.body.len() > MAX_HEARTBEAT_BYTES {
            anyhow::bail!("heartbeat details are {} bytes encoded, over the limit of {MAX_HEARTBEAT_BYTES}", msg.body.len());
        }
        if json_has_nul(&msg.body) {
            anyhow::bail!("heartbeat details hold U+0000, which the orchestrator cannot store");
        }
        let one_batch = self.beats.publishing.lock().await;
        transport::publish_confirmed(self.beats.ch, "", &self.cmd.reply_to, &msg, false).await?;
        drop(one_batch);
        self.beats.last = Some(Instant::now());
        tracing::debug!(saga.id = %self.cmd.saga.saga_id, step = %self.cmd.step_name, attempt = self.cmd.attempt, "heartbeat sent");
        Ok(())
    }

    /// A key for the effect that is the same for every attempt and redelivery of this step:
    /// `{saga_id}/{step}/{kind}`. Handy as a unique key in business tables.
    pub fn effect_key(&self) -> String {
        format!("{}/{}/{}", self.cmd.saga.saga_id, self.cmd.step.0, self.cmd.kind.as_str())
    }
}

/// Handles command `C`. Implement it on your service type; a compensation is a command too.
///
/// A compensation handler must be idempotent and must succeed when there is nothing to undo
/// (the command may never have run: the step timed out). Return
/// [`HandlerError::Transient`] when it cannot run now; it is retried.
#[diagnostic::on_unimplemented(message = "`{Self}` does not handle command `{C}`", label = "add `impl Handler<{C}> for {Self}`")]
pub trait Handler<C: Command>: Send + Sync + 'static {
    /// Run the command inside `cx.tx()`.
    fn handle(&self, cx: &mut Context<'_>, cmd: C) -> impl Future<Output = HandlerResult<C::Reply>> + Send;
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A handler with its types erased: JSON in, JSON out.
pub(crate) trait ErasedHandler: Send + Sync {
    fn call<'a>(&'a self, cx: &'a mut Context<'_>, body: Value) -> BoxFuture<'a, HandlerResult<Value>>;
}

pub(crate) struct Typed<C, H> {
    pub(crate) handler: H,
    pub(crate) _command: PhantomData<fn(C)>,
}

impl<C: Command, H: Handler<C>> ErasedHandler for Typed<C, H> {
    fn call<'a>(&'a self, cx: &'a mut Context<'_>, body: Value) -> BoxFuture<'a, HandlerResult<Value>> {
        Box::pin(async move {
            // The orchestrator built this body from the same type: a mismatch is a deployment
            // error (two versions of the command), refused as a business rejection so it does
            // not loop through retries.
            let cmd: C = serde_json::from_value(body)
                .map_err(|e| HandlerError::reject("invalid_command", format!("the body of `{}` does not decode: {e}", C::NAME)))?;
            let reply = self.handler.handle(cx, cmd).await?;
            serde_json::to_value(reply).map_err(|e| HandlerError::Transient(anyhow::anyhow!("the reply does not encode: {e}")))
        })
    }
}
