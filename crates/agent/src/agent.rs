//! The agent's event loop: one thread, one epoll set.
//!
//! It owns every process the host started and every pipe to them: host frames
//! on fd 0, each process's stdout/stderr (read only while the stream has
//! credit), each process's stdin (written without ever blocking), and SIGCHLD
//! through a signalfd, after which it reaps with `waitpid(-1)` — orphans
//! re-parented to the agent included. Frames to the host go through the
//! [`Writer`], the only user of fd 1.
//!
//! Because spawning and reaping happen on this one thread, a process that ends
//! before it is registered cannot be missed: its SIGCHLD waits in the signalfd
//! until the loop comes back, by which time the process is in the table.
//!
//! When the host goes away (EOF or error on fd 0, a write error on fd 1) or
//! sends a frame that does not decode, the agent SIGKILLs every process it
//! started and exits 0: the sandbox ends.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use gworker_proto::{
    frame_len, AgentMsg, HostMsg, Spawn, SpawnErrorKind, Stream, INITIAL_WINDOW, MAX_OUTPUT_CHUNK,
    PROTOCOL_VERSION, SLOT_VOLUMES_PATH,
};

use crate::spawn;
use crate::sys::{self, errstr, Epoll, Reaped};
use crate::writer::Writer;

const TOK_HOST: u64 = u64::MAX;
const TOK_SIGCHLD: u64 = u64::MAX - 1;
const TOK_WRITER_DEAD: u64 = u64::MAX - 2;
/// What the loop waits for on the host's input (fd 0, or the pipe a thread
/// copies it into).
const HOST_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
/// Per-process tokens: `pid << 2 | slot`, slot 0 = stdout, 1 = stderr, 2 = stdin.
const SLOT_STDIN: u64 = 2;

/// Bytes read from the host per wake-up.
const HOST_READ: usize = 256 * 1024;
/// Reads per stream when draining a process that just exited.
const DRAIN_READS: usize = 64;
/// Pipe buffer asked for an output pipe once a read finds it full (best
/// effort; the default is 64 KiB, and most commands never fill it, so the
/// two `fcntl`s are not spent on every spawn).
const OUTPUT_PIPE_SIZE: usize = 1024 * 1024;
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

fn token(pid: u32, slot: u64) -> u64 {
    (u64::from(pid) << 2) | slot
}

fn stream_index(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// What epoll watches an output pipe for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interest {
    Unregistered,
    /// Readable (level-triggered): while the stream has credit.
    Read,
    /// Only hang-up, once (EPOLLONESHOT with no events): without credit we must
    /// not read, but still want to see the writer go away to report Eof.
    Hangup,
}

/// Our read end of a process's stdout or stderr.
struct OutPipe {
    fd: Option<OwnedFd>,
    /// Bytes we may still send (u64: repeated credits cannot overflow).
    credit: u64,
    interest: Interest,
    /// Switched from `Hangup` back to `Read` since the last pump: an event
    /// of the same `epoll_wait` may still be the hang-up-only one, which does
    /// not show pending data.
    rearmed: bool,
    /// Asked for `OUTPUT_PIPE_SIZE` already.
    enlarged: bool,
}

/// Our write end of a process's stdin.
struct InPipe {
    fd: Option<OwnedFd>,
    queue: VecDeque<Vec<u8>>,
    /// Bytes of `queue.front()` already written.
    off: usize,
    close_when_drained: bool,
    polled: bool,
    /// O_NONBLOCK is set when the first input comes: most processes never
    /// get any (one system call fewer per exec).
    nonblocking: bool,
}

struct Proc {
    os_pid: i32,
    out: [OutPipe; 2],
    stdin: InPipe,
    exited: bool,
}

enum Pumped {
    Data,
    /// Nothing to read now, or no credit.
    Idle,
    Closed,
}

