//! `gworker`: the daemon (`serve`), the hidden per-sandbox `supervise`, and
//! the client commands. Thin: parsing and printing only.

mod client_cmds;
mod image_cmds;
mod image_file;
mod serve;
mod store_cmds;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gworker",
    version,
    about = "Self-hosted gVisor sandboxes for untrusted code"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (API on a unix socket; TCP with --listen and GWORKER_TOKEN).
    Serve(serve::ServeArgs),
    /// Manage sandboxes through a running daemon.
    #[command(subcommand)]
    Sandbox(client_cmds::SandboxCmd),
    /// Memory snapshots (take one with `gworker sandbox snapshot ID`).
    #[command(subcommand)]
    Snapshot(client_cmds::SnapshotCmd),
    /// Named, persistent volumes and their files.
    #[command(subcommand)]
    Volume(store_cmds::VolumeCmd),
    /// Stored secrets (encrypted at rest; listed by name only).
    #[command(subcommand)]
    Secret(store_cmds::SecretCmd),
    /// Images: build from a description, pull from a registry, list, remove.
    #[command(subcommand)]
    Image(image_cmds::ImageCmd),
    /// Whether the daemon answers, its version, and its warm pool (`--json` for scripts).
    Status(client_cmds::StatusArgs),
    /// Internal: the per-sandbox supervisor process (started by the daemon).
    #[command(hide = true)]
    Supervise { dir: std::path::PathBuf },
    /// Internal: a supervisor the daemon starts ahead of need.
    #[command(hide = true)]
    SuperviseStandby {
        /// Room for the sandbox directory it will be given (shown by `ps`).
        placeholder: Option<std::path::PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Supervise { dir } => gworker_supervisor::server::main(&dir),
        Cmd::SuperviseStandby { .. } => gworker_supervisor::server::standby_main(),
        Cmd::Serve(args) => serve::serve(args),
        Cmd::Image(cmd) => image_cmds::run(cmd),
        Cmd::Sandbox(cmd) => client_cmds::run(cmd),
        Cmd::Snapshot(cmd) => client_cmds::run_snapshot(cmd),
        Cmd::Volume(cmd) => store_cmds::volume(cmd),
        Cmd::Secret(cmd) => store_cmds::secret(cmd),
        Cmd::Status(a) => client_cmds::run_status(a),
    }
}
