//! `gworker image ...`: build (from a TOML description or a built-in name),
//! pull, list, inspect, remove, collect garbage — through the daemon, like
//! the `sandbox` commands. Progress goes to stderr (the client's
//! [`BuildPrinter`]); stdout gets the result (an image ID, or JSON).
//!
//! Exit codes: 0 on success, 1 on any error (the daemon's message, and for a
//! failed step its exit code and the tail of its output, on stderr).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use gworker_client::api::{BuildEvent, ImageBase, ImageInfo, ImageSpec};
use gworker_client::{human_bytes, BuildPrinter, Error, Image, Images};

use crate::client_cmds::{
    age, block_on, client, fail, now_secs, print_table, to_json, CmdResult, Conn, Failure,
};
use crate::image_file;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Build an image from a TOML description (FILE), or make sure a built-in
    /// image (busybox, debian-slim) is built (NAME); prints the image ID.
    #[command(after_long_help = image_file::FORMAT)]
    Build(BuildArgs),
    /// Pull an image from an OCI / Docker registry (again, even if cached); prints its ID.
    Pull(PullArgs),
    /// List images (built-in, built and pulled).
    Ls(LsArgs),
    /// Show an image (by name, tag or ID).
    #[command(visible_alias = "inspect")]
    Info(InfoArgs),
    /// Remove a tag (only the tag) or an image by ID (the image and its tags).
    ///
    /// Refused while a running sandbox uses the image. Layers stay until `image gc`.
    Rm(RmArgs),
    /// Delete layers and uploaded files no image uses any more.
    Gc(GcArgs),
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// A TOML image description (see below; a path ending in .toml, or any
    /// existing file), else an image name (built-in, tag or ID).
    #[arg(value_name = "FILE|NAME")]
    source: String,
    /// Also name the image TAG (usable as `--image TAG`).
    #[arg(long, value_name = "TAG")]
    tag: Option<String>,
    /// Print the built image as JSON (an ImageInfo object) instead of its ID.
    #[arg(long)]
    json: bool,
    /// Print no progress (errors are still printed).
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Build a built-in image straight into this data directory, without a
    /// daemon (for preparing data directories; NAME only).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["tag", "json"])]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// e.g. python:3.12-slim, 127.0.0.1:5000/team/tool@sha256:...
    #[arg(value_name = "REF")]
    reference: String,
    /// A stored secret with REGISTRY_USERNAME and REGISTRY_PASSWORD.
    #[arg(long, value_name = "NAME")]
    secret: Option<String>,
    /// Also name the image TAG.
    #[arg(long, value_name = "TAG")]
    tag: Option<String>,
    /// Print the image as JSON (an ImageInfo object) instead of its ID.
    #[arg(long)]
    json: bool,
    /// Print no progress.
    #[arg(long, short = 'q')]
    quiet: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Print a JSON array of ImageInfo objects.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Print the ImageInfo object as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
    /// A built-in name, a tag or an image ID.
    name: String,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    #[command(flatten)]
    conn: Conn,
    /// Tags or image IDs.
    #[arg(required = true)]
    names: Vec<String>,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

pub fn run(cmd: ImageCmd) -> ExitCode {
    if let ImageCmd::Build(BuildArgs {
        data_dir: Some(dir),
        source,
        quiet,
        ..
    }) = &cmd
    {
        return build_offline(dir, source, *quiet);
    }
    block_on(async move {
        match cmd {
            ImageCmd::Build(a) => build(a).await,
            ImageCmd::Pull(a) => pull(a).await,
            ImageCmd::Ls(a) => ls(a).await,
            ImageCmd::Info(a) => info(a).await,
            ImageCmd::Rm(a) => rm(a).await,
            ImageCmd::Gc(a) => gc(a).await,
        }
    })
}

/// `--image` of `sandbox create` and the argument of `image build`: a TOML
/// file (an existing file, or any `*.toml`), else an image name.
pub(crate) fn image_arg(s: &str) -> Result<Image, Failure> {
    let path = Path::new(s);
    if s.ends_with(".toml") || path.is_file() {
        return image_file::load(path).map_err(|e| Failure {
            code: 1,
            message: format!("{e:#}"),
        });
    }
    Ok(Image::from_name(s))
}

/// Progress on stderr, unless `quiet`.
fn progress(quiet: bool) -> impl FnMut(&BuildEvent) + Send {
    let mut printer = (!quiet).then(BuildPrinter::stderr);
    move |e| {
        if let Some(p) = printer.as_mut() {
            p.event(e)
        }
    }
}

async fn build(a: BuildArgs) -> CmdResult {
    let image = image_arg(&a.source)?;
    let c = client(&a.conn)?;
    // A plain name builds {base: NAME, steps: []}: the daemon makes sure a
    // built-in image is built (or finds the tag / ID) and answers its info.
    let info = image
        .build_with(&c, a.tag.as_deref(), progress(a.quiet))
        .await
        .map_err(failure_with_output)?;
    print_result(&info, a.json);
    Ok(ExitCode::SUCCESS)
}

async fn pull(a: PullArgs) -> CmdResult {
    let c = client(&a.conn)?;
    let info = Images::pull(
        &c,
        &a.reference,
        a.secret.as_deref(),
        a.tag.as_deref(),
        progress(a.quiet),
    )
    .await
    .map_err(failure_with_output)?;
    print_result(&info, a.json);
    Ok(ExitCode::SUCCESS)
}

