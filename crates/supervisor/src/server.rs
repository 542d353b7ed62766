//! The supervisor process: owns one sandbox's `runsc run` child and the
//! agent's pipes, keeps every process's output, and answers the daemon on a
//! unix socket. It is started detached (its own session) so the daemon can die
//! and come back without the sandbox noticing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gworker_proto::{AgentMsg, HostMsg, SpawnErrorKind, Stream, INITIAL_WINDOW, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::wire::*;

/// Unread bytes a stream may hold before the agent is told to wait.
const UNREAD_LIMIT: u64 = 16 * 1024 * 1024;
/// Already-read bytes kept so that a reader that lost its connection can resume.
const RETAIN_READ: u64 = 4 * 1024 * 1024;
/// Credit is granted in steps of at least this much.
const CREDIT_STEP: u64 = 256 * 1024;
/// Largest chunk sent to a reader at once.
const READ_CHUNK: usize = 256 * 1024;

/// File descriptor on which the daemon hands the bound listening socket.
pub const LISTENER_FD: i32 = 3;
/// File descriptor on which a supervisor's secrets arrive (see `LaunchConfig`).
pub const SECRETS_FD: i32 = 4;
/// A standby supervisor's end of its socket to the daemon ([`standby_main`]).
pub const STANDBY_FD: i32 = 5;

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

struct OutBuf {
    buf: VecDeque<u8>,
    /// Offset of `buf[0]` in the stream.
    start: u64,
    eof: bool,
    /// Highest offset handed to any reader.
    read_hi: u64,
    /// Credit granted to the agent and not yet used.
    outstanding: u64,
}

impl OutBuf {
    fn new() -> OutBuf {
        OutBuf {
            buf: VecDeque::new(),
            start: 0,
            eof: false,
            read_hi: 0,
            outstanding: INITIAL_WINDOW as u64,
        }
    }
    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }
    /// Credit to grant now, if any, keeping unread + outstanding under the limit.
    fn credit(&mut self) -> Option<u32> {
        if self.eof {
            return None;
        }
        let unread = self.end() - self.read_hi.max(self.start);
        let room = UNREAD_LIMIT.saturating_sub(unread + self.outstanding);
        if room >= CREDIT_STEP {
            let grant = room.min(u32::MAX as u64);
            self.outstanding += grant;
            Some(grant as u32)
        } else {
            None
        }
    }
    /// Drops already-read bytes beyond the resume window.
    fn evict(&mut self) {
        let read = self.read_hi.saturating_sub(self.start);
        if read > RETAIN_READ {
            let drop = (read - RETAIN_READ) as usize;
            self.buf.drain(..drop);
            self.start += drop as u64;
        }
    }
}

struct Proc {
    argv: Vec<String>,
    started_at: f64,
    exit_code: Option<i32>,
    out: [OutBuf; 2],
}

fn sidx(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

struct State {
    phase: Phase,
    exit_code: Option<i32>,
    reason: Option<String>,
    message: Option<String>,
    exited_at: Option<f64>,
    procs: BTreeMap<u32, Proc>,
    next_id: u32,
    pending: HashMap<u32, oneshot::Sender<Result<(), SupError>>>,
    /// Set once the container is being stopped; no new spawns.
    stopping: bool,
    /// Set once `runsc run` has ended (or never started).
    runsc_exited: bool,
    /// Set once the sandbox's network is gone (at once if it had none).
    net_removed: bool,
    /// Bumped each time the container is replaced (checkpoint + restore in
    /// place); readers and waiters of an older generation stand down.
    gen: u64,
    /// Told when the agent answers `Quiesce`.
    quiesced: Option<oneshot::Sender<()>>,
    pongs: HashMap<u32, oneshot::Sender<()>>,
    /// Waiting for the agent's `Mounted`: its error ("" = mounted).
    mounted: HashMap<u32, oneshot::Sender<String>>,
    seq: u32,
    /// A checkpoint is in progress: one at a time.
    checkpointing: bool,
    /// The current `runsc run`/`restore` process.
    runsc_pid: Option<i32>,
    /// Unix time at which the sandbox is killed (infinite for an unclaimed
    /// warm-pool slot).
    deadline: f64,
    /// The entry command; for a pool slot, set by `Claim`.
    entry: Option<ProcSpec>,
    claimed: bool,
    /// The user's limits (set by `Claim` for a warm-pool slot). The CPU
    /// quota among them applies only while the sandbox runs the user's
    /// code: gVisor's own boot, checkpoint and restore are not throttled.
    limits: gworker_runtime::Limits,
    /// Why the network could not be made (the start then fails).
    net_error: Option<String>,
}

impl State {
    fn status(&self) -> Status {
        Status {
            phase: self.phase,
            exit_code: self.exit_code,
            reason: self.reason.clone(),
            message: self.message.clone(),
            exited_at: self.exited_at,
            procs: self
                .procs
                .iter()
                .map(|(id, p)| ProcStatus {
                    id: *id,
                    argv: p.argv.clone(),
                    started_at: p.started_at,
                    exit_code: p.exit_code,
                })
                .collect(),
        }
    }

    /// Marks the sandbox exited (first call wins the reason).
    fn exit(&mut self, code: Option<i32>, reason: &str, message: Option<String>) {
        if self.phase == Phase::Exited {
            return;
        }
        self.phase = Phase::Exited;
        self.exit_code = code;
        self.reason = Some(reason.to_string());
        self.message = message;
        self.exited_at = Some(now());
    }

    /// The container is gone: every process still running is reported killed
    /// and every stream ends.
    fn container_gone(&mut self) {
        for p in self.procs.values_mut() {
            if p.exit_code.is_none() {
                p.exit_code = Some(137);
            }
            for o in &mut p.out {
                o.eof = true;
            }
        }
        for (_, tx) in self.pending.drain() {
            let _ = tx.send(Err(SupError::new(
                "sandbox_not_running",
                "the sandbox stopped",
            )));
        }
        // Nobody will answer pings any more.
        self.pongs.clear();
        self.mounted.clear();
    }

    /// The sequence number of the next `Ping` or `Mount`.
    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }
}

/// What the writer task is told: frames, and the moves of a checkpoint.
enum ToAgent {
    Msg(HostMsg),
    /// Send `Quiesce`, then hold every further frame.
    Quiesce,
    /// Switch to new pipes (when `Some`), send `Resume` if asked, then send
    /// what was held.
    Attach {
        stdin: Option<tokio::process::ChildStdin>,
        resume: bool,
    },
}

