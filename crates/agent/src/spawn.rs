//! Starting one process for a `Spawn` request: working directory, exact
//! environment, three pipes, own process group. Turns every failure into a
//! [`SpawnErrorKind`] and a message a person understands.
//!
//! The process is *not* waited for here: the event loop reaps every child with
//! `waitpid(-1)`. We use a `vfork`-style clone ([`sys::spawn`]) rather than
//! std's `Command`: in a static binary std falls back to a full `fork`, which
//! costs milliseconds under gVisor. So `argv[0]` is looked up in the
//! `PATH` of the environment given to the process here, and the child gets an
//! empty signal mask and default dispositions for every signal.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use gworker_proto::{Spawn, SpawnErrorKind, SPAWN_MKDIR_CWD};

use crate::sys::{self, errstr};

/// A started process and our ends of its three pipes.
pub struct Started {
    pub os_pid: i32,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The child's ends of the pipes, still open here: the caller drops them
    /// after answering (three system calls fewer before the answer). Until
    /// they are dropped the output pipes cannot report their end.
    pub child_ends: [OwnedFd; 3],
}

#[derive(Debug)]
pub struct Failure {
    pub kind: SpawnErrorKind,
    pub message: String,
}

fn fail(kind: SpawnErrorKind, message: String) -> Failure {
    Failure { kind, message }
}

/// `KEY=VALUE` → (KEY, VALUE); `None` when there is no `=` after a non-empty key.
pub fn split_env(entry: &[u8]) -> Option<(&OsStr, &OsStr)> {
    let eq = entry.iter().skip(1).position(|&b| b == b'=')? + 1;
    Some((
        OsStr::from_bytes(&entry[..eq]),
        OsStr::from_bytes(&entry[eq + 1..]),
    ))
}

fn check_workdir(dir: &Path, create: bool) -> Result<(), Failure> {
    let shown = dir.display();
    if create {
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
        {
            return Err(fail(
                SpawnErrorKind::NoWorkdir,
                format!("create workdir \"{shown}\": {}", errstr(&e)),
            ));
        }
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(fail(
            SpawnErrorKind::NoWorkdir,
            format!("workdir \"{shown}\": not a directory"),
        )),
        Err(e) => Err(fail(
            SpawnErrorKind::NoWorkdir,
            format!("workdir \"{shown}\": {}", errstr(&e)),
        )),
    }
}

pub fn start(s: &Spawn) -> Result<Started, Failure> {
    let Some(prog) = s.argv.first() else {
        return Err(fail(SpawnErrorKind::Other, "empty argv".into()));
    };
    let shown = String::from_utf8_lossy(prog);
    if prog.is_empty() {
        return Err(fail(
            SpawnErrorKind::NotFound,
            "exec \"\": no such file or directory".into(),
        ));
    }
    let cwd = (!s.cwd.is_empty()).then(|| Path::new(OsStr::from_bytes(&s.cwd)));
    // An existing workdir is not checked here: the child's chdir finds out
    // (one system call less per spawn), see `sys::SpawnError::Chdir`.
    if let (Some(dir), true) = (cwd, s.flags & SPAWN_MKDIR_CWD != 0) {
        check_workdir(dir, true)?;
    }
    let nul = |what: &str| {
        fail(
            SpawnErrorKind::Other,
            format!("exec \"{shown}\": {what} contains a NUL byte"),
        )
    };
    let argv = s
        .argv
        .iter()
        .map(|a| CString::new(a.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| nul("an argument"))?;
    let env = environment(&s.env).map_err(|_| nul("the environment"))?;
    // The agent runs in "/" (the bundle's cwd) and never leaves it: no chdir
    // there.
    let cwd_c = match cwd {
        Some(_) if s.cwd == b"/" => None,
        Some(_) => Some(CString::new(s.cwd.as_slice()).map_err(|_| nul("the workdir"))?),
        None => None,
    };
    let program = resolve(prog, &s.env, cwd).map_err(|errno| {
        // A missing workdir is the better explanation, as before any lookup.
        if let Some(dir) = cwd {
            if let Err(f) = check_workdir(dir, false) {
                return f;
            }
        }
        exec_failure(&shown, cwd, &io::Error::from_raw_os_error(errno))
    })?;
    let program = CString::new(program).map_err(|_| nul("the program"))?;

    let other =
        |what: &str, e: io::Error| fail(SpawnErrorKind::Other, format!("{what}: {}", errstr(&e)));
    let (in_r, in_w) = sys::pipe().map_err(|e| other("pipe", e))?;
    let (out_r, out_w) = sys::pipe().map_err(|e| other("pipe", e))?;
    let (err_r, err_w) = sys::pipe().map_err(|e| other("pipe", e))?;
    let child_fds = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let os_pid =
        sys::spawn(&program, &argv, &env, cwd_c.as_deref(), child_fds).map_err(|e| match e {
            sys::SpawnError::Chdir(e) => {
                let d = cwd.map(|d| d.display().to_string()).unwrap_or_default();
                fail(
                    SpawnErrorKind::NoWorkdir,
                    format!("workdir \"{d}\": {}", errstr(&e)),
                )
            }
            sys::SpawnError::Other(e) => exec_failure(&shown, cwd, &e),
        })?;
    Ok(Started {
        os_pid,
        stdin: in_w,
        stdout: out_r,
        stderr: err_r,
        child_ends: [in_r, out_w, err_w],
    })
}

fn exec_failure(shown: &str, cwd: Option<&Path>, e: &io::Error) -> Failure {
    let kind = match e.raw_os_error() {
        // The workdir was checked before, but may have vanished since.
        Some(libc::ENOENT) if cwd.is_some_and(|d| !d.is_dir()) => {
            let d = cwd.map(|d| d.display().to_string()).unwrap_or_default();
            return fail(
                SpawnErrorKind::NoWorkdir,
                format!("workdir \"{d}\": {}", errstr(e)),
            );
        }
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => SpawnErrorKind::NotFound,
        Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EPERM) => {
            SpawnErrorKind::NotExecutable
        }
        _ => SpawnErrorKind::Other,
    };
    fail(kind, format!("exec \"{shown}\": {}", errstr(e)))
}