/// Builds an `Output` frame without copying `data` twice.
pub fn output_frame(pid: u32, stream: Stream, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + data.len());
    AgentMsg::Output {
        pid,
        stream,
        data: Vec::new(),
    }
    .encode(&mut f);
    // `Output`'s data is the rest of the frame: append it and fix the length prefix.
    f.extend_from_slice(data);
    let len = (f.len() - 4) as u32;
    f[..4].copy_from_slice(&len.to_le_bytes());
    f
}

/// Watches the pipe for what its credit allows (see [`Interest`]).
fn set_interest(epoll: &Epoll, pid: u32, idx: usize, p: &mut OutPipe) {
    let Some(fd) = p.fd.as_ref().map(|f| f.as_raw_fd()) else {
        return;
    };
    let want = if p.credit > 0 {
        Interest::Read
    } else {
        Interest::Hangup
    };
    if want == p.interest {
        return;
    }
    let events = match want {
        Interest::Read => libc::EPOLLIN as u32,
        _ => libc::EPOLLONESHOT as u32,
    };
    let tok = token(pid, idx as u64);
    let r = match p.interest {
        Interest::Unregistered => epoll.add(fd, events, tok),
        _ => epoll.modify(fd, events, tok),
    };
    match r {
        Ok(()) => {
            p.rearmed = p.interest == Interest::Hangup;
            p.interest = want;
        }
        Err(e) => eprintln!("gworker-agent: epoll for process {pid}: {}", errstr(&e)),
    }
}

/// Closes our read end. No `EPOLL_CTL_DEL` first: ours is the only
/// descriptor of that pipe end (close-on-exec, never duplicated), and epoll
/// forgets a file once its last descriptor is closed.
fn close_out(p: &mut OutPipe) {
    p.fd = None;
    p.interest = Interest::Unregistered;
}

/// Reads at most one chunk (bounded by credit) from a stream and sends it;
/// reports Eof when the stream ended, even without credit. `hung_up`: epoll
/// just said hang-up without readable data. When it said so while we watched
/// for readable data (not with the hang-up-only interest, which does not
/// report pending data; see `rearmed`) the pipe is empty and has no writer
/// left: Eof without a read.
fn pump_out(
    epoll: &Epoll,
    writer: &Writer,
    scratch: &mut [u8],
    pid: u32,
    idx: usize,
    p: &mut OutPipe,
    hung_up: bool,
) -> Pumped {
    let Some(fd) = p.fd.as_ref().map(|f| f.as_raw_fd()) else {
        return Pumped::Closed;
    };
    let stream = STREAMS[idx];
    let rearmed = std::mem::take(&mut p.rearmed);
    if hung_up && p.interest == Interest::Read && !rearmed {
        close_out(p);
        writer.send(&AgentMsg::Eof { pid, stream });
        return Pumped::Closed;
    }
    if p.credit == 0 {
        if sys::pipe_at_eof(fd) {
            close_out(p);
            writer.send(&AgentMsg::Eof { pid, stream });
            return Pumped::Closed;
        }
        set_interest(epoll, pid, idx, p);
        return Pumped::Idle;
    }
    let want = (p.credit.min(MAX_OUTPUT_CHUNK as u64) as usize).min(scratch.len());
    match sys::read(fd, &mut scratch[..want]) {
        Ok(0) => {
            close_out(p);
            writer.send(&AgentMsg::Eof { pid, stream });
            Pumped::Closed
        }
        Ok(n) => {
            if n >= DEFAULT_PIPE_SIZE && !p.enlarged {
                sys::set_pipe_size(fd, OUTPUT_PIPE_SIZE);
                p.enlarged = true;
            }
            p.credit -= n as u64;
            writer.send_frame(output_frame(pid, stream, &scratch[..n]));
            if p.credit == 0 {
                set_interest(epoll, pid, idx, p);
            }
            Pumped::Data
        }
        Err(e) if is_transient(&e) => Pumped::Idle,
        Err(e) => {
            eprintln!(
                "gworker-agent: reading {stream:?} of process {pid}: {}",
                errstr(&e)
            );
            close_out(p);
            writer.send(&AgentMsg::Eof { pid, stream });
            Pumped::Closed
        }
    }
}

