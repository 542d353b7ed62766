//! The runtime: the only crate that knows how to drive `runsc` (gVisor).
//!
//! It writes OCI bundles and builds `runsc` command lines. It does not own
//! processes or pipes (the supervisor does) and knows nothing about the
//! registry or HTTP. Every sandbox is one runsc container whose root process is
//! the gworker agent, bind-mounted read-only at [`AGENT_PATH`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

pub mod cgroup;
pub mod host;
pub mod net;
pub mod volbind;
pub use cgroup::{Cgroup, Limits};

/// Where the agent binary appears inside every sandbox.
pub const AGENT_PATH: &str = "/.gworker/agent";
/// Where a warm slot's volume directory appears (see [`volbind`]).
pub use gworker_proto::SLOT_VOLUMES_PATH;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runsc {op} failed: {message}")]
    Runsc { op: &'static str, message: String },
    #[error("cannot write bundle {path}: {source}")]
    Bundle {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot start runsc ({bin}): {source}; is gVisor installed? try `apt-get install runsc`"
    )]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
}

/// How to invoke runsc. The same flags must be used for run, checkpoint and
/// restore of one sandbox (a restore needs the flags of the original run).
#[derive(Debug, Clone)]
pub struct Runsc {
    /// The runsc binary.
    pub bin: PathBuf,
    /// runsc's state directory (`--root`), private to this daemon.
    pub root: PathBuf,
}

impl Runsc {
    pub fn new(bin: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Runsc {
        Runsc {
            bin: bin.into(),
            root: root.into(),
        }
    }

    /// Flags every invocation gets. `--overlay2=root:memory` keeps every write
    /// to the root filesystem inside the sandbox (the image stays untouched and
    /// the writes are part of checkpoints); `--network=none` until network
    /// policy exists.
    fn global_args(&self) -> Vec<OsString> {
        let mut root = OsString::from("--root=");
        root.push(&self.root);
        let mut args = vec![
            root,
            "--network=none".into(),
            "--overlay2=root:memory".into(),
        ];
        // For diagnosing runsc itself: GWORKER_RUNSC_DEBUG=DIR writes its debug logs there.
        if let Some(dir) = std::env::var_os("GWORKER_RUNSC_DEBUG") {
            let mut log = OsString::from("--debug-log=");
            log.push(dir);
            log.push("/");
            args.push("--debug".into());
            args.push(log);
        }
        args
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(self.global_args());
        cmd
    }

    /// `runsc run` of a bundle; the caller sets stdio and spawns it. The
    /// container's stdin/stdout become the agent's protocol pipes.
    pub fn run_command(&self, bundle: &Path, id: &str) -> Command {
        let mut cmd = self.command();
        cmd.arg("run").arg("--bundle").arg(bundle).arg(id);
        cmd
    }

    /// `runsc restore` of a checkpoint into a new (or the same, after
    /// `delete`) container; like `run`, it stays in the foreground and the
    /// container's stdio are the fresh pipes the caller sets.
    pub fn restore_command(&self, bundle: &Path, image_path: &Path, id: &str) -> Command {
        let mut cmd = self.command();
        cmd.arg("restore")
            .arg("--image-path")
            .arg(image_path)
            .arg("--bundle")
            .arg(bundle)
            .arg(id);
        cmd
    }

    /// Writes a memory checkpoint of the container to `image_path`; the
    /// container stops. (This runsc's `--leave-running` does not work.)
    pub fn checkpoint(&self, id: &str, image_path: &Path) -> Result<(), RuntimeError> {
        let image = image_path.to_string_lossy().into_owned();
        self.simple_timeout(
            "checkpoint",
            &["checkpoint", "--image-path", &image, id],
            Duration::from_secs(120),
        )
    }

    /// Removes runsc's state of a stopped container.
    pub fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        self.simple("delete", &["delete", id])
    }

    /// runsc's version line, recorded with snapshots (a restore needs the same runsc).
    pub fn version(&self) -> Result<String, RuntimeError> {
        let out = Command::new(&self.bin)
            .arg("--version")
            .output()
            .map_err(|source| RuntimeError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string())
    }