struct Shared {
    st: Mutex<State>,
    changed: Notify,
    to_agent: mpsc::UnboundedSender<ToAgent>,
    cfg: LaunchConfig,
    runsc: gworker_runtime::Runsc,
    shutdown: Notify,
    dir: PathBuf,
    cgroup: gworker_runtime::Cgroup,
    /// Whether the sandbox has cgroups of its own (not on a host without
    /// writable cgroups when no limits were asked for).
    cgroup_ok: bool,
    /// A networked sandbox's gate: runsc's prestart hook waits on it (every
    /// `run` and `restore`) until the network is ready.
    gate: Option<gworker_runtime::net::ReadyGate>,
    /// When this process started, and how long each boot step took after
    /// it (ms): logged when the agent says hello, to see where a slow boot's
    /// time went.
    t0: std::time::Instant,
    steps: Mutex<Vec<(&'static str, f64)>>,
}

impl Shared {
    fn step(&self, what: &'static str) {
        let ms = self.t0.elapsed().as_secs_f64() * 1000.0;
        self.steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((what, ms));
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn send(&self, m: HostMsg) {
        let _ = self.to_agent.send(ToAgent::Msg(m));
    }
    /// Applies the user's limits, CPU quota included, once the sandbox is
    /// the user's (an unclaimed pool slot gets them at claim).
    /// Only a CPU limit differs between the two states: without one, the
    /// limits written at the cgroup's creation (or claim) stand, and the
    /// writes (on the path of a cold sandbox's first exec) are skipped.
    fn throttle(&self, st: &State) {
        if st.claimed && st.limits.cpu.is_some() {
            self.apply_limits(&st.limits);
        }
    }
    /// Lifts the CPU quota (memory and process limits stay) while gVisor
    /// works on the user's behalf: a boot or a checkpoint at 0.1 cores would
    /// take ten times as long.
    fn unthrottle(&self, st: &State) {
        if st.limits.cpu.is_some() {
            self.apply_limits(&unthrottled(&st.limits));
        }
    }
    fn apply_limits(&self, limits: &gworker_runtime::Limits) {
        if self.cgroup_ok {
            if let Err(e) = self.cgroup.apply(limits) {
                eprintln!("supervisor: cannot apply the sandbox's CPU limit: {e}");
            }
        }
    }
}

fn unthrottled(limits: &gworker_runtime::Limits) -> gworker_runtime::Limits {
    gworker_runtime::Limits {
        cpu: None,
        ..limits.clone()
    }
}

/// What a warm-pool slot reads while it waits for its claim: the dynamic
/// loader, libc and the commands a first command most often is, so that the
/// claimed sandbox's first exec does not fetch them through the gofer
/// (~15 ms of a Debian sandbox's first `echo`). Reading leaves nothing a
/// user could see; missing files are skipped.
const PREFETCH: &[&str] = &[
    "/etc/ld.so.cache",
    // Read by every dynamic program on debian-slim (its statx fix, and
    // setlocale for LANG=C.UTF-8).
    "/etc/ld.so.preload",
    "/usr/lib/gworker/statx-fix.so",
    "/usr/lib/locale/locale-archive",
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/x86_64-linux-gnu/libm.so.6",
    "/bin/sh",
    "/bin/bash",
    "/bin/busybox",
    "/usr/bin/env",
    "/bin/echo",
    "/bin/true",
    "/bin/cat",
    "/usr/bin/python3",
];

/// Commands a first command most often starts with, and the directories of
/// the images' standard PATH: a slot also looks each name up in each
/// directory, so that the claimed sandbox's first exec finds the misses of
/// its PATH search (5 of them for busybox's `/bin/echo`, each a round trip to
/// the gofer on a fresh sandbox) cached.
const PREFETCH_COMMANDS: &[&str] = &["sh", "bash", "echo", "true", "cat", "env", "ls", "python3"];
const PREFETCH_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

fn prefetch_paths() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = PREFETCH.iter().map(|p| p.as_bytes().to_vec()).collect();
    for name in PREFETCH_COMMANDS {
        for dir in PREFETCH_PATH {
            out.push(format!("{dir}/{name}").into_bytes());
        }
    }
    out
}

/// The network gate's FIFO, in the sandbox's directory.
const NET_GATE: &str = "net.gate";

/// Entry point of `gworker supervise DIR`. Never returns.
pub fn main(dir: &Path) -> ! {
    let code = match run(dir) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("supervisor: {e}");
            1
        }
    };
    std::process::exit(code)
}

/// A supervisor started ahead of need (`EXE supervise-standby PLACEHOLDER`,
/// the placeholder as long as its future sandbox directory's path): it waits
/// on [`STANDBY_FD`] for one message, its sandbox's directory with the
/// listening socket, the log file
/// and (if the sandbox has secrets) the secrets pipe attached (SCM_RIGHTS),
/// puts them where [`main`] expects them (fd 3, fds 1 and 2, fd 4), and goes
/// on as `supervise DIR` would. The daemon keeps one ready, so that a create
/// does not wait for a process to start (fork of the daemon, exec, loading
/// this binary: 0.5-2.3 ms measured). It exits when the daemon closes the
/// socket without sending anything.
pub fn standby_main() -> ! {
    match receive_assignment() {
        Ok(Some(dir)) => {
            show_as_supervisor_of(&dir);
            main(&dir)
        }
        Ok(None) => std::process::exit(0),
        Err(e) => {
            eprintln!("supervisor: standby: {e}");
            std::process::exit(1)
        }
    }
}

fn receive_assignment() -> std::io::Result<Option<PathBuf>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use nix::unistd::{close, dup2};
    use std::os::unix::ffi::OsStringExt;
    // Fds 3 and 4 are taken (by /dev/null) until the received ones replace
    // them, so that what arrives never lands on a number it must move to.
    for fd in [LISTENER_FD, SECRETS_FD] {
        let null = std::os::fd::IntoRawFd::into_raw_fd(std::fs::File::open("/dev/null")?);
        if null != fd {
            dup2(null, fd)?;
            let _ = close(null);
        }
    }
    // The sandbox's netns is made while waiting (on a number above 4, now
    // that 3 and 4 are taken); dropped if the sandbox has no network.
    let _ = gworker_runtime::net::premake_netns();
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 3]);
    let (len, fds) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(STANDBY_FD, &mut iov, Some(&mut cmsg), MsgFlags::empty())
            .map_err(std::io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(got) = c {
                fds.extend(got);
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 {
        return Ok(None);
    }
    let (listener, log, secrets) = match fds[..] {
        [l, g] => (l, g, None),
        [l, g, s] => (l, g, Some(s)),
        _ => return Err(std::io::Error::other(format!("{} fds received", fds.len()))),
    };
    dup2(listener, LISTENER_FD)?;
    dup2(log, 1)?;
    dup2(log, 2)?;
    if let Some(s) = secrets {
        dup2(s, SECRETS_FD)?;
    }
    for fd in fds.into_iter().chain([STANDBY_FD]) {
        let _ = close(fd);
    }
    buf.truncate(len);
    Ok(Some(PathBuf::from(std::ffi::OsString::from_vec(buf))))
}

/// Makes `ps` (and /proc/PID/cmdline) show `EXE supervise DIR`, as for a
/// supervisor started for its sandbox, so that it is found by its sandbox's
/// ID: the new line is written over the process's own argument area, which
/// the daemon made long enough with a placeholder of DIR's length (see
/// `standby_main`). Best effort: nothing is written if it does not fit.
fn show_as_supervisor_of(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let exe = std::env::args_os().next().unwrap_or_default();
    let mut line = Vec::new();
    for part in [exe.as_bytes(), b"supervise", dir.as_os_str().as_bytes()] {
        line.extend_from_slice(part);
        line.push(0);
    }
    // Fields 48 and 49 of /proc/self/stat: where the argument area is.
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (Some(Ok(start)), Some(Ok(end))) = (
        fields.get(45).map(|f| f.parse::<usize>()),
        fields.get(46).map(|f| f.parse::<usize>()),
    ) else {
        return;
    };
    if start == 0 || end <= start || line.len() > end - start {
        return;
    }
    // SAFETY: [start, end) is this process's argument area (on its stack,
    // writable, mapped for the process's life); nothing reads the old
    // arguments any more (they were parsed, and `exe` copied, above).
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, end - start);
        area[..line.len()].copy_from_slice(&line);
        area[line.len()..].fill(0);
    }
}

fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let cfg: LaunchConfig = serde_json::from_slice(&std::fs::read(dir.join("launch.json"))?)?;
    if let Some(fd) = cfg.secrets_fd {
        crate::secrets::load(fd)?;
    }
    // SAFETY: the daemon passes the bound, listening socket as LISTENER_FD and
    // nothing else in this process owns it.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(LISTENER_FD) };
    std_listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(dir.to_path_buf(), cfg, std_listener))
}

