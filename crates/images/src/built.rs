//! Images built from a description ([`api::ImageSpec`]): a base plus ordered
//! steps, each step one content-addressed layer, stacked with the host
//! kernel's overlayfs.
//!
//! ```text
//! <root>/layers/<key>/diff        a layer in overlayfs format (whiteouts are 0:0 char devices)
//! <root>/layers/<key>/layer.json  its metadata and the image config after it
//! <root>/layers/.tmp-*            a layer being made (removed at start if left by a crash)
//! <root>/built/<id>.json          an image: its description and its layers, bottom first
//! <root>/mnt/<id>/                the image's root filesystem: a read-only overlay mount
//! <root>/tags.json                tag -> image ID
//! <root>/blobs/<hex>              tars uploaded by clients for `add_files`
//! <root>/refs/<hash>.json         registry reference -> the manifest last pulled for it
//! <root>/.runsc/                  runsc state of build sandboxes
//! ```
//!
//! Invariants:
//! - A layer's key is a hash of its parent's key and its step (a chain
//!   hash), or the digest of a registry blob; a layer directory under its key
//!   is complete and never changes. So an unchanged chain is found by key and
//!   costs nothing, and a failed step leaves nothing under its key.
//! - An image ID is the hash of the resolved base and the steps, so the same
//!   description is the same image.
//! - Sandboxes never copy an image: its root filesystem is one overlay mount,
//!   shared read-only by every sandbox (runsc keeps their writes in memory).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use gworker_api::{self as api, BuildEvent, ImageBase, ImageSpec, ImageStep};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{fsutil, step, ImageError, ImageInfo, ImageStore, RemoveOnDrop, UNIQUE};

/// The environment, workdir and user an image's processes start with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

impl ImageConfig {
    pub(crate) fn set_env(&mut self, key: &str, value: &str) {
        if let Some(slot) = self.env.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value.to_string();
        } else {
            self.env.push((key.to_string(), value.to_string()));
        }
    }
}

/// `layer.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LayerMeta {
    pub key: String,
    pub parent: Option<String>,
    pub description: String,
    pub size_bytes: u64,
    pub created_at: f64,
    /// The image config after this layer.
    pub config: ImageConfig,
}

/// `built/<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub id: String,
    pub spec: ImageSpec,
    /// Bottom first: `builtin:NAME` or a layer key.
    pub lowers: Vec<String>,
    pub config: ImageConfig,
    pub size_bytes: u64,
    pub created_at: f64,
    pub build_seconds: f64,
}

/// `refs/<hash>.json`: what a registry reference resolved to when pulled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RefRecord {
    pub reference: String,
    pub manifest_digest: String,
    pub layers: Vec<String>,
    pub config: ImageConfig,
    pub pulled_at: f64,
}

/// What a build needs from its caller.
pub struct BuildOptions<'a> {
    /// The runsc binary that runs build steps.
    pub runsc: PathBuf,
    /// Registry credentials (user, password), from the base's secret.
    pub credentials: Option<(String, String)>,
    /// Registries (host[:port]) reachable over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Pull registry bases even if a pull of the same reference is cached.
    pub force_pull: bool,
    pub events: &'a mut dyn FnMut(BuildEvent),
}

/// A build failure, with what the client shows.
#[derive(Debug)]
pub struct BuildFailure {
    pub code: api::ErrorCode,
    pub message: String,
    pub exit_code: Option<i32>,
    pub output: Option<String>,
}

impl BuildFailure {
    pub fn new(code: api::ErrorCode, message: impl Into<String>) -> Self {
        BuildFailure {
            code,
            message: message.into(),
            exit_code: None,
            output: None,
        }
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(api::ErrorCode::InvalidRequest, message)
    }
}

impl From<ImageError> for BuildFailure {
    fn from(e: ImageError) -> Self {
        let code = match &e {
            ImageError::Unknown(_) => api::ErrorCode::NotFound,
            ImageError::Build { .. } => api::ErrorCode::ImageBuildFailed,
            ImageError::Registry(_) => api::ErrorCode::RegistryFailed,
            _ => api::ErrorCode::Internal,
        };
        BuildFailure::new(code, e.to_string())
    }
}

impl From<io::Error> for BuildFailure {
    fn from(e: io::Error) -> Self {
        let code = if e.raw_os_error() == Some(libc_enospc()) {
            api::ErrorCode::NoSpace
        } else {
            api::ErrorCode::Internal
        };
        BuildFailure::new(code, format!("image store i/o error: {e}"))
    }
}

fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}