/// `KEY=VALUE` entries for `envp`: malformed ones dropped, the last of a
/// repeated key wins (as with a shell's or std's environment).
fn environment(entries: &[Vec<u8>]) -> Result<Vec<CString>, std::ffi::NulError> {
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    let mut keep: Vec<&[u8]> = Vec::with_capacity(entries.len());
    for e in entries.iter().rev() {
        if let Some((k, _)) = split_env(e) {
            if seen.insert(k) {
                keep.push(e);
            }
        }
    }
    keep.into_iter().rev().map(CString::new).collect()
}

/// Finds the program like `execvp` would, in the `PATH` of the environment
/// given to the process (glibc's default `/bin:/usr/bin` without one). Relative
/// candidates are checked against the workdir, where the child will run them.
/// Errors are errnos: ENOENT (not found), EACCES (found, not executable).
fn resolve(prog: &[u8], env: &[Vec<u8>], cwd: Option<&Path>) -> Result<Vec<u8>, i32> {
    if prog.contains(&b'/') {
        return Ok(prog.to_vec());
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix(b"PATH="))
        .unwrap_or(b"/bin:/usr/bin");
    let mut err = libc::ENOENT;
    for dir in path.split(|&b| b == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let mut cand = dir.to_vec();
        cand.push(b'/');
        cand.extend_from_slice(prog);
        let rel = Path::new(OsStr::from_bytes(&cand));
        let check = match cwd {
            Some(c) if rel.is_relative() => c.join(rel),
            _ => rel.to_path_buf(),
        };
        match std::fs::metadata(&check) {
            Ok(m) if m.is_file() && sys::executable(&check, &m) => return Ok(cand),
            Ok(_) => err = libc::EACCES,
            Err(_) => {}
        }
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_env_keys_keep_the_last() {
        let env: Vec<Vec<u8>> = [&b"A=1"[..], b"B=2", b"bad", b"A=3"]
            .iter()
            .map(|e| e.to_vec())
            .collect();
        let got = environment(&env).unwrap();
        assert_eq!(
            got,
            [CString::new("B=2").unwrap(), CString::new("A=3").unwrap()]
        );
    }

    #[test]
    fn programs_are_resolved_in_the_given_path() {
        let env = vec![b"PATH=/nonexistent:/bin:/usr/bin".to_vec()];
        assert_eq!(resolve(b"sh", &env, None), Ok(b"/bin/sh".to_vec()));
        assert_eq!(resolve(b"./x", &env, None), Ok(b"./x".to_vec()));
        assert_eq!(resolve(b"no-such-prog-here", &env, None), Err(libc::ENOENT));
        // A directory named like the program is found but cannot run.
        assert_eq!(
            resolve(b"tmp", &[b"PATH=/".to_vec()], None),
            Err(libc::EACCES)
        );
    }

    #[test]
    fn env_entries_split_at_the_first_equals() {
        assert_eq!(split_env(b"A=1"), Some((OsStr::new("A"), OsStr::new("1"))));
        assert_eq!(
            split_env(b"A=b=c"),
            Some((OsStr::new("A"), OsStr::new("b=c")))
        );
        assert_eq!(
            split_env(b"EMPTY="),
            Some((OsStr::new("EMPTY"), OsStr::new("")))
        );
        assert_eq!(split_env(b"NOVALUE"), None);
        assert_eq!(split_env(b"=x"), None);
        assert_eq!(split_env(b""), None);
    }
}
