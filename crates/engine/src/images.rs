//! Images built from descriptions: the engine's side (credentials, which
//! images are in use, events to the API). The image store does the work.

use std::sync::Arc;
use std::time::Instant;

use gworker_api::{self as api, BuildEvent, ErrorCode, ImageBase};
use gworker_images::{BuildFailure, BuildOptions};
use tokio::sync::mpsc;

use crate::{Engine, EngineError, Result};

impl From<BuildFailure> for EngineError {
    fn from(f: BuildFailure) -> Self {
        EngineError::Coded {
            code: f.code,
            message: f.message,
        }
    }
}

fn failure_event(f: BuildFailure) -> BuildEvent {
    BuildEvent::Error {
        error: api::ErrorDetail {
            code: f.code,
            message: f.message,
        },
        exit_code: f.exit_code,
        output: f.output,
    }
}

impl Engine {
    /// Checks a build request before any work starts, so a bad one gets a
    /// plain 4xx instead of a stream.
    pub fn check_build(&self, spec: &api::ImageSpec, tag: Option<&str>) -> Result<()> {
        gworker_images::validate_spec(spec)?;
        if let ImageBase::Registry {
            secret: Some(s), ..
        } = &spec.base
        {
            self.registry_credentials(s)?;
        }
        for s in &spec.steps {
            if let api::ImageStep::AddFiles { blob, .. } = s {
                if !self.images.has_blob(blob) {
                    return Err(EngineError::Invalid(format!(
                        "blob {blob} was not uploaded; POST it to /v1/images/blobs first"
                    )));
                }
            }
        }
        if let Some(t) = tag {
            gworker_images::check_tag(t)?;
        }
        Ok(())
    }

    fn registry_credentials(&self, secret: &str) -> Result<(String, String)> {
        let env = self.secrets.resolve(&[api::SecretRef {
            name: Some(secret.to_string()),
            values: None,
        }])?;
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        match (get("REGISTRY_USERNAME"), get("REGISTRY_PASSWORD")) {
            (Some(u), Some(p)) => Ok((u, p)),
            _ => Err(EngineError::Invalid(format!(
                "secret {secret:?} must hold REGISTRY_USERNAME and REGISTRY_PASSWORD to log in to a registry"
            ))),
        }
    }

    /// Builds `spec` (or finds it built), sending progress to `events`; the
    /// last event is `done` or `error`.
    pub async fn build_image(
        self: &Arc<Self>,
        spec: api::ImageSpec,
        tag: Option<String>,
        force_pull: bool,
        events: mpsc::UnboundedSender<BuildEvent>,
    ) {
        let engine = self.clone();
        let start = Instant::now();
        let tx = events.clone();
        let res = tokio::task::spawn_blocking(move || {
            let credentials =
                match &spec.base {
                    ImageBase::Registry {
                        secret: Some(s), ..
                    } => Some(engine.registry_credentials(s).map_err(|e| {
                        BuildFailure::new(ErrorCode::InvalidRequest, e.to_string())
                    })?),
                    _ => None,
                };
            let mut send = |e: BuildEvent| {
                let _ = tx.send(e);
            };
            let mut opts = BuildOptions {
                runsc: engine.cfg.runsc_bin.clone(),
                credentials,
                insecure_registries: engine.cfg.insecure_registries.clone(),
                force_pull,
                events: &mut send,
            };
            engine.images.build(&spec, tag.as_deref(), &mut opts)
        })
        .await;
        let last = match res {
            Ok(Ok(image)) => BuildEvent::Done {
                image,
                seconds: start.elapsed().as_secs_f64(),
            },
            Ok(Err(f)) => failure_event(f),
            Err(e) => failure_event(BuildFailure::new(
                ErrorCode::Internal,
                format!("the build task failed: {e}"),
            )),
        };
        let _ = events.send(last);
    }

    pub fn put_blob(
        &self,
        body: impl std::io::Read,
        digest: Option<&str>,
    ) -> Result<api::BlobInfo> {
        let (digest, size_bytes) = self.images.put_blob(body, digest)?;
        Ok(api::BlobInfo { digest, size_bytes })
    }

    pub fn list_images(&self) -> Result<api::ImageList> {
        let images = self
            .images
            .list_all()
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        Ok(api::ImageList { images })
    }

    pub fn image_info(&self, name: &str) -> Result<api::ImageInfo> {
        self.images
            .describe(name)
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .ok_or_else(|| EngineError::NotFound(format!("no image named {name:?}")))
    }

    /// Removes a tag, or an image no live sandbox uses.
    pub fn remove_image(&self, name: &str) -> Result<()> {
        let rows = self.reg.list_sandboxes()?;
        let in_use = |id: &str| rows.iter().any(|r| r.state != "exited" && r.image == id);
        if self.images.remove_named(name, &in_use)? {
            Ok(())
        } else {
            Err(EngineError::NotFound(format!("no image named {name:?}")))
        }
    }

    pub fn gc_images(&self) -> Result<api::GcResult> {
        self.images
            .gc()
            .map_err(|e| EngineError::Internal(e.to_string()))
    }
}
