//! A minimal host for driving the real agent binary over pipes.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use gworker_proto::{read_frame, AgentMsg, HostMsg, Spawn, Stream, PROTOCOL_VERSION};

pub const TIMEOUT: Duration = Duration::from_secs(20);
pub const PATH: &str = "PATH=/usr/local/bin:/usr/bin:/bin";

/// What the host learned about one process.
#[derive(Debug, Default, Clone)]
pub struct Proc {
    pub os_pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub eof_out: bool,
    pub eof_err: bool,
    pub code: Option<i32>,
    /// Order of Exited relative to the Eofs: number of Eofs seen when Exited came.
    pub eofs_before_exit: Option<u8>,
}

impl Proc {
    pub fn done(&self) -> bool {
        self.eof_out && self.eof_err && self.code.is_some()
    }
}

pub struct Agent {
    pub child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<Result<AgentMsg, String>>,
    /// Grant credit for every Output as it arrives.
    pub auto_credit: bool,
    pub procs: HashMap<u32, Proc>,
    /// Messages that are not per-process stream events (Spawned/SpawnFailed/Pong/Log).
    pub other: VecDeque<AgentMsg>,
}

impl Agent {
    pub fn start() -> Agent {
        Self::start_bin(env!("CARGO_BIN_EXE_gworker-agent"))
    }

    pub fn start_bin(bin: &str) -> Agent {
        Self::start_cmd(Command::new(bin))
    }

    pub fn start_cmd(mut cmd: Command) -> Agent {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("GWORKER_TEST_AGENT_STDERR").is_some() {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .spawn()
            .expect("start agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 20, stdout);
            let mut buf = Vec::new();
            loop {
                match read_frame(&mut r, &mut buf) {
                    Ok(true) => {
                        let m = AgentMsg::decode(&buf).map_err(|e| format!("decode: {e}"));
                        let stop = m.is_err();
                        if tx.send(m).is_err() || stop {
                            return;
                        }
                    }
                    Ok(false) => return,
                    Err(e) => {
                        let _ = tx.send(Err(format!("read: {e}")));
                        return;
                    }
                }
            }
        });
        let stdin = child.stdin.take();
        let a = Agent {
            child,
            stdin,
            rx,
            auto_credit: true,
            procs: HashMap::new(),
            other: VecDeque::new(),
        };
        match a.recv() {
            AgentMsg::Hello { version, agent } => {
                assert_eq!(version, PROTOCOL_VERSION);
                assert_eq!(agent, env!("CARGO_PKG_VERSION"));
            }
            m => panic!("expected Hello, got {m:?}"),
        }
        a
    }

    pub fn send(&mut self, m: &HostMsg) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        self.send_raw(&buf);
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let w = self.stdin.as_mut().expect("agent stdin closed");
        w.write_all(bytes).expect("write to agent");
        w.flush().unwrap();
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next message, raw (no bookkeeping).
    pub fn recv(&self) -> AgentMsg {
        match self.rx.recv_timeout(TIMEOUT) {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => panic!("agent stream broke: {e}"),
            Err(e) => panic!("no message from agent within {TIMEOUT:?}: {e}"),
        }
    }

