//! [`Image`]: an image description (a base plus ordered steps) that the
//! daemon builds into cached layers, in the shape of Modal's `Image`; and
//! [`Images`]: the daemon's built images (list, lookup, delete, pull, gc).
//!
//! What the client adds to the wire's [`api::ImageSpec`]: local files and
//! directories. They are packed into a deterministic tar (sorted entries,
//! mtime 0, owner 0:0 without names, permission bits kept), uploaded with
//! `POST /v1/images/blobs` and referred to by digest in an
//! [`api::ImageStep::AddFiles`] step, so their content is part of the image
//! ID and an unchanged file means a cached layer. Local paths are read when
//! the image is built, not when the step is added.
//!
//! ```no_run
//! # async fn f(client: &gworker_client::Client) -> gworker_client::Result<()> {
//! use gworker_client::{CreateOptions, Image, Sandbox};
//! let image = Image::from_name("busybox")
//!     .run_commands(["mkdir -p /data"])
//!     .env([("GREETING", "hi")])
//!     .workdir("/app")
//!     .add_local_file("main.py", "/app/main.py")?;
//! let sb = Sandbox::create(client, CreateOptions {
//!     image: Some(image), // built first, its progress on stderr
//!     ..Default::default()
//! }).await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use gworker_api as api;
use gworker_api::BuildEvent;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Method;
use sha2::{Digest, Sha256};

use crate::client::{seg, Client};
use crate::error::{Error, Result};

/// A description of an image: where it starts and the steps on top. Build
/// it with [`Image::build`] or pass it as [`crate::CreateOptions::image`]
/// (an image that is only a name is used as is; any other is built first).
///
/// Methods that can be wrong about their arguments check them at once and
/// return [`Error::InvalidArgument`]: chain them with `?`.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    base: api::ImageBase,
    steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Spec(api::ImageStep),
    /// Packed and uploaded at build time.
    Local(LocalSource),
}

/// Local files for an `AddFiles` step.
#[derive(Debug, Clone, PartialEq)]
struct LocalSource {
    /// Absolute (made so when the step was added).
    path: PathBuf,
    /// Absolute directory in the image the tar is unpacked at.
    dest: String,
    /// `Some(name)`: one file, stored as `name`; `None`: a directory's contents.
    file_name: Option<OsString>,
}

impl From<&str> for Image {
    fn from(name: &str) -> Image {
        Image::from_name(name)
    }
}

impl From<String> for Image {
    fn from(name: String) -> Image {
        Image::from_name(name)
    }
}

impl From<&String> for Image {
    fn from(name: &String) -> Image {
        Image::from_name(name.as_str())
    }
}

impl From<api::ImageSpec> for Image {
    fn from(spec: api::ImageSpec) -> Image {
        Image {
            base: spec.base,
            steps: spec.steps.into_iter().map(Step::Spec).collect(),
        }
    }
}

impl Image {
    /// An image the daemon knows by name: `busybox`, `debian-slim`, a tag
    /// given at a build or pull, or an image ID (`im-...`).
    pub fn from_name(name: impl Into<String>) -> Image {
        Image::with_base(api::ImageBase::Name(name.into()))
    }

    /// Debian (minbase) with Python and pip. `python_version` must be one of
    /// [`api::DEBIAN_PYTHON_VERSIONS`] (`None`: the daemon's default, 3.11).
    pub fn debian_slim(python_version: Option<&str>) -> Result<Image> {
        if let Some(v) = python_version {
            if !api::DEBIAN_PYTHON_VERSIONS.iter().any(|(p, _)| *p == v) {
                let known: Vec<&str> = api::DEBIAN_PYTHON_VERSIONS
                    .iter()
                    .map(|(p, _)| *p)
                    .collect();
                return Err(Error::InvalidArgument(format!(
                    "debian_slim: python_version {v:?} is not offered; choose one of {}",
                    known.join(", ")
                )));
            }
        }
        Ok(Image::with_base(api::ImageBase::DebianSlim {
            python_version: python_version.map(String::from),
        }))
    }

