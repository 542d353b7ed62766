//! [`Sandbox`] and [`Process`]: the spec's `Sandbox` / `SandboxProcess` in
//! Rust idioms, over [`Client`]. Waits loop over the server's 60 s cap and
//! ride out a daemon restart; everything else is one request.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gworker_api::{ErrorCode, ProcessState, SandboxState};
use hyper::Method;

use crate::client::{seg, Client};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::stream::{OutputStream, StreamKind, RESUME_WINDOW};

/// Options of [`Sandbox::create`]. Every field is optional.
///
/// ```no_run
/// # async fn f(client: &gworker_client::Client) -> gworker_client::Result<()> {
/// use gworker_client::{CreateOptions, Sandbox};
/// let sb = Sandbox::create(client, CreateOptions {
///     cmd: vec!["echo".into(), "hi".into()],
///     image: Some("busybox".into()),
///     ..Default::default()
/// }).await?;
/// assert_eq!(sb.stdout().read_to_string().await?, "hi\n");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The entry command's argv; empty keeps the sandbox idle until its
    /// timeout or `terminate()`. See [`shell`] for a shell command line.
    pub cmd: Vec<String>,
    /// The image: a name (`busybox`, `debian-slim` — the daemon's default —,
    /// a tag or an image ID; `Some("busybox".into())`) is used as is; any
    /// other [`Image`] is built first (see [`quiet_build`](Self::quiet_build)).
    pub image: Option<Image>,
    /// Build `image` without printing its progress to stderr.
    pub quiet_build: bool,
    /// Lifetime of the sandbox (daemon default 300 s, at most 24 h).
    pub timeout: Option<Duration>,
    pub env: BTreeMap<String, String>,
    /// Absolute working directory; created if missing.
    pub workdir: Option<String>,
    /// Start from this snapshot instead of a cold start.
    pub snapshot: Option<SandboxSnapshot>,
    /// Secrets, applied in order over the image's environment (`env` wins);
    /// see [`crate::Secret`].
    pub secrets: Vec<crate::Secret>,
    /// Volumes by absolute mount path; see [`crate::Volume::mount`].
    pub volumes: BTreeMap<String, gworker_api::VolumeRef>,
    /// CPU limit in cores (daemon default if `None`).
    pub cpu: Option<f64>,
    /// Memory limit in MiB (daemon default if `None`).
    pub memory: Option<u64>,
    /// Process limit (daemon default if `None`).
    pub max_processes: Option<u64>,
    /// Loopback only (no network at all).
    pub block_network: bool,
    /// Outbound only to these IPv4 CIDRs (plus DNS).
    pub cidr_allowlist: Option<Vec<String>>,
}

/// Options of [`Sandbox::exec`].
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// The argv; must not be empty.
    pub cmd: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Absolute working directory (default: the sandbox's).
    pub workdir: Option<String>,
}

impl ExecOptions {
    pub fn new<I, S>(cmd: I) -> ExecOptions
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecOptions {
            cmd: cmd.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// `["/bin/sh", "-c", line]`: how a single command string is run.
pub fn shell(line: impl Into<String>) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), line.into()]
}

/// A memory checkpoint of a sandbox ([`Sandbox::snapshot`]); pass it as
/// [`CreateOptions::snapshot`] to start a sandbox from it.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxSnapshot {
    id: String,
    info: Option<gworker_api::Snapshot>,
}

