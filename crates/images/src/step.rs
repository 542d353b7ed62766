//! Running one build step into a new layer.
//!
//! Steps that run commands (`apt_install`, `pip_install`, `run_commands`)
//! run in a gVisor build sandbox whose root is a writable overlay of the
//! parent layers: runsc writes through (`--overlay2=none`), and the overlay's
//! upper directory becomes the layer. Steps that only change files or config
//! (`env`, `workdir`, `add_files`) write the layer directly on the host, into
//! a fresh directory, so nothing of the image below is ever followed.

use std::fs;
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gworker_api::{self as api, BuildEvent, ImageStep};
use serde_json::json;

use crate::built::{mount_overlay, now_secs, BuildFailure, BuildOptions, ImageConfig, LayerMeta};
use crate::{fsutil, ImageStore, RemoveOnDrop, UNIQUE};

/// Longest one step may run.
const STEP_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Lines of a failed step's output kept for the error.
const TAIL_LINES: usize = 40;
/// The host's CA bundle, which network steps trust.
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Where a network step sees it.
const BUILD_CA_PATH: &str = "/tmp/.gworker-host-ca.crt";
/// Prefix of build sandboxes' container IDs.
const BUILD_ID_PREFIX: &str = "gwb-";

/// Makes the layer for `step` on top of `lowers` (bottom first) under `key`.
pub(crate) fn run(
    store: &ImageStore,
    key: &str,
    parent: &str,
    lowers: &[String],
    config: &ImageConfig,
    step: &ImageStep,
    opts: &mut BuildOptions<'_>,
) -> Result<LayerMeta, BuildFailure> {
    let _lock = store.lock(&format!("layer-{}", &key[..16]), &mut |_| {})?;
    if let Some(m) = store.read_layer(key) {
        return Ok(m);
    }
    let tmp = store.new_tmp_layer_dir(key)?;
    let mut guard = RemoveOnDrop(Some(tmp.clone()));
    let diff = tmp.join("diff");
    let mut config = config.clone();
    match step {
        ImageStep::Env(vars) => {
            for (k, v) in vars {
                config.set_env(k, v);
            }
        }
        ImageStep::Workdir(w) => {
            mkdir_in(&diff, w)?;
            config.workdir = Some(w.clone());
        }
        ImageStep::AddFiles { blob, dest } => {
            let file = store.blob_file(blob).ok_or_else(|| {
                BuildFailure::new(
                    api::ErrorCode::InvalidRequest,
                    format!("blob {blob} was not uploaded (POST /v1/images/blobs first)"),
                )
            })?;
            let target = mkdir_in(&diff, dest)?;
            unpack_tar(&file, &target).map_err(|e| {
                BuildFailure::new(
                    api::ErrorCode::InvalidRequest,
                    format!("cannot unpack {blob} at {dest}: {e}"),
                )
            })?;
        }
        ImageStep::AptInstall(pkgs) => {
            let script = format!(
                "set -e\n\
                 if ! command -v apt-get >/dev/null; then echo 'apt_install needs an image with apt-get (a Debian or Ubuntu base)' >&2; exit 127; fi\n\
                 export DEBIAN_FRONTEND=noninteractive\n\
                 apt-get update -q\n\
                 apt-get install -y -q --no-install-recommends {}\n\
                 apt-get clean\n\
                 rm -rf /var/lib/apt/lists/*",
                shell_words(pkgs)
            );
            run_in_sandbox(store, key, &tmp, lowers, &config, &script, true, opts)?;
        }
        ImageStep::PipInstall(pkgs) => {
            let script = format!(
                "set -e\n\
                 PY=$(command -v python3 || command -v python || true)\n\
                 if [ -z \"$PY\" ]; then echo 'pip_install needs an image with Python (e.g. debian_slim)' >&2; exit 127; fi\n\
                 export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore PIP_BREAK_SYSTEM_PACKAGES=1\n\
                 \"$PY\" -m pip install --progress-bar off {}",
                shell_words(pkgs)
            );
            run_in_sandbox(store, key, &tmp, lowers, &config, &script, true, opts)?;
        }
        ImageStep::RunCommands(cmds) => {
            let script = format!("set -e\n{}", cmds.join("\n"));
            run_in_sandbox(store, key, &tmp, lowers, &config, &script, false, opts)?;
        }
    }
    for leftover in ["work", "merged", "bundle", "resolv.conf"] {
        let p = tmp.join(leftover);
        if p.is_dir() {
            fsutil::remove_build_tree(&p)?;
        } else if p.exists() {
            fs::remove_file(&p)?;
        }
    }
    let meta = LayerMeta {
        key: key.to_string(),
        parent: Some(parent.to_string()),
        description: step.describe(),
        size_bytes: fsutil::tree_size(&diff)?,
        created_at: now_secs(),
        config,
    };
    store.commit_layer(&tmp, &meta)?;
    guard.0 = None;
    Ok(meta)
}

