//! The plumbing both of Sagaflow's runtimes (the orchestrator and the participants SDK) share:
//! the AMQP side of the protocol ([`transport`]: names, topology, publishing with confirms,
//! consuming in batches, dead-lettering) and the transactional outbox's rows ([`outbox`]:
//! reading a row's message, deleting published rows in batches, what PostgreSQL refuses to
//! store), PostgreSQL with standbys ([`pg`]: a pool that follows the primary), and their logs
//! and traces ([`telemetry`]: stderr, and spans over OTLP when
//! configured). Neither runtime's users need it directly: it is public for the two crates and
//! their tests (the participants SDK re-exports [`telemetry`]).

pub mod outbox;
pub mod pg;
pub mod telemetry;
pub mod transport;

pub use outbox::is_unstorable;
