//! `gworker serve`: the command that runs the daemon in this process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use gworker_engine::EngineConfig;

#[derive(Args)]
pub struct ServeArgs {
    /// Where sandboxes, images and the registry live.
    #[arg(long, env = "GWORKER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The unix socket to listen on (mode 0600).
    #[arg(long, env = "GWORKER_SOCKET")]
    socket: Option<PathBuf>,
    /// Also listen on TCP at ADDR (e.g. 127.0.0.1:7420); needs GWORKER_TOKEN.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The static agent binary (default: found next to this executable).
    #[arg(long, env = "GWORKER_AGENT")]
    agent: Option<PathBuf>,
    /// The runsc binary (default: runsc on PATH).
    #[arg(long, env = "GWORKER_RUNSC")]
    runsc: Option<PathBuf>,
    /// Seconds an exited sandbox stays inspectable before it is removed.
    #[arg(long, default_value_t = 600)]
    retention: u64,
    /// Keep N pre-booted sandboxes of IMAGE ready (e.g. `--pool busybox=4`),
    /// so creating one takes milliseconds; repeat for several images. IMAGE
    /// is a built-in, a tag or an image ID, as `create` names it. They serve
    /// creates with the default network or a `cidr_allowlist` (and any
    /// volumes, limits and secrets); restores of a snapshot start cold.
    #[arg(long, value_name = "IMAGE=N", value_parser = parse_pool)]
    pool: Vec<(String, usize)>,
    /// Like --pool, but the sandboxes have no network (loopback only): they
    /// serve creates with `block_network=True`, which --pool's do not.
    #[arg(long, value_name = "IMAGE=N", value_parser = parse_pool)]
    pool_blocked: Vec<(String, usize)>,
    /// Most host memory (MiB) the warm pool may hold (~50 MiB a sandbox).
    #[arg(long, default_value_t = 2048)]
    pool_memory_mb: u64,
    /// Pull images from this registry (host[:port]) over plain HTTP; repeat
    /// for several. Loopback registries are always allowed over HTTP.
    #[arg(long, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// Network of sandboxes that ask for none in particular: `internet`
    /// (outbound allowed, never to this host, its networks or other
    /// sandboxes) or `none` (loopback only).
    #[arg(long, value_name = "internet|none", default_value = "internet", value_parser = ["internet", "none"])]
    sandbox_network: String,
    /// Let sandboxes with internet access also reach this private CIDR (an
    /// internal package mirror, say); repeat for several. The host itself
    /// stays unreachable.
    #[arg(long, value_name = "CIDR")]
    allow_cidr: Vec<gworker_runtime::net::Ipv4Cidr>,
    /// Memory limit (MiB) of a sandbox that asks for none.
    #[arg(long, default_value_t = 2048)]
    default_memory: u64,
    /// Most memory (MiB) a sandbox may ask for.
    #[arg(long, default_value_t = 16384)]
    max_memory: u64,
    /// CPU limit (cores) of a sandbox that asks for none (default: unlimited).
    #[arg(long)]
    default_cpu: Option<f64>,
    /// Most cores a sandbox may ask for.
    #[arg(long)]
    max_cpu: Option<f64>,
    /// Process limit of a sandbox that asks for none.
    #[arg(long, default_value_t = 4096)]
    default_max_processes: u64,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Leave the host's kernel settings alone. By default the daemon sets
    /// /sys/kernel/rcu_expedited to 1, which makes each sandbox start ~50 ms
    /// faster (runsc waits out many RCU grace periods while it starts).
    #[arg(long)]
    no_host_tuning: bool,
}

/// Both kinds of pool by image and network (a repeated image adds up).
fn pool_sizes(
    default: Vec<(String, usize)>,
    blocked: Vec<(String, usize)>,
) -> std::collections::BTreeMap<gworker_engine::pool::PoolKey, usize> {
    use gworker_engine::pool::{PoolKey, PoolNetwork};
    let mut sizes = std::collections::BTreeMap::new();
    let kinds = [
        (default, PoolNetwork::Default),
        (blocked, PoolNetwork::Blocked),
    ];
    for (list, network) in kinds {
        for (image, n) in list {
            *sizes.entry(PoolKey::new(&image, network)).or_default() += n;
        }
    }
    sizes
}

fn parse_pool(s: &str) -> Result<(String, usize), String> {
    let (image, n) = s
        .split_once('=')
        .ok_or_else(|| format!("expected IMAGE=N, got {s:?}"))?;
    // A built-in, an image ID or a tag (which may be made after the daemon
    // starts: until it exists, its slots fail to boot and are retried).
    if !gworker_images::ImageStore::is_known(image)
        && !gworker_images::is_image_id(image)
        && gworker_images::check_tag(image).is_err()
    {
        return Err(format!(
            "{image:?} is not an image name: give a built-in ({}), a tag or an image ID",
            gworker_images::BUILTIN_IMAGES.join(", ")
        ));
    }
    let n = n
        .parse()
        .map_err(|_| format!("expected a number of sandboxes after '=', got {n:?}"))?;
    Ok((image.to_string(), n))
}

pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return "/var/lib/gworker".into();
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("gworker");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    home.join(".local/share/gworker")
}

/// The agent: next to this executable, or in the static build's target dir.
fn find_agent() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let profile = dir.file_name().map(|n| n.to_owned()).unwrap_or_default();
    let candidates = [
        dir.join("gworker-agent-static"),
        dir.join("../x86_64-unknown-linux-gnu")
            .join(&profile)
            .join("gworker-agent"),
        dir.join("../../x86_64-unknown-linux-gnu")
            .join(&profile)
            .join("gworker-agent"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| candidates[1].clone())
}

pub fn serve(a: ServeArgs) -> ExitCode {
    init_logging(a.log_json);
    if !a.no_host_tuning {
        tune_host();
    }
    raise_nofile();
    let data_dir = a.data_dir.unwrap_or_else(default_data_dir);
    let opts = gworker_daemon::ServeOptions {
        engine: EngineConfig {
            data_dir: data_dir.clone(),
            runsc_bin: a.runsc.unwrap_or_else(gworker_runtime::find_runsc),
            // runsc resolves bind sources from its own cwd: make the path absolute.
            agent: a
                .agent
                .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
                .unwrap_or_else(find_agent),
            supervisor_exe: std::env::current_exe().unwrap_or_else(|_| "gworker".into()),
            retention: Duration::from_secs(a.retention),
            pool: gworker_engine::pool::PoolConfig {
                sizes: pool_sizes(a.pool, a.pool_blocked),
                memory_budget_mb: a.pool_memory_mb,
            },
            default_limits: gworker_runtime::Limits {
                cpu: a.default_cpu,
                memory_mb: Some(a.default_memory),
                max_processes: Some(a.default_max_processes),
            },
            max_limits: gworker_runtime::Limits {
                cpu: a.max_cpu.or(Some(
                    std::thread::available_parallelism()
                        .map(|n| n.get() as f64)
                        .unwrap_or(1.0),
                )),
                memory_mb: Some(a.max_memory),
                max_processes: Some(65536),
            },
            insecure_registries: a.insecure_registry,
            default_network: if a.sandbox_network == "none" {
                gworker_runtime::net::NetPolicy::Blocked
            } else {
                gworker_runtime::net::NetPolicy::Internet {
                    extra_allowed: a.allow_cidr,
                }
            },
        },
        socket: a.socket.unwrap_or_else(gworker_api::default_socket_path),
        listen: a.listen,
        token: std::env::var("GWORKER_TOKEN").ok(),
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(gworker_daemon::serve(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gworker serve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Applies [`gworker_runtime::host::tune`]; a host that refuses keeps working,
/// only slower.
fn tune_host() {
    use gworker_runtime::host::{tune, Tuned, RCU_EXPEDITED};
    match tune() {
        Ok(Tuned::Set) => tracing::info!(
            "host tuning: set {RCU_EXPEDITED} to 1 (sandboxes start ~50 ms faster; \
             --no-host-tuning leaves it alone)"
        ),
        Ok(Tuned::AlreadySet) => tracing::debug!("host tuning: {RCU_EXPEDITED} is 1 already"),
        Err(e) => tracing::warn!(
            "host tuning: cannot set {RCU_EXPEDITED} to 1 ({e}); sandboxes start slower"
        ),
    }
}

/// Raises the open-files limit runsc inherits ([`gworker_runtime::host::raise_nofile`]);
/// says what to do when it stays too low for sandboxes to start.
fn raise_nofile() {
    use gworker_runtime::host::{raise_nofile, NOFILE_NEEDED};
    match raise_nofile() {
        Ok(n) if n.after.0 < NOFILE_NEEDED => tracing::warn!(
            "the open-files limit is {} (hard {}) and cannot be raised: sandboxes may fail \
             to start (runsc needs more than 256); start `gworker serve` as root or with \
             `ulimit -n {NOFILE_NEEDED}` or more",
            n.after.0,
            n.after.1
        ),
        Ok(n) if n.after != n.before => tracing::info!(
            "open-files limit raised from {} (hard {}) to {} (hard {})",
            n.before.0,
            n.before.1,
            n.after.0,
            n.after.1
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read or raise the open-files limit: {e}"),
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GWORKER_LOG")
        .unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}