    /// An image from an OCI / Docker v2 registry, e.g. `python:3.12-slim`
    /// or `127.0.0.1:5000/team/tool@sha256:...`; pulled by the daemon (once:
    /// its layers are cached).
    pub fn from_registry(reference: impl Into<String>) -> Image {
        Image::with_base(api::ImageBase::Registry {
            reference: reference.into(),
            secret: None,
        })
    }

    /// [`from_registry`](Self::from_registry) with credentials: `secret`
    /// names a stored secret holding `REGISTRY_USERNAME` and `REGISTRY_PASSWORD`.
    pub fn from_registry_with_secret(
        reference: impl Into<String>,
        secret: impl Into<String>,
    ) -> Image {
        Image::with_base(api::ImageBase::Registry {
            reference: reference.into(),
            secret: Some(secret.into()),
        })
    }

    fn with_base(base: api::ImageBase) -> Image {
        Image {
            base,
            steps: Vec::new(),
        }
    }

    fn step(mut self, s: api::ImageStep) -> Image {
        self.steps.push(Step::Spec(s));
        self
    }

    /// `apt-get install` these Debian packages (needs a Debian-based image).
    pub fn apt_install<I, S>(self, packages: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.step(api::ImageStep::AptInstall(strings(packages)))
    }

    /// `pip install` these packages (needs an image with Python and pip).
    pub fn pip_install<I, S>(self, packages: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.step(api::ImageStep::PipInstall(strings(packages)))
    }

    /// Runs these shell commands in order (`/bin/sh -c`, no network); a
    /// command that exits non-zero fails the build.
    pub fn run_commands<I, S>(self, commands: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.step(api::ImageStep::RunCommands(strings(commands)))
    }

