//! Prometheus metrics, prefix `sagaflow_`. Counters and histograms are this node's, and so are
//! the waiter gauges; the other gauges (outbox backlog, in-flight and stopped sagas, consumers
//! and messages waiting in the queues) are read from PostgreSQL and RabbitMQ when `/metrics` is
//! scraped, so every node reports the same deployment-wide values. The alerting rules and the
//! dashboard in `monitoring/` are written against these names (a test checks that they exist).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use sagas::{Definition, Effect, Input, SagaEvent, SagaState, TimerKey};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DefLabels {
    definition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    definition: String,
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ParticipantLabels {
    participant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueNameLabels {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
}

/// The deployment-wide readings of one scrape, from PostgreSQL and RabbitMQ.
#[derive(Debug, Default)]
pub(crate) struct Readings {
    /// Rows in the outbox, and the age of the oldest in seconds.
    pub(crate) outbox: (i64, f64),
    /// Sagas not settled.
    pub(crate) in_flight: i64,
    /// Sagas stopped, waiting for an operator.
    pub(crate) stopped: i64,
    /// Consumers on each participant's queue.
    pub(crate) consumers: Vec<(String, i64)>,
    /// Ready messages in each queue the broker told (a queue it does not have is left out).
    pub(crate) queued: Vec<(String, i64)>,
    /// Per shared resource: the steps holding a slot, and those waiting for one.
    pub(crate) slots: Vec<(String, i64, i64)>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0].into_iter()
}

/// This node's metrics.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
    series: Arc<Vec<String>>,
}

/// The registry being filled, and the series names of what was registered.
struct Names {
    registry: Registry,
    series: Vec<String>,
}

impl Names {
    fn add<M: prometheus_client::registry::Metric + TypedMetric>(&mut self, name: &str, help: &str, metric: M) {
        let suffixes: &[&str] = match M::TYPE {
            MetricType::Counter => &["_total"],
            MetricType::Histogram => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        self.series.extend(suffixes.iter().map(|s| format!("sagaflow_{name}{s}")));
        self.registry.register(name, help, metric);
    }
}

struct Inner {
    registry: std::sync::Mutex<Registry>,
    started: Family<DefLabels, Counter>,
    completed: Family<DefLabels, Counter>,
    compensated: Family<DefLabels, Counter>,
    stopped: Family<DefLabels, Counter>,
    retries: Family<StepLabels, Counter>,
    timeouts: Family<StepLabels, Counter>,
    escalations: Family<StepLabels, Counter>,
    step_latency: Family<StepLabels, Histogram>,
    saga_latency: Family<DefLabels, Histogram>,
    dead_letters: Family<QueueLabels, Counter>,
    outbox_backlog: Gauge,
    outbox_oldest_s: Gauge<f64, std::sync::atomic::AtomicU64>,
    in_flight: Gauge,
    awaiting_operator: Gauge,
    consumers: Family<ParticipantLabels, Gauge>,
    queued: Family<QueueNameLabels, Gauge>,
    slots_held: Family<ResourceLabels, Gauge>,
    slots_waiting: Family<ResourceLabels, Gauge>,
    waiters: Gauge,
    waiters_subscribed: Gauge,
    reconnects: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics.
    pub fn new() -> Self {
        let mut r = Names { registry: Registry::with_prefix("sagaflow"), series: Vec::new() };
        let hist = || Histogram::new(latency_buckets());
        let inner = Inner {
            registry: std::sync::Mutex::new(Registry::default()),
            started: Family::default(),
            completed: Family::default(),
            compensated: Family::default(),
            stopped: Family::default(),
            retries: Family::default(),
            timeouts: Family::default(),
            escalations: Family::default(),
            step_latency: Family::new_with_constructor(hist),
            saga_latency: Family::new_with_constructor(hist),
            dead_letters: Family::default(),
            outbox_backlog: Gauge::default(),
            outbox_oldest_s: Gauge::default(),
            in_flight: Gauge::default(),
            awaiting_operator: Gauge::default(),
            consumers: Family::default(),
            queued: Family::default(),
            slots_held: Family::default(),
            slots_waiting: Family::default(),
            waiters: Gauge::default(),
            waiters_subscribed: Gauge::default(),
            reconnects: Counter::default(),
        };
        r.add("sagas_started", "Sagas started by this node", inner.started.clone());
        r.add("sagas_completed", "Sagas that completed, decided by this node", inner.completed.clone());
        r.add("sagas_compensated", "Sagas that ended compensated, decided by this node", inner.compensated.clone());
        r.add("sagas_stopped", "Sagas stopped for an operator, decided by this node", inner.stopped.clone());
        r.add("step_retries", "Step attempts scheduled after a failure", inner.retries.clone());
        r.add("step_timeouts", "Step attempts that got no reply in time", inner.timeouts.clone());
        r.add("step_escalations", "Timeouts that escalated", inner.escalations.clone());
        r.add("step_duration_seconds", "From a step's first attempt to its success", inner.step_latency.clone());
        r.add("saga_duration_seconds", "From start to completed or compensated", inner.saga_latency.clone());
        r.add("dead_lettered", "Messages this node dead-lettered, by queue and reason", inner.dead_letters.clone());
        r.add("outbox_backlog", "Messages waiting in the outbox", inner.outbox_backlog.clone());
        r.add("outbox_oldest_seconds", "Age of the oldest message in the outbox", inner.outbox_oldest_s.clone());
        r.add("sagas_in_flight", "Sagas not yet completed, compensated or stopped", inner.in_flight.clone());
        r.add("participant_consumers", "Consumers on each participant's queue (0: nobody is taking its commands)", inner.consumers.clone());
        r.add("sagas_awaiting_operator", "Sagas stopped and waiting for an operator", inner.awaiting_operator.clone());
        r.add(
            "queue_messages",
            "Messages ready in each queue (participants' commands, replies, inbound starts, their dead letters), not yet delivered",
            inner.queued.clone(),
        );
        r.add("resource_slots_held", "Steps holding a slot of each shared resource", inner.slots_held.clone());
        r.add("resource_slots_waiting", "Steps waiting for a slot of each shared resource", inner.slots_waiting.clone());
        r.add("waiters", "Clients of this node waiting for sagas to settle", inner.waiters.clone());
        r.add(
            "waiters_subscribed",
            "1 while this node is subscribed to the lifecycle events that wake its waiters",
            inner.waiters_subscribed.clone(),
        );
        r.add("amqp_reconnects", "Times this node reconnected to RabbitMQ after losing it", inner.reconnects.clone());
        *inner.registry.lock().expect("not poisoned") = r.registry;
        Self { inner: Arc::new(inner), series: Arc::new(r.series) }
    }