async fn serve(
    dir: PathBuf,
    cfg: LaunchConfig,
    std_listener: std::os::unix::net::UnixListener,
) -> Result<(), Box<dyn std::error::Error>> {
    let t0 = std::time::Instant::now();
    let listener = UnixListener::from_std(std_listener)?;
    let bundle = dir.join("bundle");
    // A setup that fails fails the sandbox (with the reason as its message),
    // not this process: the daemon learns why from the status.
    let mut prepared: Result<(), String> = Ok(());
    let cgroup = gworker_runtime::Cgroup::new(&cfg.sandbox_id);
    let cgroup_ok = match cgroup.create(&unthrottled(&cfg.limits)) {
        Ok(()) => true,
        // Without limits asked for, a host without writable cgroups still runs sandboxes.
        Err(e) if cfg.limits == gworker_runtime::Limits::default() => {
            eprintln!("supervisor: no cgroups ({e}); running without resource limits");
            false
        }
        Err(e) => {
            prepared = Err(format!("cannot set up the sandbox's cgroups: {e}"));
            false
        }
    };
    if cgroup_ok && cfg.pooled {
        if let Err(e) = cgroup.set_cpu_shares(gworker_runtime::cgroup::POOL_CPU_SHARES) {
            eprintln!("supervisor: cannot lower the warm slot's CPU weight: {e}");
        }
    }
    let gate = match prepared {
        Ok(()) => match prepare(&dir, &cfg, cgroup_ok.then_some(cgroup.path.as_str())).await {
            Ok(gate) => gate,
            Err(e) => {
                prepared = Err(e);
                None
            }
        },
        Err(_) => None,
    };
    let prepared_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let runsc = gworker_runtime::Runsc::new(&cfg.runsc_bin, &cfg.runsc_root);
    let (to_agent, rx) = mpsc::unbounded_channel();
    let mut procs = BTreeMap::new();
    let mut next_id = 1;
    if let Some(r) = &cfg.restore {
        for p in &r.procs {
            procs.insert(p.id, restored_proc(p));
        }
        next_id = r.next_id;
    }
    let shared = Arc::new(Shared {
        st: Mutex::new(State {
            phase: Phase::Starting,
            exit_code: None,
            reason: None,
            message: None,
            exited_at: None,
            procs,
            next_id,
            pending: HashMap::new(),
            stopping: false,
            runsc_exited: false,
            net_removed: !cfg.networked(),
            gen: 0,
            quiesced: None,
            pongs: HashMap::new(),
            mounted: HashMap::new(),
            seq: 0,
            checkpointing: false,
            runsc_pid: None,
            deadline: if cfg.pooled {
                f64::INFINITY
            } else {
                cfg.deadline
            },
            entry: if cfg.pooled { None } else { cfg.entry.clone() },
            claimed: !cfg.pooled,
            limits: cfg.limits.clone(),
            net_error: None,
        }),
        changed: Notify::new(),
        to_agent,
        cfg: cfg.clone(),
        runsc: runsc.clone(),
        shutdown: Notify::new(),
        dir: dir.clone(),
        cgroup,
        cgroup_ok,
        gate,
        t0,
        steps: Mutex::new(vec![("prepared", prepared_ms)]),
    });
    tokio::spawn(agent_writer(rx));
    let cmd = match &cfg.restore {
        Some(r) => runsc.restore_command(&bundle, &r.image_path, &cfg.sandbox_id),
        None => runsc.run_command(&bundle, &cfg.sandbox_id),
    };
    let launched = prepared.and_then(|()| {
        launch(&shared, cmd, 0, cfg.restore.is_some())
            .map_err(|e| format!("cannot start runsc: {e}"))
    });
    if launched.is_ok() && cfg.networked() {
        tokio::spawn(make_network(shared.clone()));
    }
    match launched {
        Ok(()) if cfg.restore.is_some() => {
            tokio::spawn(finish_restore(shared.clone()));
        }
        Ok(()) => {
            tokio::spawn(boot_watchdog(shared.clone()));
        }
        Err(e) => {
            {
                let mut st = shared.lock();
                st.exit(None, "failed", Some(e));
                st.container_gone();
                st.stopping = true;
                st.runsc_exited = true;
            }
            // The failure is reported at once; what was made goes meanwhile
            // (a network teardown may wait for the host lock).
            let s2 = shared.clone();
            tokio::spawn(async move {
                let s3 = s2.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    remove_network(&s3.cfg);
                    s3.cgroup.remove();
                    remove_slot_volumes(&s3.cfg);
                })
                .await;
                s2.lock().net_removed = true;
                s2.changed.notify_waiters();
            });
        }
    }
    tokio::spawn(deadline_timer(shared.clone()));
    let accept = {
        let shared = shared.clone();
        async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        tokio::spawn(handle_conn(shared.clone(), conn));
                    }
                    Err(e) => {
                        eprintln!("supervisor: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    };
    // SIGTERM (an operator's `kill`, a service manager stopping everything):
    // the sandbox is stopped as by a shutdown request, its network and
    // cgroups removed, instead of the default death that leaves them.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = accept => {}
        _ = shared.shutdown.notified() => {}
        _ = term.recv() => {
            eprintln!("supervisor: SIGTERM: stopping the sandbox");
            shutdown(&shared).await;
        }
    }
    // The network goes after the answer to a shutdown, but before this
    // process does: normally runsc_waiter removes it once runsc has ended;
    // whatever path skipped that (a container replaced by a failed restore,
    // say), it is removed here.
    if !wait_for(&shared, Duration::from_secs(5), |st| st.net_removed).await {
        let cfg = shared.cfg.clone();
        let _ = tokio::task::spawn_blocking(move || remove_network(&cfg)).await;
    }
    Ok(())
}

/// Makes what runsc needs before it starts: the sandbox's (empty) netns and
/// its network gate, and the OCI bundle. On error nothing of it is left.
async fn prepare(
    dir: &Path,
    cfg: &LaunchConfig,
    cgroup: Option<&str>,
) -> Result<Option<gworker_runtime::net::ReadyGate>, String> {
    let bundle = dir.join("bundle");
    // Only the empty netns is made now: runsc joins it early but reads it
    // ~100 ms later, after its prestart hook, which waits on the gate until
    // `make_network` has made the veth, addresses and rules meanwhile.
    let (network, gate) = if cfg.networked() {
        let state = cfg
            .net_state_dir
            .clone()
            .ok_or("a networked sandbox needs net_state_dir")?;
        // On this thread: nothing else runs before runsc starts, and a
        // standby made the namespace already (a bind mount is left to do).
        let netns = gworker_runtime::net::SandboxNet::create_netns(&cfg.sandbox_id, &state)
            .map_err(|e| format!("cannot set up the sandbox's network: {e}"))?;
        let resolv = dir.join("resolv.conf");
        std::fs::write(&resolv, gworker_runtime::net::SandboxNet::resolv_conf())
            .map_err(|e| format!("cannot write {}: {e}", resolv.display()))
            .inspect_err(|_| remove_network(cfg))?;
        let gate = gworker_runtime::net::ReadyGate::create(&dir.join(NET_GATE))
            .map_err(|e| format!("cannot make the network gate: {e}"))
            .inspect_err(|_| remove_network(cfg))?;
        (Some((netns, resolv)), Some(gate))
    } else {
        gworker_runtime::net::discard_premade_netns();
        (None, None)
    };
    gworker_runtime::write_bundle(
        &bundle,
        &gworker_runtime::BundleSpec {
            rootfs: cfg.rootfs.clone(),
            agent: cfg.agent.clone(),
            hostname: "sandbox".into(),
            cgroup: cgroup.map(str::to_string),
            user: cfg.user,
            network,
            network_gate: gate.as_ref().map(|_| dir.join(NET_GATE)),
            mounts: match &cfg.slot_volumes {
                Some(_) => Vec::new(),
                None => cfg
                    .volumes
                    .iter()
                    .map(|v| gworker_runtime::BindMount {
                        source: v.source.clone(),
                        destination: v.destination.clone(),
                    })
                    .collect(),
            },
            slot_volumes: cfg.slot_volumes.clone(),
            agent_mounts: cfg.pooled && cfg.slot_volumes.is_some(),
        },
    )
    .map_err(|e| format!("cannot write the sandbox's bundle: {e}"))
    .and_then(|()| {
        let Some(vdir) = &cfg.slot_volumes else {
            return Ok(());
        };
        gworker_runtime::volbind::create(vdir)
            .and_then(|()| {
                gworker_runtime::volbind::bind_all(vdir, cfg.volumes.iter().map(|v| &*v.source))
            })
            .map_err(|e| format!("cannot prepare the sandbox's volumes: {e}"))
            .inspect_err(|_| remove_slot_volumes(cfg))
    })
    .inspect_err(|_| remove_network(cfg))?;
    Ok(gate)
}

/// Unmounts a slot's volume directory (see `gworker_runtime::volbind`).
fn remove_slot_volumes(cfg: &LaunchConfig) {
    if let Some(dir) = &cfg.slot_volumes {
        if let Err(e) = gworker_runtime::volbind::remove(dir) {
            eprintln!("supervisor: removing {}: {e}", dir.display());
        }
    }
}

