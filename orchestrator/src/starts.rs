//! Starts written together. Sagas started at the same moment (by many API requests, inbound
//! messages or a client's callers) share one statement and one commit instead of one each: each
//! start hands its rows to the [`Starts`] handle, and the [`Starting`] task writes what is
//! waiting as one batch (`store::write::insert_new`), while the next batch gathers. A start that
//! finds no task running (an engine that was never started, such as the CLI's, or one shutting
//! down) writes alone.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::{self, DecisionRows, NewInstance};

/// Starts waiting for the task; beyond this, a start writes alone.
const QUEUE: usize = 4096;
/// Most starts in one statement.
const MAX_BATCH: usize = 256;

/// A start that was written: its outbox row ids, in order, and whether the write woke the relays
/// (then they publish the rows, not the caller).
pub(crate) struct Created {
    pub(crate) outbox: Vec<i64>,
    pub(crate) woken: bool,
    /// The version its instance row was inserted at.
    pub(crate) version: Option<i64>,
}

/// What became of a start: its rows back, and `None` when its saga id or idempotency key was
/// taken (nothing was written).
pub(crate) type Answer = Result<(DecisionRows, Option<Created>), sqlx::Error>;

/// A start waiting to be written.
struct Queued {
    rows: DecisionRows,
    new: NewInstance,
    wake: bool,
    done: oneshot::Sender<Answer>,
}

/// The handle starts are handed to (cheap to clone).
#[derive(Clone)]
pub(crate) struct Starts {
    queue: mpsc::Sender<Queued>,
    writer: Arc<Writer>,
}

/// The task that writes the starts, to be run by whoever owns the node's tasks.
pub(crate) struct Starting {
    queue: mpsc::Receiver<Queued>,
    writer: Arc<Writer>,
}

/// Where and as whom starts are written.
struct Writer {
    pool: PgPool,
    node: Arc<str>,
    /// The task is running: starts may wait for it (an engine whose task never runs, such as
    /// the CLI's, writes each start alone).
    running: AtomicBool,
}

impl Starts {
    /// A handle and its task, writing on `pool` as `node`.
    pub(crate) fn new(pool: PgPool, node: Arc<str>) -> (Self, Starting) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let writer = Arc::new(Writer { pool, node, running: AtomicBool::new(false) });
        (Self { queue, writer: Arc::clone(&writer) }, Starting { queue: rx, writer })
    }

    /// Write a start (with whatever other starts wait with it); `wake` when the relays must
    /// publish its rows.
    pub(crate) async fn insert(&self, rows: DecisionRows, new: NewInstance, wake: bool) -> Answer {
        if !self.writer.running.load(Ordering::Acquire) {
            return self.writer.write_one(rows, new, wake).await;
        }
        let (done, answer) = oneshot::channel();
        match self.queue.try_send(Queued { rows, new, wake, done }) {
            Ok(()) => answer.await.unwrap_or_else(|_| Err(sqlx::Error::Protocol("the start writer stopped before answering".into()))),
            Err(e) => {
                let q = e.into_inner();
                self.writer.write_one(q.rows, q.new, q.wake).await
            }
        }
    }
}

impl Starting {
    /// Write what is handed over, one batch at a time, until `stop`; then write what is still
    /// waiting (what is handed over after that is written by its caller).
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        self.writer.running.store(true, Ordering::Release);
        loop {
            let first = tokio::select! {
                () = stop.cancelled() => break,
                q = self.queue.recv() => match q { Some(q) => q, None => break },
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.queue.try_recv() {
                    Ok(q) => batch.push(q),
                    Err(_) => break,
                }
            }
            self.writer.write(batch).await;
        }
        self.writer.running.store(false, Ordering::Release);
        self.queue.close();
        while let Some(q) = self.queue.recv().await {
            self.writer.write(vec![q]).await;
        }
    }
}

impl Writer {
    /// Write `batch`, in rounds of distinct saga ids (a statement may not insert one id twice),
    /// and answer each start.
    async fn write(&self, batch: Vec<Queued>) {
        let mut pending = batch;
        while !pending.is_empty() {
            let mut ids = HashSet::with_capacity(pending.len());
            let (round, rest): (Vec<Queued>, Vec<Queued>) = pending.into_iter().partition(|q| ids.insert(q.rows.history.saga));
            self.write_round(round).await;
            pending = rest;
        }
    }

    /// Write starts of distinct sagas in one statement. If it fails, each is written alone, so
    /// one that PostgreSQL refuses does not fail the others.
    async fn write_round(&self, round: Vec<Queued>) {
        if let [_] = round.as_slice() {
            let q = round.into_iter().next().expect("one start");
            let _ = q.done.send(self.write_one(q.rows, q.new, q.wake).await);
            return;
        }
        let wake = round.iter().any(|q| q.wake);
        let starts: Vec<(&DecisionRows, &NewInstance)> = round.iter().map(|q| (&q.rows, &q.new)).collect();
        let result = store::write::insert_new(&self.pool, &self.node, &starts, wake).await;
        drop(starts);
        match result {
            Ok(wrote) => {
                let created = answers(round.iter().map(|q| &q.rows), wrote, wake);
                for (created, q) in created.into_iter().zip(round) {
                    let _ = q.done.send(Ok((q.rows, created)));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, starts = round.len(), "a batch of starts failed; writing them one by one");
                for q in round {
                    let _ = q.done.send(self.write_one(q.rows, q.new, q.wake).await);
                }
            }
        }
    }

    /// Write one start alone.
    async fn write_one(&self, rows: DecisionRows, new: NewInstance, wake: bool) -> Answer {
        let wrote = store::write::insert_new(&self.pool, &self.node, &[(&rows, &new)], wake).await?;
        let created = answers(std::iter::once(&rows), wrote, wake).pop().flatten();
        Ok((rows, created))
    }
}

/// Each start's share of what a statement wrote, in order: its outbox row ids when its saga was
/// created (the statement returns the ids of the created sagas' rows in their order).
fn answers<'a>(starts: impl Iterator<Item = &'a DecisionRows>, wrote: store::write::Wrote, woken: bool) -> Vec<Option<Created>> {
    let created: HashSet<uuid::Uuid> = wrote.written.into_iter().collect();
    let (mut ids, version) = (wrote.outbox.into_iter(), wrote.version);
    starts
        .map(|rows| {
            created.contains(&rows.history.saga.0).then(|| Created {
                outbox: ids.by_ref().take(rows.outbox.len()).collect(),
                woken,
                version,
            })
        })
        .collect()
}