/// The message for a failed build or pull: the daemon's, with the failing
/// command's exit code, then the last lines of its output.
pub(crate) fn failure_with_output(e: Error) -> Failure {
    let output = match &e {
        Error::Build {
            output: Some(o), ..
        } if !o.trim().is_empty() => Some(o.clone()),
        _ => None,
    };
    let mut f = fail(e, None);
    if let Some(o) = output {
        let lines: Vec<&str> = o.trim_end().lines().collect();
        let tail = &lines[lines.len().saturating_sub(30)..];
        f.message
            .push_str("\noutput of the failed step (last lines):");
        for l in tail {
            f.message.push_str("\n    ");
            f.message.push_str(l);
        }
    }
    f
}

fn print_result(info: &ImageInfo, json: bool) {
    if json {
        println!("{}", to_json(serde_json::to_value(info)));
    } else {
        println!("{}", info.image_id);
    }
}

/// `image build NAME --data-dir DIR`: the built-in image, built in place.
fn build_offline(data_dir: &Path, name: &str, quiet: bool) -> ExitCode {
    let store = gworker_images::ImageStore::new(data_dir.join("images"));
    if !quiet {
        eprintln!("building {name} (cached after the first build)");
    }
    match store.ensure(name, &mut |line| {
        if !quiet {
            eprintln!("    {line}")
        }
    }) {
        Ok(info) => {
            println!("{}", info.rootfs.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn ls(a: LsArgs) -> CmdResult {
    let c = client(&a.conn)?;
    let mut list = Images::list(&c).await.map_err(|e| fail(e, None))?;
    list.sort_by(|x, y| x.created_at.total_cmp(&y.created_at));
    if a.json {
        println!("{}", to_json(serde_json::to_value(&list)));
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_secs();
    let rows: Vec<[String; 5]> = list
        .iter()
        .map(|i| {
            [
                i.image_id.clone(),
                if i.tags.is_empty() {
                    "-".into()
                } else {
                    i.tags.join(",")
                },
                human_bytes(i.size_bytes),
                age(now - i.created_at),
                describe(i.spec.as_ref()),
            ]
        })
        .collect();
    print_table(["IMAGE ID", "TAGS", "SIZE", "AGE", "FROM"], &rows);
    Ok(ExitCode::SUCCESS)
}

/// `busybox +3 steps`, `registry python:3.12-slim`, `built-in`.
fn describe(spec: Option<&ImageSpec>) -> String {
    let Some(spec) = spec else {
        return "built-in".into();
    };
    let base = match &spec.base {
        ImageBase::Name(n) => n.clone(),
        ImageBase::DebianSlim { python_version } => format!(
            "debian_slim python {}",
            python_version.as_deref().unwrap_or("default")
        ),
        ImageBase::Registry { reference, .. } => format!("registry {reference}"),
    };
    match spec.steps.len() {
        0 => base,
        1 => format!("{base} +1 step"),
        n => format!("{base} +{n} steps"),
    }
}

async fn info(a: InfoArgs) -> CmdResult {
    let c = client(&a.conn)?;
    let i = Images::get(&c, &a.name)
        .await
        .map_err(|e| not_found(e, &a.name))?;
    if a.json {
        println!("{}", to_json(serde_json::to_value(&i)));
        return Ok(ExitCode::SUCCESS);
    }
    let env: Vec<String> = i.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut lines = vec![
        ("id", i.image_id.clone()),
        ("tags", i.tags.join(", ")),
        ("size", human_bytes(i.size_bytes)),
        ("created", format!("{} ago", age(now_secs() - i.created_at))),
        ("from", describe(i.spec.as_ref())),
        ("workdir", i.workdir.clone().unwrap_or_else(|| "-".into())),
        ("user", i.user.clone().unwrap_or_else(|| "-".into())),
        ("env", env.join(" ")),
        ("layers", i.layers.len().to_string()),
    ];
    if let Some(spec) = &i.spec {
        for (n, s) in spec.steps.iter().enumerate() {
            lines.push(("step", format!("{}. {}", n + 1, s.describe())));
        }
    }
    for (k, v) in lines {
        println!("{:<8} {v}", format!("{k}:"));
    }
    Ok(ExitCode::SUCCESS)
}

fn not_found(e: Error, name: &str) -> Failure {
    match e {
        Error::NotFound { .. } => Failure {
            code: 1,
            message: format!("no image {name:?} (not a built-in name, tag or image ID)"),
        },
        e => fail(e, None),
    }
}

async fn rm(a: RmArgs) -> CmdResult {
    let c = client(&a.conn)?;
    for name in &a.names {
        Images::delete(&c, name)
            .await
            .map_err(|e| not_found(e, name))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn gc(a: GcArgs) -> CmdResult {
    let c = client(&a.conn)?;
    let r = Images::gc(&c).await.map_err(|e| fail(e, None))?;
    if a.json {
        println!("{}", to_json(serde_json::to_value(&r)));
    } else {
        println!(
            "removed {} layers and {} blobs, freed {}",
            r.removed_layers,
            r.removed_blobs,
            human_bytes(r.freed_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}
