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
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    crate::spawn_detached(
        exe,
        &["supervise-standby".as_ref(), placeholder.as_os_str()],
        &[
            (null.as_raw_fd(), 1),
            (null.as_raw_fd(), 2),
            (theirs.as_raw_fd(), gworker_supervisor::server::STANDBY_FD),
        ],
    )?;
    drop(theirs);
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
        // SOCK_SEQPACKET: the message (and its descriptors) went whole or
        // not at all.
        sendmsg::<()>(
            self.ctl.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io::Error::from)?;
        Ok(())
    }
}
