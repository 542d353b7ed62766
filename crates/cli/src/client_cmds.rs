//! Client commands (`gworker sandbox ...`), through the Rust client crate.
//! Parsing and printing only: every request goes through `gworker-client`.
//!
//! Exit codes: 0 on success; the process's own code for `exec` and `wait`;
//! 124 when `wait --timeout` elapses; 127/126 when `exec` cannot find/start
//! the program; 1 for every other error (message on stderr).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use gworker_client::api::{Sandbox as SandboxInfo, SandboxState};
use gworker_client::{Client, CreateOptions, Error, ErrorCode, ExecOptions, OutputStream, Sandbox};
use tokio::io::AsyncWriteExt;

/// How to reach the daemon (every `sandbox` command takes these).
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Daemon URL: unix:///path/to.sock or http://host:port [default: the daemon's default socket].
    /// Over TCP the token comes from GWORKER_TOKEN.
    #[arg(long, env = "GWORKER_URL", value_name = "URL")]
    url: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// Start a sandbox and print its ID (returns at once; see `wait`).
    ///
    /// Without a command the sandbox idles until its timeout or `terminate`,
    /// ready for `exec`.
    ///
    /// Example: gworker sandbox create --image busybox -- sh -c 'echo hi'
    Create(CreateArgs),
    /// Run a command in a sandbox, streaming its output; exits with its exit code.
    ///
    /// Standard input is forwarded when it is not a terminal (closed at EOF);
    /// from a terminal the command gets an empty input.
    ///
    /// Example: echo hi | gworker sandbox exec ID -- cat
    Exec(ExecArgs),
    /// Wait for a sandbox's entry command to exit; print its exit code and exit with it.
    ///
    /// Exits 124 (message on stderr) when --timeout elapses first.
    Wait(WaitArgs),
    /// Print the entry command's exit code, or `running`.
    Poll(IdArgs),
    /// List sandboxes (running, and exited ones still retained).
    Ls(LsArgs),
    /// Print the entry command's output (stdout, or stderr with --stderr).
    ///
    /// Without --follow, prints what the command has written so far and
    /// returns; with it, streams until the command closes the stream.
    Logs(LogsArgs),
    /// Stop a sandbox and remove it.
    #[command(visible_alias = "rm")]
    Terminate(IdArgs),
    /// Show a sandbox's details.
    Info(InfoArgs),
    /// Take a memory snapshot of a running sandbox (it keeps running) and
    /// print the snapshot's ID; restore it with the API's `snapshot` field.
    Snapshot(InfoArgs),
}

