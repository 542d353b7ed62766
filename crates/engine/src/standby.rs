//! One supervisor process kept started ahead of need (see
//! `gworker_supervisor::server::standby_main`): a create hands it the
//! sandbox's directory and descriptors over a socket instead of forking the
//! daemon and starting a process, which took 0.5-2.3 ms of every cold create.
//! Only creates a user waits for take it; warm-pool refills start their own.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

pub(crate) struct Standby {
    /// A SOCK_SEQPACKET socket: the one message arrives whole.
    ctl: OwnedFd,
}

/// Starts `exe supervise-standby PLACEHOLDER` in its own session, its end of
/// a socket pair on `STANDBY_FD`. `placeholder` is as long as a sandbox
/// directory's path: the standby writes `supervise DIR` over it once it has
/// its sandbox, so that `ps` shows it like any supervisor.
pub(crate) fn start(exe: &Path, placeholder: &Path) -> io::Result<Standby> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let fd = theirs.as_raw_fd();
    let target = gworker_supervisor::server::STANDBY_FD;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("supervise-standby")
        .arg(placeholder)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if fd == target {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, target) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(theirs);
    // Reap it whenever it ends, so it never lingers as a zombie of the daemon.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(Standby { ctl: ours })
}

impl Standby {
    /// Makes it the supervisor of `dir`: `fds` are the listening socket, the
    /// log file and, if any, the secrets pipe's read end. An error means it is
    /// gone (nothing was handed over); start one the usual way instead.
    pub(crate) fn assign(self, dir: &Path, fds: &[RawFd]) -> io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::unix::ffi::OsStrExt;
        let path = dir.as_os_str().as_bytes();
        let iov = [io::IoSlice::new(path)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let sent = sendmsg::<()>(
            self.ctl.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io::Error::from)?;
        if sent != path.len() {
            return Err(io::Error::other("short write to the standby supervisor"));
        }
        Ok(())
    }
}
