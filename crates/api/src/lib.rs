//! Wire types of the HTTP API, version 1: the one source of truth shared by
//! the daemon, the CLI and the Rust client (the Python client is checked
//! against the OpenAPI document generated from these). Only this crate
//! derives `Serialize` for the wire. See `docs/http-api.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

mod image;
pub use image::*;

pub const API_PREFIX: &str = "/v1";
/// Largest request body the daemon accepts.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Longest a single `wait` request blocks; clients loop for longer waits.
pub const MAX_WAIT_SECS: f64 = 60.0;
/// Header carrying the offset a stream response starts at.
pub const OFFSET_HEADER: &str = "x-gworker-offset";
pub const DEFAULT_TIMEOUT_SECS: f64 = 300.0;
pub const MAX_TIMEOUT_SECS: f64 = 86_400.0;

/// Body of `POST /v1/sandboxes`. Every field is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// The entry command's argv; empty or missing keeps the sandbox idle.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Image: `busybox`, `debian-slim` (the default), a tag, or an image ID
    /// from `POST /v1/images/build`.
    #[serde(default)]
    pub image: Option<String>,
    /// Seconds until the sandbox is killed (default 300, at most 86400).
    #[serde(default)]
    pub timeout: Option<f64>,
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Absolute working directory of the entry command and default for execs; created if missing.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Secrets whose values become environment variables of the entry
    /// command and every exec, applied in order (a later one wins); `env`
    /// wins over all of them. See `docs/secrets.md`.
    #[serde(default)]
    pub secrets: Option<Vec<SecretRef>>,
    /// Named volumes mounted read-write, by absolute path in the sandbox.
    /// See `docs/volumes.md`.
    #[serde(default)]
    pub volumes: Option<BTreeMap<String, VolumeRef>>,
    /// CPU limit in cores, fractional (default and maximum: the daemon's config).
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Memory limit in MiB for the whole sandbox (its processes, files written
    /// to its root filesystem, and gVisor itself). Going over kills the
    /// sandbox with reason `oom`.
    #[serde(default)]
    pub memory: Option<u64>,
    /// Most processes and threads inside the sandbox.
    #[serde(default)]
    pub max_processes: Option<u64>,
    /// Restore this snapshot instead of a cold start: its processes go on
    /// running. `image` may be omitted (it must match the snapshot's).
    #[serde(default)]
    pub snapshot: Option<SnapshotRef>,
    /// No network at all (loopback only). Default: outbound to the
    /// internet, never to the host, its networks or other sandboxes. See
    /// `docs/network.md`.
    #[serde(default)]
    pub block_network: Option<bool>,
    /// Outbound only to these IPv4 CIDRs (`"203.0.113.0/24"`, `"1.2.3.4"`),
    /// plus DNS; the host and other sandboxes stay unreachable even if listed.
    #[serde(default)]
    pub cidr_allowlist: Option<Vec<String>>,
}

/// A secret in a create request: exactly one of `name` (a stored secret) or
/// `values` (used for this sandbox only, never stored).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<BTreeMap<String, String>>,
}

/// A volume in a create request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeRef {
    pub name: String,
    /// Create the volume (without quota) if it does not exist.
    #[serde(default)]
    pub create_if_missing: bool,
}

/// Body of `POST /v1/volumes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 characters.
    pub name: String,
    /// Size limit in bytes (at least 16 MiB): writes beyond it fail with
    /// ENOSPC inside the sandbox. Null: no limit but the host disk.
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    /// Answer 200 with the existing volume instead of 409 `conflict`.
    #[serde(default)]
    pub exist_ok: bool,
}

