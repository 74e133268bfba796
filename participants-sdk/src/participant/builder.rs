//! Building a [`Participant`]: its handlers and configuration, checked once.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use sagaflow_amqp::transport::Names;
use sagas::protocol::InboundCommand;
use sagas::{Command, CommandKind};

use super::{Error, Inner, Participant, ParticipantConfig};
use crate::handler::{ErasedHandler, Handler, Typed};

pub(super) type CrashHook = Arc<dyn Fn(&InboundCommand) -> bool + Send + Sync>;

/// A handler, and whether it handles a command or a compensation.
pub(super) struct Registered {
    pub(super) kind: CommandKind,
    pub(super) handler: Box<dyn ErasedHandler>,
}

/// Builds a [`Participant`].
pub struct ParticipantBuilder {
    name: String,
    handlers: HashMap<String, Registered>,
    config: ParticipantConfig,
    problems: Vec<String>,
    crash_after_commit: Option<CrashHook>,
}

impl ParticipantBuilder {
    /// A builder for participant `name`, with no handlers and the default configuration.
    pub(super) fn new(name: String) -> Self {
        Self { name, handlers: HashMap::new(), config: ParticipantConfig::default(), problems: Vec::new(), crash_after_commit: None }
    }

    /// Handle command `C` (a step's command) with `handler`.
    pub fn handle<C: Command>(self, handler: impl Handler<C>) -> Self {
        self.register::<C>(CommandKind::Invoke, handler)
    }

    /// Handle compensation `C` with `handler`. It must be idempotent and succeed when there is
    /// nothing to undo.
    pub fn compensate<C: Command>(self, handler: impl Handler<C>) -> Self {
        self.register::<C>(CommandKind::Compensate, handler)
    }

    fn register<C: Command>(mut self, kind: CommandKind, handler: impl Handler<C>) -> Self {
        if C::PARTICIPANT != self.name {
            self.problems.push(format!("`{}` belongs to participant `{}`, not `{}`", C::NAME, C::PARTICIPANT, self.name));
        }
        let typed = Typed::<C, _> { handler, _command: PhantomData };
        if self.handlers.insert(C::NAME.to_owned(), Registered { kind, handler: Box::new(typed) }).is_some() {
            self.problems.push(format!("`{}` is registered twice", C::NAME));
        }
        self
    }

    /// Fault injection for tests: for each command where `crash` returns true, behave as if the
    /// process died right after the commit: the reply stays in the outbox (published later by
    /// the sweep) and the command is not acked but requeued, as the broker does when a
    /// consumer's connection drops.
    pub fn crash_after_commit(mut self, crash: impl Fn(&InboundCommand) -> bool + Send + Sync + 'static) -> Self {
        self.crash_after_commit = Some(Arc::new(crash));
        self
    }

    /// Replace the configuration.
    pub fn config(mut self, config: ParticipantConfig) -> Self {
        self.config = config;
        self
    }

    /// Check and build.
    pub fn build(self) -> Result<Participant, Error> {
        let mut problems = self.problems;
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            problems.push("the name must be non-empty ASCII letters, digits, `_`, `-` or `.`".into());
        }
        if self.handlers.is_empty() {
            problems.push("no handlers".into());
        }
        if self.config.prefetch == 0 || self.config.concurrency == 0 || self.config.batch_max == 0 {
            problems.push("prefetch, concurrency and batch_max must be at least 1".into());
        }
        if !problems.is_empty() {
            return Err(Error::Invalid(format!("participant `{}`: {}", self.name, problems.join("; "))));
        }
        let names = Names::new(self.config.namespace.clone());
        let alone = tokio::sync::Semaphore::new(self.config.concurrency.max(1));
        Ok(Participant {
            inner: Arc::new(Inner {
                publishing: tokio::sync::Mutex::new(()),
                name: self.name,
                handlers: self.handlers,
                config: self.config,
                names,
                crash_after_commit: self.crash_after_commit,
                reconnects: std::sync::atomic::AtomicU64::new(0),
                slow: std::sync::Mutex::default(),
                alone,
            }),
        })
    }
}
