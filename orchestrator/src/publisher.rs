//! Publishing right after the commit: a decision's outbox rows are handed to this node's
//! publisher as soon as its transaction committed, so the input's delivery can be acked without
//! waiting for the broker. A background task publishes what it was handed on the node's confirm
//! channel (the rows of many decisions in one pipelined batch, a few batches at once) and
//! deletes the rows in batches once the broker confirmed them. The relay remains for what this
//! path could not publish (no channel, a full queue, a failure, a crash in between): rows stay
//! in the outbox until someone published them.

use std::sync::{Arc, Mutex};

use lapin::Channel;
use participants_sdk::outbox::BatchDeleter;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use sagas::{Input, Reply, SagaId};

use crate::intake::Engine;
use crate::relay::Sent;
use crate::store::{self, Claimed};

/// Decisions' rows waiting for the background task; beyond this, rows are left to the relays.
const QUEUE: usize = 4096;
/// Most rows in one pipelined batch.
const MAX_BATCH: usize = 1024;
/// Batches waiting for their confirms at once: one, so that a command the broker returns
/// (no queue for its participant) is carried by a confirm of its own batch, where
/// [`participants_sdk::transport::publish_batch`] finds it by its id. Rows handed over while a
/// batch waits go out together in the next.
const IN_FLIGHT: usize = 1;

/// The current channel and the queue of the background task.
#[derive(Clone)]
pub(crate) struct Publisher {
    channel: Arc<Mutex<Option<Channel>>>,
    queue: mpsc::Sender<Vec<Claimed>>,
}

/// Commands that could not be delivered, to be applied as failed attempts by [`report_loop`].
pub(crate) type UnroutableRx = mpsc::UnboundedReceiver<(SagaId, Reply)>;

impl Publisher {
    /// A publisher without a channel yet; spawns the background task and the deleter. Run
    /// [`report_loop`] on the receiver it returns.
    pub(crate) fn new(pool: PgPool) -> (Self, UnroutableRx) {
        let deletes = BatchDeleter::spawn(pool.clone(), "sagaflow.outbox");
        let (utx, urx) = mpsc::unbounded_channel();
        let (queue, rx) = mpsc::channel(QUEUE);
        let channel: Arc<Mutex<Option<Channel>>> = Arc::default();
        tokio::spawn(run(Arc::clone(&channel), rx, Shared { pool, deletes, unroutable: utx }));
        (Self { channel, queue }, urx)
    }

    /// Use `ch` (a confirm channel) from now on; `None` while disconnected.
    pub(crate) fn set_channel(&self, ch: Option<Channel>) {
        *self.channel.lock().expect("not poisoned") = ch;
    }

    /// Whether this node has a channel to publish on (a client without one leaves its rows
    /// to the relays).
    pub(crate) fn has_channel(&self) -> bool {
        self.channel.lock().expect("not poisoned").is_some()
    }

    /// Hand committed `rows` to the background task. `Err(n)`: the `n` rows cannot be taken now
    /// (no channel, the queue is full) and stay for the relays.
    pub(crate) fn publish(&self, rows: Vec<Claimed>) -> Result<(), usize> {
        if !self.has_channel() {
            return Err(rows.len());
        }
        self.queue.try_send(rows).map_err(|e| e.into_inner().len())
    }
}

/// What the publishing tasks share.
#[derive(Clone)]
struct Shared {
    pool: PgPool,
    deletes: BatchDeleter,
    unroutable: mpsc::UnboundedSender<(SagaId, Reply)>,
}

/// Take what was handed over, as one batch per free slot, until every handle is gone.
async fn run(channel: Arc<Mutex<Option<Channel>>>, mut rx: mpsc::Receiver<Vec<Claimed>>, shared: Shared) {
    let mut in_flight = JoinSet::new();
    loop {
        // Wait for a free slot first, so that rows handed over meanwhile go out together.
        while in_flight.len() >= IN_FLIGHT {
            in_flight.join_next().await;
        }
        let Some(mut rows) = rx.recv().await else { break };
        while rows.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => rows.extend(more),
                Err(_) => break,
            }
        }
        let ch = channel.lock().expect("not poisoned").clone();
        in_flight.spawn(publish_rows(ch, rows, shared.clone()));
    }
    while in_flight.join_next().await.is_some() {}
}

/// Publish `rows` (pipelined, then wait for the confirms) and delete what the broker took; wake
/// the relays for the rest.
async fn publish_rows(ch: Option<Channel>, rows: Vec<Claimed>, shared: Shared) {
    let failed = match ch {
        None => rows.len(),
        Some(ch) => {
            let results = crate::relay::publish_claimed(&ch, &rows).await;
            let mut failed = 0;
            for (r, result) in rows.iter().zip(results) {
                match crate::relay::outcome(r, result) {
                    Sent::Published => shared.deletes.delete(r.id),
                    Sent::Undeliverable(reply) => {
                        shared.deletes.delete(r.id);
                        if let Some(u) = reply {
                            let _ = shared.unroutable.send(u);
                        }
                    }
                    Sent::Failed(_) => failed += 1,
                }
            }
            failed
        }
    };
    if failed > 0 {
        tracing::debug!(rows = failed, "publishing after the commit failed; the relays will");
        if let Err(e) = store::notify_relays(&shared.pool).await {
            tracing::warn!(error = %e, "cannot wake the relays; their poll will find the rows");
        }
    }
}

/// Apply undeliverable commands as failed attempts, off the publishing path.
pub(crate) async fn report_loop(engine: Engine, mut rx: UnroutableRx) {
    while let Some((saga, reply)) = rx.recv().await {
        let mut delay = std::time::Duration::from_millis(100);
        while let Err(e) = engine.apply(saga, &Input::Reply(reply.clone()), None).await {
            tracing::warn!(error = %e, saga.id = %saga, "could not record an undeliverable command; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_secs(5));
        }
    }
}