/// A named, persistent volume.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Volume {
    pub name: String,
    pub created_at: f64,
    pub quota_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeList {
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One entry of a volume listing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VolumeEntry {
    /// Path from the volume's root, without a leading `/`.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    pub size: u64,
    pub mtime: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeListing {
    pub entries: Vec<VolumeEntry>,
}

/// Body of `POST /v1/secrets`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSecret {
    /// `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 characters.
    pub name: String,
    /// Environment variables: names `[A-Za-z_][A-Za-z0-9_]*`, values without NUL.
    pub values: BTreeMap<String, String>,
    /// Replace an existing secret of that name instead of 409 `conflict`.
    #[serde(default)]
    pub overwrite: bool,
}

/// A stored secret as listed: its name only, never its values.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct SecretInfo {
    pub name: String,
    pub created_at: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretList {
    pub secrets: Vec<SecretInfo>,
}

/// A reference to a snapshot in a create request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRef {
    pub snapshot_id: String,
}

/// A memory snapshot of a running sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Snapshot {
    pub snapshot_id: String,
    pub source_sandbox_id: String,
    pub image: String,
    pub created_at: f64,
    pub size_bytes: u64,
    /// SHA-256 of the checkpoint's files, checked before every restore.
    pub sha256: String,
    /// How long the source sandbox was paused while it was taken (ms).
    pub pause_ms: f64,
    /// Processes that were running in it (they go on running after a restore).
    pub processes: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Starting,
    Running,
    Exited,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Sandbox {
    pub sandbox_id: String,
    pub image: String,
    pub state: SandboxState,
    /// The entry command's exit code once exited (128+N when killed by signal N).
    pub exit_code: Option<i32>,
    /// Why it exited: `exited`, `timeout`, `failed`, `killed`, `lost`.
    pub reason: Option<String>,
    /// Detail for a person when the sandbox failed.
    pub message: Option<String>,
    pub created_at: f64,
    pub timeout: f64,
    pub deadline: f64,
    pub cmd: Vec<String>,
    pub workdir: Option<String>,
    /// Process id of the entry command (0), or null for an idle sandbox.
    pub entry_process_id: Option<u32>,
    /// The limits in force: cores, MiB, processes (null: unlimited).
    #[serde(default)]
    pub cpu: Option<f64>,
    #[serde(default)]
    pub memory: Option<u64>,
    #[serde(default)]
    pub max_processes: Option<u64>,
    /// `internet`, `blocked` or `allowlist`.
    #[serde(default)]
    pub network: Option<String>,
    /// The CIDRs of an `allowlist` network.
    #[serde(default)]
    pub cidr_allowlist: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

/// Body of `POST /v1/sandboxes/{id}/exec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub workdir: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    Running,
    Exited,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Process {
    pub process_id: u32,
    pub sandbox_id: String,
    pub cmd: Vec<String>,
    pub state: ProcessState,
    pub exit_code: Option<i32>,
    pub started_at: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessList {
    pub processes: Vec<Process>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WaitResult {
    /// Null only for a sandbox that failed before its entry command ran.
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Signal {
    pub signal: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    /// The warm pool, per image it is configured for (empty without one).
    #[serde(default)]
    pub pool: Vec<PoolImage>,
}

/// One image's warm pool.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PoolImage {
    pub image: String,
    /// The network of its slots: `default` (the daemon's default network,
    /// `--pool IMAGE=N`) or `blocked` (none, for `block_network` creates,
    /// `--pool-blocked IMAGE=N`).
    pub network: String,
    /// Slots the pool keeps.
    pub size: usize,
    /// Booted slots a create can claim now.
    pub ready: usize,
    /// Slots booting.
    pub booting: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// Stable error codes. Clients switch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    NotSupported,
    Unauthorized,
    NotFound,
    WorkdirNotFound,
    CommandNotFound,
    ExecFailed,
    WaitTimeout,
    SandboxNotRunning,
    OutputDiscarded,
    PayloadTooLarge,
    SandboxStartingFailed,
    /// The request conflicts with work in progress (e.g. a snapshot already being taken).
    Conflict,
    /// Taking a snapshot failed on the server's side.
    SnapshotFailed,
    /// A snapshot's files do not match their recorded content hash.
    SnapshotCorrupt,
    /// A snapshot cannot be restored here (different runsc, image or CPU).
    SnapshotIncompatible,
    /// A host-side write into a volume went over its quota (or the host disk is full).
    NoSpace,
    /// A step of an image build failed (its command exited non-zero, a
    /// package is unknown, ...); the error names the step.
    ImageBuildFailed,
    /// A registry could not be reached, refused us, or sent bad data.
    RegistryFailed,
    Internal,
}

impl ErrorCode {
    /// The HTTP status that goes with the code; the one mapping in the project.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::NotSupported | ErrorCode::ExecFailed => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound | ErrorCode::WorkdirNotFound | ErrorCode::CommandNotFound => 404,
            ErrorCode::WaitTimeout => 408,
            ErrorCode::SandboxNotRunning
            | ErrorCode::Conflict
            | ErrorCode::SnapshotIncompatible => 409,
            ErrorCode::SnapshotCorrupt | ErrorCode::ImageBuildFailed => 422,
            ErrorCode::RegistryFailed => 502,
            ErrorCode::OutputDiscarded => 410,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::NoSpace => 507,
            ErrorCode::Internal => 500,
            ErrorCode::SandboxStartingFailed | ErrorCode::SnapshotFailed => 503,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::NotSupported => "not_supported",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::WorkdirNotFound => "workdir_not_found",
            ErrorCode::CommandNotFound => "command_not_found",
            ErrorCode::ExecFailed => "exec_failed",
            ErrorCode::WaitTimeout => "wait_timeout",
            ErrorCode::SandboxNotRunning => "sandbox_not_running",
            ErrorCode::OutputDiscarded => "output_discarded",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::SandboxStartingFailed => "sandbox_starting_failed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::SnapshotFailed => "snapshot_failed",
            ErrorCode::SnapshotCorrupt => "snapshot_corrupt",
            ErrorCode::SnapshotIncompatible => "snapshot_incompatible",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::ImageBuildFailed => "image_build_failed",
            ErrorCode::RegistryFailed => "registry_failed",
            ErrorCode::Internal => "internal",
        }
    }

    /// Parses a code as the supervisor or a server spells it.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// The daemon's default unix socket: `$GWORKER_SOCKET`, else
/// `/run/gworker/gworker.sock` for root, else `$XDG_RUNTIME_DIR/gworker.sock`,
/// else `/tmp/gworker-$UID/gworker.sock`. Clients and daemon agree through this.
pub fn default_socket_path() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("GWORKER_SOCKET") {
        return p.into();
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return "/run/gworker/gworker.sock".into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return std::path::PathBuf::from(d).join("gworker.sock");
    }
    format!("/tmp/gworker-{uid}/gworker.sock").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_have_4xx_or_5xx() {
        for c in [
            ErrorCode::InvalidRequest,
            ErrorCode::NotSupported,
            ErrorCode::NotFound,
            ErrorCode::WaitTimeout,
            ErrorCode::OutputDiscarded,
            ErrorCode::SandboxStartingFailed,
            ErrorCode::NoSpace,
        ] {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            assert!(c.status() >= 400);
        }
    }

    #[test]
    fn secret_and_volume_refs_parse_as_the_clients_send_them() {
        let c: CreateSandbox = serde_json::from_str(
            r#"{"secrets":[{"name":"db"},{"values":{"A":"b"}}],"volumes":{"/data":{"name":"v","create_if_missing":true}}}"#,
        )
        .unwrap();
        let s = c.secrets.unwrap();
        assert_eq!(s[0].name.as_deref(), Some("db"));
        assert_eq!(s[1].values.as_ref().unwrap()["A"], "b");
        assert!(c.volumes.unwrap()["/data"].create_if_missing);
    }

    #[test]
    fn create_refuses_unknown_fields() {
        let e = serde_json::from_str::<CreateSandbox>(r#"{"cmd":["x"],"bogus":1}"#).unwrap_err();
        assert!(e.to_string().contains("bogus"));
    }
}
