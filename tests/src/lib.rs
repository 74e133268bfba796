//! Sagaflow's test harness, for our suites and for users testing their own sagas against real
//! RabbitMQ and PostgreSQL.
//!
//! # Layout
//! - [`env`](mod@env): [`TestEnv`]: the services for one test, isolated by a database and an AMQP
//!   namespace of its own; in-process orchestrator nodes.
//! - [`node`]: orchestrator nodes as child processes (to SIGKILL them).
//! - [`proxy`]: a fault-injecting TCP proxy (cut, refuse, stall, latency, move upstream).
//! - [`orders`]: start requests for the order example; [`messages`]: hand-built messages and
//!   queue depths; [`http`](mod@http): a bare HTTP client for nodes running as child processes.
//! - [`probe`]: a participant whose behaviour each saga plans (succeed, reject, flaky, slow),
//!   recording every effect and undo in commit order.
//! - [`wait`]: waiting for sagas and reading their history; [`sockets`]: the TCP connections
//!   this process holds; [`tls`]: RabbitMQ and PostgreSQL speaking TLS only, with certificates
//!   made by the test.
//!
//! To unit-test a saga definition without a broker, use [`sagas::testing::SagaTest`].

pub mod cluster;
pub mod env;
pub mod http;
pub mod messages;
pub mod node;
pub mod orders;
pub mod probe;
pub mod proxy;
pub mod sockets;
pub mod tls;
pub mod wait;

pub use env::TestEnv;
pub use node::Node;
pub use proxy::Proxy;

/// docs/testing.md's examples compile (and the pure one runs) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/testing.md")]
struct TestingGuideDoctests;

/// docs/getting-started.md's saga and participant compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/getting-started.md")]
struct GettingStartedDoctests;
