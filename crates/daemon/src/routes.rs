//! Request handlers: parse, call the engine, answer. Every rejection of bad
//! input becomes an [`ApiError`] with a stable code, never a 500.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gworker_api::{self as api, ErrorCode};
use gworker_engine::Engine;
use gworker_supervisor::StreamName;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::ApiError;

type Eng = State<Arc<Engine>>;
type ApiResult<T> = Result<T, ApiError>;

pub fn router(engine: Arc<Engine>, token: Option<Arc<String>>) -> Router {
    let r = Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/sandboxes", post(create).get(list))
        .route("/v1/sandboxes/{id}", get(get_sandbox).delete(terminate))
        .route("/v1/sandboxes/{id}/wait", get(wait_sandbox))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route("/v1/sandboxes/{id}/snapshot", post(snapshot))
        .route("/v1/snapshots", get(list_snapshots))
        .route(
            "/v1/snapshots/{id}",
            get(get_snapshot).delete(delete_snapshot),
        )
        .route("/v1/sandboxes/{id}/processes", get(processes))
        .route("/v1/sandboxes/{id}/processes/{pid}", get(process))
        .route("/v1/sandboxes/{id}/processes/{pid}/wait", get(wait_process))
        .route("/v1/sandboxes/{id}/processes/{pid}/stdout", get(stdout))
        .route("/v1/sandboxes/{id}/processes/{pid}/stderr", get(stderr))
        .route("/v1/sandboxes/{id}/processes/{pid}/stdin", post(stdin))
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/stdin/close",
            post(stdin_close),
        )
        .route("/v1/sandboxes/{id}/processes/{pid}/signal", post(signal))
        .merge(crate::routes_store::routes())
        .merge(crate::routes_images::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(api::MAX_BODY))
        .with_state(engine);
    match token {
        Some(t) => r.layer(middleware::from_fn_with_state(t, require_token)),
        None => r,
    }
}

async fn require_token(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok: bool = subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.as_bytes()).into();
    if !ok {
        return ApiError::new(
            ErrorCode::Unauthorized,
            "missing or wrong bearer token: send `Authorization: Bearer $GWORKER_TOKEN`",
        )
        .into_response();
    }
    next.run(req).await
}

async fn not_found() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; see /v1/openapi.json",
    )
}

async fn method_not_allowed() -> Response {
    let mut r = ApiError::invalid("method not allowed on this endpoint; see /v1/openapi.json")
        .into_response();
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}

fn body_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let body = body.map_err(body_error)?;
    let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

fn body_error(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body over {} bytes", api::MAX_BODY),
        )
    } else {
        ApiError::invalid(format!("cannot read the request body: {e}"))
    }
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> ApiResult<T> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::new(ErrorCode::NotFound, format!("bad path: {e}")))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::invalid(format!("bad query: {e}")))
}

#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = api::Health)))]
pub async fn health(State(engine): Eng) -> Json<api::Health> {
    Json(api::Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        pool: engine.pool_status(),
    })
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::openapi_json(),
    )
        .into_response()
}

#[utoipa::path(post, path = "/v1/sandboxes", request_body = api::CreateSandbox,
    responses((status = 201, body = api::Sandbox), (status = 400, body = api::ErrorBody)))]
pub async fn create(
    State(e): Eng,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<api::Sandbox>)> {
    let req: api::CreateSandbox = body_json(body)?;
    Ok((StatusCode::CREATED, Json(e.create(req).await?)))
}

#[utoipa::path(get, path = "/v1/sandboxes", responses((status = 200, body = api::SandboxList)))]
pub async fn list(State(e): Eng) -> ApiResult<Json<api::SandboxList>> {
    Ok(Json(api::SandboxList {
        sandboxes: e.list().await?,
    }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", params(("id" = String, Path)),
    responses((status = 200, body = api::Sandbox), (status = 404, body = api::ErrorBody)))]
pub async fn get_sandbox(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<api::Sandbox>> {
    Ok(Json(e.get(&path(p)?).await?))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = api::ErrorBody)))]