pub(crate) fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// Checks what can be checked before anything runs: names, paths, versions.
pub fn validate_spec(spec: &ImageSpec) -> Result<(), BuildFailure> {
    match &spec.base {
        ImageBase::Name(n) if n.is_empty() => {
            return Err(BuildFailure::invalid("the base image name is empty"))
        }
        ImageBase::DebianSlim {
            python_version: Some(v),
        } if !api::DEBIAN_PYTHON_VERSIONS.iter().any(|(p, _)| p == v) => {
            return Err(BuildFailure::invalid(format!(
                "python_version {v:?} is not available in debian_slim; supported: {}",
                api::DEBIAN_PYTHON_VERSIONS
                    .iter()
                    .map(|(p, s)| format!("{p} (Debian {s})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
        ImageBase::Registry { reference, .. } => {
            if let Err(e) = crate::registry::Reference::parse(reference) {
                return Err(BuildFailure::invalid(e.to_string()));
            }
        }
        _ => {}
    }
    for (i, s) in spec.steps.iter().enumerate() {
        let n = i + 1;
        match s {
            ImageStep::AptInstall(p) | ImageStep::PipInstall(p) => {
                if p.is_empty() {
                    return Err(BuildFailure::invalid(format!(
                        "step {n}: no packages given"
                    )));
                }
                for pkg in p {
                    if pkg.is_empty() || pkg.starts_with('-') || pkg.contains(['\0', '\n']) {
                        return Err(BuildFailure::invalid(format!(
                            "step {n}: {pkg:?} is not a package name (options are not allowed)"
                        )));
                    }
                }
            }
            ImageStep::RunCommands(c) => {
                if c.is_empty() {
                    return Err(BuildFailure::invalid(format!(
                        "step {n}: no commands given"
                    )));
                }
                if c.iter().any(|c| c.contains('\0')) {
                    return Err(BuildFailure::invalid(format!(
                        "step {n}: a command contains a NUL byte"
                    )));
                }
            }
            ImageStep::Env(e) => {
                for (k, v) in e {
                    if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                        return Err(BuildFailure::invalid(format!(
                            "step {n}: bad environment variable {k:?}"
                        )));
                    }
                }
            }
            ImageStep::Workdir(w) => check_abs_path(n, "workdir", w)?,
            ImageStep::AddFiles { blob, dest } => {
                check_abs_path(n, "destination", dest)?;
                blob_hex(blob).ok_or_else(|| {
                    BuildFailure::invalid(format!(
                        "step {n}: blob {blob:?} is not a sha256:<64 hex> digest"
                    ))
                })?;
            }
        }
    }
    Ok(())
}

fn check_abs_path(n: usize, what: &str, p: &str) -> Result<(), BuildFailure> {
    let path = Path::new(p);
    if !path.is_absolute() || p.contains('\0') {
        return Err(BuildFailure::invalid(format!(
            "step {n}: the {what} must be an absolute path, got {p:?}"
        )));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(BuildFailure::invalid(format!(
            "step {n}: the {what} {p:?} contains `..`, which could escape the image"
        )));
    }
    Ok(())
}

/// The hex of a `sha256:<hex>` digest, if it is one.
pub(crate) fn blob_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(hex)
}

/// The resolved start of a build: the lowers it brings and its config.
struct Base {
    /// What the image ID and the first step's key hash.
    identity: String,
    lowers: Vec<String>,
    config: ImageConfig,
}

impl ImageStore {
    fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }
    pub(crate) fn layer_dir(&self, key: &str) -> PathBuf {
        self.layers_dir().join(key)
    }
    fn record_path(&self, id: &str) -> PathBuf {
        self.root.join("built").join(format!("{id}.json"))
    }
    fn mount_dir(&self, id: &str) -> PathBuf {
        self.root.join("mnt").join(id)
    }
    /// Upper directory of an image's shared mount: mount points only.
    fn scratch_dir(&self, id: &str) -> PathBuf {
        self.root.join("mnt").join(format!(".{id}.scratch"))
    }
    fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs").join(hex)
    }
    /// Network state of build steps (see `gworker_runtime::net`).
    pub(crate) fn net_state_dir(&self) -> PathBuf {
        self.root.join(".net")
    }
    pub(crate) fn runsc_state_dir(&self) -> PathBuf {
        self.root.join(".runsc")
    }

    /// The directory a lower stands for.
    fn lower_path(&self, lower: &str) -> PathBuf {
        match lower.strip_prefix("builtin:") {
            Some(name) => self.image_dir(name).join("rootfs"),
            None => self.layer_dir(lower).join("diff"),
        }
    }

    fn read_record(&self, id: &str) -> Result<Option<Record>, ImageError> {
        if !is_image_id(id) {
            return Ok(None);
        }
        let path = self.record_path(id);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ImageError::Metadata {
                    image: id.to_string(),
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// IDs of the images built from descriptions (those with a record).
    fn record_ids(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.root.join("built")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json")
                    .filter(|id| is_image_id(id))
                    .map(str::to_string)
            })
            .collect()
    }

    pub(crate) fn read_layer(&self, key: &str) -> Option<LayerMeta> {
        let b = fs::read(self.layer_dir(key).join("layer.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    fn tags(&self) -> BTreeMap<String, String> {
        fs::read(self.root.join("tags.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write_tags(&self, tags: &BTreeMap<String, String>) -> Result<(), ImageError> {
        write_atomic(
            &self.root.join("tags.json"),
            &serde_json::to_vec_pretty(tags).map_err(io::Error::other)?,
        )?;
        Ok(())
    }

    /// Gives image `id` the name `tag` (moving the tag if it named another image).
    pub fn tag(&self, id: &str, tag: &str) -> Result<(), BuildFailure> {
        check_tag(tag)?;
        let _lock = self.lock("tags", &mut |_| {})?;
        let mut tags = self.tags();
        tags.insert(tag.to_string(), id.to_string());
        self.write_tags(&tags)?;
        Ok(())
    }

    /// The image ID (or built-in name) `name` stands for: a built-in name,
    /// an image ID, or a tag. `None` if it is none of these.
    pub fn resolve(&self, name: &str) -> Result<Option<String>, ImageError> {
        if Self::is_known(name) {
            return Ok(Some(name.to_string()));
        }
        if is_image_id(name) {
            return Ok(self.read_record(name)?.map(|r| r.id));
        }
        Ok(self.tags().get(name).cloned())
    }

    /// A built (non-built-in) image, with its root filesystem mounted.
    pub(crate) fn built_ready(&self, name: &str) -> Result<Option<ImageInfo>, ImageError> {
        let Some(id) = self.resolve(name)? else {
            return Ok(None);
        };
        if Self::is_known(&id) {
            // A tag of a built-in.
            return self.ready(&id);
        }
        let Some(rec) = self.read_record(&id)? else {
            return Ok(None);
        };
        let rootfs = self.mount_record(&rec)?;
        let user_ids = match &rec.config.user {
            Some(u) => Some(
                resolve_user(&rootfs, u).map_err(|reason| ImageError::Build {
                    image: rec.id.clone(),
                    reason,
                })?,
            ),
            None => None,
        };
        Ok(Some(ImageInfo {
            name: rec.id.clone(),
            rootfs,
            size_bytes: rec.size_bytes,
            built_at: UNIX_EPOCH + std::time::Duration::from_secs_f64(rec.created_at),
            env: rec.config.env.clone(),
            workdir: rec.config.workdir.clone(),
            user: rec.config.user.clone(),
            user_ids,
        }))
    }

    /// The image's lowers that hold files, top first (overlayfs order).
    pub(crate) fn overlay_lowers(&self, lowers: &[String]) -> Vec<PathBuf> {
        lowers
            .iter()
            .rev()
            .map(|l| self.lower_path(l))
            .filter(|p| !dir_is_empty(p))
            .collect()
    }

    /// Mounts the image's layers read-only at `mnt/<id>` unless mounted; a
    /// single layer is used as it is.
    fn mount_record(&self, rec: &Record) -> Result<PathBuf, ImageError> {
        let lowers = self.overlay_lowers(&rec.lowers);
        match lowers.len() {
            0 => Err(ImageError::Build {
                image: rec.id.clone(),
                reason: "the image has no files".into(),
            }),
            _ => {
                let target = self.mount_dir(&rec.id);
                if fsutil::mounts_under(&target).contains(&target) {
                    return Ok(target);
                }
                let _lock = self.lock(&format!("mount-{}", rec.id), &mut |_| {})?;
                if fsutil::mounts_under(&target).contains(&target) {
                    return Ok(target);
                }
                fs::create_dir_all(&target)?;
                // runsc's gofer creates mount points (the agent's, volumes')
                // in the root filesystem, so the mount has an upper directory
                // of its own; sandboxes' writes stay in their memory overlay.
                let scratch = self.scratch_dir(&rec.id);
                fs::create_dir_all(scratch.join("upper"))?;
                fs::create_dir_all(scratch.join("work"))?;
                mount_overlay(
                    &target,
                    &lowers,
                    Some((&scratch.join("upper"), &scratch.join("work"))),
                )
                .map_err(|e| ImageError::Build {
                    image: rec.id.clone(),
                    reason: format!("cannot mount its layers at {}: {e}", target.display()),
                })?;
                Ok(target)
            }
        }
    }

    /// Stores an uploaded tar; returns its digest and size. With `expected`,
    /// the content must hash to it.
    pub fn put_blob(
        &self,
        mut body: impl Read,
        expected: Option<&str>,
    ) -> Result<(String, u64), BuildFailure> {
        if let Some(e) = expected {
            if blob_hex(e).is_none() {
                return Err(BuildFailure::invalid(format!(
                    "digest {e:?} is not sha256:<64 lowercase hex>"
                )));
            }
        }
        let dir = self.root.join("blobs");
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        let mut guard = RemoveOnDrop(Some(tmp.clone()));
        let mut f = fs::File::create(&tmp)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = body.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            f.write_all(&buf[..n])?;
            size += n as u64;
        }
        f.sync_all()?;
        let digest = format!("sha256:{}", hex::encode(h.finalize()));
        if let Some(e) = expected {
            if e != digest {
                return Err(BuildFailure::invalid(format!(
                    "the upload's digest is {digest}, not the {e} given"
                )));
            }
        }
        fs::rename(&tmp, self.blob_path(&digest[7..]))?;
        guard.0 = None;
        Ok((digest, size))
    }

    /// Builds the image `spec` describes unless it is built; tags it with
    /// `tag`. Blocking: run it from `spawn_blocking`.
    pub fn build(
        &self,
        spec: &ImageSpec,
        tag: Option<&str>,
        opts: &mut BuildOptions<'_>,
    ) -> Result<api::ImageInfo, BuildFailure> {
        validate_spec(spec)?;
        if let Some(t) = tag {
            check_tag(t)?;
        }
        let _gc = self.gc_lock(false)?;
        fs::create_dir_all(self.layers_dir())?;
        let total = spec.steps.len() + 1;
        (opts.events)(BuildEvent::Step {
            index: 1,
            total,
            description: describe_base(&spec.base),
            cached: self.base_cached(&spec.base, opts.force_pull),
        });
        let base = self.resolve_base(&spec.base, opts)?;
        // A built-in with no steps is the built-in itself.
        if let ([], [only]) = (spec.steps.as_slice(), base.lowers.as_slice()) {
            if let Some(name) = only.strip_prefix("builtin:") {
                if let Some(t) = tag {
                    self.tag(name, t)?;
                }
                return self.describe(name)?.ok_or_else(|| {
                    BuildFailure::new(api::ErrorCode::Internal, format!("{name} vanished"))
                });
            }
        }
        let mut key = base.identity.clone();
        let mut lowers = base.lowers.clone();
        let mut config = base.config.clone();
        for (i, s) in spec.steps.iter().enumerate() {
            let canonical = serde_json::to_vec(s).map_err(io::Error::other)?;
            let step_key = sha256_hex(&[b"gworker-step-v1", key.as_bytes(), &canonical]);
            let cached = self.read_layer(&step_key);
            (opts.events)(BuildEvent::Step {
                index: i + 2,
                total,
                description: s.describe(),
                cached: cached.is_some(),
            });
            let meta = match cached {
                Some(m) => m,
                None => step::run(self, &step_key, &key, &lowers, &config, s, opts)?,
            };
            config = meta.config.clone();
            lowers.push(step_key.clone());
            key = step_key;
        }
        let id = format!(
            "im-{}",
            &sha256_hex(&[
                b"gworker-image-v1",
                base.identity.as_bytes(),
                key.as_bytes()
            ])[..24]
        );
        let rec = match self.read_record(&id)? {
            Some(r) => r,
            None => {
                let size_bytes = lowers
                    .iter()
                    .map(|l| match l.strip_prefix("builtin:") {
                        Some(name) => self
                            .ready(name)
                            .ok()
                            .flatten()
                            .map(|i| i.size_bytes)
                            .unwrap_or(0),
                        None => self.read_layer(l).map(|m| m.size_bytes).unwrap_or_else(|| {
                            crate::registry::read_layer_meta(&self.layers_dir(), l)
                                .ok()
                                .flatten()
                                .map(|m| m.unpacked_bytes)
                                .unwrap_or(0)
                        }),
                    })
                    .sum();
                let rec = Record {
                    id: id.clone(),
                    spec: spec.clone(),
                    lowers,
                    config,
                    size_bytes,
                    created_at: now_secs(),
                    build_seconds: 0.0,
                };
                fs::create_dir_all(self.root.join("built"))?;
                write_atomic(
                    &self.record_path(&id),
                    &serde_json::to_vec_pretty(&rec).map_err(io::Error::other)?,
                )?;
                rec
            }
        };
        self.mount_record(&rec)?;
        if let Some(t) = tag {
            self.tag(&id, t)?;
        }
        Ok(self.api_info(&rec))
    }

    fn base_cached(&self, base: &ImageBase, force_pull: bool) -> bool {
        match base {
            ImageBase::Name(n) => !Self::is_known(n) || self.ready(n).ok().flatten().is_some(),
            ImageBase::DebianSlim { python_version } => self
                .ready(debian_builtin(python_version.as_deref()))
                .ok()
                .flatten()
                .is_some(),
            ImageBase::Registry { reference, .. } => {
                !force_pull && self.read_ref(reference).is_some()
            }
        }
    }

    fn resolve_base(
        &self,
        base: &ImageBase,
        opts: &mut BuildOptions<'_>,
    ) -> Result<Base, BuildFailure> {
        let builtin = |name: &str, opts: &mut BuildOptions<'_>| -> Result<Base, BuildFailure> {
            let info = self.ensure(name, &mut |line| {
                (opts.events)(BuildEvent::Log {
                    line: line.to_string(),
                })
            })?;
            let stamp = info
                .built_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            Ok(Base {
                identity: format!("builtin:{name}:{stamp}"),
                lowers: vec![format!("builtin:{name}")],
                config: ImageConfig {
                    env: info.env,
                    workdir: None,
                    user: None,
                },
            })
        };
        match base {
            ImageBase::DebianSlim { python_version } => {
                builtin(debian_builtin(python_version.as_deref()), opts)
            }
            ImageBase::Name(n) if Self::is_known(n) => builtin(n, opts),
            ImageBase::Name(n) => {
                let id = self.resolve(n)?.ok_or_else(|| {
                    BuildFailure::new(
                        api::ErrorCode::NotFound,
                        format!(
                            "no image named {n:?}: built-in images are {}; other names must be tags or IDs of built images",
                            crate::BUILTIN_IMAGES.join(", ")
                        ),
                    )
                })?;
                let rec = self.read_record(&id)?.ok_or_else(|| {
                    BuildFailure::new(api::ErrorCode::NotFound, format!("image {id} is gone"))
                })?;
                Ok(Base {
                    identity: format!("image:{}", rec.id),
                    lowers: rec.lowers,
                    config: rec.config,
                })
            }
            ImageBase::Registry { reference, .. } => {
                let r = match self.read_ref(reference) {
                    Some(r) if !opts.force_pull => r,
                    _ => self.pull_ref(reference, opts)?,
                };
                let mut lowers = r.layers.clone();
                let shim = !r.layers.iter().any(|l| {
                    self.layer_dir(l)
                        .join("diff/etc/ld.so.preload")
                        .symlink_metadata()
                        .is_ok()
                });
                // A bookworm glibc gets the fix patched into a copy of its
                // libc (nothing preloaded into every process); others the
                // preloaded library.
                let patched = if shim {
                    self.patched_libc_layer(&r.layers)?
                } else {
                    None
                };
                let gw = match patched {
                    Some(key) => key,
                    None => self.gworker_layer(shim)?,
                };
                lowers.push(gw.clone());
                Ok(Base {
                    identity: format!("registry:{}+{gw}", r.manifest_digest),
                    lowers,
                    config: r.config,
                })
            }
        }
    }

    /// Builds hold this shared, `gc` exclusive: gc never sees a layer that a
    /// build stored but has not recorded yet.
    fn gc_lock(&self, exclusive: bool) -> Result<nix::fcntl::Flock<fs::File>, ImageError> {
        let dir = self.root.join(".locks");
        fs::create_dir_all(&dir)?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("gc.lock"))?;
        let arg = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        nix::fcntl::Flock::lock(file, arg).map_err(|(_, e)| ImageError::Io(io::Error::from(e)))
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.root.join("refs").join(format!(
            "{}.json",
            &sha256_hex(&[reference.as_bytes()])[..32]
        ))
    }

    fn read_ref(&self, reference: &str) -> Option<RefRecord> {
        let b = fs::read(self.ref_path(reference)).ok()?;
        let r: RefRecord = serde_json::from_slice(&b).ok()?;
        // Every layer must still be there (gc may have removed them).
        (r.reference == reference && r.layers.iter().all(|l| self.layer_dir(l).is_dir()))
            .then_some(r)
    }

    /// Pulls `reference` and records what it resolved to.
    pub(crate) fn pull_ref(
        &self,
        reference: &str,
        opts: &mut BuildOptions<'_>,
    ) -> Result<RefRecord, BuildFailure> {
        let pulled = crate::pull_registry(self, reference, opts)?;
        let rec = RefRecord {
            reference: reference.to_string(),
            manifest_digest: pulled.manifest_digest,
            layers: pulled.layers,
            config: pulled.config,
            pulled_at: now_secs(),
        };
        fs::create_dir_all(self.root.join("refs"))?;
        write_atomic(
            &self.ref_path(reference),
            &serde_json::to_vec_pretty(&rec).map_err(io::Error::other)?,
        )?;
        Ok(rec)
    }

    /// A tiny layer on top of every registry image: the `/.gworker`
    /// directory the agent is mounted in and, with `shim`, the statx shim
    /// debian-slim has too (`statx_fix.c`: this gVisor fails coreutils' `ls`
    /// without it). glibc reads /etc/ld.so.preload; musl and static binaries
    /// ignore it. The shim needs only GLIBC_2.2.5 symbols, so any glibc loads it.
    fn gworker_layer(&self, shim: bool) -> Result<String, ImageError> {
        let key = if shim {
            "gworker-base-v2-statx"
        } else {
            "gworker-base-v2"
        };
        let made = self.agent_layer(key.to_string(), "gworker agent mount point", |diff| {
            if shim {
                crate::statx::install_preload(diff)?;
            }
            Ok(true)
        })?;
        Ok(made.expect("this fill never gives up"))
    }

    /// [`Self::gworker_layer`] with the statx fix as the image's own libc,
    /// patched (`statx.rs`), when `layers` hold a glibc it knows: a layer
    /// per libc (keyed by its digest). `None` when they do not.
    fn patched_libc_layer(&self, layers: &[String]) -> Result<Option<String>, ImageError> {
        // The topmost layer that has the path decides (a whiteout or a
        // symlink there: not handled, the preload it is).
        let Some(found) = layers.iter().rev().find_map(|l| {
            crate::statx::LIBC_PATHS.iter().find_map(|rel| {
                let p = self.layer_dir(l).join("diff").join(rel);
                p.symlink_metadata().ok().map(|m| (p, *rel, m.is_file()))
            })
        }) else {
            return Ok(None);
        };
        let (libc, rel, true) = found else {
            return Ok(None);
        };
        let digest = sha256_hex(&[&fs::read(&libc)?]);
        let key = format!(
            "gworker-base-v3-libc-{}",
            &sha256_hex(&[rel.as_bytes(), digest.as_bytes()])[..32]
        );
        self.agent_layer(
            key,
            "gworker agent mount point, libc with the statx fix",
            |diff| crate::statx::install_patched_libc(&libc, rel, diff),
        )
    }

    /// The layer `key` (made unless it exists): the `/.gworker` directory the
    /// agent is mounted in, and what `fill` writes into its diff. `None` when
    /// `fill` gives up (false: nothing is kept).
    fn agent_layer(
        &self,
        key: String,
        description: &str,
        fill: impl FnOnce(&Path) -> Result<bool, ImageError>,
    ) -> Result<Option<String>, ImageError> {
        if self.layer_dir(&key).join("layer.json").is_file() {
            return Ok(Some(key));
        }
        let tmp = self.new_tmp_layer_dir(&key)?;
        let mut guard = RemoveOnDrop(Some(tmp.clone()));
        let d = tmp.join("diff/.gworker");
        fs::create_dir_all(&d)?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
        if !fill(&tmp.join("diff"))? {
            return Ok(None);
        }
        let meta = LayerMeta {
            key: key.clone(),
            parent: None,
            description: description.into(),
            size_bytes: crate::fsutil::tree_size(&tmp.join("diff"))?,
            created_at: now_secs(),
            config: ImageConfig::default(),
        };
        self.commit_layer(&tmp, &meta)?;
        guard.0 = None;
        Ok(Some(key))
    }

    pub(crate) fn new_tmp_layer_dir(&self, key: &str) -> Result<PathBuf, ImageError> {
        let tmp = self.layers_dir().join(format!(
            ".tmp-{}-{}-{}",
            &key[..key.len().min(16)],
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(tmp.join("diff"))?;
        Ok(tmp)
    }

    /// Writes `layer.json` into `tmp` and renames it to the layer's key. A
    /// layer already there (made by a concurrent build) wins.
    pub(crate) fn commit_layer(&self, tmp: &Path, meta: &LayerMeta) -> Result<(), ImageError> {
        fs::write(
            tmp.join("layer.json"),
            serde_json::to_vec_pretty(meta).map_err(io::Error::other)?,
        )?;
        let dir = fs::File::open(tmp)?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)).map_err(io::Error::from)?;
        match fs::rename(tmp, self.layer_dir(&meta.key)) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                fsutil::remove_build_tree(tmp)?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_file(digest).is_some()
    }

    pub(crate) fn blob_file(&self, digest: &str) -> Option<PathBuf> {
        let p = self.blob_path(blob_hex(digest)?);
        p.is_file().then_some(p)
    }

    fn api_info(&self, rec: &Record) -> api::ImageInfo {
        let tags = self
            .tags()
            .into_iter()
            .filter(|(_, id)| *id == rec.id)
            .map(|(t, _)| t)
            .collect();
        api::ImageInfo {
            image_id: rec.id.clone(),
            tags,
            layers: rec.lowers.clone(),
            size_bytes: rec.size_bytes,
            created_at: rec.created_at,
            env: rec.config.env.iter().cloned().collect(),
            workdir: rec.config.workdir.clone(),
            user: rec.config.user.clone(),
            spec: Some(rec.spec.clone()),
        }
    }

    fn builtin_api_info(&self, info: &ImageInfo) -> api::ImageInfo {
        api::ImageInfo {
            image_id: info.name.clone(),
            tags: std::iter::once(info.name.clone())
                .chain(
                    self.tags()
                        .into_iter()
                        .filter(|(_, id)| *id == info.name)
                        .map(|(t, _)| t),
                )
                .collect(),
            layers: vec![format!("builtin:{}", info.name)],
            size_bytes: info.size_bytes,
            created_at: info
                .built_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            env: info.env.iter().cloned().collect(),
            workdir: None,
            user: None,
            spec: None,
        }
    }

    /// An image by name, tag or ID, as the API shows it.
    pub fn describe(&self, name: &str) -> Result<Option<api::ImageInfo>, ImageError> {
        if Self::is_known(name) {
            return Ok(self.ready(name)?.map(|i| self.builtin_api_info(&i)));
        }
        let Some(id) = self.resolve(name)? else {
            return Ok(None);
        };
        if Self::is_known(&id) {
            return self.describe(&id);
        }
        Ok(self.read_record(&id)?.map(|r| self.api_info(&r)))
    }

    /// Every built image: the built-in ones that are built, then the others.
    pub fn list_all(&self) -> Result<Vec<api::ImageInfo>, ImageError> {
        let mut out: Vec<api::ImageInfo> = self
            .list()?
            .iter()
            .map(|i| self.builtin_api_info(i))
            .collect();
        let mut built = Vec::new();
        for id in self.record_ids() {
            if let Some(rec) = self.read_record(&id)? {
                built.push(self.api_info(&rec));
            }
        }
        built.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
        out.extend(built);
        Ok(out)
    }

    /// Removes a tag (if `name` is one), or an image and its tags. `in_use`
    /// says whether a sandbox still runs on an image ID. Layers stay until `gc`.
    pub fn remove_named(
        &self,
        name: &str,
        in_use: &dyn Fn(&str) -> bool,
    ) -> Result<bool, BuildFailure> {
        if Self::is_known(name) {
            if in_use(name) {
                return Err(in_use_err(name));
            }
            return Ok(self.remove(name)?);
        }
        let _lock = self.lock("tags", &mut |_| {})?;
        let mut tags = self.tags();
        if tags.remove(name).is_some() {
            self.write_tags(&tags)?;
            return Ok(true);
        }
        let Some(rec) = self.read_record(name)? else {
            return Ok(false);
        };
        if in_use(&rec.id) {
            return Err(in_use_err(&rec.id));
        }
        tags.retain(|_, id| *id != rec.id);
        self.write_tags(&tags)?;
        let target = self.mount_dir(&rec.id);
        if fsutil::mounts_under(&target).contains(&target) {
            nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH)
                .map_err(io::Error::from)?;
        }
        let _ = fs::remove_dir(&target);
        fsutil::remove_build_tree(&self.scratch_dir(&rec.id))?;
        fs::remove_file(self.record_path(&rec.id))?;
        Ok(true)
    }

    /// Removes layers no image or cached registry reference needs, and
    /// uploaded blobs no image refers to.
    pub fn gc(&self) -> Result<api::GcResult, ImageError> {
        // No build or pull is between storing a layer and recording it.
        let _builds = self.gc_lock(true)?;
        let _lock = self.lock("tags", &mut |_| {})?;
        let mut keep = std::collections::HashSet::new();
        let mut keep_blobs = std::collections::HashSet::new();
        for id in self.record_ids() {
            if let Some(rec) = self.read_record(&id).ok().flatten() {
                keep.extend(rec.lowers.iter().cloned());
                for s in &rec.spec.steps {
                    if let ImageStep::AddFiles { blob, .. } = s {
                        keep_blobs.insert(blob.trim_start_matches("sha256:").to_string());
                    }
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.root.join("refs")) {
            for e in entries.flatten() {
                if let Some(r) = fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<RefRecord>(&b).ok())
                {
                    keep.extend(r.layers);
                }
            }
        }
        let mut result = api::GcResult {
            removed_layers: 0,
            removed_blobs: 0,
            freed_bytes: 0,
        };
        if let Ok(entries) = fs::read_dir(self.layers_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // Dot entries are in-progress layers and lock files.
                if name.starts_with('.') || keep.contains(&name) {
                    continue;
                }
                let size = fsutil::tree_size(&e.path()).unwrap_or(0);
                fsutil::remove_build_tree(&e.path())?;
                result.removed_layers += 1;
                result.freed_bytes += size;
            }
        }
        if let Ok(entries) = fs::read_dir(self.root.join("blobs")) {
            let hour_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let meta = e.metadata()?;
                // Fresh uploads belong to builds about to start.
                let fresh = meta.modified().map(|m| m > hour_ago).unwrap_or(true);
                if keep_blobs.contains(&name) || fresh {
                    continue;
                }
                fs::remove_file(e.path())?;
                result.removed_blobs += 1;
                result.freed_bytes += meta.len();
            }
        }
        Ok(result)
    }

    /// After a crash: removes half-made layers (and their mounts) and build
    /// sandboxes left in runsc's state.
    pub fn cleanup_builds(&self, runsc: &Path) {
        if let Ok(entries) = fs::read_dir(self.layers_dir()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    tracing::info!(dir = %e.path().display(), "removing a half-made layer");
                    if let Err(err) = fsutil::remove_build_tree(&e.path()) {
                        tracing::warn!(dir = %e.path().display(), error = %err, "cannot remove a half-made layer");
                    }
                }
            }
        }
        step::cleanup_build_sandboxes(self, runsc);
    }
}