/// A claim's volumes: bound under the slot's volume directory on the host
/// (the mounts reach the running sandbox through its gofer), then
/// bind-mounted at their paths by the agent, before any process starts.
async fn mount_claim_volumes(
    shared: &Arc<Shared>,
    volumes: &[VolumeMount],
) -> Result<(), SupError> {
    let cannot = |e: String| {
        SupError::new(
            "internal",
            format!("cannot mount the sandbox's volumes: {e}"),
        )
    };
    let Some(dir) = shared.cfg.slot_volumes.clone() else {
        return Err(cannot("this sandbox has no slot volume directory".into()));
    };
    let sources: Vec<PathBuf> = volumes.iter().map(|v| v.source.clone()).collect();
    tokio::task::spawn_blocking(move || {
        gworker_runtime::volbind::bind_all(&dir, sources.iter().map(|s| &**s))
    })
    .await
    .map_err(|e| cannot(e.to_string()))?
    .map_err(|e| cannot(e.to_string()))?;
    let (tx, rx) = oneshot::channel();
    let seq = {
        let mut st = shared.lock();
        let seq = st.next_seq();
        st.mounted.insert(seq, tx);
        seq
    };
    shared.send(HostMsg::Mount {
        seq,
        sources: (0..volumes.len())
            .map(|i| format!("{}/{i}", gworker_runtime::SLOT_VOLUMES_PATH).into_bytes())
            .collect(),
        targets: volumes
            .iter()
            .map(|v| v.destination.clone().into_bytes())
            .collect(),
    });
    match tokio::time::timeout(answer_limit(), rx).await {
        Ok(Ok(e)) if e.is_empty() => Ok(()),
        Ok(Ok(e)) => Err(cannot(e)),
        _ => Err(cannot("the agent did not answer".into())),
    }
}

async fn agent_writer(mut rx: mpsc::UnboundedReceiver<ToAgent>) {
    let mut stdin: Option<tokio::process::ChildStdin> = None;
    let mut held: VecDeque<HostMsg> = VecDeque::new();
    let mut holding = false;
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(item) = rx.recv().await {
        buf.clear();
        let mut next = Some(item);
        // Gather a batch of frames to write at once.
        while let Some(item) = next.take() {
            match item {
                ToAgent::Msg(m) if holding || stdin.is_none() => held.push_back(m),
                ToAgent::Msg(m) => m.encode(&mut buf),
                ToAgent::Quiesce => {
                    HostMsg::Quiesce.encode(&mut buf);
                    holding = true;
                }
                ToAgent::Attach { stdin: new, resume } => {
                    if let Some(new) = new {
                        // Frames for the old pipes are flushed before the switch.
                        if let Some(old) = stdin.as_mut() {
                            let _ = old.write_all(&buf).await;
                        }
                        buf.clear();
                        stdin = Some(new);
                    }
                    if resume {
                        HostMsg::Resume.encode(&mut buf);
                    }
                    holding = false;
                    for m in held.drain(..) {
                        m.encode(&mut buf);
                    }
                }
            }
            if buf.len() < 1 << 20 {
                next = rx.try_recv().ok();
            }
        }
        if let Some(w) = stdin.as_mut() {
            if !buf.is_empty() && w.write_all(&buf).await.is_err() {
                // The container is gone; keep draining so senders never block.
                stdin = None;
            }
        }
    }
}

/// Starts `cmd` (runsc run or restore) on fresh pipes as generation `gen`.
fn launch(
    shared: &Arc<Shared>,
    cmd: std::process::Command,
    gen: u64,
    resume: bool,
) -> std::io::Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(shared.dir.join("runsc.log"))?;
    // A networked sandbox's runsc runs in the mount namespace work-around
    // (see gworker_runtime::net) with --network=sandbox; run and restore alike.
    let cmd = if shared.cfg.networked() {
        gworker_runtime::net::wrap_runsc(&cmd)
    } else {
        cmd
    };
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    let mut child = cmd.spawn()?;
    shared.step("runsc started");
    shared.lock().runsc_pid = child.id().map(|p| p as i32);
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let _ = shared.to_agent.send(ToAgent::Attach {
        stdin: Some(stdin),
        resume,
    });
    tokio::spawn(agent_reader(shared.clone(), stdout, gen));
    tokio::spawn(runsc_waiter(shared.clone(), child, gen));
    Ok(())
}

/// Sends a ping and waits for its pong: the agent is alive and reading.
async fn ping(shared: &Arc<Shared>, limit: Duration) -> bool {
    let (tx, rx) = oneshot::channel();
    let seq = {
        let mut st = shared.lock();
        let seq = st.next_seq();
        st.pongs.insert(seq, tx);
        seq
    };
    shared.send(HostMsg::Ping { seq });
    matches!(tokio::time::timeout(limit, rx).await, Ok(Ok(())))
}

/// A restored sandbox is running once its agent answers on the new pipes.
async fn finish_restore(shared: Arc<Shared>) {
    let ok = ping(&shared, Duration::from_secs(30)).await;
    {
        let mut st = shared.lock();
        if st.phase != Phase::Starting {
            return;
        }
        if ok {
            st.phase = Phase::Running;
            shared.throttle(&st);
        } else {
            st.exit(
                None,
                "failed",
                Some("the restored sandbox did not answer".into()),
            );
        }
    }
    shared.changed.notify_waiters();
    if !ok {
        stop_container(shared);
    }
}

fn restored_proc(p: &CheckpointProc) -> Proc {
    let mut out = [OutBuf::new(), OutBuf::new()];
    for (i, o) in out.iter_mut().enumerate() {
        o.outstanding = p.outstanding[i];
        o.eof = p.eof[i];
    }
    Proc {
        argv: p.argv.clone(),
        started_at: p.started_at,
        exit_code: p.exit_code,
        out,
    }
}

async fn agent_reader(shared: Arc<Shared>, stdout: tokio::process::ChildStdout, gen: u64) {
    let mut r = BufReader::with_capacity(512 * 1024, stdout);
    let mut frame = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if r.read_exact(&mut len).await.is_err() {
            break;
        }
        let n = match gworker_proto::frame_len(len) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("supervisor: bad frame from agent: {e}");
                break;
            }
        };
        frame.resize(n, 0);
        if r.read_exact(&mut frame).await.is_err() {
            break;
        }
        match AgentMsg::decode(&frame) {
            Ok(AgentMsg::Quiesced) => {
                // Nothing follows on these pipes; the next generation reads on.
                if let Some(tx) = shared.lock().quiesced.take() {
                    let _ = tx.send(());
                }
                return;
            }
            Ok(m) => {
                if shared.lock().gen != gen {
                    return;
                }
                on_agent_msg(&shared, m)
            }
            Err(e) => {
                eprintln!("supervisor: undecodable frame from agent: {e}");
                break;
            }
        }
    }
}

