//! A warm slot's volumes: the host side of [`crate::SLOT_VOLUMES_PATH`].
//!
//! A slot boots before anyone knows which volumes its user will ask for, or
//! where. So it boots with one extra mount, a host directory of its own
//! (`DATA/volbinds/ID`, a shared bind mount of itself) at
//! [`crate::SLOT_VOLUMES_PATH`]. At claim, the supervisor bind-mounts each
//! volume's directory on `DATA/volbinds/ID/N` on the host; the mount
//! propagates into runsc's mount namespaces, and the gofer serves it. The
//! agent then bind-mounts `/.gworker/vols/N` on the volume's path inside the
//! sandbox and detaches `/.gworker/vols`.
//!
//! A restore of such a sandbox's snapshot binds the same volumes, in the same
//! order, under its own directory before runsc starts.
//!
//! Rule: this directory is never removed recursively. Its entries are the
//! volumes themselves while mounted; [`remove`] unmounts, then removes only
//! empty directories.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::host::mounts_under;

/// `DATA/volbinds/ID` for a daemon's data directory.
pub fn dir_for(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("volbinds").join(id)
}

fn to_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Makes `dir` a shared bind mount of itself, so that mounts made under it
/// later reach runsc's mount namespaces (slaves of the host's).
pub fn create(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    if !mounts_under(dir).iter().any(|m| m == dir) {
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(to_io)?;
    }
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(to_io)
}

/// Bind-mounts `source` (a volume's directory) on `dir/index`.
pub fn bind(dir: &Path, index: usize, source: &Path) -> io::Result<()> {
    let target = dir.join(index.to_string());
    match std::fs::create_dir(&target) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    mount(
        Some(source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(to_io)
}

/// Binds each of `sources` under `dir`, the Nth as `dir/N` (see [`bind`]).
pub fn bind_all<'a>(dir: &Path, sources: impl IntoIterator<Item = &'a Path>) -> io::Result<()> {
    sources
        .into_iter()
        .enumerate()
        .try_for_each(|(i, s)| bind(dir, i, s))
}

/// Unmounts everything at or under `dir` (deepest first, detached), then
/// removes its now empty directories. A directory that is still not empty
/// stays: nothing here deletes a file.
pub fn remove(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // Deepest first.
    for m in &mounts_under(dir) {
        match umount2(m, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(to_io(e)),
        }
    }
    if !mounts_under(dir).is_empty() {
        return Err(io::Error::other(format!(
            "{} still has mounts under it",
            dir.display()
        )));
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let _ = std::fs::remove_dir(e.path());
    }
    std::fs::remove_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (mounts): a volume bound under a slot's directory is
    /// unmounted by `remove`, and its files stay where they are.
    #[test]
    fn remove_unmounts_and_never_deletes_a_volumes_files() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let base = std::env::temp_dir().join(format!("gworker-volbind-{}", std::process::id()));
        let vol = base.join("vol");
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::write(vol.join("keep"), b"data").unwrap();
        let slot = base.join("slot");
        create(&slot).unwrap();
        bind(&slot, 0, &vol).unwrap();
        assert_eq!(std::fs::read(slot.join("0/keep")).unwrap(), b"data");
        assert_eq!(mounts_under(&slot).len(), 2);
        remove(&slot).unwrap();
        assert!(!slot.exists());
        assert_eq!(std::fs::read(vol.join("keep")).unwrap(), b"data");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
