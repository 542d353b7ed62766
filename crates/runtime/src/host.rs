//! Host kernel settings the daemon tunes for runsc at start-up.
//!
//! Starting a gVisor sandbox waits for RCU grace periods many times over: Go
//! runtimes registering `membarrier`, runsc joining the sandbox's cgroups,
//! the sentry and gofer growing their fd tables. Each wait is a full grace
//! period (10-25 ms on the 2-CPU VMs this was measured on), so a plain
//! `runsc run` of `echo hi` spent most of its 130 ms asleep. With
//! `/sys/kernel/rcu_expedited` set, each wait is an expedited grace period
//! (an IPI to each CPU, microseconds): 130 -> 75 ms for the same `runsc run`,
//! and 4.3 -> 3.4 ms for a fork+exec inside a sandbox. The cost is an IPI per
//! `synchronize_rcu()` on every CPU of the machine, which is negligible on a
//! machine that runs sandboxes; `gworker serve --no-host-tuning` leaves the
//! setting alone.

use std::io;
use std::path::{Path, PathBuf};

/// The sysfs switch that makes every `synchronize_rcu()` expedited.
pub const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

/// What [`tune`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tuned {
    /// It was set already (by an earlier daemon, or the administrator).
    AlreadySet,
    /// This call set it.
    Set,
}

/// Sets `/sys/kernel/rcu_expedited` to 1 unless it is already.
pub fn tune() -> io::Result<Tuned> {
    tune_at(Path::new(RCU_EXPEDITED))
}

fn tune_at(path: &Path) -> io::Result<Tuned> {
    let now = std::fs::read_to_string(path)?;
    if now.trim() == "1" {
        return Ok(Tuned::AlreadySet);
    }
    std::fs::write(path, "1")?;
    Ok(Tuned::Set)
}

/// Open files below which runsc cannot start a sandbox: with a hard limit
/// of 256 its boot fails ("cannot read client sync file: EOF"); 512 works.
pub const NOFILE_NEEDED: u64 = 1024;
/// What the daemon asks for (the kernel's default `fs.nr_open`).
const NOFILE_WANTED: u64 = 1 << 20;

/// The open-files limit before and after [`raise_nofile`]: (soft, hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFile {
    pub before: (u64, u64),
    pub after: (u64, u64),
}

/// Raises this process's RLIMIT_NOFILE, which supervisors and runsc
/// inherit: the hard limit up to `fs.nr_open` (capped at 2^20) when the
/// process may (CAP_SYS_RESOURCE), then the soft limit up to the hard one,
/// as Go programs such as runsc do for themselves.
pub fn raise_nofile() -> io::Result<NoFile> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let before = getrlimit(Resource::RLIMIT_NOFILE)?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE_WANTED);
    let want = nr_open.min(NOFILE_WANTED);
    let (soft, hard) = before;
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(NoFile {
            before,
            after: (want, want),
        });
    }
    let soft_want = hard.min(want.max(soft));
    if soft_want != soft {
        setrlimit(Resource::RLIMIT_NOFILE, soft_want, hard)?;
    }
    Ok(NoFile {
        before,
        after: getrlimit(Resource::RLIMIT_NOFILE)?,
    })
}

/// This process's soft open-files limit when it is below [`NOFILE_NEEDED`].
pub fn nofile_too_low() -> Option<u64> {
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    (soft < NOFILE_NEEDED).then_some(soft)
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo(r"/plain\04"), r"/plain\04");
    }

    #[test]
    fn raises_the_soft_open_files_limit_to_the_hard_one() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Not lower: other tests of this process run meanwhile.
        let low = hard.min(NOFILE_NEEDED);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        let n = raise_nofile().unwrap();
        assert_eq!(n.before, (low, hard));
        assert!(n.after.1 >= hard, "{n:?}");
        let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            n.after.0,
            n.after.1.min(nr_open.min(NOFILE_WANTED)),
            "{n:?}"
        );
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), n.after);
    }

    #[test]
    fn sets_the_switch_once() {
        let dir = std::env::temp_dir().join(format!("gw-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("rcu_expedited");
        std::fs::write(&f, "0\n").unwrap();
        assert_eq!(tune_at(&f).unwrap(), Tuned::Set);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "1");
        assert_eq!(tune_at(&f).unwrap(), Tuned::AlreadySet);
        assert!(tune_at(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
