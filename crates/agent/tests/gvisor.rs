//! The static agent as the root process of a real gVisor sandbox (busybox
//! rootfs), driven over runsc's stdio pipes. Ignored by default (needs root,
//! `runsc` and `busybox-static`), and needs the static build:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
//!     --target x86_64-unknown-linux-gnu -p gworker-agent
//! GWORKER_AGENT_STATIC=target/x86_64-unknown-linux-gnu/release/gworker-agent \
//!     cargo test --release -p gworker-agent --test gvisor -- --ignored --nocapture --test-threads=1
//! ```

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{tempdir, Agent};
use gworker_proto::{AgentMsg, HostMsg, SpawnErrorKind, Stream, SPAWN_MKDIR_CWD};

const RUNSC_ROOT: &str = "/tmp/runsc-agent-test";
const BB_PATH: &str = "PATH=/bin";

/// A bundle dir with a busybox rootfs and a config.json running the agent.
fn make_bundle(agent: &Path) -> PathBuf {
    let dir = tempdir("gvisor");
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join(".gworker")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    let st = Command::new("runsc")
        .arg("spec")
        .current_dir(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg["process"]["args"] = serde_json::json!(["/.gworker/agent"]);
    cfg["process"]["terminal"] = serde_json::json!(false);
    cfg["root"]["readonly"] = serde_json::json!(false);
    cfg["root"]["path"] = serde_json::json!(root.to_str().unwrap());
    cfg["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/.gworker/agent",
            "type": "bind",
            "source": agent.canonicalize().unwrap().to_str().unwrap(),
            "options": ["rbind", "ro"],
        }));
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    dir
}

/// Force-deletes the container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .args([
                "20", "runsc", "--root", RUNSC_ROOT, "delete", "-force", &self.0,
            ])
            .status();
    }
}

fn start(bundle: &Path, id: &str) -> (Agent, Container, Duration) {
    let guard = Container(id.to_string());
    drop(Container(id.to_string())); // leftovers of an earlier run
    let mut cmd = Command::new("timeout");
    cmd.args([
        "60",
        "runsc",
        "--root",
        RUNSC_ROOT,
        "--network=none",
        "--overlay2=root:memory",
    ])
    .args(["run", "--bundle", bundle.to_str().unwrap(), id]);
    let t = Instant::now();
    let a = Agent::start_cmd(cmd); // asserts Hello
    (a, guard, t.elapsed())
}

