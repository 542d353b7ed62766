//! `gworker sandbox ...` run as a real binary against a real daemon (the same
//! binary's `serve`) and real gVisor sandboxes. Each test checks what ran
//! inside the sandbox: output, exit codes, files. Skipped (with a message)
//! only when runsc is not installed.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{daemon_or_skip, stderr, stdout, BIN};

#[test]
fn create_exec_wait_and_exit_codes() {
    let d = daemon_or_skip!();
    // Runs until the test says so (a file), however slow the machine.
    let id = d.create(&[
        "--",
        "sh",
        "-c",
        "echo started; while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 3",
    ]);

    let o = d.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 5",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert_eq!(stdout(&o), "out\n");
    assert_eq!(stderr(&o), "err\n");

    let o = d.run(&["exec", &id, "--", "touch", "/tmp/go"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let o = d.run(&["wait", &id]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(stdout(&o), "3\n");
    assert_eq!(d.ok(&["poll", &id]), "3\n");
    assert_eq!(d.ok(&["logs", &id]), "started\n");

    let info: serde_json::Value = serde_json::from_str(&d.ok(&["info", &id, "--json"])).unwrap();
    assert_eq!(info["sandbox_id"], id.as_str());
    assert_eq!(info["state"], "exited");
    assert_eq!(info["exit_code"], 3);
    let human = d.ok(&["info", &id]);
    assert!(
        human.contains("exited") && human.contains("busybox"),
        "{human}"
    );
}

#[test]
fn exec_env_workdir_shared_fs_and_missing_program() {
    let d = daemon_or_skip!();
    // With an entry command: the daemon does not create the workdir of an idle sandbox (a bug, reported).
    let id = d.create(&[
        "--env",
        "FROM_CREATE=c1",
        "--workdir",
        "/work",
        "--",
        "sleep",
        "120",
    ]);
    let o = d.run(&[
        "exec",
        "--env",
        "FROM_EXEC=e1",
        &id,
        "--",
        "sh",
        "-c",
        "echo $FROM_CREATE $FROM_EXEC; pwd; echo data > f",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "c1 e1\n/work\n");
    assert_eq!(
        d.ok(&["exec", "--workdir", "/", &id, "--", "cat", "/work/f"]),
        "data\n"
    );

    let o = d.run(&["exec", &id, "--", "/no/such/program"]);
    assert_eq!(o.status.code(), Some(127), "{}", stderr(&o));
    assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));

    // Killed by a signal: 128+N, like a shell.
    let o = d.run(&["exec", &id, "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(o.status.code(), Some(137));
}

#[test]
fn exec_forwards_stdin() {
    let d = daemon_or_skip!();
    let id = d.create(&[]);
    let mut child = d
        .cmd(&["exec", &id, "--", "sh", "-c", "cat; echo end"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello\nworld\n")
        .unwrap(); // dropped: EOF
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "hello\nworld\nend\n");

    // A larger input, counted inside the sandbox.
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let mut child = d
        .cmd(&["exec", &id, "--", "wc", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(stdout(&o).trim(), "300000");

    // Without input (stdin from /dev/null) the command reads EOF at once.
    assert_eq!(
        d.ok(&["exec", &id, "--", "sh", "-c", "cat; echo done"]),
        "done\n"
    );
}

#[test]
fn poll_and_ls() {
    let d = daemon_or_skip!();
    let running = d.create(&["--", "sleep", "60"]);
    let done = d.create(&["--", "sh", "-c", "exit 2"]);
    assert_eq!(d.run(&["wait", &done]).status.code(), Some(2));
    // Booted (not "starting" in the listing below).
    d.ok(&["exec", &running, "--", "true"]);
    assert_eq!(d.ok(&["poll", &running]), "running\n");
    assert_eq!(d.ok(&["poll", &done]), "2\n");

    let list: serde_json::Value = serde_json::from_str(&d.ok(&["ls", "--json"])).unwrap();
    let list = list.as_array().expect("a JSON array");
    let find = |id: &str| {
        list.iter()
            .find(|s| s["sandbox_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not listed"))
    };
    assert_eq!(find(&running)["state"], "running");
    assert_eq!(find(&running)["cmd"], serde_json::json!(["sleep", "60"]));
    assert_eq!(find(&done)["exit_code"], 2);

    let table = d.ok(&["ls"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "IMAGE", "STATE", "EXIT", "AGE", "CMD"]);
    let row = table
        .lines()
        .find(|l| l.starts_with(&running))
        .expect("row");
    assert!(
        row.contains("busybox") && row.contains("running") && row.ends_with("sleep 60"),
        "{row}"
    );

    assert_eq!(d.ok(&["terminate", &running]), "");
    assert_eq!(d.run(&["poll", &running]).status.code(), Some(1));
}

#[test]
fn unknown_id_is_a_clear_error() {
    let d = daemon_or_skip!();
    let id = "sb-0123456789abcdef0123456789abcdef";
    for args in [
        vec!["wait", id],
        vec!["poll", id],
        vec!["info", id],
        vec!["logs", id],
        vec!["terminate", id],
        vec!["exec", id, "--", "true"],
    ] {
        let o = d.run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert_eq!(
            stderr(&o),
            format!("error: no sandbox \"{id}\": it does not exist or was terminated\n"),
            "{args:?}"
        );
        assert_eq!(stdout(&o), "");
    }
}

#[test]
fn wait_timeout_exits_124() {
    let d = daemon_or_skip!();
    let id = d.create(&["--", "sleep", "30"]);
    let t = Instant::now();
    let o = d.run(&["wait", "--timeout", "1", &id]);
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(stderr(&o).contains("still running"), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(d.ok(&["poll", &id]), "running\n");
}

#[test]
fn exec_streams_output_before_exit() {
    let d = daemon_or_skip!();
    let id = d.create(&[]);
    // Booted first: the bound below is about streaming, not the boot.
    d.ok(&["exec", &id, "--", "true"]);
    let mut child = d
        .cmd(&[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo first; sleep 5; echo second",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    out.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"first\n");
    assert!(
        t.elapsed() < Duration::from_millis(4000),
        "first line after {:?}",
        t.elapsed()
    );
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "second\n");
    assert!(child.wait().unwrap().success());
}

#[test]
fn daemon_not_running() {
    let o = Command::new(BIN)
        .args(["sandbox", "ls"])
        .env("GWORKER_URL", "unix:///nonexistent/gw-cli-test.sock")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("unix:///nonexistent/gw-cli-test.sock") && e.contains("gworker serve"),
        "{e}"
    );
    // --url wins over the environment.
    let o = Command::new(BIN)
        .args([
            "sandbox",
            "poll",
            "--url",
            "unix:///nonexistent/other.sock",
            "sb-x",
        ])
        .env("GWORKER_URL", "unix:///nonexistent/gw-cli-test.sock")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("other.sock"), "{}", stderr(&o));
}

#[test]
fn help_texts() {
    for sub in [
        "create",
        "exec",
        "wait",
        "poll",
        "ls",
        "logs",
        "terminate",
        "info",
    ] {
        let o = Command::new(BIN)
            .args(["sandbox", sub, "--help"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{sub}");
        let h = stdout(&o);
        assert!(h.contains("--url") && h.contains("Usage:"), "{sub}: {h}");
    }
}

#[test]
fn snapshot_take_list_restore_and_remove() {
    let d = daemon_or_skip!();
    let id = d.create(&[]);
    d.ok(&["exec", &id, "--", "sh", "-c", "echo saved > /tmp/s"]);
    let snap = d.ok(&["snapshot", &id]).trim().to_string();
    assert!(snap.starts_with("sn-"), "{snap}");
    // The source goes on running.
    assert_eq!(d.ok(&["exec", &id, "--", "cat", "/tmp/s"]), "saved\n");
    let top = |args: &[&str]| {
        let o = Command::new(BIN)
            .args(args)
            .env("GWORKER_URL", &d.url)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, out, _) = top(&["snapshot", "ls", "--json"]);
    assert_eq!(code, Some(0));
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["snapshot_id"] == snap.as_str())
        .expect("listed")
        .clone();
    assert_eq!(entry["source_sandbox_id"], id.as_str());
    let (code, table, _) = top(&["snapshot", "ls"]);
    assert_eq!(code, Some(0));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&snap) && l.contains("busybox")),
        "{table}"
    );
    let (code, _, _) = top(&["snapshot", "rm", &snap]);
    assert_eq!(code, Some(0));
    let (code, _, err) = top(&["snapshot", "rm", &snap]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no snapshot"), "{err}");
}

#[test]
fn create_with_limits_and_network_policy() {
    let d = daemon_or_skip!();
    let id = d.create(&[
        "--memory",
        "300",
        "--max-processes",
        "100",
        "--cpu",
        "0.5",
        "--block-network",
    ]);
    let info: serde_json::Value = serde_json::from_str(&d.ok(&["info", &id, "--json"])).unwrap();
    assert_eq!(info["memory"], 300);
    assert_eq!(info["max_processes"], 100);
    assert_eq!(info["cpu"], 0.5);
    assert_eq!(info["network"], "blocked");
    // Loopback only inside.
    assert_eq!(d.ok(&["exec", &id, "--", "ls", "/sys/class/net"]), "lo\n");

    let id = d.create(&[
        "--cidr-allow",
        "203.0.113.0/24",
        "--cidr-allow",
        "198.51.100.7",
    ]);
    let info: serde_json::Value = serde_json::from_str(&d.ok(&["info", &id, "--json"])).unwrap();
    assert_eq!(info["network"], "allowlist");
    assert_eq!(
        info["cidr_allowlist"],
        serde_json::json!(["203.0.113.0/24", "198.51.100.7/32"])
    );

    let o = d.run(&["create", "--image", "busybox", "--cidr-allow", "not-a-cidr"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("cidr_allowlist"), "{}", stderr(&o));
}

#[test]
fn serve_refuses_a_data_dir_too_long_for_sandbox_sockets() {
    let dir =
        std::env::temp_dir().join(format!("gw-long-{}-{}", std::process::id(), "d".repeat(80)));
    let sock = std::env::temp_dir().join(format!("gw-long-{}.sock", std::process::id()));
    let o = Command::new(BIN)
        .args(["serve", "--no-host-tuning", "--data-dir"])
        .arg(&dir)
        .arg("--socket")
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("data directory's path is too long") && e.contains("at most 66 bytes"),
        "{e}"
    );
    // Refused before anything was made or listened on.
    assert!(!dir.exists() && !sock.exists());
}

#[test]
fn status_shows_the_daemon_and_its_pool() {
    let status = |d: &common::Daemon, json: bool| {
        let mut c = Command::new(BIN);
        c.arg("status").env("GWORKER_URL", &d.url);
        if json {
            c.arg("--json");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let d = daemon_or_skip!();
    let text = status(&d, false);
    assert!(
        text.starts_with(&format!("daemon at {}: ok (gworker ", d.url)),
        "{text}"
    );
    assert!(text.contains("warm pool: none"), "{text}");
    drop(d);

    let Some(d) =
        common::Daemon::start_with(&["--pool", "busybox=1", "--pool-blocked", "busybox=1"])
    else {
        return;
    };
    let start = Instant::now();
    loop {
        let v: serde_json::Value = serde_json::from_str(&status(&d, true)).unwrap();
        assert_eq!(v["status"], "ok");
        let pools = v["pool"].as_array().unwrap();
        assert_eq!(pools.len(), 2, "{v}");
        for (pool, network) in pools.iter().zip(["default", "blocked"]) {
            assert_eq!(
                (&pool["image"], &pool["network"], &pool["size"]),
                (&"busybox".into(), &network.into(), &1.into()),
                "{v}"
            );
        }
        if pools.iter().all(|p| p["ready"] == 1) {
            assert!(pools.iter().all(|p| p["booting"] == 0), "{v}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the slot never booted: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = status(&d, false);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["POOL", "IMAGE", "NETWORK", "SIZE", "READY", "BOOTING"],
        "{text}"
    );
    assert_eq!(rows[1], ["busybox", "default", "1", "1", "0"], "{text}");
    assert_eq!(rows[2], ["busybox", "blocked", "1", "1", "0"], "{text}");
}

/// runsc cannot start a sandbox with 256 open files. The daemon raises the
/// limit when it may (CAP_SYS_RESOURCE); otherwise it says so in its log,
/// and the sandbox's failure says what to do.
#[test]
fn a_low_open_files_limit_is_raised_or_explained() {
    let Some(d) = common::Daemon::start_under(&["prlimit", "--nofile=256:256"], &[]) else {
        eprintln!("skipped: runsc is not installed");
        return;
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let cap_sys_resource = 1 << 24;
    let may_raise = cap_eff & cap_sys_resource != 0;
    let id = d.create(&[]);
    let o = d.run(&["exec", &id, "--", "echo", "ok"]);
    if may_raise {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert_eq!(stdout(&o), "ok\n");
        assert!(
            d.log().contains("open-files limit raised from 256"),
            "{}",
            d.log()
        );
    } else {
        assert_ne!(o.status.code(), Some(0));
        let err = stderr(&o);
        assert!(
            err.contains("open-files limit is 256") && err.contains("ulimit -n 1024"),
            "{err}"
        );
        assert!(
            d.log()
                .contains("the open-files limit is 256 (hard 256) and cannot be raised"),
            "{}",
            d.log()
        );
        // Nothing of the failed start stays: runsc made cgroups of its own
        // in the other hierarchies (freezer, devices, …) before it failed,
        // and only a clean runsc removes those itself.
        let left = || -> Vec<std::path::PathBuf> {
            std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
                .map(|h| h.path().join("gworker").join(&id))
                .filter(|p| p.exists())
                .collect()
        };
        let start = Instant::now();
        while !left().is_empty() && start.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(left(), Vec::<std::path::PathBuf>::new());
    }
}