    pub fn try_recv(&self, d: Duration) -> Option<AgentMsg> {
        match self.rx.recv_timeout(d) {
            Ok(Ok(m)) => Some(m),
            Ok(Err(e)) => panic!("agent stream broke: {e}"),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// True once the agent closed its stdout.
    pub fn output_closed(&self, d: Duration) -> bool {
        matches!(self.rx.recv_timeout(d), Err(RecvTimeoutError::Disconnected))
    }

    /// Applies one message to the bookkeeping.
    pub fn apply(&mut self, m: AgentMsg) {
        match m {
            AgentMsg::Output { pid, stream, data } => {
                if self.auto_credit && !data.is_empty() {
                    self.send(&HostMsg::Credit {
                        pid,
                        stream,
                        bytes: data.len() as u32,
                    });
                }
                let p = self.procs.entry(pid).or_default();
                assert!(p.os_pid.is_some(), "Output before Spawned for {pid}");
                match stream {
                    Stream::Stdout => {
                        assert!(!p.eof_out, "Output after Eof");
                        p.stdout.extend_from_slice(&data)
                    }
                    Stream::Stderr => {
                        assert!(!p.eof_err, "Output after Eof");
                        p.stderr.extend_from_slice(&data)
                    }
                }
            }
            AgentMsg::Eof { pid, stream } => {
                let p = self.procs.entry(pid).or_default();
                let flag = match stream {
                    Stream::Stdout => &mut p.eof_out,
                    Stream::Stderr => &mut p.eof_err,
                };
                assert!(!*flag, "double Eof for {pid} {stream:?}");
                *flag = true;
            }
            AgentMsg::Exited { pid, code } => {
                let p = self.procs.entry(pid).or_default();
                assert!(p.os_pid.is_some(), "Exited before Spawned for {pid}");
                assert!(p.code.is_none(), "double Exited for {pid}");
                p.code = Some(code);
                p.eofs_before_exit = Some(p.eof_out as u8 + p.eof_err as u8);
            }
            AgentMsg::Spawned { pid, os_pid } => {
                let p = self.procs.entry(pid).or_default();
                assert!(p.os_pid.is_none(), "double Spawned for {pid}");
                p.os_pid = Some(os_pid);
                self.other.push_back(AgentMsg::Spawned { pid, os_pid });
            }
            m => self.other.push_back(m),
        }
    }

    pub fn pump(&mut self) {
        let m = self.recv();
        self.apply(m);
    }

    /// Pumps until `f` holds (or panics after TIMEOUT).
    pub fn pump_until(&mut self, mut f: impl FnMut(&Agent) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "condition not met within {TIMEOUT:?}"
            );
            self.pump();
        }
    }

    /// Takes the first queued `other` message matching `f`, pumping as needed.
    pub fn expect_other(&mut self, mut f: impl FnMut(&AgentMsg) -> bool) -> AgentMsg {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(i) = self.other.iter().position(&mut f) {
                return self.other.remove(i).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "expected message not seen; have {:?}",
                self.other
            );
            self.pump();
        }
    }

    pub fn spawn_req(&mut self, s: Spawn) {
        self.send(&HostMsg::Spawn(s));
    }

    pub fn spawn_with(&mut self, pid: u32, argv: &[&str], env: &[&str], cwd: &str, flags: u8) {
        self.spawn_req(Spawn {
            pid,
            flags,
            argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            env: env.iter().map(|a| a.as_bytes().to_vec()).collect(),
            cwd: cwd.as_bytes().to_vec(),
        });
    }

    pub fn spawn(&mut self, pid: u32, argv: &[&str]) {
        self.spawn_with(pid, argv, &[PATH], "/", 0);
    }

    /// Waits for `Spawned` for `pid`; returns its OS pid.
    pub fn spawned(&mut self, pid: u32) -> u32 {
        match self.expect_other(|m| {
            matches!(m, AgentMsg::Spawned { pid: p, .. } | AgentMsg::SpawnFailed { pid: p, .. } if *p == pid)
        }) {
            AgentMsg::Spawned { os_pid, .. } => os_pid,
            m => panic!("spawn of {pid} failed: {m:?}"),
        }
    }

    /// Waits until `pid` exited and both its streams ended.
    pub fn wait_done(&mut self, pid: u32) -> Proc {
        self.pump_until(|a| a.procs.get(&pid).is_some_and(|p| p.done()));
        self.procs.get(&pid).cloned().unwrap()
    }

    /// Spawn + wait for everything.
    pub fn run(&mut self, pid: u32, argv: &[&str]) -> Proc {
        self.spawn(pid, argv);
        self.spawned(pid);
        self.wait_done(pid)
    }

    pub fn sh(&mut self, pid: u32, script: &str) -> Proc {
        self.run(pid, &["sh", "-c", script])
    }

    /// Pings and waits for the Pong: proves the agent is alive and has handled
    /// everything sent before.
    pub fn ping(&mut self, seq: u32) {
        self.send(&HostMsg::Ping { seq });
        self.expect_other(|m| matches!(m, AgentMsg::Pong { seq: s } if *s == seq));
    }

    pub fn agent_pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the agent process to exit; returns its status code and stderr.
    pub fn wait_exit(mut self) -> (Option<i32>, String) {
        self.stdin = None;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return (st.code(), err);
            }
            assert!(Instant::now() < deadline, "agent did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// State letter of /proc/<pid>/stat, or None if the process is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.chars().next()
}

/// Parent pid from /proc/<pid>/stat.
pub fn proc_ppid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.split(' ').nth(1)?.parse().ok()
}

/// Direct children of `pid` (all threads).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// A fresh empty directory under the system temp dir.
pub fn tempdir(tag: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("gworker-agent-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
