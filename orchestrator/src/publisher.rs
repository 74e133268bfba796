//! Publishing right after the commit: a decision's outbox rows are published on this node's
//! confirm channel as soon as its transaction committed, and deleted in batches once the
//! broker confirmed them. The relay remains for what this path could not publish (no channel,
//! a failure, a crash in between): rows stay in the outbox until someone published them.

use std::sync::{Arc, Mutex};

use lapin::Channel;
use participants_sdk::outbox::BatchDeleter;
use participants_sdk::transport::{self, TransportError};
use sqlx::PgPool;
use tokio::sync::mpsc;

use sagas::{Input, Reply, SagaId};

use crate::intake::Engine;
use crate::store::Claimed;

/// The current channel and the batching deleter.
#[derive(Clone)]
pub(crate) struct Publisher {
    channel: Arc<Mutex<Option<Channel>>>,
    deletes: BatchDeleter,
    unroutable: mpsc::UnboundedSender<(SagaId, Reply)>,
}

/// Unroutable commands, to be applied as failed attempts by [`report_loop`].
pub(crate) type UnroutableRx = mpsc::UnboundedReceiver<(SagaId, Reply)>;

impl Publisher {
    /// A publisher without a channel yet; spawns the deleter. Run [`report_loop`] on the
    /// receiver it returns.
    pub(crate) fn new(pool: PgPool) -> (Self, UnroutableRx) {
        let deletes = BatchDeleter::spawn(pool, "sagaflow.outbox");
        let (utx, urx) = mpsc::unbounded_channel();
        (Self { channel: Arc::default(), deletes, unroutable: utx }, urx)
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

    /// Publish `rows` (pipelined, then wait for the confirms). `Err(n)`: `n` rows were not
    /// published and stay for the relays.
    pub(crate) async fn publish(&self, rows: Vec<Claimed>) -> Result<(), usize> {
        let Some(ch) = self.channel.lock().expect("not poisoned").clone() else { return Err(rows.len()) };
        let batch: Vec<_> = rows.iter().map(|r| (r.exchange.as_str(), r.routing_key.as_str(), &r.msg, r.mandatory)).collect();
        let results = transport::publish_batch(&ch, batch).await;
        let mut failed = 0;
        for (r, result) in rows.iter().zip(results) {
            match result {
                Ok(()) => self.deletes.delete(r.id),
                Err(TransportError::Unroutable { reply_text, .. }) => {
                    self.deletes.delete(r.id);
                    if let Some(u) = crate::relay::unroutable_reply(r, &reply_text) {
                        let _ = self.unroutable.send(u);
                    }
                }
                Err(_) => failed += 1,
            }
        }
        if failed > 0 { Err(failed) } else { Ok(()) }
    }
}

/// Apply unroutable commands as failed attempts, off the publishing path.
pub(crate) async fn report_loop(engine: Engine, mut rx: UnroutableRx) {
    while let Some((saga, reply)) = rx.recv().await {
        let mut delay = std::time::Duration::from_millis(100);
        while let Err(e) = engine.apply(saga, &Input::Reply(reply.clone()), None).await {
            tracing::warn!(error = %e, saga.id = %saga, "could not record an unroutable command; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_secs(5));
        }
    }
}