impl SandboxSnapshot {
    /// A snapshot known only by its id (e.g. saved from an earlier run).
    pub fn from_id(id: impl Into<String>) -> SandboxSnapshot {
        SandboxSnapshot {
            id: id.into(),
            info: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The daemon's description, when this handle came from [`Sandbox::snapshot`].
    pub fn info(&self) -> Option<&gworker_api::Snapshot> {
        self.info.as_ref()
    }

    /// Looks a snapshot up (`Error::NotFound` if it does not exist).
    pub async fn fetch(client: &Client, id: &str) -> Result<SandboxSnapshot> {
        let info: gworker_api::Snapshot = client
            .get_json(&format!("/v1/snapshots/{}", crate::client::seg(id)))
            .await?;
        Ok(SandboxSnapshot {
            id: info.snapshot_id.clone(),
            info: Some(info),
        })
    }

    /// Every snapshot the daemon keeps, oldest first.
    pub async fn list(client: &Client) -> Result<Vec<gworker_api::Snapshot>> {
        let l: gworker_api::SnapshotList = client.get_json("/v1/snapshots").await?;
        Ok(l.snapshots)
    }

    /// Deletes the snapshot's files; sandboxes restored from it go on.
    pub async fn delete(&self, client: &Client) -> Result<()> {
        client
            .call(
                hyper::Method::DELETE,
                &format!("/v1/snapshots/{}", crate::client::seg(&self.id)),
                None,
            )
            .await
    }
}

/// A sandbox on the daemon. Dropping the handle does not terminate it.
#[derive(Debug, Clone)]
pub struct Sandbox {
    client: Client,
    id: String,
}

impl Sandbox {
    /// Starts a sandbox running `opts.cmd`. Returns at once (the sandbox may
    /// still be starting); use [`wait`](Self::wait) or [`poll`](Self::poll).
    /// An image that is more than a name is built first (cached steps are
    /// not run again), which is what a failed build's [`Error::Build`] comes from.
    pub async fn create(client: &Client, opts: CreateOptions) -> Result<Sandbox> {
        let image = match opts.image {
            None => None,
            Some(image) => Some(match image.name() {
                Some(name) => name.to_string(),
                None if opts.quiet_build => image.build_with(client, None, |_| {}).await?.image_id,
                None => image.build(client).await?.image_id,
            }),
        };
        let body = gworker_api::CreateSandbox {
            cmd: Some(opts.cmd),
            image,
            timeout: opts.timeout.map(|d| d.as_secs_f64()),
            env: (!opts.env.is_empty()).then_some(opts.env),
            workdir: opts.workdir,
            secrets: (!opts.secrets.is_empty())
                .then(|| opts.secrets.into_iter().map(|s| s.0).collect()),
            volumes: (!opts.volumes.is_empty()).then_some(opts.volumes),
            snapshot: opts
                .snapshot
                .map(|s| gworker_api::SnapshotRef { snapshot_id: s.id }),
            cpu: opts.cpu,
            memory: opts.memory,
            max_processes: opts.max_processes,
            block_network: opts.block_network.then_some(true),
            cidr_allowlist: opts.cidr_allowlist,
        };
        let sb: gworker_api::Sandbox = client.post_json("/v1/sandboxes", &body).await?;
        Ok(Sandbox {
            client: client.clone(),
            id: sb.sandbox_id,
        })
    }

    /// Resolves a sandbox by id, e.g. to reconnect later. [`Error::NotFound`]
    /// if it is unknown or was terminated.
    pub async fn lookup(client: &Client, id: &str) -> Result<Sandbox> {
        let sb: gworker_api::Sandbox = client
            .get_json(&format!("/v1/sandboxes/{}", seg(id)))
            .await?;
        Ok(Sandbox {
            client: client.clone(),
            id: sb.sandbox_id,
        })
    }

    /// A handle on sandbox `id` without asking the daemon whether it exists
    /// (the first call on it answers [`Error::NotFound`] if it does not).
    pub fn from_id(client: &Client, id: impl Into<String>) -> Sandbox {
        Sandbox {
            client: client.clone(),
            id: id.into(),
        }
    }

    /// Every sandbox the daemon knows (running, and exited ones still retained).
    pub async fn list(client: &Client) -> Result<Vec<gworker_api::Sandbox>> {
        let l: gworker_api::SandboxList = client.get_json("/v1/sandboxes").await?;
        Ok(l.sandboxes)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn path(&self) -> String {
        format!("/v1/sandboxes/{}", seg(&self.id))
    }

    /// The daemon's current description of the sandbox.
    pub async fn info(&self) -> Result<gworker_api::Sandbox> {
        self.client.get_json(&self.path()).await
    }

    /// Runs another command in the sandbox (same filesystem and process namespace).
    pub async fn exec(&self, opts: ExecOptions) -> Result<Process> {
        let body = gworker_api::Exec {
            cmd: opts.cmd,
            env: (!opts.env.is_empty()).then_some(opts.env),
            workdir: opts.workdir,
        };
        let p: gworker_api::Process = self
            .client
            .post_json(&format!("{}/exec", self.path()), &body)
            .await?;
        Ok(Process {
            client: self.client.clone(),
            sandbox_id: self.id.clone(),
            id: p.process_id,
        })
    }

    /// Blocks until the entry command exits and returns its exit code (128+N
    /// when killed by signal N). [`Error::Timeout`] if `timeout` elapses first.
    pub async fn wait(&self, timeout: Option<Duration>) -> Result<i32> {
        match wait_loop(
            &self.client,
            &format!("{}/wait", self.path()),
            timeout,
            None,
        )
        .await?
        {
            Some(code) => Ok(code),
            None => Err(self.failure().await),
        }
    }

    /// The entry command's exit code if it has finished, else `None`.
    pub async fn poll(&self) -> Result<Option<i32>> {
        let info = self.info().await?;
        match (info.state, info.exit_code) {
            (SandboxState::Exited, Some(code)) => Ok(Some(code)),
            (SandboxState::Exited, None) => Err(failure_of(&info)),
            _ => Ok(None),
        }
    }

    /// Stops the sandbox and removes it. Idempotent: terminating an unknown
    /// or already terminated sandbox is not an error.
    pub async fn terminate(&self) -> Result<()> {
        match self.client.call(Method::DELETE, &self.path(), None).await {
            Err(Error::NotFound { .. }) => Ok(()),
            r => r,
        }
    }

    /// Captures a memory checkpoint of the running sandbox.
    pub async fn snapshot(&self) -> Result<SandboxSnapshot> {
        let resp = self
            .client
            .send(Method::POST, &format!("{}/snapshot", self.path()), None)
            .await?;
        let info: gworker_api::Snapshot = self.client.read_json(resp).await?;
        Ok(SandboxSnapshot {
            id: info.snapshot_id.clone(),
            info: Some(info),
        })
    }

    /// The entry command and every exec'd process.
    pub async fn processes(&self) -> Result<Vec<gworker_api::Process>> {
        let l: gworker_api::ProcessList = self
            .client
            .get_json(&format!("{}/processes", self.path()))
            .await?;
        Ok(l.processes)
    }

    /// A handle on the entry command (process 0).
    pub fn entry(&self) -> Process {
        self.process(0)
    }

    /// A handle on process `pid` of this sandbox (not checked).
    pub fn process(&self, pid: u32) -> Process {
        Process {
            client: self.client.clone(),
            sandbox_id: self.id.clone(),
            id: pid,
        }
    }

    /// The entry command's stdout.
    pub fn stdout(&self) -> OutputStream {
        self.entry().stdout()
    }

    /// The entry command's stderr.
    pub fn stderr(&self) -> OutputStream {
        self.entry().stderr()
    }

    /// The entry command's stdin.
    pub fn stdin(&self) -> Stdin {
        self.entry().stdin()
    }

    /// The error for a sandbox that ended without an exit code (it failed to start).
    async fn failure(&self) -> Error {
        match self.info().await {
            Ok(info) => failure_of(&info),
            Err(e) => e,
        }
    }
}

fn failure_of(info: &gworker_api::Sandbox) -> Error {
    Error::Api {
        code: ErrorCode::SandboxStartingFailed,
        status: ErrorCode::SandboxStartingFailed.status(),
        message: info.message.clone().unwrap_or_else(|| {
            format!(
                "sandbox {} ended without an exit code ({})",
                info.sandbox_id,
                info.reason.as_deref().unwrap_or("no reason given")
            )
        }),
    }
}

/// Rides out what the daemon answers for the entry process (0) of a sandbox
/// that is still starting (`not_found`, sometimes `sandbox_not_running`):
/// process 0 is not addressable until the sandbox runs. A few more tries
/// once the state says `running` cover the transition between the failed
/// request and the state check.
#[derive(Default)]
pub(crate) struct EntryGate {
    retries_after_start: u32,
}

impl EntryGate {
    pub(crate) async fn should_retry(
        &mut self,
        client: &Client,
        sandbox_id: &str,
        pid: u32,
        err: &Error,
    ) -> bool {
        let entry_not_ready = err.is_not_found()
            || matches!(
                err,
                Error::Api {
                    code: ErrorCode::SandboxNotRunning,
                    ..
                }
            );
        if pid != 0 || !entry_not_ready {
            return false;
        }
        let state = client
            .get_json::<gworker_api::Sandbox>(&format!("/v1/sandboxes/{}", seg(sandbox_id)))
            .await;
        let retry = match state {
            Ok(sb) if sb.state == SandboxState::Starting => true,
            Ok(sb) if sb.state == SandboxState::Running && self.retries_after_start < 3 => {
                self.retries_after_start += 1;
                true
            }
            _ => false,
        };
        if retry {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        retry
    }
}

/// Loops `GET {path}?timeout=` until an exit code, the caller's deadline, or
/// an error; waits out a daemon restart for up to [`RESUME_WINDOW`].
/// `entry_of`: the sandbox id when `path` is process 0's (not addressable
/// while the sandbox starts).
async fn wait_loop(
    client: &Client,
    path: &str,
    timeout: Option<Duration>,
    entry_of: Option<&str>,
) -> Result<Option<i32>> {
    let start = Instant::now();
    let mut gate = EntryGate::default();
    let deadline = timeout.map(|t| start + t);
    let mut broken_since: Option<Instant> = None;
    loop {
        let secs = match deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .as_secs_f64()
                .min(gworker_api::MAX_WAIT_SECS),
            None => gworker_api::MAX_WAIT_SECS,
        };
        let err = match client
            .get_json::<gworker_api::WaitResult>(&format!("{path}?timeout={secs:.3}"))
            .await
        {
            Ok(r) => return Ok(r.exit_code),
            Err(e) => e,
        };
        let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        match err {
            Error::Api {
                code: ErrorCode::WaitTimeout,
                ..
            } => {
                broken_since = None;
            }
            Error::NotFound { .. } if entry_of.is_some() && !timed_out => {
                if !gate
                    .should_retry(client, entry_of.unwrap_or_default(), 0, &err)
                    .await
                {
                    return Err(err);
                }
            }
            Error::Unavailable { .. } if !timed_out => {
                if broken_since.get_or_insert_with(Instant::now).elapsed() >= RESUME_WINDOW {
                    return Err(err);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            e => return Err(e),
        }
        if timed_out {
            return Err(Error::Timeout {
                after: timeout.unwrap_or_default(),
            });
        }
    }
}

/// A process in a sandbox: the entry command (id 0) or an exec'd one.
#[derive(Debug, Clone)]
pub struct Process {
    client: Client,
    sandbox_id: String,
    id: u32,
}

impl Process {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    fn path(&self) -> String {
        format!(
            "/v1/sandboxes/{}/processes/{}",
            seg(&self.sandbox_id),
            self.id
        )
    }

    /// Runs `f` and, for the entry process of a sandbox still starting,
    /// retries it until the sandbox runs (the daemon answers `not_found`
    /// meanwhile).
    async fn entry_retry<T, F, Fut>(&self, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut gate = EntryGate::default();
        loop {
            match f().await {
                Err(e)
                    if gate
                        .should_retry(&self.client, &self.sandbox_id, self.id, &e)
                        .await => {}
                r => return r,
            }
        }
    }

    /// The daemon's current description of the process.
    pub async fn info(&self) -> Result<gworker_api::Process> {
        self.client.get_json(&self.path()).await
    }

    /// Blocks until the process exits; [`Error::Timeout`] if `timeout` elapses first.
    pub async fn wait(&self, timeout: Option<Duration>) -> Result<i32> {
        let entry_of = (self.id == 0).then_some(self.sandbox_id.as_str());
        match wait_loop(
            &self.client,
            &format!("{}/wait", self.path()),
            timeout,
            entry_of,
        )
        .await?
        {
            Some(code) => Ok(code),
            None => Err(Error::Protocol(format!(
                "process {} ended without an exit code",
                self.id
            ))),
        }
    }

    /// The exit code if the process has finished, else `None`.
    pub async fn poll(&self) -> Result<Option<i32>> {
        let p = self.info().await?;
        Ok(match p.state {
            ProcessState::Exited => p.exit_code,
            ProcessState::Running => None,
        })
    }

    /// The process's stdout from its beginning.
    pub fn stdout(&self) -> OutputStream {
        self.stdout_from(0)
    }

    pub fn stderr(&self) -> OutputStream {
        self.stderr_from(0)
    }

    /// The process's stdout from byte `offset` on.
    pub fn stdout_from(&self, offset: u64) -> OutputStream {
        OutputStream::new(
            self.client.clone(),
            self.sandbox_id.clone(),
            self.id,
            StreamKind::Stdout,
            offset,
        )
    }

    pub fn stderr_from(&self, offset: u64) -> OutputStream {
        OutputStream::new(
            self.client.clone(),
            self.sandbox_id.clone(),
            self.id,
            StreamKind::Stderr,
            offset,
        )
    }

    /// Hands `data` to the process's stdin (returns once the sandbox has it).
    pub async fn write_stdin(&self, data: impl Into<Bytes>) -> Result<()> {
        let data = data.into();
        let path = format!("{}/stdin", self.path());
        self.entry_retry(|| {
            self.client.call(
                Method::POST,
                &path,
                Some((data.clone(), "application/octet-stream")),
            )
        })
        .await
    }

    /// Ends the process's input (it reads EOF).
    pub async fn close_stdin(&self) -> Result<()> {
        let path = format!("{}/stdin/close", self.path());
        self.entry_retry(|| self.client.call(Method::POST, &path, None))
            .await
    }

    /// Sends signal `signal` (e.g. 15 for SIGTERM) to the process.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        let path = format!("{}/signal", self.path());
        let body = serde_json::to_vec(&gworker_api::Signal { signal }).expect("a Signal encodes");
        let body = Bytes::from(body);
        self.entry_retry(|| {
            self.client.call(
                Method::POST,
                &path,
                Some((body.clone(), "application/json")),
            )
        })
        .await
    }

    /// A writer-like handle on stdin.
    pub fn stdin(&self) -> Stdin {
        Stdin {
            process: self.clone(),
        }
    }
}

/// A process's stdin.
#[derive(Debug, Clone)]
pub struct Stdin {
    process: Process,
}

impl Stdin {
    pub async fn write(&self, data: impl Into<Bytes>) -> Result<()> {
        self.process.write_stdin(data).await
    }

    pub async fn close(&self) -> Result<()> {
        self.process.close_stdin().await
    }
}
