//! A real daemon for the tests: `gworker serve` on a private data dir and
//! socket, waited for until `/v1/health` answers, its sandboxes terminated
//! and the process killed on drop. No mocks: sandboxes are real gVisor ones.
//!
//! Binary: `$GWORKER_BIN`, else `<workspace>/target/debug/gworker` (build it
//! with `cargo build -p gworker-cli`). Agent: `$GWORKER_AGENT`, else the
//! daemon's own lookup (`bash scripts/build-agent.sh` builds it).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use gworker_client::Client;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// Whether gVisor is installed; tests print a message and return when not.
pub fn have_runsc() -> bool {
    if let Some(p) = std::env::var_os("GWORKER_RUNSC") {
        return Path::new(&p).is_file();
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| d.join("runsc").is_file()))
        .unwrap_or(false)
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub url: String,
    /// With `start_tcp`: `http://127.0.0.1:PORT` and the token it requires.
    pub tcp: Option<(String, String)>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Starts a daemon, or returns `None` (after saying so) when runsc is missing.
macro_rules! daemon_or_skip {
    () => {
        match common::Daemon::start() {
            Some(d) => d,
            None => {
                eprintln!("skipping: runsc (gVisor) is not installed");
                return;
            }
        }
    };
}
pub(crate) use daemon_or_skip;

impl Daemon {
    pub fn start() -> Option<Daemon> {
        Self::start_with(None)
    }

    /// Also listening on TCP (loopback, a free port) with a bearer token.
    pub fn start_tcp() -> Option<Daemon> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        Self::start_with(Some((
            format!("http://127.0.0.1:{port}"),
            format!("tok-{}-{port}", std::process::id()),
        )))
    }

    fn start_with(tcp: Option<(String, String)>) -> Option<Daemon> {
        if !have_runsc() {
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gwc-rs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let socket = dir.join("gw.sock");
        let url = format!("unix://{}", socket.display());
        let mut d = Daemon {
            child: None,
            dir,
            socket,
            url,
            tcp,
        };
        d.spawn();
        Some(d)
    }

    fn bin() -> PathBuf {
        let bin = std::env::var_os("GWORKER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target/debug/gworker"));
        assert!(
            bin.is_file(),
            "{} does not exist: run `cargo build -p gworker-cli` (or set GWORKER_BIN)",
            bin.display()
        );
        bin
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("daemon log");
        let mut cmd = Command::new(Self::bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--socket")
            .arg(&self.socket)
            .env_remove("GWORKER_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        if let Some((url, token)) = &self.tcp {
            cmd.arg("--listen")
                .arg(url.trim_start_matches("http://"))
                .env("GWORKER_TOKEN", token);
        }
        let child = cmd.spawn().expect("start gworker serve");
        self.child = Some(child);
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http(&self.socket, "GET", "/v1/health") {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("gworker serve exited ({st}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "daemon not healthy after 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url, None).expect("client")
    }

    /// SIGKILL the daemon (its sandboxes live on: supervisors are detached).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the daemon again on the same data dir and socket.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Terminate what the test left behind, so no gVisor sandbox outlives it.
            if let Ok((200, body)) = http(&self.socket, "GET", "/v1/sandboxes") {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                    for sb in v["sandboxes"].as_array().into_iter().flatten() {
                        if let Some(id) = sb["sandbox_id"].as_str() {
                            let _ = http(&self.socket, "DELETE", &format!("/v1/sandboxes/{id}"));
                        }
                    }
                }
            }
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- daemon log (last lines, {}) ---", self.dir.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        self.kill9();
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A minimal blocking HTTP/1.1 request over the unix socket (for setup and
/// teardown, independent of the client under test).
pub fn http(socket: &Path, method: &str, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, buf[(split + 4).min(buf.len())..].to_vec()))
}

/// A throw-away docker-registry on 127.0.0.1 with the test image of
/// `tests/registry/push.py` pushed as `test/img:v1`; stopped on drop.
/// `None` (after saying so) when docker-registry is not installed.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`
    pub host: String,
}

impl Registry {
    /// `args`: more `tests/registry/serve.py` arguments (`--user U --password P`, ...).
    pub fn start(args: &[&str]) -> Option<Registry> {
        if !Path::new("/usr/bin/docker-registry").exists() {
            eprintln!("skipping: docker-registry is not installed");
            return None;
        }
        let mut child = Command::new("python3")
            .arg(workspace().join("tests/registry/serve.py"))
            .args(["--push", "test/img:v1", "--die-with-parent", "--stdin-eof"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 tests/registry/serve.py");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("serve.py's first line");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("serve.py said {line:?}: {e}"));
        Some(Registry {
            child,
            host: v["host"].as_str().expect("host").to_string(),
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Closing its stdin stops serve.py, which stops the registry and
        // removes its directory (a kill would leave the directory behind).
        // Killed only if it has not exited within 10 s.
        drop(self.child.stdin.take());
        let start = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Unmounts what a stopped daemon left mounted under `dir`: it keeps image
/// roots mounted (overlayfs) across restarts, so nothing else unmounts them,
/// and the data dir could not be removed.
pub fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}
