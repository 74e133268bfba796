//! Identifiers and time: newtypes so a saga id is never confused with a message id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Namespace of the deterministic message ids (UUID v5). Part of the wire contract: every
/// implementation of the protocol derives ids the same way (docs/protocol.md, "Message ids").
pub const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_7a3e_5d2b_4c8e_9a1f_2b7d_0e4c_9a55);

macro_rules! uuid_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_newtype!(
    /// The id of one saga instance.
    SagaId
);
uuid_newtype!(
    /// The id of one message (AMQP `message_id`). Commands and replies get deterministic ids,
    /// so a message published twice carries the same id and consumers dedupe on it.
    MessageId
);

impl SagaId {
    /// A new, time-ordered id (UUID v7), so instances created together sit together in indexes.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl SagaId {
    /// The id of the child saga that attempt `attempt` of step `step` of saga `parent` starts:
    /// UUID v5 over `"{parent}/{step}/child/{attempt}"` in [`MESSAGE_ID_NAMESPACE`]. A start
    /// delivered twice finds the child it started; a new attempt (an operator's `resume`)
    /// starts a new child.
    pub fn for_child(parent: SagaId, step: StepIndex, attempt: u32) -> Self {
        let name = format!("{parent}/{}/child/{attempt}", step.0);
        Self(Uuid::new_v5(&MESSAGE_ID_NAMESPACE, name.as_bytes()))
    }
}

impl Default for SagaId {
    fn default() -> Self {
        Self::new()
    }
}

impl MessageId {
    /// A new random, time-ordered id, for messages that have no deterministic identity
    /// (start requests without an idempotency key, lifecycle events).
    pub fn new_random() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id of the command for `(saga, step, kind, attempt)`:
    /// UUID v5 over `"{saga_id}/{step}/{kind}/{attempt}"` in [`MESSAGE_ID_NAMESPACE`].
    pub fn for_command(saga: SagaId, step: StepIndex, kind: CommandKind, attempt: u32) -> Self {
        let name = format!("{saga}/{}/{}/{attempt}", step.0, kind.as_str());
        Self(Uuid::new_v5(&MESSAGE_ID_NAMESPACE, name.as_bytes()))
    }

    /// The id of the reply to `command`: UUID v5 over `"{command_id}/reply"`.
    /// A participant that replies twice to the same command sends the same id.
    pub fn for_reply(command: MessageId) -> Self {
        let name = format!("{command}/reply");
        Self(Uuid::new_v5(&MESSAGE_ID_NAMESPACE, name.as_bytes()))
    }
}

/// Position of a step in its definition, counting every step once in definition order
/// (the branches of a parallel group are numbered one after the other).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StepIndex(pub u32);

impl StepIndex {
    /// The index as a `usize`, for indexing the step lists.
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for StepIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether a command runs a step or undoes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// The step's command.
    Invoke,
    /// The step's compensation.
    Compensate,
}

impl CommandKind {
    /// The wire name (`invoke` / `compensate`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invoke => "invoke",
            Self::Compensate => "compensate",
        }
    }
}

impl FromStr for CommandKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "invoke" => Ok(Self::Invoke),
            "compensate" => Ok(Self::Compensate),
            other => Err(format!("unknown command kind {} (expected invoke or compensate)", crate::protocol::quote(other))),
        }
    }
}

/// Milliseconds since the Unix epoch. `decide` takes the current time as a parameter so the
/// decision core never reads a clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// This instant plus `ms` milliseconds (saturating).
    pub fn plus_ms(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self` (zero when `earlier` is later).
    pub fn ms_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The current wall-clock time. Only the runtime calls this; `decide` never does.
    pub fn now() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_deterministic_and_distinct() {
        let saga = SagaId(Uuid::from_u128(1));
        let a = MessageId::for_command(saga, StepIndex(0), CommandKind::Invoke, 1);
        assert_eq!(a, MessageId::for_command(saga, StepIndex(0), CommandKind::Invoke, 1));
        assert_ne!(a, MessageId::for_command(saga, StepIndex(0), CommandKind::Invoke, 2));
        assert_ne!(a, MessageId::for_command(saga, StepIndex(0), CommandKind::Compensate, 1));
        assert_ne!(a, MessageId::for_command(saga, StepIndex(1), CommandKind::Invoke, 1));
        assert_eq!(MessageId::for_reply(a), MessageId::for_reply(a));
        assert_ne!(MessageId::for_reply(a), a);
    }
}
