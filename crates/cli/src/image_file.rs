//! The TOML image description of `gworker image build FILE` (format in
//! [`FORMAT`], shown by `--help` and in `docs/images-cli.md`), turned into
//! the client's [`Image`] builder so the CLI and the Rust client pack and
//! check local files the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use gworker_client::Image;
use serde::Deserialize;

/// The format, for `gworker image build --help`.
pub const FORMAT: &str = r#"FILE is a TOML description: a base and ordered steps, each step one layer
(cached: an unchanged step on an unchanged base is not run again).

    base = "busybox"          # a name: busybox, debian-slim, a tag, an image ID
    # or a table with exactly one of:
    # [base]
    # debian_slim = { python_version = "3.13" }    # 3.11 (default) or 3.13
    # registry = "python:3.12-slim"                 # optional: registry_secret = "NAME"
    # name = "my-tag"

    [[step]]
    apt_install = ["jq"]                  # Debian packages
    [[step]]
    pip_install = ["six"]                 # Python packages
    [[step]]
    run_commands = ["echo hi > /hello"]   # /bin/sh -c, in order; no network
    [[step]]
    env = { GREETING = "hi" }
    [[step]]
    workdir = "/app"
    [[step]]
    add_local_file = { local = "main.py", remote = "/app/main.py" }
    [[step]]
    add_local_dir = { local = "src", remote = "/app/src" }