/// Closes our write end (no `EPOLL_CTL_DEL` first, as in [`close_out`]).
fn close_stdin(s: &mut InPipe) {
    s.fd = None;
    s.polled = false;
    s.queue.clear();
    s.off = 0;
}

/// Writes as much queued stdin as the pipe takes; waits for EPOLLOUT for the rest.
fn flush_stdin(epoll: &Epoll, pid: u32, s: &mut InPipe) {
    let Some(fd) = s.fd.as_ref().map(|f| f.as_raw_fd()) else {
        return;
    };
    if !s.nonblocking && !s.queue.is_empty() {
        if let Err(e) = sys::set_nonblocking(fd) {
            // A blocking write could stall the agent: drop the input instead.
            eprintln!(
                "gworker-agent: O_NONBLOCK for stdin of {pid}: {}",
                errstr(&e)
            );
            close_stdin(s);
            return;
        }
        s.nonblocking = true;
    }
    while let Some(front) = s.queue.front() {
        match sys::write(fd, &front[s.off..]) {
            Ok(n) => {
                s.off += n;
                if s.off >= front.len() {
                    s.queue.pop_front();
                    s.off = 0;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !s.polled {
                    match epoll.add(fd, libc::EPOLLOUT as u32, token(pid, SLOT_STDIN)) {
                        Ok(()) => s.polled = true,
                        Err(e) => {
                            eprintln!(
                                "gworker-agent: epoll add for stdin of {pid}: {}",
                                errstr(&e)
                            );
                            close_stdin(s);
                        }
                    }
                }
                return;
            }
            // EPIPE: the process closed its stdin; what is left cannot be delivered.
            Err(_) => {
                close_stdin(s);
                return;
            }
        }
    }
    if s.polled {
        let _ = epoll.delete(fd);
        s.polled = false;
    }
    if s.close_when_drained {
        close_stdin(s);
    }
}

pub struct Agent {
    epoll: Epoll,
    writer: Writer,
    host_fd: RawFd,
    sigchld: OwnedFd,
    _writer_dead: OwnedFd,
    /// Once fd 0 is no longer polled: the read end of the pipe a thread copies
    /// it into (see `thread_host_reads`).
    host_pipe: Option<OwnedFd>,
    procs: HashMap<u32, Proc>,
    by_os_pid: HashMap<i32, u32>,
    inbuf: Vec<u8>,
    in_pos: usize,
    scratch: Vec<u8>,
    /// Set at the first spawn: the warm slot's volume mount is detached and
    /// CAP_SYS_ADMIN is dropped for good (see [`Agent::seal`]).
    sealed: bool,
}

fn fatal(what: &str, e: io::Error) -> ! {
    eprintln!("gworker-agent: {what}: {}", errstr(&e));
    std::process::exit(1);
}

/// Starts the agent on fds 0 (from the host) and 1 (to the host). Never returns.
pub fn run() -> ! {
    // A write to a pipe whose reader is gone (a process's stdin, the host) is
    // an EPIPE error to handle, not the end of the agent. (Rust's runtime
    // would do this; see main.rs.)
    sys::ignore_sigpipe();
    // Before any thread exists, so that every thread inherits the blocked mask.
    let sigchld = sys::sigchld_fd().unwrap_or_else(|e| fatal("signalfd", e));
    if let Err(e) = sys::set_child_subreaper() {
        eprintln!("gworker-agent: PR_SET_CHILD_SUBREAPER: {}", errstr(&e));
    }
    if let Err(e) = sys::set_not_dumpable() {
        fatal("PR_SET_DUMPABLE", e);
    }
    // What a spawn needs to know (a query per signal, ~1 ms under gVisor),
    // found on another thread while this one says Hello and reads the first
    // request, rather than in a sandbox's first exec.
    sys::thread("spawn-prep", sys::prepare_spawn).unwrap_or_else(|e| fatal("spawn-prep thread", e));
    let epoll = Epoll::new().unwrap_or_else(|e| fatal("epoll_create", e));
    let writer_dead = sys::eventfd().unwrap_or_else(|e| fatal("eventfd", e));
    let writer =
        Writer::start(1, writer_dead.as_raw_fd()).unwrap_or_else(|e| fatal("writer thread", e));
    writer.send(&AgentMsg::Hello {
        version: PROTOCOL_VERSION,
        agent: env!("CARGO_PKG_VERSION").to_string(),
    });

    epoll
        .add(sigchld.as_raw_fd(), libc::EPOLLIN as u32, TOK_SIGCHLD)
        .unwrap_or_else(|e| fatal("epoll add signalfd", e));
    epoll
        .add(
            writer_dead.as_raw_fd(),
            libc::EPOLLIN as u32,
            TOK_WRITER_DEAD,
        )
        .unwrap_or_else(|e| fatal("epoll add eventfd", e));
    // fd 0 (a host pipe) is polled directly until the first checkpoint: see
    // `Agent::thread_host_reads`.
    epoll
        .add(0, HOST_EVENTS, TOK_HOST)
        .unwrap_or_else(|e| fatal("epoll add fd 0", e));
    let agent = Agent {
        epoll,
        writer,
        host_fd: 0,
        sigchld,
        _writer_dead: writer_dead,
        host_pipe: None,
        procs: HashMap::new(),
        by_os_pid: HashMap::new(),
        inbuf: Vec::with_capacity(HOST_READ),
        in_pos: 0,
        scratch: vec![0; MAX_OUTPUT_CHUNK],
        sealed: false,
    };
    agent.event_loop()
}

/// Blocking copy of the host's frames (fd 0) into the event loop's pipe.
fn copy_stdin_to(w: OwnedFd) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match sys::read(0, &mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if sys::write_all_vectored(w.as_raw_fd(), &[buf[..n].to_vec()]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("gworker-agent: reading from the host: {}", errstr(&e));
                return;
            }
        }
    }
}