fn on_agent_msg(shared: &Arc<Shared>, m: AgentMsg) {
    let mut st = shared.lock();
    match m {
        AgentMsg::Hello { version, agent } => {
            if version != PROTOCOL_VERSION {
                st.exit(
                    None,
                    "failed",
                    Some(format!(
                        "agent {agent} speaks protocol {version}, expected {PROTOCOL_VERSION}"
                    )),
                );
                drop(st);
                stop_container(shared.clone());
                return;
            }
            if st.phase == Phase::Starting {
                st.phase = Phase::Running;
                shared.step("agent hello");
                let steps = shared.steps.lock().unwrap_or_else(|e| e.into_inner());
                let line: Vec<String> =
                    steps.iter().map(|(w, ms)| format!("{w} {ms:.1}")).collect();
                eprintln!(
                    "supervisor: boot steps (ms since start at {:.3}): {}",
                    now() - shared.t0.elapsed().as_secs_f64(),
                    line.join(", ")
                );
                drop(steps);
                shared.throttle(&st);
                if let Some(entry) = st.entry.clone() {
                    start_entry(shared, &mut st, &entry);
                }
                if !st.claimed {
                    shared.send(HostMsg::Prefetch {
                        paths: prefetch_paths(),
                    });
                }
            }
        }
        AgentMsg::Spawned { pid, .. } => {
            if let Some(tx) = st.pending.remove(&pid) {
                let _ = tx.send(Ok(()));
            }
        }
        AgentMsg::SpawnFailed { pid, kind, message } => {
            if let Some(tx) = st.pending.remove(&pid) {
                let code = match kind {
                    SpawnErrorKind::NotFound => "command_not_found",
                    SpawnErrorKind::NoWorkdir => "workdir_not_found",
                    SpawnErrorKind::NotExecutable | SpawnErrorKind::Other => "exec_failed",
                };
                let _ = tx.send(Err(SupError::new(code, message)));
            }
        }
        AgentMsg::Output { pid, stream, data } => {
            if let Some(p) = st.procs.get_mut(&pid) {
                let o = &mut p.out[sidx(stream)];
                o.outstanding = o.outstanding.saturating_sub(data.len() as u64);
                o.buf.extend(data);
                if let Some(bytes) = o.credit() {
                    shared.send(HostMsg::Credit { pid, stream, bytes });
                }
            }
        }
        AgentMsg::Eof { pid, stream } => {
            if let Some(p) = st.procs.get_mut(&pid) {
                p.out[sidx(stream)].eof = true;
            }
        }
        AgentMsg::Exited { pid, code } => {
            if let Some(p) = st.procs.get_mut(&pid) {
                p.exit_code = Some(code);
            }
            if pid == 0 {
                st.exit(Some(code), "exited", None);
                drop(st);
                tokio::spawn(stop_after_entry(shared.clone()));
                shared.changed.notify_waiters();
                return;
            }
        }
        AgentMsg::Pong { seq } => {
            if let Some(tx) = st.pongs.remove(&seq) {
                let _ = tx.send(());
            }
        }
        AgentMsg::Mounted { seq, error } => {
            if let Some(tx) = st.mounted.remove(&seq) {
                let _ = tx.send(error);
            }
        }
        AgentMsg::Quiesced => {}
        AgentMsg::Log { message } => eprintln!("agent: {message}"),
    }
    drop(st);
    shared.changed.notify_waiters();
}

/// Starts the entry command as process 0 (the agent is up).
fn start_entry(shared: &Arc<Shared>, st: &mut State, entry: &ProcSpec) {
    st.procs.insert(0, new_proc(entry));
    let (tx, rx) = oneshot::channel();
    st.pending.insert(0, tx);
    shared.send(spawn_msg(0, entry));
    tokio::spawn(entry_spawn_result(shared.clone(), rx));
}

/// Gives a warm-pool sandbox to its user.
async fn claim(
    shared: &Arc<Shared>,
    entry: Option<ProcSpec>,
    deadline: f64,
    limits: gworker_runtime::Limits,
    secrets: crate::wire::SecretEnv,
    network: Option<gworker_runtime::net::NetPolicy>,
    volumes: Vec<VolumeMount>,
) -> Result<serde_json::Value, SupError> {
    wait_running(shared).await?;
    // Before the volumes are mounted into it; the check under the lock
    // below is the one that settles two claims at once.
    if shared.lock().claimed {
        return Err(SupError::new(
            "conflict",
            "this sandbox was already claimed",
        ));
    }
    if !volumes.is_empty() {
        mount_claim_volumes(shared, &volumes).await?;
    }
    if let Some(policy) = network.filter(|p| Some(p) != shared.cfg.network.as_ref()) {
        let cannot = |e: String| {
            SupError::new(
                "internal",
                format!("cannot apply the sandbox's network policy: {e}"),
            )
        };
        if !shared.cfg.networked() || !policy.needs_netns() {
            return Err(cannot(
                "a slot's network can only change to another networked policy".into(),
            ));
        }
        let (id, state) = (
            shared.cfg.sandbox_id.clone(),
            shared.cfg.net_state_dir.clone().unwrap_or_default(),
        );
        tokio::task::spawn_blocking(move || {
            gworker_runtime::net::SandboxNet::set_policy(&id, &policy, &state)
        })
        .await
        .map_err(|e| cannot(e.to_string()))?
        .map_err(|e| cannot(e.to_string()))?;
    }
    // The slot's cgroup has its boot limits (the daemon's defaults): most
    // claims keep them, and skip four writes. A CPU quota is always written
    // (a boot runs without one, see `Shared::unthrottle`).
    let keep = limits == shared.cfg.limits && limits.cpu.is_none();
    (if keep {
        Ok(())
    } else {
        shared.cgroup.apply(&limits)
    })
    .and_then(|()| {
        shared
            .cgroup
            .set_cpu_shares(gworker_runtime::cgroup::DEFAULT_CPU_SHARES)
    })
    .map_err(|e| {
        SupError::new(
            "internal",
            format!("cannot apply the sandbox's limits: {e}"),
        )
    })?;
    {
        let mut st = shared.lock();
        if st.claimed {
            return Err(SupError::new(
                "conflict",
                "this sandbox was already claimed",
            ));
        }
        if st.phase != Phase::Running || st.stopping {
            return Err(not_running_in(&st));
        }
        if !secrets.is_empty() && !crate::secrets::set(secrets.0) {
            return Err(SupError::new(
                "conflict",
                "this sandbox has its secrets already",
            ));
        }
        st.claimed = true;
        st.limits = limits;
        st.deadline = deadline;
        st.entry = entry.clone();
        if let Some(e) = &entry {
            start_entry(shared, &mut st, e);
        }
    }
    shared.changed.notify_waiters();
    Ok(serde_json::Value::Null)
}

fn new_proc(spec: &ProcSpec) -> Proc {
    Proc {
        argv: spec.argv.clone(),
        started_at: now(),
        exit_code: None,
        out: [OutBuf::new(), OutBuf::new()],
    }
}

fn spawn_msg(pid: u32, spec: &ProcSpec) -> HostMsg {
    HostMsg::Spawn(gworker_proto::Spawn {
        pid,
        flags: if spec.mkdir_cwd {
            gworker_proto::SPAWN_MKDIR_CWD
        } else {
            0
        },
        argv: spec.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: crate::secrets::env_for(spec),
        cwd: spec.cwd.as_bytes().to_vec(),
    })
}

/// An entry command that cannot start ends the sandbox the way a shell would:
/// 127 (not found) or 126 (cannot execute), with the reason on its stderr.
async fn entry_spawn_result(shared: Arc<Shared>, rx: oneshot::Receiver<Result<(), SupError>>) {
    let Ok(Err(e)) = rx.await else { return };
    {
        let mut st = shared.lock();
        let code = if e.code == "command_not_found" {
            127
        } else {
            126
        };
        if let Some(p) = st.procs.get_mut(&0) {
            p.exit_code = Some(code);
            p.out[1]
                .buf
                .extend(format!("gworker: {}\n", e.message).into_bytes());
            for o in &mut p.out {
                o.eof = true;
            }
        }
        st.exit(Some(code), "exited", None);
    }
    shared.changed.notify_waiters();
    stop_container(shared);
}

/// After the entry command exits, give its streams a moment to drain, then
/// stop the container (every other process goes with it).
async fn stop_after_entry(shared: Arc<Shared>) {
    let grace = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let st = shared.lock();
            let drained = st
                .procs
                .get(&0)
                .map(|p| p.out.iter().all(|o| o.eof))
                .unwrap_or(true);
            if drained {
                break;
            }
        }
        if tokio::time::timeout_at(grace, notified).await.is_err() {
            break;
        }
    }
    stop_container(shared);
}

/// Kills the container in the background; `runsc_waiter` sees it end.
fn stop_container(shared: Arc<Shared>) {
    {
        let mut st = shared.lock();
        if st.stopping {
            return;
        }
        st.stopping = true;
    }
    // The sandbox runs attached to `runsc run` (it dies with it), so killing
    // that process stops everything at once, also while runsc is still
    // booting and whatever state runsc's --root holds. `runsc_waiter` then
    // removes runsc's state.
    let pid = shared.lock().runsc_pid;
    if let Some(pid) = pid {
        // Kill runsc's own children (sentry and gofer) first, so that `runsc
        // run` reaps them and exits: killing only it would orphan them to
        // PID 1 as zombies, and `runsc delete` waits until they are reaped.
        let children = child_pids(pid);
        for c in &children {
            // SAFETY: kill(2) of processes runsc started for this sandbox.
            unsafe { libc::kill(*c, libc::SIGKILL) };
        }
        if children.is_empty() {
            // Still booting: stop runsc itself (its sandbox dies with it).
            // SAFETY: plain kill(2) of our own child, which is not reaped
            // before runsc_waiter clears `runsc_pid`.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        } else {
            // Should runsc not notice, make sure it goes anyway.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                if shared.lock().runsc_pid == Some(pid) {
                    // SAFETY: as above; still our unreaped child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            });
        }
    }
}

