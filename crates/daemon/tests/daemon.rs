//! The daemon through its real HTTP API, with real gVisor sandboxes: bad input
//! gets a 4xx with a stable code, terminate leaves nothing behind, many
//! sandboxes at once, and a SIGKILLed daemon loses no sandbox and no output.
//!
//! Uses a tiny blocking HTTP/1.1 client over the unix socket so that what is
//! tested is the daemon alone. Needs `runsc` and the static agent
//! (`GWORKER_AGENT`, or `target/x86_64-unknown-linux-gnu/debug/gworker-agent`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    sock: PathBuf,
    extra: Vec<String>,
    /// Environment of the daemon beyond the test's own.
    env: Vec<(String, String)>,
}

fn bin() -> PathBuf {
    std::env::var_os("GWORKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/gworker"))
}

fn agent() -> PathBuf {
    std::env::var_os("GWORKER_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-gnu/debug/gworker-agent")
        })
}

fn runsc_available() -> bool {
    Command::new("runsc")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok()
}

impl Daemon {
    fn start(name: &str) -> Option<Daemon> {
        Daemon::start_with(name, &[])
    }

    fn start_with(name: &str, extra: &[&str]) -> Option<Daemon> {
        Daemon::start_with_env(name, extra, &[])
    }

    fn start_with_env(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Option<Daemon> {
        if !runsc_available() {
            eprintln!("runsc not installed: skipping");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("gw-dt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("gw.sock");
        let mut d = Daemon {
            child: None,
            dir,
            sock,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.spawn();
        Some(d)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let child = Command::new(bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--socket")
            .arg(&self.sock)
            .arg("--agent")
            .arg(agent())
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start gworker serve (build it first: cargo build -p gworker-cli)");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(r) = self.try_req("GET", "/v1/health", b"") {
                if r.status == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "daemon did not start: {}",
            std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// SIGTERM, then waits (at most 30 s) for the daemon to exit.
    fn term(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("a running daemon");
        let pid = c.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn try_req(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<Resp> {
        let mut s = UnixStream::connect(&self.sock)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len())?;
        // A server refusing an oversized body may answer and close before
        // reading all of it: the answer is what counts.
        if let Err(e) = s.write_all(body) {
            if e.kind() != std::io::ErrorKind::BrokenPipe
                && e.kind() != std::io::ErrorKind::ConnectionReset
            {
                return Err(e);
            }
        }
        let mut raw = Vec::new();
        if let Err(e) = s.read_to_end(&mut raw) {
            if raw.is_empty() || e.kind() != std::io::ErrorKind::ConnectionReset {
                return Err(e);
            }
        }
        Ok(Resp::parse(&raw))
    }

    fn req(&self, method: &str, path: &str, body: &str) -> Resp {
        self.try_req(method, path, body.as_bytes()).unwrap()
    }

    fn json(&self, method: &str, path: &str, body: &str) -> serde_json::Value {
        let r = self.req(method, path, body);
        assert!(
            r.status < 300,
            "{method} {path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        serde_json::from_slice(&r.body).unwrap()
    }

    /// Starts `body` (an exec request) in sandbox `id` and returns all its stdout.
    fn exec_stdout(&self, id: &str, body: &str) -> Vec<u8> {
        let p = self.json("POST", &format!("/v1/sandboxes/{id}/exec"), body);
        let path = format!("/v1/sandboxes/{id}/processes/{}/stdout", p["process_id"]);
        self.req("GET", &path, "").body
    }

    fn create(&self, body: &str) -> String {
        self.json("POST", "/v1/sandboxes", body)["sandbox_id"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Terminate what is left so no sandbox outlives the test.
        if self.child.is_some() {
            if let Ok(r) = self.try_req("GET", "/v1/sandboxes", b"") {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) {
                    for s in v["sandboxes"].as_array().cloned().unwrap_or_default() {
                        let _ = self.try_req(
                            "DELETE",
                            &format!("/v1/sandboxes/{}", s["sandbox_id"].as_str().unwrap_or("")),
                            b"",
                        );
                    }
                }
            }
        }
        self.kill9();
        // Unclaimed warm-pool slots are nobody's sandboxes: shut their
        // supervisors down directly, and let them finish (network teardown)
        // before their directory goes.
        let socks: Vec<_> = std::fs::read_dir(self.dir.join("data/sock"))
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for sock in &socks {
            if let Ok(mut c) = std::os::unix::net::UnixStream::connect(sock) {
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = c.write_all(b"{\"op\":\"shutdown\"}\n");
                let _ = c.read(&mut [0u8; 256]);
            }
        }
        let data = self.dir.join("data").to_string_lossy().into_owned();
        let start = Instant::now();
        while !socks.is_empty() && start.elapsed() < Duration::from_secs(15) {
            let running = std::process::Command::new("pgrep")
                .args(["-f", &format!("supervise {data}/")])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false);
            if !running {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Resp {
    status: u16,
    body: Vec<u8>,
}

impl Resp {
    fn parse(raw: &[u8]) -> Resp {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("http head");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut body = raw[split + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        Resp { status, body }
    }

    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "error body is not JSON: {:?}",
                String::from_utf8_lossy(&self.body)
            )
        });
        v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {v}"))
            .to_string()
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 || b.len() < eol + 4 + n {
            return out; // the end, or a chunk not fully received yet
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 4 + n..];
    }
}

#[test]
fn bad_input_gets_4xx_with_stable_codes() {
    let Some(d) = Daemon::start("bad") else {
        return;
    };
    let id = d.create(r#"{"image":"busybox","timeout":60}"#);
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "POST",
            "/v1/sandboxes".into(),
            b"{not json".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"cmd":"echo hi"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"timeout":"soon"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"bogus":1}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"image":"busybox","env":{"1BAD":"x"}}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"image":"busybox","env":{"A-B":"x"}}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"image":"busybox","workdir":"rel/dir"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"image":"busybox","timeout":-1}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"image":"busybox","cmd":[""]}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"image":"nope"}"#.to_vec(),
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"image":"busybox","secrets":[{"name":"no-such-secret"}]}"#.to_vec(),
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"image":"busybox","secrets":[{}]}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"image":"busybox","volumes":{"/data":{"name":"no-such-volume"}}}"#.to_vec(),
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"image":"busybox","volumes":{"data":{"name":"v","create_if_missing":true}}}"#
                .to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"image":"busybox","snapshot":{"snapshot_id":"x"}}"#.to_vec(),
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            br#"{"snapshot":"sn-1"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            vec![b' '; 17 * 1024 * 1024],
            413,
            "payload_too_large",
        ),
        (
            "GET",
            "/v1/sandboxes/sb-00000000000000000000000000000000".into(),
            vec![],
            404,
            "not_found",
        ),
        (
            "GET",
            "/v1/sandboxes/../../etc/passwd".into(),
            vec![],
            404,
            "not_found",
        ),
        (
            "DELETE",
            "/v1/sandboxes/nonsense".into(),
            vec![],
            404,
            "not_found",
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            br#"{"cmd":[]}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            br#"{"cmd":["ls"],"workdir":"tmp"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            br#"{"cmd":["ls"],"workdir":"/no/such/dir"}"#.to_vec(),
            404,
            "workdir_not_found",
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            br#"{"cmd":["no-such-program"]}"#.to_vec(),
            404,
            "command_not_found",
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            br#"{"cmd":["ls"],"env":{"X=Y":"1"}}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "GET",
            format!("/v1/sandboxes/{id}/processes/notanumber"),
            vec![],
            404,
            "not_found",
        ),
        (
            "GET",
            format!("/v1/sandboxes/{id}/processes/999"),
            vec![],
            404,
            "not_found",
        ),
        (
            "GET",
            format!("/v1/sandboxes/{id}/processes/999/stdout"),
            vec![],
            404,
            "not_found",
        ),
        (
            "GET",
            format!("/v1/sandboxes/{id}/wait?timeout=abc"),
            vec![],
            400,
            "invalid_request",
        ),
        (
            "GET",
            format!("/v1/sandboxes/{id}/wait?timeout=0.2"),
            vec![],
            408,
            "wait_timeout",
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/processes/0/signal"),
            br#"{"signal":0}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "GET",
            "/v1/snapshots/sn-nope".into(),
            vec![],
            404,
            "not_found",
        ),
        (
            "DELETE",
            "/v1/snapshots/../x".into(),
            vec![],
            404,
            "not_found",
        ),
        ("GET", "/v1/nope".into(), vec![], 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let r = d.try_req(method, &path, &body).unwrap();
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{method} {path} {:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
    }
    // The daemon is still healthy and the sandbox still works.
    assert_eq!(
        d.exec_stdout(&id, r#"{"cmd":["echo","still here"]}"#),
        b"still here\n"
    );
}

#[test]
fn terminate_leaves_nothing_behind_and_is_idempotent() {
    let Some(d) = Daemon::start("term") else {
        return;
    };
    let id = d.create(r#"{"image":"busybox","cmd":["sleep","1000"],"timeout":60}"#);
    d.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        r#"{"cmd":["sleep","1000"]}"#,
    );
    let data = d.dir.join("data");
    assert!(data.join("sandboxes").join(&id).exists());
    let ps = |pat: &str| {
        let out = Command::new("pgrep").arg("-f").arg(pat).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(
        !ps(&id).is_empty(),
        "runsc and supervisor run while the sandbox lives"
    );
    assert_eq!(
        d.req("DELETE", &format!("/v1/sandboxes/{id}"), "").status,
        204
    );
    assert_eq!(
        d.req("DELETE", &format!("/v1/sandboxes/{id}"), "").code(),
        "not_found"
    );
    assert_eq!(d.req("GET", &format!("/v1/sandboxes/{id}"), "").status, 404);
    // No process, runsc state, socket, directory or mount of that sandbox remains.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ps(&id).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ps(&id), "", "processes of the sandbox are gone");
    assert!(!data.join("sandboxes").join(&id).exists());
    assert!(!data.join("sock").join(&id).exists());
    let runsc_state: Vec<_> = std::fs::read_dir(data.join("runsc"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        runsc_state
            .iter()
            .all(|n| !n.to_string_lossy().contains(&id)),
        "runsc state left: {runsc_state:?}"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(&id), "a mount of the sandbox is left");
}

#[test]
fn twenty_sandboxes_at_once() {
    let Some(d) = Daemon::start("twenty") else {
        return;
    };
    let ids: Vec<String> = (0..20)
        .map(|i| d.create(&format!(r#"{{"image":"busybox","timeout":120,"cmd":["sh","-c","echo sandbox-{i}; exit {i}"]}}"#)))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let w = d.json("GET", &format!("/v1/sandboxes/{id}/wait?timeout=60"), "");
        assert_eq!(w["exit_code"], i as i64);
        let out = d.req("GET", &format!("/v1/sandboxes/{id}/processes/0/stdout"), "");
        assert_eq!(String::from_utf8_lossy(&out.body), format!("sandbox-{i}\n"));
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 20);
}

#[test]
fn daemon_sigkill_loses_no_sandbox_exec_or_output() {
    let Some(mut d) = Daemon::start("kill") else {
        return;
    };
    let id = d.create(r#"{"image":"busybox","timeout":120}"#);
    // An exec that prints 40 numbered lines over ~2 s, then exits 5.
    let p = d.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        r#"{"cmd":["sh","-c","for i in $(seq 1 40); do echo line-$i; sleep 0.05; done; exit 5"]}"#,
    );
    let pid = p["process_id"].as_i64().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    // Read what is there so far through a stream that we cut off ourselves.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    write!(
        s,
        "GET /v1/sandboxes/{id}/processes/{pid}/stdout HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    // Read until at least one whole line of body arrived (the head and the
    // first chunk may come in separate reads).
    let mut raw = Vec::new();
    let first = loop {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        raw.extend_from_slice(&buf[..n]);
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let body = &raw[split + 4..];
            let first = dechunk(body);
            if first.ends_with(b"\n") {
                break first;
            }
        }
    };
    d.kill9();
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    d.spawn();
    let rest = d.req(
        "GET",
        &format!(
            "/v1/sandboxes/{id}/processes/{pid}/stdout?offset={}",
            first.len()
        ),
        "",
    );
    assert_eq!(rest.status, 200);
    let mut all = first.clone();
    all.extend_from_slice(&rest.body);
    let expected: String = (1..=40).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(
        String::from_utf8_lossy(&all),
        expected,
        "no byte lost or repeated across the restart"
    );
    let w = d.json(
        "GET",
        &format!("/v1/sandboxes/{id}/processes/{pid}/wait?timeout=30"),
        "",
    );
    assert_eq!(w["exit_code"], 5);
    // The sandbox itself is still running and usable.
    let s = d.json("GET", &format!("/v1/sandboxes/{id}"), "");
    assert_eq!(s["state"], "running");
    assert_eq!(
        d.exec_stdout(&id, r#"{"cmd":["echo","after restart"]}"#),
        b"after restart\n"
    );
}

#[test]
fn timeout_is_enforced_and_survives_a_daemon_restart() {
    let Some(mut d) = Daemon::start("timeout") else {
        return;
    };
    // Timeouts long enough for the exec below to come first on a busy machine.
    let id = d.create(r#"{"image":"busybox","timeout":6,"cmd":["sleep","100"]}"#);
    let idle = d.create(r#"{"image":"busybox","timeout":6}"#);
    d.json(
        "POST",
        &format!("/v1/sandboxes/{idle}/exec"),
        r#"{"cmd":["true"]}"#,
    );
    d.kill9();
    std::thread::sleep(Duration::from_secs(7));
    d.spawn();
    for sid in [&id, &idle] {
        let w = d.json("GET", &format!("/v1/sandboxes/{sid}/wait?timeout=10"), "");
        assert_eq!(w["exit_code"], 137);
        let s = d.json("GET", &format!("/v1/sandboxes/{sid}"), "");
        assert_eq!(
            (s["state"].as_str(), s["reason"].as_str()),
            (Some("exited"), Some("timeout"))
        );
        let r = d.req(
            "POST",
            &format!("/v1/sandboxes/{sid}/exec"),
            r#"{"cmd":["true"]}"#,
        );
        assert_eq!((r.status, r.code().as_str()), (409, "sandbox_not_running"));
    }
}

#[test]
fn tcp_listener_requires_the_token() {
    if !runsc_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("gw-dt-tcp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Without a token the daemon refuses to start.
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--socket"])
        .arg(dir.join("a.sock"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--agent")
        .arg(agent())
        .env_remove("GWORKER_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("GWORKER_TOKEN"));
    // With a token, requests without it are refused and with it pass.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(bin())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--socket",
        ])
        .arg(dir.join("b.sock"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--agent")
        .arg(agent())
        .env("GWORKER_TOKEN", "s3cret-token")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let get = |auth: &str| -> Option<u16> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(
            s,
            "GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n"
        )
        .ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).ok()?;
        Some(Resp::parse(&raw).status)
    };
    let start = Instant::now();
    while get("").is_none() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(""), Some(401));
    assert_eq!(get("Authorization: Bearer wrong\r\n"), Some(401));
    assert_eq!(get("Authorization: Bearer s3cret-token\r\n"), Some(200));
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sandbox directories on disk (registered sandboxes and pool slots).
fn sandbox_dirs(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.dir.join("data/sandboxes"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Booted, claimable slots of `image`'s pool with `network` (`default` or
/// `blocked`; `GET /v1/health`).
fn pool_ready(d: &Daemon, image: &str, network: &str) -> u64 {
    let h = d.json("GET", "/v1/health", "");
    h["pool"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["image"] == image && p["network"] == network)
        .map_or(0, |p| p["ready"].as_u64().unwrap())
}

/// A file of sandbox `id`'s cgroup in controller `ctl`, trimmed ("" if none).
fn cgroup_file(ctl: &str, id: &str, file: &str) -> String {
    std::fs::read_to_string(format!("/sys/fs/cgroup/{ctl}/gworker/{id}/{file}"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The network interfaces a sandbox sees, sorted (`/proc/net/dev`).
fn interfaces(d: &Daemon, id: &str) -> Vec<String> {
    let out = d.exec_stdout(id, r#"{"cmd":["cat","/proc/net/dev"]}"#);
    let mut names: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, _)| n.trim().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn warm_pool_claims_fresh_sandboxes_and_refills() {
    let Some(mut d) = Daemon::start_with("pool", &["--pool", "busybox=2"]) else {
        return;
    };
    wait_for("two pool slots", || sandbox_dirs(&d).len() == 2);
    // Slots are not sandboxes of anyone: the API lists none.
    assert_eq!(
        d.json("GET", "/v1/sandboxes", "")["sandboxes"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let slots = sandbox_dirs(&d);
    wait_for("two booted slots", || {
        pool_ready(&d, "busybox", "default") == 2
    });
    let health = d.json("GET", "/v1/health", "");
    assert_eq!(
        health["pool"],
        serde_json::json!([{"image": "busybox", "network": "default", "size": 2, "ready": 2, "booting": 0}])
    );
    let shares = |id: &str| cgroup_file("cpu", id, "cpu.shares");
    // Unclaimed slots yield the CPU to sandboxes users wait for.
    for slot in &slots {
        assert_eq!(shares(slot), "64", "slot {slot}");
    }
    let s = d.json("POST", "/v1/sandboxes", r#"{"image":"busybox","timeout":60,"cmd":["sh","-c","ls /tmp; echo fresh; exit 4"],"env":{"K":"v"},"workdir":"/w"}"#);
    let id = s["sandbox_id"].as_str().unwrap().to_string();
    assert!(slots.contains(&id), "the sandbox came from the pool");
    assert_eq!(
        s["state"], "running",
        "a claimed sandbox is running at once"
    );
    assert_eq!(
        shares(&id),
        "1024",
        "a claimed sandbox has the normal CPU weight"
    );
    assert_eq!(
        d.json("GET", &format!("/v1/sandboxes/{id}/wait?timeout=30"), "")["exit_code"],
        4
    );
    let out = d.req("GET", &format!("/v1/sandboxes/{id}/processes/0/stdout"), "");
    assert_eq!(out.body, b"fresh\n", "nothing left in /tmp from the pool");
    // A claim with the daemon's default limits keeps the slot's cgroup as
    // it booted; one with its own gets them.
    assert_eq!(
        cgroup_file("memory", &id, "memory.limit_in_bytes"),
        (2048u64 << 20).to_string()
    );
    assert_eq!(cgroup_file("cpu", &id, "cpu.cfs_quota_us"), "-1");
    // Per-sandbox settings were applied at claim time.
    let idle = d.json(
        "POST",
        "/v1/sandboxes",
        r#"{"image":"busybox","timeout":60,"env":{"K":"v2"},"workdir":"/w2"}"#,
    );
    let iid = idle["sandbox_id"].as_str().unwrap().to_string();
    let out = d.exec_stdout(&iid, r#"{"cmd":["sh","-c","echo $K; pwd"]}"#);
    assert_eq!(String::from_utf8_lossy(&out), "v2\n/w2\n");
    // The pool refills: two new slots beside the two claimed sandboxes.
    wait_for("the pool to refill", || sandbox_dirs(&d).len() == 4);
    // A claimed sandbox's timeout runs from the claim.
    let short = d.json(
        "POST",
        "/v1/sandboxes",
        r#"{"image":"busybox","timeout":1}"#,
    );
    let sid = short["sandbox_id"].as_str().unwrap().to_string();
    let w = d.json("GET", &format!("/v1/sandboxes/{sid}/wait?timeout=20"), "");
    assert_eq!(w["exit_code"], 137);
    // After a restart without a pool, unclaimed slots are removed; sandboxes stay.
    d.kill9();
    d.extra.clear();
    d.spawn();
    wait_for("orphaned slots to go", || {
        let dirs = sandbox_dirs(&d);
        dirs.len() == 3 && dirs.contains(&id) && dirs.contains(&iid) && dirs.contains(&sid)
    });
    assert_eq!(
        d.exec_stdout(&iid, r#"{"cmd":["echo","still"]}"#),
        b"still\n"
    );
}

#[test]
fn a_claim_with_limits_of_its_own_gets_them() {
    let Some(d) = Daemon::start_with("pool-limits", &["--pool", "busybox=1"]) else {
        return;
    };
    wait_for("the slot to boot", || {
        pool_ready(&d, "busybox", "default") == 1
    });
    let slots = sandbox_dirs(&d);
    let limited = d.json(
        "POST",
        "/v1/sandboxes",
        r#"{"image":"busybox","timeout":60,"memory":256,"cpu":0.5,"max_processes":50}"#,
    );
    let lid = limited["sandbox_id"].as_str().unwrap().to_string();
    assert!(
        slots.contains(&lid),
        "the limited sandbox came from the pool"
    );
    assert_eq!(d.exec_stdout(&lid, r#"{"cmd":["echo","up"]}"#), b"up\n");
    assert_eq!(
        cgroup_file("memory", &lid, "memory.limit_in_bytes"),
        (256u64 << 20).to_string()
    );
    assert_eq!(cgroup_file("cpu", &lid, "cpu.cfs_quota_us"), "50000");
    assert_eq!(
        cgroup_file("pids", &lid, "pids.max"),
        (50 + 256).to_string()
    );
}

#[test]
fn a_create_with_secrets_claims_a_pool_slot_and_the_values_stay_in_memory() {
    let Some(d) = Daemon::start_with("pool-secrets", &["--pool", "busybox=1"]) else {
        return;
    };
    wait_for("the slot to boot", || {
        pool_ready(&d, "busybox", "default") == 1
    });
    let slots = sandbox_dirs(&d);
    let value = "s3cr3t-4f9a0c1e";
    d.json(
        "POST",
        "/v1/secrets",
        &format!(r#"{{"name":"api","values":{{"API_KEY":"{value}","SHADOWED":"secret"}}}}"#),
    );
    let s = d.json(
        "POST",
        "/v1/sandboxes",
        r#"{"image":"busybox","timeout":60,
            "cmd":["sh","-c","echo $API_KEY $SHADOWED; while [ ! -e /tmp/go ]; do sleep 0.05; done"],
            "env":{"SHADOWED":"env"},"secrets":[{"name":"api"},{"values":{"INLINE":"in-line"}}]}"#,
    );
    let id = s["sandbox_id"].as_str().unwrap().to_string();
    assert!(slots.contains(&id), "the sandbox came from the pool");
    let out = d.exec_stdout(
        &id,
        r#"{"cmd":["sh","-c","echo $API_KEY $INLINE; touch /tmp/go"]}"#,
    );
    assert_eq!(out, format!("{value} in-line\n").as_bytes());
    assert_eq!(
        d.json("GET", &format!("/v1/sandboxes/{id}/wait?timeout=30"), "")["exit_code"],
        0
    );
    let out = d.req("GET", &format!("/v1/sandboxes/{id}/processes/0/stdout"), "");
    // The sandbox's env wins over its secrets, as in a cold sandbox.
    assert_eq!(out.body, format!("{value} env\n").as_bytes());
    // Nothing on disk holds the values: not the registry, not a launch
    // file, not a log (the secret store keeps them sealed).
    let mut found = Vec::new();
    let mut stack = vec![d.dir.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let (path, ty) = (e.path(), e.file_type().unwrap());
            if ty.is_dir() && !path.ends_with("images") {
                stack.push(path);
            } else if ty.is_file() {
                let data = std::fs::read(&path).unwrap_or_default();
                if [value, "in-line"]
                    .iter()
                    .any(|v| data.windows(v.len()).any(|w| w == v.as_bytes()))
                {
                    found.push(path);
                }
            }
        }
    }
    assert!(found.is_empty(), "secret values on disk in {found:?}");
}

#[test]
fn block_network_creates_claim_slots_of_a_blocked_pool_only() {
    let Some(d) = Daemon::start_with(
        "pool-blocked",
        &["--pool", "busybox=1", "--pool-blocked", "busybox=1"],
    ) else {
        return;
    };
    wait_for("both slots to boot", || {
        pool_ready(&d, "busybox", "default") == 1 && pool_ready(&d, "busybox", "blocked") == 1
    });
    let slots = sandbox_dirs(&d);
    let blocked = d.json(
        "POST",
        "/v1/sandboxes",
        r#"{"image":"busybox","timeout":60,"block_network":true}"#,
    );
    let bid = blocked["sandbox_id"].as_str().unwrap().to_string();
    assert!(
        slots.contains(&bid),
        "the blocked create came from the pool"
    );
    assert_eq!(blocked["state"], "running");
    assert_eq!(interfaces(&d, &bid), ["lo"], "no network but loopback");
    assert_eq!(
        d.json("GET", &format!("/v1/sandboxes/{bid}"), "")["network"],
        "blocked"
    );
    assert_eq!(
        pool_ready(&d, "busybox", "default"),
        1,
        "the default slot is left alone"
    );
    // A default create takes the default slot, with its network.
    let open = d.json(
        "POST",
        "/v1/sandboxes",
        r#"{"image":"busybox","timeout":60}"#,
    );
    let oid = open["sandbox_id"].as_str().unwrap().to_string();
    assert!(
        slots.contains(&oid),
        "the default create came from the pool"
    );
    assert_eq!(interfaces(&d, &oid), ["eth0", "lo"]);
}

#[test]
fn without_networks_the_pool_keeps_blocked_slots_for_plain_creates() {
    let Some(d) = Daemon::start_with(
        "pool-nonet",
        &["--sandbox-network", "none", "--pool", "busybox=1"],
    ) else {
        return;
    };
    wait_for("the slot to boot", || {
        pool_ready(&d, "busybox", "blocked") == 1
    });
    let h = d.json("GET", "/v1/health", "");
    assert_eq!(h["pool"].as_array().unwrap().len(), 1, "{h}");
    assert_eq!(h["pool"][0]["network"], "blocked", "{h}");
    let slots = sandbox_dirs(&d);
    let s = d.json(
        "POST",
        "/v1/sandboxes",
        r#"{"image":"busybox","timeout":60}"#,
    );
    let id = s["sandbox_id"].as_str().unwrap().to_string();
    assert!(slots.contains(&id), "the plain create came from the pool");
    assert_eq!(interfaces(&d, &id), ["lo"], "no network but loopback");
}

#[test]
fn a_create_on_a_drained_pool_waits_for_a_booting_slot() {
    // The second create waits for the refill's boot, however slow this
    // machine is (3 s otherwise, then it starts cold).
    let env = [("GWORKER_POOL_MISS_WAIT_SECS", "60")];
    let Some(d) = Daemon::start_with_env("pool-drained", &["--pool", "busybox=1"], &env) else {
        return;
    };
    wait_for("the pool slot", || sandbox_dirs(&d).len() == 1);
    wait_for("the slot to boot", || {
        pool_ready(&d, "busybox", "default") == 1
    });
    let pooled = |id: &str| {
        let launch =
            std::fs::read(d.dir.join("data/sandboxes").join(id).join("launch.json")).unwrap();
        serde_json::from_slice::<serde_json::Value>(&launch).unwrap()["pooled"] == true
    };
    // Two creates back to back: the first takes the only slot; the second
    // finds the pool empty in the middle of a burst and, instead of booting
    // cold beside the refill, waits for the slot the refill boots for it.
    let body = r#"{"image":"busybox","timeout":60,"cmd":["echo","ok"]}"#;
    let a = d.json("POST", "/v1/sandboxes", body);
    let b = d.json("POST", "/v1/sandboxes", body);
    for s in [&a, &b] {
        let id = s["sandbox_id"].as_str().unwrap();
        assert!(pooled(id), "{id} came from the pool");
        assert_eq!(
            d.json("GET", &format!("/v1/sandboxes/{id}/wait?timeout=30"), "")["exit_code"],
            0
        );
        let out = d.req("GET", &format!("/v1/sandboxes/{id}/processes/0/stdout"), "");
        assert_eq!(out.body, b"ok\n");
    }
}

#[test]
fn sigterm_shuts_the_pool_down_and_leaves_users_sandboxes_running() {
    let Some(mut d) = Daemon::start_with("stop", &["--pool", "busybox=2"]) else {
        return;
    };
    wait_for("two booted slots", || {
        pool_ready(&d, "busybox", "default") == 2
    });
    let user = d.create(r#"{"image":"busybox","timeout":120}"#);
    // The pool refills: two unclaimed slots beside the user's sandbox.
    wait_for("the refill", || pool_ready(&d, "busybox", "default") == 2);
    let slots: Vec<String> = sandbox_dirs(&d)
        .into_iter()
        .filter(|s| *s != user)
        .collect();
    assert_eq!(slots.len(), 2, "{slots:?}");
    let alive = |id: &str| {
        Command::new("pgrep")
            .args(["-f", &format!("supervise .*{id}")])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(alive(&user) && slots.iter().all(|s| alive(s)));
    let st = d.term();
    assert!(st.success(), "daemon exit after SIGTERM: {st}");
    assert!(d.log().contains("stopping"), "{}", d.log());
    // The slots are gone (their supervisors end once their sandbox is torn
    // down, just after); the user's sandbox is not.
    wait_for("the slots' supervisors to end", || {
        slots.iter().all(|s| !alive(s))
    });
    assert_eq!(sandbox_dirs(&d), vec![user.clone()]);
    assert!(alive(&user));
    assert!(!d.sock.exists(), "the daemon's socket was removed");
    // The next daemon finds the user's sandbox working.
    d.extra.clear();
    d.spawn();
    assert_eq!(
        d.exec_stdout(&user, r#"{"cmd":["echo","still here"]}"#),
        b"still here\n"
    );
}