impl Agent {
    fn event_loop(mut self) -> ! {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 128];
        loop {
            let n = match self.epoll.wait(&mut events) {
                Ok(n) => n,
                Err(e) => self.shutdown(&format!("epoll_wait failed: {}", errstr(&e))),
            };
            self.writer.gather();
            for ev in &events[..n] {
                let tok = ev.u64;
                match tok {
                    TOK_HOST => {
                        if let Err(reason) = self.read_host() {
                            self.shutdown(&reason);
                        }
                    }
                    TOK_SIGCHLD => self.reap(),
                    TOK_WRITER_DEAD => self.shutdown("writing to the host failed"),
                    _ => {
                        let pid = (tok >> 2) as u32;
                        match tok & 3 {
                            SLOT_STDIN => {
                                if let Some(p) = self.procs.get_mut(&pid) {
                                    flush_stdin(&self.epoll, pid, &mut p.stdin);
                                }
                            }
                            slot => {
                                let hup = libc::EPOLLHUP as u32;
                                let hung_up = ev.events & (hup | libc::EPOLLIN as u32) == hup;
                                self.pump(pid, slot as usize, hung_up)
                            }
                        }
                    }
                }
            }
            self.writer.flush();
        }
    }

    fn log(&self, message: String) {
        eprintln!("gworker-agent: {message}");
        self.writer.send(&AgentMsg::Log { message });
    }

    /// Reads what the host sent and handles every complete frame.
    fn read_host(&mut self) -> Result<(), String> {
        if self.in_pos > 0 {
            self.inbuf.drain(..self.in_pos);
            self.in_pos = 0;
        }
        match sys::read_into_spare(self.host_fd, &mut self.inbuf, HOST_READ) {
            Ok(0) => return Err("the host closed the agent's input".into()),
            Ok(_) => {}
            Err(e) if is_transient(&e) => return Ok(()),
            Err(e) => return Err(format!("reading from the host failed: {}", errstr(&e))),
        }
        loop {
            let avail = &self.inbuf[self.in_pos..];
            if avail.len() < 4 {
                return Ok(());
            }
            let prefix = [avail[0], avail[1], avail[2], avail[3]];
            let len = frame_len(prefix).map_err(|e| format!("bad frame from the host: {e}"))?;
            if avail.len() < 4 + len {
                return Ok(());
            }
            let msg = HostMsg::decode(&avail[4..4 + len])
                .map_err(|e| format!("bad frame from the host: {e}"))?;
            self.in_pos += 4 + len;
            self.handle(msg);
        }
    }

    fn handle(&mut self, msg: HostMsg) {
        match msg {
            HostMsg::Spawn(s) => self.spawn(s),
            HostMsg::Stdin { pid, data } => {
                let Some(p) = self.procs.get_mut(&pid) else {
                    return;
                };
                let s = &mut p.stdin;
                if s.fd.is_none() || s.close_when_drained || data.is_empty() {
                    return;
                }
                s.queue.push_back(data);
                if s.queue.len() == 1 {
                    flush_stdin(&self.epoll, pid, s);
                }
            }
            HostMsg::StdinClose { pid } => {
                let Some(p) = self.procs.get_mut(&pid) else {
                    return;
                };
                p.stdin.close_when_drained = true;
                flush_stdin(&self.epoll, pid, &mut p.stdin);
            }
            HostMsg::Signal { pid, signo } => self.signal(pid, signo),
            HostMsg::Credit { pid, stream, bytes } => {
                let Some(p) = self.procs.get_mut(&pid) else {
                    return;
                };
                let idx = stream_index(stream);
                let o = &mut p.out[idx];
                o.credit = o.credit.saturating_add(u64::from(bytes));
                set_interest(&self.epoll, pid, idx, o);
            }
            HostMsg::Ping { seq } => self.writer.send(&AgentMsg::Pong { seq }),
            HostMsg::Quiesce => {
                self.thread_host_reads();
                self.writer.quiesce();
            }
            HostMsg::Resume => self.writer.resume(),
            HostMsg::Prefetch { paths } => prefetch(paths),
            HostMsg::Mount {
                seq,
                sources,
                targets,
            } => {
                let error = if self.sealed {
                    "the sandbox has started a process: it mounts nothing more".to_string()
                } else {
                    sources
                        .iter()
                        .zip(&targets)
                        .try_for_each(|(src, dst)| {
                            sys::bind_mount(src, dst).map_err(|e| {
                                format!(
                                    "cannot mount a volume on {}: {}",
                                    String::from_utf8_lossy(dst),
                                    errstr(&e)
                                )
                            })
                        })
                        .err()
                        .unwrap_or_default()
                };
                self.writer.send(&AgentMsg::Mounted { seq, error });
            }
        }
    }

    /// Before the sandbox's first process: a warm slot's agent holds
    /// CAP_SYS_ADMIN only to bind-mount the claim's volumes from the slot's
    /// volume mount ([`SLOT_VOLUMES_PATH`]). That mount is detached (the volumes'
    /// binds stay) and the capability dropped from every set of this thread,
    /// the one every process is started from, so no process ever gets it.
    /// A cold sandbox's agent never had it: one `capget`.
    fn seal(&mut self) {
        self.sealed = true;
        if !sys::has_sys_admin() {
            return;
        }
        if let Err(e) = sys::detach(SLOT_VOLUMES_PATH) {
            if e.raw_os_error() != Some(libc::EINVAL) {
                self.log(format!("detaching {SLOT_VOLUMES_PATH}: {}", errstr(&e)));
            }
        }
        if let Err(e) = sys::drop_sys_admin() {
            // Not a process may start with it.
            self.shutdown(&format!("cannot drop CAP_SYS_ADMIN: {}", errstr(&e)));
        }
    }

    /// From now on a thread reads fd 0 with blocking reads and copies it into
    /// a sandbox-internal pipe, which the loop polls instead. After a
    /// checkpoint is restored, this gVisor (20221219) delivers one epoll event
    /// for a host fd and then no more, while blocking reads keep working. The
    /// switch happens at `Quiesce`, before every checkpoint, so any sandbox
    /// that may be restored has it; until then fd 0 is polled directly, which
    /// spares every message a hand-over between threads.
    fn thread_host_reads(&mut self) {
        if self.host_pipe.is_some() {
            return;
        }
        if let Err(e) = self.epoll.delete(0) {
            self.shutdown(&format!("epoll delete fd 0: {}", errstr(&e)));
        }
        let setup = sys::pipe().and_then(|(r, w)| {
            sys::set_nonblocking(r.as_raw_fd())?;
            self.epoll.add(r.as_raw_fd(), HOST_EVENTS, TOK_HOST)?;
            sys::thread("host-reader", move || copy_stdin_to(w))?;
            Ok(r)
        });
        match setup {
            Ok(r) => {
                self.host_fd = r.as_raw_fd();
                self.host_pipe = Some(r);
            }
            Err(e) => self.shutdown(&format!("starting the host reader: {}", errstr(&e))),
        }
    }

    fn spawn(&mut self, s: Spawn) {
        if !self.sealed {
            self.seal();
        }
        let pid = s.pid;
        if self.procs.contains_key(&pid) {
            let message = format!("process id {pid} is already in use");
            self.writer.send(&AgentMsg::SpawnFailed {
                pid,
                kind: SpawnErrorKind::Other,
                message,
            });
            return;
        }
        let st = match spawn::start(&s) {
            Ok(st) => st,
            Err(f) => {
                self.writer.send(&AgentMsg::SpawnFailed {
                    pid,
                    kind: f.kind,
                    message: f.message,
                });
                return;
            }
        };
        // Answered first, the setup below overlapping its way to the host:
        // the next host message (stdin, a signal for this pid) is read only
        // after this function, so nothing can refer to the process too early.
        self.writer.send(&AgentMsg::Spawned {
            pid,
            os_pid: st.os_pid as u32,
        });
        self.writer.flush();
        self.writer.gather();
        drop(st.child_ends);
        let out_pipe = |fd: OwnedFd| OutPipe {
            fd: Some(fd),
            credit: u64::from(INITIAL_WINDOW),
            interest: Interest::Unregistered,
            rearmed: false,
            enlarged: false,
        };
        let mut p = Proc {
            os_pid: st.os_pid,
            out: [out_pipe(st.stdout), out_pipe(st.stderr)],
            stdin: InPipe {
                fd: Some(st.stdin),
                queue: VecDeque::new(),
                off: 0,
                close_when_drained: false,
                polled: false,
                nonblocking: false,
            },
            exited: false,
        };
        for fd in p.out.iter().filter_map(|o| o.fd.as_ref()) {
            if let Err(e) = sys::set_nonblocking(fd.as_raw_fd()) {
                self.log(format!("O_NONBLOCK for process {pid}: {}", errstr(&e)));
            }
        }
        for (idx, o) in p.out.iter_mut().enumerate() {
            set_interest(&self.epoll, pid, idx, o);
        }
        self.by_os_pid.insert(st.os_pid, pid);
        self.procs.insert(pid, p);
    }

    fn pump(&mut self, pid: u32, idx: usize, hung_up: bool) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        let Some(o) = p.out.get_mut(idx) else { return };
        if let Pumped::Closed = pump_out(
            &self.epoll,
            &self.writer,
            &mut self.scratch,
            pid,
            idx,
            o,
            hung_up,
        ) {
            self.maybe_forget(pid);
        }
    }

    fn signal(&mut self, pid: u32, signo: i32) {
        let Some(p) = self.procs.get(&pid) else {
            self.log(format!("signal {signo} for unknown process {pid}"));
            return;
        };
        let (os_pid, exited) = (p.os_pid, p.exited);
        match sys::kill(-os_pid, signo) {
            Ok(()) => {}
            // The group is gone (or was never made): the process alone, while it
            // is still ours (after reaping, its pid may belong to someone else).
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                if !exited {
                    let _ = sys::kill(os_pid, signo);
                }
            }
            Err(e) => self.log(format!("signal {signo} to process {pid}: {}", errstr(&e))),
        }
    }

    fn reap(&mut self) {
        sys::drain_signalfd(&self.sigchld);
        while let Reaped::Child { os_pid, code } = sys::reap_one() {
            self.exited(os_pid, code);
        }
    }

    fn exited(&mut self, os_pid: i32, code: i32) {
        // Not ours: an orphan re-parented to us; reaping it was the point.
        let Some(pid) = self.by_os_pid.remove(&os_pid) else {
            return;
        };
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        p.exited = true;
        // Send what is already in the pipes (and their Eof, if no grandchild holds
        // them open) before Exited, so the host usually sees output, Eof, Exited.
        for (idx, o) in p.out.iter_mut().enumerate() {
            for _ in 0..DRAIN_READS {
                let r = pump_out(
                    &self.epoll,
                    &self.writer,
                    &mut self.scratch,
                    pid,
                    idx,
                    o,
                    false,
                );
                if !matches!(r, Pumped::Data) {
                    break;
                }
            }
        }
        close_stdin(&mut p.stdin);
        self.writer.send(&AgentMsg::Exited { pid, code });
        self.maybe_forget(pid);
    }

    /// Drops a process once it has exited and both its streams have ended.
    fn maybe_forget(&mut self, pid: u32) {
        if let Some(p) = self.procs.get(&pid) {
            if p.exited && p.out.iter().all(|o| o.fd.is_none()) {
                self.procs.remove(&pid);
            }
        }
    }

    /// Ends the sandbox: SIGKILL every process group we started and every
    /// descendant we can see, then exit 0.
    fn shutdown(&self, reason: &str) -> ! {
        eprintln!("gworker-agent: {reason}; killing all processes and exiting");
        for p in self.procs.values() {
            let _ = sys::kill(-p.os_pid, libc::SIGKILL);
        }
        for d in sys::descendants() {
            let _ = sys::kill(d, libc::SIGKILL);
        }
        if std::process::id() == 1 {
            // PID 1 of the sandbox's pid namespace: this reaches everything in it.
            let _ = sys::kill(-1, libc::SIGKILL);
        }
        std::process::exit(0);
    }
}

