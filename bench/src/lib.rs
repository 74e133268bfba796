//! The order-saga-3 benchmark (../shared/BENCHMARK.md).
//!
//! # Layout
//! - [`saga`]: the workload: `reserve_inventory` → `charge_payment` → `ship_order`, with
//!   `release_inventory` and `refund_payment`; participants that only record the call (the
//!   SDK's inbox keys it by saga, step and kind) and reply at once.
//! - [`floor`]: the messaging floor: the saga's messages through RabbitMQ alone, no database.
//! - [`procs`]: CPU seconds and peak memory per process group, from `/proc`.
//! - `main.rs` (`order-saga-3`): runs the measures and checks correctness after each run.

pub mod floor;
pub mod procs;
pub mod saga;
