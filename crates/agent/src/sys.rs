//! Thin, safe wrappers over the few Linux system calls the agent needs that std
//! does not offer: epoll, signalfd, eventfd, non-blocking pipe I/O, waitpid,
//! kill and prctl. Nothing here knows about the protocol.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// A level-triggered epoll instance; each registration carries a `u64` token.
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain system call; the returned fd is owned by us from here on.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits for events; an interrupted wait returns 0 events.
    pub fn wait(&self, events: &mut [libc::epoll_event]) -> io::Result<usize> {
        let max = events.len().min(libc::c_int::MAX as usize) as libc::c_int;
        // SAFETY: the kernel writes at most `max` entries into `events`.
        let r = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), max, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(r as usize)
    }
}

/// Blocks SIGCHLD in the calling thread (call before any other thread starts, so
/// every thread inherits the mask) and returns a non-blocking signalfd for it.
/// Children get a clean mask: std empties the signal mask before exec.
pub fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; it is initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        let fd = cvt(libc::signalfd(
            -1,
            &set,
            libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
        ))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Consumes every pending signal from a non-blocking signalfd.
pub fn drain_signalfd(fd: &OwnedFd) {
    let mut buf = [0u8; std::mem::size_of::<libc::signalfd_siginfo>() * 8];
    loop {
        match read(fd.as_raw_fd(), &mut buf) {
            Ok(n) if n == buf.len() => continue,
            _ => return,
        }
    }
}

pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain system call returning a fresh descriptor.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: `fd` is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn eventfd_signal(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    let _ = write(fd, &one);
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `O_NONBLOCK` on a pipe end just made, whose other status flags are all
/// clear: one `fcntl` (no `F_GETFL` first).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) })?;
    Ok(())
}

/// Best-effort: grow a pipe's buffer (fewer wake-ups for bulk output).
pub fn set_pipe_size(fd: RawFd, size: usize) {
    // SAFETY: fcntl without pointers; failure is harmless.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, size as libc::c_int);
    }
}

/// True when a pipe's read end is at end of file: no bytes buffered and no
/// writer left. Lets us see EOF on a stream we may not read from (no credit).
pub fn pipe_at_eof(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    if r <= 0 || pfd.revents & (libc::POLLHUP | libc::POLLERR) == 0 {
        return false;
    }
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) };
    r == 0 && avail == 0
}

pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    cvt_size(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
}

/// Reads into the spare capacity of `buf` (at most `max` bytes) and extends it.
pub fn read_into_spare(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let n = max.min(spare.len());
    // SAFETY: the kernel writes at most `n` bytes into the spare capacity; we then
    // mark exactly the bytes it reported as initialised.
    let got = cvt_size(unsafe { libc::read(fd, spare.as_mut_ptr().cast(), n) })?;
    // SAFETY: see above; `got <= n <= spare capacity`.
    unsafe { buf.set_len(buf.len() + got) };
    Ok(got)
}

pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`.
    cvt_size(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) })
}

/// Writes every byte of every buffer to a blocking fd, with as few `writev`
/// calls as the kernel allows.
pub fn write_all_vectored(fd: RawFd, bufs: &[Vec<u8>]) -> io::Result<()> {
    const MAX_IOV: usize = 512;
    let mut idx = 0; // first buffer not fully written
    let mut off = 0; // bytes of bufs[idx] already written
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(bufs.len().min(MAX_IOV));
    while idx < bufs.len() {
        if off == bufs[idx].len() {
            idx += 1;
            off = 0;
            continue;
        }
        iov.clear();
        for (i, b) in bufs[idx..].iter().take(MAX_IOV).enumerate() {
            let skip = if i == 0 { off } else { 0 };
            iov.push(libc::iovec {
                iov_base: b[skip..].as_ptr() as *mut libc::c_void,
                iov_len: b.len() - skip,
            });
        }
        // SAFETY: every iovec points into a live buffer of `bufs` with its length.
        let r = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut n = r as usize;
        while n > 0 {
            let left = bufs[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Whether we may execute the file at `path` (`meta` is its metadata). For
/// root (every sandbox's root has CAP_DAC_OVERRIDE) that is any execute bit,
/// as the kernel decides, without an
/// `access` call; others ask the kernel. A mount's `noexec` is left to
/// `execve` (EACCES: reported as not executable all the same).
pub fn executable(path: &std::path::Path, meta: &std::fs::Metadata) -> bool {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    static EUID: std::sync::OnceLock<libc::uid_t> = std::sync::OnceLock::new();
    // SAFETY: geteuid cannot fail.
    if *EUID.get_or_init(|| unsafe { libc::geteuid() }) == 0 {
        return meta.permissions().mode() & 0o111 != 0;
    }
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// Starts `program`: `fds` become the child's 0, 1, 2; it runs in `cwd` (if
/// given), in a new process group, with an empty signal mask and every signal
/// at its default disposition. Exec errors come back as the error.
///
/// A `vfork`-style clone (shared memory, the parent waits until the child has
/// exec'd) like glibc's `posix_spawn`, but the child makes ~7 system calls
/// where glibc's makes ~72: glibc resets the disposition of all 64 signals
/// one `rt_sigaction` at a time, while this child resets only those the agent
/// ignores (found once, [`Dispositions`]); execve itself resets caught ones.
/// Under gVisor's ptrace platform every system call is a round trip through
/// the sentry (~20 µs; bench/RESULTS.md, session 6: exec round trip 4.2 ->
/// 3.4 ms).
pub fn spawn(
    program: &std::ffi::CStr,
    argv: &[std::ffi::CString],
    envp: &[std::ffi::CString],
    cwd: Option<&std::ffi::CStr>,
    fds: [RawFd; 3],
) -> Result<i32, SpawnError> {
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let signals = dispositions();
    let reset = &signals.ignored;
    let args = ChildArgs {
        program: program.as_ptr(),
        argv: argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        cwd: cwd.map_or(std::ptr::null(), |c| c.as_ptr()),
        fds,
        reset: reset.as_ptr(),
        nreset: reset.len(),
        errno: std::sync::atomic::AtomicI32::new(0),
        in_chdir: std::sync::atomic::AtomicBool::new(false),
    };
    // The child's stack: it only makes system calls through libc's thin
    // wrappers. 64 KiB, 16-byte aligned top.
    let mut stack = vec![0u128; 4096];
    // SAFETY: one past the end of the allocation, which is where a downward
    // growing stack starts; the child never returns past it.
    let top = unsafe { stack.as_mut_ptr().add(stack.len()) } as *mut libc::c_void;
    // With handlers of our own, every signal is blocked around the clone: the
    // child shares our memory and must not run one before its execve. It
    // sets its own mask (empty) just before execve; ours is restored below
    // on every path.
    let old = signals.own_handlers.then(|| swap_sigmask(!0));
    // SAFETY: `child` only reads `args` (alive until after the clone returns:
    // CLONE_VFORK suspends us until the child exec'd or exited) and writes
    // its atomics.
    let pid = unsafe {
        libc::clone(
            child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &args as *const ChildArgs as *mut libc::c_void,
        )
    };
    let err = io::Error::last_os_error();
    if let Some(old) = old {
        swap_sigmask(old);
    }
    if pid < 0 {
        return Err(SpawnError::Other(err));
    }
    drop(stack);
    let errno = args.errno.load(std::sync::atomic::Ordering::SeqCst);
    if errno != 0 {
        // The child exited (127) without exec'ing: reap it here, before the
        // event loop's waitpid(-1) could take it for a process that ran.
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let e = io::Error::from_raw_os_error(errno);
        return Err(if args.in_chdir.load(std::sync::atomic::Ordering::SeqCst) {
            SpawnError::Chdir(e)
        } else {
            SpawnError::Other(e)
        });
    }
    Ok(pid)
}

/// Why [`spawn`] failed: entering the workdir, or anything else (mostly
/// `execve`'s errors).
#[derive(Debug)]
pub enum SpawnError {
    Chdir(io::Error),
    Other(io::Error),
}

/// What [`spawn`]'s child reads (and the one thing it writes: `errno`).
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    fds: [RawFd; 3],
    reset: *const libc::c_int,
    nreset: usize,
    errno: std::sync::atomic::AtomicI32,
    /// Set while the child is in `chdir`, so a failure there is told apart.
    in_chdir: std::sync::atomic::AtomicBool,
}

/// The kernel's `struct sigaction` (not glibc's): for raw `rt_sigaction`,
/// which also reaches the signals glibc reserves for itself (32, 33).
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// The child of [`spawn`]: runs on its own stack in the parent's memory, so it
/// only makes system calls (no allocation, no locks) and reports a failure
/// through `errno` before `_exit(127)`.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive while the parent is
    // suspended (CLONE_VFORK); every pointer in it is valid and NUL-terminated
    // as `spawn` built it.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        let fail = |a: &ChildArgs| -> ! {
            let e = *libc::__errno_location();
            a.errno.store(
                if e == 0 { libc::EINVAL } else { e },
                std::sync::atomic::Ordering::SeqCst,
            );
            libc::_exit(127)
        };
        let dfl = KernelSigaction::default();
        for i in 0..a.nreset {
            let sig = *a.reset.add(i);
            if libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl,
                std::ptr::null_mut::<KernelSigaction>(),
                8,
            ) != 0
            {
                fail(a);
            }
        }
        for (target, &fd) in a.fds.iter().enumerate() {
            if libc::dup2(fd, target as libc::c_int) < 0 {
                fail(a);
            }
        }
        if !a.cwd.is_null() {
            a.in_chdir.store(true, std::sync::atomic::Ordering::SeqCst);
            if libc::chdir(a.cwd) != 0 {
                fail(a);
            }
            a.in_chdir.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(a);
        }
        swap_sigmask(0);
        libc::execve(a.program, a.argv, a.envp);
        fail(a)
    }
}

/// Sets this thread's signal mask to `mask` and returns the old one: raw
/// `rt_sigprocmask`, which also covers the signals glibc keeps for itself
/// (32, 33). One system call, so [`child`] may use it.
fn swap_sigmask(mask: u64) -> u64 {
    let mut old = 0u64;
    // SAFETY: both sets are valid 8-byte kernel sigsets.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &mask,
            &mut old,
            8,
        )
    };
    old
}

/// A write to a pipe whose reader is gone fails with EPIPE instead of
/// killing the agent.
pub fn ignore_sigpipe() {
    // SAFETY: installs SIG_IGN, no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Does now what the first [`spawn`] would otherwise do (a query per signal;
/// a `spawn` meanwhile waits for it). Call it once the agent has set up its
/// own signal handling: the dispositions it finds are those a child resets.
pub fn prepare_spawn() {
    dispositions();
}

/// glibc's own handlers (SIGCANCEL, SIGSETXID): they return at once for a
/// signal that did not come from their own process through `tgkill`, so in
/// a vfork child (whose pid is its own) they touch nothing.
const GLIBC_SIGNALS: [libc::c_int; 2] = [32, 33];

/// The agent's signal dispositions that matter to a spawned child, found
/// once (a query per signal).
struct Dispositions {
    /// Ignored signals (SIGPIPE): execve keeps those, so the child resets
    /// them. Caught ones execve resets itself; the rest are at the default.
    ignored: Vec<libc::c_int>,
    /// A handler besides glibc's own (or a signal that could not be read):
    /// `spawn` blocks signals around the clone.
    own_handlers: bool,
}

fn dispositions() -> &'static Dispositions {
    static FOUND: std::sync::OnceLock<Dispositions> = std::sync::OnceLock::new();
    FOUND.get_or_init(|| {
        let mut found = Dispositions {
            ignored: Vec::new(),
            own_handlers: false,
        };
        for sig in (1..=64).filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP) {
            let mut cur = KernelSigaction::default();
            // SAFETY: a query (no new action) into a kernel-layout struct.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    std::ptr::null::<KernelSigaction>(),
                    &mut cur,
                    8,
                )
            };
            if r != 0 {
                // Unknown: reset it, and block around the clone, to be sure.
                found.ignored.push(sig);
                found.own_handlers = true;
            } else if cur.handler == libc::SIG_IGN {
                found.ignored.push(sig);
            } else if cur.handler != libc::SIG_DFL && !GLIBC_SIGNALS.contains(&sig) {
                found.own_handlers = true;
            }
        }
        found
    })
}

/// How a child ended, from `waitpid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// A child ended with this code (exit status, or 128+N for signal N).
    Child { os_pid: i32, code: i32 },
    /// Children exist but none has ended yet.
    NoneReady,
    /// No children at all.
    NoChildren,
}

