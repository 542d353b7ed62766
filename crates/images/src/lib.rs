//! Built-in root filesystem images for sandboxes.
//!
//! This crate owns the image store: a directory (normally
//! `<data-dir>/images`) holding one directory per built image:
//!
//! ```text
//! <root>/<name>/rootfs/      the root filesystem, used read-only as the
//!                            lower layer of sandboxes (runsc --overlay2=root:memory)
//! <root>/<name>/image.json   metadata: size, build time, default environment
//! <root>/.locks/<name>.lock  flock(2) lock serialising builds and removals
//! <root>/.build-<name>-*     an in-progress (or crashed) build
//! ```
//!
//! An image is built once and never modified afterwards. A build happens in a
//! temp directory inside the store and is renamed into place, so an image
//! directory either is complete or does not exist. Builds are serialised per
//! image with a lock file, which works across threads and processes.
//!
//! This crate does not run sandboxes and knows nothing of runsc; it only makes
//! directories. Every image contains an empty `/.gworker` directory, where the
//! engine bind-mounts its static agent binary.

mod buildnet;
mod built;
mod fsutil;
mod recipe;
pub mod registry;
mod statx;
mod step;

pub use built::{check_tag, is_image_id, validate_spec, BuildFailure, BuildOptions, ImageConfig};

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

pub use recipe::RECIPE_VERSION;

/// The image sandboxes get when they name none.
pub const DEFAULT_IMAGE: &str = "debian-slim";

/// Images this crate knows how to build.
pub const BUILTIN_IMAGES: &[&str] = &["busybox", "debian-slim", "debian-slim-trixie"];

/// Name of the metadata file next to an image's `rootfs`.
const META_FILE: &str = "image.json";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image {0:?}; built-in images are busybox, debian-slim and debian-slim-trixie; other names must be tags or IDs of built images")]
    Unknown(String),
    #[error("cannot build image {image}: {reason}")]
    Build { image: String, reason: String },
    #[error(
        "image {image} has unreadable metadata {path:?}: {reason}; remove the image to rebuild it"
    )]
    Metadata {
        image: String,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot lock image {image} ({path:?}): {source}")]
    Lock {
        image: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A registry could not be reached, refused us, or sent bad data.
    #[error("{0}")]
    Registry(String),
    #[error("image store i/o error: {0}")]
    Io(#[from] io::Error),
}

/// A built image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    pub name: String,
    /// Absolute (if the store root is) path of the root filesystem directory.
    pub rootfs: PathBuf,
    /// Apparent size of the rootfs (files and symlinks; hard links once).
    pub size_bytes: u64,
    pub built_at: SystemTime,
    /// Default environment for processes in this image (PATH, HOME, ...).
    pub env: Vec<(String, String)>,
    /// Default working directory and user of its processes.
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// `user` resolved against the image's /etc/passwd and /etc/group.
    pub user_ids: Option<(u32, u32)>,
}

/// On-disk form of `image.json`. Private: not a wire type.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    name: String,
    recipe_version: u32,
    size_bytes: u64,
    built_at_unix_secs: u64,
    #[serde(default)]
    built_at_nanos: u32,
    #[serde(default)]
    build_seconds: f64,
    env: Vec<(String, String)>,
}

/// The image store rooted at one directory. Cheap to clone; all state is on
/// disk, so several stores (threads, processes) on one root cooperate.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    tools: recipe::Tools,
}

pub(crate) static UNIQUE: AtomicU64 = AtomicU64::new(0);