Each [[step]] has exactly one key. `local` paths are relative to FILE's
directory; `remote` paths are absolute, without `..` (a `remote` ending in
`/` keeps the file's name). Local files are sent with their permission bits,
owned by root; their content is part of the image ID."#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDef {
    base: toml::Value,
    #[serde(default)]
    step: Vec<StepDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BaseTable {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    debian_slim: Option<DebianSlim>,
    #[serde(default)]
    registry: Option<String>,
    #[serde(default)]
    registry_secret: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DebianSlim {
    #[serde(default)]
    python_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum StepDef {
    AptInstall(Vec<String>),
    PipInstall(Vec<String>),
    RunCommands(Vec<String>),
    Env(BTreeMap<String, String>),
    Workdir(String),
    AddLocalFile(LocalDef),
    AddLocalDir(LocalDef),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalDef {
    local: PathBuf,
    remote: String,
}

/// Reads and checks the description at `path`.
pub fn load(path: &Path) -> anyhow::Result<Image> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read image description {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    parse(&text, dir).with_context(|| format!("in {}", path.display()))
}

/// Parses a description; relative `local` paths are taken from `dir`.
pub fn parse(text: &str, dir: &Path) -> anyhow::Result<Image> {
    let def: FileDef = toml::from_str(text).map_err(|e| {
        // toml's words for a step table with two keys.
        if e.message().contains("wanted exactly 1 element") {
            anyhow::anyhow!("{e}(each [[step]] has exactly one key)")
        } else {
            e.into()
        }
    })?;
    let mut image = base(def.base)?;
    for (i, step) in def.step.into_iter().enumerate() {
        let n = i + 1;
        image = match step {
            StepDef::AptInstall(p) => image.apt_install(p),
            StepDef::PipInstall(p) => image.pip_install(p),
            StepDef::RunCommands(c) => image.run_commands(c),
            StepDef::Env(e) => image.env(e),
            StepDef::Workdir(w) => image.workdir(w),
            StepDef::AddLocalFile(l) => image
                .add_local_file(dir.join(&l.local), &l.remote)
                .with_context(|| format!("step {n}"))?,
            StepDef::AddLocalDir(l) => image
                .add_local_dir(dir.join(&l.local), &l.remote)
                .with_context(|| format!("step {n}"))?,
        };
    }
    Ok(image)
}

fn base(v: toml::Value) -> anyhow::Result<Image> {
    let t = match v {
        toml::Value::String(name) => return Ok(Image::from_name(name)),
        toml::Value::Table(t) => t,
        other => bail!(
            "`base` must be a name or a table, not a {}",
            other.type_str()
        ),
    };
    let b: BaseTable = t.try_into().context("in [base]")?;
    match (b.name, b.debian_slim, b.registry, b.registry_secret) {
        (Some(name), None, None, None) => Ok(Image::from_name(name)),
        (None, Some(d), None, None) => Ok(Image::debian_slim(d.python_version.as_deref())?),
        (None, None, Some(r), None) => Ok(Image::from_registry(r)),
        (None, None, Some(r), Some(s)) => Ok(Image::from_registry_with_secret(r, s)),
        (_, _, None, Some(_)) => bail!("[base]: `registry_secret` goes with `registry`"),
        _ => bail!("[base] needs exactly one of `name`, `debian_slim`, `registry`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("gw-imgfile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("src")).unwrap();
        std::fs::write(d.join("main.py"), "print(1)\n").unwrap();
        std::fs::write(d.join("src/lib.py"), "x = 1\n").unwrap();
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

    fn err(text: &str, d: &Path) -> String {
        format!("{:#}", parse(text, d).unwrap_err())
    }

    #[test]
    fn the_documented_example_parses() {
        let d = dir("example");
        let text = r#"
base = "debian-slim"
[[step]]
apt_install = ["jq"]
[[step]]
pip_install = ["six"]
[[step]]
run_commands = ["echo hi > /hello"]
[[step]]
env = { GREETING = "hi" }
[[step]]
workdir = "/app"
[[step]]
add_local_file = { local = "main.py", remote = "/app/main.py" }
[[step]]
add_local_dir = { local = "src", remote = "/app/src" }
"#;
        let want = Image::from_name("debian-slim")
            .apt_install(["jq"])
            .pip_install(["six"])
            .run_commands(["echo hi > /hello"])
            .env([("GREETING", "hi")])
            .workdir("/app")
            .add_local_file(d.join("main.py"), "/app/main.py")
            .unwrap()
            .add_local_dir(d.join("src"), "/app/src")
            .unwrap();
        assert_eq!(parse(text, &d).unwrap(), want);
        // So does the example `--help` shows.
        let doc: String = FORMAT
            .lines()
            .skip_while(|l| !l.contains("base = "))
            .take_while(|l| !l.starts_with("Each [[step]]"))
            .map(|l| format!("{}\n", l.trim_start()))
            .collect();
        assert!(doc.contains("add_local_dir"), "{doc}");
        assert!(parse(&doc, &d).is_ok(), "{doc}");
    }

    #[test]
    fn bases() {
        let d = dir("bases");
        assert_eq!(
            parse(r#"base = "busybox""#, &d).unwrap().name(),
            Some("busybox")
        );
        assert_eq!(
            parse("[base]\ndebian_slim = { python_version = \"3.13\" }", &d).unwrap(),
            Image::debian_slim(Some("3.13")).unwrap()
        );
        assert_eq!(
            parse("[base]\ndebian_slim = {}", &d).unwrap(),
            Image::debian_slim(None).unwrap()
        );
        assert_eq!(
            parse(
                "[base]\nregistry = \"python:3.12-slim\"\nregistry_secret = \"hub\"",
                &d
            )
            .unwrap(),
            Image::from_registry_with_secret("python:3.12-slim", "hub")
        );
        assert_eq!(
            parse("[base]\nname = \"mine\"", &d).unwrap(),
            Image::from_name("mine")
        );
        let e = err("[base]\ndebian_slim = { python_version = \"3.9\" }", &d);
        assert!(e.contains("3.9") && e.contains("3.11, 3.13"), "{e}");
        assert!(err("[base]\nname = \"a\"\nregistry = \"b\"", &d).contains("exactly one"));
        assert!(err("[base]\n", &d).contains("exactly one"));
        assert!(err("[base]\nregistry_secret = \"s\"", &d).contains("goes with"));
        assert!(err("[base]\nregistri = \"x\"", &d).contains("registri"));
        assert!(err("base = 3", &d).contains("name or a table"));
        assert!(err("[[step]]\nworkdir = \"/a\"", &d).contains("base"));
    }

    #[test]
    fn steps_are_checked() {
        let d = dir("steps");
        let e = err("base = \"busybox\"\n[[step]]\napt_instal = [\"jq\"]", &d);
        assert!(e.contains("apt_instal") && e.contains("apt_install"), "{e}");
        let e = err(
            "base = \"busybox\"\n[[step]]\nworkdir = \"/a\"\nenv = { A = \"b\" }",
            &d,
        );
        assert!(
            e.contains("line 2") && e.contains("exactly one key"),
            "two keys in one step: {e}"
        );
        let e = err("base = \"busybox\"\n[[step]]\nrun_commands = \"echo\"", &d);
        assert!(e.contains("sequence") || e.contains("array"), "{e}");
        let e = err("base = \"busybox\"\nsteps = []", &d);
        assert!(e.contains("steps"), "{e}");
        // Local paths: relative to the file's directory, checked at once.
        let e = err(
            "base = \"busybox\"\n[[step]]\nadd_local_file = { local = \"missing.py\", remote = \"/app/m.py\" }",
            &d,
        );
        assert!(
            e.contains("step 1") && e.contains("missing.py") && e.contains("does not exist"),
            "{e}"
        );
        let e = err(
            "base = \"busybox\"\n[[step]]\nworkdir = \"/a\"\n[[step]]\nadd_local_dir = { local = \"src\", remote = \"/app/../etc\" }",
            &d,
        );
        assert!(e.contains("step 2") && e.contains(".."), "{e}");
        let e = err(
            "base = \"busybox\"\n[[step]]\nadd_local_file = { local = \"main.py\", remote = \"app.py\" }",
            &d,
        );
        assert!(e.contains("absolute"), "{e}");
        let e = err(
            "base = \"busybox\"\n[[step]]\nadd_local_file = { local = \"main.py\" }",
            &d,
        );
        assert!(e.contains("remote"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let d = dir("load");
        let missing = d.join("nope.toml");
        let e = format!("{:#}", load(&missing).unwrap_err());
        assert!(e.contains("nope.toml"), "{e}");
        std::fs::write(
            d.join("img.toml"),
            "base = \"busybox\"\n[[step]]\nbogus = 1\n",
        )
        .unwrap();
        let e = format!("{:#}", load(&d.join("img.toml")).unwrap_err());
        assert!(e.contains("img.toml") && e.contains("bogus"), "{e}");
        std::fs::write(
            d.join("img.toml"),
            "base = \"busybox\"\n[[step]]\nadd_local_file = { local = \"main.py\", remote = \"/m.py\" }\n",
        )
        .unwrap();
        assert!(load(&d.join("img.toml")).is_ok());
    }
}
