//! Wire types for images: a description (a base plus ordered steps) that the
//! daemon builds into content-addressed layers. See `docs/images.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ErrorDetail;

/// Python versions `debian_slim` offers, each with the Debian release that ships it.
pub const DEBIAN_PYTHON_VERSIONS: &[(&str, &str)] = &[("3.11", "bookworm"), ("3.13", "trixie")];

/// Where an image starts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageBase {
    /// An image the daemon knows by name: `busybox`, `debian-slim`, a tag a
    /// user gave a built image, or an image ID (`im-...`).
    Name(String),
    /// Debian minbase with Python and pip. `python_version` picks the Debian
    /// release (3.11: bookworm, the default; 3.13: trixie).
    DebianSlim {
        #[serde(default)]
        python_version: Option<String>,
    },
    /// An image in an OCI / Docker v2 registry, e.g. `python:3.12-slim` or
    /// `127.0.0.1:5000/team/tool@sha256:...`. `secret` names a stored secret
    /// holding `REGISTRY_USERNAME` and `REGISTRY_PASSWORD`.
    Registry {
        reference: String,
        #[serde(default)]
        secret: Option<String>,
    },
}

/// One build step; each yields one layer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageStep {
    /// `apt-get install` these Debian packages (with network, for the build only).
    AptInstall(Vec<String>),
    /// `pip install` these packages (with network, for the build only).
    PipInstall(Vec<String>),
    /// Run these shell commands in order with `/bin/sh -c` (no network).
    RunCommands(Vec<String>),
    /// Set environment variables for the image's processes.
    Env(BTreeMap<String, String>),
    /// Set the default working directory (created if missing).
    Workdir(String),
    /// Unpack a tar uploaded with `POST /v1/images/blobs` at `dest`
    /// (an absolute path). Clients send local files and directories this way.
    AddFiles { blob: String, dest: String },
}

/// What an image is made of.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    pub base: ImageBase,
    #[serde(default)]
    pub steps: Vec<ImageStep>,
}

/// Body of `POST /v1/images/build`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildImage {
    pub spec: ImageSpec,
    /// Also give the image this name (for `Image.from_name` and `image` in create).
    #[serde(default)]
    pub tag: Option<String>,
}

/// Body of `POST /v1/images/pull`: fetch (again) a registry image, even if cached.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    pub reference: String,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub tag: Option<String>,
}

/// A built image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ImageInfo {
    /// `im-` and 24 hex digits of the content hash of its base and steps; or
    /// the name of a built-in image.
    pub image_id: String,
    pub tags: Vec<String>,
    /// Layers, bottom first (layer keys; a built-in base is `builtin:NAME`).
    pub layers: Vec<String>,
    pub size_bytes: u64,
    pub created_at: f64,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// The description it was built from (null for built-in images).
    pub spec: Option<ImageSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
}

/// One line of a build's (or pull's) `application/x-ndjson` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BuildEvent {
    /// A step begins (`cached`: its layer exists and nothing runs).
    Step {
        index: usize,
        total: usize,
        description: String,
        cached: bool,
    },
    /// A line of output from a step's command, or of progress.
    Log { line: String },
    /// Bytes of a layer being downloaded.
    Progress {
        layer: String,
        bytes: u64,
        total: Option<u64>,
    },
    /// The build finished; always the last event of a successful build.
    Done { image: ImageInfo, seconds: f64 },
    /// The build failed; always the last event of a failed one. Nothing of
    /// the failed step is kept.
    Error {
        error: ErrorDetail,
        /// The failing step's exit code and last lines of output, if a command failed.
        #[serde(default)]
        exit_code: Option<i32>,
        #[serde(default)]
        output: Option<String>,
    },
}

/// Reply of `POST /v1/images/blobs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BlobInfo {
    /// `sha256:<hex>` of the uploaded bytes.
    pub digest: String,
    pub size_bytes: u64,
}

/// Reply of `POST /v1/images/gc`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GcResult {
    pub removed_layers: usize,
    pub removed_blobs: usize,
    pub freed_bytes: u64,
}

impl ImageStep {
    /// A one-line description for progress output.
    pub fn describe(&self) -> String {
        match self {
            ImageStep::AptInstall(p) => format!("apt_install {}", p.join(" ")),
            ImageStep::PipInstall(p) => format!("pip_install {}", p.join(" ")),
            ImageStep::RunCommands(c) => format!("run_commands {}", c.join(" && ")),
            ImageStep::Env(e) => format!("env {}", e.keys().cloned().collect::<Vec<_>>().join(" ")),
            ImageStep::Workdir(w) => format!("workdir {w}"),
            ImageStep::AddFiles { blob, dest } => {
                format!("add_files {} -> {dest}", &blob[..blob.len().min(19)])
            }
        }
    }
}
