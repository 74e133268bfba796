//! What a participant implements: a [`Handler`] per command, given a [`Context`] with the
//! participant's open transaction.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use sagas::protocol::InboundCommand;
use sagas::{Command, CommandKind, SagaId, StepIndex};
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
}

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
