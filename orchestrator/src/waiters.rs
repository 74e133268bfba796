//! Waiting for sagas to settle without polling the database (`GET /sagas/{id}/wait`,
//! `sagaflow wait`). A waiter reads its saga once, then sleeps until it is woken:
//!
//! - by this node, when it commits a decision that settles the saga ([`Waiters::settled`]);
//! - by any node, through the lifecycle events: while anyone waits, the node's connection to
//!   RabbitMQ binds one exclusive queue of its own (`{ns}.waiters.<id>`) to the events exchange for the `completed`,
//!   `compensated` and `stopped` events ([`listen`]), one subscription for any number of
//!   waiters. With nobody waiting for [`UNBIND_AFTER`], the queue is unbound, so a node nobody
//!   waits on costs RabbitMQ nothing;
//! - when the subscription (re)starts, every waiter reads its saga again (an event published
//!   while the node was not subscribed is not lost to it); while there is no subscription
//!   (RabbitMQ away), waiters read their saga every [`POLL_UNSUBSCRIBED`].
//!
//! At most `max_waiters` wait at once on a node; beyond that a wait is refused (`busy`, HTTP 503
//! with `Retry-After`) instead of each costing a task and a share of the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::Channel;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sagaflow_amqp::transport::{self, Names};
use sagas::SagaId;
use sagas::protocol::{H_SAGA_ID, HeaderValue};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The lifecycle events of a saga that settles.
const SETTLED_EVENTS: [&str; 3] = ["completed", "compensated", "stopped"];
/// How long the events queue stays bound after the last waiter left.
pub(crate) const UNBIND_AFTER: Duration = Duration::from_secs(10);
/// How often a waiter reads its saga while the node is not subscribed to the events.
pub(crate) const POLL_UNSUBSCRIBED: Duration = Duration::from_secs(1);

/// The node's waiters (cheap to clone).
#[derive(Clone)]
pub(crate) struct Waiters {
    inner: Arc<Inner>,
}

struct Inner {
    max: usize,
    /// Per saga waited on: how many wait, and the signal that wakes them.
    sagas: Mutex<HashMap<SagaId, (usize, watch::Sender<()>)>>,
    /// How many wait, in all (the subscription binds while it is above zero).
    waiting: watch::Sender<usize>,
    /// Whether the node is subscribed to the events; each (re)subscription sends `true` again,
    /// which wakes every waiter to read its saga.
    subscribed: watch::Sender<bool>,
}

/// One waiter: woken by [`Waiter::woken`]; leaves on drop.
pub(crate) struct Waiter {
    inner: Arc<Inner>,
    saga: SagaId,
    settled: watch::Receiver<()>,
    subscribed: watch::Receiver<bool>,
}

impl Waiters {
    /// At most `max` waiters at once.
    pub(crate) fn new(max: usize) -> Self {
        let inner = Inner { max, sagas: Mutex::default(), waiting: watch::Sender::new(0), subscribed: watch::Sender::new(false) };
        Self { inner: Arc::new(inner) }
    }

    /// Wait for saga `id`; `None` when `max_waiters` already wait. Read the saga after this:
    /// whatever settles it from then on wakes the waiter.
    pub(crate) fn enter(&self, id: SagaId) -> Option<Waiter> {
        let mut full = false;
        self.inner.waiting.send_if_modified(|n| {
            full = *n >= self.inner.max;
            if !full {
                *n += 1;
            }
            !full
        });
        if full {
            return None;
        }
        let settled = {
            let mut sagas = self.inner.lock();
            let (count, signal) = sagas.entry(id).or_insert_with(|| (0, watch::Sender::new(())));
            *count += 1;
            signal.subscribe()
        };
        let mut subscribed = self.inner.subscribed.subscribe();
        subscribed.mark_unchanged();
        Some(Waiter { inner: Arc::clone(&self.inner), saga: id, settled, subscribed })
    }

    /// Saga `id` settled: wake its waiters.
    pub(crate) fn settled(&self, id: SagaId) {
        if let Some((_, signal)) = self.inner.lock().get(&id) {
            signal.send_replace(());
        }
    }

    /// How many wait.
    pub(crate) fn waiting(&self) -> usize {
        *self.inner.waiting.borrow()
    }

    /// Whether the node is subscribed to the events that wake its waiters.
    pub(crate) fn subscribed(&self) -> bool {
        *self.inner.subscribed.borrow()
    }