fn in_use_err(id: &str) -> BuildFailure {
    BuildFailure::new(
        api::ErrorCode::Conflict,
        format!("image {id} is used by a running sandbox; terminate it first"),
    )
}

pub fn check_tag(tag: &str) -> Result<(), BuildFailure> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:/".contains(&b))
        && !tag.starts_with(['.', '-'])
        && !is_image_id(tag)
        && !ImageStore::is_known(tag);
    if ok {
        Ok(())
    } else {
        Err(BuildFailure::invalid(format!(
            "{tag:?} cannot be a tag: use letters, digits and ._-:/ (at most 128), not a built-in name or an image ID"
        )))
    }
}

pub fn is_image_id(s: &str) -> bool {
    s.strip_prefix("im-")
        .is_some_and(|h| h.len() == 24 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub(crate) fn debian_builtin(python_version: Option<&str>) -> &'static str {
    match python_version {
        Some("3.13") => "debian-slim-trixie",
        _ => "debian-slim",
    }
}

fn describe_base(base: &ImageBase) -> String {
    match base {
        ImageBase::Name(n) => format!("from {n}"),
        ImageBase::DebianSlim { python_version } => format!(
            "debian_slim (Python {})",
            python_version.as_deref().unwrap_or("3.11")
        ),
        ImageBase::Registry { reference, .. } => format!("from_registry {reference}"),
    }
}

fn dir_is_empty(p: &Path) -> bool {
    fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    ));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// Mounts an overlay of `lowers` (top first) at `target`: read-only without
