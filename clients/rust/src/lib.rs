//! Async Rust client for the gworker daemon: ephemeral gVisor sandboxes for
//! untrusted code. The Rust shape of the spec's `Sandbox` (see
//! `docs/http-api.md` for the wire).
//!
//! ```no_run
//! use gworker_client::{Client, CreateOptions, ExecOptions, Sandbox};
//!
//! # async fn f() -> gworker_client::Result<()> {
//! let client = Client::from_env()?; // GWORKER_URL / GWORKER_TOKEN, else the default socket
//! let sb = Sandbox::create(&client, CreateOptions { image: Some("busybox".into()), ..Default::default() }).await?;
//! let p = sb.exec(ExecOptions::new(["sh", "-c", "echo hello; exit 3"])).await?;
//! assert_eq!(p.stdout().read_to_string().await?, "hello\n");
//! assert_eq!(p.wait(None).await?, 3);
//! sb.terminate().await?;
//! # Ok(()) }
//! ```
//!
//! What this crate owns: HTTP (unix socket or TCP), typed errors, wait loops
//! over the daemon's 60 s cap, and output streams that resume at the right
//! offset after a broken connection or a daemon restart. It holds no sandbox
//! state of its own: every handle is an id plus a [`Client`].

mod client;
mod error;
mod image;
mod sandbox;
mod store;
mod stream;

pub use client::{default_url, Client};
pub use error::{BoxError, Error, Result};
pub use gworker_api as api;
pub use gworker_api::ErrorCode;
pub use image::{human_bytes, BuildPrinter, Image, Images};
pub use sandbox::{shell, CreateOptions, ExecOptions, Process, Sandbox, SandboxSnapshot, Stdin};
pub use store::{Secret, Secrets, Volume};
pub use stream::{OutputStream, StreamKind, RESUME_WINDOW};
