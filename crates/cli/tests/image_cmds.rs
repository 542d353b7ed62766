//! `gworker image ...` as a real binary against a real daemon: images built
//! from a TOML description, checked from inside a sandbox started from them;
//! the layer cache, failing steps, ls / info / rm / gc.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{daemon_or_skip, stderr, stdout, BIN};

/// A project directory with an image description and the files it adds.
fn project(name: &str, toml: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("gwc-cli-img-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("src/sub")).unwrap();
    std::fs::write(d.join("hello.sh"), "#!/bin/sh\necho hello from the image\n").unwrap();
    std::fs::set_permissions(d.join("hello.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(d.join("src/a.txt"), "a\n").unwrap();
    std::fs::write(d.join("src/sub/b.txt"), "b\n").unwrap();
    std::fs::write(d.join("image.toml"), toml).unwrap();
    TempDir(d)
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const DEMO: &str = r#"
base = "busybox"
[[step]]
run_commands = ["echo built > /built", "echo twice >> /built"]
[[step]]
env = { GREETING = "hi there" }
[[step]]
workdir = "/app"
[[step]]
add_local_file = { local = "hello.sh", remote = "/app/hello.sh" }
[[step]]
add_local_dir = { local = "src", remote = "/app/src" }
"#;

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}",
        o.status,
        stderr(&o)
    );
    stdout(&o)
}

/// The `[i/n] ...` progress lines of a build's stderr.
fn step_lines(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.starts_with('[')).collect()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn build_from_toml_run_a_sandbox_from_it_then_cache_ls_rm_gc() {
    let d = daemon_or_skip!();
    let proj = project("demo", DEMO);
    let file = proj.join("image.toml");

    let o = d.gw(&["image", "build", path_str(&file), "--tag", "demo"]);
    let err = stderr(&o);
    let id = ok(o, "image build").trim().to_string();
    assert!(id.starts_with("im-"), "{id:?}");
    let steps = step_lines(&err);
    assert_eq!(steps.len(), 6, "{err}");
    assert!(steps[0].starts_with("[1/6] "), "{err}");
    assert!(
        steps[1].starts_with("[2/6] run_commands echo built > /built")
            && !steps[1].ends_with("(cached)"),
        "{err}"
    );

    // The same description again: every layer is cached, the same image.
    let o = d.gw(&["image", "build", path_str(&file), "--json"]);
    let err = stderr(&o);
    let info: serde_json::Value = serde_json::from_str(&ok(o, "second build")).unwrap();
    assert_eq!(info["image_id"], id.as_str());
    assert_eq!(info["env"]["GREETING"], "hi there");
    assert_eq!(info["workdir"], "/app");
    let steps = step_lines(&err);
    assert_eq!(steps.len(), 6, "{err}");
    assert!(steps.iter().all(|l| l.ends_with("(cached)")), "{err}");

    // A sandbox from the tag: files, modes, env and workdir as described.
    let sb = ok(
        d.gw(&[
            "sandbox", "create", "--image", "demo", "--timeout", "120", "--",
            "sh", "-c",
            "cat /built; echo \"$GREETING\"; pwd; ./hello.sh; stat -c %a hello.sh; cat src/a.txt src/sub/b.txt",
        ]),
        "sandbox create",
    );
    let sb = sb.trim();
    assert_eq!(ok(d.gw(&["sandbox", "wait", sb]), "wait").trim(), "0");
    assert_eq!(
        ok(d.gw(&["sandbox", "logs", sb]), "logs"),
        "built\ntwice\nhi there\n/app\nhello from the image\n755\na\nb\n"
    );

    // `--image FILE.toml` builds (cached) and starts at once.
    let o = d.gw(&[
        "sandbox",
        "create",
        "--image",
        path_str(&file),
        "--timeout",
        "120",
        "--",
        "cat",
        "/built",
    ]);
    let sb2 = ok(o, "create --image FILE").trim().to_string();
    ok(d.gw(&["sandbox", "wait", &sb2]), "wait");
    assert_eq!(
        ok(d.gw(&["sandbox", "logs", &sb2]), "logs"),
        "built\ntwice\n"
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ok(
            d.gw(&["sandbox", "info", &sb2, "--json"]),
            "info"
        ))
        .unwrap()["image"],
        id.as_str()
    );

    // A changed local file: another image, only the layers from it on rebuilt.
    std::fs::write(proj.join("src/a.txt"), "a changed\n").unwrap();
    let o = d.gw(&["image", "build", path_str(&file)]);
    let err = stderr(&o);
    let id2 = ok(o, "rebuild").trim().to_string();
    assert_ne!(id2, id);
    let steps = step_lines(&err);
    assert!(steps[..5].iter().all(|l| l.ends_with("(cached)")), "{err}");
    assert!(!steps[5].ends_with("(cached)"), "{err}");

    // ls, info, rm (tag, then ID), gc.
    let list: serde_json::Value =
        serde_json::from_str(&ok(d.gw(&["image", "ls", "--json"]), "ls --json")).unwrap();
    let mine = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image_id"] == id.as_str())
        .expect("listed");
    assert_eq!(mine["tags"], serde_json::json!(["demo"]));
    let table = ok(d.gw(&["image", "ls"]), "ls");
    assert!(table.starts_with("IMAGE ID"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("demo") && l.contains("busybox +5 steps")),
        "{table}"
    );
    let shown = ok(d.gw(&["image", "info", "demo"]), "info");
    assert!(
        shown.contains(&id) && shown.contains("GREETING=hi there"),
        "{shown}"
    );

    // Terminate the sandboxes first: an image in use cannot be removed.
    for s in [sb, sb2.as_str()] {
        ok(d.gw(&["sandbox", "terminate", s]), "terminate");
    }
    ok(d.gw(&["image", "rm", "demo"]), "rm tag");
    let o = d.gw(&["image", "info", "demo"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no image \"demo\""), "{}", stderr(&o));
    ok(
        d.gw(&["image", "info", &id]),
        "info by ID after the tag is gone",
    );
    ok(d.gw(&["image", "rm", &id, &id2]), "rm IDs");
    let o = d.gw(&["image", "info", &id]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let gc: serde_json::Value =
        serde_json::from_str(&ok(d.gw(&["image", "gc", "--json"]), "gc")).unwrap();
    // Six layers: five steps, and the changed directory's. (Uploaded blobs
    // stay for an hour: they may belong to a build about to start.)
    assert!(gc["removed_layers"].as_u64().unwrap() >= 6, "{gc}");
    let again = ok(d.gw(&["image", "gc"]), "gc again");
    assert!(again.starts_with("removed 0 layers and 0 blobs"), "{again}");
}

#[test]
fn a_failing_step_reports_its_exit_code_and_output() {
    let d = daemon_or_skip!();
    let proj = project(
        "fail",
        "base = \"busybox\"\n[[step]]\nrun_commands = [\"echo fine\", \"echo about to fail; echo on stderr >&2; exit 3\"]\n",
    );
    let o = d.gw(&["image", "build", path_str(&proj.join("image.toml"))]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(stdout(&o).is_empty());
    assert!(
        err.contains("image_build_failed") && err.contains("exit code 3"),
        "{err}"
    );
    let tail = err
        .split("output of the failed step")
        .nth(1)
        .unwrap_or_default();
    assert!(
        tail.contains("about to fail") && tail.contains("on stderr"),
        "{err}"
    );
    // The log lines streamed while it ran.
    assert!(err.contains("    about to fail"), "{err}");
}

#[test]
fn plain_names_pull_errors_and_unknown_images() {
    let d = daemon_or_skip!();
    // A built-in name: made sure it is built.
    let o = d.gw(&["image", "build", "busybox", "--quiet"]);
    assert!(stderr(&o).is_empty(), "--quiet: {}", stderr(&o));
    assert!(!ok(o, "build busybox").trim().is_empty());
    let o = d.gw(&["image", "build", "no-such-image"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no-such-image"), "{}", stderr(&o));
    let o = d.gw(&["image", "rm", "no-such-image"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no image \"no-such-image\""),
        "{}",
        stderr(&o)
    );
    // A registry nobody listens on: a registry error, not a hang.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = d.gw(&["image", "pull", &format!("127.0.0.1:{port}/nothing:1")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("registry_failed"), "{}", stderr(&o));
}

/// Checked by the client before anything is sent: no daemon needed.
#[test]
fn bad_descriptions_are_refused_before_sending() {
    let nowhere = "unix:///nonexistent/gw.sock";
    let run = |toml: &str, name: &str| {
        let proj = project(name, toml);
        let o = Command::new(BIN)
            .args(["image", "build", path_str(&proj.join("image.toml"))])
            .env("GWORKER_URL", nowhere)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        stderr(&o)
    };
    let e = run(
        "base = \"busybox\"\n[[step]]\nadd_local_dir = { local = \"src\", remote = \"/app/../etc\" }\n",
        "dotdot",
    );
    assert!(
        e.contains("image.toml") && e.contains("step 1") && e.contains(".."),
        "{e}"
    );
    assert!(!e.contains("cannot reach"), "refused before sending: {e}");
    let e = run(
        "base = \"busybox\"\n[[step]]\nadd_local_file = { local = \"missing.py\", remote = \"/app/m.py\" }\n",
        "missing",
    );
    assert!(
        e.contains("missing.py") && e.contains("does not exist"),
        "{e}"
    );
    let e = run(
        "[base]\ndebian_slim = { python_version = \"2.7\" }\n",
        "python",
    );
    assert!(e.contains("2.7") && e.contains("3.11"), "{e}");
    let e = run(
        "base = \"busybox\"\n[[step]]\nworkdir = \"/a\"\nenv = { A = \"b\" }\n",
        "twokeys",
    );
    assert!(e.contains("line 2") && e.contains("one key"), "{e}");
    // The same through `sandbox create --image FILE`.
    let proj = project("create", "base = \"busybox\"\n[[step]]\nadd_local_file = { local = \"hello.sh\", remote = \"rel\" }\n");
    let o = Command::new(BIN)
        .args([
            "sandbox",
            "create",
            "--image",
            path_str(&proj.join("image.toml")),
        ])
        .env("GWORKER_URL", nowhere)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("absolute"), "{}", stderr(&o));
}

#[test]
fn image_help_documents_the_format() {
    let o = Command::new(BIN)
        .args(["image", "build", "--help"])
        .output()
        .unwrap();
    let h = stdout(&o);
    for key in [
        "[[step]]",
        "apt_install",
        "pip_install",
        "run_commands",
        "env",
        "workdir",
        "add_local_file",
        "add_local_dir",
        "debian_slim",
        "registry_secret",
        "--tag",
        "--json",
    ] {
        assert!(h.contains(key), "{key} missing from:\n{h}");
    }
    for sub in ["pull", "ls", "info", "rm", "gc"] {
        let o = Command::new(BIN)
            .args(["image", sub, "--help"])
            .output()
            .unwrap();
        assert!(o.status.success() && stdout(&o).contains("--url"), "{sub}");
    }
}

#[test]
fn pull_from_a_registry_with_progress_then_run_it() {
    let d = daemon_or_skip!();
    let Some(reg) = common::Registry::start(&["--big-mb", "4"]) else {
        return;
    };
    let reference = format!("{}/test/img:v1", reg.host);
    let o = d.gw(&["image", "pull", &reference, "--tag", "pulled", "--json"]);
    let err = stderr(&o);
    let info: serde_json::Value = serde_json::from_str(&ok(o, "image pull")).unwrap();
    assert!(
        info["image_id"].as_str().unwrap().starts_with("im-"),
        "{info}"
    );
    assert_eq!(info["tags"], serde_json::json!(["pulled"]));
    assert_eq!(info["workdir"], "/app");
    assert_eq!(info["env"]["GREETING"], "hello world");
    // Per-layer progress, indented under the step.
    assert!(err.starts_with("[1/1] "), "{err}");
    assert!(err.lines().any(|l| l.starts_with("    layer")), "{err}");

    let sb = ok(
        d.gw(&[
            "sandbox",
            "create",
            "--image",
            "pulled",
            "--timeout",
            "120",
            "--",
            "sh",
            "-c",
            "cat /app/data.txt; echo \"$GREETING\"; pwd",
        ]),
        "create from the pulled image",
    );
    ok(d.gw(&["sandbox", "wait", sb.trim()]), "wait");
    assert_eq!(
        ok(d.gw(&["sandbox", "logs", sb.trim()]), "logs"),
        "v2\nhello world\n/app\n"
    );
    // A description on top of a registry base.
    let proj = project(
        "onreg",
        &format!(
            "[base]\nregistry = \"{reference}\"\n[[step]]\nrun_commands = [\"cat /app/data.txt > /copied\"]\n"
        ),
    );
    let id = ok(
        d.gw(&[
            "image",
            "build",
            path_str(&proj.join("image.toml")),
            "--quiet",
        ]),
        "build on a registry base",
    );
    let table = ok(d.gw(&["image", "ls"]), "ls");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(id.trim())
                && l.contains(&format!("registry {reference} +1 step"))),
        "{table}"
    );
}

/// Debian packages and PyPI over the build's network (slow: a Debian root
/// is made with mmdebstrap the first time; set GWORKER_SLOW_TESTS=1).
#[test]
fn debian_slim_with_apt_and_pip_steps() {
    if std::env::var("GWORKER_SLOW_TESTS").as_deref() != Ok("1") {
        eprintln!("skipping: slow (set GWORKER_SLOW_TESTS=1)");
        return;
    }
    let d = daemon_or_skip!();
    let proj = project(
        "debian",
        "[base]\ndebian_slim = { python_version = \"3.11\" }\n\
         [[step]]\napt_install = [\"jq\"]\n[[step]]\npip_install = [\"six\"]\n",
    );
    let o = d.gw(&["image", "build", path_str(&proj.join("image.toml"))]);
    let err = stderr(&o);
    let id = ok(o, "build").trim().to_string();
    let steps = step_lines(&err);
    assert!(
        steps.len() == 3
            && steps[1].starts_with("[2/3] apt_install jq")
            && steps[2].starts_with("[3/3] pip_install six"),
        "{err}"
    );
    let sb = ok(
        d.gw(&[
            "sandbox", "create", "--image", &id, "--timeout", "120", "--", "sh", "-c",
            "echo '{\"a\": 41}' | jq '.a + 1'; python3 -c 'import six, sys; print(six.__name__, sys.version_info[:2])'",
        ]),
        "create",
    );
    ok(d.gw(&["sandbox", "wait", sb.trim()]), "wait");
    assert_eq!(
        ok(d.gw(&["sandbox", "logs", sb.trim()]), "logs"),
        "42\nsix (3, 11)\n"
    );
}

/// `image build NAME --data-dir DIR` builds a built-in without a daemon,
/// prints its rootfs, and prints nothing else with `--quiet`.
#[test]
fn offline_build_into_a_data_dir_honours_quiet() {
    let dir = TempDir(std::env::temp_dir().join(format!("gwc-cli-offline-{}", std::process::id())));
    let data = path_str(&dir).to_string();
    let loud = Command::new(BIN)
        .args(["image", "build", "busybox", "--data-dir", &data])
        .output()
        .unwrap();
    let rootfs = ok(loud.clone(), "image build --data-dir");
    assert!(
        stderr(&loud).contains("building busybox"),
        "{}",
        stderr(&loud)
    );
    assert!(Path::new(rootfs.trim()).join("bin/sh").exists(), "{rootfs}");
    let quiet = Command::new(BIN)
        .args(["image", "build", "busybox", "--data-dir", &data, "--quiet"])
        .output()
        .unwrap();
    assert_eq!(ok(quiet.clone(), "image build --data-dir --quiet"), rootfs);
    assert_eq!(stderr(&quiet), "", "--quiet printed progress");
}