/// `upper`, else writable with `upper = (upperdir, workdir)`. Options that
/// would make the upper depend on the lowers' inodes are off, so an upper
/// can later serve as a lower of other mounts.
pub(crate) fn mount_overlay(
    target: &Path,
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
) -> io::Result<()> {
    let join = |ps: &[PathBuf]| -> io::Result<String> {
        let mut s = String::new();
        for (i, p) in ps.iter().enumerate() {
            let t = p
                .to_str()
                .ok_or_else(|| io::Error::other(format!("path {} is not UTF-8", p.display())))?;
            if t.contains([',', ':']) {
                return Err(io::Error::other(format!(
                    "layer path {t} contains ',' or ':', which overlayfs options cannot hold"
                )));
            }
            if i > 0 {
                s.push(':');
            }
            s.push_str(t);
        }
        Ok(s)
    };
    let mut opts = format!("lowerdir={}", join(lowers)?);
    if let Some((up, work)) = upper {
        opts.push_str(&format!(
            ",upperdir={},workdir={},index=off,redirect_dir=off,metacopy=off",
            up.display(),
            work.display()
        ));
    }
    let flags = if upper.is_some() {
        nix::mount::MsFlags::empty()
    } else {
        nix::mount::MsFlags::MS_RDONLY
    };
    if opts.len() >= 4000 {
        return Err(io::Error::other(format!(
            "too many layers ({}) for one overlay mount",
            lowers.len()
        )));
    }
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        flags,
        Some(opts.as_str()),
    )
    .map_err(io::Error::from)
}

