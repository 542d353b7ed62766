//! How each built-in image is made. A recipe fills an empty-or-absent
//! `rootfs` directory and returns the image's default environment; the store
//! takes care of locking, temp dirs, the atomic rename and metadata.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{fsutil, ImageError};

/// Bumped when a recipe changes what it produces; stored in image.json.
pub const RECIPE_VERSION: u32 = 5;

pub(crate) const STD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Applets the tests and the engine rely on being present in `busybox`.
pub(crate) const REQUIRED_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "env", "pwd", "ls", "dd", "head", "seq", "yes", "true", "false",
    "kill", "mkdir",
];

/// Lines of tool output kept for an error message.
const TAIL_LINES: usize = 15;

/// External tools and settings the recipes use.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `mmdebstrap` program (a name looked up in PATH, or a path).
    pub mmdebstrap: PathBuf,
    /// A statically linked busybox on the host (Debian's busybox-static).
    pub busybox: PathBuf,
    /// Extra MIRROR argument for mmdebstrap (a URI, a `deb ...` line or a
    /// sources file); `None` means mmdebstrap's default (deb.debian.org).
    pub debian_mirror: Option<String>,
    /// Upper bound for one external build step.
    pub build_timeout: Duration,
}

impl Tools {
    /// Defaults, overridable by `GWORKER_MMDEBSTRAP`, `GWORKER_BUSYBOX` and
    /// `GWORKER_DEBIAN_MIRROR`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        Tools {
            mmdebstrap: var("GWORKER_MMDEBSTRAP")
                .map(PathBuf::from)
                .unwrap_or_else(|| "mmdebstrap".into()),
            busybox: var("GWORKER_BUSYBOX")
                .map(PathBuf::from)
                .unwrap_or_else(default_busybox),
            debian_mirror: std::env::var("GWORKER_DEBIAN_MIRROR")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .or_else(|| {
                    host_debian_sources("bookworm").map(|p| p.to_string_lossy().into_owned())
                }),
            build_timeout: Duration::from_secs(15 * 60),
        }
    }
}

fn default_busybox() -> PathBuf {
    // busybox-static installs /bin/busybox (/usr/bin/busybox on merged-usr
    // systems is the same file).
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| "/bin/busybox".into())
}

/// The machine's own apt sources, if they are for `suite`: handed to
/// mmdebstrap (it pastes a file MIRROR into the chroot's sources) so the image
/// comes from the same mirror apt on the host uses.
fn host_debian_sources(suite: &str) -> Option<PathBuf> {
    [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| {
        fs::read_to_string(p).is_ok_and(|text| {
            text.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.split_whitespace().any(|w| w == suite))
        })
    })
}

/// The archive URI of the host's apt sources (deb822 `URIs:` or a `deb` line).
fn host_debian_uri() -> Option<String> {
    for p in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        let Ok(text) = fs::read_to_string(p) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("URIs:") {
                if let Some(u) = rest.split_whitespace().next() {
                    return Some(u.to_string());
                }
            }
            if let Some(rest) = line.strip_prefix("deb ") {
                if let Some(u) = rest.split_whitespace().find(|w| w.contains("://")) {
                    return Some(u.to_string());
                }
            }
        }
    }
    None
}