/// The direct children of `pid`, from /proc.
fn child_pids(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

async fn runsc_waiter(shared: Arc<Shared>, mut child: tokio::process::Child, gen: u64) {
    let pid = child.id().map(|p| p as i32);
    let status = child.wait().await;
    eprintln!("supervisor: runsc (generation {gen}) ended: {status:?}");
    {
        let mut st = shared.lock();
        if st.runsc_pid == pid {
            st.runsc_pid = None;
        }
        if st.gen != gen {
            // Replaced by a restore after a checkpoint: not the sandbox's end.
            return;
        }
        if st.phase != Phase::Exited {
            let tail = log_tail(&shared.dir.join("runsc.log"));
            let msg = match (&status, st.phase) {
                (_, Phase::Starting) => match &st.net_error {
                    Some(e) => format!("cannot set up the sandbox's network: {e}"),
                    None => match gworker_runtime::host::nofile_too_low() {
                        Some(n) => format!(
                            "the sandbox failed to start: {tail} (the daemon's open-files limit \
                             is {n}; runsc needs more: restart `gworker serve` with \
                             `ulimit -n {}` or more)",
                            gworker_runtime::host::NOFILE_NEEDED
                        ),
                        None => format!("the sandbox failed to start: {tail}"),
                    },
                },
                (Ok(s), _) => format!("the sandbox stopped unexpectedly ({s}): {tail}"),
                (Err(e), _) => format!("the sandbox stopped unexpectedly: {e}"),
            };
            if shared.cgroup.oom_killed() {
                st.exit(
                    Some(137),
                    "oom",
                    Some("the sandbox ran out of memory and was killed (raise `memory` when you create it)".into()),
                );
            } else if shared.cgroup.pids_exhausted() {
                st.exit(
                    Some(137),
                    "process_limit",
                    Some("the sandbox hit its process limit and was stopped (raise `max_processes` when you create it)".into()),
                );
            } else {
                st.exit(Some(137), "failed", Some(msg));
            }
        }
        st.container_gone();
        st.stopping = true;
    }
    let s2 = shared.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let _ = s2.runsc.delete_force(&s2.cfg.sandbox_id);
        s2.cgroup.remove();
        remove_slot_volumes(&s2.cfg);
    })
    .await;
    shared.lock().runsc_exited = true;
    shared.changed.notify_waiters();
    // After runsc_exited: a terminate does not wait for the ~50 ms this takes.
    let s2 = shared.clone();
    // Nobody waits for this: other sandboxes' setups go first.
    gworker_runtime::net::set_background(true);
    let _ = tokio::task::spawn_blocking(move || remove_network(&s2.cfg)).await;
    shared.lock().net_removed = true;
    shared.changed.notify_waiters();
}

/// Makes the veth, addresses, routes and rules in the netns runsc already
/// joined, then opens the gate its prestart hook waits on (or makes the hook
/// fail, and with it the start).
async fn make_network(shared: Arc<Shared>) {
    let cfg = shared.cfg.clone();
    let t0 = std::time::Instant::now();
    let res = tokio::task::spawn_blocking(move || set_up_network(&cfg, true))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match &res {
        Ok(()) => {
            shared.step("network ready");
            eprintln!("supervisor: network ready after {:?}", t0.elapsed())
        }
        Err(e) => {
            eprintln!("supervisor: cannot set up the sandbox's network: {e}");
            shared.lock().net_error = Some(e.clone());
        }
    }
    if let Some(gate) = &shared.gate {
        if let Err(e) = gate.open_gate(res.is_ok()) {
            eprintln!("supervisor: cannot open the network gate: {e}");
        }
    }
}

/// Makes the sandbox's veth, addresses, routes and rules: in the netns
/// already made (`in_netns`, runsc has joined it), or all of it afresh on the
/// sandbox's slot (before a restore in place).
fn set_up_network(cfg: &LaunchConfig, in_netns: bool) -> Result<(), String> {
    use gworker_runtime::net::SandboxNet;
    let state = cfg.net_state_dir.clone().unwrap_or_default();
    let policy = cfg.network.clone().unwrap_or_default();
    let made = if in_netns {
        SandboxNet::setup_in_netns(&cfg.sandbox_id, &policy, &state)
    } else {
        SandboxNet::setup(&cfg.sandbox_id, &policy, &state)
    };
    made.map(|_| ()).map_err(|e| e.to_string())
}

