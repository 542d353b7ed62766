//! The Rust client against a real daemon and real gVisor sandboxes. Every
//! test checks what happened inside the sandbox (output, exit codes, files).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::daemon_or_skip;
use futures::StreamExt;
use gworker_client::{shell, Client, CreateOptions, Error, ErrorCode, ExecOptions, Sandbox};

fn busybox(cmd: Vec<String>) -> CreateOptions {
    CreateOptions {
        cmd,
        image: Some("busybox".into()),
        timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    }
}

async fn idle(client: &Client) -> Sandbox {
    Sandbox::create(client, busybox(vec![]))
        .await
        .expect("create idle sandbox")
}

#[tokio::test]
async fn create_wait_poll_and_exit_code() {
    let d = daemon_or_skip!();
    let c = d.client();
    let sb = Sandbox::create(&c, busybox(shell("sleep 1; echo done; exit 7")))
        .await
        .unwrap();
    assert!(sb.id().starts_with("sb-"), "{}", sb.id());
    assert_eq!(sb.poll().await.unwrap(), None, "still running");
    assert_eq!(sb.wait(None).await.unwrap(), 7);
    assert_eq!(sb.poll().await.unwrap(), Some(7));
    assert_eq!(sb.stdout().read_to_string().await.unwrap(), "done\n");
    let info = sb.info().await.unwrap();
    assert_eq!(info.state, gworker_client::api::SandboxState::Exited);
    assert_eq!(info.exit_code, Some(7));
    assert_eq!(info.image, "busybox");
    sb.terminate().await.unwrap();
}

#[tokio::test]
async fn exec_output_env_workdir_and_shared_fs() {
    let d = daemon_or_skip!();
    let c = d.client();
    let sb = idle(&c).await;

    let p = sb
        .exec(ExecOptions::new(shell("echo out; echo err >&2; exit 5")))
        .await
        .unwrap();
    assert!(p.id() > 0);
    let (out, err) = tokio::join!(p.stdout().read_to_string(), p.stderr().read_to_string());
    assert_eq!(out.unwrap(), "out\n");
    assert_eq!(err.unwrap(), "err\n");
    assert_eq!(p.wait(None).await.unwrap(), 5);
    assert_eq!(p.poll().await.unwrap(), Some(5));

    let p = sb
        .exec(ExecOptions {
            cmd: shell("echo $GREETING; pwd"),
            env: BTreeMap::from([("GREETING".to_string(), "hej".to_string())]),
            workdir: Some("/tmp".into()),
        })
        .await
        .unwrap();
    assert_eq!(p.stdout().read_to_string().await.unwrap(), "hej\n/tmp\n");
    assert_eq!(p.wait(None).await.unwrap(), 0);

    // Execs share the filesystem.
    let w = sb
        .exec(ExecOptions::new(shell("echo shared > /tmp/f")))
        .await
        .unwrap();
    assert_eq!(w.wait(None).await.unwrap(), 0);
    let r = sb.exec(ExecOptions::new(["cat", "/tmp/f"])).await.unwrap();
    assert_eq!(r.stdout().read_to_string().await.unwrap(), "shared\n");

    let procs = sb.processes().await.unwrap();
    assert!(
        procs.iter().any(|p| p.cmd == ["cat", "/tmp/f"]),
        "{procs:?}"
    );

    // A signal ends a process with 128+N.
    let s = sb.exec(ExecOptions::new(["sleep", "60"])).await.unwrap();
    s.signal(15).await.unwrap();
    assert_eq!(
        s.wait(Some(Duration::from_secs(20))).await.unwrap(),
        128 + 15
    );

    match sb.exec(ExecOptions::new(["/no/such/program"])).await {
        Err(Error::Api {
            code: ErrorCode::CommandNotFound,
            status: 404,
            ..
        }) => {}
        other => panic!("expected command_not_found, got {other:?}"),
    }
    sb.terminate().await.unwrap();
}