/// The uid and gid of an image's `User` (`uid`, `uid:gid`, `name`,
/// `name:group`), names looked up in the image's own /etc/passwd and
/// /etc/group. `root` and an empty user are 0:0.
pub(crate) fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32), String> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_in_root(rootfs, "etc/passwd").unwrap_or_default();
    let group = read_in_root(rootfs, "etc/group").unwrap_or_default();
    // name:x:uid:gid:... in both files (group: name:x:gid:...)
    let lookup = |text: &str, name: &str| -> Option<(u32, Option<u32>)> {
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[0] == name).then(|| {
                let id = f[2].parse().ok()?;
                Some((id, f.get(3).and_then(|g| g.parse().ok())))
            })?
        })
    };
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(id) => (
            id,
            passwd.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 4 && f[2] == id.to_string())
                    .then(|| f[3].parse().ok())
                    .flatten()
            }),
        ),
        Err(_) => lookup(&passwd, u)
            .ok_or_else(|| format!("its user {u:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(id) => id,
            Err(_) => {
                lookup(&group, g)
                    .ok_or_else(|| format!("its group {g:?} is not in the image's /etc/group"))?
                    .0
            }
        },
        None => primary_gid.unwrap_or(uid),
    };
    Ok((uid, gid))
}

/// Reads a small file of an image without following its symlinks out of
/// the image (`RESOLVE_IN_ROOT`).
fn read_in_root(rootfs: &Path, rel: &str) -> Option<String> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::os::fd::{FromRawFd, OwnedFd};
    let root = fs::File::open(rootfs).ok()?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = openat2(std::os::fd::AsRawFd::as_raw_fd(&root), rel, how).ok()?;
    // SAFETY: openat2 returned a fresh fd that nothing else owns.
    let file = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text).ok()?;
    Some(text)
}

#[cfg(test)]
mod user_tests {
    use super::resolve_user;

    #[test]
    fn users_resolve_by_id_and_by_name_inside_the_image() {
        let dir = std::env::temp_dir().join(format!("gw-user-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1001:1002::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(&dir, "app"), Ok((1001, 1002)));
        assert_eq!(resolve_user(&dir, "app:staff"), Ok((1001, 50)));
        assert_eq!(resolve_user(&dir, "1001"), Ok((1001, 1002)));
        assert_eq!(resolve_user(&dir, "4000"), Ok((4000, 4000)));
        assert_eq!(resolve_user(&dir, "7:8"), Ok((7, 8)));
        assert!(resolve_user(&dir, "nobody-here").is_err());
        assert!(resolve_user(&dir, "app:nogroup").is_err());
        // An /etc/passwd that is a symlink out of the image is not followed out.
        std::fs::remove_file(dir.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("etc/passwd")).unwrap();
        assert!(resolve_user(&dir, "root").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
