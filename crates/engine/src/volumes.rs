//! Volumes: named, persistent directories kept in the data directory and
//! bind-mounted read-write into sandboxes. See `docs/volumes.md`.
//!
//! Layout: `DATA/volumes/NAME/meta.json` (written last: a volume without it
//! does not exist), `DATA/volumes/NAME/data/` (what sandboxes see), and for a
//! volume with a quota `DATA/volumes/NAME/disk.img`, an ext4 image
//! loop-mounted on `data/` (writes past its size fail with ENOSPC; the host
//! disk is never filled).
//!
//! Host-side access resolves every path inside the volume: `..` is refused,
//! a leading `/` means the volume's root, and symlinks are resolved with
//! `openat2(RESOLVE_IN_ROOT)`, so one pointing outside lands inside.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use gworker_api::{self as api, ErrorCode};
use gworker_supervisor::VolumeMount;
use serde::{Deserialize, Serialize};

use crate::secrets::check_name;
use crate::{now, Engine, EngineError, Result};

/// Smallest quota accepted (ext4's own metadata needs a few MiB).
pub const MIN_QUOTA: u64 = 16 << 20;
/// What a sandbox's volumes are recorded in, in its directory.
const SANDBOX_VOLUMES: &str = "volumes.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    name: String,
    created_at: f64,
    quota_bytes: Option<u64>,
}

impl Meta {
    fn to_api(&self) -> api::Volume {
        api::Volume {
            name: self.name.clone(),
            created_at: self.created_at,
            quota_bytes: self.quota_bytes,
        }
    }
}

fn not_found(name: &str) -> EngineError {
    EngineError::NotFound(format!("no volume named {name:?}"))
}

fn io_err(what: &str, e: std::io::Error) -> EngineError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => EngineError::Coded {
            code: ErrorCode::NoSpace,
            message: format!("{what}: the volume is full (its quota, or the host disk)"),
        },
        Some(libc::ENOENT) => EngineError::NotFound(format!("{what}: no such file or directory")),
        Some(libc::ENOTDIR) => {
            EngineError::Invalid(format!("{what}: a path component is not a directory"))
        }
        Some(libc::EISDIR) => EngineError::Invalid(format!("{what}: is a directory")),
        Some(libc::ENOTEMPTY) => EngineError::Invalid(format!(
            "{what}: the directory is not empty (remove it recursively)"
        )),
        Some(libc::ELOOP) => EngineError::Invalid(format!("{what}: too many symlinks")),
        _ => EngineError::Internal(format!("{what}: {e}")),
    }
}

/// A path inside a volume as its components: no `..`, no `.`, no empty ones.
pub fn volume_path(p: &str) -> Result<Vec<String>> {
    if p.contains('\0') {
        return Err(EngineError::Invalid("path contains a NUL byte".into()));
    }
    let mut out = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(EngineError::Invalid(format!(
                    "path {p:?} contains `..`: volume paths cannot leave the volume"
                )))
            }
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

/// Checks and normalizes the mount paths of a create request.
pub fn check_mount_paths<'a>(paths: impl Iterator<Item = &'a String>) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for p in paths {
        let bad = |why: &str| EngineError::Invalid(format!("volume mount path {p:?} {why}"));
        if !p.starts_with('/') {
            return Err(bad("must be absolute"));
        }
        if p.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        let mut comps = Vec::new();
        for c in p.split('/') {
            match c {
                "" => {}
                "." | ".." => return Err(bad("must not contain `.` or `..`")),
                c => comps.push(c),
            }
        }
        if comps.is_empty() {
            return Err(bad("cannot be `/`"));
        }
        let norm = format!("/{}", comps.join("/"));
        for reserved in ["/proc", "/sys", "/dev", "/.gworker"] {
            if norm == reserved || norm.starts_with(&format!("{reserved}/")) {
                return Err(bad(&format!("cannot be {reserved} or under it")));
            }
        }
        for other in &out {
            let nested = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
            if nested(&norm, other) || nested(other, &norm) {
                return Err(bad(&format!(
                    "overlaps the volume mounted at {other:?}: volume paths cannot be nested"
                )));
            }
        }
        out.push(norm);
    }
    Ok(out)
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| EngineError::Invalid("path contains a NUL byte".into()))
}

