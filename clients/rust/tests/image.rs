//! Images through the Rust client against a real daemon: an [`Image`] built
//! (with local files) and checked from inside a sandbox started from it,
//! the layer cache, a failing step, lookups, removal and gc.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::daemon_or_skip;
use gworker_client::api::BuildEvent;
use gworker_client::{shell, CreateOptions, Error, ErrorCode, ExecOptions, Image, Images, Sandbox};

fn local_files(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("gwc-rs-img-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("lib/deep")).unwrap();
    std::fs::write(d.join("tool.sh"), "#!/bin/sh\necho tool says $1\n").unwrap();
    std::fs::set_permissions(d.join("tool.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(d.join("lib/one.txt"), "one\n").unwrap();
    std::fs::write(d.join("lib/deep/two.txt"), "two\n").unwrap();
    std::os::unix::fs::symlink("one.txt", d.join("lib/link")).unwrap();
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

fn image(files: &std::path::Path) -> Image {
    Image::from_name("busybox")
        .run_commands(["mkdir -p /data", "echo built > /data/marker"])
        .env([("GREETING", "hej"), ("OTHER", "x y")])
        .workdir("/srv")
        .add_local_file(files.join("tool.sh"), "/usr/local/bin/tool")
        .unwrap()
        .add_local_dir(files.join("lib"), "/srv/lib")
        .unwrap()
}

/// Builds quietly, collecting the events.
async fn build(
    client: &gworker_client::Client,
    img: &Image,
) -> (
    gworker_client::Result<gworker_client::api::ImageInfo>,
    Vec<BuildEvent>,
) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e2 = events.clone();
    let r = img
        .build_with(client, None, move |e| e2.lock().unwrap().push(e.clone()))
        .await;
    let events = events.lock().unwrap().clone();
    (r, events)
}

fn steps(events: &[BuildEvent]) -> Vec<(usize, usize, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Step {
                index,
                total,
                cached,
                ..
            } => Some((*index, *total, *cached)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn built_image_is_what_the_sandbox_sees_and_is_cached() {
    let d = daemon_or_skip!();
    let c = d.client();
    let files = local_files("main");
    let img = image(&files);
    assert_eq!(img.name(), None);

    // Sandbox::create builds it first.
    let sb = Sandbox::create(
        &c,
        CreateOptions {
            image: Some(img.clone()),
            quiet_build: true,
            timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let p = sb
        .exec(ExecOptions::new(shell(
            "cat /data/marker; echo \"$GREETING|$OTHER\"; pwd; tool works; \
             stat -c '%a %u:%g' /usr/local/bin/tool; cat lib/one.txt lib/deep/two.txt; readlink lib/link",
        )))
        .await
        .unwrap();
    let (out, err) = tokio::join!(p.stdout().read_to_string(), p.stderr().read_to_string());
    assert_eq!(p.wait(None).await.unwrap(), 0, "stderr: {}", err.unwrap());
    assert_eq!(
        out.unwrap(),
        "built\nhej|x y\n/srv\ntool says works\n755 0:0\none\ntwo\none.txt\n"
    );
    // The sandbox's own env wins over the image's.
    let p = sb
        .exec(ExecOptions {
            cmd: shell("echo $GREETING"),
            env: BTreeMap::from([("GREETING".into(), "mine".into())]),
            workdir: None,
        })
        .await
        .unwrap();
    assert_eq!(p.stdout().read_to_string().await.unwrap(), "mine\n");
    let image_id = sb.info().await.unwrap().image;
    assert!(image_id.starts_with("im-"), "{image_id}");

    // Built again: every step cached, the same ID.
    let (info, events) = build(&c, &img).await;
    let info = info.unwrap();
    assert_eq!(info.image_id, image_id);
    let s = steps(&events);
    assert_eq!(s.len(), 6, "{events:?}");
    assert!(
        s.iter()
            .enumerate()
            .all(|(i, (idx, total, cached))| *idx == i + 1 && *total == 6 && *cached),
        "{s:?}"
    );
    assert!(matches!(events.last(), Some(BuildEvent::Done { .. })));
    assert_eq!(info.workdir.as_deref(), Some("/srv"));
    assert_eq!(info.env.get("GREETING").map(String::as_str), Some("hej"));

    // The same files under another path: the same blob, so the same image.
    let copy = local_files("copy");
    let (info2, _) = build(&c, &image(&copy)).await;
    assert_eq!(info2.unwrap().image_id, image_id);
    // A changed file: a new image; the steps before it stay cached.
    std::fs::write(copy.join("lib/deep/two.txt"), "2\n").unwrap();
    let (info3, events) = build(&c, &image(&copy)).await;
    let info3 = info3.unwrap();
    assert_ne!(info3.image_id, image_id);
    let cached: Vec<bool> = steps(&events).iter().map(|s| s.2).collect();
    assert_eq!(cached, [true, true, true, true, true, false]);

    // A tag, lookups by tag and ID, listing.
    let tagged = img.build_with(&c, Some("rs-demo"), |_| {}).await.unwrap();
    assert_eq!(tagged.image_id, image_id);
    assert_eq!(Images::get(&c, "rs-demo").await.unwrap().image_id, image_id);
    assert!(Images::get(&c, &image_id)
        .await
        .unwrap()
        .tags
        .contains(&"rs-demo".to_string()));
    let listed = Images::list(&c).await.unwrap();
    assert!(listed.iter().any(|i| i.image_id == info3.image_id));
    // From the tag, without a build.
    let by_tag = Image::from_name("rs-demo");
    assert_eq!(by_tag.name(), Some("rs-demo"));
    let sb2 = Sandbox::create(
        &c,
        CreateOptions {
            cmd: shell("cat /data/marker"),
            image: Some(by_tag),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(sb2.wait(None).await.unwrap(), 0);
    assert_eq!(sb2.stdout().read_to_string().await.unwrap(), "built\n");

    // In use: not removable. Then removed, and its layers collected.
    let e = Images::delete(&c, &image_id).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Conflict), "{e}");
    sb.terminate().await.unwrap();
    sb2.terminate().await.unwrap();
    Images::delete(&c, "rs-demo").await.unwrap();
    assert!(Images::get(&c, "rs-demo").await.unwrap_err().is_not_found());
    Images::delete(&c, &image_id).await.unwrap();
    Images::delete(&c, &info3.image_id).await.unwrap();
    assert!(Images::get(&c, &image_id).await.unwrap_err().is_not_found());
    let gc = Images::gc(&c).await.unwrap();
    // (Uploaded blobs stay for an hour: they may belong to a build about to start.)
    assert!(gc.removed_layers >= 6, "{gc:?}");
}

#[tokio::test]
async fn failing_step_is_a_build_error_with_exit_code_and_output() {
    let d = daemon_or_skip!();
    let c = d.client();
    let img = Image::from_name("busybox").run_commands(["echo first", "echo doomed; exit 7"]);
    let (r, events) = build(&c, &img).await;
    match r {
        Err(Error::Build {
            code: ErrorCode::ImageBuildFailed,
            ref message,
            exit_code: Some(7),
            output: Some(ref output),
        }) => {
            assert!(output.contains("doomed"), "{output}");
            assert!(!message.is_empty());
        }
        r => panic!("expected a build error, got {r:?}"),
    }
    assert!(r.unwrap_err().is_build_failure());
    assert!(
        events
            .iter()
            .any(|e| matches!(e, BuildEvent::Log { line } if line.contains("doomed"))),
        "{events:?}"
    );
    // Through create: the same error, and no sandbox.
    let e = Sandbox::create(
        &c,
        CreateOptions {
            image: Some(img),
            quiet_build: true,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(e.is_build_failure(), "{e}");
    assert!(e.to_string().contains("exit code 7"), "{e}");
    assert!(Sandbox::list(&c).await.unwrap().is_empty());

    // Invalid before the build starts: a plain API error.
    let e = Image::from_name("busybox")
        .workdir("relative")
        .build_with(&c, None, |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    let e = Image::from_name("no-such-base")
        .run_commands(["true"])
        .build_with(&c, None, |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    // Refused by the client: nothing sent.
    let files = local_files("bad");
    let e = Image::from_name("busybox")
        .add_local_file(files.join("tool.sh"), "/usr/../etc/tool")
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(ref m) if m.contains("..")),
        "{e}"
    );
}

#[tokio::test]
async fn registry_images_with_and_without_credentials() {
    let d = daemon_or_skip!();
    let Some(reg) = common::Registry::start(&["--user", "gw", "--password", "s3cret"]) else {
        return;
    };
    let c = d.client();
    let reference = format!("{}/test/img:v1", reg.host);

    // Without credentials the registry refuses.
    let e = Image::from_registry(&reference)
        .build_with(&c, None, |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RegistryFailed), "{e}");
    assert!(!e.is_build_failure());

    gworker_client::Secrets::create(
        &c,
        "regcreds",
        BTreeMap::from([
            ("REGISTRY_USERNAME".to_string(), "gw".to_string()),
            ("REGISTRY_PASSWORD".to_string(), "s3cret".to_string()),
        ]),
        false,
    )
    .await
    .unwrap();
    let img = Image::from_registry_with_secret(&reference, "regcreds")
        .run_commands(["echo on top > /top"]);
    let sb = Sandbox::create(
        &c,
        CreateOptions {
            cmd: shell("cat /top /app/data.txt; echo \"$GREETING\"; pwd"),
            image: Some(img),
            quiet_build: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(sb.wait(None).await.unwrap(), 0);
    assert_eq!(
        sb.stdout().read_to_string().await.unwrap(),
        "on top\nv2\nhello world\n/app\n"
    );

    // An explicit pull (again, though cached) with a tag.
    let events = Arc::new(Mutex::new(Vec::new()));
    let e2 = events.clone();
    let info = Images::pull(
        &c,
        &reference,
        Some("regcreds"),
        Some("pulled-rs"),
        move |e| e2.lock().unwrap().push(e.clone()),
    )
    .await
    .unwrap();
    assert_eq!(info.tags, ["pulled-rs"]);
    assert_eq!(
        info.env.get("GREETING").map(String::as_str),
        Some("hello world")
    );
    let events = events.lock().unwrap();
    assert!(
        matches!(
            events.first(),
            Some(BuildEvent::Step {
                index: 1,
                total: 1,
                ..
            })
        ),
        "{events:?}"
    );
    assert!(
        matches!(events.last(), Some(BuildEvent::Done { .. })),
        "{events:?}"
    );
}