/// Build image `name` into `rootfs`; returns its default environment.
pub fn build(
    name: &str,
    tools: &Tools,
    rootfs: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<(String, String)>, ImageError> {
    match name {
        "busybox" => build_busybox(tools, rootfs, progress),
        "debian-slim" => build_debian_slim(tools, "bookworm", rootfs, progress),
        "debian-slim-trixie" => build_debian_slim(tools, "trixie", rootfs, progress),
        other => Err(ImageError::Unknown(other.to_string())),
    }
}

pub(crate) fn build_err(image: &str, reason: impl Into<String>) -> ImageError {
    ImageError::Build {
        image: image.to_string(),
        reason: reason.into(),
    }
}

fn io_ctx(image: &str, what: &str, path: &Path, e: io::Error) -> ImageError {
    build_err(image, format!("{what} {}: {e}", path.display()))
}

fn build_busybox(
    tools: &Tools,
    rootfs: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<(String, String)>, ImageError> {
    const IMG: &str = "busybox";
    let host_bb = &tools.busybox;
    let remedy = "apt-get install busybox-static, or set GWORKER_BUSYBOX to a static busybox";
    match fsutil::is_static_elf(host_bb) {
        Ok(true) => {}
        Ok(false) => {
            return Err(build_err(
                IMG,
                format!(
                    "{} is dynamically linked (the busybox package?); {remedy}",
                    host_bb.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(build_err(
                IMG,
                format!("{} not found; {remedy}", host_bb.display()),
            ))
        }
        Err(e) => {
            return Err(build_err(
                IMG,
                format!("cannot read {}: {e}; {remedy}", host_bb.display()),
            ))
        }
    }
    progress(&format!("building busybox: copying {}", host_bb.display()));

    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc"] {
        let p = rootfs.join(d);
        fs::create_dir_all(&p).map_err(|e| io_ctx(IMG, "cannot create", &p, e))?;
    }
    let target = rootfs.join("bin/busybox");
    fs::copy(host_bb, &target).map_err(|e| io_ctx(IMG, "cannot copy busybox to", &target, e))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;

    let out = Command::new(host_bb)
        .arg("--list-full")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io_ctx(IMG, "cannot run", host_bb, e))?;
    if !out.status.success() {
        return Err(build_err(
            IMG,
            format!(
                "{} --list-full failed ({}): {}; {remedy}",
                host_bb.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let list = String::from_utf8_lossy(&out.stdout);
    let mut links = 0usize;
    for rel in list
        .lines()
        .map(|l| l.trim().trim_start_matches('/'))
        .filter(|l| !l.is_empty())
    {
        let rel = Path::new(rel);
        if rel == Path::new("bin/busybox")
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            continue;
        }
        let link = rootfs.join(rel);
        if fs::symlink_metadata(&link).is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(|e| io_ctx(IMG, "cannot create", parent, e))?;
        }
        symlink("/bin/busybox", &link)
            .map_err(|e| io_ctx(IMG, "cannot create symlink", &link, e))?;
        links += 1;
    }
    let missing: Vec<&str> = REQUIRED_APPLETS
        .iter()
        .copied()
        .filter(|a| {
            !["bin", "sbin", "usr/bin", "usr/sbin"]
                .iter()
                .any(|d| rootfs.join(d).join(a).symlink_metadata().is_ok())
        })
        .collect();
    if !missing.is_empty() {
        return Err(build_err(
            IMG,
            format!(
                "{} lacks applets {}; {remedy}",
                host_bb.display(),
                missing.join(", ")
            ),
        ));
    }
    progress(&format!("building busybox: {links} applet links"));

    write_file(
        rootfs,
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    write_file(rootfs, "etc/group", "root:x:0:\nnogroup:x:65534:\n")?;
    finalize(IMG, rootfs)?;
    Ok(vec![
        ("PATH".into(), STD_PATH.into()),
        ("HOME".into(), "/root".into()),
    ])
}

/// Packages every debian-slim gets besides minbase: Python and pip (and
/// what apt needs to fetch over HTTPS).
const DEBIAN_PACKAGES: &str = "python3,python3-pip,ca-certificates";

/// The image sets `LANG=C.UTF-8`. Without a locale archive glibc's
/// `setlocale` opens and maps the locale's 13 category files one by one, in
/// every dynamic program that calls it (`echo`, `ls`, Python): ~15 ms per
/// process under gVisor, where each open is a round trip to the gofer
/// (`runsc run` of `echo hi` on this rootfs: 154 ms with `LANG=C.UTF-8`, 141
/// without). Put `C.utf8` into `/usr/lib/locale/locale-archive` and it is one
/// file, mapped once (136 ms).
const LOCALE_HOOK: &str =
    "--customize-hook=chroot \"$1\" localedef --add-to-archive /usr/lib/locale/C.utf8";

fn build_debian_slim(
    tools: &Tools,
    suite: &str,
    rootfs: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<(String, String)>, ImageError> {
    const IMG: &str = "debian-slim";
    let include = format!("--include={DEBIAN_PACKAGES}");
    let mut cmd = Command::new(&tools.mmdebstrap);
    cmd.args(["--variant=minbase", &include, LOCALE_HOOK, suite])
        .arg(rootfs);
    // The host's sources name its own release; other releases come from the
    // same archive URI.
    let mirror = if suite == "bookworm" {
        tools.debian_mirror.clone()
    } else {
        Some(host_debian_uri().unwrap_or_else(|| "http://deb.debian.org/debian".into()))
    };
    if let Some(m) = &mirror {
        cmd.arg(m);
    }
    progress(&format!(
        "building debian-slim ({suite}): running {} --variant=minbase {include} {suite}{}",
        tools.mmdebstrap.display(),
        mirror
            .as_deref()
            .map(|m| format!(" (mirror: {m})"))
            .unwrap_or_default()
    ));
    let tool = tools.mmdebstrap.display().to_string();
    match run_tool(cmd, tools.build_timeout, progress) {
        Ok(()) => {}
        Err(ToolError::Spawn(e)) if e.kind() == io::ErrorKind::NotFound => {
            return Err(build_err(
                IMG,
                format!("{tool} not found; apt-get install mmdebstrap (or set GWORKER_MMDEBSTRAP)"),
            ))
        }
        Err(ToolError::Spawn(e)) => return Err(build_err(IMG, format!("cannot run {tool}: {e}"))),
        Err(ToolError::Failed { status, tail }) => {
            return Err(build_err(
                IMG,
                format!(
                    "{tool} failed ({status}); check that apt can reach the configured Debian mirror \
                     (or set GWORKER_DEBIAN_MIRROR) and that mmdebstrap runs as root; last output:\n{}",
                    tail.join("\n")
                ),
            ))
        }
        Err(ToolError::TimedOut { after, tail }) => {
            return Err(build_err(
                IMG,
                format!(
                    "{tool} did not finish within {} s and was stopped; check the Debian mirror; last output:\n{}",
                    after.as_secs(),
                    tail.join("\n")
                ),
            ))
        }
    }
    let python = rootfs.join("usr/bin/python3");
    if python.symlink_metadata().is_err() {
        return Err(build_err(
            IMG,
            format!("{tool} succeeded but {} is missing", python.display()),
        ));
    }
    crate::statx::install(rootfs)?;
    allow_system_pip(rootfs)?;
    finalize(IMG, rootfs)?;
    Ok(vec![
        ("PATH".into(), STD_PATH.into()),
        ("HOME".into(), "/root".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ])
}

/// A sandbox is the user's own machine: `pip install` should just work, as
/// in Modal's images, so drop Debian's PEP 668 marker.
fn allow_system_pip(rootfs: &Path) -> Result<(), ImageError> {
    let lib = rootfs.join("usr/lib");
    let Ok(entries) = fs::read_dir(&lib) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("python3") {
            let marker = e.path().join("EXTERNALLY-MANAGED");
            match fs::remove_file(&marker) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_ctx("debian-slim", "remove", &marker, err)),
            }
        }
    }
    Ok(())
}

/// What every image must have, whatever made it.
fn finalize(image: &str, rootfs: &Path) -> Result<(), ImageError> {
    for (dir, mode) in [
        ("tmp", 0o1777),
        ("root", 0o700),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("etc", 0o755),
        ("run", 0o755),
        ("var/tmp", 0o1777),
        (".gworker", 0o755),
    ] {
        let p = rootfs.join(dir);
        let existed = p.symlink_metadata().is_ok();
        if !existed {
            fs::create_dir_all(&p).map_err(|e| io_ctx(image, "cannot create", &p, e))?;
        }
        // Sticky world-writable dirs must be exactly that; others keep the
        // mode the distribution chose.
        if !existed || mode & 0o1000 != 0 {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        }
    }
    ensure_line(
        rootfs,
        "etc/passwd",
        "root:",
        "root:x:0:0:root:/root:/bin/sh",
    )?;
    ensure_line(rootfs, "etc/group", "root:", "root:x:0:")?;
    write_file(rootfs, "etc/hostname", "gworker\n")?;
    if rootfs.join("etc/hosts").symlink_metadata().is_err() {
        write_file(
            rootfs,
            "etc/hosts",
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        )?;
    }
    if rootfs.join("bin/sh").symlink_metadata().is_err() {
        return Err(build_err(image, "the built rootfs has no /bin/sh"));
    }
    Ok(())
}

/// Writes `rel` under `rootfs` (mode 0644).
pub(crate) fn write_file(rootfs: &Path, rel: &str, contents: &str) -> Result<(), ImageError> {
    let p = rootfs.join(rel);
    // Replace rather than write through: the path might be a symlink.
    let _ = fs::remove_file(&p);
    fs::write(&p, contents)?;
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

fn ensure_line(rootfs: &Path, rel: &str, prefix: &str, line: &str) -> Result<(), ImageError> {
    let p = rootfs.join(rel);
    let text = fs::read_to_string(&p).unwrap_or_default();
    if text.lines().any(|l| l.starts_with(prefix)) {
        return Ok(());
    }
    let mut new = format!("{line}\n");
    new.push_str(&text);
    write_file(rootfs, rel, &new)
}

#[derive(Debug)]
enum ToolError {
    Spawn(io::Error),
    Failed {
        status: std::process::ExitStatus,
        tail: Vec<String>,
    },
    TimedOut {
        after: Duration,
        tail: Vec<String>,
    },
}

/// Run `cmd`, forwarding each output line (stdout and stderr) to `progress`
/// and keeping the last lines for an error message. Stops the tool (SIGTERM,
/// so mmdebstrap can unmount what it mounted, then SIGKILL) after `timeout`.
fn run_tool(
    mut cmd: Command,
    timeout: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ToolError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(ToolError::Spawn)?;
    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|r| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                buf.clear();
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);

    let start = Instant::now();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut note = |line: String, tail: &mut VecDeque<String>| {
        if line.is_empty() {
            return;
        }
        progress(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    };
    let mut exited: Option<(std::process::ExitStatus, Instant)> = None;
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => note(line, &mut tail),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if exited.is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some((status, Instant::now()));
            }
        }
        // A grandchild may keep the pipes open after the tool exits: give
        // the output a moment to drain, then stop waiting for it.
        if let Some((_, at)) = exited {
            if at.elapsed() > Duration::from_secs(2) {
                break;
            }
        } else if start.elapsed() > timeout {
            timed_out = true;
            stop_child(&mut child);
            exited = child.try_wait().ok().flatten().map(|s| (s, Instant::now()));
            break;
        }
    }
    while let Ok(line) = rx.try_recv() {
        note(line, &mut tail);
    }
    let status = match exited {
        Some((s, _)) => s,
        None => child.wait().map_err(ToolError::Spawn)?,
    };
    // Reader threads end when the pipes close; never join them, in case a
    // stray grandchild keeps a pipe open.
    drop(readers);
    let tail: Vec<String> = tail.into();
    if timed_out {
        return Err(ToolError::TimedOut {
            after: timeout,
            tail,
        });
    }
    if !status.success() {
        return Err(ToolError::Failed { status, tail });
    }
    Ok(())
}

fn stop_child(child: &mut std::process::Child) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}
