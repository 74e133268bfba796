//! The HTTP API, the web page and `/metrics`, served by every node (`api_addr`). Every route
//! but `/health`, `/ready` and the page itself (`/`, which holds no data and asks for the
//! token) requires `Authorization: Bearer <api_token>` when a token is configured. Errors are
//! JSON: `{"error": {"code": "...", "message": "..."}}` with stable codes.
//! The contract is `docs/openapi.json`, also served at `/openapi.json`.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sagas::protocol::StartRequest;
use sagas::{Input, SagaId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::intake::{Engine, StartError};
use crate::ops::{self, ListFilter, OpsError};

/// The OpenAPI document (committed as docs/openapi.json; a test keeps them equal).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

const UI: &str = include_str!("ui.html");

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The engine.
    pub engine: Engine,
    /// The bearer token; `None` lets every request in (loopback only, enforced by config).
    pub token: Option<String>,
    /// The broker, for `/metrics` (consumers per participant queue) and `/ready`.
    pub amqp_url: String,
}

/// The router.
pub fn app(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/sagas", post(start).get(list))
        .route("/sagas/{id}", get(show))
        .route("/sagas/{id}/wait", get(wait))
        .route("/sagas/{id}/history", get(history))
        .route("/sagas/{id}/events", post(signal))
        .route("/sagas/{id}/{action}", post(action))
        .route("/definitions", get(definitions))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/", get(|| async { Html(UI) }))
        .merge(protected)
        .fallback(|| async { ApiError(OpsError::new("not_found", "no such route")) })
        .with_state(state)
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
        let status = match self.0.code {
            "not_found" => StatusCode::NOT_FOUND,
            "conflict" => StatusCode::CONFLICT,
            "unauthorized" => StatusCode::UNAUTHORIZED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, Json(json!({"error": {"code": self.0.code, "message": self.0.message}}))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn auth(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            let mut r =
                ApiError(OpsError::new("unauthorized", "a valid `Authorization: Bearer <token>` header is required")).into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

fn parse_id(id: &str) -> ApiResult<SagaId> {
    id.parse().map_err(|_| ApiError(OpsError::new("invalid_request", format!("`{id}` is not a saga id (a UUID)"))))
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| ApiError(OpsError::new("invalid_request", format!("invalid JSON body: {e}"))))
}

async fn start(State(s): State<ApiState>, headers: HeaderMap, raw: axum::body::Bytes) -> ApiResult<Response> {
    let mut req: StartRequest = body(&raw)?;
    if req.idempotency_key.is_none() {
        req.idempotency_key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    }
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let started = s.engine.start(&req, traceparent).await.map_err(|e| match e {
        StartError::Database(e) => OpsError::from(e),
        other => OpsError::new(other.code(), other.to_string()),
    })?;
    let location = format!("/sagas/{}", started.saga_id);
    let mut r = (StatusCode::ACCEPTED, Json(json!({"saga_id": started.saga_id, "created": started.created}))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v).map_err(|e| ApiError(OpsError::new("invalid_request", e.body_text())))
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

async fn signal(State(s): State<ApiState>, Path(id): Path<String>, raw: axum::body::Bytes) -> ApiResult<Json<ops::SagaView>> {
    let ev: EventBody = body(&raw)?;
    if ev.event.is_empty() {
        return Err(ApiError(OpsError::new("invalid_request", "`event` must not be empty")));
    }
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
    raw: axum::body::Bytes,
) -> ApiResult<Json<ops::SagaView>> {
    let b: ActionBody = if raw.is_empty() { ActionBody::default() } else { body(&raw)? };
    let cmd = ops::operator_command(&action, b.reason)?;
    Ok(Json(ops::act(&s.engine, parse_id(&id)?, Input::Operator(cmd)).await?))
}

async fn definitions(State(s): State<ApiState>) -> Json<Value> {
    let defs: Vec<Value> = s.engine.registry().iter().map(|d| serde_json::to_value(d.spec()).unwrap_or(Value::Null)).collect();
    Json(json!({"definitions": defs}))
}

async fn ready(State(s): State<ApiState>) -> Response {
    match sqlx::query("SELECT 1").execute(s.engine.pool()).await {
        Ok(_) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => ApiError(OpsError::new("unavailable", format!("database: {e}"))).into_response(),
    }
}

async fn metrics(State(s): State<ApiState>) -> ApiResult<Response> {
    let pool = s.engine.pool();
    let (backlog, oldest): (i64, f64) =
        sqlx::query_as("SELECT count(*), COALESCE(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM sagaflow.outbox")
            .fetch_one(pool)
            .await
            .map_err(OpsError::from)?;
    let in_flight: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sagaflow.instances WHERE status IN ('created', 'running', 'compensating')")
            .fetch_one(pool)
            .await
            .map_err(OpsError::from)?;
    let consumers = participant_consumers(&s).await;
    s.engine.metrics().set_gauges(backlog, oldest, in_flight, &consumers);
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.engine.metrics().encode())
        .into_response())
}

/// Consumers on each participant's queue; a queue the broker does not have counts 0.
async fn participant_consumers(s: &ApiState) -> Vec<(String, i64)> {
    let participants: Vec<String> = s.engine.registry().participants().into_iter().map(str::to_owned).collect();
    let Ok(Ok(conn)) =
        tokio::time::timeout(Duration::from_secs(3), lapin::Connection::connect(&s.amqp_url, lapin::ConnectionProperties::default())).await
    else {
        return participants.into_iter().map(|p| (p, 0)).collect();
    };
    let mut out = Vec::new();
    for p in participants {
        let queue = s.engine.names().participant_queue(&p);
        // A failed passive declare closes the channel: one channel per queue.
        let n = match conn.create_channel().await {
            Ok(ch) => ch
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
                    Default::default(),
                )
                .await
                .map_or(0, |q| i64::from(q.consumer_count())),
            Err(_) => 0,
        };
        out.push((p, n));
    }
    let _ = conn.close(200, "metrics".into()).await;
    out
}