    /// The name of every series this node can export (a counter's `_total`, a histogram's
    /// `_bucket`, `_sum` and `_count`), whether or not it has a value yet.
    pub fn series(&self) -> &[String] {
        &self.series
    }

    /// Count what a decision did.
    pub(crate) fn record(&self, def: &Definition, input: &Input, after: &SagaState, effects: &[Effect], now_ms: u64) {
        let d = || DefLabels { definition: def.name.clone() };
        let s = |step: &str| StepLabels { definition: def.name.clone(), step: step.to_owned() };
        for e in effects {
            let Effect::Emit(ev) = e else { continue };
            match ev {
                SagaEvent::Started => {
                    self.inner.started.get_or_create(&d()).inc();
                }
                SagaEvent::Completed => {
                    self.inner.completed.get_or_create(&d()).inc();
                }
                SagaEvent::Compensated => {
                    self.inner.compensated.get_or_create(&d()).inc();
                }
                SagaEvent::Stopped { .. } => {
                    self.inner.stopped.get_or_create(&d()).inc();
                }
                SagaEvent::StepRetrying { step, .. } => {
                    self.inner.retries.get_or_create(&s(step)).inc();
                }
                SagaEvent::Escalated { step, .. } => {
                    self.inner.escalations.get_or_create(&s(step)).inc();
                }
                SagaEvent::StepCompleted { step } => {
                    if let Some(st) = def.step_named(step).and_then(|sd| after.steps.get(sd.index.get()))
                        && let (Some(a), Some(b)) = (st.started_at, st.finished_at)
                    {
                        self.inner.step_latency.get_or_create(&s(step)).observe(b.0.saturating_sub(a.0) as f64 / 1000.0);
                    }
                }
                _ => {}
            }
            if matches!(ev, SagaEvent::Completed | SagaEvent::Compensated) {
                self.inner.saga_latency.get_or_create(&d()).observe(now_ms.saturating_sub(after.created_at.0) as f64 / 1000.0);
            }
        }
        // A missed heartbeat is a timeout of the attempt too.
        if let Input::Timer(TimerKey::StepTimeout { step, .. } | TimerKey::Heartbeat { step, .. }) = input {
            let name = def.step(*step).map_or_else(String::new, |sd| sd.name.clone());
            self.inner.timeouts.get_or_create(&s(&name)).inc();
        }
    }

    /// Count a dead letter.
    pub(crate) fn dead_lettered(&self, queue: &str, reason: &str) {
        self.inner.dead_letters.get_or_create(&QueueLabels { queue: queue.to_owned(), reason: reason.to_owned() }).inc();
    }

    /// Set the deployment-wide gauges.
    pub(crate) fn set_gauges(&self, r: &Readings) {
        self.inner.outbox_backlog.set(r.outbox.0);
        self.inner.outbox_oldest_s.set(r.outbox.1);
        self.inner.in_flight.set(r.in_flight);
        self.inner.awaiting_operator.set(r.stopped);
        for (p, n) in &r.consumers {
            self.inner.consumers.get_or_create(&ParticipantLabels { participant: p.clone() }).set(*n);
        }
        for (q, n) in &r.queued {
            self.inner.queued.get_or_create(&QueueNameLabels { queue: q.clone() }).set(*n);
        }
        // A resource nobody holds or waits for any more reads 0, not its last value.
        self.inner.slots_held.clear();
        self.inner.slots_waiting.clear();
        for (resource, held, waiting) in &r.slots {
            let labels = ResourceLabels { resource: resource.clone() };
            self.inner.slots_held.get_or_create(&labels).set(*held);
            self.inner.slots_waiting.get_or_create(&labels).set(*waiting);
        }
    }

    /// Set this node's waiter gauges.
    pub(crate) fn set_waiters(&self, waiting: usize, subscribed: bool) {
        self.inner.waiters.set(i64::try_from(waiting).unwrap_or(i64::MAX));
        self.inner.waiters_subscribed.set(i64::from(subscribed));
    }

    /// Count a reconnection to RabbitMQ.
    pub(crate) fn reconnected(&self) {
        self.inner.reconnects.inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry.lock().expect("not poisoned"));
        out
    }
}
