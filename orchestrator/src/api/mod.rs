//! The HTTP API, the web page and `/metrics`, served by every node (`api_addr`). Every route
//! but `/health`, `/ready` and the page itself (`/`, which holds no data and asks for the
//! token) requires `Authorization: Bearer <api_token>` when a token is configured; without a
//! token (a loopback address only) a request must name a loopback host and come from no other
//! origin, so neither a web page elsewhere nor a rebound DNS name can use the API. Bodies are
//! JSON (`Content-Type: application/json`), read up to `max_body_bytes` and no further. Errors
//! are JSON: `{"error": {"code": "...", "message": "..."}}` with stable codes.
//! The contract is `docs/openapi.json`, also served at `/openapi.json`.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::HttpBody as _;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sagaflow_amqp::transport::{self, Names};
use sagas::protocol::{StartRequest, check_name, clip, json_has_nul};
use sagas::{Input, SagaId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::intake::{Engine, StartError};
use crate::ops::{self, ErrorKind, ListFilter, OpsError};

/// The OpenAPI document: docs/openapi.json, through the link `orchestrator/openapi.json` (so the
/// packaged crate carries it); a test keeps it equal to what the API serves.
pub const OPENAPI: &str = include_str!("../../openapi.json");

const UI: &str = include_str!("ui.html");

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    engine: Engine,
    token: Option<String>,
    amqp_url: String,
    max_body: usize,
    /// The connection `/metrics` asks the broker on, kept between scrapes.
    broker: Arc<tokio::sync::Mutex<Option<lapin::Connection>>>,
}

impl ApiState {
    /// The API of `engine`: `token` is the bearer token (`None` lets every request from this
    /// host in; the configuration allows that on a loopback address only), `amqp_url` the broker
    /// `/metrics` asks for each participant queue's consumers, `max_body` the largest body read.
    pub fn new(engine: Engine, token: Option<String>, amqp_url: String, max_body: usize) -> Self {
        Self { engine, token, amqp_url, max_body, broker: Arc::default() }
    }
}

/// The router.
pub fn app(state: ApiState) -> Router {
    let max_body = state.max_body;
    let protected = Router::new()
        .route("/sagas", post(start).get(list))
        .route("/sagas/{id}", get(show))
        .route("/sagas/{id}/wait", get(wait))
        .route("/sagas/{id}/history", get(history))
        .route("/sagas/{id}/events", post(signal))
        .route("/sagas/{id}/{action}", post(action))
        .route("/definitions", get(definitions))
        .route("/overview", get(overview))
        .route("/bulk/{action}", post(bulk))
        .route("/schedules", get(schedules))
        .route("/schedules/{name}", get(schedule).put(put_schedule).delete(delete_schedule))
        .route("/schedules/{name}/{action}", post(schedule_action))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/", get(|| async { Html(UI) }))
        .merge(protected)
        .fallback(|| async { ApiError(OpsError::new(ErrorKind::NotFound, "no such route")) })
        .method_not_allowed_fallback(|| async {
            ApiError(OpsError::new(ErrorKind::MethodNotAllowed, "the route does not take this method"))
        })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// The page's Content-Security-Policy: its one inline script and style by their hashes, the
/// API of its own origin, and no framing.
static CSP: LazyLock<String> = LazyLock::new(|| {
    use base64::Engine as _;
    use sha2::Digest as _;
    let hash = |tag: &str| {
        let inner = UI.split(&format!("<{tag}>")).nth(1).and_then(|rest| rest.split(&format!("</{tag}>")).next()).unwrap_or("");
        format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(inner.as_bytes())))
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        hash("script"),
        hash("style")
    )
});

