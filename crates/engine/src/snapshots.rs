//! Snapshot storage: a snapshot is runsc's checkpoint files in
//! `DATA/snapshots/ID/image/` plus a metadata document (also in the
//! registry) recording what a restore depends on and the content hash that is
//! checked before every restore.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use gworker_supervisor::CheckpointProc;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a restore depends on; a restore is refused when any of it differs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Requirements {
    pub runsc_version: String,
    pub image: String,
    pub rootfs: PathBuf,
    pub cpu: String,
    /// Mount path → volume name: a restore mounts the same volumes.
    #[serde(default)]
    pub volumes: std::collections::BTreeMap<String, String>,
    /// The source had a network namespace (runsc `--network=sandbox`): a
    /// restore needs one too (runsc's flags must match).
    #[serde(default)]
    pub networked: bool,
    /// The source was (or was restored from) a warm slot: its volumes came
    /// through the slot's volume directory (`gworker_runtime::volbind`), and
    /// a restore must mount them the same way.
    #[serde(default)]
    pub slot_volumes: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotMeta {
    pub snapshot_id: String,
    pub source_sandbox_id: String,
    pub created_at: f64,
    pub size_bytes: u64,
    pub sha256: String,
    pub pause_ms: f64,
    pub requires: Requirements,
    pub procs: Vec<CheckpointProc>,
    pub next_id: u32,
    /// The source's own environment and workdir, the base for new execs.
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub cmd: Vec<String>,
}

impl SnapshotMeta {
    pub fn to_api(&self) -> gworker_api::Snapshot {
        gworker_api::Snapshot {
            snapshot_id: self.snapshot_id.clone(),
            source_sandbox_id: self.source_sandbox_id.clone(),
            image: self.requires.image.clone(),
            created_at: self.created_at,
            size_bytes: self.size_bytes,
            sha256: self.sha256.clone(),
            pause_ms: self.pause_ms,
            processes: self
                .procs
                .iter()
                .filter(|p| p.exit_code.is_none())
                .map(|p| p.id)
                .collect(),
        }
    }
}

/// The CPU a checkpoint was taken on: model and feature flags (a restore on a
/// CPU without some feature the checkpoint may use is refused).
pub fn cpu_signature() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let mut h = Sha256::new();
    h.update(field("flags").as_bytes());
    format!(
        "{} / flags {}",
        field("model name"),
        &hex::encode(h.finalize())[..16]
    )
}

/// Files of a checkpoint, sorted, relative to its directory.
fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            out.push(PathBuf::from(e.file_name()));
        }
    }
    out.sort();
    Ok(out)
}

/// SHA-256 over every file's name and content, and the total size.
pub fn hash_dir(dir: &Path) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut size = 0;
    let mut buf = vec![0u8; 1 << 20];
    for name in files(dir)? {
        h.update(name.as_os_str().as_encoded_bytes());
        h.update([0]);
        let mut f = std::fs::File::open(dir.join(&name))?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            size += n as u64;
            h.update(&buf[..n]);
        }
        h.update([0]);
    }
    Ok((hex::encode(h.finalize()), size))
}

/// Remembers which checkpoint directories were verified, keyed by their files'
/// sizes and modification times: an unchanged snapshot is hashed once per
/// daemon, a modified one again.
#[derive(Default)]
pub struct Verified {
    seen: Mutex<HashMap<PathBuf, Vec<FileStamp>>>,
}

/// A file's path, size and modification time.
type FileStamp = (PathBuf, u64, SystemTime);

impl Verified {
    fn stamp(dir: &Path) -> std::io::Result<Vec<FileStamp>> {
        files(dir)?
            .into_iter()
            .map(|n| {
                let m = std::fs::metadata(dir.join(&n))?;
                Ok((n, m.len(), m.modified()?))
            })
            .collect()
    }

    /// Checks the directory against `sha256`; `Ok(false)` when it differs.
    pub fn check(&self, dir: &Path, sha256: &str) -> std::io::Result<bool> {
        let stamp = Self::stamp(dir)?;
        if self.seen.lock().unwrap().get(dir) == Some(&stamp) {
            return Ok(true);
        }
        let (got, _) = hash_dir(dir)?;
        if got != sha256 {
            return Ok(false);
        }
        self.seen.lock().unwrap().insert(dir.to_path_buf(), stamp);
        Ok(true)
    }

    pub fn forget(&self, dir: &Path) {
        self.seen.lock().unwrap().remove(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_detects_changes_and_truncation() {
        let dir = std::env::temp_dir().join(format!("gw-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("checkpoint.img"), vec![7u8; 100_000]).unwrap();
        std::fs::write(dir.join("pages.img"), b"abc").unwrap();
        let (h, size) = hash_dir(&dir).unwrap();
        assert_eq!(size, 100_003);
        let v = Verified::default();
        assert!(v.check(&dir, &h).unwrap());
        // Truncation changes size and hash.
        std::fs::write(dir.join("checkpoint.img"), vec![7u8; 99_999]).unwrap();
        assert!(!v.check(&dir, &h).unwrap());
        std::fs::write(dir.join("checkpoint.img"), vec![7u8; 100_000]).unwrap();
        assert!(v.check(&dir, &h).unwrap());
        // A flipped byte of the same size is caught too.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut bytes = vec![7u8; 100_000];
        bytes[5] = 8;
        std::fs::write(dir.join("checkpoint.img"), bytes).unwrap();
        assert!(!v.check(&dir, &h).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