/// Reaps one ended child, any child (orphans re-parented to us included).
pub fn reap_one() -> Reaped {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r > 0 {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                continue; // stopped/continued: not requested, not an exit
            };
            return Reaped::Child { os_pid: r, code };
        }
        if r == 0 {
            return Reaped::NoneReady;
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Reaped::NoChildren;
    }
}

pub fn kill(pid: i32, signo: i32) -> io::Result<()> {
    // SAFETY: plain system call.
    cvt(unsafe { libc::kill(pid, signo) })?;
    Ok(())
}

/// Makes this process non-dumpable: processes in the sandbox (root, but
/// without CAP_SYS_PTRACE) can then not open `/proc/1/fd/*`, the protocol
/// pipes to the host, nor read the agent's memory.
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) })?;
    Ok(())
}

/// CAP_SYS_ADMIN's bit.
const CAP_SYS_ADMIN: u32 = 21;
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> io::Result<[CapData; 2]> {
    let mut h = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut d = [CapData::default(); 2];
    // SAFETY: a v3 header and two data structs, as the kernel expects.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    cvt(r as libc::c_int)?;
    Ok(d)
}

/// Whether this thread may use CAP_SYS_ADMIN (a warm slot's agent, before sealing).
pub fn has_sys_admin() -> bool {
    capget().is_ok_and(|d| d[0].permitted & (1 << CAP_SYS_ADMIN) != 0)
}

