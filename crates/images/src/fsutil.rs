//! Filesystem helpers for image builds: ELF inspection, tree sizes, and a
//! removal that never follows a build's leftovers into mounted filesystems.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Whether `path` is an ELF executable without a program interpreter
/// (`PT_INTERP`), i.e. a static or static-pie binary that runs in any rootfs.
pub fn is_static_elf(path: &Path) -> io::Result<bool> {
    let mut data = Vec::new();
    fs::File::open(path)?
        .take(64 * 1024)
        .read_to_end(&mut data)?;
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what}", path.display()),
        )
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" {
        return Err(bad("not an ELF file"));
    }
    if data[4] != 2 || data[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF file"));
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let phentsize = u16_at(0x36);
    let phnum = u16_at(0x38);
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        if phentsize < 4 || off + 4 > data.len() {
            return Err(bad("program headers out of range"));
        }
        let p_type = u32::from_le_bytes(data[off..off + 4].try_into().expect("4 bytes"));
        if p_type == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Apparent size of a directory tree in bytes (regular files and symlinks;
/// hard links counted once). Does not follow symlinks.
pub fn tree_size(root: &Path) -> io::Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?; // does not follow symlinks
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() || meta.file_type().is_symlink() {
                if meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
                    continue;
                }
                total += meta.len();
            }
        }
    }
    Ok(total)
}

pub use gworker_runtime::host::mounts_under;

/// Remove a directory tree left by a build (possibly a failed or killed one).
///
/// A killed mmdebstrap can leave /proc, /sys or /dev mounted inside its
/// target; plain `remove_dir_all` would then try to delete the host's files
/// through them. So: lazily unmount everything below `dir` first, and never
/// descend into a directory on another device than `dir` itself.
pub fn remove_build_tree(dir: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return fs::remove_file(dir);
    }
    for m in mounts_under(dir) {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %m.display(), error = %e, "cannot unmount leftover mount in image build dir");
        }
    }
    remove_same_dev(dir, meta.dev())
}

fn remove_same_dev(dir: &Path, dev: u64) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = entry.metadata()?;
        if meta.is_dir() {
            if meta.dev() != dev {
                return Err(io::Error::other(format!(
                    "refusing to remove {}: another filesystem is mounted there",
                    path.display()
                )));
            }
            remove_same_dev(&path, dev)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    fs::remove_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_shell_is_dynamic_elf() {
        // /bin/sh on Debian is dash, dynamically linked.
        assert!(!is_static_elf(Path::new("/bin/sh")).unwrap());
        assert!(is_static_elf(Path::new("/etc/passwd")).is_err());
    }
}