/// `mkdir -p` of absolute `path` inside `root` (a fresh layer directory, so
/// no symlinks to follow); returns the directory.
fn mkdir_in(root: &Path, path: &str) -> io::Result<PathBuf> {
    let mut dir = root.to_path_buf();
    for c in Path::new(path).components() {
        if let std::path::Component::Normal(n) = c {
            dir.push(n);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(io::Error::other(format!(
                        "{} is not a directory",
                        dir.display()
                    )))
                }
                Err(_) => {
                    fs::create_dir(&dir)?;
                    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
                }
            }
        }
    }
    Ok(dir)
}

/// Unpacks a client's tar into `dir`; entries that would land outside it
/// (`..`, absolute paths, through symlinks) are refused by `tar`.
fn unpack_tar(file: &Path, dir: &Path) -> io::Result<()> {
    let mut ar = tar::Archive::new(fs::File::open(file)?);
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink() || kind.is_hard_link()) {
            continue;
        }
        if !entry.unpack_in(dir)? {
            let p = entry.path()?.display().to_string();
            return Err(io::Error::other(format!(
                "entry {p:?} points outside the destination"
            )));
        }
    }
    Ok(())
}

/// Single-quotes each word for sh.
fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[allow(clippy::too_many_arguments)]
fn run_in_sandbox(
    store: &ImageStore,
    key: &str,
    tmp: &Path,
    lowers: &[String],
    config: &ImageConfig,
    script: &str,
    network: bool,
    opts: &mut BuildOptions<'_>,
) -> Result<(), BuildFailure> {
    let merged = tmp.join("merged");
    let work = tmp.join("work");
    fs::create_dir_all(&merged)?;
    fs::create_dir_all(&work)?;
    let lower_paths = store.overlay_lowers(lowers);
    mount_overlay(&merged, &lower_paths, Some((&tmp.join("diff"), &work))).map_err(|e| {
        BuildFailure::new(
            api::ErrorCode::Internal,
            format!("cannot mount the build's overlay: {e}"),
        )
    })?;
    let _unmount = Unmount(merged.clone());

    let id = format!(
        "{BUILD_ID_PREFIX}{}-{}-{}",
        &key[..12],
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    );
    let mut env: Vec<String> = Vec::new();
    let mut cfg_env = config.env.clone();
    if !cfg_env.iter().any(|(k, _)| k == "PATH") {
        cfg_env.insert(0, ("PATH".into(), crate::recipe::STD_PATH.into()));
    }
    if !cfg_env.iter().any(|(k, _)| k == "HOME") {
        cfg_env.push(("HOME".into(), "/root".into()));
    }
    for (k, v) in &cfg_env {
        env.push(format!("{k}={v}"));
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}),
    ];
    let net = if network {
        let net = crate::buildnet::BuildNet::setup(&id, &store.net_state_dir()).map_err(|e| {
            BuildFailure::new(
                api::ErrorCode::Internal,
                format!("cannot give the build step network access: {e}"),
            )
        })?;
        let resolv = tmp.join("resolv.conf");
        fs::write(&resolv, net.resolv_conf())?;
        namespaces.push(json!({"type": "network", "path": net.netns_path()}));
        mounts.push(json!({"destination": "/etc/resolv.conf", "type": "bind",
                           "source": resolv, "options": ["rbind", "ro"]}));
        // Fetches trust what the host trusts (a TLS-inspecting proxy's CA,
        // say): the host's bundle, in the build's /tmp so no layer keeps it.
        if Path::new(HOST_CA_BUNDLE).is_file() {
            mounts.push(json!({"destination": BUILD_CA_PATH, "type": "bind",
                               "source": HOST_CA_BUNDLE, "options": ["rbind", "ro"]}));
            for var in ["PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"] {
                env.push(format!("{var}={BUILD_CA_PATH}"));
            }
        }
        Some(net)
    } else {
        namespaces.push(json!({"type": "network"}));
        None
    };
    let caps = gworker_runtime::CAPABILITIES;
    let spec = json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/sh", "-c", script],
            "env": env,
            "cwd": config.workdir.as_deref().unwrap_or("/"),
            "capabilities": {"bounding": caps, "effective": caps, "inheritable": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}],
            "noNewPrivileges": false
        },
        "root": {"path": merged, "readonly": false},
        "hostname": "gworker-build",
        "mounts": mounts,
        "linux": {"namespaces": namespaces}
    });
    let bundle = tmp.join("bundle");
    fs::create_dir_all(&bundle)?;
    fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec).map_err(io::Error::other)?,
    )?;

    let state = store.runsc_state_dir();
    fs::create_dir_all(&state)?;
    let mut runsc_args: Vec<String> = vec![
        opts.runsc.display().to_string(),
        format!("--root={}", state.display()),
        format!(
            "--network={}",
            if net.is_some() { "sandbox" } else { "none" }
        ),
        "--overlay2=none".into(),
        // No cgroups of runsc's own: it would make `/gwb-…` at the root of
        // every hierarchy and leave them behind when it is cut short
        // (`remove_stale_build_cgroups`). A step has no limits to put there.
        "--ignore-cgroups".into(),
        "run".into(),
        "--bundle".into(),
        bundle.display().to_string(),
        id.clone(),
    ];
    if net.is_some() {
        let mut wrapped = crate::buildnet::runsc_wrapper();
        wrapped.append(&mut runsc_args);
        runsc_args = wrapped;
    }
    let (reader, writer) = io::pipe()?;
    let writer2 = writer.try_clone()?;
    let mut child = Command::new(&runsc_args[0])
        .args(&runsc_args[1..])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .spawn()
        .map_err(|e| {
            BuildFailure::new(
                api::ErrorCode::Internal,
                format!("cannot run {}: {e}", runsc_args[0]),
            )
        })?;
    let (tx, rx) = mpsc::channel::<String>();
    let pump = std::thread::spawn(move || {
        for line in BufReader::new(reader).split(b'\n') {
            let Ok(line) = line else { break };
            if tx
                .send(String::from_utf8_lossy(&line).trim_end().to_string())
                .is_err()
            {
                break;
            }
        }
    });
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut tail: std::collections::VecDeque<String> = Default::default();
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
                (opts.events)(BuildEvent::Log { line });
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline && !timed_out {
            timed_out = true;
            let _ = child.kill();
            let _ = gworker_runtime::Runsc::new(&opts.runsc, &state).kill(&id, "KILL");
        }
    }
    let status = child.wait()?;
    let _ = pump.join();
    let _ = gworker_runtime::Runsc::new(&opts.runsc, &state).delete_force(&id);
    drop(net);
    if status.success() && !timed_out {
        return Ok(());
    }
    let code = status
        .code()
        .or_else(|| std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s));
    let output = tail.into_iter().collect::<Vec<_>>().join("\n");
    Err(BuildFailure {
        code: api::ErrorCode::ImageBuildFailed,
        message: if timed_out {
            format!(
                "the step did not finish within {} minutes and was stopped",
                STEP_TIMEOUT.as_secs() / 60
            )
        } else {
            format!(
                "the step's command failed with exit code {}",
                code.map(|c| c.to_string()).unwrap_or_else(|| "?".into())
            )
        },
        exit_code: code,
        output: Some(output),
    })
}

