//! Handlers for volumes (and host-side access to their files) and stored
//! secrets. Secret values are only ever read from requests, never answered
//! nor logged.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use futures::StreamExt;
use gworker_api::{self as api};
use gworker_engine::{Engine, EngineError};
use serde::Deserialize;

use crate::error::ApiError;

type Eng = State<Arc<Engine>>;
type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<Arc<Engine>> {
    Router::new()
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(get_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/files", get(list_files))
        .route(
            "/v1/volumes/{name}/file",
            get(read_file).put(write_file).delete(remove_file),
        )
        .route("/v1/volumes/{name}/dir", put(make_dir))
        .route("/v1/secrets", get(list_secrets).post(create_secret))
        .route("/v1/secrets/{name}", get(get_secret).delete(delete_secret))
}

pub(crate) fn path<T>(p: Result<Path<T>, PathRejection>) -> ApiResult<T> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::new(api::ErrorCode::NotFound, format!("bad path: {e}")))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::invalid(format!("bad query: {e}")))
}

pub(crate) fn json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    quote_errors: bool,
) -> ApiResult<T> {
    let body = body.map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}")))?;
    serde_json::from_slice(&body).map_err(|e| {
        if quote_errors {
            ApiError::invalid(format!("invalid JSON body: {e}"))
        } else {
            // serde's message may quote a secret value: say where, not what.
            ApiError::invalid(format!(
                "invalid JSON body at line {} column {}: expected {{\"name\": str, \"values\": {{str: str}}, \"overwrite\": bool}}",
                e.line(),
                e.column()
            ))
        }
    })
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(api::ErrorCode::Internal, e.to_string()))?
        .map_err(ApiError::from)
}

#[utoipa::path(get, path = "/v1/volumes", responses((status = 200, body = api::VolumeList)))]
pub async fn list_volumes(State(e): Eng) -> ApiResult<Json<api::VolumeList>> {
    let volumes = blocking(move || e.volumes().list()).await?;
    Ok(Json(api::VolumeList { volumes }))
}

#[utoipa::path(post, path = "/v1/volumes", request_body = api::CreateVolume,
    responses((status = 201, body = api::Volume), (status = 200, description = "exists already (exist_ok)", body = api::Volume),
              (status = 409, body = api::ErrorBody)))]
pub async fn create_volume(
    State(e): Eng,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<api::Volume>)> {
    let req: api::CreateVolume = json(body, true)?;
    let (v, made) = blocking(move || e.create_volume(req)).await?;
    let status = if made {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(v)))
}

#[utoipa::path(get, path = "/v1/volumes/{name}", params(("name" = String, Path)),
    responses((status = 200, body = api::Volume), (status = 404, body = api::ErrorBody)))]
pub async fn get_volume(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<api::Volume>> {
    let name = path(p)?;
    Ok(Json(blocking(move || e.volumes().get(&name)).await?))
}

#[utoipa::path(delete, path = "/v1/volumes/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn delete_volume(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let name = path(p)?;
    blocking(move || e.delete_volume(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    #[serde(default)]
    path: String,
    #[serde(default)]
    recursive: bool,
}

#[utoipa::path(get, path = "/v1/volumes/{name}/files",
    params(("name" = String, Path), ("path" = Option<String>, Query), ("recursive" = Option<bool>, Query)),
    responses((status = 200, body = api::VolumeListing), (status = 404, body = api::ErrorBody)))]
pub async fn list_files(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> ApiResult<Json<api::VolumeListing>> {
    let (name, q) = (path(p)?, query(q)?);
    let entries = blocking(move || e.volumes().listdir(&name, &q.path, q.recursive)).await?;
    Ok(Json(api::VolumeListing { entries }))
}

#[utoipa::path(get, path = "/v1/volumes/{name}/file",
    params(("name" = String, Path), ("path" = String, Query)),
    responses((status = 200, description = "the file's bytes, streamed", content_type = "application/octet-stream"),
              (status = 404, body = api::ErrorBody)))]
pub async fn read_file(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let (name, q) = (path(p)?, query(q)?);
    let file = blocking(move || e.volumes().open_file(&name, &q.path)).await?;
    let len = file.metadata().map(|m| m.len()).ok();
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    let mut r = Body::from_stream(stream).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, len.into());
    }
    Ok(r)
}

#[utoipa::path(put, path = "/v1/volumes/{name}/file",
    params(("name" = String, Path), ("path" = String, Query)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204, description = "written and fsynced; replaced atomically"),
              (status = 507, body = api::ErrorBody)))]
pub async fn write_file(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<FileQuery>, QueryRejection>,
    body: Body,
) -> ApiResult<StatusCode> {
    let (name, q) = (path(p)?, query(q)?);
    let mut up = blocking(move || e.volumes().upload(&name, &q.path)).await?;
    // Streamed: no size limit but the volume's quota (or the host disk).
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("upload broken: {e}")))?;
        if let Err(err) = tokio::task::block_in_place(|| up.write(&chunk)) {
            // Read the rest (discarding it) so the client, still sending,
            // gets the answer rather than a reset connection.
            drop(up);
            while let Some(Ok(_)) = stream.next().await {}
            return Err(err.into());
        }
    }
    blocking(move || up.commit()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/volumes/{name}/file",
    params(("name" = String, Path), ("path" = String, Query), ("recursive" = Option<bool>, Query)),
    responses((status = 204), (status = 404, body = api::ErrorBody)))]
pub async fn remove_file(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let (name, q) = (path(p)?, query(q)?);
    blocking(move || e.volumes().remove_path(&name, &q.path, q.recursive)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/v1/volumes/{name}/dir",
    params(("name" = String, Path), ("path" = String, Query)),
    responses((status = 204, description = "the directory and its parents exist")))]
pub async fn make_dir(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let (name, q) = (path(p)?, query(q)?);
    blocking(move || e.volumes().mkdir(&name, &q.path)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/secrets", responses((status = 200, body = api::SecretList)))]
pub async fn list_secrets(State(e): Eng) -> ApiResult<Json<api::SecretList>> {
    let secrets = blocking(move || e.secrets().list()).await?;
    Ok(Json(api::SecretList { secrets }))
}

#[utoipa::path(post, path = "/v1/secrets", request_body = api::CreateSecret,
    responses((status = 201, body = api::SecretInfo), (status = 409, body = api::ErrorBody)))]
pub async fn create_secret(
    State(e): Eng,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<api::SecretInfo>)> {
    let req: api::CreateSecret = json(body, false)?;
    let info = blocking(move || e.secrets().create(req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(get, path = "/v1/secrets/{name}", params(("name" = String, Path)),
    responses((status = 200, body = api::SecretInfo), (status = 404, body = api::ErrorBody)))]
pub async fn get_secret(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<api::SecretInfo>> {
    let name = path(p)?;
    Ok(Json(blocking(move || e.secrets().info(&name)).await?))
}

#[utoipa::path(delete, path = "/v1/secrets/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = api::ErrorBody)))]
pub async fn delete_secret(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let name = path(p)?;
    blocking(move || e.secrets().delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}
