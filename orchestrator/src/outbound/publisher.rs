//! Publishing right after the commit: a decision's outbox rows are handed to the [`Publisher`]
//! as soon as its transaction committed, so the input's delivery can be acked without waiting
//! for the broker. Its task ([`Publishing`]) publishes what it was handed on the node's confirm
//! channel (the rows of many decisions in one pipelined batch) and deletes the rows in batches
//! once the broker confirmed them; what it cannot publish stays for the relays.

use std::sync::{Arc, Mutex};

use lapin::Channel;
use sagaflow_amqp::outbox::BatchDeleter;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{UndeliverableTx, send};
use crate::store::{self, Claimed};

/// Decisions' rows waiting for the task; beyond this, rows are left to the relays.
const QUEUE: usize = 4096;
/// Most rows in one pipelined batch.
const MAX_BATCH: usize = 1024;

/// The handle writers hand committed rows to (cheap to clone).
#[derive(Clone)]
pub(crate) struct Publisher {
    channel: Arc<Mutex<Option<Channel>>>,
    queue: mpsc::Sender<Vec<Claimed>>,
}

/// The publisher's task, to be run by whoever owns the node's tasks.
pub(crate) struct Publishing {
    channel: Arc<Mutex<Option<Channel>>>,
    rows: mpsc::Receiver<Vec<Claimed>>,
    pool: PgPool,
}

impl Publisher {
    /// A publisher without a channel yet, and its task.
    pub(crate) fn new(pool: PgPool) -> (Self, Publishing) {
        let (queue, rows) = mpsc::channel(QUEUE);
        let channel: Arc<Mutex<Option<Channel>>> = Arc::default();
        (Self { channel: Arc::clone(&channel), queue }, Publishing { channel, rows, pool })
    }

    /// Use `ch` (a confirm channel) from now on; `None` while disconnected or stopping.
    pub(crate) fn set_channel(&self, ch: Option<Channel>) {
        *self.channel.lock().expect("not poisoned") = ch;
    }

    /// Whether there is a channel to publish on (a writer without one leaves its rows to the
    /// relays, and wakes them).
    pub(crate) fn has_channel(&self) -> bool {
        self.channel.lock().expect("not poisoned").is_some()
    }

    /// Hand committed `rows` to the task. `Err(n)`: the `n` rows cannot be taken now (no
    /// channel, the queue is full, the task has stopped) and stay for the relays.
    pub(crate) fn publish(&self, rows: Vec<Claimed>) -> Result<(), usize> {
        if !self.has_channel() {
            return Err(rows.len());
        }
        self.queue.try_send(rows).map_err(|e| e.into_inner().len())
    }
}

impl Publishing {
    /// Publish what is handed over, one batch at a time, until `stop` (what is handed over
    /// after that stays for the relays). One batch in flight: a command the broker returns (no
    /// queue for its participant) is carried by a confirm of its own batch, where
    /// [`sagaflow_amqp::transport::publish_batch`] finds it by its id; rows handed over while
    /// a batch waits go out together in the next. Commands that can never be delivered go to
    /// `undeliverable`.
    pub(crate) async fn run(mut self, undeliverable: UndeliverableTx, stop: CancellationToken) {
        let (deletes, deleting) = BatchDeleter::new(self.pool.clone(), "sagaflow.outbox");
        let publishing = async {
            loop {
                let mut rows = tokio::select! {
                    () = stop.cancelled() => break,
                    rows = self.rows.recv() => match rows { Some(rows) => rows, None => break },
                };
                while rows.len() < MAX_BATCH {
                    match self.rows.try_recv() {
                        Ok(more) => rows.extend(more),
                        Err(_) => break,
                    }
                }
                let ch = self.channel.lock().expect("not poisoned").clone();
                self.publish_rows(ch, &rows, &deletes, &undeliverable).await;
            }
            // The deleter ends once it deleted what it was sent and its last handle is gone.
            drop(deletes);
        };
        tokio::join!(publishing, deleting);
    }

    /// Publish `rows` and delete what the broker took; wake the relays for the rest.
    async fn publish_rows(&self, ch: Option<Channel>, rows: &[Claimed], deletes: &BatchDeleter, undeliverable: &UndeliverableTx) {
        let failed = match ch {
            None => rows.len(),
            Some(ch) => {
                let sent = send(&ch, rows).await;
                sent.done.into_iter().for_each(|id| deletes.delete(id));
                for u in sent.undeliverable {
                    // The runtime's receiver outlives every publishing path.
                    let _ = undeliverable.send(u);
                }
                sent.failed.len()
            }
        };
        if failed > 0 {
            tracing::debug!(rows = failed, "publishing after the commit failed; the relays will");
            if let Err(e) = store::notify_relays(&self.pool).await {
                tracing::warn!(error = %e, "cannot wake the relays; their poll will find the rows");
            }
        }
    }
}