    /// Environment variables of every process started from the image
    /// (a sandbox's own `env` wins over them).
    pub fn env<I, K, V>(self, vars: I) -> Image
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self.step(api::ImageStep::Env(vars))
    }

    /// The default working directory (absolute; created if missing).
    pub fn workdir(self, path: impl Into<String>) -> Image {
        self.step(api::ImageStep::Workdir(path.into()))
    }

    /// Copies the local file `local` to `remote` in the image. `remote` is
    /// absolute, without `..`; ending in `/` it names a directory and the
    /// file keeps its local name. Permission bits are kept; the owner is root.
    pub fn add_local_file(mut self, local: impl AsRef<Path>, remote: &str) -> Result<Image> {
        let (path, meta) = local_path(local.as_ref(), "add_local_file")?;
        if meta.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "add_local_file: {} is a directory; use add_local_dir",
                path.display()
            )));
        }
        check_remote(remote, "add_local_file")?;
        let (dest, name) = match remote.strip_suffix('/') {
            Some(dir) => (
                dir,
                path.file_name().map(OsString::from).unwrap_or_default(),
            ),
            None => {
                let (dir, name) = remote.rsplit_once('/').unwrap_or(("", remote));
                (dir, OsString::from(name))
            }
        };
        if name.is_empty() || name == "." {
            return Err(Error::InvalidArgument(format!(
                "add_local_file: remote {remote:?} does not name a file"
            )));
        }
        self.steps.push(Step::Local(LocalSource {
            path,
            dest: dir_or_root(dest),
            file_name: Some(name),
        }));
        Ok(self)
    }

    /// Copies the contents of the local directory `local` (files,
    /// directories and symlinks, recursively) into `remote` in the image
    /// (absolute, without `..`; created if missing).
    pub fn add_local_dir(mut self, local: impl AsRef<Path>, remote: &str) -> Result<Image> {
        let (path, meta) = local_path(local.as_ref(), "add_local_dir")?;
        if !meta.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "add_local_dir: {} is not a directory; use add_local_file",
                path.display()
            )));
        }
        check_remote(remote, "add_local_dir")?;
        let dest = remote.trim_end_matches('/');
        self.steps.push(Step::Local(LocalSource {
            path,
            dest: dir_or_root(dest),
            file_name: None,
        }));
        Ok(self)
    }

    /// The name, when the image is only a name (no steps): it needs no build.
    pub fn name(&self) -> Option<&str> {
        match (&self.base, self.steps.is_empty()) {
            (api::ImageBase::Name(n), true) => Some(n),
            _ => None,
        }
    }

    pub fn base(&self) -> &api::ImageBase {
        &self.base
    }

    /// Packs the local files of every step: the spec to send, and the blobs
    /// (digest, tar) it refers to.
    fn pack(&self) -> Result<(api::ImageSpec, Vec<(String, Bytes)>)> {
        let mut blobs: Vec<(String, Bytes)> = Vec::new();
        let mut steps = Vec::with_capacity(self.steps.len());
        for s in &self.steps {
            match s {
                Step::Spec(s) => steps.push(s.clone()),
                Step::Local(l) => {
                    let tar = l.pack()?;
                    let digest = digest_of(&tar);
                    if !blobs.iter().any(|(d, _)| *d == digest) {
                        blobs.push((digest.clone(), tar.into()));
                    }
                    steps.push(api::ImageStep::AddFiles {
                        blob: digest,
                        dest: l.dest.clone(),
                    });
                }
            }
        }
        let spec = api::ImageSpec {
            base: self.base.clone(),
            steps,
        };
        Ok((spec, blobs))
    }

    /// The wire description, after uploading the local files it needs.
    pub async fn upload(&self, client: &Client) -> Result<api::ImageSpec> {
        // Reading and hashing local trees is blocking work.
        let image = self.clone();
        let (spec, blobs) = tokio::task::spawn_blocking(move || image.pack())
            .await
            .map_err(|e| Error::Protocol(format!("packing local files panicked: {e}")))??;
        for (digest, tar) in blobs {
            let resp = client
                .send(
                    Method::POST,
                    &format!("/v1/images/blobs?digest={digest}"),
                    Some((tar, "application/octet-stream")),
                )
                .await?;
            let info: api::BlobInfo = client.read_json(resp).await?;
            if info.digest != digest {
                return Err(Error::Protocol(format!(
                    "uploaded blob {digest} but the daemon stored {}",
                    info.digest
                )));
            }
        }
        Ok(spec)
    }

    /// Builds the image (cached steps are not run again), printing its
    /// progress to stderr; returns the built image.
    pub async fn build(&self, client: &Client) -> Result<api::ImageInfo> {
        let mut printer = BuildPrinter::stderr();
        self.build_with(client, None, |e| printer.event(e)).await
    }

    /// Builds the image, also naming it `tag` if given; `on_event` sees each
    /// [`BuildEvent`] as it arrives (`|_| {}` for a quiet build; a
    /// [`BuildPrinter`] prints them). A failed step is [`Error::Build`].
    pub async fn build_with<F>(
        &self,
        client: &Client,
        tag: Option<&str>,
        on_event: F,
    ) -> Result<api::ImageInfo>
    where
        F: FnMut(&BuildEvent) + Send,
    {
        let spec = self.upload(client).await?;
        let body = api::BuildImage {
            spec,
            tag: tag.map(String::from),
        };
        let resp = client.post("/v1/images/build", &body).await?;
        read_events(client, resp, on_event).await
    }
}

fn strings<I, S>(items: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    items.into_iter().map(Into::into).collect()
}