/// Lazily unmounts a build overlay when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %self.0.display(), error = %e, "cannot unmount a build overlay");
        }
    }
}

/// Deletes build sandboxes a crashed daemon left in runsc's state, and
/// stale build cgroups.
pub(crate) fn cleanup_build_sandboxes(store: &ImageStore, runsc: &Path) {
    remove_stale_build_cgroups(Path::new(gworker_runtime::cgroup::ROOT));
    let state = store.runsc_state_dir();
    if !state.is_dir() {
        return;
    }
    let Ok(out) = Command::new(runsc)
        .arg(format!("--root={}", state.display()))
        .args(["list", "-quiet"])
        .output()
    else {
        return;
    };
    for id in String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(BUILD_ID_PREFIX))
    {
        tracing::info!(container = id, "removing a build sandbox left by a crash");
        let _ = gworker_runtime::Runsc::new(runsc, &state).delete_force(id);
    }
    crate::buildnet::cleanup_stale(&store.net_state_dir());
}

/// Removes the empty `gwb-KEY-PID-N` cgroups that runsc made for build steps
/// before steps ran with `--ignore-cgroups`, and left behind when it was cut
/// short: at the root of the cgroup v2 tree or of each v1 hierarchy under
/// `root`. One whose daemon (PID) still lives is left alone, and a cgroup
/// with tasks cannot be removed (`rmdir` refuses).
pub(crate) fn remove_stale_build_cgroups(root: &Path) {
    for dir in gworker_runtime::cgroup::hierarchies(root) {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = build_cgroup_owner(&name.to_string_lossy()) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() || !e.path().is_dir() {
                continue;
            }
            match fs::remove_dir(e.path()) {
                Ok(()) => {
                    tracing::info!(cgroup = %e.path().display(), "removed a build step's stale cgroup")
                }
                Err(err) => {
                    tracing::debug!(cgroup = %e.path().display(), error = %err, "cannot remove a build step's stale cgroup")
                }
            }
        }
    }
}