fn agent_bin() -> PathBuf {
    PathBuf::from(std::env::var("GWORKER_AGENT_STATIC").expect(
        "set GWORKER_AGENT_STATIC to the static agent (see the module docs for the build command)",
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
#[ignore]
fn agent_runs_as_gvisor_root_process() {
    let bundle = make_bundle(&agent_bin());
    let (mut a, _guard, boot) = start(&bundle, "agenttest1");
    println!("gvisor: runsc run -> Hello: {boot:?}");

    let run = |a: &mut Agent, pid: u32, argv: &[&str]| {
        a.spawn_with(pid, argv, &[BB_PATH], "/", 0);
        a.spawned(pid);
        a.wait_done(pid)
    };
    let p = run(&mut a, 1, &["echo", "hi"]);
    assert_eq!(p.stdout, b"hi\n");
    assert_eq!(p.code, Some(0));
    assert_eq!(run(&mut a, 2, &["sh", "-c", "exit 3"]).code, Some(3));
    assert_eq!(run(&mut a, 3, &["sh", "-c", "kill -9 $$"]).code, Some(137));

    // The agent is PID 1 in the sandbox.
    let p = run(&mut a, 4, &["sh", "-c", "echo $PPID; cat /proc/1/cmdline"]);
    assert_eq!(String::from_utf8_lossy(&p.stdout), "1\n/.gworker/agent\0");

    // Exact environment, workdir creation.
    a.spawn_with(5, &["env"], &[BB_PATH, "A=1 2"], "/", 0);
    a.spawned(5);
    let mut env: Vec<String> = String::from_utf8(a.wait_done(5).stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    env.sort();
    assert_eq!(env, ["A=1 2", BB_PATH]);
    a.spawn_with(6, &["pwd"], &[BB_PATH], "/work/x/y", SPAWN_MKDIR_CWD);
    a.spawned(6);
    assert_eq!(a.wait_done(6).stdout, b"/work/x/y\n");

    // Failures.
    a.spawn_with(7, &["nope"], &[BB_PATH], "/", 0);
    let m = a.expect_other(|m| matches!(m, AgentMsg::SpawnFailed { pid: 7, .. }));
    assert!(
        matches!(
            m,
            AgentMsg::SpawnFailed {
                kind: SpawnErrorKind::NotFound,
                ..
            }
        ),
        "{m:?}"
    );
    a.spawn_with(8, &["true"], &[BB_PATH], "/nope", 0);
    let m = a.expect_other(|m| matches!(m, AgentMsg::SpawnFailed { pid: 8, .. }));
    assert!(
        matches!(
            m,
            AgentMsg::SpawnFailed {
                kind: SpawnErrorKind::NoWorkdir,
                ..
            }
        ),
        "{m:?}"
    );

    // Stdin round trip and signals.
    a.spawn_with(9, &["cat"], &[BB_PATH], "/", 0);
    a.spawned(9);
    let data: Vec<u8> = (0..2_000_000u32).map(|i| i as u8).collect();
    for chunk in data.chunks(512 * 1024) {
        a.send(&HostMsg::Stdin {
            pid: 9,
            data: chunk.to_vec(),
        });
    }
    a.send(&HostMsg::StdinClose { pid: 9 });
    assert!(a.wait_done(9).stdout == data);
    a.spawn_with(10, &["sleep", "100"], &[BB_PATH], "/", 0);
    a.spawned(10);
    a.send(&HostMsg::Signal {
        pid: 10,
        signo: libc::SIGTERM,
    });
    assert_eq!(a.wait_done(10).code, Some(143));

    // Orphans are reaped by PID 1: no zombies left.
    run(
        &mut a,
        11,
        &["sh", "-c", "sleep 0.2 >/dev/null 2>&1 & exit 0"],
    );
    std::thread::sleep(Duration::from_millis(600));
    let p = run(
        &mut a,
        12,
        &["sh", "-c", "grep -l zombie /proc/[0-9]*/status; true"],
    );
    let zombies = String::from_utf8_lossy(&p.stdout).into_owned();
    let ps = run(
        &mut a,
        13,
        &["sh", "-c", "grep -H State /proc/[0-9]*/status"],
    );
    let states = String::from_utf8_lossy(&ps.stdout).into_owned();
    assert!(
        !states.contains("(zombie)"),
        "zombies inside the sandbox: {zombies} {states}"
    );

    // Exec round trip inside gVisor.
    let (mut sp, mut rt) = (Vec::new(), Vec::new());
    for pid in 1000..1200 {
        let t = Instant::now();
        a.spawn_with(pid, &["true"], &[BB_PATH], "/", 0);
        a.spawned(pid);
        sp.push(t.elapsed());
        a.wait_done(pid);
        rt.push(t.elapsed());
        a.procs.remove(&pid);
    }
    for (name, v) in [
        ("Spawn -> Spawned", &mut sp),
        ("Spawn -> Exited+Eofs", &mut rt),
    ] {
        v.sort();
        let mean = v.iter().sum::<Duration>() / v.len() as u32;
        println!(
            "gvisor: exec true {name}: n={} mean={mean:?} p50={:?} p99={:?}",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99)
        );
    }
    // Reference: the same fork+exec+wait done by busybox sh inside the sandbox.
    let t = Instant::now();
    let loop200 = "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done";
    assert_eq!(run(&mut a, 1500, &["sh", "-c", loop200]).code, Some(0));
    println!(
        "gvisor: reference, busybox sh running /bin/true: {:?} per exec",
        t.elapsed() / 200
    );
    let t = Instant::now();
    for seq in 0..2000 {
        a.ping(seq);
    }
    println!("gvisor: ping->pong mean={:?}", t.elapsed() / 2000);

    // Throughput out of the sandbox: busybox head (small writes) and dd (1 MiB writes).
    const TOTAL: u64 = 500_000_000;
    let head = ["head", "-c", "500000000", "/dev/zero"];
    let dd = ["dd", "if=/dev/zero", "bs=1000000", "count=500"];
    for (n, argv) in [(2000u32, &head[..]), (2001, &dd[..])] {
        let t = Instant::now();
        a.spawn_with(n, argv, &[BB_PATH], "/", 0);
        a.spawned(n);
        let (mut got, mut frames, mut exited, mut eof) = (0u64, 0u64, false, false);
        while !(exited && eof) {
            match a.recv() {
                AgentMsg::Output {
                    pid,
                    stream: Stream::Stdout,
                    data,
                } if pid == n => {
                    got += data.len() as u64;
                    frames += 1;
                    a.send(&HostMsg::Credit {
                        pid,
                        stream: Stream::Stdout,
                        bytes: data.len() as u32,
                    });
                }
                AgentMsg::Eof {
                    pid,
                    stream: Stream::Stdout,
                } if pid == n => eof = true,
                AgentMsg::Exited { pid, code } if pid == n => {
                    assert_eq!(code, 0);
                    exited = true;
                }
                _ => {}
            }
        }
        assert_eq!(got, TOTAL);
        let secs = t.elapsed().as_secs_f64();
        println!(
            "gvisor: {argv:?}: {TOTAL} bytes in {secs:.3} s = {:.0} MB/s ({frames} Output frames, {} B avg)",
            TOTAL as f64 / 1e6 / secs,
            TOTAL / frames
        );
    }

    // Closing the agent's stdin ends the sandbox (and runsc) with status 0.
    a.spawn_with(3000, &["sleep", "100"], &[BB_PATH], "/", 0);
    a.spawned(3000);
    let t = Instant::now();
    let (code, stderr) = a.wait_exit();
    println!("gvisor: stdin closed -> runsc exited in {:?}", t.elapsed());
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    std::fs::remove_dir_all(bundle).unwrap();
}