#[tokio::test]
async fn stdin_round_trip() {
    let d = daemon_or_skip!();
    let c = d.client();
    // The entry command's stdin, written while the sandbox may still be starting.
    let sb = Sandbox::create(
        &c,
        busybox(shell("read a; read b; echo \"got:$b:$a\"; exit 3")),
    )
    .await
    .unwrap();
    sb.stdin().write("first\n").await.unwrap();
    sb.stdin().write(&b"second\n"[..]).await.unwrap();
    assert_eq!(
        sb.stdout().read_to_string().await.unwrap(),
        "got:second:first\n"
    );
    assert_eq!(sb.wait(None).await.unwrap(), 3);

    // An exec'd process: bytes through `cat` and back, EOF on close.
    let sb = idle(&c).await;
    let p = sb
        .exec(ExecOptions::new(shell("cat; echo eof")))
        .await
        .unwrap();
    let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let reader = tokio::spawn(p.stdout().read_to_end());
    p.write_stdin(data.clone()).await.unwrap();
    p.close_stdin().await.unwrap();
    let out = reader.await.unwrap().unwrap();
    assert_eq!(out.len(), data.len() + 4);
    assert_eq!(&out[..data.len()], &data[..]);
    assert_eq!(&out[data.len()..], b"eof\n");
    assert_eq!(p.wait(None).await.unwrap(), 0);
    sb.terminate().await.unwrap();
}