/// `openat2(dirfd, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`:
/// `..` and symlinks (absolute ones too) resolve inside `dirfd`.
fn open_in(root: &OwnedFd, rel: &[String], flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
    let path = if rel.is_empty() {
        ".".to_string()
    } else {
        rel.join("/")
    };
    let c = CString::new(path).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid fd, NUL-terminated path, `how` lives across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn is_mountpoint(dir: &Path) -> bool {
    match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

fn run_tool(cmd: &mut std::process::Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| EngineError::Internal(format!("{what}: cannot run it: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(EngineError::Internal(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// An upload in progress: a temporary file beside its destination, renamed
/// over it on [`Upload::commit`] (after fsync), removed if dropped.
pub struct Upload {
    file: Option<std::fs::File>,
    dir: OwnedFd,
    tmp: CString,
    name: CString,
}

impl Upload {
    pub fn file(&mut self) -> &mut std::fs::File {
        self.file.as_mut().expect("upload in progress")
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file().write_all(data).map_err(|e| io_err("write", e))
    }

    /// Makes the file durable and visible under its name.
    pub fn commit(mut self) -> Result<()> {
        let f = self.file.take().expect("upload in progress");
        f.sync_all().map_err(|e| io_err("fsync", e))?;
        drop(f);
        // SAFETY: valid dir fd and NUL-terminated names.
        let r = unsafe {
            libc::renameat(
                self.dir.as_raw_fd(),
                self.tmp.as_ptr(),
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
            )
        };
        if r != 0 {
            return Err(io_err("rename", std::io::Error::last_os_error()));
        }
        // SAFETY: valid fd.
        unsafe { libc::fsync(self.dir.as_raw_fd()) };
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // SAFETY: valid dir fd and NUL-terminated name.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.tmp.as_ptr(), 0) };
        }
    }
}

/// The volumes of the data directory. Stateless: the file system is the truth.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    root: PathBuf,
}

impl VolumeStore {
    pub fn new(data_dir: &Path) -> VolumeStore {
        VolumeStore {
            root: data_dir.join("volumes"),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The directory sandboxes mount.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.dir(name).join("data")
    }

    fn meta(&self, name: &str) -> Result<Meta> {
        check_name("volume", name).map_err(|_| not_found(name))?;
        let raw = std::fs::read(self.dir(name).join("meta.json")).map_err(|_| not_found(name))?;
        serde_json::from_slice(&raw)
            .map_err(|e| EngineError::Internal(format!("volume {name}: meta.json: {e}")))
    }

    pub fn get(&self, name: &str) -> Result<api::Volume> {
        Ok(self.meta(name)?.to_api())
    }

    pub fn list(&self) -> Result<Vec<api::Volume>> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return Ok(out);
        };
        for e in rd.flatten() {
            if let Some(name) = e.file_name().to_str() {
                if let Ok(m) = self.meta(name) {
                    out.push(m.to_api());
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Mounts the disk images of quota'd volumes that are not mounted (after
    /// a host reboot). Errors are logged: the other volumes stay usable.
    /// At daemon start: removes volumes a crash left half-made (no
    /// `meta.json`: they never existed for anyone), then mounts the disk
    /// images of quota'd volumes.
    pub fn mount_all(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() && !e.path().join("meta.json").exists() {
                    tracing::info!(volume = %name, "removing a half-made volume");
                    if let Err(err) = self.remove(&name) {
                        tracing::warn!(volume = %name, error = %err, "cannot remove a half-made volume");
                    }
                }
            }
        }
        let Ok(list) = self.list() else { return };
        for v in list.iter().filter(|v| v.quota_bytes.is_some()) {
            if let Err(e) = self.ensure_mounted(&v.name) {
                tracing::warn!(volume = %v.name, error = %e, "cannot mount the volume's disk image");
            }
        }
    }

    fn ensure_mounted(&self, name: &str) -> Result<()> {
        let data = self.data_dir(name);
        if is_mountpoint(&data) {
            return Ok(());
        }
        run_tool(
            std::process::Command::new("mount")
                .arg("-o")
                .arg("loop,nodev,nosuid")
                .arg(self.dir(name).join("disk.img"))
                .arg(&data),
            "mount -o loop (a volume quota needs the daemon to run as root)",
        )
    }

    pub fn create(&self, req: &api::CreateVolume) -> Result<(api::Volume, bool)> {
        check_name("volume", &req.name)?;
        if let Some(q) = req.quota_bytes {
            if q < MIN_QUOTA {
                return Err(EngineError::Invalid(format!(
                    "quota_bytes must be at least {MIN_QUOTA} (16 MiB), got {q}"
                )));
            }
        }
        std::fs::create_dir_all(&self.root)
            .map_err(|e| EngineError::Internal(format!("cannot create volumes dir: {e}")))?;
        let dir = self.dir(&req.name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if let Ok(m) = self.meta(&req.name) {
                    if req.exist_ok {
                        return Ok((m.to_api(), false));
                    }
                    return Err(EngineError::Coded {
                        code: ErrorCode::Conflict,
                        message: format!("a volume named {:?} exists already", req.name),
                    });
                }
                // Left half-made by a crash (or being made right now): start over.
                return Err(EngineError::Coded {
                    code: ErrorCode::Conflict,
                    message: format!(
                        "volume {:?} is being created (or a crash left it half-made: delete it)",
                        req.name
                    ),
                });
            }
            Err(e) => return Err(EngineError::Internal(format!("cannot create volume: {e}"))),
        }
        let made = (|| {
            let data = dir.join("data");
            std::fs::create_dir(&data).map_err(|e| io_err("mkdir", e))?;
            if let Some(q) = req.quota_bytes {
                let img = dir.join("disk.img");
                let f = std::fs::File::create(&img).map_err(|e| io_err("disk image", e))?;
                f.set_len(q).map_err(|e| io_err("disk image", e))?;
                drop(f);
                run_tool(
                    std::process::Command::new("mkfs.ext4")
                        .args(["-q", "-F", "-m", "0", "-E", "root_owner=0:0"])
                        .arg(&img),
                    "mkfs.ext4 (install e2fsprogs)",
                )?;
                self.ensure_mounted(&req.name)?;
                let _ = std::fs::remove_dir(data.join("lost+found"));
            }
            let meta = Meta {
                name: req.name.clone(),
                created_at: now(),
                quota_bytes: req.quota_bytes,
            };
            let tmp = dir.join("meta.json.tmp");
            let mut f = std::fs::File::create(&tmp).map_err(|e| io_err("meta", e))?;
            f.write_all(&serde_json::to_vec_pretty(&meta).expect("meta serializes"))
                .and_then(|_| f.sync_all())
                .map_err(|e| io_err("meta", e))?;
            std::fs::rename(&tmp, dir.join("meta.json")).map_err(|e| io_err("meta", e))?;
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(meta)
        })();
        match made {
            Ok(m) => Ok((m.to_api(), true)),
            Err(e) => {
                let _ = self.remove(&req.name);
                Err(e)
            }
        }
    }

    /// Unmounts (if quota'd) and removes everything of the volume.
    fn remove(&self, name: &str) -> Result<()> {
        let dir = self.dir(name);
        let data = dir.join("data");
        if is_mountpoint(&data) {
            run_tool(
                std::process::Command::new("umount").arg(&data),
                "umount of the volume's disk image",
            )?;
        }
        // meta.json first: from then on the volume does not exist.
        let _ = std::fs::remove_file(dir.join("meta.json"));
        std::fs::remove_dir_all(&dir)
            .map_err(|e| EngineError::Internal(format!("cannot remove volume {name}: {e}")))
    }

    fn open_root(&self, name: &str) -> Result<OwnedFd> {
        self.meta(name)?;
        let data = self.data_dir(name);
        let c = cstr(&data.to_string_lossy())?;
        // SAFETY: NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io_err("volume", std::io::Error::last_os_error()));
        }
        // SAFETY: fresh fd.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Lists `path` (a directory, or one file), recursively if asked.
    pub fn listdir(
        &self,
        name: &str,
        path: &str,
        recursive: bool,
    ) -> Result<Vec<api::VolumeEntry>> {
        let root = self.open_root(name)?;
        let rel = volume_path(path)?;
        let fd = open_in(&root, &rel, libc::O_PATH, 0).map_err(|e| io_err(path, e))?;
        let meta = std::fs::metadata(fd_path(&fd)).map_err(|e| io_err(path, e))?;
        let mut out = Vec::new();
        if !meta.is_dir() {
            out.push(entry(rel.join("/"), &meta));
            return Ok(out);
        }
        fn walk(
            dir: &Path,
            prefix: &str,
            recursive: bool,
            out: &mut Vec<api::VolumeEntry>,
        ) -> std::io::Result<()> {
            let mut names: Vec<_> = std::fs::read_dir(dir)?.flatten().collect();
            names.sort_by_key(|e| e.file_name());
            for e in names {
                let n = e.file_name().to_string_lossy().into_owned();
                let p = if prefix.is_empty() {
                    n
                } else {
                    format!("{prefix}/{n}")
                };
                let Ok(m) = e.path().symlink_metadata() else {
                    continue;
                };
                out.push(entry(p.clone(), &m));
                if recursive && m.is_dir() {
                    walk(&e.path(), &p, recursive, out)?;
                }
            }
            Ok(())
        }
        walk(&fd_path(&fd), &rel.join("/"), recursive, &mut out).map_err(|e| io_err(path, e))?;
        Ok(out)
    }

    /// Opens a regular file of the volume for reading.
    pub fn open_file(&self, name: &str, path: &str) -> Result<std::fs::File> {
        let root = self.open_root(name)?;
        let rel = volume_path(path)?;
        let fd = open_in(&root, &rel, libc::O_RDONLY, 0).map_err(|e| io_err(path, e))?;
        let f = std::fs::File::from(fd);
        let m = f.metadata().map_err(|e| io_err(path, e))?;
        if !m.is_file() {
            return Err(EngineError::Invalid(format!(
                "{path:?} is not a regular file"
            )));
        }
        Ok(f)
    }

    /// Opens the directory `rel` of the volume, creating missing directories.
    fn mkdirs(&self, root: &OwnedFd, rel: &[String], what: &str) -> Result<OwnedFd> {
        for i in 0..rel.len() {
            let parent = open_in(root, &rel[..i], libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(|e| io_err(what, e))?;
            let c = cstr(&rel[i])?;
            // SAFETY: valid fd, NUL-terminated name.
            let r = unsafe { libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), 0o755) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(io_err(what, e));
                }
            }
        }
        open_in(root, rel, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(|e| io_err(what, e))
    }

    /// Makes a directory (and its parents) in the volume.
    pub fn mkdir(&self, name: &str, path: &str) -> Result<()> {
        let root = self.open_root(name)?;
        let rel = volume_path(path)?;
        self.mkdirs(&root, &rel, path).map(|_| ())
    }

    /// Starts writing `path` (parents are created); see [`Upload`].
    pub fn upload(&self, name: &str, path: &str) -> Result<Upload> {
        let root = self.open_root(name)?;
        let mut rel = volume_path(path)?;
        let Some(file) = rel.pop() else {
            return Err(EngineError::Invalid(
                "a file path is needed, not the volume's root".into(),
            ));
        };
        let dir = self.mkdirs(&root, &rel, path)?;
        let tmp = format!(".gworker-upload-{}", &crate::new_id()[3..19]);
        let (tmp, name) = (cstr(&tmp)?, cstr(&file)?);
        // SAFETY: valid dir fd, NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                tmp.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o644,
            )
        };
        if fd < 0 {
            return Err(io_err(path, std::io::Error::last_os_error()));
        }
        Ok(Upload {
            // SAFETY: fresh fd.
            file: Some(unsafe { std::fs::File::from_raw_fd(fd) }),
            dir,
            tmp,
            name,
        })
    }

    /// Removes a file, symlink or empty directory (any directory if `recursive`).
    pub fn remove_path(&self, name: &str, path: &str, recursive: bool) -> Result<()> {
        let root = self.open_root(name)?;
        let mut rel = volume_path(path)?;
        let Some(last) = rel.pop() else {
            return Err(EngineError::Invalid(
                "cannot remove the volume's root; delete the volume".into(),
            ));
        };
        let dir = open_in(&root, &rel, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| io_err(path, e))?;
        let target = fd_path(&dir).join(&last);
        let m = target.symlink_metadata().map_err(|e| io_err(path, e))?;
        let c = cstr(&last)?;
        if m.is_dir() {
            if recursive {
                std::fs::remove_dir_all(&target).map_err(|e| io_err(path, e))?;
                return Ok(());
            }
            // SAFETY: valid fd, NUL-terminated name.
            if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
                return Err(io_err(path, std::io::Error::last_os_error()));
            }
        // SAFETY: valid fd, NUL-terminated name.
        } else if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(io_err(path, std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

fn entry(path: String, m: &std::fs::Metadata) -> api::VolumeEntry {
    let ft = m.file_type();
    api::VolumeEntry {
        path,
        kind: if ft.is_symlink() {
            api::EntryKind::Symlink
        } else if ft.is_dir() {
            api::EntryKind::Dir
        } else if ft.is_file() {
            api::EntryKind::File
        } else {
            api::EntryKind::Other
        },
        size: m.len(),
        mtime: m.mtime() as f64 + m.mtime_nsec() as f64 / 1e9,
    }
}

/// Mount path → volume name.
pub type Mounts = BTreeMap<String, String>;

impl Engine {
    pub fn volumes(&self) -> VolumeStore {
        VolumeStore::new(&self.cfg.data_dir)
    }

    fn sandbox_volumes(&self, id: &str) -> Mounts {
        std::fs::read(self.sandbox_dir(id).join(SANDBOX_VOLUMES))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// A create request's volumes, checked (and made if asked). A restore
    /// without volumes gets the snapshot's; with volumes, they must be the
    /// snapshot's.
    pub(crate) fn resolve_volumes(
        &self,
        req: Option<&BTreeMap<String, api::VolumeRef>>,
        snapshot: Option<&Mounts>,
    ) -> Result<Mounts> {
        let empty = BTreeMap::new();
        let req = req.unwrap_or(&empty);
        let paths = check_mount_paths(req.keys())?;
        let mut mounts = Mounts::new();
        for (norm, (_, r)) in paths.into_iter().zip(req.iter()) {
            check_name("volume", &r.name)?;
            mounts.insert(norm, r.name.clone());
        }
        let store = self.volumes();
        if let Some(snap) = snapshot {
            if mounts.is_empty() {
                mounts = snap.clone();
            } else if mounts != *snap {
                return Err(EngineError::Coded {
                    code: ErrorCode::SnapshotIncompatible,
                    message: format!(
                        "the snapshot was taken with volumes {snap:?}, not {mounts:?}: a restore needs the same mounts (or none given)"
                    ),
                });
            }
            for name in mounts.values() {
                store.get(name).map_err(|_| EngineError::Coded {
                    code: ErrorCode::SnapshotIncompatible,
                    message: format!("the snapshot's volume {name:?} no longer exists"),
                })?;
            }
            return Ok(mounts);
        }
        for r in req.values() {
            if r.create_if_missing {
                store.create(&api::CreateVolume {
                    name: r.name.clone(),
                    quota_bytes: None,
                    exist_ok: true,
                })?;
            } else {
                store.get(&r.name)?;
            }
        }
        Ok(mounts)
    }

    /// Records a new sandbox's volumes in its directory (for `start`,
    /// snapshots and the in-use check of volume deletion).
    pub(crate) fn attach_volumes(&self, id: &str, mounts: &Mounts) -> Result<()> {
        if mounts.is_empty() {
            return Ok(());
        }
        let dir = self.sandbox_dir(id);
        std::fs::create_dir_all(&dir)
            .and_then(|_| {
                std::fs::write(
                    dir.join(SANDBOX_VOLUMES),
                    serde_json::to_vec(mounts).expect("mounts serialize"),
                )
            })
            .map_err(|e| EngineError::Internal(format!("cannot record volumes: {e}")))
    }

    /// The bind mounts of a sandbox, for its launch config.
    pub(crate) fn volume_mounts(&self, id: &str) -> Vec<VolumeMount> {
        let store = self.volumes();
        self.sandbox_volumes(id)
            .into_iter()
            .map(|(destination, name)| VolumeMount {
                source: store.data_dir(&name),
                destination,
            })
            .collect()
    }

    /// The volumes a snapshot of sandbox `id` depends on.
    pub(crate) fn snapshot_volumes(&self, id: &str) -> Mounts {
        self.sandbox_volumes(id)
    }

    pub fn create_volume(&self, req: api::CreateVolume) -> Result<(api::Volume, bool)> {
        self.volumes().create(&req)
    }

    /// Deletes a volume that no live sandbox mounts.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let store = self.volumes();
        store.get(name)?;
        for row in self.reg.list_sandboxes()? {
            if row.state != "exited" && self.sandbox_volumes(&row.id).values().any(|n| n == name) {
                return Err(EngineError::Coded {
                    code: ErrorCode::Conflict,
                    message: format!(
                        "volume {name:?} is mounted by sandbox {} (terminate it first)",
                        row.id
                    ),
                });
            }
        }
        store.remove(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_checked() {
        let ok = |p: &[&str]| {
            check_mount_paths(p.iter().map(|s| s.to_string()).collect::<Vec<_>>().iter())
        };
        assert_eq!(ok(&["/data/", "/b"]).unwrap(), ["/data", "/b"]);
        for bad in [
            &["data"][..],
            &["/"],
            &["/proc/x"],
            &["/sys"],
            &["/dev/shm"],
            &["/a/../b"],
            &["/a", "/a/b"],
            &["/a/b", "/a"],
            &["/x", "/x/"],
        ] {
            assert!(ok(bad).is_err(), "{bad:?}");
        }
        assert!(ok(&["/process", "/a", "/ab"]).is_ok());
    }

    #[test]
    fn host_side_access_stays_inside_the_volume() {
        let data = std::env::temp_dir().join(format!("gw-vol-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let outside = data.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("host.txt"), b"host").unwrap();
        let s = VolumeStore::new(&data);
        s.create(&api::CreateVolume {
            name: "v".into(),
            quota_bytes: None,
            exist_ok: false,
        })
        .unwrap();
        let mut up = s.upload("v", "/a/b/c.txt").unwrap();
        up.write(b"hello").unwrap();
        up.commit().unwrap();
        let mut got = String::new();
        std::io::Read::read_to_string(&mut s.open_file("v", "a/b/c.txt").unwrap(), &mut got)
            .unwrap();
        assert_eq!(got, "hello");
        assert!(s.open_file("v", "../outside/host.txt").is_err());
        assert!(s.upload("v", "a/../../x").is_err());
        // A symlink to the host's directory resolves inside the volume.
        std::os::unix::fs::symlink(&outside, s.data_dir("v").join("link")).unwrap();
        assert_eq!(
            s.open_file("v", "link/host.txt").unwrap_err().code(),
            ErrorCode::NotFound
        );
        if let Ok(mut up) = s.upload("v", "link/new.txt") {
            up.write(b"x").unwrap();
            up.commit().unwrap();
        }
        assert!(!outside.join("new.txt").exists());
        let names: Vec<String> = s
            .listdir("v", "/", true)
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert!(names.contains(&"a/b/c.txt".to_string()), "{names:?}");
        s.remove_path("v", "link", false).unwrap();
        assert!(outside.join("host.txt").exists());
        assert!(s.remove_path("v", "a", false).is_err());
        s.remove_path("v", "a", true).unwrap();
        assert_eq!(s.list().unwrap().len(), 1);
        s.remove("v").unwrap();
        assert!(s.list().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&data);
    }
}
