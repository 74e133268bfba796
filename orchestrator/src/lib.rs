//! Sagaflow's runtime: it runs the sagas that the `sagas` crate defines, over RabbitMQ and
//! PostgreSQL, on any number of nodes sharing one database and one broker.
//!
//! # Layout (the main flow, in order; docs/architecture.md walks one saga through it)
//! - [`runtime`]: a node: [`Orchestrator::connect`] (config, pool, migrations) then
//!   [`start`](Orchestrator::start) (topology, consumers, relay, timers) and a graceful
//!   shutdown; reconnects to RabbitMQ. Its loops: `runtime::consumers` (the reply and inbound
//!   queues: decode, refused → dead letter, apply, ack) and `runtime::timers` (due timers fired
//!   as inputs). It owns every task.
//! - [`intake`]: the [`Engine`]: inputs applied to sagas (read → `sagas::decide` → one write,
//!   guarded by each saga's row version), and starts ([`Engine::start`]; `starts` writes the
//!   starts of one moment in one statement).
//! - `outbound`: the outbox published: a decision's messages right after its commit (the
//!   publisher), and what was not published that way by the relay (LISTEN/NOTIFY, `SKIP LOCKED`,
//!   publish with confirms, delete); undeliverable commands handed back as data.
//! - [`store`]: the schema `sagaflow`, its reads, and the three ways a decision is written.
//! - [`config`]: configuration (TOML file + `SAGAFLOW_*` variables); [`Error`]: what the
//!   public API's calls return when they fail.
//! - [`api`]: the HTTP API, the web page and `/metrics`; [`ops`]: what the API and the CLI
//!   share (views, lists, operator actions); [`schedules`]: sagas started by the clock (the
//!   API and the CLI manage them, every node fires the due ones); [`metrics`]: the Prometheus
//!   metrics.
//!
//! - [`cli`]: the node's command line (`serve`, `migrate`, the operator commands) for a
//!   binary serving its own definitions; the `sagaflow` crate's binary adds the bundled example
//!   and `demo`.

pub mod api;
mod children;
pub mod cli;
pub mod config;
mod error;
pub mod intake;
pub mod metrics;
pub mod ops;
mod outbound;
mod recent;
pub mod runtime;
pub mod schedules;
mod starts;
pub mod store;
mod waiters;

pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use intake::{Engine, Handled, StartError, Started};
pub use runtime::{ClientHandle, Orchestrator, OrchestratorHandle, application_name, wait_settled};