/// Removes the sandbox's network namespace, veth and rules, if it has them.
fn remove_network(cfg: &LaunchConfig) {
    if let (true, Some(state)) = (cfg.networked(), &cfg.net_state_dir) {
        if let Err(e) = gworker_runtime::net::SandboxNet::teardown(&cfg.sandbox_id, state) {
            eprintln!("supervisor: cannot remove the sandbox's network: {e}");
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(3);
    lines[start..].join(" | ")
}

async fn deadline_timer(shared: Arc<Shared>) {
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let left = shared.lock().deadline - now();
        if left <= 0.0 {
            break;
        }
        // A claim moves the deadline: wake on changes, re-check at least hourly.
        let _ = tokio::time::timeout(Duration::from_secs_f64(left.min(3600.0)), notified).await;
    }
    kill_sandbox(&shared, "timeout");
}

/// How long a cold boot may take until the agent's hello: normally ~0.3 s,
/// a few seconds on a loaded host. `GWORKER_BOOT_LIMIT_SECS` overrides it
/// (tests use a short one).
fn boot_limit() -> Duration {
    gworker_runtime::env_secs("GWORKER_BOOT_LIMIT_SECS", 60)
}

/// Fails a sandbox whose boot hangs, so that nothing waits on it forever.
async fn boot_watchdog(shared: Arc<Shared>) {
    let limit = boot_limit();
    if wait_for(&shared, limit, |st| st.phase != Phase::Starting).await {
        return;
    }
    {
        let mut st = shared.lock();
        if st.phase != Phase::Starting {
            return;
        }
        let msg = match &st.net_error {
            Some(e) => format!("cannot set up the sandbox's network: {e}"),
            None => format!(
                "the sandbox did not start within {} s: {}",
                limit.as_secs(),
                log_tail(&shared.dir.join("runsc.log"))
            ),
        };
        st.exit(None, "failed", Some(msg));
    }
    shared.changed.notify_waiters();
    stop_container(shared);
}

/// How long an exec waits for the agent's answer to its spawn.
/// `GWORKER_AGENT_ANSWER_SECS` overrides it (tests use a short one).
fn answer_limit() -> Duration {
    gworker_runtime::env_secs("GWORKER_AGENT_ANSWER_SECS", 60)
}

fn kill_sandbox(shared: &Arc<Shared>, reason: &str) {
    kill_sandbox_saying(shared, reason, None);
}

/// Ends the sandbox (exit 137) with `reason` and, if given, a message
/// saying why, and stops it.
fn kill_sandbox_saying(shared: &Arc<Shared>, reason: &str, message: Option<String>) {
    {
        let mut st = shared.lock();
        if st.phase == Phase::Exited && st.stopping {
            return;
        }
        st.exit(Some(137), reason, message);
    }
    shared.changed.notify_waiters();
    stop_container(shared.clone());
}

/// Serves one connection: request lines, each answered by one line, until
/// the daemon closes it (it keeps connections for its next calls), or one
/// request that ends it: stdin data, an output stream that did not end
/// cleanly, a shutdown.
async fn handle_conn(shared: Arc<Shared>, conn: UnixStream) {
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    loop {
        if !handle_request(&shared, &mut r, &mut w).await {
            return;
        }
    }
}

/// One request of a connection; false when the connection is done.
async fn handle_request(
    shared: &Arc<Shared>,
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> bool {
    let mut line = String::new();
    // One request line; an exec's argv and env can be large (the daemon
    // accepts bodies up to 16 MiB), so allow that much and a margin.
    match r.take(40 * 1024 * 1024).read_line(&mut line).await {
        Ok(0) | Err(_) => return false,
        Ok(_) if !line.ends_with('\n') => {
            let e = SupError::new("invalid_request", "request line too long or cut short");
            let _ = answer(w, Err(e)).await;
            return false;
        }
        Ok(_) => {}
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = answer(w, Err(SupError::new("invalid_request", e.to_string()))).await;
            return false;
        }
    };
    let result = match req {
        Request::Status => {
            Ok(serde_json::to_value(shared.lock().status()).expect("status serializes"))
        }
        Request::Spawn { spec } => spawn(shared, spec).await,
        Request::Wait { id, timeout_ms } => wait(shared, id, timeout_ms).await,
        Request::Read { id, stream, offset } => {
            wait_started(shared).await;
            return read(shared, w, id, stream, offset).await;
        }
        Request::Stdin { id, len } => {
            // Its data follows the line (all of it read only on success):
            // the connection ends with the answer.
            wait_started(shared).await;
            let result = stdin(shared, r, id, len).await;
            let _ = answer(w, result).await;
            return false;
        }
        Request::StdinClose { id } => {
            wait_started(shared).await;
            with_running_proc(shared, id, || HostMsg::StdinClose { pid: id })
        }
        Request::Signal { id, signo } => {
            wait_started(shared).await;
            with_running_proc(shared, id, || HostMsg::Signal { pid: id, signo })
        }
        Request::Checkpoint { image_path } => checkpoint(shared, image_path).await,
        Request::Claim {
            entry,
            deadline,
            limits,
            secrets,
            network,
            volumes,
        } => claim(shared, entry, deadline, limits, secrets, network, volumes).await,
        Request::Kill { reason } => {
            kill_sandbox(shared, &reason);
            Ok(serde_json::Value::Null)
        }
        Request::Shutdown => {
            shutdown(shared).await;
            let _ = answer(w, Ok(serde_json::Value::Null)).await;
            shared.shutdown.notify_one();
            return false;
        }
    };
    answer(w, result).await.is_ok()
}

async fn answer(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    a: Result<serde_json::Value, SupError>,
) -> std::io::Result<()> {
    let a = match a {
        Ok(v) => Answer::Ok(v),
        Err(e) => Answer::Err(e),
    };
    let mut line = serde_json::to_vec(&a).expect("answer serializes");
    line.push(b'\n');
    w.write_all(&line).await
}

fn not_running() -> SupError {
    SupError::new("sandbox_not_running", "the sandbox is not running")
}

/// [`not_running`], with why when the sandbox has ended.
fn not_running_in(st: &State) -> SupError {
    match (st.phase, &st.message, &st.reason) {
        (Phase::Exited, Some(m), _) => SupError::new(
            "sandbox_not_running",
            format!("the sandbox is not running: {m}"),
        ),
        (Phase::Exited, None, Some(r)) => SupError::new(
            "sandbox_not_running",
            format!("the sandbox is not running ({r})"),
        ),
        _ => not_running(),
    }
}

/// Waits until `done` holds (true) or `limit` passes (false).
async fn wait_for(shared: &Arc<Shared>, limit: Duration, done: impl Fn(&State) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done(&shared.lock()) {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return false;
        }
    }
}

/// Waits while the sandbox is starting: the entry process (0) and restored
/// processes exist from then on.
async fn wait_started(shared: &Arc<Shared>) {
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if shared.lock().phase != Phase::Starting {
            return;
        }
        notified.await;
    }
}

/// Waits until the agent said hello (or the sandbox ended).
async fn wait_running(shared: &Arc<Shared>) -> Result<(), SupError> {
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let st = shared.lock();
            match st.phase {
                Phase::Running if !st.stopping => return Ok(()),
                Phase::Starting => {}
                _ => return Err(not_running_in(&st)),
            }
        }
        notified.await;
    }
}

async fn spawn(shared: &Arc<Shared>, spec: ProcSpec) -> Result<serde_json::Value, SupError> {
    wait_running(shared).await?;
    let (id, rx) = {
        let mut st = shared.lock();
        if st.phase != Phase::Running || st.stopping {
            return Err(not_running_in(&st));
        }
        let id = st.next_id;
        st.next_id += 1;
        st.procs.insert(id, new_proc(&spec));
        let (tx, rx) = oneshot::channel();
        st.pending.insert(id, tx);
        shared.send(spawn_msg(id, &spec));
        (id, rx)
    };
    let limit = answer_limit();
    let res = match tokio::time::timeout(limit, rx).await {
        Ok(answer) => answer.unwrap_or_else(|_| Err(not_running())),
        Err(_) => {
            // A live agent answers in milliseconds (seconds under a tiny CPU
            // limit or during a snapshot): this sandbox is wedged, and every
            // later exec would hang the same way.
            shared.lock().pending.remove(&id);
            kill_sandbox_saying(
                shared,
                "failed",
                Some(format!(
                    "the sandbox's agent did not answer an exec within {} s; the sandbox was stopped",
                    limit.as_secs()
                )),
            );
            Err(not_running())
        }
    };
    match res {
        Ok(()) => Ok(serde_json::json!({ "id": id })),
        Err(e) => {
            shared.lock().procs.remove(&id);
            Err(e)
        }
    }
}

async fn wait(
    shared: &Arc<Shared>,
    id: Option<u32>,
    timeout_ms: u64,
) -> Result<serde_json::Value, SupError> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    if id.is_some()
        && tokio::time::timeout_at(deadline, wait_started(shared))
            .await
            .is_err()
    {
        return Err(SupError::new(
            "wait_timeout",
            "the sandbox is still starting",
        ));
    }
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let st = shared.lock();
            let code = match id {
                None => (st.phase == Phase::Exited).then_some(st.exit_code),
                Some(id) => match st.procs.get(&id) {
                    None => {
                        return Err(SupError::new(
                            "not_found",
                            format!("no process {id} in this sandbox"),
                        ))
                    }
                    Some(p) => p.exit_code.map(Some),
                },
            };
            if let Some(code) = code {
                return Ok(serde_json::json!({ "exit_code": code }));
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(SupError::new(
                "wait_timeout",
                "the process is still running",
            ));
        }
    }
}

fn with_running_proc(
    shared: &Arc<Shared>,
    id: u32,
    msg: impl FnOnce() -> HostMsg,
) -> Result<serde_json::Value, SupError> {
    let st = shared.lock();
    let p = st
        .procs
        .get(&id)
        .ok_or_else(|| SupError::new("not_found", format!("no process {id} in this sandbox")))?;
    if st.stopping || st.phase != Phase::Running {
        return Err(not_running_in(&st));
    }
    if p.exit_code.is_none() {
        shared.send(msg());
    }
    Ok(serde_json::Value::Null)
}

async fn stdin(
    shared: &Arc<Shared>,
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    id: u32,
    len: u64,
) -> Result<serde_json::Value, SupError> {
    with_running_proc(shared, id, || HostMsg::Stdin {
        pid: id,
        data: Vec::new(),
    })?;
    let mut left = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = (left as usize).min(chunk.len());
        r.read_exact(&mut chunk[..n])
            .await
            .map_err(|e| SupError::new("invalid_request", format!("stdin cut short: {e}")))?;
        shared.send(HostMsg::Stdin {
            pid: id,
            data: chunk[..n].to_vec(),
        });
        left -= n as u64;
    }
    Ok(serde_json::Value::Null)
}