/// Every request: without a token, only a loopback `Host` and no other `Origin` (a token-less
/// node listens on loopback only; a page elsewhere, or a DNS name rebound to 127.0.0.1, must
/// not reach it); a body only as JSON. Every response: headers that keep the page from being
/// framed, sniffed or fed a script from elsewhere.
async fn guard(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    // The status follows from the code (see `ApiError`).
    let refused = |kind: ErrorKind, message: &str| ApiError(OpsError::new(kind, message)).into_response();
    let headers = req.headers();
    let mut response = if s.token.is_none() && !headers.get(header::HOST).and_then(|h| h.to_str().ok()).is_some_and(loopback_authority) {
        refused(ErrorKind::Forbidden, "without an api_token, requests must name a loopback host (localhost, 127.0.0.1 or [::1])")
    } else if s.token.is_none()
        && headers
            .get(header::ORIGIN)
            .is_some_and(|o| !o.to_str().ok().and_then(|o| o.split_once("://")).is_some_and(|(_, a)| loopback_authority(a)))
    {
        refused(ErrorKind::Forbidden, "without an api_token, requests from another origin are refused")
    } else if req.method() == axum::http::Method::POST
        && req.body().size_hint().exact() != Some(0)
        && !headers
            .get(header::CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .is_some_and(|c| c.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")))
    {
        refused(ErrorKind::UnsupportedMediaType, "a request body must be JSON (`Content-Type: application/json`)")
    } else {
        next.run(req).await
    };
    let h = response.headers_mut();
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if let Ok(csp) = HeaderValue::from_str(&CSP) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    response
}

/// Whether `authority` (`host[:port]`) names this host by a loopback name or address.
fn loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An error as JSON with its HTTP status.
pub struct ApiError(pub OpsError);

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let busy = self.0.kind == ErrorKind::Busy;
        let status = match self.0.kind {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::Unavailable | ErrorKind::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::InvalidRequest | ErrorKind::UnknownDefinition | ErrorKind::InvalidInput | ErrorKind::Unstorable => {
                StatusCode::BAD_REQUEST
            }
        };
        // A message never repeats a large input whole.
        let message = clip(&self.0.message, 1024);
        let mut r = (status, Json(json!({"error": {"code": self.0.code(), "message": message}}))).into_response();
        if busy {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn auth(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        // In constant time: how much of a guess matches must not show in how long it takes.
        let matches = given.is_some_and(|g| bool::from(subtle::ConstantTimeEq::ct_eq(g.as_bytes(), token.as_bytes())));
        if !matches {
            let mut r = ApiError(OpsError::new(ErrorKind::Unauthorized, "a valid `Authorization: Bearer <token>` header is required"))
                .into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

fn parse_id(id: &str) -> ApiResult<SagaId> {
    id.parse().map_err(|_| ApiError(OpsError::new(ErrorKind::InvalidRequest, format!("`{id}` is not a saga id (a UUID)"))))
}

/// A JSON body, read up to `max_body_bytes` (a larger one is refused with 413 as soon as it
/// passes the limit, not after it was read), that PostgreSQL can store (no U+0000).
fn body<T: serde::de::DeserializeOwned>(raw: Result<axum::body::Bytes, BytesRejection>) -> ApiResult<T> {
    let bytes = raw.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError(OpsError::new(ErrorKind::PayloadTooLarge, "the body is larger than max_body_bytes")),
        _ => ApiError(OpsError::new(ErrorKind::InvalidRequest, e.body_text())),
    })?;
    if json_has_nul(&bytes) {
        return Err(ApiError(OpsError::new(ErrorKind::InvalidRequest, "a string contains U+0000, which PostgreSQL cannot store")));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError(OpsError::new(ErrorKind::InvalidRequest, format!("invalid JSON body: {e}"))))
}

async fn start(State(s): State<ApiState>, headers: HeaderMap, raw: Result<axum::body::Bytes, BytesRejection>) -> ApiResult<Response> {
    let mut req: StartRequest = body(raw)?;
    if req.idempotency_key.is_none() {
        req.idempotency_key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    }
    req.check().map_err(|e| OpsError::new(ErrorKind::InvalidRequest, e))?;
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let started = s.engine.start(&req, traceparent).await.map_err(|e| match e {
        StartError::Database(e) => OpsError::from(e),
        other => OpsError::from(other),
    })?;
    let location = format!("/sagas/{}", started.saga_id);
    let mut r = (StatusCode::ACCEPTED, Json(json!({"saga_id": started.saga_id, "created": started.created}))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v).map_err(|e| ApiError(OpsError::new(ErrorKind::InvalidRequest, e.body_text())))
}

async fn list(State(s): State<ApiState>, q: Result<Query<ListFilter>, QueryRejection>) -> ApiResult<Json<ops::Page>> {
    Ok(Json(ops::list(s.engine.pool(), &query(q)?).await?))
}

async fn show(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<ops::SagaView>> {
    Ok(Json(ops::get(&s.engine, parse_id(&id)?).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    timeout_ms: Option<u64>,
}

async fn wait(State(s): State<ApiState>, Path(id): Path<String>, q: Result<Query<WaitQuery>, QueryRejection>) -> ApiResult<Json<Value>> {
    let q = query(q)?;
    let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(300_000));
    let (view, settled) = ops::wait(&s.engine, parse_id(&id)?, timeout).await?;
    Ok(Json(json!({"settled": settled, "saga": view})))
}

async fn history(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"history": ops::history(s.engine.pool(), parse_id(&id)?).await?})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody {
    event: String,
    #[serde(default)]
    payload: Value,
}

async fn signal(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    raw: Result<axum::body::Bytes, BytesRejection>,
) -> ApiResult<Json<ops::SagaView>> {
    let ev: EventBody = body(raw)?;
    check_name("event", &ev.event).map_err(|e| OpsError::new(ErrorKind::InvalidRequest, e))?;
    Ok(Json(ops::act(&s.engine, parse_id(&id)?, Input::Event { name: ev.event, payload: ev.payload }).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    reason: Option<String>,
}

async fn action(
    State(s): State<ApiState>,
    Path((id, action)): Path<(String, String)>,
    raw: Result<axum::body::Bytes, BytesRejection>,
) -> ApiResult<Json<ops::SagaView>> {
    let b: ActionBody = if raw.as_ref().is_ok_and(|r| r.is_empty()) { ActionBody::default() } else { body(raw)? };
    let cmd = ops::operator_command(&action, b.reason)?;
    Ok(Json(ops::act(&s.engine, parse_id(&id)?, Input::Operator(cmd)).await?))
}

async fn schedules(State(s): State<ApiState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"schedules": crate::schedules::list(&s.engine).await?})))
}

async fn schedule(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<Json<crate::schedules::Schedule>> {
    Ok(Json(crate::schedules::get(&s.engine, &name).await?))
}

async fn put_schedule(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    raw: Result<axum::body::Bytes, BytesRejection>,
) -> ApiResult<Json<crate::schedules::Schedule>> {
    Ok(Json(crate::schedules::put(&s.engine, &name, body(raw)?).await?))
}

async fn delete_schedule(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    crate::schedules::delete(&s.engine, &name).await?;
    Ok(Json(json!({"deleted": name})))
}

async fn schedule_action(
    State(s): State<ApiState>,
    Path((name, action)): Path<(String, String)>,
) -> ApiResult<Json<crate::schedules::Schedule>> {
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        other => {
            return Err(ApiError(OpsError::new(
                ErrorKind::NotFound,
                format!("no schedule action {}; pause or resume", sagas::protocol::quote(other)),
            )));
        }
    };
    Ok(Json(crate::schedules::set_paused(&s.engine, &name, paused).await?))
}

async fn definitions(State(s): State<ApiState>) -> Json<Value> {
    let defs: Vec<Value> = s.engine.registry().iter().map(|d| serde_json::to_value(d.spec()).unwrap_or(Value::Null)).collect();
    Json(json!({"definitions": defs}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkBody {
    filter: ops::BulkFilter,
    #[serde(default)]
    reason: Option<String>,
    /// The count a preview showed: present, the action is applied; absent, previewed.
    #[serde(default)]
    confirm: Option<usize>,
}

async fn bulk(
    State(s): State<ApiState>,
    Path(action): Path<String>,
    raw: Result<axum::body::Bytes, BytesRejection>,
) -> ApiResult<Json<ops::BulkOutcome>> {
    let b: BulkBody = body(raw)?;
    Ok(Json(match b.confirm {
        None => ops::bulk_preview(s.engine.pool(), &action, &b.filter).await?,
        Some(n) => ops::bulk_apply(&s.engine, &action, b.reason, &b.filter, n).await?,
    }))
}

async fn overview(State(s): State<ApiState>) -> ApiResult<Json<ops::Overview>> {
    Ok(Json(ops::overview(s.engine.pool()).await?))
}

async fn ready(State(s): State<ApiState>) -> Response {
    match sqlx::query("SELECT 1").execute(s.engine.pool()).await {
        Ok(_) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => ApiError(OpsError::new(ErrorKind::Unavailable, format!("database: {e}"))).into_response(),
    }
}

async fn metrics(State(s): State<ApiState>) -> ApiResult<Response> {
    let pool = s.engine.pool();
    let outbox: (i64, f64) =
        sqlx::query_as("SELECT count(*), COALESCE(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM sagaflow.outbox")
            .fetch_one(pool)
            .await
            .map_err(OpsError::from)?;
    // Both counts from the status index: the statuses not settled, and `stopped`.
    let (in_flight, stopped): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status <> 'stopped'), count(*) FILTER (WHERE status = 'stopped') \
         FROM sagaflow.instances WHERE status = ANY($1)",
    )
    .bind(sagas::SagaStatus::names_where(|s| !s.is_terminal()))
    .fetch_one(pool)
    .await
    .map_err(OpsError::from)?;
    let slots = crate::store::slots::usage(pool).await.map_err(OpsError::from)?;
    let (consumers, queued) = broker_queues(&s).await;
    let metrics = s.engine.metrics();
    metrics.set_gauges(&crate::metrics::Readings { outbox, in_flight, stopped, consumers, queued, slots });
    metrics.set_waiters(s.engine.waiters.waiting(), s.engine.waiters.subscribed());
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode()).into_response())
}

/// What the broker says of the deployment's queues: the consumers on each participant's queue
/// (a queue the broker does not have counts 0), and the ready messages of every queue it has
/// among the participants' queues, the replies and inbound queues and their dead-letter queues.
/// Asked on one connection kept between scrapes (opened again once it is lost).
async fn broker_queues(s: &ApiState) -> (Vec<(String, i64)>, Vec<(String, i64)>) {
    let names = s.engine.names();
    let participants: Vec<String> = s.engine.registry().participants().into_iter().map(str::to_owned).collect();
    let mut queues: Vec<String> = participants.iter().map(|p| names.participant_queue(p)).collect();
    queues.extend([names.replies_queue(), names.inbound_queue()]);
    queues.extend((0..names.partitions()).map(|p| names.partition_queue(p)));
    let dead: Vec<String> = queues.iter().map(|q| Names::dead_letter_queue(q)).collect();
    queues.extend(dead);

    let mut broker = s.broker.lock().await;
    if !broker.as_ref().is_some_and(|c| c.status().connected()) {
        // As the node connects: any broker of the list, the URL's TLS settings.
        *broker = transport::connect(&s.amqp_url, Duration::from_secs(3)).await.ok();
    }
    let Some(conn) = broker.as_ref() else {
        return (participants.into_iter().map(|p| (p, 0)).collect(), Vec::new());
    };
    let mut read = Vec::new();
    for queue in queues {
        // A failed passive declare closes the channel: one channel per queue.
        let Ok(ch) = conn.create_channel().await else { continue };
        let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        if let Ok(q) = ch.queue_declare(queue.as_str().into(), options, Default::default()).await {
            read.push((queue, i64::from(q.consumer_count()), i64::from(q.message_count())));
        }
    }
    let consumers = participants
        .into_iter()
        .map(|p| {
            let queue = names.participant_queue(&p);
            let n = read.iter().find(|(q, ..)| *q == queue).map_or(0, |(_, c, _)| *c);
            (p, n)
        })
        .collect();
    (consumers, read.into_iter().map(|(q, _, m)| (q, m)).collect())
}
