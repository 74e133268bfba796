//! # sagas — Sagaflow's saga model
//!
//! Define sagas in Rust code, describe the wire protocol, and decide what happens next —
//! without IO. The `orchestrator` crate runs what this crate decides; the `participants-sdk`
//! crate speaks the protocol described here.
//!
//! ## Layout
//! - [`definition`]: the typed builder ([`SagaDefinition::builder`]), steps, compensations,
//!   parallel groups, waits, and the type-erased [`Definition`] the runtime runs.
//! - [`policy`]: retry and timeout policies, serde data evaluated by `decide`.
//! - [`state`]: one instance's state, as the store keeps it.
//! - [`decide()`]: the pure decision core, one file per input kind under `decide/`.
//! - [`protocol`]: envelopes, headers and reply outcomes (docs/protocol.md).
//! - [`schedule`]: cron expressions and which ticks of a schedule start a saga.
//! - [`ids`]: `SagaId`, `MessageId`, `StepIndex`, `Timestamp`.
//!
//! ## A saga in code
//! ```
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use sagas::{Command, OnTimeout, RetryPolicy, SagaDefinition};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Order { order_id: u64, sku: String, reservation: Option<String> }
//!
//! #[derive(Serialize, Deserialize)]
//! struct ReserveStock { order_id: u64, sku: String }
//! #[derive(Serialize, Deserialize)]
//! struct StockReserved { reservation: String }
//! impl Command for ReserveStock {
//!     const NAME: &'static str = "inventory.reserve_stock";
//!     const PARTICIPANT: &'static str = "inventory";
//!     type Reply = StockReserved;
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! struct ReleaseStock { order_id: u64 }
//! impl Command for ReleaseStock {
//!     const NAME: &'static str = "inventory.release_stock";
//!     const PARTICIPANT: &'static str = "inventory";
//!     type Reply = ();
//! }
//!
//! let def = SagaDefinition::<Order>::builder("order", 1)
//!     .step("reserve_inventory", |s| s
//!         .invoke(|o: &Order| ReserveStock { order_id: o.order_id, sku: o.sku.clone() })
//!         .on_reply(|o, r: StockReserved| o.reservation = Some(r.reservation))
//!         .compensate(|o| ReleaseStock { order_id: o.order_id })
//!         .retry(RetryPolicy::exponential(Duration::from_millis(200), 2.0, 5))
//!         .timeout(Duration::from_secs(30), OnTimeout::Fail))
//!     .build()
//!     .unwrap();
//! assert_eq!(def.steps.len(), 1);
//! ```

pub mod decide;
pub mod definition;
pub mod error;
pub mod ids;
pub mod policy;
pub mod protocol;
pub mod schedule;
pub mod state;
pub mod testing;

pub use decide::{
    Effect, Heartbeat, IgnoreReason, Input, InputOutcome, OperatorCommand, OutgoingCommand, Reply, SagaEvent, TimerKey, Transition, decide,
};
pub use definition::{
    CHILD_PARTICIPANT, Child, Command, Definition, DefinitionSpec, Event, MAX_SEARCH_KEYS, MAX_SEARCH_VALUE_BYTES, NoCommand, Registry,
    SagaBuilder, SagaData, SagaDefinition, StepAction, StepCommand, StepDef, StepKind, check_search_value,
};
pub use error::{Error, Result};
pub use ids::{CommandKind, MessageId, SagaId, StepIndex, Timestamp};
pub use policy::{Backoff, OnDeadline, OnTimeout, RetryPolicy, TimeoutPolicy};
pub use protocol::ReplyOutcome;
pub use state::{Failure, FailureCode, MAX_CHILD_DEPTH, ParentLink, SagaState, SagaStatus, StepState, StepStatus, StopCode, StopReason};

/// The README's examples compile and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
