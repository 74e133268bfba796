//! One saga is one trace: the orchestrator's `decide` spans and the participants' `command`
//! spans of a saga carry the same W3C trace id, propagated through the outbox, the AMQP
//! `traceparent` header and the participants SDK. (Its own test binary: it installs the
//! global subscriber that records the spans.)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagas::{Registry, SagaDefinition};
use testkit::probe::{self, Plan};
use testkit::{TestEnv, wait};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// A span's name and fields.
type Recorded = (String, BTreeMap<String, String>);

#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Recorded>>>);

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}").trim_matches('"').to_owned());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, _id: &tracing::span::Id, _ctx: Context<'_, S>) {
        let mut f = Fields(BTreeMap::new());
        attrs.record(&mut f);
        self.0.lock().unwrap().push((attrs.metadata().name().to_owned(), f.0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_saga_is_one_trace_across_orchestrator_and_participants() {
    let spans = Spans::default();
    tracing_subscriber::registry().with(spans.clone()).init();

    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let def =
        SagaDefinition::<Plan>::builder("pair", 1).step("a", |s| probe::step(s, "a")).step("b", |s| probe::step(s, "b")).build().unwrap();
    let mut registry = Registry::new();
    registry.register(def.erased()).unwrap();
    let node = env.orchestrator("n1", registry).await.unwrap();
    let p = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let req = probe::start_request("pair", &Plan::default());
    let id = node.engine().start(&req, Some(&format!("00-{trace}-00f067aa0ba902b7-01"))).await.unwrap().saga_id;
    let other = node.engine().start(&req, None).await.unwrap().saga_id;
    wait::all_settled(&env.pool, &[id, other], Duration::from_secs(30)).await.unwrap();

    let recorded = spans.0.lock().unwrap().clone();
    let of = |saga: sagas::SagaId| -> Vec<(String, String)> {
        recorded
            .iter()
            .filter(|(_, f)| f.get("saga.id").map(String::as_str) == Some(saga.to_string().as_str()))
            .map(|(name, f)| (name.clone(), f.get("trace.id").cloned().unwrap_or_default()))
            .collect()
    };
    let mine = of(id);
    let names: BTreeSet<&str> = mine.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["command", "decide"]), "spans from both sides: {mine:?}");
    assert_eq!(mine.iter().filter(|(n, _)| n == "command").count(), 2, "one per step");
    assert!(mine.iter().all(|(_, t)| t == trace), "every span of the saga is in the caller's trace: {mine:?}");
    // A saga started without a trace gets one of its own, derived from its id.
    let theirs = of(other);
    let ids: BTreeSet<&str> = theirs.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(ids, BTreeSet::from([other.0.simple().to_string().as_str()]), "{theirs:?}");

    p.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["probe"]).await.unwrap();
}
