//! Starting the daemon's helper processes (supervisors, the standby) with
//! `posix_spawn`: no copy of the daemon's page tables, which `fork` makes
//! while holding the daemon's memory-map lock, one fork at a time.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Descriptors are first copied to `temp_base(fds) + i`, above every source
/// and target, then to their place, so that no placement overwrites a
/// descriptor a later one reads. (Low numbers: a soft RLIMIT_NOFILE of a
/// few hundred still allows them.)
fn temp_base(fds: &[(RawFd, RawFd)]) -> RawFd {
    fds.iter()
        .map(|&(fd, at)| fd.max(at))
        .max()
        .unwrap_or(2)
        .max(2)
        + 1
}

/// `posix_spawn` of `exe args` with the daemon's environment: a new session,
/// an empty signal mask, every signal at its default, stdin from /dev/null,
/// `(fd, at)` of `fds` at `at`. Returns the child's pid (the caller reaps it).
pub(crate) fn posix_spawn_detached(
    exe: &Path,
    args: &[&OsStr],
    fds: &[(RawFd, RawFd)],
) -> io::Result<i32> {
    let cstr = |s: &OsStr| {
        CString::new(s.as_bytes()).map_err(|_| io::Error::other("NUL byte in an argument"))
    };
    let path = cstr(exe.as_os_str())?;
    let mut argv = vec![path.clone()];
    for a in args {
        argv.push(cstr(a)?);
    }
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let ptrs = |v: &[CString]| -> Vec<*mut libc::c_char> {
        v.iter()
            .map(|c| c.as_ptr() as *mut libc::c_char)
            .chain(std::iter::once(std::ptr::null_mut()))
            .collect()
    };
    let (argv_p, env_p) = (ptrs(&argv), ptrs(&env));
    let dev_null = c"/dev/null";

    let mut actions = FileActions::new()?;
    check(unsafe {
        // SAFETY: `actions` is initialised; the path outlives the spawn.
        libc::posix_spawn_file_actions_addopen(
            &mut actions.0,
            0,
            dev_null.as_ptr(),
            libc::O_RDONLY,
            0,
        )
    })?;
    let base = temp_base(fds);
    for (i, &(fd, _)) in fds.iter().enumerate() {
        // SAFETY: as above.
        check(unsafe {
            libc::posix_spawn_file_actions_adddup2(&mut actions.0, fd, base + i as RawFd)
        })?;
    }
    for (i, &(_, at)) in fds.iter().enumerate() {
        let tmp = base + i as RawFd;
        // SAFETY: as above.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut actions.0, tmp, at) })?;
        // SAFETY: as above.
        check(unsafe { libc::posix_spawn_file_actions_addclose(&mut actions.0, tmp) })?;
    }

    let mut attr = SpawnAttr::new()?;
    // SAFETY: `attr` is initialised; the sets are plain local values.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        check(libc::posix_spawnattr_setsigmask(&mut attr.0, &none))?;
        check(libc::posix_spawnattr_setsigdefault(&mut attr.0, &all))?;
        let flags = libc::POSIX_SPAWN_SETSID as libc::c_int
            | libc::POSIX_SPAWN_SETSIGMASK
            | libc::POSIX_SPAWN_SETSIGDEF;
        check(libc::posix_spawnattr_setflags(
            &mut attr.0,
            flags as libc::c_short,
        ))?;
    }

    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid and NUL-terminated (arrays end in null)
    // for the duration of the call.
    check(unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &actions.0,
            &attr.0,
            argv_p.as_ptr(),
            env_p.as_ptr(),
        )
    })?;
    Ok(pid)
}

/// A posix_spawn function's result: 0 or an errno.
fn check(r: libc::c_int) -> io::Result<()> {
    match r {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<FileActions> {
        // SAFETY: init fills the zeroed struct.
        let mut a: libc::posix_spawn_file_actions_t = unsafe { std::mem::zeroed() };
        check(unsafe { libc::posix_spawn_file_actions_init(&mut a) })?;
        Ok(FileActions(a))
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

struct SpawnAttr(libc::posix_spawnattr_t);

impl SpawnAttr {
    fn new() -> io::Result<SpawnAttr> {
        // SAFETY: init fills the zeroed struct.
        let mut a: libc::posix_spawnattr_t = unsafe { std::mem::zeroed() };
        check(unsafe { libc::posix_spawnattr_init(&mut a) })?;
        Ok(SpawnAttr(a))
    }
}

impl Drop for SpawnAttr {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (std::fs::File::from(r), std::fs::File::from(w))
    }

    #[test]
    fn places_descriptors_in_a_new_session_with_default_signals() {
        let (mut out_r, out_w) = pipe();
        let (mut extra_r, extra_w) = pipe();
        let script = "echo out; echo extra >&7; ps -o sid= -p $$; ps -o pid= -p $$; \
                      grep -E '^(SigBlk|SigIgn)' /proc/self/status; ls /proc/self/fd | sort -n | tr '\\n' ' '";
        let fds = [
            (out_w.as_raw_fd(), 1),
            (out_w.as_raw_fd(), 2),
            (extra_w.as_raw_fd(), 7),
        ];
        let base = temp_base(&fds);
        let pid = posix_spawn_detached(
            Path::new("/bin/sh"),
            &["-c".as_ref(), script.as_ref()],
            &fds,
        )
        .unwrap();
        drop((out_w, extra_w));
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 0)
        );
        let mut out = String::new();
        out_r.read_to_string(&mut out).unwrap();
        let mut extra = String::new();
        extra_r.read_to_string(&mut extra).unwrap();
        assert_eq!(extra, "extra\n");
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert_eq!(lines[0], "out");
        assert_eq!(lines[1], lines[2], "its own session: {out}");
        assert_eq!(lines[3], "SigBlk:\t0000000000000000");
        // Nothing ignored but glibc's own two (32, 33), which its posix_spawn
        // leaves ignored and glibc's start-up in the child takes back.
        let ign = u64::from_str_radix(lines[4].trim_start_matches("SigIgn:\t"), 16).unwrap();
        assert_eq!(ign & !(0b11 << 31), 0, "{out}");
        // The placed ones; none of the temporary copies (the test process's
        // own descriptors are close-on-exec, as all of the daemon's are).
        let open: Vec<&str> = lines[5].split_whitespace().collect();
        for fd in ["0", "1", "2", "7"] {
            assert!(open.contains(&fd), "{out}");
        }
        for tmp in base..base + fds.len() as RawFd {
            assert!(
                !open.contains(&tmp.to_string().as_str()),
                "{tmp} left open: {out}"
            );
        }
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let e = posix_spawn_detached(Path::new("/nonexistent/prog"), &[], &[]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
