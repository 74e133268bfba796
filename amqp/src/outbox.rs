//! Outbox rows, shared by the orchestrator and the participants: reading a row's message;
//! deleting published rows in batches (a row is deleted once the broker confirmed its message,
//! and the ids confirmed while one delete runs go into the next, so a busy process issues one
//! statement for many rows); and telling data PostgreSQL refuses from a failure.

use sagas::protocol::{WireMessage, clip};
use serde::Deserialize as _;
use sqlx::PgPool;
use tokio::sync::mpsc;

/// The message of outbox row `id`: its envelope (properties and headers, as JSON) with its
/// body. `None`, logged, when the envelope does not decode (written by hand, or by a version
/// that wrote another shape): such a row can never be published, and the caller drops it
/// instead of reading it again every round.
pub fn message(id: i64, envelope: &serde_json::Value, body: Vec<u8>) -> Option<WireMessage> {
    match WireMessage::deserialize(envelope) {
        Ok(mut msg) => {
            msg.body = body;
            Some(msg)
        }
        Err(e) => {
            let shown = clip(&envelope.to_string(), 1024).into_owned();
            tracing::error!(outbox.id = id, error = %e, envelope = %shown, "an outbox row does not decode and can never be published; dropping it");
            None
        }
    }
}

/// Whether `e` is PostgreSQL refusing the data itself (SQLSTATE class 22, data exception, such
/// as U+0000 in text or JSON; or 54, a limit exceeded, such as an index entry too large): the
/// same input fails the same way every time, so it is refused, never retried.
pub fn is_unstorable(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c.starts_with("22") || c.starts_with("54"))
}

/// Most ids in one `DELETE`.
const MAX_BATCH: usize = 4096;

/// A handle to a task that deletes rows of one outbox table by id, in batches. The task (the
/// future [`BatchDeleter::new`] returns, run by the caller) ends once every handle is dropped
/// and it deleted what it was sent.
#[derive(Clone, Debug)]
pub struct BatchDeleter {
    ids: mpsc::UnboundedSender<i64>,
}

impl BatchDeleter {
    /// A deleter of rows of `table` (a trusted, schema-qualified name such as
    /// `sagaflow.outbox`), and the task that deletes them.
    pub fn new(pool: PgPool, table: &'static str) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (ids, rx) = mpsc::unbounded_channel();
        (Self { ids }, run(pool, table, rx))
    }

    /// Delete row `id` soon. If the delete fails the row stays, and its message is published
    /// again later by whoever sweeps the outbox (consumers dedupe).
    pub fn delete(&self, id: i64) {
        // The task ends only when every handle is gone (or was never run: then the row stays and
        // is published again, as after a crash).
        let _ = self.ids.send(id);
    }
}

async fn run(pool: PgPool, table: &'static str, mut rx: mpsc::UnboundedReceiver<i64>) {
    let sql = format!("DELETE FROM {table} WHERE id = ANY($1)");
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // The ids sent so far, up to `MAX_BATCH`, after waiting for the first; 0 once every handle
    // is gone and nothing is left.
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(&batch).execute(&pool).await {
            tracing::warn!(error = %e, table, rows = batch.len(), "could not delete published outbox rows; they will be published again");
        }
        batch.clear();
    }
}