/// `local` made absolute, and its metadata (following a symlink); a clear
/// error naming it when it does not exist.
fn local_path(local: &Path, what: &str) -> Result<(PathBuf, std::fs::Metadata)> {
    let path = std::path::absolute(local).map_err(|e| {
        Error::InvalidArgument(format!("{what}: bad local path {}: {e}", local.display()))
    })?;
    match std::fs::metadata(&path) {
        Ok(m) => Ok((path, m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::InvalidArgument(format!(
            "{what}: local path {} does not exist",
            local.display()
        ))),
        Err(e) => Err(Error::InvalidArgument(format!(
            "{what}: cannot read local path {}: {e}",
            local.display()
        ))),
    }
}

/// `dir`, or `/` for the empty string (what `/x` and `/` leave of a path).
fn dir_or_root(dir: &str) -> String {
    if dir.is_empty() {
        "/".into()
    } else {
        dir.into()
    }
}

/// A destination in the image: absolute, no `..` component, no NUL.
fn check_remote(remote: &str, what: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "{what}: remote path {remote:?} {why}"
        )))
    };
    if !remote.starts_with('/') {
        return bad("must be absolute");
    }
    if remote.contains('\0') {
        return bad("contains a NUL byte");
    }
    if Path::new(remote)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        return bad("must not contain `..`");
    }
    Ok(())
}

/// `sha256:<hex>` of `data`: a blob's name.
fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

impl LocalSource {
    /// The deterministic tar of this source.
    fn pack(&self) -> Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        let r = match &self.file_name {
            Some(name) => append_file(&mut b, &self.path, Path::new(name), true),
            None => append_dir_contents(&mut b, &self.path, Path::new("")),
        };
        r.and_then(|()| b.into_inner()).map_err(|e| {
            Error::InvalidArgument(format!("cannot pack {}: {e}", self.path.display()))
        })
    }
}

/// A header with nothing in it that depends on when or by whom the file was made.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o7777);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

/// Appends one file (`follow`: the path itself may be a symlink to it) as `name`.
fn append_file(
    b: &mut tar::Builder<Vec<u8>>,
    path: &Path,
    name: &Path,
    follow: bool,
) -> std::io::Result<()> {
    let meta = if follow {
        std::fs::metadata(path)?
    } else {
        std::fs::symlink_metadata(path)?
    };
    let ft = meta.file_type();
    let with_path =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(with_path)?;
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, name, &target).map_err(with_path)
    } else if ft.is_dir() {
        let mut h = header(tar::EntryType::Directory, meta.mode(), 0);
        b.append_data(&mut h, name, std::io::empty())
            .map_err(with_path)?;
        append_dir_contents(b, path, name)
    } else if ft.is_file() {
        // Read whole first: the header's size must match what follows even
        // if the file changes meanwhile.
        let data = std::fs::read(path).map_err(with_path)?;
        let mut h = header(tar::EntryType::Regular, meta.mode(), data.len() as u64);
        b.append_data(&mut h, name, data.as_slice())
            .map_err(with_path)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is not a regular file, directory or symlink",
                path.display()
            ),
        ))
    }
}

/// Appends `dir`'s entries (sorted by name, recursively) under `prefix`.
fn append_dir_contents(
    b: &mut tar::Builder<Vec<u8>>,
    dir: &Path,
    prefix: &Path,
) -> std::io::Result<()> {
    let mut names: Vec<OsString> = std::fs::read_dir(dir)
        .and_then(|rd| rd.map(|e| e.map(|e| e.file_name())).collect())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for n in names {
        append_file(b, &dir.join(&n), &prefix.join(&n), false)?;
    }
    Ok(())
}

/// Reads a build's NDJSON events until `done` (the image) or `error`.
async fn read_events<F>(
    client: &Client,
    resp: hyper::Response<Incoming>,
    mut on_event: F,
) -> Result<api::ImageInfo>
where
    F: FnMut(&BuildEvent) + Send,
{
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    loop {
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(nl + 1);
            if let Some(result) = handle_line(&line[..nl], &mut on_event)? {
                return result;
            }
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(client.unavailable(e)),
            None => {
                // A last line without a newline still counts.
                let rest = buf.split();
                if let Some(result) = handle_line(&rest, &mut on_event)? {
                    return result;
                }
                return Err(Error::Protocol(
                    "the build's answer ended without a result (was the daemon restarted?)".into(),
                ));
            }
        }
    }
}