    /// Sends a signal to the container's init (the agent), which takes every
    /// process of the sandbox with it when it is SIGKILL.
    pub fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.simple("kill", &["kill", "--all", id, signal])
    }

    /// Removes runsc's state of the container, stopping it first if needed.
    pub fn delete_force(&self, id: &str) -> Result<(), RuntimeError> {
        self.simple("delete", &["delete", "--force", id])
    }

    fn simple(&self, op: &'static str, args: &[&str]) -> Result<(), RuntimeError> {
        self.simple_timeout(op, args, Duration::from_secs(10))
    }

    fn simple_timeout(
        &self,
        op: &'static str,
        args: &[&str],
        limit: Duration,
    ) -> Result<(), RuntimeError> {
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|source| RuntimeError::Spawn {
            bin: self.bin.clone(),
            source,
        })?;
        let out = wait_output(child, limit).map_err(|e| RuntimeError::Runsc {
            op,
            message: e.to_string(),
        })?;
        if out.status.success() {
            Ok(())
        } else {
            let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(RuntimeError::Runsc { op, message })
        }
    }
}

/// Waits for a child with a deadline: runsc must never be waited for forever.
fn wait_output(
    mut child: std::process::Child,
    limit: Duration,
) -> std::io::Result<std::process::Output> {
    let start = std::time::Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return child.wait_with_output();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "runsc timed out",
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What goes into a sandbox's OCI bundle.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    /// The image's root filesystem: the read-only lower layer.
    pub rootfs: PathBuf,
    /// The static agent binary on the host.
    pub agent: PathBuf,
    pub hostname: String,
    /// Host directories bind-mounted read-write (volumes).
    pub mounts: Vec<BindMount>,
    /// runsc's `cgroupsPath`: cgroups the supervisor made and limited.
    pub cgroup: Option<String>,
    /// uid and gid of every process (the agent included): the image's user.
    /// `None`: root.
    pub user: Option<(u32, u32)>,
    /// The sandbox's own network namespace (`net::SandboxNet`) and the
    /// resolv.conf to bind-mount read-only; `None`: loopback only.
    pub network: Option<(PathBuf, PathBuf)>,
    /// A [`net::ReadyGate`]'s FIFO: runsc's prestart hook waits on it before
    /// runsc reads the network namespace, so the network can be made while
    /// runsc boots.
    pub network_gate: Option<PathBuf>,
    /// A warm slot's (or its restore's) volume directory on the host, mounted
    /// at [`SLOT_VOLUMES_PATH`] (see [`volbind`]).
    pub slot_volumes: Option<PathBuf>,
    /// The agent starts with CAP_SYS_ADMIN, to bind-mount a claim's volumes;
    /// it drops it before it starts any process.
    pub agent_mounts: bool,
}

/// A host directory bind-mounted read-write into the sandbox. runsc's default
/// `--file-access-mounts=shared` makes writes from other sandboxes and the
/// host visible at once (no caching of the mount's files in the sentry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
}

