//! Outbox rows, shared by the orchestrator and the participants: reading a row's message, and
//! deleting published rows in batches (a row is deleted once the broker confirmed its message,
//! and the ids confirmed while one delete runs go into the next, so a busy process issues one
//! statement for many rows).

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

/// Most ids in one `DELETE`.
const MAX_BATCH: usize = 4096;

/// A handle to a background task that deletes rows of one outbox table by id. The task ends
/// when the last handle is dropped (after deleting what it was sent).
#[derive(Clone, Debug)]
pub struct BatchDeleter {
    ids: mpsc::UnboundedSender<i64>,
}

impl BatchDeleter {
    /// Start deleting from `table` (a trusted, schema-qualified name such as `sagaflow.outbox`).
    pub fn spawn(pool: PgPool, table: &'static str) -> Self {
        let (ids, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, table, rx));
        Self { ids }
    }

    /// Delete row `id` soon. If the delete fails the row stays, and its message is published
    /// again later by whoever sweeps the outbox (consumers dedupe).
    pub fn delete(&self, id: i64) {
        // The task only stops when every handle is gone, so this send cannot fail while `self` exists.
        let _ = self.ids.send(id);
    }
}

async fn run(pool: PgPool, table: &'static str, mut rx: mpsc::UnboundedReceiver<i64>) {
    let sql = format!("DELETE FROM {table} WHERE id = ANY($1)");
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(id) => batch.push(id),
                Err(_) => break,
            }
        }
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(&batch).execute(&pool).await {
            tracing::warn!(error = %e, table, rows = batch.len(), "could not delete published outbox rows; they will be published again");
        }
    }
}