/// `gworker snapshot ...`
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// List snapshots.
    Ls(LsArgs),
    /// Delete a snapshot (sandboxes restored from it are not affected).
    Rm(IdArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Image: busybox, debian-slim, a tag, an image ID, or a TOML image
    /// description (FILE.toml, see `gworker image build --help`), built
    /// first with its progress on stderr [default: the daemon's, debian-slim].
    #[arg(long, value_name = "NAME|FILE")]
    image: Option<String>,
    /// Seconds until the sandbox is killed [default: 300; at most 86400].
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
    /// Environment variable for the entry command and every exec (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Absolute working directory (created if missing).
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    /// A stored secret whose values become environment variables (repeatable, applied in order; --env wins).
    #[arg(long = "secret", value_name = "NAME")]
    secrets: Vec<String>,
    /// Mount a volume read-write at an absolute path (repeatable).
    #[arg(long = "volume", short = 'v', value_name = "PATH=NAME", value_parser = parse_env)]
    volumes: Vec<(String, String)>,
    /// CPU limit in cores, fractional [default: the daemon's].
    #[arg(long, value_name = "CORES")]
    cpu: Option<f64>,
    /// Memory limit in MiB for the whole sandbox [default: the daemon's, 2048].
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// Most processes and threads inside the sandbox [default: the daemon's].
    #[arg(long, value_name = "N")]
    max_processes: Option<u64>,
    /// No network at all: loopback only [default: the internet, never this
    /// host, its networks or other sandboxes].
    #[arg(long, conflicts_with = "cidr_allow")]
    block_network: bool,
    /// Allow outbound traffic only to this IPv4 CIDR (repeatable; DNS stays allowed).
    #[arg(long, value_name = "CIDR")]
    cidr_allow: Vec<String>,
    /// Print the sandbox as JSON instead of its ID.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
    /// The entry command and its arguments (after `--`); none: the sandbox idles.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    cmd: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Absolute working directory [default: the sandbox's].
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    #[command(flatten)]
    conn: Conn,
    /// The sandbox ID.
    id: String,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    cmd: Vec<String>,
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    /// Give up after SECS seconds (exit 124) [default: wait forever].
    #[arg(long, value_name = "SECS", value_parser = parse_secs_or_zero)]
    timeout: Option<Duration>,
    #[command(flatten)]
    conn: Conn,
    /// The sandbox ID.
    id: String,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    #[command(flatten)]
    conn: Conn,
    /// The sandbox ID.
    id: String,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Print a JSON array of sandbox objects.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Print the entry command's stderr instead of its stdout.
    #[arg(long)]
    stderr: bool,
    /// Keep streaming until the entry command closes the stream.
    #[arg(long, short = 'f')]
    follow: bool,
    #[command(flatten)]
    conn: Conn,
    /// The sandbox ID.
    id: String,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Print the sandbox as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
    /// The sandbox ID.
    id: String,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected K=V, got {s:?}")),
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("expected a positive number of seconds, got {s:?}")),
    }
}

fn parse_secs_or_zero(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("expected a number of seconds, got {s:?}")),
    }
}

/// A failed command: what to print, and the exit code.
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

pub(crate) type CmdResult = Result<ExitCode, Failure>;

/// Turns a client error into a message for a person; `id`: the sandbox the
/// command was about, so "not found" can name it.
pub(crate) fn fail(e: Error, id: Option<&str>) -> Failure {
    let message = match (&e, id) {
        (Error::NotFound { .. }, Some(id)) => {
            format!("no sandbox {id:?}: it does not exist or was terminated")
        }
        _ => e.to_string(),
    };
    Failure { code: 1, message }
}

pub fn run(cmd: SandboxCmd) -> ExitCode {
    block_on(dispatch(cmd))
}

/// Runs a command's future on a small runtime and turns its failure into a
/// message and an exit code.
pub(crate) fn block_on(fut: impl std::future::Future<Output = CmdResult>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(fut);
    // Do not wait for the stdin reader thread (it may block on a read forever).
    rt.shutdown_background();
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

pub(crate) fn client(conn: &Conn) -> Result<Client, Failure> {
    let r = match &conn.url {
        Some(u) if !u.is_empty() => Client::new(u, std::env::var("GWORKER_TOKEN").ok().as_deref()),
        _ => Client::from_env(),
    };
    r.map_err(|e| fail(e, None))
}

async fn dispatch(cmd: SandboxCmd) -> CmdResult {
    match cmd {
        SandboxCmd::Create(a) => create(a).await,
        SandboxCmd::Exec(a) => exec(a).await,
        SandboxCmd::Wait(a) => wait(a).await,
        SandboxCmd::Poll(a) => poll(a).await,
        SandboxCmd::Ls(a) => ls(a).await,
        SandboxCmd::Logs(a) => logs(a).await,
        SandboxCmd::Terminate(a) => terminate(a).await,
        SandboxCmd::Info(a) => info(a).await,
        SandboxCmd::Snapshot(a) => snapshot(a).await,
    }
}

async fn snapshot(a: InfoArgs) -> CmdResult {
    let c = client(&a.conn)?;
    let snap = Sandbox::from_id(&c, a.id.clone())
        .snapshot()
        .await
        .map_err(|e| fail(e, Some(&a.id)))?;
    match (a.json, snap.info()) {
        (true, Some(info)) => println!("{}", to_json(serde_json::to_value(info))),
        _ => println!("{}", snap.id()),
    }
    Ok(ExitCode::SUCCESS)
}

/// `gworker status`'s arguments.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
    /// Print the daemon's answer (`GET /v1/health`) as JSON.
    #[arg(long)]
    json: bool,
}

