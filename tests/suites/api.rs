//! The operator surface: every HTTP route and its errors, auth, metrics after sagas ran, the
//! OpenAPI document, and the web page in headless Chromium.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use orchestrator::api::{ApiState, OPENAPI, app};
use participants_sdk::ParticipantHandle;
use sagas::{OnTimeout, Registry, RetryPolicy, SagaDefinition};
use serde_json::{Value, json};
use testkit::orders;
use testkit::probe::{self, Behavior, Plan};
use testkit::{TestEnv, wait};
use tower::ServiceExt;

const TOKEN: &str = "s3cret-token-of-24-chars";

fn registry() -> Registry {
    let mut r = Registry::new();
    let pair = SagaDefinition::<Plan>::builder("pair", 1)
        .search_key("case", |p: &Plan| p.case.clone().unwrap_or_default())
        .step("a", |s| probe::step(s, "a"))
        .step("b", |s| probe::step(s, "b"))
        .build()
        .unwrap();
    let slow = SagaDefinition::<Plan>::builder("slow", 1)
        .step("a", |s| probe::step(s, "a").compensation_retry(RetryPolicy::fixed(Duration::from_millis(50), 2)))
        .step("b", |s| probe::step(s, "b").timeout(Duration::from_secs(30), OnTimeout::Fail))
        .build()
        .unwrap();
    let approval = SagaDefinition::<Plan>::builder("approval", 1)
        .step("a", |s| probe::step(s, "a"))
        .wait("approved", |w| w.event("approved"))
        .build()
        .unwrap();
    // A parent whose second step runs a `pair` as its child saga.
    let family = SagaDefinition::<Plan>::builder("family", 1)
        .step("a", |s| probe::step(s, "a"))
        .step("kid", |s| s.child(&pair, |p: &Plan| p.clone()))
        .build()
        .unwrap();
    for d in [pair.erased(), slow.erased(), approval.erased(), family.erased()] {
        r.register(d).unwrap();
    }
    r
}

struct Api {
    env: TestEnv,
    node: orchestrator::OrchestratorHandle,
    probe: ParticipantHandle,
    router: axum::Router,
}

async fn api() -> Api {
    let env = TestEnv::start().await.unwrap();
    probe::setup(&env.pool).await.unwrap();
    let mut cfg = env.config("api-node");
    cfg.api_token = TOKEN.into();
    let node = orchestrator::Orchestrator::connect(cfg, registry()).await.unwrap().start().await.unwrap();
    let probe = probe::participant(env.participant_config()).start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let router =
        app(ApiState::new(node.engine().clone(), Some(TOKEN.into()), env.amqp_url.clone(), sagas::protocol::DEFAULT_MAX_BODY_BYTES));
    Api { env, node, probe, router }
}

