//! One saga is one trace: the orchestrator's `decide` spans and the participants' `command`
//! spans of a saga carry the same W3C trace id, propagated through the outbox, the AMQP
//! `traceparent` header and the participants SDK; with an OTLP endpoint configured, a node and
//! the participants, each its own process, export them to a collector as one trace. (Its own
//! test binary: it installs the global subscriber that records the spans.)

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

/// The spans this process records: the subscriber is installed by whichever test asks first,
/// and every test asks before anything else, so [`TestEnv`]'s own log subscriber (installed only
/// when none is) never takes the process's one global slot first.
fn recorded() -> Spans {
    static SPANS: std::sync::OnceLock<Spans> = std::sync::OnceLock::new();
    SPANS
        .get_or_init(|| {
            let spans = Spans::default();
            tracing_subscriber::registry().with(spans.clone()).init();
            spans
        })
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_saga_is_one_trace_across_orchestrator_and_participants() {
    let spans = recorded();

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

/// A span as an OTLP collector received it.
#[derive(Clone, Debug)]
struct Exported {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    saga: String,
}

/// A local OTLP/HTTP collector: it takes `POST /v1/traces` (protobuf) and keeps the spans.
async fn collector() -> (String, Arc<Mutex<Vec<Exported>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message as _;
    let got = Arc::new(Mutex::new(Vec::new()));
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP export request");
                let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Value::StringValue(s)) => s.clone(),
                    _ => String::new(),
                };
                let mut spans = keep.lock().unwrap();
                for rs in req.resource_spans {
                    let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
                    let service = attrs.iter().find(|a| a.key == "service.name").map(|a| text(&a.value)).unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        let saga = span.attributes.iter().find(|a| a.key == "saga.id").map(|a| text(&a.value)).unwrap_or_default();
                        spans.push(Exported {
                            service: service.clone(),
                            name: span.name,
                            trace: hex(&span.trace_id),
                            id: hex(&span.span_id),
                            parent: hex(&span.parent_span_id),
                            saga,
                        });
                    }
                }
                axum::body::Bytes::from(
                    opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_receives_one_saga_as_one_trace_from_a_node_and_its_participants() {
    use testkit::node::Node;
    recorded();
    let (endpoint, exported) = collector().await;
    let env = TestEnv::start().await.unwrap();
    order_fulfilment::setup(&env.pool, &["widget"], 100).await.unwrap();
    let api = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let otel = |vars: &mut Vec<(String, String)>| {
        vars.retain(|(k, _)| k != "SAGAFLOW_API_ADDR");
        vars.push(("SAGAFLOW_API_ADDR".into(), api.clone()));
        vars.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()));
        vars.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()));
    };
    let mut vars = env.node_env("otlp-node");
    otel(&mut vars);
    let mut procs = vec![Node::spawn_with(env!("CARGO_BIN_EXE_sagaflow-node"), &["serve"], vars.clone(), "otlp-node").unwrap()];
    for p in order_fulfilment::PARTICIPANTS {
        procs.push(Node::spawn_with(env!("CARGO_BIN_EXE_testkit-order-participant"), &[p], vars.clone(), &format!("otlp-{p}")).unwrap());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !testkit::http::request(&api, "GET", "/ready", &[], b"").await.is_ok_and(|r| r.status == 200) {
        assert!(std::time::Instant::now() < deadline, "the node did not come up: {}", procs[0].logged());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An order that shipping refuses: three commands, then two compensations.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let caller = "b7ad6b7169203331";
    let body = serde_json::to_vec(&testkit::orders::order("o-otlp", order_fulfilment::UNREACHABLE, 0)).unwrap();
    let tp = format!("00-{trace}-{caller}-01");
    let r =
        testkit::http::request(&api, "POST", "/sagas", &[("Content-Type", "application/json"), ("traceparent", &tp)], &body).await.unwrap();
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let id: sagas::SagaId = r.json()["saga_id"].as_str().unwrap().parse().unwrap();
    let st = wait::settled(&env.pool, id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(st.status, sagas::SagaStatus::Compensated);

    // Five commands ran (reserve, charge, ship refused, refund, release); six inputs were decided.
    let mine = |spans: &[Exported]| -> Vec<Exported> { spans.iter().filter(|s| s.saga == id.to_string()).cloned().collect() };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = mine(&exported.lock().unwrap());
        let count = |n: &str| spans.iter().filter(|s| s.name == n).count();
        if count("command") >= 5 && count("decide") >= 6 {
            break spans;
        }
        assert!(std::time::Instant::now() < deadline, "the collector got {spans:#?}\nnode: {}", procs[0].logged());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(spans.iter().all(|s| s.trace == trace), "every span is in the caller's trace: {spans:#?}");
    let decides: Vec<&Exported> = spans.iter().filter(|s| s.name == "decide").collect();
    let commands: Vec<&Exported> = spans.iter().filter(|s| s.name == "command").collect();
    assert_eq!((decides.len(), commands.len()), (6, 5), "{spans:#?}");
    assert!(decides.iter().all(|d| d.service == "sagaflow" && d.parent == caller), "decisions hang under the caller's span: {decides:#?}");
    let services: BTreeSet<&str> = commands.iter().map(|c| c.service.as_str()).collect();
    assert_eq!(services, BTreeSet::from(order_fulfilment::PARTICIPANTS), "each participant exports as itself");
    for c in &commands {
        assert!(decides.iter().any(|d| d.id == c.parent), "command {c:?} hangs under the decision that sent it: {decides:#?}");
    }

    for p in procs {
        assert!(p.terminate().await.unwrap(), "a graceful exit");
    }
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}
