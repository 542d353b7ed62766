//! The OpenAPI 3 document, generated from the handlers and wire types. It is
//! served at `/v1/openapi.json` and committed as `docs/openapi.json`; a test
//! fails when the two differ.

use utoipa::OpenApi;

use crate::{routes, routes_images, routes_store};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gworker",
        description = "Self-hosted gVisor sandboxes. See docs/http-api.md."
    ),
    paths(
        routes::health,
        routes::create,
        routes::list,
        routes::get_sandbox,
        routes::terminate,
        routes::wait_sandbox,
        routes::exec,
        routes::snapshot,
        routes::processes,
        routes::process,
        routes::wait_process,
        routes::stdout,
        routes::stderr,
        routes::stdin,
        routes::stdin_close,
        routes::signal,
        routes::list_snapshots,
        routes::get_snapshot,
        routes::delete_snapshot,
        routes_store::list_volumes,
        routes_store::create_volume,
        routes_store::get_volume,
        routes_store::delete_volume,
        routes_store::list_files,
        routes_store::read_file,
        routes_store::write_file,
        routes_store::remove_file,
        routes_store::make_dir,
        routes_store::list_secrets,
        routes_store::create_secret,
        routes_store::get_secret,
        routes_store::delete_secret,
        routes_images::list_images,
        routes_images::build_image,
        routes_images::pull_image,
        routes_images::upload_blob,
        routes_images::get_image,
        routes_images::delete_image,
        routes_images::gc_images
    ),
    components(schemas(
        gworker_api::CreateSandbox,
        gworker_api::Sandbox,
        gworker_api::SandboxList,
        gworker_api::SandboxState,
        gworker_api::Exec,
        gworker_api::Process,
        gworker_api::ProcessList,
        gworker_api::ProcessState,
        gworker_api::WaitResult,
        gworker_api::Signal,
        gworker_api::Health,
        gworker_api::PoolImage,
        gworker_api::ErrorBody,
        gworker_api::ErrorDetail,
        gworker_api::ErrorCode,
        gworker_api::Snapshot,
        gworker_api::SnapshotList,
        gworker_api::SnapshotRef,
        gworker_api::SecretRef,
        gworker_api::VolumeRef,
        gworker_api::CreateVolume,
        gworker_api::Volume,
        gworker_api::VolumeList,
        gworker_api::VolumeEntry,
        gworker_api::EntryKind,
        gworker_api::VolumeListing,
        gworker_api::CreateSecret,
        gworker_api::SecretInfo,
        gworker_api::SecretList,
        gworker_api::ImageBase,
        gworker_api::ImageStep,
        gworker_api::ImageSpec,
        gworker_api::BuildImage,
        gworker_api::PullImage,
        gworker_api::ImageInfo,
        gworker_api::ImageList,
        gworker_api::BuildEvent,
        gworker_api::BlobInfo,
        gworker_api::GcResult
    ))
)]
struct ApiDoc;

/// The document as pretty JSON with a trailing newline.
pub fn openapi_json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .expect("openapi serializes");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_openapi_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let current = super::openapi_json();
        if committed != current {
            if std::env::var_os("GWORKER_UPDATE_OPENAPI").is_some() {
                std::fs::write(path, current).unwrap();
                return;
            }
            panic!("docs/openapi.json is stale: run `GWORKER_UPDATE_OPENAPI=1 cargo test -p gworker-daemon openapi`");
        }
    }
}
