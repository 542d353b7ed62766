//! What the daemon and a supervisor say to each other over the supervisor's
//! unix socket: one JSON request line per connection, one JSON answer line,
//! and for `read` a stream of length-prefixed chunks (`u32` LE length, then
//! bytes; length 0 ends the stream cleanly). For `stdin` the request line is
//! followed by exactly `len` raw bytes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything a supervisor needs to start, written by the engine as
/// `launch.json` in the sandbox directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchConfig {
    pub sandbox_id: String,
    pub runsc_bin: PathBuf,
    pub runsc_root: PathBuf,
    pub rootfs: PathBuf,
    pub agent: PathBuf,
    /// The entry command (process id 0); `None` keeps the sandbox idle.
    pub entry: Option<ProcSpec>,
    /// Unix time (seconds) at which the sandbox is killed with reason `timeout`.
    pub deadline: f64,
    /// Restore this checkpoint instead of a cold start (`entry` is then unused).
    #[serde(default)]
    pub restore: Option<RestoreConfig>,
    /// CPU, memory and process limits, enforced through cgroups.
    #[serde(default)]
    pub limits: gworker_runtime::Limits,
    /// A warm-pool slot: boot and wait, with no deadline, until a `Claim`
    /// gives the sandbox its entry command and deadline.
    #[serde(default)]
    pub pooled: bool,
    /// Volumes: host directories bind-mounted read-write.
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// The volume layout of warm slots (see `gworker_runtime::volbind`):
    /// this host directory is mounted at `/.gworker/vols`, and `volumes` are
    /// bound under it as `0`, `1`, … (by a claim for a slot, before runsc
    /// starts for a restore of a slot's snapshot) instead of being mounts
    /// of their own.
    #[serde(default)]
    pub slot_volumes: Option<PathBuf>,
    /// The daemon writes the sandbox's secret environment (JSON list of
    /// `[name, value]`) to this inherited fd; the supervisor reads it once,
    /// before anything else, and keeps it in memory only (never on disk).
    #[serde(default)]
    pub secrets_fd: Option<i32>,
    /// uid and gid the sandbox's processes run as (the image's user); `None`: root.
    #[serde(default)]
    pub user: Option<(u32, u32)>,
    /// The sandbox's network policy; `None` or `Blocked`: loopback only.
    #[serde(default)]
    pub network: Option<gworker_runtime::net::NetPolicy>,
    /// Where network state lives (`gworker_runtime::net`), shared by the daemon's sandboxes.
    #[serde(default)]
    pub net_state_dir: Option<PathBuf>,
}

impl LaunchConfig {
    /// Whether the sandbox has a network namespace of its own.
    pub fn networked(&self) -> bool {
        self.network.as_ref().is_some_and(|p| p.needs_netns())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeMount {
    pub source: PathBuf,
    pub destination: String,
}

/// A checkpoint to restore and the process table that goes with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreConfig {
    pub image_path: PathBuf,
    pub procs: Vec<CheckpointProc>,
    pub next_id: u32,
}

/// A process as it was at checkpoint time, with the flow-control state the
/// restored agent still holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointProc {
    pub id: u32,
    pub argv: Vec<String>,
    pub started_at: f64,
    pub exit_code: Option<i32>,
    /// Credit the agent holds for stdout and stderr.
    pub outstanding: [u64; 2],
    /// Whether stdout and stderr had already ended.
    pub eof: [bool; 2],
}

/// Answer to [`Request::Checkpoint`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub procs: Vec<CheckpointProc>,
    pub next_id: u32,
    /// How long the sandbox's processes were stopped, in milliseconds.
    pub pause_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcSpec {
    pub argv: Vec<String>,
    /// Complete environment, `KEY=VALUE`.
    pub env: Vec<String>,
    pub cwd: String,
    /// Create `cwd` if it is missing.
    pub mkdir_cwd: bool,
    /// Names in `env` that win over the sandbox's secrets (the sandbox's and
    /// the exec's own `env=`); the supervisor applies every other secret over
    /// `env`.
    #[serde(default)]
    pub over_secrets: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StreamName {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Spawn {
        spec: ProcSpec,
    },
    /// Waits for process `id` (or the sandbox when `None`) to exit.
    Wait {
        id: Option<u32>,
        timeout_ms: u64,
    },
    Read {
        id: u32,
        stream: StreamName,
        offset: u64,
    },
    Stdin {
        id: u32,
        len: u64,
    },
    StdinClose {
        id: u32,
    },
    Signal {
        id: u32,
        signo: i32,
    },
    /// Stops the sandbox's container; the sandbox stays inspectable.
    Kill {
        reason: String,
    },
    /// Hands a warm-pool sandbox to its user: its entry command (if any)
    /// starts and its deadline runs from now on. Only once.
    Claim {
        entry: Option<ProcSpec>,
        deadline: f64,
        limits: gworker_runtime::Limits,
        /// The sandbox's secret environment (see `crate::secrets`): a slot
        /// booted without any, so the claim brings them.
        #[serde(default, skip_serializing_if = "SecretEnv::is_empty")]
        secrets: SecretEnv,
        /// The sandbox's network policy, when it is not the one the slot
        /// booted with (both networked): its rules are replaced before
        /// anything runs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<gworker_runtime::net::NetPolicy>,
        /// Volumes to mount before anything runs, through the slot's volume
        /// directory (`LaunchConfig::slot_volumes`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        volumes: Vec<VolumeMount>,
    },
    /// Writes a memory checkpoint to `image_path`; the sandbox goes on running.
    Checkpoint {
        image_path: PathBuf,
    },
    /// Stops everything, removes runsc state, and ends the supervisor.
    Shutdown,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Running,
    Exited,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcStatus {
    pub id: u32,
    pub argv: Vec<String>,
    pub started_at: f64,
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub phase: Phase,
    /// The entry command's exit code (137 when killed at timeout or by terminate).
    pub exit_code: Option<i32>,
    /// `exited`, `timeout`, `failed`, `killed`, `oom`.
    pub reason: Option<String>,
    /// Human-readable detail when the sandbox failed.
    pub message: Option<String>,
    pub exited_at: Option<f64>,
    pub procs: Vec<ProcStatus>,
}

/// Error codes a supervisor answers with; the engine maps them to API errors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SupError {
    pub code: String,
    pub message: String,
}

impl SupError {
    pub fn new(code: &str, message: impl Into<String>) -> SupError {
        SupError {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// One answer line: `{"ok": ...}` or `{"err": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Ok(serde_json::Value),
    Err(SupError),
}

/// Secret environment variables in a request. Its `Debug` names the
/// variables only, so that no log line or panic message can hold a value.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct SecretEnv(pub Vec<(String, String)>);

impl SecretEnv {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| format!("{k}=<redacted>")))
            .finish()
    }
}