/// One NDJSON line: `Some(result)` for the last event, `None` to go on.
/// Events of a kind this client does not know are skipped.
fn handle_line<F: FnMut(&BuildEvent)>(
    line: &[u8],
    on_event: &mut F,
) -> Result<Option<Result<api::ImageInfo>>> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Ok(None);
    }
    let event: BuildEvent = match serde_json::from_slice(line) {
        Ok(e) => e,
        Err(e) => {
            let known = ["step", "log", "progress", "done", "error"];
            let v: Option<serde_json::Value> = serde_json::from_slice(line).ok();
            if let Some(kind) = v.as_ref().and_then(|v| v["event"].as_str()) {
                if !known.contains(&kind) {
                    return Ok(None);
                }
            }
            return Err(Error::Protocol(format!(
                "bad build event ({e}): {}",
                String::from_utf8_lossy(&line[..line.len().min(200)])
            )));
        }
    };
    on_event(&event);
    Ok(match event {
        BuildEvent::Done { image, .. } => Some(Ok(image)),
        BuildEvent::Error {
            error,
            exit_code,
            output,
        } => Some(Err(Error::Build {
            code: error.code,
            message: error.message,
            exit_code,
            output,
        })),
        _ => None,
    })
}

/// Prints build events for a person: `[2/4] pip_install six` (with
/// `(cached)` when nothing runs), the steps' output indented, a pull's
/// bytes per layer (at most about once a second each), and the result.
pub struct BuildPrinter<W: Write> {
    out: W,
    /// When each layer's progress was last printed.
    progress: HashMap<String, Instant>,
    finished_layers: HashSet<String>,
}

impl BuildPrinter<std::io::Stderr> {
    pub fn stderr() -> Self {
        BuildPrinter::new(std::io::stderr())
    }
}