#[tokio::test]
async fn lookup_terminate_and_not_found() {
    let d = daemon_or_skip!();
    let c = d.client();
    let sb = idle(&c).await;
    let again = Sandbox::lookup(&c, sb.id()).await.unwrap();
    assert_eq!(again.id(), sb.id());
    let p = again
        .exec(ExecOptions::new(["echo", "via lookup"]))
        .await
        .unwrap();
    assert_eq!(p.stdout().read_to_string().await.unwrap(), "via lookup\n");

    sb.terminate().await.unwrap();
    sb.terminate().await.unwrap(); // idempotent
    match Sandbox::lookup(&c, sb.id()).await {
        Err(Error::NotFound { message }) => assert!(message.contains(sb.id()), "{message}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(matches!(
        sb.exec(ExecOptions::new(["true"])).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        Sandbox::lookup(&c, "sb-00000000000000000000000000000000").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        Sandbox::lookup(&c, "no such/id").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(sb.snapshot().await, Err(Error::NotFound { .. })));

    let live = idle(&c).await;
    // Snapshots are being built: either refused as not supported, or a real one of this sandbox.
    match live.snapshot().await {
        Err(Error::Api {
            code: ErrorCode::NotSupported,
            status: 400,
            ..
        }) => {}
        Ok(snap) => {
            assert!(!snap.id().is_empty());
            assert_eq!(
                snap.info().map(|i| i.source_sandbox_id.as_str()),
                Some(live.id())
            );
        }
        other => panic!("expected not_supported or a snapshot, got {other:?}"),
    }
    live.terminate().await.unwrap();
}

#[tokio::test]
async fn wait_timeouts() {
    let d = daemon_or_skip!();
    let c = d.client();
    let sb = Sandbox::create(&c, busybox(vec!["sleep".into(), "30".into()]))
        .await
        .unwrap();
    let t = Instant::now();
    match sb.wait(Some(Duration::from_millis(700))).await {
        Err(Error::Timeout { after }) => assert_eq!(after, Duration::from_millis(700)),
        other => panic!("expected Timeout, got {other:?}"),
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(matches!(
        sb.entry().wait(Some(Duration::ZERO)).await,
        Err(Error::Timeout { .. })
    ));
    assert_eq!(sb.poll().await.unwrap(), None);

    // The sandbox's own timeout kills it: 137, reason "timeout".
    let short = Sandbox::create(
        &c,
        CreateOptions {
            timeout: Some(Duration::from_secs(2)),
            ..busybox(shell("echo up; sleep 60"))
        },
    )
    .await
    .unwrap();
    assert_eq!(short.stdout().read_to_string().await.unwrap(), "up\n");
    assert_eq!(
        short.wait(Some(Duration::from_secs(30))).await.unwrap(),
        137
    );
    assert_eq!(
        short.info().await.unwrap().reason.as_deref(),
        Some("timeout")
    );
    sb.terminate().await.unwrap();
}

#[tokio::test]
async fn output_streams_as_it_is_produced() {
    let d = daemon_or_skip!();
    let c = d.client();
    let sb = idle(&c).await;
    let p = sb
        .exec(ExecOptions::new(shell("echo first; sleep 3; echo second")))
        .await
        .unwrap();
    let t = Instant::now();
    let mut out = p.stdout();
    let first = out.next().await.unwrap().unwrap();
    let first_at = t.elapsed();
    assert_eq!(&first[..], b"first\n");
    assert!(
        first_at < Duration::from_millis(2500),
        "first line after {first_at:?}"
    );
    assert_eq!(
        p.poll().await.unwrap(),
        None,
        "the process is still running when its first line arrives"
    );
    let mut rest = Vec::new();
    while let Some(chunk) = out.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, b"second\n");
    assert_eq!(out.offset(), 13);
    assert_eq!(p.wait(None).await.unwrap(), 0);
    // A later reader, from an offset, gets the tail again.
    assert_eq!(p.stdout_from(6).read_to_string().await.unwrap(), "second\n");
    sb.terminate().await.unwrap();
}

#[tokio::test]
async fn stream_resumes_across_daemon_restart() {
    let mut d = daemon_or_skip!();
    let c = d.client();
    const N: usize = 80;
    let script =
        format!("i=0; while [ $i -lt {N} ]; do echo line$i; i=$((i+1)); sleep 0.05; done; exit 4");
    let sb = Sandbox::create(&c, busybox(shell(script))).await.unwrap();
    let mut out = sb.stdout();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("line10\n") {
        got.extend_from_slice(&out.next().await.expect("stream ended early").unwrap());
    }
    let t = Instant::now();
    d.kill9();
    std::thread::sleep(Duration::from_millis(500));
    d.restart();
    let restart = t.elapsed();
    while let Some(chunk) = out.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    let expected: String = (0..N).map(|i| format!("line{i}\n")).collect();
    assert_eq!(
        String::from_utf8(got).unwrap(),
        expected,
        "every line exactly once, in order"
    );
    eprintln!("daemon down for {restart:?}; stream resumed at the right offset");
    // The same client (its pooled connections died with the daemon) keeps working.
    assert_eq!(sb.wait(None).await.unwrap(), 4);
    let p = Sandbox::lookup(&c, sb.id()).await.unwrap();
    assert_eq!(p.poll().await.unwrap(), Some(4));
}

#[tokio::test]
async fn wait_survives_daemon_restart() {
    let mut d = daemon_or_skip!();
    let c = d.client();
    let sb = Sandbox::create(&c, busybox(shell("sleep 3; exit 9")))
        .await
        .unwrap();
    let waiter = tokio::spawn({
        let sb = sb.clone();
        async move { sb.wait(None).await }
    });
    // Restart once the sandbox runs (its supervisor exists): on a fresh
    // machine the first create also builds the busybox image.
    let start = std::time::Instant::now();
    while sb.info().await.unwrap().state != gworker_client::api::SandboxState::Running {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "sandbox never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.restart();
    assert_eq!(waiter.await.unwrap().unwrap(), 9);
}

#[tokio::test]
async fn daemon_not_running_is_unavailable() {
    // No daemon needed: a socket nobody listens on.
    let c = Client::new("unix:///nonexistent/gworker-test.sock", None).unwrap();
    let e = c.health().await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("unix:///nonexistent/gworker-test.sock") && msg.contains("gworker serve"),
        "{msg}"
    );
    let e = Sandbox::lookup(&c, "sb-x").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }));
    assert!(Client::new("ftp://x", None).is_err());
}

#[tokio::test]
async fn tcp_with_bearer_token() {
    let d = match common::Daemon::start_tcp() {
        Some(d) => d,
        None => {
            eprintln!("skipping: runsc (gVisor) is not installed");
            return;
        }
    };
    let (url, token) = d.tcp.clone().unwrap();
    let c = Client::new(&url, Some(&token)).unwrap();
    assert_eq!(c.health().await.unwrap().status, "ok");
    let sb = Sandbox::create(&c, busybox(shell("echo over tcp; exit 6")))
        .await
        .unwrap();
    assert_eq!(sb.stdout().read_to_string().await.unwrap(), "over tcp\n");
    assert_eq!(sb.wait(None).await.unwrap(), 6);

    let wrong = Client::new(&url, Some("not-the-token")).unwrap();
    match Sandbox::list(&wrong).await {
        Err(Error::Api {
            code: ErrorCode::Unauthorized,
            status: 401,
            ..
        }) => {}
        other => panic!("expected unauthorized, got {other:?}"),
    }
    let none = Client::new(&url, None).unwrap();
    assert!(matches!(
        Sandbox::lookup(&none, sb.id()).await,
        Err(Error::Api {
            code: ErrorCode::Unauthorized,
            ..
        })
    ));
}