/// Whether the daemon answers, its version, and its warm pool per image.
pub fn run_status(a: StatusArgs) -> ExitCode {
    block_on(async move {
        let c = client(&a.conn)?;
        let h = c.health().await.map_err(|e| fail(e, None))?;
        if a.json {
            println!("{}", to_json(serde_json::to_value(&h)));
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "daemon at {}: {} (gworker {})",
            c.url(),
            h.status,
            h.version
        );
        if h.pool.is_empty() {
            println!(
                "warm pool: none (`gworker serve --pool IMAGE=N` keeps N sandboxes booted; \
                 --pool-blocked IMAGE=N, N without a network)"
            );
        } else {
            let rows: Vec<[String; 5]> = h
                .pool
                .iter()
                .map(|p| {
                    [
                        p.image.clone(),
                        p.network.clone(),
                        p.size.to_string(),
                        p.ready.to_string(),
                        p.booting.to_string(),
                    ]
                })
                .collect();
            print_table(["POOL IMAGE", "NETWORK", "SIZE", "READY", "BOOTING"], &rows);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs `gworker snapshot ...`.
pub fn run_snapshot(cmd: SnapshotCmd) -> ExitCode {
    block_on(async move {
        match cmd {
            SnapshotCmd::Ls(a) => {
                let c = client(&a.conn)?;
                let list = gworker_client::SandboxSnapshot::list(&c)
                    .await
                    .map_err(|e| fail(e, None))?;
                if a.json {
                    println!("{}", to_json(serde_json::to_value(&list)));
                } else {
                    println!(
                        "{:<36} {:<36} {:<12} {:>10} {:>9}",
                        "ID", "SOURCE", "IMAGE", "SIZE", "PAUSE"
                    );
                    for s in list {
                        println!(
                            "{:<36} {:<36} {:<12} {:>9}K {:>7.0}ms",
                            s.snapshot_id,
                            s.source_sandbox_id,
                            s.image,
                            s.size_bytes / 1024,
                            s.pause_ms
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            SnapshotCmd::Rm(a) => {
                let c = client(&a.conn)?;
                gworker_client::SandboxSnapshot::from_id(a.id.clone())
                    .delete(&c)
                    .await
                    .map_err(|e| match e {
                        Error::NotFound { .. } => Failure {
                            code: 1,
                            message: format!("no snapshot {:?}", a.id),
                        },
                        e => fail(e, None),
                    })?;
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

async fn create(a: CreateArgs) -> CmdResult {
    let image = a
        .image
        .as_deref()
        .map(crate::image_cmds::image_arg)
        .transpose()?;
    let c = client(&a.conn)?;
    let opts = CreateOptions {
        cmd: a.cmd,
        image,
        timeout: a.timeout,
        env: a.env.into_iter().collect::<BTreeMap<_, _>>(),
        workdir: a.workdir,
        secrets: a
            .secrets
            .into_iter()
            .map(gworker_client::Secret::from_name)
            .collect(),
        volumes: a
            .volumes
            .into_iter()
            .map(|(path, name)| {
                let r = gworker_client::api::VolumeRef {
                    name,
                    create_if_missing: false,
                };
                (path, r)
            })
            .collect(),
        cpu: a.cpu,
        memory: a.memory,
        max_processes: a.max_processes,
        block_network: a.block_network,
        cidr_allowlist: (!a.cidr_allow.is_empty()).then_some(a.cidr_allow),
        ..Default::default()
    };
    let sb = Sandbox::create(&c, opts)
        .await
        .map_err(crate::image_cmds::failure_with_output)?;
    if a.json {
        let info = sb.info().await.map_err(|e| fail(e, Some(sb.id())))?;
        println!("{}", to_json(serde_json::to_value(&info)));
    } else {
        println!("{}", sb.id());
    }
    Ok(ExitCode::SUCCESS)
}

async fn exec(a: ExecArgs) -> CmdResult {
    let c = client(&a.conn)?;
    let sb = Sandbox::from_id(&c, a.id.clone());
    let opts = ExecOptions {
        cmd: a.cmd,
        env: a.env.into_iter().collect(),
        workdir: a.workdir,
    };
    let p = match sb.exec(opts).await {
        Ok(p) => p,
        Err(e) => {
            let code = match e.code() {
                Some(ErrorCode::CommandNotFound) => 127,
                Some(ErrorCode::ExecFailed | ErrorCode::WorkdirNotFound) => 126,
                _ => 1,
            };
            return Err(Failure {
                code,
                ..fail(e, Some(&a.id))
            });
        }
    };

    let out = tokio::spawn(copy_out(p.stdout(), tokio::io::stdout()));
    let err = tokio::spawn(copy_out(p.stderr(), tokio::io::stderr()));

    if std::io::stdin().is_terminal() {
        // Like `docker exec` without -i: the command reads EOF, not the terminal.
        let _ = p.close_stdin().await;
    } else {
        // A plain thread: a blocking read of our stdin must not hold up exit.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let p = p.clone();
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                // The command may exit without reading everything: that is not our error.
                if p.write_stdin(chunk).await.is_err() {
                    return;
                }
            }
            let _ = p.close_stdin().await;
        });
    }

    let code = p.wait(None).await.map_err(|e| fail(e, Some(&a.id)))?;
    for t in [out, err] {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(fail(e, Some(&a.id))),
            Err(e) => {
                return Err(Failure {
                    code: 1,
                    message: format!("output task failed: {e}"),
                })
            }
        }
    }
    Ok(exit_code(code))
}

/// Copies an output stream to our stdout/stderr as it comes.
async fn copy_out(
    mut s: OutputStream,
    mut w: impl tokio::io::AsyncWrite + Unpin,
) -> gworker_client::Result<()> {
    while let Some(chunk) = s.next_chunk().await {
        let chunk = chunk?;
        // A closed stdout (e.g. `| head`) ends our copy, not the command.
        if w.write_all(&chunk).await.is_err() || w.flush().await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

async fn wait(a: WaitArgs) -> CmdResult {
    let c = client(&a.conn)?;
    let sb = Sandbox::from_id(&c, a.id.clone());
    match sb.wait(a.timeout).await {
        Ok(code) => {
            println!("{code}");
            Ok(exit_code(code))
        }
        Err(Error::Timeout { after }) => Err(Failure {
            code: 124,
            message: format!(
                "sandbox {} is still running after {} s",
                a.id,
                after.as_secs_f64()
            ),
        }),
        Err(e) => Err(fail(e, Some(&a.id))),
    }
}

async fn poll(a: IdArgs) -> CmdResult {
    let c = client(&a.conn)?;
    match Sandbox::from_id(&c, a.id.clone())
        .poll()
        .await
        .map_err(|e| fail(e, Some(&a.id)))?
    {
        Some(code) => println!("{code}"),
        None => println!("running"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn ls(a: LsArgs) -> CmdResult {
    let c = client(&a.conn)?;
    let mut list = Sandbox::list(&c).await.map_err(|e| fail(e, None))?;
    list.sort_by(|x, y| x.created_at.total_cmp(&y.created_at));
    if a.json {
        println!("{}", to_json(serde_json::to_value(&list)));
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_secs();
    let rows: Vec<[String; 6]> = list
        .iter()
        .map(|s| {
            [
                s.sandbox_id.clone(),
                s.image.clone(),
                state_text(s),
                s.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                age(now - s.created_at),
                truncate(&shell_join(&s.cmd), 50),
            ]
        })
        .collect();
    print_table(["ID", "IMAGE", "STATE", "EXIT", "AGE", "CMD"], &rows);
    Ok(ExitCode::SUCCESS)
}

/// Prints a header and rows on stdout, each column as wide as its widest cell.
pub(crate) fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let header = header.map(String::from);
    let mut widths = [0usize; N];
    for r in std::iter::once(&header).chain(rows) {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    for r in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
}

async fn logs(a: LogsArgs) -> CmdResult {
    let c = client(&a.conn)?;
    let sb = Sandbox::from_id(&c, a.id.clone());
    let info = sb.info().await.map_err(|e| fail(e, Some(&a.id)))?;
    if info.entry_process_id.is_none() {
        return Err(Failure {
            code: 1,
            message: format!(
                "sandbox {} has no entry command (it was created idle)",
                a.id
            ),
        });
    }
    let mut stream = if a.stderr { sb.stderr() } else { sb.stdout() };
    let follow = a.follow || info.state == SandboxState::Exited;
    let mut out = tokio::io::stdout();
    loop {
        let next = if follow {
            stream.next_chunk().await
        } else {
            // "So far": what arrives without a pause. The daemon has no
            // "bytes available now" call, so a short quiet spell ends the read.
            tokio::time::timeout(Duration::from_millis(300), stream.next_chunk())
                .await
                .unwrap_or_default()
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| fail(e, Some(&a.id)))?;
        if out.write_all(&chunk).await.is_err() || out.flush().await.is_err() {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn terminate(a: IdArgs) -> CmdResult {
    let c = client(&a.conn)?;
    // terminate() itself is idempotent; the command still says when the ID is unknown.
    let sb = Sandbox::lookup(&c, &a.id)
        .await
        .map_err(|e| fail(e, Some(&a.id)))?;
    sb.terminate().await.map_err(|e| fail(e, Some(&a.id)))?;
    Ok(ExitCode::SUCCESS)
}

async fn info(a: InfoArgs) -> CmdResult {
    let c = client(&a.conn)?;
    let s = Sandbox::from_id(&c, a.id.clone())
        .info()
        .await
        .map_err(|e| fail(e, Some(&a.id)))?;
    if a.json {
        println!("{}", to_json(serde_json::to_value(&s)));
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_secs();
    let mut lines = vec![
        ("id", s.sandbox_id.clone()),
        ("image", s.image.clone()),
        ("state", state_text(&s)),
        (
            "exit code",
            s.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "cmd",
            if s.cmd.is_empty() {
                "(idle)".into()
            } else {
                shell_join(&s.cmd)
            },
        ),
        ("workdir", s.workdir.clone().unwrap_or_else(|| "-".into())),
        ("created", format!("{} ago", age(now - s.created_at))),
        ("timeout", format!("{} s", s.timeout)),
    ];
    if s.state != SandboxState::Exited {
        lines.push(("deadline", format!("in {}", age(s.deadline - now))));
    }
    if let Some(m) = &s.message {
        lines.push(("message", m.clone()));
    }
    for (k, v) in lines {
        println!("{:<10} {v}", format!("{k}:"));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn to_json(v: serde_json::Result<serde_json::Value>) -> String {
    v.and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn state_text(s: &SandboxInfo) -> String {
    let state = match s.state {
        SandboxState::Starting => "starting",
        SandboxState::Running => "running",
        SandboxState::Exited => "exited",
    };
    match s.reason.as_deref() {
        Some(r) if s.state == SandboxState::Exited && r != "exited" => format!("{state} ({r})"),
        _ => state.to_string(),
    }
}

pub(crate) fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(crate) fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The argv as a shell would need it typed (quotes only where needed).
fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_env("nope").is_err());
        assert!(parse_secs("0").is_err());
        assert_eq!(parse_secs("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(
            shell_join(&["sh".into(), "-c".into(), "echo 'x'".into()]),
            r"sh -c 'echo '\''x'\'''"
        );
        assert_eq!(age(3700.0), "1h");
        assert_eq!(truncate("abcdef", 4), "abc…");
    }
}
