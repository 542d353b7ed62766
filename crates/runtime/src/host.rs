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
use std::path::Path;

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

#[cfg(test)]
mod tests {
    use super::*;

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
