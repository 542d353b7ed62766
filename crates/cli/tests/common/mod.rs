//! A real daemon for the CLI's tests: `gworker serve` (this same binary) on
//! a private data dir and socket; its sandboxes are terminated and it is
//! killed on drop. Skipped (with a message) only when runsc is missing.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_gworker");

pub fn have_runsc() -> bool {
    if let Some(p) = std::env::var_os("GWORKER_RUNSC") {
        return Path::new(&p).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("runsc").is_file()))
}

/// `gworker serve` on a private data dir and socket; its sandboxes are
/// terminated and it is killed on drop.
pub struct Daemon {
    child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub url: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

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
        Daemon::start_with(&[])
    }

    /// With more `gworker serve` arguments.
    pub fn start_with(extra: &[&str]) -> Option<Daemon> {
        Daemon::start_under(&[], extra)
    }

    /// `gworker serve` run by `wrapper` (a program and its arguments that
    /// execs the rest, e.g. `prlimit --nofile=256:256`), with more arguments.
    pub fn start_under(wrapper: &[&str], extra: &[&str]) -> Option<Daemon> {
        if !have_runsc() {
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gwc-cli-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("gw.sock");
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env_remove("GWORKER_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start gworker serve");
        let url = format!("unix://{}", socket.display());
        let mut d = Daemon {
            child,
            dir,
            socket,
            url,
        };
        let start = Instant::now();
        while !matches!(http(&d.socket, "GET", "/v1/health"), Ok((200, _))) {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("gworker serve exited ({st}):\n{}", d.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "daemon not healthy:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(d)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// `gworker sandbox ARGS...` against this daemon.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("sandbox")
            .args(args)
            .env("GWORKER_URL", &self.url)
            .env_remove("GWORKER_TOKEN");
        c
    }

    /// `gworker ARGS...` (any command) against this daemon; never waits for stdin.
    pub fn gw(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("GWORKER_URL", &self.url)
            .env_remove("GWORKER_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("run gworker")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run gworker")
    }

    /// Runs a command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "gworker sandbox {args:?} failed: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    pub fn create(&self, args: &[&str]) -> String {
        let mut all = vec!["create", "--image", "busybox", "--timeout", "120"];
        all.extend_from_slice(args);
        let id = self.ok(&all).trim().to_string();
        assert!(id.starts_with("sb-") && !id.contains('\n'), "{id:?}");
        id
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok((200, body)) = http(&self.socket, "GET", "/v1/sandboxes") {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                for sb in v["sandboxes"].as_array().into_iter().flatten() {
                    if let Some(id) = sb["sandbox_id"].as_str() {
                        let _ = http(&self.socket, "DELETE", &format!("/v1/sandboxes/{id}"));
                    }
                }
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log ({}) ---\n{}",
                self.dir.display(),
                self.log()
            );
        }
        // SIGTERM: the daemon shuts its warm pool's unclaimed slots down
        // (nobody's sandboxes: nothing else would). SIGKILL if it hangs.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        wait_or_kill(&mut self.child, Duration::from_secs(20));
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Minimal blocking HTTP over the socket, for setup/teardown only.
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
    let status = String::from_utf8_lossy(&buf[..split])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, buf[(split + 4).min(buf.len())..].to_vec()))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
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
    pub fn start(args: &[&str]) -> Option<Registry> {
        if !Path::new("/usr/bin/docker-registry").exists() {
            eprintln!("skipping: docker-registry is not installed");
            return None;
        }
        let serve = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/registry/serve.py");
        let mut child = Command::new("python3")
            .arg(serve)
            .args(["--push", "test/img:v1", "--die-with-parent", "--stdin-eof"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 tests/registry/serve.py");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("serve.py said {line:?}: {e}"));
        Some(Registry {
            child,
            host: v["host"].as_str().unwrap().to_string(),
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Closing its stdin stops serve.py, which stops the registry and
        // removes its directory (a kill would leave the directory behind).
        drop(self.child.stdin.take());
        wait_or_kill(&mut self.child, Duration::from_secs(10));
    }
}

/// Waits up to `limit` for `child` to exit on its own; kills it if it has
/// not, and reaps it either way.
fn wait_or_kill(child: &mut Child, limit: Duration) {
    let start = Instant::now();
    while matches!(child.try_wait(), Ok(None)) && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
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