/// The daemon pid in a build sandbox's ID (`gwb-KEY12-PID-N`), if `name` is one.
fn build_cgroup_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(BUILD_ID_PREFIX)?;
    let mut parts = rest.split('-');
    let (key, pid, n) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || key.len() != 12
        || !key.bytes().all(|b| b.is_ascii_hexdigit())
        || n.parse::<u64>().is_err()
    {
        return None;
    }
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_cgroup_names_are_recognised() {
        assert_eq!(build_cgroup_owner("gwb-1a0044fbdf95-4611-1"), Some(4611));
        assert_eq!(build_cgroup_owner("gwb-1a0044fbdf95-4611-1-x"), None);
        assert_eq!(build_cgroup_owner("gwb-1a0044fbdf9-4611-1"), None);
        assert_eq!(build_cgroup_owner("gwb-1a0044fbdf95-x-1"), None);
        assert_eq!(build_cgroup_owner("gworker"), None);
        assert_eq!(build_cgroup_owner("sb-1a0044fbdf95-4611-1"), None);
    }

    #[test]
    fn stale_build_cgroups_go_and_others_stay() {
        let root = std::env::temp_dir().join(format!("gw-cgtest-{}", std::process::id()));
        let v1 = root.join("pids");
        let live = format!("gwb-00000000000a-{}-1", std::process::id());
        // Pids are below pid_max (at most 2^22): this one never runs.
        let dead = "gwb-00000000000a-99999999-1";
        for d in [
            v1.join(&live),
            v1.join(dead),
            root.join(dead),
            v1.join("gworker"),
        ] {
            fs::create_dir_all(d).unwrap();
        }
        fs::create_dir_all(v1.join("gwb-00000000000b-99999999-2/child")).unwrap();
        remove_stale_build_cgroups(&root);
        assert!(!v1.join(dead).exists());
        assert!(!root.join(dead).exists());
        assert!(v1.join(&live).exists(), "its daemon still runs");
        assert!(v1.join("gworker").exists());
        // Not empty (on a cgroup fs: has tasks): rmdir refuses.
        assert!(v1.join("gwb-00000000000b-99999999-2").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
