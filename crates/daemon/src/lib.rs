//! The daemon's HTTP API (axum): parses requests, calls the engine, maps its
//! errors to status codes in one place ([`error`]). No sandbox logic lives
//! here. Listens on a unix socket (mode 0600) and, with a token, on TCP.

mod error;
pub mod openapi;
mod routes;
mod routes_images;
mod routes_store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gworker_engine::{Engine, EngineConfig};
use tokio::signal::unix::{signal, SignalKind};

pub use openapi::openapi_json;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub engine: EngineConfig,
    pub socket: PathBuf,
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
}

pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    if opts.listen.is_some() && opts.token.as_deref().unwrap_or("").is_empty() {
        anyhow::bail!("--listen needs a token: set GWORKER_TOKEN to a secret string (every TCP request must send it as `Authorization: Bearer <token>`)");
    }
    if !opts.engine.agent.is_file() {
        anyhow::bail!(
            "the sandbox agent binary {} does not exist; build it with `bash scripts/build-agent.sh` or pass --agent",
            opts.engine.agent.display()
        );
    }
    let engine = tokio::task::spawn_blocking({
        let cfg = opts.engine.clone();
        move || Engine::open(cfg)
    })
    .await?
    .map_err(|e| anyhow::anyhow!("cannot open the data directory: {e}"))?;
    engine.remove_orphans().await;
    engine.start_pool();
    engine.keep_standby();

    tokio::spawn({
        let engine = engine.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                engine.housekeep().await;
            }
        }
    });

    if let Some(parent) = opts.socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let _ = std::fs::remove_file(&opts.socket);
    let unix = tokio::net::UnixListener::bind(&opts.socket)
        .with_context(|| format!("cannot listen on {}", opts.socket.display()))?;
    std::fs::set_permissions(
        &opts.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    tracing::info!(socket = %opts.socket.display(), "listening");

    let app = routes::router(engine.clone(), None);
    let unix_server = axum::serve(unix, app.into_make_service());
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let stop = async {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    };

    let servers = async {
        if let Some(addr) = opts.listen {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            tracing::info!(%addr, "listening on TCP (token required)");
            let app = routes::router(engine.clone(), opts.token.clone().map(Arc::new));
            let tcp_server = axum::serve(tcp, app.into_make_service());
            tokio::try_join!(async { unix_server.await }, async { tcp_server.await })?;
        } else {
            unix_server.await?;
        }
        anyhow::Ok(())
    };
    // Stopping: requests in flight are cut (as a crash would; clients retry
    // or resume), the users' sandboxes go on under their supervisors, and
    // the warm pool's unclaimed slots (no one's) are shut down. The standby
    // supervisor ends by itself when the daemon is gone.
    let why = tokio::select! {
        r = servers => return r,
        why = stop => why,
    };
    tracing::info!(
        signal = why,
        "stopping: shutting down the warm pool's unclaimed slots"
    );
    engine.stop_pool(Duration::from_secs(10)).await;
    let _ = std::fs::remove_file(&opts.socket);
    tracing::info!("stopped; sandboxes keep running and are found again at the next start");
    Ok(())
}