/// Reads each file once on a background thread, so that gVisor caches its
/// lookups and contents before a command needs them. Missing files and
/// errors are ignored: this only makes a first command faster.
fn prefetch(paths: Vec<Vec<u8>>) {
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    let _ = sys::thread("prefetch", move || {
        let mut buf = vec![0u8; 256 * 1024];
        for p in paths {
            let path = std::path::Path::new(std::ffi::OsStr::from_bytes(&p));
            if let Ok(mut f) = std::fs::File::open(path) {
                while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_frame_matches_the_codec() {
        for data in [&b""[..], b"hi\n", &[7u8; 5000][..]] {
            let mut expect = Vec::new();
            AgentMsg::Output {
                pid: 9,
                stream: Stream::Stderr,
                data: data.to_vec(),
            }
            .encode(&mut expect);
            let got = output_frame(9, Stream::Stderr, data);
            assert_eq!(got, expect);
            assert_eq!(
                AgentMsg::decode(&got[4..]).unwrap(),
                AgentMsg::Output {
                    pid: 9,
                    stream: Stream::Stderr,
                    data: data.to_vec()
                }
            );
        }
    }

    #[test]
    fn tokens_do_not_collide_with_fixed_ones() {
        let t = token(u32::MAX, SLOT_STDIN);
        assert!(t < TOK_WRITER_DEAD);
        assert_eq!((t >> 2) as u32, u32::MAX);
    }
}
