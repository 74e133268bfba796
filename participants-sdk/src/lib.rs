//! Sagaflow's participant SDK: a service registers typed handlers for the commands (and
//! compensations) it executes, and the SDK does the protocol (docs/protocol.md) around them.
//!
//! # Layout
//! - [`handler`]: the [`Handler`] trait a service implements, its [`Context`] (the open
//!   transaction) and the two error classes: transient (`?`, retried) and
//!   [`HandlerError::Reject`] (a business refusal, compensated).
//! - [`participant`]: the builder and the consume loop: decode → inbox → handler in the
//!   participant's transaction → record + reply in the outbox → commit → publish with
//!   confirm → ack.
//! - `store`: the participant's tables (schema `sagaflow_participant`).
//!
//! The AMQP plumbing (names, topology, publishing with confirms, dead letters) and the outbox's
//! batch deletes are in the `sagaflow-amqp` crate, which the orchestrator shares.
//!
//! ```no_run
//! use participants_sdk::{Context, Handler, HandlerError, HandlerResult, Participant};
//! use sagas::Command;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Charge { order_id: String, amount_cents: i64 }
//! #[derive(Serialize, Deserialize)]
//! struct Charged { charge_id: String }
//! impl Command for Charge { const NAME: &'static str = "payment.charge"; const PARTICIPANT: &'static str = "payment"; type Reply = Charged; }
//!
//! struct Payments;
//! impl Handler<Charge> for Payments {
//!     async fn handle(&self, cx: &mut Context<'_>, cmd: Charge) -> HandlerResult<Charged> {
//!         if cmd.amount_cents <= 0 {
//!             return Err(HandlerError::reject("invalid_amount", "nothing to charge"));
//!         }
//!         let key = cx.effect_key();
//!         sqlx::query("INSERT INTO charges (key, order_id, amount_cents) VALUES ($1, $2, $3)")
//!             .bind(&key).bind(&cmd.order_id).bind(cmd.amount_cents)
//!             .execute(cx.tx()).await?; // an error here is transient: the step is retried
//!         Ok(Charged { charge_id: key })
//!     }
//! }
//!
//! # async fn run(pool: sqlx::PgPool) -> Result<(), participants_sdk::Error> {
//! let payment = Participant::builder("payment").handle::<Charge>(Payments).build()?;
//! payment.run(pool, "amqp://guest:guest@127.0.0.1:5672", async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod handler;
pub mod participant;
mod store;

pub use handler::{Context, Handler, HandlerError, HandlerResult};
pub use participant::{
    Error, Participant, ParticipantBuilder, ParticipantConfig, ParticipantHandle, READY_TOUCH, ready_file_is_fresh, shutdown_signal,
};
pub use sagaflow_amqp::telemetry;
pub use sagaflow_amqp::transport::redact;
pub use store::{connect_pool, ensure_schema, is_unstorable};