impl ImageStore {
    /// A store at `root` (created on first build). Tools come from the
    /// environment: `GWORKER_MMDEBSTRAP` (default `mmdebstrap` in PATH),
    /// `GWORKER_BUSYBOX` (default `/bin/busybox`, must be static) and
    /// `GWORKER_DEBIAN_MIRROR` (default: the host's apt sources for bookworm,
    /// else mmdebstrap's default mirror).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ImageStore {
            root: root.into(),
            tools: recipe::Tools::from_env(),
        }
    }

    /// Use this `mmdebstrap` program (a path, or a name looked up in PATH).
    pub fn with_mmdebstrap(mut self, program: impl Into<PathBuf>) -> Self {
        self.tools.mmdebstrap = program.into();
        self
    }

    /// Use this static busybox binary for the `busybox` image.
    pub fn with_busybox(mut self, path: impl Into<PathBuf>) -> Self {
        self.tools.busybox = path.into();
        self
    }

    /// MIRROR argument for mmdebstrap (URI, `deb ...` line or sources file);
    /// `None` for mmdebstrap's default.
    pub fn with_debian_mirror(mut self, mirror: Option<String>) -> Self {
        self.tools.debian_mirror = mirror;
        self
    }

    /// Upper bound for one external build step (default 15 minutes).
    pub fn with_build_timeout(mut self, timeout: Duration) -> Self {
        self.tools.build_timeout = timeout;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn is_known(name: &str) -> bool {
        BUILTIN_IMAGES.contains(&name)
    }

    fn check_known(name: &str) -> Result<(), ImageError> {
        if Self::is_known(name) {
            Ok(())
        } else {
            Err(ImageError::Unknown(name.to_string()))
        }
    }

    pub(crate) fn image_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The image if it is built, without building it: a built-in one by
    /// name, or a built one by tag or ID (its root filesystem mounted).
    pub fn ready(&self, name: &str) -> Result<Option<ImageInfo>, ImageError> {
        if !Self::is_known(name) {
            return self.built_ready(name);
        }
        let Some(meta) = self.read_meta(name)? else {
            return Ok(None);
        };
        let rootfs = self.image_dir(name).join("rootfs");
        if !rootfs.is_dir() {
            return Ok(None);
        }
        Ok(Some(ImageInfo {
            name: name.to_string(),
            rootfs,
            size_bytes: meta.size_bytes,
            built_at: UNIX_EPOCH + Duration::new(meta.built_at_unix_secs, meta.built_at_nanos),
            env: meta.env,
            workdir: None,
            user: None,
            user_ids: None,
        }))
    }

    /// Build the image if it is missing, then return it. Blocking (seconds
    /// to minutes): call it from `spawn_blocking`. `progress` receives
    /// human-readable lines. Concurrent callers (threads or processes) wait
    /// for a single build. A failed build leaves nothing behind.
    pub fn ensure(
        &self,
        name: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<ImageInfo, ImageError> {
        if !Self::is_known(name) {
            // Images built from a description are built by `build`, not here.
            return self
                .built_ready(name)?
                .ok_or_else(|| ImageError::Unknown(name.to_string()));
        }
        if let Some(info) = self.ready(name)? {
            return Ok(info);
        }
        fs::create_dir_all(&self.root)?;
        let _lock = self.lock(name, progress)?;
        if let Some(info) = self.ready(name)? {
            return Ok(info);
        }
        // We hold the lock: any build dir of this image is a crashed build's.
        self.remove_leftovers(name);
        let final_dir = self.image_dir(name);
        if final_dir.symlink_metadata().is_ok() {
            // Present but not ready (no metadata): not ours to trust.
            tracing::warn!(image = name, dir = %final_dir.display(), "replacing incomplete image directory");
            self.discard(name, &final_dir)?;
        }

        let tmp = self.root.join(format!(
            ".build-{name}-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        let mut guard = RemoveOnDrop(Some(tmp.clone()));
        fs::create_dir(&tmp)?;
        let rootfs = tmp.join("rootfs");
        let start = Instant::now();
        tracing::info!(image = name, "building image");
        let env = recipe::build(name, &self.tools, &rootfs, progress)?;
        let size_bytes = fsutil::tree_size(&rootfs)?;
        let built_at = SystemTime::now();
        let since_epoch = built_at.duration_since(UNIX_EPOCH).unwrap_or_default();
        let build_seconds = start.elapsed().as_secs_f64();
        let meta = Meta {
            name: name.to_string(),
            recipe_version: RECIPE_VERSION,
            size_bytes,
            built_at_unix_secs: since_epoch.as_secs(),
            built_at_nanos: since_epoch.subsec_nanos(),
            build_seconds,
            env,
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(io::Error::other)?;
        fs::write(tmp.join(META_FILE), json)?;
        // Make the tree durable before it becomes visible under its name.
        let dir = fs::File::open(&tmp)?;
        nix::unistd::syncfs(dir.as_raw_fd()).map_err(io::Error::from)?;
        fs::rename(&tmp, &final_dir)?;
        guard.0 = None;
        fs::File::open(&self.root)?.sync_all()?;

        let secs = start.elapsed().as_secs_f64();
        tracing::info!(image = name, seconds = secs, size_bytes, "image ready");
        progress(&format!("{name} ready in {secs:.1} s"));
        self.ready(name)?.ok_or_else(|| ImageError::Build {
            image: name.to_string(),
            reason: format!("{} vanished right after the build", final_dir.display()),
        })
    }

    /// Built-in images built by an older recipe than this gworker's, with
    /// the recipe version each was built by. They keep working (a recipe
    /// change makes an image better, not usable); `remove` with no sandbox
    /// using one makes the next create build the current recipe.
    pub fn outdated_builtins(&self) -> Vec<(String, u32)> {
        BUILTIN_IMAGES
            .iter()
            .filter_map(|name| {
                let meta = self.read_meta(name).ok()??;
                (meta.recipe_version < RECIPE_VERSION)
                    .then(|| (name.to_string(), meta.recipe_version))
            })
            .collect()
    }

    /// A built-in image's `image.json`; `None` when it has none.
    fn read_meta(&self, name: &str) -> Result<Option<Meta>, ImageError> {
        let path = self.image_dir(name).join(META_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let meta = serde_json::from_str(&text).map_err(|e| ImageError::Metadata {
            image: name.to_string(),
            path,
            reason: e.to_string(),
        })?;
        Ok(Some(meta))
    }

    /// The built images (unbuilt ones are absent).
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let mut out = Vec::new();
        for name in BUILTIN_IMAGES {
            if let Some(info) = self.ready(name)? {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Delete a built image; `Ok(false)` if it was not built. The caller must
    /// make sure no sandbox still uses it.
    pub fn remove(&self, name: &str) -> Result<bool, ImageError> {
        Self::check_known(name)?;
        let dir = self.image_dir(name);
        if dir.symlink_metadata().is_err() {
            return Ok(false);
        }
        let _lock = self.lock(name, &mut |_| {})?;
        self.remove_leftovers(name);
        if dir.symlink_metadata().is_err() {
            return Ok(false);
        }
        self.discard(name, &dir)?;
        Ok(true)
    }

    /// Rename `dir` out of the way (so the name is free at once), then delete it.
    fn discard(&self, name: &str, dir: &Path) -> Result<(), ImageError> {
        let trash = self.root.join(format!(
            ".trash-{name}-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::rename(dir, &trash)?;
        fsutil::remove_build_tree(&trash)?;
        Ok(())
    }

    fn remove_leftovers(&self, name: &str) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        let prefixes = [format!(".build-{name}-"), format!(".trash-{name}-")];
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let file_name = file_name.to_string_lossy();
            if prefixes.iter().any(|p| file_name.starts_with(p.as_str())) {
                let path = entry.path();
                tracing::info!(dir = %path.display(), "removing leftover of an interrupted image build");
                if let Err(e) = fsutil::remove_build_tree(&path) {
                    tracing::warn!(dir = %path.display(), error = %e, "cannot remove leftover image build");
                }
            }
        }
    }

    /// Take the image's exclusive lock, waiting for other holders.
    pub(crate) fn lock(
        &self,
        name: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Flock<fs::File>, ImageError> {
        let dir = self.root.join(".locks");
        let path = dir.join(format!("{name}.lock"));
        let lock_err = |source: io::Error| ImageError::Lock {
            image: name.to_string(),
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(lock_err)?;
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err)?;
        let mut waiting = false;
        loop {
            let arg = if waiting {
                FlockArg::LockExclusive
            } else {
                FlockArg::LockExclusiveNonblock
            };
            match Flock::lock(file, arg) {
                Ok(lock) => return Ok(lock),
                Err((f, Errno::EWOULDBLOCK)) if !waiting => {
                    progress(&format!(
                        "{name}: waiting for another build or removal of this image"
                    ));
                    waiting = true;
                    file = f;
                }
                Err((f, Errno::EINTR)) => file = f,
                Err((_, errno)) => return Err(lock_err(io::Error::from(errno))),
            }
        }
    }
}

/// Deletes a build directory unless disarmed (set to `None`).
pub(crate) struct RemoveOnDrop(pub(crate) Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            if let Err(e) = fsutil::remove_build_tree(&path) {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove failed image build");
            }
        }
    }
}

/// What a registry pull yields for the image store.
pub(crate) struct Pulled {
    pub manifest_digest: String,
    pub layers: Vec<String>,
    pub config: ImageConfig,
}

/// Pulls a registry image's layers into the store.
pub(crate) fn pull_registry(
    store: &ImageStore,
    reference: &str,
    opts: &mut BuildOptions<'_>,
) -> Result<Pulled, BuildFailure> {
    let parsed = registry::Reference::parse(reference)
        .map_err(|e| BuildFailure::new(gworker_api::ErrorCode::InvalidRequest, e.to_string()))?;
    let popts = registry::PullOptions {
        insecure_registries: opts.insecure_registries.clone(),
        credentials: opts.credentials.clone(),
        ..Default::default()
    };
    let layers_root = store.root.join("layers");
    fs::create_dir_all(&layers_root).map_err(ImageError::from)?;
    let events = &mut opts.events;
    let pulled = registry::pull(&parsed, &popts, &layers_root, &mut |line| {
        events(gworker_api::BuildEvent::Log {
            line: line.to_string(),
        })
    })
    .map_err(|e| match e {
        ImageError::Build { reason, .. } => BuildFailure::new(
            gworker_api::ErrorCode::RegistryFailed,
            format!("cannot pull {reference}: {reason}"),
        ),
        other => BuildFailure::from(other),
    })?;
    Ok(Pulled {
        manifest_digest: pulled.manifest_digest,
        layers: pulled.layers,
        config: ImageConfig {
            env: pulled.env,
            workdir: pulled.workdir.filter(|w| !w.is_empty()),
            user: pulled.user.filter(|u| !u.is_empty()),
        },
    })
}

#[cfg(test)]
mod tests;
