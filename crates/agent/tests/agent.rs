//! The real agent binary, run as a plain child process on the host and driven
//! over its stdin/stdout with the real protocol.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{children_of, proc_ppid, proc_state, tempdir, Agent, PATH};
use gworker_proto::{AgentMsg, HostMsg, SpawnErrorKind, Stream, INITIAL_WINDOW, SPAWN_MKDIR_CWD};

#[test]
fn hello_carries_the_protocol_version() {
    // Agent::start asserts Hello { PROTOCOL_VERSION, CARGO_PKG_VERSION }.
    let mut a = Agent::start();
    a.ping(1);
}

#[test]
fn echo_output_eofs_and_exit() {
    let mut a = Agent::start();
    let p = a.run(1, &["echo", "hi"]);
    assert_eq!(p.stdout, b"hi\n");
    assert_eq!(p.stderr, b"");
    assert_eq!(p.code, Some(0));
    // Both streams were at EOF when the process was reaped: Eofs come first.
    assert_eq!(p.eofs_before_exit, Some(2));
}

#[test]
fn stderr_is_separate() {
    let mut a = Agent::start();
    let p = a.sh(1, "echo out; echo err >&2");
    assert_eq!(p.stdout, b"out\n");
    assert_eq!(p.stderr, b"err\n");
}

#[test]
fn exit_codes_and_signal_deaths() {
    let mut a = Agent::start();
    assert_eq!(a.sh(1, "exit 3").code, Some(3));
    assert_eq!(a.sh(2, "kill -9 $$").code, Some(137));
    assert_eq!(a.sh(3, "exit 255").code, Some(255));
}

#[test]
fn stdin_round_trip_through_cat() {
    let mut a = Agent::start();
    a.spawn(1, &["cat"]);
    a.spawned(1);
    // Small pieces, then 3 MB in 1 MB frames: more than the pipes and the
    // initial window hold, so stdin queueing and credit both come into play.
    let mut expect = Vec::new();
    for i in 0..100u32 {
        let piece = format!("line {i}\n").into_bytes();
        expect.extend_from_slice(&piece);
        a.send(&HostMsg::Stdin {
            pid: 1,
            data: piece,
        });
    }
    for i in 0..3u8 {
        let big: Vec<u8> = (0..1_000_000u32).map(|j| (j as u8) ^ i).collect();
        expect.extend_from_slice(&big);
        a.send(&HostMsg::Stdin { pid: 1, data: big });
    }
    a.send(&HostMsg::StdinClose { pid: 1 });
    let p = a.wait_done(1);
    assert_eq!(p.code, Some(0));
    assert_eq!(p.stdout.len(), expect.len());
    assert!(p.stdout == expect, "cat output differs from its input");
}

#[test]
fn stdin_close_without_data_gives_eof() {
    let mut a = Agent::start();
    a.spawn(1, &["wc", "-c"]);
    a.spawned(1);
    a.send(&HostMsg::StdinClose { pid: 1 });
    let p = a.wait_done(1);
    assert_eq!(String::from_utf8_lossy(&p.stdout).trim(), "0");
}

#[test]
fn stdin_to_a_process_that_closed_it_is_ignored() {
    let mut a = Agent::start();
    // These close stdin at once: later writes hit EPIPE, or an exited/unknown pid.
    a.run(1, &["sh", "-c", "exec 0<&-; sleep 0.1"]);
    a.send(&HostMsg::Stdin {
        pid: 1,
        data: b"late".to_vec(),
    });
    a.send(&HostMsg::StdinClose { pid: 1 });
    a.spawn(2, &["sh", "-c", "exec 0<&-; sleep 0.3"]);
    a.spawned(2);
    a.send(&HostMsg::Stdin {
        pid: 2,
        data: vec![1; 200_000],
    });
    a.send(&HostMsg::StdinClose { pid: 2 });
    assert_eq!(a.wait_done(2).code, Some(0));
    a.ping(7);
}