impl<W: Write> BuildPrinter<W> {
    pub fn new(out: W) -> Self {
        BuildPrinter {
            out,
            progress: HashMap::new(),
            finished_layers: HashSet::new(),
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    /// Prints one event (write errors are ignored: progress is best effort).
    pub fn event(&mut self, e: &BuildEvent) {
        let _ = match e {
            BuildEvent::Step {
                index,
                total,
                description,
                cached,
            } => writeln!(
                self.out,
                "[{index}/{total}] {description}{}",
                if *cached { " (cached)" } else { "" }
            ),
            BuildEvent::Log { line } => writeln!(self.out, "    {}", line.trim_end()),
            BuildEvent::Progress {
                layer,
                bytes,
                total,
            } => {
                let finished = total.is_some_and(|t| *bytes >= t);
                let due = self
                    .progress
                    .get(layer)
                    .is_none_or(|t| t.elapsed().as_secs_f64() >= 1.0);
                if (finished && self.finished_layers.insert(layer.clone())) || (!finished && due) {
                    self.progress.insert(layer.clone(), Instant::now());
                    let short = layer.strip_prefix("sha256:").unwrap_or(layer);
                    let short = &short[..short.len().min(12)];
                    match total {
                        Some(t) => writeln!(
                            self.out,
                            "    layer {short}: {} / {}",
                            human_bytes(*bytes),
                            human_bytes(*t)
                        ),
                        None => writeln!(self.out, "    layer {short}: {}", human_bytes(*bytes)),
                    }
                } else {
                    Ok(())
                }
            }
            BuildEvent::Done { image, seconds } => {
                writeln!(self.out, "image {} ready ({seconds:.1} s)", image.image_id)
            }
            // The caller reports the error it gets back.
            BuildEvent::Error { .. } => Ok(()),
        };
        let _ = self.out.flush();
    }
}

/// `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The daemon's images: list, look up, delete, pull, collect garbage.
pub struct Images;

impl Images {
    /// Every image the daemon has (built-in ones included).
    pub async fn list(client: &Client) -> Result<Vec<api::ImageInfo>> {
        let l: api::ImageList = client.get_json("/v1/images").await?;
        Ok(l.images)
    }

    /// An image by built-in name, tag or ID (`NotFound` if unknown).
    pub async fn get(client: &Client, name: &str) -> Result<api::ImageInfo> {
        client.get_json(&format!("/v1/images/{}", seg(name))).await
    }

    /// Deletes a tag (only the tag) or an image ID (the image and its
    /// tags); `conflict` while a running sandbox uses it.
    pub async fn delete(client: &Client, name: &str) -> Result<()> {
        client
            .call(Method::DELETE, &format!("/v1/images/{}", seg(name)), None)
            .await
    }

    /// Removes layers and blobs no image refers to.
    pub async fn gc(client: &Client) -> Result<api::GcResult> {
        let resp = client.send(Method::POST, "/v1/images/gc", None).await?;
        client.read_json(resp).await
    }

    /// Fetches (again, even if cached) a registry image; `secret` names a
    /// stored secret with `REGISTRY_USERNAME` / `REGISTRY_PASSWORD`.
    pub async fn pull<F>(
        client: &Client,
        reference: &str,
        secret: Option<&str>,
        tag: Option<&str>,
        on_event: F,
    ) -> Result<api::ImageInfo>
    where
        F: FnMut(&BuildEvent) + Send,
    {
        let body = api::PullImage {
            reference: reference.into(),
            secret: secret.map(String::from),
            tag: tag.map(String::from),
        };
        let resp = client.post("/v1/images/pull", &body).await?;
        read_events(client, resp, on_event).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gworker_api::ErrorCode;
    use std::os::unix::fs::PermissionsExt;

    fn tmpdir(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("gwc-image-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    /// A temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tree(name: &str) -> TempDir {
        let d = tmpdir(name);
        std::fs::create_dir_all(d.join("src/pkg")).unwrap();
        std::fs::write(d.join("src/b.txt"), "bee\n").unwrap();
        std::fs::write(d.join("src/a.sh"), "#!/bin/sh\necho a\n").unwrap();
        std::fs::set_permissions(d.join("src/a.sh"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::fs::write(d.join("src/pkg/mod.py"), "x = 1\n").unwrap();
        std::os::unix::fs::symlink("b.txt", d.join("src/link")).unwrap();
        d
    }

    fn entries(tar: &[u8]) -> Vec<(String, tar::EntryType, u32, u64, String)> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                let mut body = String::new();
                std::io::Read::read_to_string(&mut e, &mut body).unwrap();
                assert_eq!(h.uid().unwrap(), 0);
                assert_eq!(h.gid().unwrap(), 0);
                assert_eq!(h.mtime().unwrap(), 0);
                assert_eq!(h.username().unwrap(), Some(""));
                assert_eq!(h.groupname().unwrap(), Some(""));
                let link = h
                    .link_name()
                    .unwrap()
                    .map(|l| l.display().to_string())
                    .unwrap_or_default();
                (
                    e.path().unwrap().display().to_string(),
                    h.entry_type(),
                    h.mode().unwrap(),
                    h.size().unwrap(),
                    if link.is_empty() { body } else { link },
                )
            })
            .collect()
    }

    fn only_local(img: &Image) -> &LocalSource {
        match img.steps.last() {
            Some(Step::Local(l)) => l,
            s => panic!("not a local step: {s:?}"),
        }
    }

    #[test]
    fn dir_tar_is_sorted_and_carries_no_time_or_owner() {
        let d = tree("sorted");
        let img = Image::from_name("busybox")
            .add_local_dir(d.join("src"), "/app/src")
            .unwrap();
        let l = only_local(&img);
        assert_eq!(l.dest, "/app/src");
        let e = entries(&l.pack().unwrap());
        let names: Vec<&str> = e.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["a.sh", "b.txt", "link", "pkg", "pkg/mod.py"]);
        assert_eq!(e[0].2, 0o750, "permission bits kept");
        assert_eq!(e[0].4, "#!/bin/sh\necho a\n");
        assert_eq!(e[2].1, tar::EntryType::Symlink);
        assert_eq!(e[2].4, "b.txt");
        assert_eq!(e[3].1, tar::EntryType::Directory);
        assert_eq!(e[4].4, "x = 1\n");
    }

    #[test]
    fn same_dir_same_digest_changed_content_other_digest() {
        let d = tree("digest");
        let img = Image::from_name("busybox")
            .add_local_dir(d.join("src"), "/app")
            .unwrap();
        let (spec1, blobs1) = img.pack().unwrap();
        // A new mtime (rewrite with the same bytes) changes nothing.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(d.join("src/b.txt"), "bee\n").unwrap();
        let (spec2, blobs2) = img.pack().unwrap();
        assert_eq!(spec1, spec2);
        assert_eq!(blobs1, blobs2);
        let api::ImageStep::AddFiles { blob, dest } = &spec1.steps[0] else {
            panic!("{spec1:?}")
        };
        assert_eq!(dest, "/app");
        assert_eq!(*blob, digest_of(&blobs1[0].1));
        assert!(blob.starts_with("sha256:") && blob.len() == 7 + 64);

        std::fs::write(d.join("src/b.txt"), "bee!\n").unwrap();
        let (spec3, _) = img.pack().unwrap();
        assert_ne!(spec1, spec3, "changed content: another digest");
        std::fs::write(d.join("src/b.txt"), "bee\n").unwrap();
        std::fs::set_permissions(d.join("src/b.txt"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let (spec4, _) = img.pack().unwrap();
        assert_ne!(spec1, spec4, "changed mode: another digest");
    }

    #[test]
    fn local_file_is_one_entry_named_after_remote() {
        let d = tree("file");
        let img = Image::from_name("busybox")
            .add_local_file(d.join("src/a.sh"), "/app/run.sh")
            .unwrap();
        let l = only_local(&img);
        assert_eq!(l.dest, "/app");
        let e = entries(&l.pack().unwrap());
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].0.as_str(), e[0].2), ("run.sh", 0o750));

        // A trailing slash: into that directory, under the local name.
        let img = Image::from_name("busybox")
            .add_local_file(d.join("src/b.txt"), "/etc/")
            .unwrap();
        let l = only_local(&img);
        assert_eq!(l.dest, "/etc");
        assert_eq!(entries(&l.pack().unwrap())[0].0, "b.txt");

        // At the root; and through a symlink, the file's content.
        let img = Image::from_name("busybox")
            .add_local_file(d.join("src/link"), "/x")
            .unwrap();
        let l = only_local(&img);
        assert_eq!(l.dest, "/");
        let e = entries(&l.pack().unwrap());
        assert_eq!(
            (e[0].0.as_str(), e[0].1, e[0].4.as_str()),
            ("x", tar::EntryType::Regular, "bee\n")
        );
    }

    #[test]
    fn client_side_validation() {
        let d = tree("validation");
        let f = d.join("src/b.txt");
        let msg = |r: Result<Image>| match r {
            Err(Error::InvalidArgument(m)) => m,
            r => panic!("expected InvalidArgument, got {r:?}"),
        };
        let base = || Image::from_name("busybox");
        assert!(msg(base().add_local_file(&f, "app/b.txt")).contains("absolute"));
        assert!(msg(base().add_local_file(&f, "/app/../etc/b")).contains(".."));
        assert!(msg(base().add_local_dir(d.join("src"), "/a/..")).contains(".."));
        assert!(msg(base().add_local_file(&f, "/app/.")).contains("does not name a file"));
        assert_eq!(
            only_local(&base().add_local_file(&f, "/").unwrap()).dest,
            "/"
        );
        let missing = d.join("nope.py");
        let m = msg(base().add_local_file(&missing, "/app/x.py"));
        assert!(
            m.contains(&missing.display().to_string()) && m.contains("does not exist"),
            "{m}"
        );
        assert!(msg(base().add_local_dir(&missing, "/app")).contains("nope.py"));
        assert!(msg(base().add_local_file(d.join("src"), "/app")).contains("add_local_dir"));
        assert!(msg(base().add_local_dir(&f, "/app")).contains("add_local_file"));

        let m = msg(Image::debian_slim(Some("2.7")));
        assert!(
            m.contains("2.7") && m.contains("3.11") && m.contains("3.13"),
            "{m}"
        );
        let err = Image::debian_slim(Some("2.7")).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidRequest));
        assert!(Image::debian_slim(Some("3.13")).is_ok());
        assert!(Image::debian_slim(None).is_ok());
        // `..` inside a name is not a `..` component.
        assert!(base().add_local_file(&f, "/app/x..y").is_ok());
    }

    #[test]
    fn names_and_specs() {
        assert_eq!(Image::from("busybox").name(), Some("busybox"));
        assert_eq!(Image::from_name("busybox").workdir("/w").name(), None);
        assert_eq!(Image::from_registry("python:3.12-slim").name(), None);
        let (spec, blobs) = Image::from_registry_with_secret("r/x:1", "creds")
            .apt_install(["jq"])
            .pip_install(["six"])
            .run_commands(["echo hi"])
            .env([("A", "b")])
            .workdir("/app")
            .pack()
            .unwrap();
        assert!(blobs.is_empty());
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "base": {"registry": {"reference": "r/x:1", "secret": "creds"}},
                "steps": [
                    {"apt_install": ["jq"]}, {"pip_install": ["six"]},
                    {"run_commands": ["echo hi"]}, {"env": {"A": "b"}}, {"workdir": "/app"}
                ]
            })
        );
    }

    #[test]
    fn events_are_read_line_by_line() {
        let mut seen = Vec::new();
        let mut on = |e: &BuildEvent| seen.push(e.clone());
        let r = handle_line(
            br#"{"event":"step","index":1,"total":2,"description":"x","cached":true}"#,
            &mut on,
        )
        .unwrap();
        assert!(r.is_none());
        assert!(handle_line(br#"{"event":"future_kind","x":1}"#, &mut on)
            .unwrap()
            .is_none());
        assert!(handle_line(b"not json", &mut on).is_err());
        let r = handle_line(
            br#"{"event":"error","error":{"code":"image_build_failed","message":"step 2 failed"},"exit_code":3,"output":"boom"}"#,
            &mut on,
        )
        .unwrap()
        .unwrap();
        match r {
            Err(Error::Build {
                code: ErrorCode::ImageBuildFailed,
                exit_code: Some(3),
                output: Some(ref o),
                ref message,
            }) => {
                assert_eq!(o, "boom");
                assert_eq!(message, "step 2 failed");
            }
            r => panic!("{r:?}"),
        }
        let e = r.unwrap_err();
        assert_eq!(
            e.to_string(),
            "step 2 failed (image_build_failed, exit code 3)"
        );
        let e = Error::Build {
            code: ErrorCode::ImageBuildFailed,
            message: "the command failed with exit code 3".into(),
            exit_code: Some(3),
            output: None,
        };
        assert_eq!(
            e.to_string(),
            "the command failed with exit code 3 (image_build_failed)"
        );
        assert!(e.is_build_failure());
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn printer_lines() {
        let mut p = BuildPrinter::new(Vec::new());
        p.event(&BuildEvent::Step {
            index: 2,
            total: 4,
            description: "pip_install six".into(),
            cached: true,
        });
        p.event(&BuildEvent::Log {
            line: "hello\n".into(),
        });
        for b in [0, 10, 100, 100] {
            p.event(&BuildEvent::Progress {
                layer: "sha256:0123456789abcdef".into(),
                bytes: b << 20,
                total: Some(100 << 20),
            });
        }
        let out = String::from_utf8(p.into_inner()).unwrap();
        assert_eq!(
            out,
            "[2/4] pip_install six (cached)\n    hello\n    layer 0123456789ab: 0 B / 100.0 MiB\n    layer 0123456789ab: 100.0 MiB / 100.0 MiB\n"
        );
    }
}