/// Drops CAP_SYS_ADMIN from this thread's bounding set and from its
/// effective, permitted and inheritable sets: neither this thread nor any
/// process it starts can get it back.
pub fn drop_sys_admin() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe {
        libc::prctl(
            libc::PR_CAPBSET_DROP,
            CAP_SYS_ADMIN as libc::c_ulong,
            0,
            0,
            0,
        )
    })?;
    let mut d = capget()?;
    let bit = !(1u32 << CAP_SYS_ADMIN);
    d[0].effective &= bit;
    d[0].permitted &= bit;
    d[0].inheritable &= bit;
    let mut h = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: as in `capget`; the kernel only reads the data.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) };
    cvt(r as libc::c_int)?;
    Ok(())
}

/// Starts a thread that first gives up CAP_SYS_ADMIN (see
/// [`drop_sys_admin`]): capabilities are per thread, and only the event
/// loop's thread may hold it, until it starts the sandbox's first process.
/// So no thread has it once any process in the sandbox could reach one.
pub fn thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if has_sys_admin() {
                if let Err(e) = drop_sys_admin() {
                    eprintln!("gworker-agent: a thread cannot drop CAP_SYS_ADMIN: {e}");
                    std::process::abort();
                }
            }
            f()
        })
}

/// Bind-mounts directory `src` on `dst`, made first with its parents if
/// missing.
pub fn bind_mount(src: &[u8], dst: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::DirBuilderExt;
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(dst));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)?;
    let c = |b: &[u8]| std::ffi::CString::new(b).map_err(|_| io::ErrorKind::InvalidInput);
    let (src, dst) = (c(src)?, c(dst)?);
    // SAFETY: NUL-terminated paths; no file system type or data.
    cvt(unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            // Not MS_REC: this gVisor refuses it (EINVAL), and the volume
            // has no mounts of its own inside the sandbox.
            libc::MS_BIND,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// Detaches the mount at `path` (`umount2(MNT_DETACH)`).
pub fn detach(path: &str) -> io::Result<()> {
    let p = std::ffi::CString::new(path).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: a NUL-terminated path.
    cvt(unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) })?;
    Ok(())
}

pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) })?;
    Ok(())
}

/// Every descendant of this process that /proc can show (children files of
/// every thread, recursively). Best effort: empty where /proc lacks them.
pub fn descendants() -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![std::process::id() as i32];
    while let Some(pid) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(s) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in s
                .split_ascii_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                if child > 0 && !out.contains(&child) && out.len() < 100_000 {
                    out.push(child);
                    todo.push(child);
                }
            }
        }
    }
    out
}

/// "No such file or directory (os error 2)" → "no such file or directory".
pub fn errstr(e: &io::Error) -> String {
    let s = match e.raw_os_error() {
        Some(code) => {
            let full = io::Error::from_raw_os_error(code).to_string();
            match full.rfind(" (os error") {
                Some(i) => full[..i].to_string(),
                None => full,
            }
        }
        None => e.to_string(),
    };
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errstr_is_lowercase_without_code() {
        assert_eq!(
            errstr(&io::Error::from_raw_os_error(libc::ENOENT)),
            "no such file or directory"
        );
        assert_eq!(
            errstr(&io::Error::from_raw_os_error(libc::EACCES)),
            "permission denied"
        );
    }

    #[test]
    fn write_all_vectored_handles_many_buffers() {
        let (r, w) = pipe().unwrap();
        let bufs: Vec<Vec<u8>> = (0..1000u32)
            .map(|i| vec![(i % 251) as u8; (i % 7) as usize])
            .collect();
        let expect: Vec<u8> = bufs.concat();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut f = std::fs::File::from(r);
            std::io::Read::read_to_end(&mut f, &mut got).unwrap();
            got
        });
        write_all_vectored(w.as_raw_fd(), &bufs).unwrap();
        drop(w);
        assert_eq!(reader.join().unwrap(), expect);
    }
}