async fn read(
    shared: &Arc<Shared>,
    w: &mut tokio::net::unix::OwnedWriteHalf,
    id: u32,
    stream: StreamName,
    mut offset: u64,
) -> bool {
    let s = match stream {
        StreamName::Stdout => Stream::Stdout,
        StreamName::Stderr => Stream::Stderr,
    };
    {
        let check = match shared.lock().procs.get(&id) {
            None => Err(SupError::new(
                "not_found",
                format!("no process {id} in this sandbox"),
            )),
            Some(p) if offset < p.out[sidx(s)].start => Err(SupError::new(
                "output_discarded",
                format!(
                    "output before byte {} was already read and discarded",
                    p.out[sidx(s)].start
                ),
            )),
            Some(_) => Ok(serde_json::json!({ "offset": offset })),
        };
        // An error answered leaves the connection to the next request.
        let failed = check.is_err();
        let sent = answer(w, check).await.is_ok();
        if failed || !sent {
            return sent;
        }
    }
    let mut chunk = Vec::with_capacity(READ_CHUNK + 4);
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let mut done = false;
        chunk.clear();
        {
            let mut st = shared.lock();
            let Some(p) = st.procs.get_mut(&id) else {
                return false;
            };
            let o = &mut p.out[sidx(s)];
            if offset < o.start {
                return false; // evicted under us: end without the clean marker, the reader will see 410
            }
            let end = o.end();
            if offset < end {
                let from = (offset - o.start) as usize;
                let n = ((end - offset) as usize).min(READ_CHUNK);
                chunk.extend_from_slice(&(n as u32).to_le_bytes());
                let (a, b) = o.buf.as_slices();
                if from < a.len() {
                    let ta = n.min(a.len() - from);
                    chunk.extend_from_slice(&a[from..from + ta]);
                    chunk.extend_from_slice(&b[..n - ta]);
                } else {
                    chunk.extend_from_slice(&b[from - a.len()..from - a.len() + n]);
                }
                offset += n as u64;
                o.read_hi = o.read_hi.max(offset);
                o.evict();
                if let Some(bytes) = o.credit() {
                    shared.send(HostMsg::Credit {
                        pid: id,
                        stream: s,
                        bytes,
                    });
                }
            } else if o.eof {
                done = true;
            }
        }
        if done {
            // The end marker; the connection then serves the next request.
            return w.write_all(&0u32.to_le_bytes()).await.is_ok();
        }
        if !chunk.is_empty() {
            if w.write_all(&chunk).await.is_err() {
                return false;
            }
            continue;
        }
        notified.await;
    }
}

/// Stops the container and removes runsc's state; the caller ends the process.
async fn shutdown(shared: &Arc<Shared>) {
    kill_sandbox(shared, "killed");
    // Wait for runsc_waiter to see the container end (bounded).
    if wait_for(shared, Duration::from_secs(10), |st| st.runsc_exited).await {
        return;
    }
    // runsc did not end in time: remove its state by force.
    let s2 = shared.clone();
    let _ = tokio::task::spawn_blocking(move || s2.runsc.delete_force(&s2.cfg.sandbox_id)).await;
}

/// Checkpoint, then restore in place under the same container ID on fresh
/// pipes (this runsc's `--leave-running` is broken). Processes, their output
/// buffers and open streams carry on; they are paused for `pause_ms`.
async fn checkpoint(
    shared: &Arc<Shared>,
    image_path: PathBuf,
) -> Result<serde_json::Value, SupError> {
    wait_running(shared).await?;
    let (qtx, qrx) = oneshot::channel();
    {
        let mut st = shared.lock();
        if st.checkpointing {
            return Err(SupError::new(
                "conflict",
                "a snapshot of this sandbox is already being taken; try again when it is done",
            ));
        }
        if st.phase != Phase::Running || st.stopping {
            return Err(not_running_in(&st));
        }
        st.checkpointing = true;
        st.quiesced = Some(qtx);
        shared.unthrottle(&st);
    }
    let result = checkpoint_inner(shared, image_path, qrx).await;
    {
        let mut st = shared.lock();
        st.checkpointing = false;
        shared.throttle(&st);
    }
    shared.changed.notify_waiters();
    result
}

async fn checkpoint_inner(
    shared: &Arc<Shared>,
    image_path: PathBuf,
    qrx: oneshot::Receiver<()>,
) -> Result<serde_json::Value, SupError> {
    let failed = |m: String| SupError::new("snapshot_failed", m);
    let t0 = std::time::Instant::now();
    let _ = shared.to_agent.send(ToAgent::Quiesce);
    if !matches!(
        tokio::time::timeout(Duration::from_secs(10), qrx).await,
        Ok(Ok(()))
    ) {
        let _ = shared.to_agent.send(ToAgent::Attach {
            stdin: None,
            resume: true,
        });
        return Err(failed(
            "the sandbox's agent did not pause for the snapshot".into(),
        ));
    }
    // Every frame before `Quiesced` has been applied: the table is exact.
    let (procs, next_id, old_gen) = {
        let mut st = shared.lock();
        let procs = st
            .procs
            .iter()
            .map(|(id, p)| CheckpointProc {
                id: *id,
                argv: p.argv.clone(),
                started_at: p.started_at,
                exit_code: p.exit_code,
                outstanding: [p.out[0].outstanding, p.out[1].outstanding],
                eof: [p.out[0].eof, p.out[1].eof],
            })
            .collect::<Vec<_>>();
        st.gen += 1;
        (procs, st.next_id, st.gen - 1)
    };
    let id = shared.cfg.sandbox_id.clone();
    let runsc = shared.runsc.clone();
    let img = image_path.clone();
    let ck = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&img).map_err(|e| e.to_string())?;
        runsc.checkpoint(&id, &img).map_err(|e| e.to_string())?;
        // The checkpointed container is stopped; make room for its restore.
        // On a loaded host runsc can give up waiting for the stopped sandbox
        // to go ("stopping container: context deadline exceeded", seen under
        // the API fuzzer): try again before the sandbox is called lost.
        let mut last = match runsc.delete(&id) {
            Ok(()) => return Ok(()),
            Err(e) => e.to_string(),
        };
        for pause_ms in [0, 300, 1000] {
            std::thread::sleep(Duration::from_millis(pause_ms));
            match runsc.delete_force(&id) {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    eprintln!(
        "supervisor: checkpoint into {} after {:?}: {ck:?}",
        image_path.display(),
        t0.elapsed()
    );
    if let Err(e) = ck {
        // Still the old container if the checkpoint never stopped it.
        shared.lock().gen = old_gen;
        let _ = shared.to_agent.send(ToAgent::Attach {
            stdin: None,
            resume: true,
        });
        if ping(shared, Duration::from_secs(2)).await {
            return Err(failed(format!(
                "checkpoint failed, the sandbox goes on: {e}"
            )));
        }
        kill_sandbox(shared, "failed");
        return Err(failed(format!(
            "checkpoint failed and the sandbox was lost: {e}"
        )));
    }
    // runsc took the veth's addresses into the stopped sandbox: the restore
    // finds them on it again (same veth, slot, addresses and rules).
    if shared.cfg.networked() {
        let cfg = shared.cfg.clone();
        let res = tokio::task::spawn_blocking(move || {
            let state = cfg.net_state_dir.clone().unwrap_or_default();
            gworker_runtime::net::SandboxNet::readdress(&cfg.sandbox_id, &state)
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = res {
            kill_sandbox(shared, "failed");
            return Err(failed(format!(
                "cannot restore the sandbox's network after its snapshot: {e}"
            )));
        }
        if let Some(Err(e)) = shared.gate.as_ref().map(|g| g.open_gate(true)) {
            kill_sandbox(shared, "failed");
            return Err(failed(format!("cannot open the network gate: {e}")));
        }
    }
    let gen = shared.lock().gen;
    let bundle = shared.dir.join("bundle");
    let cmd = shared
        .runsc
        .restore_command(&bundle, &image_path, &shared.cfg.sandbox_id);
    if let Err(e) = launch(shared, cmd, gen, true) {
        kill_sandbox(shared, "failed");
        return Err(failed(format!(
            "cannot restore the sandbox after its snapshot: {e}"
        )));
    }
    if !ping(shared, Duration::from_secs(30)).await {
        kill_sandbox(shared, "failed");
        return Err(failed(
            "the sandbox did not come back after its snapshot".into(),
        ));
    }
    let pause_ms = t0.elapsed().as_secs_f64() * 1000.0;
    eprintln!("supervisor: restored in place after a {pause_ms:.0} ms pause");
    Ok(serde_json::to_value(CheckpointInfo {
        procs,
        next_id,
        pause_ms,
    })
    .expect("checkpoint info serializes"))
}