    fn set_subscribed(&self, on: bool) {
        self.inner.subscribed.send_replace(on);
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SagaId, (usize, watch::Sender<()>)>> {
        self.sagas.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Waiter {
    /// Sleep until the saga may have settled: this node or the events say it did, the node
    /// (re)subscribed to the events, or, while it is not subscribed, [`POLL_UNSUBSCRIBED`]
    /// passed. Read the saga again after it.
    pub(crate) async fn woken(&mut self) {
        let subscribed = *self.subscribed.borrow();
        let poll = async {
            if subscribed {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(POLL_UNSUBSCRIBED).await;
        };
        tokio::select! {
            _ = self.settled.changed() => {}
            _ = self.subscribed.changed() => {}
            () = poll => {}
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        {
            let mut sagas = self.inner.lock();
            if let Some((count, _)) = sagas.get_mut(&self.saga) {
                *count -= 1;
                if *count == 0 {
                    sagas.remove(&self.saga);
                }
            }
        }
        self.inner.waiting.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Keep the node subscribed to the settling lifecycle events on channel `ch` while anyone
/// waits, until `stop` or the channel fails; wake the waiters of each saga an event names.
pub(crate) async fn listen(waiters: Waiters, ch: Channel, names: Names, stop: CancellationToken) -> anyhow::Result<()> {
    // Named in the namespace (not `amq.gen-*`), so a user limited to `<namespace>.*` may declare it.
    let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
    let name = format!("{}.waiters.{}", names.namespace(), uuid::Uuid::now_v7().simple());
    let queue = ch.queue_declare(name.as_str().into(), opts, FieldTable::default()).await?.name().clone();
    let consume = BasicConsumeOptions { no_ack: true, exclusive: true, ..BasicConsumeOptions::default() };
    let mut events = ch.basic_consume(queue.clone(), "".into(), consume, FieldTable::default()).await?;
    let exchange = names.events_exchange();
    let mut waiting = waiters.inner.waiting.subscribe();
    let mut bound = false;
    let result = loop {
        let anyone = *waiting.borrow_and_update() > 0;
        if anyone && !bound {
            for event in SETTLED_EVENTS {
                let key = format!("#.{event}");
                ch.queue_bind(queue.clone(), exchange.as_str().into(), key.into(), QueueBindOptions::default(), FieldTable::default())
                    .await?;
            }
            bound = true;
            tracing::debug!(waiters = waiters.waiting(), "subscribed to the settling lifecycle events");
            waiters.set_subscribed(true);
        }
        let idle = async {
            if anyone || !bound {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(UNBIND_AFTER).await;
        };
        tokio::select! {
            () = stop.cancelled() => break Ok(()),
            changed = waiting.changed() => if changed.is_err() { break Ok(()) },
            () = idle => {
                waiters.set_subscribed(false);
                for event in SETTLED_EVENTS {
                    let key = format!("#.{event}");
                    ch.queue_unbind(queue.clone(), exchange.as_str().into(), key.into(), FieldTable::default()).await?;
                }
                bound = false;
                tracing::debug!("nobody waits: unsubscribed from the lifecycle events");
            }
            event = events.next() => match event {
                Some(Ok(d)) => {
                    if let Some(HeaderValue::Str(id)) = transport::delivery_header(&d, H_SAGA_ID)
                        && let Ok(id) = id.parse::<SagaId>()
                    {
                        waiters.settled(id);
                    }
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(anyhow::anyhow!("the broker cancelled the lifecycle-event consumer")),
            },
        }
    };
    waiters.set_subscribed(false);
    result
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;

    #[tokio::test]
    async fn wakes_the_waiters_of_a_settled_saga_only_and_refuses_beyond_the_bound() {
        let waiters = Waiters::new(3);
        let (x, y) = (SagaId::new(), SagaId::new());
        let mut a = waiters.enter(x).expect("room");
        let mut b = waiters.enter(x).expect("room");
        let mut c = waiters.enter(y).expect("room");
        assert!(waiters.enter(y).is_none(), "a fourth waiter is refused");
        waiters.set_subscribed(true);
        // Subscribing wakes every waiter once (to read its saga again).
        assert!(a.woken().now_or_never().is_some());
        assert!(c.woken().now_or_never().is_some());
        assert!(b.woken().now_or_never().is_some());
        assert!(a.woken().now_or_never().is_none(), "nothing settled");

        waiters.settled(x);
        assert!(a.woken().now_or_never().is_some() && b.woken().now_or_never().is_some(), "both waiters of x");
        assert!(c.woken().now_or_never().is_none(), "not the waiter of y");

        drop((a, b));
        assert_eq!(waiters.waiting(), 1);
        assert!(waiters.inner.lock().get(&x).is_none(), "nothing is kept for a saga nobody waits on");
        let _d = waiters.enter(x).expect("room again");
        drop(c);
        assert_eq!(waiters.waiting(), 1);
    }

    #[tokio::test]
    async fn without_a_subscription_a_waiter_reads_again_every_poll() {
        let waiters = Waiters::new(10);
        let mut w = waiters.enter(SagaId::new()).expect("room");
        assert!(w.woken().now_or_never().is_none(), "not at once");
        tokio::time::timeout(POLL_UNSUBSCRIBED * 3, w.woken()).await.expect("woken by the poll");
        waiters.set_subscribed(true);
        w.woken().await;
        assert!(tokio::time::timeout(POLL_UNSUBSCRIBED * 2, w.woken()).await.is_err(), "subscribed, it sleeps until something settles");
    }
}