pub async fn terminate(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    e.terminate(&path(p)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    timeout: Option<f64>,
}

fn wait_duration(q: WaitQuery) -> ApiResult<Duration> {
    let t = q.timeout.unwrap_or(api::MAX_WAIT_SECS);
    if !t.is_finite() || t < 0.0 {
        return Err(ApiError::invalid(
            "timeout must be a non-negative number of seconds",
        ));
    }
    Ok(Duration::from_secs_f64(t.min(api::MAX_WAIT_SECS)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/wait", params(("id" = String, Path), ("timeout" = Option<f64>, Query)),
    responses((status = 200, body = api::WaitResult), (status = 408, body = api::ErrorBody)))]
pub async fn wait_sandbox(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<WaitQuery>, QueryRejection>,
) -> ApiResult<Json<api::WaitResult>> {
    let id = path(p)?;
    let t = wait_duration(query(q)?)?;
    Ok(Json(api::WaitResult {
        exit_code: e.wait(&id, None, t).await?,
    }))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", params(("id" = String, Path)), request_body = api::Exec,
    responses((status = 201, body = api::Process), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn exec(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<api::Process>)> {
    let id = path(p)?;
    let req: api::Exec = body_json(body)?;
    Ok((StatusCode::CREATED, Json(e.exec(&id, req).await?)))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshot", params(("id" = String, Path)),
    responses((status = 201, body = api::Snapshot), (status = 409, body = api::ErrorBody), (status = 503, body = api::ErrorBody)))]
pub async fn snapshot(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<(StatusCode, Json<api::Snapshot>)> {
    Ok((StatusCode::CREATED, Json(e.snapshot(&path(p)?).await?)))
}

#[utoipa::path(get, path = "/v1/snapshots", responses((status = 200, body = api::SnapshotList)))]
pub async fn list_snapshots(State(e): Eng) -> ApiResult<Json<api::SnapshotList>> {
    Ok(Json(api::SnapshotList {
        snapshots: e.snapshots()?,
    }))
}

#[utoipa::path(get, path = "/v1/snapshots/{id}", params(("id" = String, Path)),
    responses((status = 200, body = api::Snapshot), (status = 404, body = api::ErrorBody)))]
pub async fn get_snapshot(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<api::Snapshot>> {
    Ok(Json(e.get_snapshot(&path(p)?)?))
}

#[utoipa::path(delete, path = "/v1/snapshots/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = api::ErrorBody)))]
pub async fn delete_snapshot(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    e.delete_snapshot(&path(p)?)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes", params(("id" = String, Path)),
    responses((status = 200, body = api::ProcessList)))]
pub async fn processes(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<api::ProcessList>> {
    Ok(Json(api::ProcessList {
        processes: e.processes(&path(p)?).await?,
    }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}", params(("id" = String, Path), ("pid" = u32, Path)),
    responses((status = 200, body = api::Process), (status = 404, body = api::ErrorBody)))]
pub async fn process(
    State(e): Eng,
    p: Result<Path<(String, u32)>, PathRejection>,
) -> ApiResult<Json<api::Process>> {
    let (id, pid) = path(p)?;
    Ok(Json(e.process(&id, pid).await?))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}/wait",
    params(("id" = String, Path), ("pid" = u32, Path), ("timeout" = Option<f64>, Query)),
    responses((status = 200, body = api::WaitResult), (status = 408, body = api::ErrorBody)))]
pub async fn wait_process(
    State(e): Eng,
    p: Result<Path<(String, u32)>, PathRejection>,
    q: Result<Query<WaitQuery>, QueryRejection>,
) -> ApiResult<Json<api::WaitResult>> {
    let (id, pid) = path(p)?;
    let t = wait_duration(query(q)?)?;
    Ok(Json(api::WaitResult {
        exit_code: e.wait(&id, Some(pid), t).await?,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffsetQuery {
    #[serde(default)]
    offset: u64,
}

async fn stream_output(
    e: &Engine,
    id: &str,
    pid: u32,
    stream: StreamName,
    offset: u64,
) -> ApiResult<Response> {
    let reader = e.read(id, pid, stream, offset).await?;
    let body = futures::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match reader.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok::<Bytes, std::io::Error>(chunk), Some(reader))),
            Ok(None) => None,
            // A broken supervisor connection aborts the body, so the client
            // sees an incomplete response and resumes from its offset.
            Err(err) => Some((Err(std::io::Error::other(err.to_string())), None)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static(api::OFFSET_HEADER),
                offset.to_string(),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}/stdout",
    params(("id" = String, Path), ("pid" = u32, Path), ("offset" = Option<u64>, Query)),
    responses((status = 200, description = "raw bytes from offset until the process closes the stream", content_type = "application/octet-stream"),
               (status = 410, body = api::ErrorBody)))]
pub async fn stdout(
    State(e): Eng,
    p: Result<Path<(String, u32)>, PathRejection>,
    q: Result<Query<OffsetQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let (id, pid) = path(p)?;
    stream_output(&e, &id, pid, StreamName::Stdout, query(q)?.offset).await
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}/stderr",
    params(("id" = String, Path), ("pid" = u32, Path), ("offset" = Option<u64>, Query)),
    responses((status = 200, description = "raw bytes from offset until the process closes the stream", content_type = "application/octet-stream"),
               (status = 410, body = api::ErrorBody)))]
pub async fn stderr(
    State(e): Eng,
    p: Result<Path<(String, u32)>, PathRejection>,
    q: Result<Query<OffsetQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let (id, pid) = path(p)?;
    stream_output(&e, &id, pid, StreamName::Stderr, query(q)?.offset).await
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/stdin",
    params(("id" = String, Path), ("pid" = u32, Path)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 409, body = api::ErrorBody)))]
pub async fn stdin(
    State(e): Eng,
    p: Result<Path<(String, u32)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let (id, pid) = path(p)?;
    let body = body.map_err(body_error)?;
    e.stdin(&id, pid, &body).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/stdin/close",
    params(("id" = String, Path), ("pid" = u32, Path)), responses((status = 204)))]
pub async fn stdin_close(
    State(e): Eng,
    p: Result<Path<(String, u32)>, PathRejection>,
) -> ApiResult<StatusCode> {
    let (id, pid) = path(p)?;
    e.stdin_close(&id, pid).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/signal",
    params(("id" = String, Path), ("pid" = u32, Path)), request_body = api::Signal, responses((status = 204)))]
pub async fn signal(
    State(e): Eng,
    p: Result<Path<(String, u32)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let (id, pid) = path(p)?;
    let req: api::Signal = body_json(body)?;
    e.signal(&id, pid, req.signal).await?;
    Ok(StatusCode::NO_CONTENT)
}