impl Api {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value, axum::http::HeaderMap) {
        request(&self.router, method, uri, token, body, headers).await
    }

    async fn ok(&self, method: Method, uri: &str, body: Option<Value>) -> Value {
        let (s, v, _) = self.call(method, uri, Some(TOKEN), body, &[]).await;
        assert!(s.is_success(), "{uri}: {s} {v}");
        v
    }

    async fn err(&self, method: Method, uri: &str, body: Option<Value>, want: StatusCode, code: &str) {
        let (s, v, _) = self.call(method, uri, Some(TOKEN), body, &[]).await;
        assert_eq!((s, v["error"]["code"].as_str()), (want, Some(code)), "{uri}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    async fn start(&self, def: &str, plan: &Plan) -> String {
        let v = self.ok(Method::POST, "/sagas", Some(json!({"definition": def, "input": plan}))).await;
        v["saga_id"].as_str().unwrap().to_owned()
    }

    async fn finish(self) {
        self.probe.shutdown().await.unwrap();
        self.node.shutdown().await.unwrap();
        self.env.cleanup(&["probe", sagas::CHILD_PARTICIPANT]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_and_every_error_has_a_stable_code() {
    let a = api().await;

    // Auth: only health, ready and the page are open.
    assert_eq!(a.call(Method::GET, "/health", None, None, &[]).await.0, StatusCode::OK);
    assert_eq!(a.call(Method::GET, "/ready", None, None, &[]).await.0, StatusCode::OK);
    let (s, page, _) = a.call(Method::GET, "/", None, None, &[]).await;
    assert!(s.is_success() && page.as_str().is_some_and(|p| p.contains("<title>Sagaflow</title>")));
    for (uri, token) in [("/sagas", None), ("/sagas", Some("wrong")), ("/metrics", None), ("/openapi.json", None)] {
        let (s, v, h) = a.call(Method::GET, uri, token, None, &[]).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")), "{uri}");
        assert_eq!(h.get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
    }

    // Start: 202, Location, idempotency key header.
    let body = json!({"definition": "pair", "input": Plan::default()});
    let (s, v, h) = a.call(Method::POST, "/sagas", Some(TOKEN), Some(body.clone()), &[("idempotency-key", "k-1")]).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let id = v["saga_id"].as_str().unwrap().to_owned();
    assert_eq!(h.get(header::LOCATION).unwrap().to_str().unwrap(), format!("/sagas/{id}"));
    assert_eq!(v["created"], true);
    let (_, again, _) = a.call(Method::POST, "/sagas", Some(TOKEN), Some(body), &[("idempotency-key", "k-1")]).await;
    assert_eq!((again["saga_id"].as_str(), again["created"].as_bool()), (Some(id.as_str()), Some(false)));
    a.err(Method::POST, "/sagas", Some(json!({"definition": "pair"})), StatusCode::BAD_REQUEST, "invalid_request").await;
    a.err(Method::POST, "/sagas", Some(json!({"definition": "nope", "input": {}})), StatusCode::BAD_REQUEST, "unknown_definition").await;
    a.err(Method::POST, "/sagas", Some(json!({"definition": "pair", "input": {"steps": 3}})), StatusCode::BAD_REQUEST, "invalid_input")
        .await;

    // Wait, show, history.
    let w = a.ok(Method::GET, &format!("/sagas/{id}/wait?timeout_ms=30000"), None).await;
    assert_eq!((w["settled"].as_bool(), w["saga"]["status"].as_str()), (Some(true), Some("completed")));
    let v = a.ok(Method::GET, &format!("/sagas/{id}"), None).await;
    assert_eq!(v["steps"].as_array().unwrap().len(), 2);
    assert_eq!(
        (v["steps"][0]["name"].as_str(), v["steps"][0]["attempts"].as_u64(), v["steps"][0]["participant"].as_str()),
        (Some("a"), Some(1), Some("probe"))
    );
    assert!(v["steps"][1]["finished_at"].as_u64() >= v["steps"][1]["started_at"].as_u64());
    assert_eq!(v["decided_by"], "api-node");
    assert!(v["state_bytes"].as_u64().unwrap() > 0 && v["history_len"].as_i64() == Some(3));
    let h = a.ok(Method::GET, &format!("/sagas/{id}/history"), None).await;
    assert_eq!(h["history"].as_array().unwrap().len(), 3);
    let at: Vec<i64> = h["history"].as_array().unwrap().iter().map(|e| e["at"].as_i64().expect("each entry has its time")).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]) && at[0] > 1_700_000_000_000, "milliseconds since the epoch, in order: {at:?}");
    // What the API returns has exactly the fields openapi.json describes, no more, no fewer.
    let schemas = serde_json::from_str::<Value>(OPENAPI).unwrap()["components"]["schemas"].clone();
    let fields = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<std::collections::BTreeSet<_>>()).unwrap_or_default();
    for (returned, schema) in [(&v, "SagaView"), (&v["steps"][0], "StepView"), (&h["history"][0], "HistoryEntry")] {
        assert_eq!(fields(returned), fields(&schemas[schema]["properties"]), "the API's {schema} and openapi.json's");
    }
    a.err(Method::GET, "/sagas/not-a-uuid", None, StatusCode::BAD_REQUEST, "invalid_request").await;
    a.err(Method::GET, &format!("/sagas/{}", uuid::Uuid::now_v7()), None, StatusCode::NOT_FOUND, "not_found").await;
    a.err(Method::GET, &format!("/sagas/{}/history", uuid::Uuid::now_v7()), None, StatusCode::NOT_FOUND, "not_found").await;
    a.err(Method::GET, "/nowhere", None, StatusCode::NOT_FOUND, "not_found").await;

    // Events: delivered to a waiting saga; refused otherwise.
    let waiting = a.start("approval", &Plan::default()).await;
    wait::until(&a.env.pool, waiting.parse().unwrap(), Duration::from_secs(30), |s| s.steps[1].status == sagas::StepStatus::Waiting)
        .await
        .unwrap();
    a.err(Method::POST, &format!("/sagas/{waiting}/events"), Some(json!({"payload": {}})), StatusCode::BAD_REQUEST, "invalid_request")
        .await;
    let v = a.ok(Method::POST, &format!("/sagas/{waiting}/events"), Some(json!({"event": "approved", "payload": {"by": "api"}}))).await;
    assert_eq!(v["status"], "completed");
    a.err(Method::POST, &format!("/sagas/{id}/events"), Some(json!({"event": "approved"})), StatusCode::CONFLICT, "conflict").await;

    // Operator actions.
    a.err(Method::POST, &format!("/sagas/{id}/abort"), None, StatusCode::CONFLICT, "conflict").await;
    a.err(Method::POST, &format!("/sagas/{id}/resume"), None, StatusCode::CONFLICT, "conflict").await;
    a.err(Method::POST, &format!("/sagas/{id}/explode"), None, StatusCode::BAD_REQUEST, "invalid_request").await;
    // abort a running saga: its done step is compensated
    let running = a.start("slow", &Plan::default().with("b", Behavior::Slow { ms: 3000 })).await;
    wait::until(&a.env.pool, running.parse().unwrap(), Duration::from_secs(30), |s| s.steps[1].status == sagas::StepStatus::Running)
        .await
        .unwrap();
    let v = a.ok(Method::POST, &format!("/sagas/{running}/abort"), Some(json!({"reason": "customer cancelled"}))).await;
    assert_eq!(v["failure"]["code"], "aborted");
    let w = a.ok(Method::GET, &format!("/sagas/{running}/wait?timeout_ms=30000"), None).await;
    assert_eq!(w["saga"]["status"], "compensated");
    // a compensation that gives up stops the saga; retry, then skip it
    let stuck = a.start("slow", &Plan::default().with("b", Behavior::Reject).undo_flaky("a", 100)).await;
    let w = a.ok(Method::GET, &format!("/sagas/{stuck}/wait?timeout_ms=30000"), None).await;
    assert_eq!((w["saga"]["status"].as_str(), w["saga"]["stop"]["code"].as_str()), (Some("stopped"), Some("compensation_failed")));
    assert_eq!(w["saga"]["pending_compensations"], json!(["a"]));
    let v = a.ok(Method::POST, &format!("/sagas/{stuck}/retry"), None).await;
    assert_eq!(v["status"], "compensating");
    let w = a.ok(Method::GET, &format!("/sagas/{stuck}/wait?timeout_ms=30000"), None).await;
    assert_eq!(w["saga"]["stop"]["code"], "compensation_failed", "it fails again");
    // The overview says what the database holds: one stopped saga, two completed and one
    // compensated in the last hour.
    let o = a.ok(Method::GET, "/overview", None).await;
    let open: Vec<(String, i32, String, i64)> = sqlx::query_as(
        "SELECT definition, version, status, count(*) FROM sagaflow.instances WHERE status NOT IN ('completed', 'compensated')
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .fetch_all(&a.env.pool)
    .await
    .unwrap();
    let shown: Vec<(String, i32, String, i64)> = o["open"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["definition"].as_str().unwrap().into(),
                i32::try_from(c["version"].as_i64().unwrap()).unwrap(),
                c["status"].as_str().unwrap().into(),
                c["count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shown, open);
    assert_eq!(open, [("slow".to_owned(), 1, "stopped".to_owned(), 1)]);
    assert_eq!(o["stopped"], json!([{"code": "compensation_failed", "definition": "slow", "count": 1}]));
    let settled = |status: &str| {
        o["last_hour"].as_array().unwrap().iter().filter(|c| c["status"] == status).map(|c| c["count"].as_i64().unwrap()).sum::<i64>()
    };
    assert_eq!((settled("completed"), settled("compensated")), (2, 1), "{o}");
    let per_minute: i64 =
        o["per_minute"].as_array().unwrap().iter().map(|m| m["completed"].as_i64().unwrap() + m["compensated"].as_i64().unwrap()).sum();
    assert_eq!(per_minute, 3);
    assert!((o["failure_rate"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9, "{o}");
    assert!(o["oldest_running"].as_array().unwrap().is_empty(), "nothing runs: {o}");
    let v = a.ok(Method::POST, &format!("/sagas/{stuck}/skip"), None).await;
    assert_eq!((v["status"].as_str(), v["steps"][0]["status"].as_str()), (Some("compensated"), Some("compensation_skipped")));

    // List: filters and cursor pagination.
    let all = a.ok(Method::GET, "/sagas?limit=500", None).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 4);
    let compensated = a.ok(Method::GET, "/sagas?status=compensated", None).await;
    assert_eq!(compensated["items"].as_array().unwrap().len(), 2);
    let by_def = a.ok(Method::GET, "/sagas?definition=approval", None).await;
    assert_eq!(by_def["items"][0]["id"].as_str(), Some(waiting.as_str()));
    let p1 = a.ok(Method::GET, "/sagas?limit=3", None).await;
    let cursor = p1["next_cursor"].as_str().unwrap();
    let p2 = a.ok(Method::GET, &format!("/sagas?limit=3&cursor={cursor}"), None).await;
    let mut seen: Vec<&str> =
        p1["items"].as_array().unwrap().iter().chain(p2["items"].as_array().unwrap()).map(|i| i["id"].as_str().unwrap()).collect();
    assert!(p2["next_cursor"].is_null());
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 4, "two pages, every saga once");
    let future = u64::MAX / 2000;
    assert!(a.ok(Method::GET, &format!("/sagas?since={future}"), None).await["items"].as_array().unwrap().is_empty());
    a.err(Method::GET, "/sagas?status=bogus", None, StatusCode::BAD_REQUEST, "invalid_request").await;
    a.err(Method::GET, "/sagas?limit=0", None, StatusCode::BAD_REQUEST, "invalid_request").await;
    a.err(Method::GET, "/sagas?cursor=zzz", None, StatusCode::BAD_REQUEST, "invalid_request").await;
    a.err(Method::GET, "/sagas?colour=red", None, StatusCode::BAD_REQUEST, "invalid_request").await;

    // The definitions, and the contract.
    let d = a.ok(Method::GET, "/definitions", None).await;
    assert_eq!(d["definitions"].as_array().unwrap().len(), 4, "pair, slow, approval and family");
    let served = a.ok(Method::GET, "/openapi.json", None).await;
    let committed: Value = serde_json::from_str(OPENAPI).unwrap();
    assert_eq!(served, committed);
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json")).unwrap()).unwrap();
    assert_eq!(served, on_disk);
    for path in [
        "/health",
        "/ready",
        "/sagas",
        "/sagas/{id}",
        "/sagas/{id}/wait",
        "/sagas/{id}/history",
        "/sagas/{id}/events",
        "/sagas/{id}/{action}",
        "/definitions",
        "/metrics",
    ] {
        assert!(committed["paths"].get(path).is_some(), "{path} is missing from docs/openapi.json");
    }
    a.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_compensation_runs_again_when_the_operator_retries_after_the_cause_is_fixed() {
    let a = api().await;
    let token = format!("block-{}", uuid::Uuid::now_v7());
    probe::block(&a.env.pool, &token, true).await.unwrap();
    let stuck = a.start("slow", &Plan::default().with("b", Behavior::Reject).undo_blocked_by("a", &token)).await;
    let w = a.ok(Method::GET, &format!("/sagas/{stuck}/wait?timeout_ms=30000"), None).await;
    assert_eq!((w["saga"]["status"].as_str(), w["saga"]["stop"]["code"].as_str()), (Some("stopped"), Some("compensation_failed")));
    assert!(w["saga"]["steps"][0]["last_error"].as_str().is_some_and(|e| e.contains("probe_undo_blocked")), "{w}");
    // A retry while the cause is still there is refused again, and runs the undo again to learn it.
    assert_eq!(a.ok(Method::POST, &format!("/sagas/{stuck}/retry"), None).await["status"], "compensating");
    let w = a.ok(Method::GET, &format!("/sagas/{stuck}/wait?timeout_ms=30000"), None).await;
    assert_eq!(w["saga"]["stop"]["code"], "compensation_failed", "still blocked: {w}");
    // The cause fixed, the retry undoes the step, once.
    probe::block(&a.env.pool, &token, false).await.unwrap();
    assert_eq!(a.ok(Method::POST, &format!("/sagas/{stuck}/retry"), None).await["status"], "compensating");
    let w = a.ok(Method::GET, &format!("/sagas/{stuck}/wait?timeout_ms=30000"), None).await;
    assert_eq!((w["saga"]["status"].as_str(), w["saga"]["steps"][0]["status"].as_str()), (Some("compensated"), Some("compensated")), "{w}");
    let id = stuck.parse().unwrap();
    assert_eq!(probe::effects(&a.env.pool, id).await.unwrap(), ["a:do", "a:undo"]);
    // The participant's record now holds the success: the same compensation delivered again
    // is answered from it and undoes nothing more.
    let recorded: serde_json::Value = sqlx::query_scalar(
        "SELECT outcome FROM sagaflow_participant.inbox WHERE participant = 'probe' AND saga_id = $1 AND kind = 'compensate'",
    )
    .bind(id.0)
    .fetch_one(&a.env.pool)
    .await
    .unwrap();
    assert_eq!(recorded["type"], "success", "{recorded}");
    a.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_are_found_by_the_search_keys_their_definition_declares() {
    let a = api().await;
    let o42 = a.start("pair", &Plan::default().case("o-42")).await;
    let o43 = a.start("pair", &Plan::default().case("o-43")).await;
    let none = a.start("pair", &Plan::default()).await;
    for id in [&o42, &o43, &none] {
        wait::settled(&a.env.pool, id.parse().unwrap(), Duration::from_secs(30)).await.unwrap();
    }
    let found = |v: Value| v["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(found(a.ok(Method::GET, "/sagas?key=case&value=o-42", None).await), [o42]);
    assert_eq!(found(a.ok(Method::GET, "/sagas?key=case&value=o-43&status=completed", None).await), [o43]);
    assert!(found(a.ok(Method::GET, "/sagas?key=case&value=o-44", None).await).is_empty());
    assert!(found(a.ok(Method::GET, "/sagas?key=case&value=", None).await).is_empty(), "an empty value is not stored");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.search_keys").fetch_one(&a.env.pool).await.unwrap();
    assert_eq!(stored, 2, "one key for each saga with a case");
    // Refusals: a key without its value, a value too long, a value PostgreSQL cannot hold.
    a.err(Method::GET, "/sagas?key=case", None, StatusCode::BAD_REQUEST, "invalid_request").await;
    a.err(Method::GET, &format!("/sagas?key=case&value={}", "x".repeat(300)), None, StatusCode::BAD_REQUEST, "invalid_request").await;
    a.err(Method::GET, "/sagas?key=case&value=a%00b", None, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(found(a.ok(Method::GET, "/sagas?key=no%20such&value=x", None).await).is_empty(), "a key no definition declares finds nothing");
    // A start whose key cannot be stored is refused, saying which key.
    let (s, v, _) =
        a.call(Method::POST, "/sagas", Some(TOKEN), Some(json!({"definition": "pair", "input": {"case": "y".repeat(300)}})), &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_input")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("search key `case`"), "{v}");
    // U+0000 anywhere in a request is refused before the start is read (the key's own check
    // covers starts that arrive otherwise).
    let (s, v, _) =
        a.call(Method::POST, "/sagas", Some(TOKEN), Some(json!({"definition": "pair", "input": {"case": "a\u{0}b"}})), &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("U+0000"), "{v}");
    let d = a.ok(Method::GET, "/definitions", None).await;
    let pair = d["definitions"].as_array().unwrap().iter().find(|d| d["name"] == "pair").unwrap().clone();
    assert_eq!(pair["search_keys"], json!(["case"]));
    a.finish().await;
}

/// `n` sagas of definition `slow` stopped in `compensation_failed` (step b refused, step a's
/// undo refused while blocked), then unblocked: a retry of each now compensates it.
async fn stuck_sagas(a: &Api, n: usize) -> Vec<sagas::SagaId> {
    let token = format!("block-{}", uuid::Uuid::now_v7());
    probe::block(&a.env.pool, &token, true).await.unwrap();
    let plan = Plan::default().with("b", Behavior::Reject).undo_blocked_by("a", &token);
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(a.start("slow", &plan).await.parse().unwrap());
    }
    for id in &ids {
        let st = wait::settled(&a.env.pool, *id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(st.stop.map(|s| s.code), Some(sagas::StopCode::CompensationFailed));
    }
    probe::block(&a.env.pool, &token, false).await.unwrap();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_actions_preview_then_apply_to_what_was_confirmed() {
    let a = api().await;
    let done = a.start("pair", &Plan::default()).await;
    let stuck = stuck_sagas(&a, 21).await;
    wait::settled(&a.env.pool, done.parse().unwrap(), Duration::from_secs(30)).await.unwrap();
    let filter = json!({"status": "stopped", "stop_code": "compensation_failed", "definition": "slow"});

    a.err(Method::POST, "/bulk/retry", Some(json!({"filter": {}})), StatusCode::BAD_REQUEST, "invalid_request").await;
    a.err(Method::POST, "/bulk/explode", Some(json!({"filter": filter})), StatusCode::BAD_REQUEST, "invalid_request").await;
    a.err(Method::POST, "/bulk/retry", Some(json!({"filter": {"stop_code": "nope"}})), StatusCode::BAD_REQUEST, "invalid_request").await;
    a.err(Method::POST, "/bulk/retry", Some(json!({"filter": {"status": "gone"}})), StatusCode::BAD_REQUEST, "invalid_request").await;
    a.err(Method::POST, "/bulk/retry", Some(json!({"filter": filter, "colour": 1})), StatusCode::BAD_REQUEST, "invalid_request").await;

    // The preview names them, oldest first, and changes nothing.
    let p = a.ok(Method::POST, "/bulk/retry", Some(json!({"filter": filter}))).await;
    let ids: Vec<sagas::SagaId> = serde_json::from_value(p["ids"].clone()).unwrap();
    assert_eq!((p["matched"].as_u64(), p["applied"].as_u64(), &ids), (Some(21), Some(0), &stuck));
    let stopped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sagaflow.instances WHERE status = 'stopped'").fetch_one(&a.env.pool).await.unwrap();
    assert_eq!(stopped, 21, "a preview acts on nothing");
    // A confirmation of another count than the filter matches does nothing.
    a.err(Method::POST, "/bulk/retry", Some(json!({"filter": filter, "confirm": 20})), StatusCode::CONFLICT, "conflict").await;
    let v = a.ok(Method::POST, "/bulk/retry", Some(json!({"filter": filter, "confirm": 21}))).await;
    assert_eq!((v["matched"].as_u64(), v["applied"].as_u64(), v["refused"].as_array().map(Vec::len)), (Some(21), Some(21), Some(0)), "{v}");
    for id in &stuck {
        let st = wait::settled(&a.env.pool, *id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(st.status, sagas::SagaStatus::Compensated, "{id}");
        assert_eq!(probe::effects(&a.env.pool, *id).await.unwrap(), ["a:do", "a:undo"], "each undo once");
        let operator = wait::history(&a.env.pool, *id).await.unwrap().into_iter().filter(|e| e.input_kind == "operator").count();
        assert_eq!(operator, 1, "the retry is in each saga's history");
    }
    // Nothing matches any more: a preview says so.
    assert_eq!(a.ok(Method::POST, "/bulk/retry", Some(json!({"filter": filter}))).await["matched"], 0);
    // An action a saga cannot take is refused by that saga, with why; the others go on.
    let running = a.start("slow", &Plan::default().with("b", Behavior::Slow { ms: 3000 })).await;
    let v = a.ok(Method::POST, "/bulk/resume", Some(json!({"filter": {"definition": "pair"}, "confirm": 1}))).await;
    assert_eq!((v["applied"].as_u64(), v["refused"][0]["code"].as_str()), (Some(0), Some("conflict")), "{v}");
    let v = a.ok(Method::POST, "/bulk/abort", Some(json!({"filter": {"status": "running"}, "confirm": 1, "reason": "bulk"}))).await;
    assert_eq!(v["applied"], 1, "{v}");
    let w = a.ok(Method::GET, &format!("/sagas/{running}/wait?timeout_ms=30000"), None).await;
    assert_eq!((w["saga"]["status"].as_str(), w["saga"]["failure"]["message"].as_str()), (Some("compensated"), Some("bulk")));
    a.finish().await;
}

/// One request to `router`: its status, its body as JSON (or as a string), its headers.
async fn request(
    router: &axum::Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value, axum::http::HeaderMap) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = match body {
        Some(b) => req.header(header::CONTENT_TYPE, "application/json").body(Body::from(b.to_string())).unwrap(),
        None => req.body(Body::empty()).unwrap(),
    };
    let resp = router.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = axum::body::to_bytes(resp.into_body(), 16 * 1024 * 1024).await.unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v, headers)
}

fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = rest.strip_prefix(labels)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_ran() {
    let a = api().await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let plan =
            if i % 3 == 0 { Plan::default().with("b", Behavior::Reject) } else { Plan::default().with("b", Behavior::Flaky { n: 1 }) };
        ids.push(a.start("pair", &plan).await.parse().unwrap());
    }
    wait::all_settled(&a.env.pool, &ids, Duration::from_secs(60)).await.unwrap();
    let (s, text, h) = a.call(Method::GET, "/metrics", Some(TOKEN), None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h.get(header::CONTENT_TYPE).unwrap().to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = text.as_str().unwrap();
    let d = "{definition=\"pair\"}";
    assert_eq!(metric(text, "sagaflow_sagas_started_total", d), Some(6.0), "{text}");
    assert_eq!(metric(text, "sagaflow_sagas_completed_total", d), Some(4.0));
    assert_eq!(metric(text, "sagaflow_sagas_compensated_total", d), Some(2.0));
    assert_eq!(
        metric(text, "sagaflow_step_retries_total", "{definition=\"pair\",step=\"b\"}"),
        Some(4.0),
        "the four flaky sagas retried b once"
    );
    assert_eq!(metric(text, "sagaflow_saga_duration_seconds_count", d), Some(6.0));
    assert_eq!(metric(text, "sagaflow_step_duration_seconds_count", "{definition=\"pair\",step=\"a\"}"), Some(6.0));
    assert_eq!(metric(text, "sagaflow_sagas_in_flight", ""), Some(0.0));
    assert!(metric(text, "sagaflow_outbox_backlog", "").is_some());
    assert_eq!(metric(text, "sagaflow_participant_consumers", "{participant=\"probe\"}"), Some(1.0), "the probe is consuming");
    assert_eq!(metric(text, "sagaflow_sagas_awaiting_operator", ""), Some(0.0));

    // Two sagas stopped, and two messages in the probe's dead-letter queue: both gauges say so.
    stuck_sagas(&a, 2).await;
    let names = a.env.names();
    let probe_queue = names.participant_queue("probe");
    let dead = sagaflow_amqp::transport::Names::dead_letter_queue(&probe_queue);
    let ch = a.env.amqp().await.unwrap().create_channel().await.unwrap();
    for _ in 0..2 {
        ch.basic_publish("".into(), dead.as_str().into(), Default::default(), b"{}", Default::default()).await.unwrap();
    }
    let (_, text, _) = a.call(Method::GET, "/metrics", Some(TOKEN), None, &[]).await;
    let text = text.as_str().unwrap();
    assert_eq!(metric(text, "sagaflow_sagas_awaiting_operator", ""), Some(2.0), "{text}");
    let queued = |q: &str| metric(text, "sagaflow_queue_messages", &format!("{{queue=\"{q}\"}}"));
    assert_eq!(queued(&dead), Some(2.0), "{text}");
    assert_eq!(queued(&probe_queue), Some(0.0));
    assert_eq!(queued(&names.replies_queue()), Some(0.0));

    // The alerting rules and the dashboard of monitoring/ name only metrics a node exports; the
    // node's list of what it exports holds every series of this scrape.
    let exported = a.node.engine().metrics().series();
    let scraped: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    assert!(scraped.iter().all(|n| exported.iter().any(|e| e == n)), "{scraped:?} in {exported:?}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["monitoring/alerts.yml", "monitoring/dashboard.json"] {
        let body = std::fs::read_to_string(root.join(file)).unwrap();
        let used = metric_names(&body);
        assert!(used.len() >= 8, "{file} names {used:?}");
        let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(n)).collect();
        assert!(unknown.is_empty(), "{file} names metrics no node exports: {unknown:?}");
    }
    a.finish().await;
}

/// Every `sagaflow_…` metric name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("sagaflow_") {
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_lists_sagas_shows_a_timeline_and_aborts_in_headless_chromium() {
    let a = api().await;
    let done = a.start("pair", &Plan::default().case("o-42")).await;
    wait::settled(&a.env.pool, done.parse().unwrap(), Duration::from_secs(30)).await.unwrap();
    let waiting = a.start("approval", &Plan::default()).await;
    wait::until(&a.env.pool, waiting.parse().unwrap(), Duration::from_secs(30), |s| s.steps[1].status == sagas::StepStatus::Waiting)
        .await
        .unwrap();
    // Twenty sagas stopped in compensation_failed, whose cause is then fixed: the page retries
    // them all at once.
    let stuck = stuck_sagas(&a, 20).await;
    // A parent and its child saga, linked both ways on the page.
    let family = a.start("family", &Plan::default()).await;
    wait::settled(&a.env.pool, family.parse().unwrap(), Duration::from_secs(30)).await.unwrap();

    let url = format!("http://{}/", a.node.api_addr().unwrap());
    let shot = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshot.png");
    let _ = std::fs::remove_file(&shot);
    let python =
        std::env::var("SAGAFLOW_PYTHON").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/ci-venv/bin/python").into());
    let out = tokio::process::Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/browser/ui_test.py"))
        .args([url.as_str(), TOKEN, waiting.as_str(), shot.to_str().unwrap(), &stuck.len().to_string(), family.as_str()])
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {python} (a Python with selenium: scripts/setup.sh makes one): {e}"));
    let log = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "browser test failed:\n{log}");
    assert!(
        log.contains("ui: aborted")
            && log.contains("ui: found by its search key")
            && log.contains("ui: bulk retried 20 stopped sagas")
            && log.contains("ui: a child saga links to its parent and back"),
        "{log}"
    );
    for id in &stuck {
        let st = wait::settled(&a.env.pool, *id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(st.status, sagas::SagaStatus::Compensated, "{id}");
        assert_eq!(probe::effects(&a.env.pool, *id).await.unwrap(), ["a:do", "a:undo"]);
    }
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000), "no screenshot at {}", shot.display());
    let st = wait::settled(&a.env.pool, waiting.parse().unwrap(), Duration::from_secs(30)).await.unwrap();
    assert_eq!(st.status, sagas::SagaStatus::Compensated, "the page's Abort button compensated the saga");
    a.finish().await;
}

async fn cli(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    let out =
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sagaflow-node")).args(args).envs(env.node_env("cli")).output().await.unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_starts_shows_lists_waits_and_acts() {
    let env = TestEnv::start().await.unwrap();
    let node = env.orchestrator("n1", orders::registry()).await.unwrap();
    let parts = orders::start_participants(&env, &env.amqp_url, &order_fulfilment::PARTICIPANTS, 100).await.unwrap();
    let input = json!({"order_id": "cli-1", "sku": "widget", "quantity": 1, "amount_cents": 100, "destination": "unreachable"}).to_string();
    let (code, out, err) =
        cli(&env, &["start", "--definition", "order_fulfilment", "--input", &input, "--idempotency-key", "cli-1", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["saga_id"].as_str().unwrap().to_owned();

    let (code, out, _) = cli(&env, &["wait", &id, "--timeout-s", "30"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("status      compensated") && out.contains("failure     no_carrier"), "{out}");
    assert!(out.contains("charge_payment") && out.contains("compensated"), "a table of steps: {out}");
    let (_, out, _) = cli(&env, &["show", &id, "--json"]).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["status"].as_str(), v["steps"][2]["status"].as_str()), (Some("compensated"), Some("failed")));
    let (_, out, _) = cli(&env, &["list"]).await;
    assert!(out.lines().next().unwrap().starts_with("SAGA") && out.contains(&id), "{out}");
    let (_, out, _) = cli(&env, &["list", "--status", "completed", "--json"]).await;
    assert!(serde_json::from_str::<Value>(&out).unwrap()["items"].as_array().unwrap().is_empty());
    // Found by its order: the example declares `order_id` as its search key.
    let (_, out, _) = cli(&env, &["list", "--key", "order_id=cli-1", "--json"]).await;
    let items = serde_json::from_str::<Value>(&out).unwrap()["items"].clone();
    assert_eq!((items.as_array().map(Vec::len), items[0]["id"].as_str()), (Some(1), Some(id.as_str())), "{out}");
    let (_, out, _) = cli(&env, &["list", "--key", "order_id=cli-2", "--json"]).await;
    assert!(serde_json::from_str::<Value>(&out).unwrap()["items"].as_array().unwrap().is_empty());
    let (code, _, err) = cli(&env, &["list", "--key", "order_id"]).await;
    assert!(code != 0 && err.contains("--key takes name=value"), "{err}");

    // Refusals come back with their code and a non-zero exit.
    let (code, _, err) = cli(&env, &["abort", &id]).await;
    assert_ne!(code, 0);
    assert!(err.contains("conflict:"), "{err}");
    let (code, _, err) = cli(&env, &["signal", "not-an-id", "approved"]).await;
    assert!(code != 0 && err.contains("invalid_request:"), "{err}");
    let (code, _, err) = cli(&env, &["retry", &uuid::Uuid::now_v7().to_string()]).await;
    assert!(code != 0 && err.contains("not_found:"), "{err}");
    let (code, _, err) = cli(&env, &["start", "--definition", "order_fulfilment", "--input", "{oops"]).await;
    assert!(code != 0 && err.contains("--input is not JSON"), "{err}");

    orders::stop_participants(parts).await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_sleep_until_another_node_settles_their_saga_and_are_bounded() {
    let a = api().await;
    // Node B serves the waits; node A decides (B sees the saga settle only through the events).
    let mut cfg = a.env.config("waiting-node");
    (cfg.api_token, cfg.max_waiters) = (TOKEN.into(), 3);
    let b = orchestrator::Orchestrator::connect(cfg, registry()).await.unwrap().start().await.unwrap();
    let on_b = app(ApiState::new(b.engine().clone(), Some(TOKEN.into()), a.env.amqp_url.clone(), sagas::protocol::DEFAULT_MAX_BODY_BYTES));
    let id = a.start("approval", &Plan::default()).await;
    wait::until(&a.env.pool, id.parse().unwrap(), Duration::from_secs(30), |s| s.steps[1].status == sagas::StepStatus::Waiting)
        .await
        .unwrap();

    // Three clients wait on B (a timeout far beyond the test's: a waiter that is not woken fails it).
    let uri = format!("/sagas/{id}/wait?timeout_ms=120000");
    let waits: Vec<_> = (0..3)
        .map(|_| {
            let (router, uri) = (on_b.clone(), uri.clone());
            tokio::spawn(async move { request(&router, Method::GET, &uri, Some(TOKEN), None, &[]).await })
        })
        .collect();
    // B holds them, subscribed to the lifecycle events: they sleep, they do not poll.
    let gauges = || async {
        let (_, text, _) = request(&on_b, Method::GET, "/metrics", Some(TOKEN), None, &[]).await;
        let text = text.as_str().unwrap().to_owned();
        (metric(&text, "sagaflow_waiters", ""), metric(&text, "sagaflow_waiters_subscribed", ""))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gauges().await != (Some(3.0), Some(1.0)) {
        assert!(tokio::time::Instant::now() < deadline, "B never held 3 subscribed waiters: {:?}", gauges().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A fourth is refused, with when to come back.
    let (s, v, h) = request(&on_b, Method::GET, &uri, Some(TOKEN), None, &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("busy")), "{v}");
    assert_eq!(h.get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("1"));

    // A settles the saga; the lifecycle event wakes B's waiters.
    let v = a.ok(Method::POST, &format!("/sagas/{id}/events"), Some(json!({"event": "approved"}))).await;
    assert_eq!(v["status"], "completed");
    for w in waits {
        let (s, v, _) = w.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!((v["settled"].as_bool(), v["saga"]["status"].as_str()), (Some(true), Some("completed")), "{v}");
    }
    assert_eq!(gauges().await.0, Some(0.0), "nobody waits any more");
    b.shutdown().await.unwrap();
    a.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_are_set_listed_paused_and_deleted_through_the_api_and_the_cli() {
    let a = api().await;
    let every_minute = json!({"definition": "pair", "input": {}, "cron": "0 * * * * *", "missed": "skip", "priority": 3});
    let s = a.ok(Method::PUT, "/schedules/every-minute", Some(every_minute.clone())).await;
    assert_eq!(
        (s["name"].as_str(), s["when"]["expr"].as_str(), s["missed"].as_str()),
        (Some("every-minute"), Some("0 * * * * *"), Some("skip"))
    );
    let next = s["next_at"].as_u64().unwrap();
    assert!(next.is_multiple_of(60_000) && next > sagas::Timestamp::now().0, "the next whole minute: {s}");
    let list = a.ok(Method::GET, "/schedules", None).await;
    assert_eq!(list["schedules"].as_array().map(Vec::len), Some(1));
    let paused = a.ok(Method::POST, "/schedules/every-minute/pause", None).await;
    assert_eq!(paused["paused"], json!(true));
    let resumed = a.ok(Method::POST, "/schedules/every-minute/resume", None).await;
    assert_eq!(resumed["paused"], json!(false));

    // What cannot work is refused with the reason, and nothing is stored.
    for (name, body, code) in [
        ("bad-cron", json!({"definition": "pair", "input": {}, "cron": "61 * * * *"}), "invalid_request"),
        ("never", json!({"definition": "pair", "input": {}, "cron": "0 0 31 2 *"}), "invalid_request"),
        ("both", json!({"definition": "pair", "input": {}, "cron": "* * * * *", "at": 1}), "invalid_request"),
        ("neither", json!({"definition": "pair", "input": {}}), "invalid_request"),
        ("past", json!({"definition": "pair", "input": {}, "at": 1}), "invalid_request"),
        ("nobody", json!({"definition": "nobody", "input": {}, "cron": "* * * * *"}), "unknown_definition"),
        ("bad-input", json!({"definition": "pair", "input": {"steps": 5}, "cron": "* * * * *"}), "invalid_input"),
        ("bad-policy", json!({"definition": "pair", "input": {}, "cron": "* * * * *", "missed": "sometimes"}), "invalid_request"),
        ("a%20space", json!({"definition": "pair", "input": {}, "cron": "* * * * *"}), "invalid_request"),
    ] {
        a.err(Method::PUT, &format!("/schedules/{name}"), Some(body), StatusCode::BAD_REQUEST, code).await;
    }
    a.err(Method::GET, "/schedules/bad-cron", None, StatusCode::NOT_FOUND, "not_found").await;
    a.err(Method::POST, "/schedules/every-minute/fire", None, StatusCode::NOT_FOUND, "not_found").await;

    // The CLI sees and manages the same schedules.
    let (code, out, err) = cli(&a.env, &["schedule", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().next().unwrap().starts_with("NAME") && out.contains("every-minute") && out.contains("cron 0 * * * * *"), "{out}");
    let (code, _, err) =
        cli(&a.env, &["schedule", "set", "nightly", "--definition", "order_fulfilment", "--input", "{}", "--cron", "@daily"]).await;
    assert!(code != 0 && err.contains("invalid_input"), "the binary's definition refuses the input: {code} {err}");
    let order = json!({"order_id": "nightly", "sku": "widget", "quantity": 1, "amount_cents": 100, "destination": "x"}).to_string();
    let (code, out, err) =
        cli(&a.env, &["schedule", "set", "nightly", "--definition", "order_fulfilment", "--input", &order, "--cron", "@daily", "--json"])
            .await;
    assert_eq!(code, 0, "{err}");
    let set: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(set[0]["next_at"].as_u64().map(|n| n % 86_400_000), Some(0), "midnight UTC: {out}");
    let (code, _, err) = cli(&a.env, &["schedule", "pause", "nightly"]).await;
    assert_eq!(code, 0, "{err}");
    let nightly = a.ok(Method::GET, "/schedules/nightly", None).await;
    assert_eq!((nightly["definition"].as_str(), nightly["paused"].as_bool()), (Some("order_fulfilment"), Some(true)));
    a.ok(Method::DELETE, "/schedules/nightly", None).await;
    let (code, _, err) = cli(&a.env, &["schedule", "delete", "every-minute"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(a.ok(Method::GET, "/schedules", None).await["schedules"], json!([]));
    let (code, _, err) = cli(&a.env, &["schedule", "delete", "every-minute"]).await;
    assert!(code != 0 && err.contains("not_found"), "{err}");
    a.finish().await;
}
