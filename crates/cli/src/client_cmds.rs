//! Client commands (`gworker sandbox ...`), through the Rust client crate.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum SandboxCmd {}

pub fn run(cmd: SandboxCmd) -> ExitCode {
    match cmd {}
}
