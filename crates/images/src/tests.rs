use super::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::{Arc, Mutex};

/// A scratch directory removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "gworker-images-{tag}-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Entries of the store root other than built images and the lock dir.
fn stray_entries(root: &Path) -> Vec<String> {
    fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".locks" && !BUILTIN_IMAGES.contains(&n.as_str()))
                .collect()
        })
        .unwrap_or_default()
}

/// A stand-in for mmdebstrap: `mmdebstrap [opts] SUITE TARGET [MIRROR]`.
fn fake_mmdebstrap(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake-mmdebstrap");
    let script = format!(
        "#!/bin/sh\n\
         for a; do case \"$a\" in */rootfs) target=\"$a\";; esac; done\n\
         {body}\n"
    );
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

const FAKE_OK: &str = "mkdir -p \"$target/usr/bin\" \"$target/etc\"\n\
    ln -s usr/bin \"$target/bin\"\n\
    ln -s dash \"$target/usr/bin/sh\"\n\
    touch \"$target/usr/bin/dash\" \"$target/usr/bin/python3\"\n\
    echo 'I: fake mmdebstrap done' >&2";

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn busybox_builds_with_applets_and_skeleton() {
    let dir = TestDir::new("bb");
    let store = ImageStore::new(dir.0.join("images"));
    assert!(store.ready("busybox").unwrap().is_none());
    let mut lines = Vec::new();
    let info = store
        .ensure("busybox", &mut |l| lines.push(l.to_string()))
        .unwrap();
    assert!(
        lines.iter().any(|l| l.starts_with("busybox ready in ")),
        "{lines:?}"
    );
    let r = &info.rootfs;
    assert_eq!(r, &dir.0.join("images/busybox/rootfs"));
    assert!(fsutil::is_static_elf(&r.join("bin/busybox")).unwrap());
    assert!(info.size_bytes > 500_000, "{}", info.size_bytes);
    for applet in recipe::REQUIRED_APPLETS {
        let found = ["bin", "sbin", "usr/bin", "usr/sbin"].iter().any(|d| {
            fs::read_link(r.join(d).join(applet)).is_ok_and(|t| t == Path::new("/bin/busybox"))
        });
        assert!(found, "applet {applet} missing");
    }
    assert_eq!(
        fs::read_link(r.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(mode(&r.join("tmp")), 0o1777);
    for d in ["root", "proc", "sys", "dev", "etc"] {
        assert!(r.join(d).is_dir(), "{d}");
    }
    assert_eq!(fs::read_dir(r.join(".gworker")).unwrap().count(), 0);
    assert!(fs::read_to_string(r.join("etc/passwd"))
        .unwrap()
        .starts_with("root:x:0:0:"));
    assert!(fs::read_to_string(r.join("etc/group"))
        .unwrap()
        .starts_with("root:x:0:"));
    assert!(info.env.contains(&("PATH".into(), recipe::STD_PATH.into())));
    assert!(info.env.contains(&("HOME".into(), "/root".into())));
    assert!(dir.0.join("images/busybox/image.json").is_file());
    assert!(stray_entries(&dir.0.join("images")).is_empty());

    if is_root() {
        let out = Command::new("chroot")
            .arg(r)
            .args(["/bin/sh", "-c", "echo ok; seq 3 | head -n 1"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n1\n", "{out:?}");
    }

    // Cached: no rebuild, same metadata, also through a fresh store.
    let mut again = Vec::new();
    let info2 = ImageStore::new(dir.0.join("images"))
        .ensure("busybox", &mut |l| again.push(l.to_string()))
        .unwrap();
    assert_eq!(info2, info);
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(store.list().unwrap(), vec![info.clone()]);

    assert!(store.remove("busybox").unwrap());
    assert!(store.ready("busybox").unwrap().is_none());
    assert!(!store.remove("busybox").unwrap());
    assert!(store.list().unwrap().is_empty());
    assert!(stray_entries(&dir.0.join("images")).is_empty());
}

#[test]
fn unknown_image_is_an_error() {
    let dir = TestDir::new("unknown");
    let store = ImageStore::new(&dir.0);
    assert!(!ImageStore::is_known("alpine"));
    assert!(ImageStore::is_known(DEFAULT_IMAGE));
    let err = store.ensure("alpine", &mut |_| {}).unwrap_err();
    assert!(matches!(err, ImageError::Unknown(ref n) if n == "alpine"));
    assert!(
        err.to_string()
            .starts_with("unknown image \"alpine\"; built-in images are busybox, debian-slim"),
        "{err}"
    );
    assert!(matches!(store.ready("../etc"), Ok(None)));
    assert!(matches!(
        store.remove("alpine"),
        Err(ImageError::Unknown(_))
    ));
    assert_eq!(
        fs::read_dir(&dir.0).unwrap().count(),
        0,
        "nothing created for an unknown image"
    );
}

#[test]
fn failed_build_leaves_nothing_behind() {
    let dir = TestDir::new("fail");
    let fake = fake_mmdebstrap(
        &dir.0,
        "mkdir -p \"$target/usr\"; echo partial > \"$target/usr/file\"\n\
         echo 'I: downloading packages with apt...' >&2\n\
         echo 'E: simulated failure: mirror unreachable' >&2\n\
         exit 1",
    );
    let root = dir.0.join("images");
    let store = ImageStore::new(&root).with_mmdebstrap(&fake);
    let mut lines = Vec::new();
    let err = store
        .ensure("debian-slim", &mut |l| lines.push(l.to_string()))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::Build { .. }), "{err:?}");
    assert!(msg.starts_with("cannot build image debian-slim: "), "{msg}");
    assert!(
        msg.contains("E: simulated failure: mirror unreachable"),
        "{msg}"
    );
    assert!(msg.contains("Debian mirror"), "{msg}");
    assert!(
        lines
            .iter()
            .any(|l| l == "I: downloading packages with apt..."),
        "{lines:?}"
    );
    assert!(!root.join("debian-slim").exists());
    assert!(
        stray_entries(&root).is_empty(),
        "{:?}",
        stray_entries(&root)
    );
    assert!(store.ready("debian-slim").unwrap().is_none());
}

#[test]
fn missing_tools_say_what_to_install() {
    let dir = TestDir::new("missing");
    let root = dir.0.join("images");
    let store = ImageStore::new(&root)
        .with_mmdebstrap(dir.0.join("no-such-mmdebstrap"))
        .with_busybox(dir.0.join("no-such-busybox"));
    let msg = store
        .ensure("debian-slim", &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(msg.contains("apt-get install mmdebstrap"), "{msg}");
    let msg = store
        .ensure("busybox", &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(msg.contains("apt-get install busybox-static"), "{msg}");
    // A dynamically linked busybox is refused too.
    let msg = store
        .clone()
        .with_busybox("/bin/ls")
        .ensure("busybox", &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(msg.contains("dynamically linked"), "{msg}");
    assert!(
        stray_entries(&root).is_empty(),
        "{:?}",
        stray_entries(&root)
    );
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn build_with_fake_mmdebstrap_gets_skeleton_and_env() {
    let dir = TestDir::new("fakeok");
    let fake = fake_mmdebstrap(&dir.0, FAKE_OK);
    let root = dir.0.join("images");
    // Leftovers of a crashed build are cleaned up by the next build.
    fs::create_dir_all(root.join(".build-debian-slim-1-1/rootfs/usr")).unwrap();
    let store = ImageStore::new(&root)
        .with_mmdebstrap(&fake)
        .with_debian_mirror(None);
    let mut lines = Vec::new();
    let info = store
        .ensure("debian-slim", &mut |l| lines.push(l.to_string()))
        .unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("building debian-slim (bookworm): running ")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l == "I: fake mmdebstrap done"),
        "{lines:?}"
    );
    assert!(
        lines.last().unwrap().starts_with("debian-slim ready in "),
        "{lines:?}"
    );
    let r = &info.rootfs;
    assert_eq!(mode(&r.join("tmp")), 0o1777);
    assert_eq!(mode(&r.join("root")), 0o700);
    assert!(r.join(".gworker").is_dir());
    assert!(fs::read_to_string(r.join("etc/passwd"))
        .unwrap()
        .contains("root:x:0:0:"));
    assert_eq!(
        fs::read_to_string(r.join("etc/hostname")).unwrap(),
        "gworker\n"
    );
    for (k, v) in [
        ("PATH", recipe::STD_PATH),
        ("HOME", "/root"),
        ("LANG", "C.UTF-8"),
    ] {
        assert!(
            info.env.contains(&(k.to_string(), v.to_string())),
            "{:?}",
            info.env
        );
    }
    assert!(
        stray_entries(&root).is_empty(),
        "{:?}",
        stray_entries(&root)
    );
}

#[test]
fn concurrent_ensure_builds_once() {
    let dir = TestDir::new("conc");
    let counter = dir.0.join("runs");
    let body = format!("echo run >> '{}'\nsleep 0.5\n{FAKE_OK}", counter.display());
    let fake = fake_mmdebstrap(&dir.0, &body);
    let store = ImageStore::new(dir.0.join("images")).with_mmdebstrap(&fake);
    let ready_lines = Arc::new(Mutex::new(0usize));
    let infos: Vec<ImageInfo> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                let ready_lines = ready_lines.clone();
                s.spawn(move || {
                    store
                        .ensure("debian-slim", &mut |l| {
                            if l.contains("ready in") {
                                *ready_lines.lock().unwrap() += 1;
                            }
                        })
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(fs::read_to_string(&counter).unwrap().lines().count(), 1);
    assert_eq!(*ready_lines.lock().unwrap(), 1);
    assert!(infos.windows(2).all(|w| w[0] == w[1]));

    // Same for the real busybox image.
    let done = Arc::new(Mutex::new(0usize));
    let infos: Vec<ImageInfo> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                let done = done.clone();
                s.spawn(move || {
                    store
                        .ensure("busybox", &mut |l| {
                            if l.contains("ready in") {
                                *done.lock().unwrap() += 1;
                            }
                        })
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(*done.lock().unwrap(), 1);
    assert!(infos.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn ensure_waits_for_a_lock_held_by_another_process() {
    if Command::new("flock").arg("--version").output().is_err() {
        eprintln!("flock(1) not available; skipping");
        return;
    }
    let dir = TestDir::new("xproc");
    let root = dir.0.join("images");
    let store = ImageStore::new(&root);
    fs::create_dir_all(root.join(".locks")).unwrap();
    let lock = root.join(".locks/busybox.lock");
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "1"])
        .spawn()
        .unwrap();
    // Let the other process take the lock.
    let t0 = Instant::now();
    while Command::new("flock")
        .args(["-n"])
        .arg(&lock)
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "flock(1) never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut lines = Vec::new();
    let start = Instant::now();
    store
        .ensure("busybox", &mut |l| lines.push(l.to_string()))
        .unwrap();
    assert!(lines[0].contains("waiting for another build"), "{lines:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "did not wait: {:?}",
        start.elapsed()
    );
    holder.wait().unwrap();
}

#[test]
fn corrupt_metadata_is_reported() {
    let dir = TestDir::new("corrupt");
    let root = dir.0.join("images");
    fs::create_dir_all(root.join("busybox/rootfs")).unwrap();
    fs::write(root.join("busybox/image.json"), "{not json").unwrap();
    let store = ImageStore::new(&root);
    let err = store.ready("busybox").unwrap_err();
    assert!(matches!(err, ImageError::Metadata { .. }), "{err:?}");
    assert!(err.to_string().contains("remove the image"), "{err}");
    assert!(store.remove("busybox").unwrap());
    store.ensure("busybox", &mut |_| {}).unwrap();
}

/// Really runs mmdebstrap (~20-30 s, needs root and the Debian mirror).
#[test]
#[cfg_attr(not(gworker_slow_tests), ignore = "slow: set GWORKER_SLOW_TESTS=1")]
fn debian_slim_real_build() {
    let dir = TestDir::new("debian");
    let store = ImageStore::new(dir.0.join("images"));
    let mut lines = Vec::new();
    let start = Instant::now();
    let info = store
        .ensure("debian-slim", &mut |l| {
            eprintln!("  {l}");
            lines.push(l.to_string())
        })
        .unwrap();
    eprintln!(
        "debian-slim built in {:.1} s, {} bytes",
        start.elapsed().as_secs_f64(),
        info.size_bytes
    );
    let r = &info.rootfs;
    assert!(r.join("usr/bin/python3").exists());
    assert!(r.join("bin/sh").exists());
    assert_eq!(mode(&r.join("tmp")), 0o1777);
    assert_eq!(fs::read_dir(r.join(".gworker")).unwrap().count(), 0);
    assert!(info.size_bytes > 100_000_000, "{}", info.size_bytes);
    assert!(info.env.contains(&("LANG".into(), "C.UTF-8".into())));
    // LANG's locale is in the archive (one file to map per process).
    let archive = fs::read(r.join("usr/lib/locale/locale-archive")).unwrap();
    assert!(
        archive.windows(6).any(|w| w == b"C.utf8"),
        "C.utf8 is not in the locale archive"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("I: ")),
        "no mmdebstrap output: {lines:?}"
    );
    assert!(stray_entries(&dir.0.join("images")).is_empty());
    if is_root() {
        let out = Command::new("chroot")
            .arg(r)
            .args([
                "/usr/bin/python3",
                "-c",
                "import sys; print(sys.version_info[:2])",
            ])
            .env_clear()
            .env("PATH", recipe::STD_PATH)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "(3, 11)\n", "{out:?}");
    }
    assert!(store.remove("debian-slim").unwrap());
}

#[test]
fn images_of_an_older_recipe_are_listed_as_outdated() {
    let dir = TestDir::new("outdated");
    let store = ImageStore::new(dir.0.clone());
    assert!(store.outdated_builtins().is_empty(), "nothing built");
    let meta = |v: u32| {
        format!(
            r#"{{"name":"x","recipe_version":{v},"size_bytes":0,"built_at_unix_secs":0,"env":[]}}"#
        )
    };
    fs::create_dir_all(dir.0.join("debian-slim/rootfs")).unwrap();
    fs::write(
        dir.0.join("debian-slim/image.json"),
        meta(RECIPE_VERSION - 1),
    )
    .unwrap();
    fs::create_dir_all(dir.0.join("busybox/rootfs")).unwrap();
    fs::write(dir.0.join("busybox/image.json"), meta(RECIPE_VERSION)).unwrap();
    assert_eq!(
        store.outdated_builtins(),
        vec![("debian-slim".to_string(), RECIPE_VERSION - 1)]
    );
}
