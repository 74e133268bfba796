//! How a participant runs, and what can go wrong starting or running it.

use std::time::Duration;

/// How a participant runs. Every field has a default.
#[derive(Clone, Debug)]
pub struct ParticipantConfig {
    /// Namespace of the AMQP names; must match the orchestrator's. Default `sagaflow`.
    pub namespace: String,
    /// Unacked commands the broker may send ahead; commands that arrived together run together,
    /// so this bounds the batches too. Default 256.
    pub prefetch: u16,
    /// Transactions at once (each runs one command, or a batch of them). Default 8.
    pub concurrency: usize,
    /// Most commands run in one transaction: the commands that arrived while every
    /// transaction slot was busy run together (a failing handler undoes only its own writes).
    /// 1 runs every command in its own transaction. Default 64.
    pub batch_max: usize,
    /// Largest command body accepted; larger ones are dead-lettered. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Declare quorum queues (must match the orchestrator). Default false.
    pub quorum_queues: bool,
    /// Declare this participant's queue as a priority queue, so commands of sagas of a higher
    /// priority are delivered first (must match the orchestrator's `priority_queues`). Default
    /// false.
    pub priority_queues: bool,
    /// How long to keep retrying to connect before giving up. Default 60 s.
    pub connect_timeout: Duration,
    /// How often replies an earlier version of the SDK left in its outbox are looked for and
    /// published (replies are now published right after the commit). Default 5 s.
    pub sweep_interval: Duration,
    /// Delete this participant's records (the inbox: each step's outcome) older than this many
    /// days, checked at start and every 10 minutes; 0 keeps everything. A record is what
    /// answers a redelivered command and what tells a compensation that its step ran: set it
    /// well beyond the longest a saga can run (its deadline), as the orchestrator's
    /// `retention_days` is. Default 0.
    pub retention_days: u32,
    /// A file that exists while the participant consumes its queue, touched every 5 s (and
    /// removed when the connection is lost or the participant stops): a container's health
    /// check asks [`ready_file_is_fresh`](crate::ready_file_is_fresh). Default none.
    pub ready_file: Option<std::path::PathBuf>,
    /// In a batch, a handler still running after this long is stopped, the batch is rolled back
    /// and run again without it, and that command runs in a transaction of its own, as do the
    /// commands of its name until one of them runs faster than this again: one slow command
    /// does not hold the replies of the others. Its handler runs again from the start (as after
    /// a crash: its work outside the transaction must be safe to repeat). Zero never stops a
    /// handler. Default 250 ms.
    pub slow_handler: Duration,
}

impl Default for ParticipantConfig {
    fn default() -> Self {
        Self {
            namespace: "sagaflow".into(),
            prefetch: 256,
            concurrency: 8,
            batch_max: 64,
            max_body_bytes: sagas::protocol::DEFAULT_MAX_BODY_BYTES,
            quorum_queues: false,
            priority_queues: false,
            connect_timeout: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(5),
            retention_days: 0,
            ready_file: None,
            slow_handler: Duration::from_millis(250),
        }
    }
}

/// Errors starting or running a participant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The participant's tables could not be created or used.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// RabbitMQ could not be reached or refused the topology.
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    /// A misconfiguration found by [`ParticipantBuilder::build`](crate::ParticipantBuilder::build).
    #[error("invalid participant: {0}")]
    Invalid(String),
}
