//! Resource limits through the host's cgroup v1 controllers.
//!
//! The supervisor creates `/sys/fs/cgroup/{memory,cpu,pids}/gworker/ID`
//! itself, writes the limits there, and hands runsc that path as the
//! container's `cgroupsPath`. runsc joins existing cgroups without owning
//! them, so they outlive `runsc run`: the supervisor can read whether the
//! memory controller OOM-killed the sandbox before it removes them, and can
//! change limits later (a warm-pool sandbox gets its user's limits at claim).

use std::io;
use std::path::{Path, PathBuf};

/// Where the host's cgroups are mounted.
pub const ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: &[&str] = &["memory", "cpu", "pids"];
/// Host threads of gVisor itself (sentry, gofer) counted by the pids
/// controller on top of the sandbox's own processes.
pub const SENTRY_THREADS: u64 = 256;
/// The kernel's default `cpu.shares`.
pub const DEFAULT_CPU_SHARES: u64 = 1024;
/// `cpu.shares` of a warm-pool slot until it is claimed.
pub const POOL_CPU_SHARES: u64 = 64;
const CPU_PERIOD_US: u64 = 100_000;

/// Limits of one sandbox; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Cores, fractional (1.5 = one and a half cores of CPU time).
    pub cpu: Option<f64>,
    /// Memory in MiB (the whole sandbox: its processes, its in-memory root
    /// filesystem writes, and gVisor's own memory).
    pub memory_mb: Option<u64>,
    /// Processes (and threads) inside the sandbox.
    pub max_processes: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Cgroup {
    /// `/gworker/ID`, as runsc's `cgroupsPath`.
    pub path: String,
}

impl Cgroup {
    pub fn new(id: &str) -> Cgroup {
        Cgroup {
            path: format!("/gworker/{id}"),
        }
    }

    fn dir(&self, controller: &str) -> PathBuf {
        PathBuf::from(format!("{ROOT}/{controller}{}", self.path))
    }

    /// Creates the cgroups and writes the limits.
    pub fn create(&self, limits: &Limits) -> io::Result<()> {
        for c in CONTROLLERS {
            std::fs::create_dir_all(self.dir(c))?;
        }
        self.apply(limits)
    }

    /// (Re)writes the limits; unlimited where `None`.
    pub fn apply(&self, limits: &Limits) -> io::Result<()> {
        let mem = limits
            .memory_mb
            .map(|m| (m * 1024 * 1024).to_string())
            .unwrap_or_else(|| "-1".into());
        std::fs::write(self.dir("memory").join("memory.limit_in_bytes"), mem)?;
        let quota = limits
            .cpu
            .map(|c| ((c * CPU_PERIOD_US as f64) as i64).max(1000))
            .unwrap_or(-1);
        std::fs::write(
            self.dir("cpu").join("cpu.cfs_period_us"),
            CPU_PERIOD_US.to_string(),
        )?;
        std::fs::write(self.dir("cpu").join("cpu.cfs_quota_us"), quota.to_string())?;
        let pids = limits
            .max_processes
            .map(|p| (p + SENTRY_THREADS).to_string())
            .unwrap_or_else(|| "max".into());
        std::fs::write(self.dir("pids").join("pids.max"), pids)?;
        Ok(())
    }

    /// CPU weight against other sandboxes (the kernel's default is 1024).
    /// Warm-pool slots boot at a low weight so refills yield to sandboxes
    /// users are waiting for; a claim restores the default.
    pub fn set_cpu_shares(&self, shares: u64) -> io::Result<()> {
        std::fs::write(
            self.dir("cpu").join("cpu.shares"),
            shares.max(2).to_string(),
        )
    }

    /// Whether the memory controller killed something in this cgroup.
    pub fn oom_killed(&self) -> bool {
        let text = std::fs::read_to_string(self.dir("memory").join("memory.oom_control"))
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .any(|n| n.trim().parse::<u64>().map(|n| n > 0).unwrap_or(false))
    }

    /// Whether the pids controller refused a new task (the process limit).
    pub fn pids_exhausted(&self) -> bool {
        let text =
            std::fs::read_to_string(self.dir("pids").join("pids.events")).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.strip_prefix("max "))
            .any(|n| n.trim().parse::<u64>().map(|n| n > 0).unwrap_or(false))
    }

    /// This cgroup's path in every mounted v1 hierarchy but ours, and in the
    /// v2 tree (runsc's, on a host whose supervisors have no v1 controllers
    /// of their own), where it exists: runsc made it.
    fn runsc_dirs(&self) -> Vec<PathBuf> {
        let ours: Vec<PathBuf> = CONTROLLERS
            .iter()
            .map(|c| Path::new(ROOT).join(c))
            .collect();
        hierarchies(Path::new(ROOT))
            .into_iter()
            .filter(|h| !ours.contains(h))
            .map(|h| h.join(self.path.trim_start_matches('/')))
            .filter(|d| d.is_dir())
            .collect()
    }

    /// Removes the cgroups (they must be empty: call after runsc ended).
    pub fn remove(&self) {
        // Tasks may still be leaving.
        self.remove_within(std::time::Duration::from_secs(1));
    }

    /// Removes the cgroups once they are empty, waiting up to `wait` for
    /// their tasks to leave (attempts 20 ms apart); busy ones stay after
    /// that. For a sandbox whose supervisor was killed, where nothing else
    /// will: its runsc ends on its own soon after.
    ///
    /// Also removes what runsc made itself under the same path in the other
    /// v1 hierarchies (freezer, devices, cpuset, …), which it removes only
    /// when it ends cleanly: a sandbox whose runsc or sentry was killed left
    /// them (hundreds had piled up on the benchmark host).
    pub fn remove_within(&self, wait: std::time::Duration) {
        let attempts = (wait.as_millis() / 20).max(1) as usize;
        let ours = CONTROLLERS.iter().map(|c| self.dir(c));
        for dir in ours.chain(self.runsc_dirs()) {
            for attempt in 1..=attempts {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) if attempt < attempts => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    Err(_) => {}
                }
            }
        }
    }
}

/// The roots of the cgroup trees under `root`: `root` itself (the v2 tree)
/// and each v1 hierarchy mounted in it (real directories: `cpu` may be a
/// link to `cpu,cpuacct`).
pub fn hierarchies(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(root) {
        out.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What runsc leaves in the other hierarchies goes with ours.
    #[test]
    fn removal_takes_runsc_s_cgroups_in_other_hierarchies_too() {
        let freezer = Path::new(ROOT).join("freezer");
        if !nix::unistd::geteuid().is_root() || !freezer.is_dir() {
            eprintln!("skipped: needs root and a cgroup v1 freezer hierarchy");
            return;
        }
        let id = format!("sb-cgtest-{}", std::process::id());
        let cg = Cgroup::new(&id);
        cg.create(&Limits::default()).unwrap();
        let left = freezer.join("gworker").join(&id);
        std::fs::create_dir_all(&left).unwrap();
        cg.remove();
        assert!(!left.exists(), "runsc's freezer cgroup is left");
        for c in CONTROLLERS {
            assert!(!cg.dir(c).exists(), "{c}");
        }
    }
}
