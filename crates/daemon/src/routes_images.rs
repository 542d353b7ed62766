//! Handlers for images: uploads for `add_files`, builds and pulls streamed
//! as NDJSON events, listing, removal and garbage collection.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use gworker_api::{self as api};
use gworker_engine::Engine;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::routes_store::{blocking, json, path};

type Eng = State<Arc<Engine>>;
type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<Arc<Engine>> {
    Router::new()
        .route("/v1/images", get(list_images))
        .route("/v1/images/build", post(build_image))
        .route("/v1/images/pull", post(pull_image))
        .route("/v1/images/blobs", post(upload_blob))
        .route("/v1/images/gc", post(gc_images))
        .route("/v1/images/{name}", get(get_image).delete(delete_image))
}

/// Streams build events as NDJSON until the last one (`done` or `error`).
fn event_stream(rx: mpsc::UnboundedReceiver<api::BuildEvent>) -> Response {
    let stream = tokio_stream_from(rx).map(|ev| {
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::io::Error>(Bytes::from(line))
    });
    let mut r = Body::from_stream(stream).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[utoipa::path(post, path = "/v1/images/build", request_body = api::BuildImage,
    responses((status = 200, description = "one BuildEvent per line; the last is `done` or `error`",
               content_type = "application/x-ndjson", body = api::BuildEvent),
              (status = 400, body = api::ErrorBody), (status = 404, body = api::ErrorBody)))]
pub async fn build_image(
    State(e): Eng,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: api::BuildImage = json(body, true)?;
    let (spec, tag) = (req.spec, req.tag);
    let (e2, s2, t2) = (e.clone(), spec.clone(), tag.clone());
    blocking(move || e2.check_build(&s2, t2.as_deref())).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move { e.build_image(spec, tag, false, tx).await });
    Ok(event_stream(rx))
}

#[utoipa::path(post, path = "/v1/images/pull", request_body = api::PullImage,
    responses((status = 200, description = "one BuildEvent per line; the last is `done` or `error`",
               content_type = "application/x-ndjson", body = api::BuildEvent),
              (status = 400, body = api::ErrorBody)))]
pub async fn pull_image(State(e): Eng, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let req: api::PullImage = json(body, true)?;
    let spec = api::ImageSpec {
        base: api::ImageBase::Registry {
            reference: req.reference,
            secret: req.secret,
        },
        steps: vec![],
    };
    let (e2, s2, t2) = (e.clone(), spec.clone(), req.tag.clone());
    blocking(move || e2.check_build(&s2, t2.as_deref())).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let tag = req.tag;
    tokio::spawn(async move { e.build_image(spec, tag, true, tx).await });
    Ok(event_stream(rx))
}

#[derive(Debug, Deserialize)]
pub struct BlobQuery {
    #[serde(default)]
    digest: Option<String>,
}

#[utoipa::path(post, path = "/v1/images/blobs",
    params(("digest" = Option<String>, Query, description = "sha256:<hex> the upload must hash to")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "a tar"),
    responses((status = 201, body = api::BlobInfo), (status = 400, body = api::ErrorBody)))]
pub async fn upload_blob(
    State(e): Eng,
    q: Result<Query<BlobQuery>, QueryRejection>,
    body: Body,
) -> ApiResult<(StatusCode, Json<api::BlobInfo>)> {
    let q = q
        .map(|Query(v)| v)
        .map_err(|e| ApiError::invalid(format!("bad query: {e}")))?;
    // Streamed to disk: no size limit but the host disk.
    let stream = body
        .into_data_stream()
        .map(|r| r.map_err(std::io::Error::other));
    let reader = tokio_util::io::StreamReader::new(stream);
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    let info = blocking(move || e.put_blob(bridge, q.digest.as_deref())).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = api::ImageList)))]
pub async fn list_images(State(e): Eng) -> ApiResult<Json<api::ImageList>> {
    Ok(Json(blocking(move || e.list_images()).await?))
}

#[utoipa::path(get, path = "/v1/images/{name}", params(("name" = String, Path)),
    responses((status = 200, body = api::ImageInfo), (status = 404, body = api::ErrorBody)))]
pub async fn get_image(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<api::ImageInfo>> {
    let name = path(p)?;
    Ok(Json(blocking(move || e.image_info(&name)).await?))
}

#[utoipa::path(delete, path = "/v1/images/{name}", params(("name" = String, Path)),
    responses((status = 204, description = "a tag: the tag is gone; an ID: the image and its tags (layers stay until gc)"),
              (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody)))]
pub async fn delete_image(
    State(e): Eng,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let name = path(p)?;
    blocking(move || e.remove_image(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/images/gc", responses((status = 200, body = api::GcResult)))]
pub async fn gc_images(State(e): Eng) -> ApiResult<Json<api::GcResult>> {
    Ok(Json(blocking(move || e.gc_images()).await?))
}