#[test]
fn sigterm_reaches_the_process_group() {
    let mut a = Agent::start();
    a.spawn(1, &["sleep", "100"]);
    a.spawned(1);
    let t = Instant::now();
    a.send(&HostMsg::Signal {
        pid: 1,
        signo: libc::SIGTERM,
    });
    let p = a.wait_done(1);
    assert_eq!(p.code, Some(128 + libc::SIGTERM));
    assert!(t.elapsed() < Duration::from_secs(5));

    // The whole group: a shell and its background child both get it.
    a.spawn(2, &["sh", "-c", "sleep 100 & wait"]);
    let os = a.spawned(2);
    // The shell forks its child at its own pace.
    let deadline = Instant::now() + Duration::from_secs(5);
    while children_of(os).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let kids = children_of(os);
    assert_eq!(kids.len(), 1, "shell should have one child");
    a.send(&HostMsg::Signal {
        pid: 2,
        signo: libc::SIGKILL,
    });
    assert_eq!(a.wait_done(2).code, Some(137));
    let deadline = Instant::now() + Duration::from_secs(3);
    while proc_state(kids[0]).is_some_and(|s| s != 'Z') {
        assert!(
            Instant::now() < deadline,
            "background sleep survived the group signal"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn signal_for_unknown_pid_is_harmless() {
    let mut a = Agent::start();
    a.send(&HostMsg::Signal { pid: 42, signo: 9 });
    a.send(&HostMsg::Credit {
        pid: 42,
        stream: Stream::Stdout,
        bytes: 10,
    });
    a.send(&HostMsg::Stdin {
        pid: 42,
        data: b"x".to_vec(),
    });
    a.send(&HostMsg::StdinClose { pid: 42 });
    a.ping(3);
    a.expect_other(
        |m| matches!(m, AgentMsg::Log { message } if message.contains("unknown process 42")),
    );
}

#[test]
fn environment_is_exactly_what_was_sent() {
    let mut a = Agent::start();
    let env = [PATH, "FOO=bar baz", "EMPTY=", "EQ=a=b"];
    a.spawn_with(1, &["env"], &env, "/", 0);
    a.spawned(1);
    let p = a.wait_done(1);
    let mut got: Vec<String> = String::from_utf8(p.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    got.sort();
    let mut want: Vec<String> = env.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn program_is_looked_up_in_the_given_path() {
    let dir = tempdir("path");
    let tool = dir.join("mytool");
    std::fs::write(&tool, "#!/bin/sh\necho from-mytool\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut a = Agent::start();
    let path = format!("PATH={}:/usr/bin:/bin", dir.display());
    a.spawn_with(1, &["mytool"], &[&path], "/", 0);
    a.spawned(1);
    assert_eq!(a.wait_done(1).stdout, b"from-mytool\n");
    // Without that PATH entry it is not found.
    a.spawn_with(2, &["mytool"], &[PATH], "/", 0);
    let m = a.expect_other(|m| matches!(m, AgentMsg::SpawnFailed { pid: 2, .. }));
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
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn cwd_is_used_and_created_on_request() {
    let base = tempdir("cwd");
    let mut a = Agent::start();
    a.spawn_with(1, &["pwd"], &[PATH], base.to_str().unwrap(), 0);
    a.spawned(1);
    assert_eq!(
        a.wait_done(1).stdout,
        format!("{}\n", base.display()).into_bytes()
    );

    let deep = base.join("a/b/c");
    a.spawn_with(
        2,
        &["pwd"],
        &[PATH],
        deep.to_str().unwrap(),
        SPAWN_MKDIR_CWD,
    );
    a.spawned(2);
    assert_eq!(
        a.wait_done(2).stdout,
        format!("{}\n", deep.display()).into_bytes()
    );
    let mode = std::fs::metadata(&deep).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o755, 0o755, "mode {mode:o}");
    assert!(base.join("a/b").is_dir());
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn spawn_failures_are_classified() {
    let dir = tempdir("fail");
    let noexec = dir.join("noexec");
    std::fs::write(&noexec, "#!/bin/sh\necho no\n").unwrap();
    std::fs::set_permissions(&noexec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, [0x7f, b'E', b'L', b'F', 0, 0, 0, 0]).unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut a = Agent::start();
    let fail = |a: &mut Agent, pid: u32, argv: &[&str], cwd: &str| -> (SpawnErrorKind, String) {
        a.spawn_with(pid, argv, &[PATH], cwd, 0);
        match a.expect_other(|m| {
            matches!(m, AgentMsg::Spawned { pid: p, .. } | AgentMsg::SpawnFailed { pid: p, .. } if *p == pid)
        }) {
            AgentMsg::SpawnFailed { kind, message, .. } => (kind, message),
            m => panic!("expected SpawnFailed, got {m:?}"),
        }
    };

    let (k, m) = fail(&mut a, 1, &["true"], "/nonexistent/dir");
    assert_eq!(k, SpawnErrorKind::NoWorkdir);
    assert_eq!(m, "workdir \"/nonexistent/dir\": no such file or directory");

    let (k, m) = fail(&mut a, 2, &["nope-not-a-program"], "/");
    assert_eq!(k, SpawnErrorKind::NotFound);
    assert_eq!(m, "exec \"nope-not-a-program\": no such file or directory");

    let (k, _) = fail(&mut a, 3, &["/no/such/binary"], "/");
    assert_eq!(k, SpawnErrorKind::NotFound);

    let (k, m) = fail(&mut a, 4, &[noexec.to_str().unwrap()], "/");
    assert_eq!(k, SpawnErrorKind::NotExecutable, "{m}");
    assert!(m.ends_with("permission denied"), "{m}");

    let (k, m) = fail(&mut a, 5, &[garbage.to_str().unwrap()], "/");
    assert_eq!(k, SpawnErrorKind::NotExecutable, "{m}");

    let (k, _) = fail(&mut a, 6, &[], "/");
    assert_eq!(k, SpawnErrorKind::Other);

    let (k, _) = fail(&mut a, 7, &["true"], noexec.to_str().unwrap());
    assert_eq!(k, SpawnErrorKind::NoWorkdir);

    // A pid still in use is refused; the running process is untouched.
    a.spawn(8, &["sleep", "0.3"]);
    a.spawned(8);
    let (k, m) = fail(&mut a, 8, &["true"], "/");
    assert_eq!(k, SpawnErrorKind::Other);
    assert!(m.contains("already in use"), "{m}");
    assert_eq!(a.wait_done(8).code, Some(0));

    // Failed pids are free again and the agent is healthy.
    assert_eq!(a.run(2, &["true"]).code, Some(0));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn flow_control_stops_at_the_window_and_resumes_on_credit() {
    const TOTAL: usize = 5_000_000;
    let mut a = Agent::start();
    a.auto_credit = false;
    a.spawn(1, &["head", "-c", &TOTAL.to_string(), "/dev/zero"]);
    a.spawned(1);
    a.pump_until(|a| a.procs[&1].stdout.len() >= INITIAL_WINDOW as usize);
    // Nothing more may come: no credit. head stays blocked on the full pipe.
    let quiet_until = Instant::now() + Duration::from_millis(700);
    while let Some(m) = a.try_recv(quiet_until.saturating_duration_since(Instant::now())) {
        let more_stdout = matches!(
            &m,
            AgentMsg::Output {
                stream: Stream::Stdout,
                ..
            }
        );
        assert!(!more_stdout, "output beyond the window");
        assert!(
            !matches!(m, AgentMsg::Exited { .. }),
            "head cannot finish without credit"
        );
        a.apply(m);
    }
    assert_eq!(a.procs[&1].stdout.len(), INITIAL_WINDOW as usize);
    assert!(a.procs[&1].code.is_none());

    // Grant the rest in a few pieces; exactly the total arrives.
    let rest = TOTAL - INITIAL_WINDOW as usize;
    for _ in 0..3 {
        a.send(&HostMsg::Credit {
            pid: 1,
            stream: Stream::Stdout,
            bytes: (rest / 3) as u32,
        });
    }
    a.send(&HostMsg::Credit {
        pid: 1,
        stream: Stream::Stdout,
        bytes: (rest % 3) as u32,
    });
    let p = a.wait_done(1);
    assert_eq!(p.stdout.len(), TOTAL);
    assert!(p.stdout.iter().all(|&b| b == 0));
    assert_eq!(p.code, Some(0));
}

#[test]
fn output_chunks_respect_the_maximum() {
    let mut a = Agent::start();
    a.spawn(1, &["head", "-c", "3000000", "/dev/zero"]);
    a.spawned(1);
    let (mut total, mut exited, mut eof) = (0, false, false);
    while !(exited && eof) {
        match a.recv() {
            AgentMsg::Output {
                pid: 1,
                stream,
                data,
            } => {
                assert!(data.len() <= gworker_proto::MAX_OUTPUT_CHUNK);
                assert!(!data.is_empty());
                assert!(!eof);
                total += data.len();
                a.send(&HostMsg::Credit {
                    pid: 1,
                    stream,
                    bytes: data.len() as u32,
                });
            }
            AgentMsg::Eof {
                pid: 1,
                stream: Stream::Stdout,
            } => eof = true,
            AgentMsg::Exited { pid: 1, code } => {
                assert_eq!(code, 0);
                exited = true;
            }
            _ => {}
        }
    }
    assert_eq!(total, 3_000_000);
}

#[test]
fn orphans_are_reaped() {
    let mut a = Agent::start();
    let agent = a.agent_pid();
    // The background sleep outlives its shell and is re-parented to the agent
    // (a subreaper), which must reap it.
    // (Sleeps long enough to be seen alive on a busy machine.)
    let p = a.sh(1, "sleep 1.5 >/dev/null 2>&1 & echo $!");
    assert_eq!(p.code, Some(0));
    let orphan: u32 = String::from_utf8(p.stdout).unwrap().trim().parse().unwrap();
    assert_eq!(
        proc_ppid(orphan),
        Some(agent),
        "orphan should be re-parented to the agent"
    );
    // It also keeps stdout open in this variant: Exited before Eof.
    a.spawn(2, &["sh", "-c", "sleep 1.5 & exit 0"]);
    a.spawned(2);
    a.pump_until(|a| a.procs[&2].code.is_some());
    assert_eq!(a.procs[&2].eofs_before_exit, Some(0));
    assert_eq!(a.wait_done(2).code, Some(0));

    // Both sleeps end, and the agent reaps them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (proc_state(orphan).is_some() || !children_of(agent).is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    a.ping(1);
    assert!(proc_state(orphan).is_none(), "orphan {orphan} not reaped");
    let zombies: Vec<u32> = children_of(agent)
        .into_iter()
        .filter(|c| proc_state(*c) == Some('Z'))
        .collect();
    assert!(
        zombies.is_empty(),
        "zombie children of the agent: {zombies:?}"
    );
    assert!(children_of(agent).is_empty());
}

#[test]
fn fifty_concurrent_execs() {
    let mut a = Agent::start();
    for i in 0..50u32 {
        a.spawn_with(
            100 + i,
            &[
                "sh",
                "-c",
                "sleep 0.2; echo out $1; echo err $1 >&2; exit $(($1 % 7))",
                "sh",
                &i.to_string(),
            ],
            &[PATH],
            "/",
            0,
        );
    }
    let t = Instant::now();
    for i in 0..50u32 {
        a.spawned(100 + i);
    }
    for i in 0..50u32 {
        let p = a.wait_done(100 + i);
        assert_eq!(p.stdout, format!("out {i}\n").into_bytes());
        assert_eq!(p.stderr, format!("err {i}\n").into_bytes());
        assert_eq!(p.code, Some((i % 7) as i32));
    }
    // They ran side by side, not one after another.
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn ping_pong() {
    let mut a = Agent::start();
    for seq in [0, 1, 77, u32::MAX] {
        a.send(&HostMsg::Ping { seq });
        match a.recv() {
            AgentMsg::Pong { seq: s } => assert_eq!(s, seq),
            m => panic!("expected Pong, got {m:?}"),
        }
    }
}

#[test]
fn closing_stdin_ends_the_agent_and_its_processes() {
    let mut a = Agent::start();
    a.spawn(1, &["sleep", "100"]);
    let sleep = a.spawned(1);
    // And a grandchild in the same group, plus an orphan in its own session.
    a.spawn(
        2,
        &["sh", "-c", "setsid sleep 100 >/dev/null 2>&1 & echo $!"],
    );
    a.spawned(2);
    let p = a.wait_done(2);
    let orphan: u32 = String::from_utf8(p.stdout).unwrap().trim().parse().unwrap();
    // Alive (sleeping, or still starting on a busy machine).
    assert!(
        matches!(proc_state(sleep), Some('S' | 'R')),
        "{:?}",
        proc_state(sleep)
    );
    a.close_stdin();
    let (code, stderr) = a.wait_exit();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for pid in [sleep, orphan] {
        let deadline = Instant::now() + Duration::from_secs(3);
        while proc_state(pid).is_some_and(|s| s != 'Z') {
            assert!(
                Instant::now() < deadline,
                "process {pid} survived the agent"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn garbage_frames_end_the_agent_without_panic() {
    let cases: [&[u8]; 4] = [
        &[0xff, 0xff, 0xff, 0xff],          // length beyond MAX_FRAME
        &[0, 0, 0, 0],                      // zero length
        &[1, 0, 0, 0, 0x7f],                // unknown type
        &[6, 0, 0, 0, 0x07, 1, 0, 0, 0, 9], // ping with trailing byte
    ];
    for bytes in cases {
        let mut a = Agent::start();
        a.spawn(1, &["sleep", "100"]);
        let sleep = a.spawned(1);
        a.send_raw(bytes);
        let (code, stderr) = a.wait_exit();
        assert_eq!(code, Some(0), "stderr: {stderr}");
        assert!(stderr.contains("bad frame"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let deadline = Instant::now() + Duration::from_secs(3);
        while proc_state(sleep).is_some_and(|s| s != 'Z') {
            assert!(Instant::now() < deadline, "sleep survived");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn truncated_frame_then_eof_ends_the_agent() {
    let mut a = Agent::start();
    a.send_raw(&[20, 0, 0, 0, 0x07]);
    let (code, stderr) = a.wait_exit();
    assert_eq!(code, Some(0));
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn frames_split_across_writes_are_reassembled() {
    let mut a = Agent::start();
    let mut buf = Vec::new();
    for seq in 0..50 {
        HostMsg::Ping { seq }.encode(&mut buf);
    }
    for b in buf.chunks(3) {
        a.send_raw(b);
    }
    for seq in 0..50 {
        a.expect_other(|m| matches!(m, AgentMsg::Pong { seq: s } if *s == seq));
    }
}

#[test]
fn agent_exits_when_its_output_is_closed() {
    use std::os::fd::FromRawFd;
    use std::process::{Command, Stdio};
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two fresh descriptors that we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: see above.
    let (r, w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    drop(r); // nobody will read: the agent's first write (Hello) gets EPIPE
    let mut child = Command::new(env!("CARGO_BIN_EXE_gworker-agent"))
        .stdin(Stdio::piped())
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not notice its output is gone"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("writing to the host failed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn children_start_with_clean_signal_state_in_their_own_group() {
    let mut a = Agent::start();
    let p = a.sh(
        1,
        "grep -E '^(SigBlk|SigIgn)' /proc/self/status; ps -o pgid= -p $$; echo $$",
    );
    let out = String::from_utf8(p.stdout).unwrap();
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines[0], "SigBlk:\t0000000000000000");
    assert_eq!(lines[1], "SigIgn:\t0000000000000000");
    assert_eq!(
        lines[2], lines[3],
        "the process leads its own process group"
    );
}

#[test]
fn quiesce_holds_output_until_resume() {
    let mut a = Agent::start();
    a.spawn(1, &["sh", "-c", "read x; echo got-$x"]);
    a.spawned(1);
    a.send(&HostMsg::Quiesce);
    assert_eq!(a.recv(), AgentMsg::Quiesced);
    // The process runs and finishes while quiesced, but nothing reaches us.
    a.send(&HostMsg::Stdin {
        pid: 1,
        data: b"a\n".to_vec(),
    });
    assert!(
        a.try_recv(Duration::from_millis(500)).is_none(),
        "held while quiesced"
    );
    a.send(&HostMsg::Resume);
    let p = a.wait_done(1);
    assert_eq!(p.stdout, b"got-a\n");
    assert_eq!(p.code, Some(0));
}