/// Docker's default capability set without CAP_NET_RAW: root inside the
/// sandbox can install packages and change ownership; gVisor is the boundary.
pub const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The OCI runtime config for a sandbox.
pub fn oci_config(spec: &BundleSpec) -> Value {
    let mut caps: Vec<&str> = CAPABILITIES.to_vec();
    if spec.agent_mounts {
        caps.push("CAP_SYS_ADMIN");
    }
    let mut v = json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": [AGENT_PATH],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "inheritable": caps, "permitted": caps
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}],
            "noNewPrivileges": false
        },
        "root": {"path": spec.rootfs, "readonly": false},
        "hostname": spec.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": AGENT_PATH, "type": "bind", "source": spec.agent,
             "options": ["rbind", "ro"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}
            ]
        }
    });
    if let Some(path) = &spec.cgroup {
        v["linux"]["cgroupsPath"] = json!(path);
    }
    if let Some((uid, gid)) = spec.user {
        v["process"]["user"] = json!({"uid": uid, "gid": gid});
    }
    if let Some((netns, resolv)) = &spec.network {
        if let Some(ns) = v["linux"]["namespaces"].as_array_mut() {
            for n in ns.iter_mut() {
                if n["type"] == "network" {
                    *n = json!({"type": "network", "path": netns});
                }
            }
        }
        if let Some(mounts) = v["mounts"].as_array_mut() {
            mounts.push(json!({"destination": "/etc/resolv.conf", "type": "bind",
                "source": resolv, "options": ["rbind", "ro"]}));
        }
    }
    if let Some(fifo) = &spec.network_gate {
        v["hooks"] = json!({"prestart": [net::ReadyGate::hook(fifo)]});
    }
    if let (Some(dir), Some(mounts)) = (&spec.slot_volumes, v["mounts"].as_array_mut()) {
        mounts.push(json!({"destination": SLOT_VOLUMES_PATH, "type": "bind",
            "source": dir, "options": ["rbind", "rw"]}));
    }
    if let Some(mounts) = v["mounts"].as_array_mut() {
        for m in &spec.mounts {
            mounts.push(json!({"destination": m.destination, "type": "bind",
                "source": m.source, "options": ["rbind", "rw"]}));
        }
    }
    v
}

/// Writes `config.json` into `dir` (created if needed).
pub fn write_bundle(dir: &Path, spec: &BundleSpec) -> Result<(), RuntimeError> {
    let err = |source| RuntimeError::Bundle {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let body = serde_json::to_vec_pretty(&oci_config(spec)).expect("json value serializes");
    std::fs::write(dir.join("config.json"), body).map_err(err)
}

/// A limit in whole seconds: `var` when the environment sets it to a
/// number (at least 1), else `default_secs`. Tests shorten gworker's
/// watchdogs this way.
pub fn env_secs(var: &str, default_secs: u64) -> std::time::Duration {
    let secs = std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(default_secs);
    std::time::Duration::from_secs(secs.max(1))
}

/// Finds the runsc binary: `$GWORKER_RUNSC`, else `runsc` on PATH, else /usr/bin/runsc.
pub fn find_runsc() -> PathBuf {
    if let Some(p) = std::env::var_os("GWORKER_RUNSC") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("runsc");
            if c.is_file() {
                return c;
            }
        }
    }
    PathBuf::from("/usr/bin/runsc")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_mounts_agent_read_only_and_keeps_root_writable() {
        let v = oci_config(&BundleSpec {
            rootfs: "/img/rootfs".into(),
            agent: "/bin/agent".into(),
            hostname: "sb".into(),
            mounts: vec![BindMount {
                source: "/data/volumes/v/data".into(),
                destination: "/mnt/v".into(),
            }],
            cgroup: Some("/gworker/sb-1".into()),
            user: None,
            network: None,
            network_gate: None,
            slot_volumes: None,
            agent_mounts: false,
        });
        assert_eq!(v["linux"]["cgroupsPath"], "/gworker/sb-1");
        assert_eq!(v["process"]["args"][0], AGENT_PATH);
        assert_eq!(v["process"]["terminal"], false);
        assert_eq!(v["root"]["readonly"], false);
        let agent = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == AGENT_PATH)
            .unwrap();
        assert_eq!(agent["options"], json!(["rbind", "ro"]));
        let vol = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/mnt/v")
            .unwrap();
        assert_eq!(vol["source"], "/data/volumes/v/data");
        assert_eq!(vol["options"], json!(["rbind", "rw"]));
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(!caps
            .iter()
            .any(|c| c == "CAP_NET_RAW" || c == "CAP_SYS_ADMIN"));
    }

    #[test]
    fn run_command_has_isolation_flags() {
        let r = Runsc::new("/usr/bin/runsc", "/data/runsc");
        let cmd = r.run_command(Path::new("/b"), "sb-1");
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(&"--network=none".to_string()));
        assert!(args.contains(&"--overlay2=root:memory".to_string()));
        assert_eq!(&args[args.len() - 4..], ["run", "--bundle", "/b", "sb-1"]);
    }
}
