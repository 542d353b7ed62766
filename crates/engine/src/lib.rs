//! The engine: sandboxes and their lifecycle. It validates requests, keeps the
//! registry, builds images, starts one detached supervisor per sandbox and
//! talks to it. It never speaks HTTP (the daemon does) and never runs `runsc`
//! itself (only the supervisor, through the runtime crate, does).
//!
//! Invariants:
//! - A sandbox is in the registry from `create` until `terminate` (or the end
//!   of its retention period); `lookup` of anything else is `NotFound`.
//! - The supervisor is the source of truth for a live sandbox; the registry
//!   caches what it reported so that ended sandboxes stay inspectable.
//! - Killing the daemon loses nothing: supervisors are in their own session and
//!   are found again through their socket in the data directory.

mod images;
pub mod pool;
pub mod registry;
pub mod secrets;
pub mod snapshots;
mod spawn;
mod standby;
pub mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gworker_api::{self as api, ErrorCode};
use gworker_images::ImageStore;
use gworker_runtime::net::{Ipv4Cidr, NetPolicy};
use gworker_supervisor::client::{ClientError, OutputReader};
use gworker_supervisor::{LaunchConfig, Phase, ProcSpec, RestoreConfig, StreamName, SupClient};
use snapshots::{Requirements, SnapshotMeta};
use tokio::sync::watch;

pub use registry::{ProcessRow, Registry, SandboxRow};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotSupported(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Coded { code: ErrorCode, message: String },
    #[error("the process is still running")]
    WaitTimeout,
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::Invalid(_) => ErrorCode::InvalidRequest,
            EngineError::NotSupported(_) => ErrorCode::NotSupported,
            EngineError::NotFound(_) => ErrorCode::NotFound,
            EngineError::Coded { code, .. } => *code,
            EngineError::WaitTimeout => ErrorCode::WaitTimeout,
            EngineError::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<registry::RegistryError> for EngineError {
    fn from(e: registry::RegistryError) -> Self {
        if e.is_disk_full() {
            return EngineError::Coded {
                code: ErrorCode::NoSpace,
                message: "the daemon's data directory is out of disk space; free some space and try again".into(),
            };
        }
        EngineError::Internal(e.to_string())
    }
}

fn from_client(e: ClientError) -> EngineError {
    match e {
        ClientError::Sup(e) => EngineError::Coded {
            code: ErrorCode::parse(&e.code).unwrap_or(ErrorCode::Internal),
            message: e.message,
        },
        ClientError::Unreachable(_) => EngineError::Coded {
            code: ErrorCode::SandboxNotRunning,
            message: "the sandbox is not running".into(),
        },
        ClientError::Protocol(m) => EngineError::Internal(m),
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    pub runsc_bin: PathBuf,
    /// The static agent binary mounted into every sandbox.
    pub agent: PathBuf,
    /// The executable started as `EXE supervise DIR` for each sandbox.
    pub supervisor_exe: PathBuf,
    /// How long an exited sandbox stays inspectable before it is removed.
    pub retention: Duration,
    /// Warm pool sizes and memory budget (empty: no pool).
    pub pool: pool::PoolConfig,
    /// Limits of a sandbox that asks for none.
    pub default_limits: gworker_runtime::Limits,
    /// Most a sandbox may ask for (`None`: no maximum).
    pub max_limits: gworker_runtime::Limits,
    /// Registries (host[:port]) pulled from over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// The network of a sandbox that asks for none in particular.
    pub default_network: NetPolicy,
}

#[derive(Debug, Clone, PartialEq)]
enum Ready {
    Pending,
    Up,
    Failed(String),
}

struct Live {
    sup: SupClient,
    ready: watch::Receiver<Ready>,
    /// What the registry already holds of each process (its exit code), so
    /// that recording a status writes only what changed.
    recorded: Mutex<HashMap<u32, Option<i32>>>,
    /// What every exec starts from, read from the registry once.
    exec_base: Mutex<Option<Arc<ExecBase>>>,
}

/// What every exec of a sandbox starts from; fixed when it is created.
struct ExecBase {
    image_env: Vec<(String, String)>,
    env: Vec<(String, String)>,
    workdir: Option<String>,
}

impl Live {
    fn new(sup: SupClient, ready: watch::Receiver<Ready>) -> Arc<Live> {
        Arc::new(Live {
            sup,
            ready,
            recorded: Mutex::new(HashMap::new()),
            exec_base: Mutex::new(None),
        })
    }
}

pub struct Engine {
    cfg: EngineConfig,
    reg: Registry,
    images: ImageStore,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// A supervisor started ahead of the next create (see [`standby`]), and
    /// whether one is being started.
    standby: Arc<Mutex<Option<standby::Standby>>>,
    standby_starting: Arc<std::sync::atomic::AtomicBool>,
    verified: snapshots::Verified,
    runsc_version: String,
    secrets: secrets::SecretStore,
    pool: pool::Pool,
}

pub fn now() -> f64 {
    gworker_supervisor::server::now()
}

/// Environment every process starts from, before the image's and the user's.
const BASE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
];

fn valid_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn check_env(env: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in env {
        if !valid_env_name(k) {
            return Err(EngineError::Invalid(format!(
                "invalid environment variable name {k:?}: names must match [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        if v.contains('\0') {
            return Err(EngineError::Invalid(format!(
                "environment variable {k} contains a NUL byte"
            )));
        }
    }
    Ok(())
}

fn check_workdir(w: &str) -> Result<()> {
    if !w.starts_with('/') {
        return Err(EngineError::Invalid(format!(
            "workdir must be an absolute path, got {w:?}"
        )));
    }
    if w.contains('\0') {
        return Err(EngineError::Invalid("workdir contains a NUL byte".into()));
    }
    Ok(())
}

fn check_argv(argv: &[String]) -> Result<()> {
    if argv.first().map(|a| a.is_empty()).unwrap_or(true) {
        return Err(EngineError::Invalid(
            "cmd must be a non-empty list whose first item names a program".into(),
        ));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(EngineError::Invalid(
            "cmd arguments must not contain NUL bytes".into(),
        ));
    }
    Ok(())
}

/// Most bytes of argv + environment a process may get: one agent frame
/// carries them (Linux itself allows about 2 MiB).
const MAX_ARGS_ENV: usize = 1024 * 1024 - 64 * 1024;

fn check_args_env_size(argv: &[String], env: &[String]) -> Result<()> {
    let n: usize = argv.iter().chain(env).map(|a| a.len() + 5).sum();
    if n > MAX_ARGS_ENV {
        return Err(EngineError::Invalid(format!(
            "the command's arguments and environment take {n} bytes; at most {MAX_ARGS_ENV} are allowed (pass large data through stdin or a file instead)"
        )));
    }
    Ok(())
}

/// The entry command (process 0) of a sandbox, if it has one: its env is the
/// image's overridden by the sandbox's, and its workdir is created if missing.
fn entry_spec(row: &SandboxRow, image_env: &[(String, String)]) -> Option<ProcSpec> {
    (!row.cmd.is_empty()).then(|| ProcSpec {
        argv: row.cmd.clone(),
        env: merge_env(&[image_env, &row.env]),
        cwd: row.workdir.clone().unwrap_or_else(|| "/".into()),
        mkdir_cwd: true,
        over_secrets: row.env.iter().map(|(k, _)| k.clone()).collect(),
    })
}

fn merge_env(layers: &[&[(String, String)]]) -> Vec<String> {
    let mut m: BTreeMap<&str, &str> = BASE_ENV.iter().copied().collect();
    for layer in layers {
        for (k, v) in layer.iter() {
            m.insert(k, v);
        }
    }
    m.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn new_id() -> String {
    let mut b = [0u8; 16];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    format!("sb-{}", hex::encode(b))
}

/// Where the supervisor of sandbox `id` listens.
fn sock_path_in(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("sock").join(id)
}

/// Refuses a data directory under which sandbox sockets ([`sock_path_in`])
/// would not fit a unix socket's 107-byte path, before anything is made in
/// it.
fn check_socket_room(data_dir: &Path) -> Result<()> {
    const SUN_PATH_MAX: usize = 107;
    let sock = sock_path_in(data_dir, &new_id());
    let len = sock.as_os_str().len();
    if len <= SUN_PATH_MAX {
        return Ok(());
    }
    Err(EngineError::Invalid(format!(
        "the data directory's path is too long: sandbox sockets under it would take {len} bytes \
         ({}), a unix socket's path at most {SUN_PATH_MAX}; choose a data directory of at most {} \
         bytes (--data-dir)",
        sock.display(),
        data_dir.as_os_str().len() - (len - SUN_PATH_MAX)
    )))
}

/// IDs come from users: only well-formed ones touch paths.
fn check_id(id: &str) -> Result<()> {
    let ok = id.len() == 35
        && id.starts_with("sb-")
        && id[3..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if ok {
        Ok(())
    } else {
        Err(not_found(id))
    }
}

fn not_found(id: &str) -> EngineError {
    EngineError::NotFound(format!(
        "no sandbox {id:?}: it does not exist or was terminated"
    ))
}

impl Engine {
    /// Opens the data directory, the registry, and finds the supervisors of
    /// sandboxes that were running before a restart.
    pub fn open(cfg: EngineConfig) -> Result<Arc<Engine>> {
        check_socket_room(&cfg.data_dir)?;
        for d in ["images", "runsc", "sandboxes", "sock", "snapshots"] {
            std::fs::create_dir_all(cfg.data_dir.join(d)).map_err(|e| {
                EngineError::Internal(format!(
                    "cannot create {}: {e}",
                    cfg.data_dir.join(d).display()
                ))
            })?;
        }
        let reg = Registry::open(&cfg.data_dir.join("gworker.db"))?;
        let images = ImageStore::new(cfg.data_dir.join("images"));
        let runsc_version = gworker_runtime::Runsc::new(&cfg.runsc_bin, cfg.data_dir.join("runsc"))
            .version()
            .unwrap_or_default();
        let secrets = secrets::SecretStore::open(&cfg.data_dir)?;
        volumes::VolumeStore::new(&cfg.data_dir).mount_all();
        images.cleanup_builds(&cfg.runsc_bin);
        for (name, built_by) in images.outdated_builtins() {
            tracing::warn!(
                image = %name,
                "image {name} was built by recipe {built_by}, this gworker's is {}: it works, but \
                 `gworker image rm {name}` (with no sandbox using it) makes the next create build \
                 the current one",
                gworker_images::RECIPE_VERSION
            );
        }
        let mut cfg_pool = cfg.pool.clone();
        if cfg.default_network == NetPolicy::Blocked {
            // Every create without a network asks for a blocked slot: the
            // default pools are blocked ones.
            let mut merged = std::collections::BTreeMap::new();
            for (key, n) in std::mem::take(&mut cfg_pool.sizes) {
                let key = pool::PoolKey::new(&key.image, pool::PoolNetwork::Blocked);
                *merged.entry(key).or_default() += n;
            }
            cfg_pool.sizes = merged;
        }
        let engine = Arc::new(Engine {
            cfg,
            reg,
            images,
            live: Mutex::new(HashMap::new()),
            standby: Arc::default(),
            standby_starting: Arc::default(),
            verified: snapshots::Verified::default(),
            runsc_version,
            secrets,
            pool: pool::Pool::new(cfg_pool),
        });
        engine.recover()?;
        Ok(engine)
    }

    /// Network state of the daemon's sandboxes (`gworker_runtime::net`).
    pub(crate) fn net_state_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("net")
    }

    /// The network a create asks for: `block_network`, a `cidr_allowlist`,
    /// or the daemon's default. A restore keeps the kind of network its
    /// snapshot had (`snapshot_networked`), since runsc's flags must match.
    fn network_policy(
        &self,
        block: Option<bool>,
        allowlist: Option<&[String]>,
        snapshot_networked: Option<bool>,
    ) -> Result<NetPolicy> {
        let explicit = block.is_some() || allowlist.is_some();
        let policy = match (block, allowlist) {
            (Some(true), Some(list)) if !list.is_empty() => {
                return Err(EngineError::Invalid(
                    "block_network and cidr_allowlist contradict each other: give one".into(),
                ))
            }
            (Some(true), _) => NetPolicy::Blocked,
            (_, Some(list)) => {
                let mut cidrs = Vec::with_capacity(list.len());
                for c in list {
                    cidrs.push(c.parse::<Ipv4Cidr>().map_err(|e| {
                        EngineError::Invalid(format!(
                            "cidr_allowlist: {c:?} is not an IPv4 address or CIDR like 203.0.113.0/24 ({e})"
                        ))
                    })?);
                }
                NetPolicy::Allowlist(cidrs)
            }
            _ => self.cfg.default_network.clone(),
        };
        match snapshot_networked {
            Some(had) if had != policy.needs_netns() => {
                if explicit {
                    return Err(EngineError::Coded {
                        code: ErrorCode::SnapshotIncompatible,
                        message: format!(
                            "the snapshot was taken {} a network, so its copies have {} too",
                            if had { "with" } else { "without" },
                            if had { "one" } else { "none" }
                        ),
                    });
                }
                Ok(if had {
                    NetPolicy::Internet {
                        extra_allowed: Vec::new(),
                    }
                } else {
                    NetPolicy::Blocked
                })
            }
            _ => Ok(policy),
        }
    }

    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    fn sock_path(&self, id: &str) -> PathBuf {
        sock_path_in(&self.cfg.data_dir, id)
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("sandboxes").join(id)
    }

    /// A warm slot's volume directory (see `gworker_runtime::volbind`).
    fn slot_volumes_dir(&self, id: &str) -> PathBuf {
        gworker_runtime::volbind::dir_for(&self.cfg.data_dir, id)
    }

    /// Unmounts what is left of a sandbox's slot volume directory (its
    /// supervisor does it when it ends; one that was killed cannot).
    fn remove_slot_volumes(&self, id: &str) {
        if let Err(e) = gworker_runtime::volbind::remove(&self.slot_volumes_dir(id)) {
            tracing::warn!(sandbox = %id, error = %e, "cannot remove the sandbox's volume directory");
        }
    }

    /// Whether the sandbox's volumes go through a slot volume directory: it
    /// was a warm slot, or a restore of one's snapshot.
    fn uses_slot_volumes(&self, id: &str) -> bool {
        std::fs::read(self.sandbox_dir(id).join("launch.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<LaunchConfig>(&b).ok())
            .is_some_and(|l| l.slot_volumes.is_some())
    }

    /// Removes networks whose sandbox's supervisor is gone (killed, or the
    /// machine rebooted): only those recorded in this daemon's state dir.
    fn remove_stale_networks(&self) {
        let dir = self.net_state_dir();
        for id in gworker_runtime::net::recorded_ids(&dir) {
            let alive = std::os::unix::net::UnixStream::connect(self.sock_path(&id)).is_ok();
            if !alive {
                tracing::info!(sandbox = %id, "removing the network of a sandbox that is gone");
                if let Err(err) = gworker_runtime::net::SandboxNet::teardown(&id, &dir) {
                    tracing::warn!(sandbox = %id, error = %err, "cannot remove a stale sandbox network");
                }
            }
        }
    }

    fn recover(&self) -> Result<()> {
        self.remove_stale_networks();
        for row in self.reg.list_sandboxes()? {
            let sock = self.sock_path(&row.id);
            let alive = std::os::unix::net::UnixStream::connect(&sock).is_ok();
            if alive {
                let (_tx, rx) = watch::channel(Ready::Up);
                self.live
                    .lock()
                    .unwrap()
                    .insert(row.id.clone(), Live::new(SupClient::new(sock), rx));
            } else if row.state != "exited" {
                tracing::warn!(sandbox = %row.id, "supervisor gone while the daemon was down");
                // A killed supervisor left its cgroups (empty once runsc ended).
                gworker_runtime::Cgroup::new(&row.id).remove_within(Duration::ZERO);
                self.reg.set_exited(
                    &row.id,
                    None,
                    "lost",
                    Some("the sandbox's supervisor ended while the daemon was down"),
                    now(),
                )?;
            }
        }
        Ok(())
    }

    fn live(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().unwrap().get(id).cloned()
    }

    fn row(&self, id: &str) -> Result<SandboxRow> {
        check_id(id)?;
        self.reg.get_sandbox(id)?.ok_or_else(|| not_found(id))
    }

    /// Waits until the sandbox's supervisor exists; errors if it failed to start.
    async fn up(&self, id: &str) -> Result<Arc<Live>> {
        // The registry is read only to explain a missing supervisor (a live
        // one means the id is known): one query less on every exec and wait.
        let live = match self.live(id) {
            Some(live) => live,
            None => {
                let row = self.row(id)?;
                return Err(EngineError::Coded {
                    code: ErrorCode::SandboxNotRunning,
                    message: format!(
                        "sandbox {id} is not running ({})",
                        row.reason.as_deref().unwrap_or("exited")
                    ),
                });
            }
        };
        let mut rx = live.ready.clone();
        let r = rx
            .wait_for(|r| *r != Ready::Pending)
            .await
            .map(|r| r.clone());
        match r {
            Ok(Ready::Up) => Ok(live),
            Ok(Ready::Failed(m)) => Err(EngineError::Coded {
                code: ErrorCode::SandboxStartingFailed,
                message: m,
            }),
            _ => Err(EngineError::Internal("sandbox start was abandoned".into())),
        }
    }

    pub async fn create(self: &Arc<Self>, req: api::CreateSandbox) -> Result<api::Sandbox> {
        let snap = match &req.snapshot {
            Some(r) => Some(self.snapshot_meta(&r.snapshot_id)?),
            None => None,
        };
        if let Some(snap) = &snap {
            if req.cmd.as_ref().is_some_and(|c| !c.is_empty()) {
                return Err(EngineError::Invalid(
                    "cmd cannot be given with snapshot: the snapshot's processes go on running; use exec".into(),
                ));
            }
            if req
                .image
                .as_ref()
                .is_some_and(|i| *i != snap.requires.image)
            {
                return Err(EngineError::Coded {
                    code: ErrorCode::SnapshotIncompatible,
                    message: format!(
                        "the snapshot was taken with image {:?}, not {:?}",
                        snap.requires.image,
                        req.image.as_deref().unwrap_or("")
                    ),
                });
            }
        }
        let cmd = match &snap {
            Some(s) => s.cmd.clone(),
            None => req.cmd.unwrap_or_default(),
        };
        if !cmd.is_empty() {
            check_argv(&cmd)?;
        }
        let image = match &snap {
            Some(s) => s.requires.image.clone(),
            None => req
                .image
                .unwrap_or_else(|| gworker_images::DEFAULT_IMAGE.to_string()),
        };
        // Tags are resolved now: the sandbox keeps its image if the tag moves.
        let (image, image_workdir) = if ImageStore::is_known(&image) {
            (image, None)
        } else {
            let info = self
                .images
                .ready(&image)
                .map_err(|e| EngineError::Internal(e.to_string()))?
                .ok_or_else(|| {
                    EngineError::NotFound(format!(
                        "unknown image {image:?}: built-in images are {}; other names must be tags or IDs of images built with POST /v1/images/build",
                        gworker_images::BUILTIN_IMAGES.join(", ")
                    ))
                })?;
            (info.name, info.workdir)
        };
        let timeout = req.timeout.unwrap_or(api::DEFAULT_TIMEOUT_SECS);
        if !(timeout.is_finite() && timeout > 0.0 && timeout <= api::MAX_TIMEOUT_SECS) {
            return Err(EngineError::Invalid(format!(
                "timeout must be a number of seconds above 0 and at most {}, got {timeout}",
                api::MAX_TIMEOUT_SECS
            )));
        }
        let env = req.env.unwrap_or_default();
        check_env(&env)?;
        if let Some(w) = &req.workdir {
            check_workdir(w)?;
        }
        // A restored sandbox's new execs see the source's env and workdir,
        // overridden by what this request gives.
        let (env, workdir) = match &snap {
            Some(s) => {
                let mut m: BTreeMap<String, String> = s.env.iter().cloned().collect();
                m.extend(env);
                (m, req.workdir.or(s.workdir.clone()))
            }
            None => (env, req.workdir.or(image_workdir)),
        };
        // Everything a restore depends on is checked before the sandbox exists,
        // so a refused restore leaves nothing behind.
        let restore = match &snap {
            Some(s) => {
                let rootfs = self
                    .images
                    .ready(&image)
                    .ok()
                    .flatten()
                    .map(|i| i.rootfs)
                    .ok_or_else(|| EngineError::Coded {
                        code: ErrorCode::SnapshotIncompatible,
                        message: format!("the snapshot's image {image:?} is not built here"),
                    })?;
                Some(self.restore_config(s, &rootfs).await?)
            }
            None => None,
        };
        // Unknown secret or volume names fail here, before the sandbox exists.
        let secret_env = self
            .secrets
            .resolve(req.secrets.as_deref().unwrap_or(&[]))?;
        let mounts = self.resolve_volumes(
            req.volumes.as_ref(),
            snap.as_ref().map(|s| &s.requires.volumes),
        )?;
        check_args_env_size(
            &cmd,
            &env.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )?;
        let limits = self.limits(req.cpu, req.memory, req.max_processes)?;
        let network = self.network_policy(
            req.block_network,
            req.cidr_allowlist.as_deref(),
            snap.as_ref().map(|s| s.requires.networked),
        )?;
        let created_at = now();
        // Plain sandboxes come from the warm pool when it has one ready with
        // their network: none, the default one, or (networked) any policy,
        // whose rules replace the slot's at claim.
        let pool_network = if network == NetPolicy::Blocked {
            Some(pool::PoolNetwork::Blocked)
        } else if network == self.cfg.default_network || self.cfg.default_network.needs_netns() {
            Some(pool::PoolNetwork::Default)
        } else {
            None
        };
        let slot_layout = snap.as_ref().is_some_and(|s| s.requires.slot_volumes);
        let slot = match pool_network {
            Some(net) if restore.is_none() => {
                self.pool.take_or_wait(&image, net, pool::miss_wait()).await
            }
            _ => None,
        };
        let row = SandboxRow {
            id: new_id(),
            image,
            cmd,
            env: env.into_iter().collect(),
            workdir,
            created_at,
            timeout,
            deadline: created_at + timeout,
            state: "starting".into(),
            exit_code: None,
            reason: None,
            message: None,
            exited_at: None,
            limits,
            network,
        };
        if let Some(slot) = slot {
            match self
                .claim_slot(&slot, &row, secret_env.clone(), &mounts)
                .await
            {
                Ok(view) => return Ok(view),
                Err(e) => {
                    tracing::warn!(sandbox = %slot, error = %e, "warm pool: claim failed, starting cold");
                    self.discard_slot(&slot).await;
                }
            }
        }
        self.reg.insert_sandbox(&row)?;
        self.attach_volumes(&row.id, &mounts)?;
        self.secrets.stash(&row.id, secret_env);
        let (tx, rx) = watch::channel(Ready::Pending);
        self.live.lock().unwrap().insert(
            row.id.clone(),
            Live::new(SupClient::new(self.sock_path(&row.id)), rx),
        );
        let engine = self.clone();
        let r2 = row.clone();
        tokio::spawn(async move {
            let id = r2.id.clone();
            let res = engine.start(r2, restore, slot_layout).await;
            match res {
                Ok(()) => {
                    let _ = tx.send(Ready::Up);
                }
                Err(e) => {
                    let msg = e.to_string();
                    tracing::warn!(sandbox = %id, error = %msg, "sandbox failed to start");
                    let _ = engine
                        .reg
                        .set_exited(&id, None, "failed", Some(&msg), now());
                    let _ = tx.send(Ready::Failed(msg));
                }
            }
        });
        Ok(self.view(&row, None))
    }

    /// The request's limits, with the daemon's defaults and maximums.
    fn limits(
        &self,
        cpu: Option<f64>,
        memory: Option<u64>,
        procs: Option<u64>,
    ) -> Result<gworker_runtime::Limits> {
        let (d, m) = (&self.cfg.default_limits, &self.cfg.max_limits);
        let l = gworker_runtime::Limits {
            cpu: cpu.or(d.cpu),
            memory_mb: memory.or(d.memory_mb),
            max_processes: procs.or(d.max_processes),
        };
        if let Some(c) = l.cpu {
            if !(c.is_finite() && c >= 0.01) || m.cpu.is_some_and(|max| c > max) {
                return Err(EngineError::Invalid(format!(
                    "cpu must be a number of cores from 0.01{}, got {c}",
                    m.cpu.map(|x| format!(" to {x}")).unwrap_or_default()
                )));
            }
        }
        if let Some(mem) = l.memory_mb {
            if mem < 64 || m.memory_mb.is_some_and(|max| mem > max) {
                return Err(EngineError::Invalid(format!(
                    "memory must be from 64 MiB{}, got {mem}",
                    m.memory_mb
                        .map(|x| format!(" to {x} MiB"))
                        .unwrap_or_default()
                )));
            }
        }
        if let Some(p) = l.max_processes {
            if p < 1 || m.max_processes.is_some_and(|max| p > max) {
                return Err(EngineError::Invalid(format!(
                    "max_processes must be from 1{}, got {p}",
                    m.max_processes
                        .map(|x| format!(" to {x}"))
                        .unwrap_or_default()
                )));
            }
        }
        Ok(l)
    }

    /// Gives a warm-pool sandbox the request's entry command, deadline, limits and
    /// secrets, then registers it under the slot's ID.
    async fn claim_slot(
        &self,
        slot: &str,
        row: &SandboxRow,
        secret_env: Vec<(String, String)>,
        mounts: &volumes::Mounts,
    ) -> Result<api::Sandbox> {
        let image_env = self
            .images
            .ready(&row.image)
            .ok()
            .flatten()
            .map(|i| i.env)
            .unwrap_or_default();
        let entry = entry_spec(row, &image_env);
        let sup = SupClient::new(self.sock_path(slot));
        // Recorded first: a volume is not deleted while a claim mounts it.
        self.attach_volumes(slot, mounts)?;
        // The supervisor changes the slot's rules if the policy is not the
        // one it booted with (an allowlist on a default slot).
        sup.claim(
            entry,
            row.deadline,
            row.limits.clone(),
            secret_env,
            Some(row.network.clone()),
            self.volume_mounts(slot),
        )
        .await
        .map_err(from_client)?;
        let row = SandboxRow {
            id: slot.to_string(),
            state: "running".into(),
            ..row.clone()
        };
        self.reg.insert_sandbox(&row)?;
        let (_tx, rx) = watch::channel(Ready::Up);
        let live = Live::new(sup, rx);
        *live.exec_base.lock().unwrap() = Some(Arc::new(ExecBase {
            image_env,
            env: row.env.clone(),
            workdir: row.workdir.clone(),
        }));
        self.live.lock().unwrap().insert(row.id.clone(), live);
        Ok(self.view(&row, None))
    }

    /// Builds the image if needed and starts the sandbox's supervisor.
    /// `slot_layout`: the restore of a warm slot's snapshot, whose volumes
    /// go through a slot volume directory as the slot's did.
    async fn start(
        &self,
        row: SandboxRow,
        restore: Option<RestoreConfig>,
        slot_layout: bool,
    ) -> Result<()> {
        let images = self.images.clone();
        let name = row.image.clone();
        let info = tokio::task::spawn_blocking(move || {
            images.ensure(&name, &mut |line| tracing::info!(image = %name, "{line}"))
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?
        .map_err(|e| EngineError::Coded {
            code: ErrorCode::SandboxStartingFailed,
            message: e.to_string(),
        })?;
        let entry = if restore.is_none() {
            entry_spec(&row, &info.env)
        } else {
            None
        };
        let secret_env = self.secrets.take(&row.id);
        let launch = LaunchConfig {
            sandbox_id: row.id.clone(),
            runsc_bin: self.cfg.runsc_bin.clone(),
            runsc_root: self.cfg.data_dir.join("runsc"),
            rootfs: info.rootfs.clone(),
            agent: self.cfg.agent.clone(),
            entry,
            deadline: row.deadline,
            restore,
            volumes: self.volume_mounts(&row.id),
            slot_volumes: slot_layout.then(|| self.slot_volumes_dir(&row.id)),
            secrets_fd: secret_env.as_ref().map(|_| SECRETS_FD),
            pooled: false,
            limits: row.limits.clone(),
            user: info.user_ids,
            network: Some(row.network.clone()),
            net_state_dir: Some(self.net_state_dir()),
        };
        let dir = self.sandbox_dir(&row.id);
        let sock = self.sock_path(&row.id);
        let exe = self.cfg.supervisor_exe.clone();
        let standby = self.standby.lock().unwrap().take();
        self.keep_standby();
        tokio::task::spawn_blocking(move || {
            spawn_supervisor(&exe, &dir, &sock, &launch, secret_env, standby)
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?
        .map_err(|e| EngineError::Internal(format!("cannot start the supervisor: {e}")))?;
        self.reg.set_state(&row.id, "running")?;
        Ok(())
    }

    /// Starts a standby supervisor in the background unless one is ready or
    /// starting. The daemon calls it once at start; every create that takes
    /// the standby calls it again.
    pub fn keep_standby(&self) {
        use std::sync::atomic::Ordering;
        // Checked and set under the slot's lock, which the starting thread
        // holds while it fills the slot and clears the flag.
        {
            let slot = self.standby.lock().unwrap();
            if slot.is_some() || self.standby_starting.swap(true, Ordering::SeqCst) {
                return;
            }
        }
        let (slot, starting) = (self.standby.clone(), self.standby_starting.clone());
        let exe = self.cfg.supervisor_exe.clone();
        let placeholder = self.sandbox_dir(&format!("sb-{}", "?".repeat(new_id().len() - 3)));
        std::thread::spawn(move || {
            let started = standby::start(&exe, &placeholder);
            let mut slot = slot.lock().unwrap();
            match started {
                Ok(s) => *slot = Some(s),
                Err(e) => tracing::warn!(error = %e, "cannot start a standby supervisor"),
            }
            starting.store(false, Ordering::SeqCst);
        });
    }

    fn view(&self, row: &SandboxRow, status: Option<&gworker_supervisor::Status>) -> api::Sandbox {
        let mut s = api::Sandbox {
            sandbox_id: row.id.clone(),
            image: row.image.clone(),
            state: match row.state.as_str() {
                "exited" => api::SandboxState::Exited,
                "running" => api::SandboxState::Running,
                _ => api::SandboxState::Starting,
            },
            exit_code: row.exit_code,
            reason: row.reason.clone(),
            message: row.message.clone(),
            created_at: row.created_at,
            timeout: row.timeout,
            deadline: row.deadline,
            cmd: row.cmd.clone(),
            workdir: row.workdir.clone(),
            entry_process_id: (!row.cmd.is_empty()).then_some(0),
            cpu: row.limits.cpu,
            memory: row.limits.memory_mb,
            max_processes: row.limits.max_processes,
            network: Some(
                match &row.network {
                    NetPolicy::Blocked => "blocked",
                    NetPolicy::Internet { .. } => "internet",
                    NetPolicy::Allowlist(_) => "allowlist",
                }
                .to_string(),
            ),
            cidr_allowlist: match &row.network {
                NetPolicy::Allowlist(l) => Some(l.iter().map(|c| c.to_string()).collect()),
                _ => None,
            },
        };
        if s.state == api::SandboxState::Running && status.is_none() && row.state == "starting" {
            s.state = api::SandboxState::Starting;
        }
        if let Some(st) = status {
            s.state = match st.phase {
                Phase::Starting => api::SandboxState::Starting,
                Phase::Running => api::SandboxState::Running,
                Phase::Exited => api::SandboxState::Exited,
            };
            if st.phase == Phase::Exited {
                s.exit_code = st.exit_code;
                s.reason = st.reason.clone();
                s.message = st.message.clone();
            }
        }
        s
    }

    /// Asks the supervisor for news and records an exit in the registry.
    async fn refresh(&self, row: &SandboxRow) -> Option<gworker_supervisor::Status> {
        if row.state == "exited" && row.exited_at.is_some() && self.live(&row.id).is_none() {
            return None;
        }
        let live = self.live(&row.id)?;
        if *live.ready.borrow() != Ready::Up {
            return None;
        }
        match live.sup.status().await {
            Ok(st) => {
                self.record(&row.id, &st);
                Some(st)
            }
            Err(ClientError::Unreachable(e))
                if row.state != "exited"
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) =>
            {
                // The supervisor is gone (killed, or crashed): so is the
                // sandbox, whose agent ends when its pipes close.
                tracing::warn!(sandbox = %row.id, error = %e, "supervisor gone");
                let _ = self.reg.set_exited(
                    &row.id,
                    Some(137),
                    "lost",
                    Some("the sandbox's supervisor ended unexpectedly; the sandbox was stopped"),
                    now(),
                );
                self.live.lock().unwrap().remove(&row.id);
                None
            }
            Err(_) => None,
        }
    }

    /// Writes what the supervisor reported and the registry lacks.
    fn record(&self, id: &str, st: &gworker_supervisor::Status) {
        let live = self.live(id);
        let mut seen = live
            .as_ref()
            .map(|l| l.recorded.lock().unwrap().clone())
            .unwrap_or_default();
        for p in &st.procs {
            if seen.get(&p.id) == Some(&p.exit_code) {
                continue;
            }
            let ok = self.reg.upsert_process(&ProcessRow {
                sandbox_id: id.to_string(),
                process_id: p.id,
                cmd: p.argv.clone(),
                started_at: p.started_at,
                exit_code: p.exit_code,
            });
            if ok.is_ok() {
                seen.insert(p.id, p.exit_code);
            }
        }
        if let Some(l) = live {
            *l.recorded.lock().unwrap() = seen;
        }
        if st.phase == Phase::Exited {
            let _ = self.reg.set_exited(
                id,
                st.exit_code,
                st.reason.as_deref().unwrap_or("exited"),
                st.message.as_deref(),
                st.exited_at.unwrap_or_else(now),
            );
        }
    }

    pub async fn get(&self, id: &str) -> Result<api::Sandbox> {
        let row = self.row(id)?;
        let st = self.refresh(&row).await;
        Ok(self.view(&row, st.as_ref()))
    }

    pub async fn list(&self) -> Result<Vec<api::Sandbox>> {
        let mut out = Vec::new();
        for row in self.reg.list_sandboxes()? {
            let st = self.refresh(&row).await;
            out.push(self.view(&row, st.as_ref()));
        }
        Ok(out)
    }

    /// Waits up to `timeout` for the entry command (or process `pid`) to exit.
    pub async fn wait(&self, id: &str, pid: Option<u32>, timeout: Duration) -> Result<Option<i32>> {
        self.pool.note_activity();
        if let Some(code) = self.recorded_exit(id, pid)? {
            return Ok(code);
        }
        let live = self.up(id).await?;
        match live.sup.wait(pid, timeout).await {
            Ok(Some(code)) => {
                match pid {
                    Some(p) => {
                        if self.reg.set_process_exit(id, p, code).is_ok() {
                            live.recorded.lock().unwrap().insert(p, code);
                        }
                    }
                    None => {
                        if let Ok(st) = live.sup.status().await {
                            self.record(id, &st);
                        }
                    }
                }
                Ok(code)
            }
            Ok(None) => Err(EngineError::WaitTimeout),
            Err(e) => {
                // The supervisor may have gone meanwhile; the registry may know the end.
                if let Some(code) = self.recorded_exit(id, pid)? {
                    return Ok(code);
                }
                Err(from_client(e))
            }
        }
    }

    fn recorded_exit(&self, id: &str, pid: Option<u32>) -> Result<Option<Option<i32>>> {
        // A live sandbox's cache knows every exit it recorded, and every
        // process this daemon started (without a registry read).
        if let (Some(p), Some(live)) = (pid, self.live(id)) {
            if let Some(code) = live.recorded.lock().unwrap().get(&p) {
                return Ok(code.map(Some));
            }
        }
        let row = self.row(id)?;
        Ok(match pid {
            None => (row.state == "exited").then_some(row.exit_code),
            Some(p) => self.reg.process_exit(id, p)?.map(Some),
        })
    }

    pub async fn exec(&self, id: &str, req: api::Exec) -> Result<api::Process> {
        self.pool.note_activity();
        check_argv(&req.cmd)?;
        let env = req.env.unwrap_or_default();
        check_env(&env)?;
        if let Some(w) = &req.workdir {
            check_workdir(w)?;
        }
        let live = self.up(id).await?;
        let base = self.exec_base(id, &live)?;
        let exec_env: Vec<(String, String)> = env.into_iter().collect();
        let spec = ProcSpec {
            argv: req.cmd.clone(),
            env: merge_env(&[&base.image_env, &base.env, &exec_env]),
            over_secrets: base
                .env
                .iter()
                .chain(exec_env.iter())
                .map(|(k, _)| k.clone())
                .collect(),
            // The sandbox's own workdir is created if missing (an idle
            // sandbox has had no entry command to create it); any other
            // workdir of an exec must exist.
            mkdir_cwd: base.workdir.is_some()
                && req
                    .workdir
                    .as_ref()
                    .is_none_or(|w| Some(w) == base.workdir.as_ref()),
            cwd: req
                .workdir
                .or(base.workdir.clone())
                .unwrap_or_else(|| "/".into()),
        };
        check_args_env_size(&spec.argv, &spec.env)?;
        let pid = live.sup.spawn(spec).await.map_err(from_client)?;
        self.pool.note_activity();
        let started_at = now();
        self.reg.upsert_process(&ProcessRow {
            sandbox_id: id.to_string(),
            process_id: pid,
            cmd: req.cmd.clone(),
            started_at,
            exit_code: None,
        })?;
        live.recorded.lock().unwrap().insert(pid, None);
        Ok(api::Process {
            process_id: pid,
            sandbox_id: id.to_string(),
            cmd: req.cmd,
            state: api::ProcessState::Running,
            exit_code: None,
            started_at,
        })
    }

    /// The sandbox's [`ExecBase`]: read from the registry on its first exec
    /// (kept once the image's environment was found), then from memory.
    fn exec_base(&self, id: &str, live: &Live) -> Result<Arc<ExecBase>> {
        if let Some(base) = live.exec_base.lock().unwrap().clone() {
            return Ok(base);
        }
        let row = self.row(id)?;
        let image_env = self.images.ready(&row.image).ok().flatten().map(|i| i.env);
        let found = image_env.is_some();
        let base = Arc::new(ExecBase {
            image_env: image_env.unwrap_or_default(),
            env: row.env,
            workdir: row.workdir,
        });
        if found {
            *live.exec_base.lock().unwrap() = Some(base.clone());
        }
        Ok(base)
    }

    pub async fn processes(&self, id: &str) -> Result<Vec<api::Process>> {
        let row = self.row(id)?;
        // A sandbox still starting has its processes (the entry command, or a
        // restored snapshot's) as soon as its supervisor runs.
        let _ = self.up(id).await;
        self.refresh(&row).await;
        Ok(self
            .reg
            .processes(id)?
            .into_iter()
            .map(|p| api::Process {
                process_id: p.process_id,
                sandbox_id: p.sandbox_id,
                cmd: p.cmd,
                state: if p.exit_code.is_some() {
                    api::ProcessState::Exited
                } else {
                    api::ProcessState::Running
                },
                exit_code: p.exit_code,
                started_at: p.started_at,
            })
            .collect())
    }

    pub async fn process(&self, id: &str, pid: u32) -> Result<api::Process> {
        self.processes(id)
            .await?
            .into_iter()
            .find(|p| p.process_id == pid)
            .ok_or_else(|| EngineError::NotFound(format!("no process {pid} in sandbox {id}")))
    }

    /// Opens a process's output from `offset`.
    pub async fn read(
        &self,
        id: &str,
        pid: u32,
        stream: StreamName,
        offset: u64,
    ) -> Result<OutputReader> {
        self.pool.note_activity();
        self.row(id)?;
        let live = self.up(id).await.map_err(|e| match e.code() {
            ErrorCode::SandboxNotRunning => EngineError::Coded {
                code: ErrorCode::OutputDiscarded,
                message: "the sandbox's output is no longer kept".into(),
            },
            _ => e,
        })?;
        live.sup
            .read(pid, stream, offset)
            .await
            .map_err(from_client)
    }

    pub async fn stdin(&self, id: &str, pid: u32, data: &[u8]) -> Result<()> {
        let live = self.up(id).await?;
        live.sup.stdin(pid, data).await.map_err(from_client)
    }

    pub async fn stdin_close(&self, id: &str, pid: u32) -> Result<()> {
        let live = self.up(id).await?;
        live.sup.stdin_close(pid).await.map_err(from_client)
    }

    pub async fn signal(&self, id: &str, pid: u32, signo: i32) -> Result<()> {
        if !(1..=64).contains(&signo) {
            return Err(EngineError::Invalid(format!(
                "signal must be between 1 and 64, got {signo}"
            )));
        }
        let live = self.up(id).await?;
        live.sup.signal(pid, signo).await.map_err(from_client)
    }

    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("snapshots").join(id)
    }

    fn snapshot_meta(&self, id: &str) -> Result<SnapshotMeta> {
        let missing = || EngineError::NotFound(format!("no snapshot {id:?}"));
        let ok = id.len() == 35
            && id.starts_with("sn-")
            && id[3..]
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !ok {
            return Err(missing());
        }
        let meta = self.reg.get_snapshot(id)?.ok_or_else(missing)?;
        serde_json::from_str(&meta)
            .map_err(|e| EngineError::Internal(format!("snapshot {id} metadata: {e}")))
    }

    /// Checks that a snapshot can be restored here and is intact.
    async fn restore_config(&self, s: &SnapshotMeta, rootfs: &Path) -> Result<RestoreConfig> {
        let incompatible = |what: &str, then: &str, now: &str| {
            EngineError::Coded {
            code: ErrorCode::SnapshotIncompatible,
            message: format!("the snapshot cannot be restored here: {what} differs (snapshot: {then:?}, here: {now:?})"),
        }
        };
        if s.requires.runsc_version != self.runsc_version {
            return Err(incompatible(
                "runsc",
                &s.requires.runsc_version,
                &self.runsc_version,
            ));
        }
        if s.requires.rootfs != rootfs {
            return Err(incompatible(
                "the image's layers",
                &s.requires.rootfs.display().to_string(),
                &rootfs.display().to_string(),
            ));
        }
        let cpu = snapshots::cpu_signature();
        if s.requires.cpu != cpu {
            return Err(incompatible("the CPU", &s.requires.cpu, &cpu));
        }
        let image_path = self.snapshot_dir(&s.snapshot_id).join("image");
        let (dir, sha) = (image_path.clone(), s.sha256.clone());
        let verified = self.verified_check(dir, sha).await?;
        if !verified {
            return Err(EngineError::Coded {
                code: ErrorCode::SnapshotCorrupt,
                message: format!("snapshot {} is corrupt or truncated: its files do not match their content hash; delete it and take a new one", s.snapshot_id),
            });
        }
        Ok(RestoreConfig {
            image_path,
            procs: s.procs.clone(),
            next_id: s.next_id,
        })
    }

    async fn verified_check(&self, dir: PathBuf, sha: String) -> Result<bool> {
        // Hashing a large checkpoint takes a while: off the async threads.
        let verified = &self.verified;
        tokio::task::block_in_place(|| verified.check(&dir, &sha)).map_err(|e| EngineError::Coded {
            code: ErrorCode::SnapshotCorrupt,
            message: format!("snapshot files unreadable: {e}"),
        })
    }

    /// Takes a memory snapshot of a running sandbox, which goes on running.
    pub async fn snapshot(&self, id: &str) -> Result<api::Snapshot> {
        let row = self.row(id)?;
        let live = self.up(id).await?;
        let snap_id = format!("sn-{}", &new_id()[3..]);
        let dir = self.snapshot_dir(&snap_id);
        let image_path = dir.join("image");
        let info = match live.sup.checkpoint(&image_path).await {
            Ok(i) => i,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(from_client(e));
            }
        };
        let rootfs = self
            .images
            .ready(&row.image)
            .ok()
            .flatten()
            .map(|i| i.rootfs)
            .ok_or_else(|| EngineError::Internal(format!("image {} vanished", row.image)))?;
        let (sha256, size_bytes) = tokio::task::block_in_place(|| snapshots::hash_dir(&image_path))
            .map_err(|e| EngineError::Internal(format!("cannot hash the snapshot: {e}")))?;
        let meta = SnapshotMeta {
            snapshot_id: snap_id.clone(),
            source_sandbox_id: id.to_string(),
            created_at: now(),
            size_bytes,
            sha256,
            pause_ms: info.pause_ms,
            requires: Requirements {
                runsc_version: self.runsc_version.clone(),
                image: row.image.clone(),
                rootfs,
                cpu: snapshots::cpu_signature(),
                volumes: self.snapshot_volumes(id),
                networked: row.network.needs_netns(),
                slot_volumes: self.uses_slot_volumes(id),
            },
            procs: info.procs,
            next_id: info.next_id,
            env: row.env.clone(),
            workdir: row.workdir.clone(),
            cmd: row.cmd.clone(),
        };
        let doc = serde_json::to_string_pretty(&meta).expect("meta serializes");
        std::fs::write(dir.join("meta.json"), &doc)
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        self.reg.insert_snapshot(&snap_id, meta.created_at, &doc)?;
        Ok(meta.to_api())
    }

    pub fn snapshots(&self) -> Result<Vec<api::Snapshot>> {
        Ok(self
            .reg
            .list_snapshots()?
            .iter()
            .filter_map(|m| serde_json::from_str::<SnapshotMeta>(m).ok())
            .map(|m| m.to_api())
            .collect())
    }

    pub fn get_snapshot(&self, id: &str) -> Result<api::Snapshot> {
        Ok(self.snapshot_meta(id)?.to_api())
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.snapshot_meta(id)?;
        let dir = self.snapshot_dir(id);
        self.verified.forget(&dir.join("image"));
        self.reg.delete_snapshot(id)?;
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    /// Stops the sandbox, frees everything it held and forgets it.
    pub async fn terminate(&self, id: &str) -> Result<()> {
        self.row(id)?;
        let live = self.live(id);
        let mut sup_gone = live.is_none();
        if let Some(live) = &live {
            let mut rx = live.ready.clone();
            // A sandbox still starting is let finish starting, then stopped.
            let _ = tokio::time::timeout(
                Duration::from_secs(120),
                rx.wait_for(|r| *r != Ready::Pending),
            )
            .await;
            if let Err(e) = live.sup.shutdown().await {
                tracing::debug!(sandbox = %id, error = %e, "supervisor already gone");
                sup_gone = true;
            }
        }
        self.live.lock().unwrap().remove(id);
        // Its supervisor removes its network and cgroups right after runsc
        // ends; one that was killed cannot. Its runsc ends soon after it (the
        // agent reads EOF): the cgroups go then, in the background.
        if sup_gone {
            let cgroup = gworker_runtime::Cgroup::new(id);
            tokio::task::spawn_blocking(move || cgroup.remove_within(Duration::from_secs(10)));
        }
        let dir = self.net_state_dir();
        if sup_gone && dir.join(format!("{id}.json")).exists() {
            let id2 = id.to_string();
            let res = tokio::task::spawn_blocking(move || {
                gworker_runtime::net::SandboxNet::teardown(&id2, &dir)
            })
            .await;
            if let Ok(Err(e)) = res {
                tracing::warn!(sandbox = %id, error = %e, "cannot remove the sandbox's network");
            }
        }
        let _ = std::fs::remove_file(self.sock_path(id));
        self.remove_slot_volumes(id);
        let _ = std::fs::remove_dir_all(self.sandbox_dir(id));
        self.reg.delete_sandbox(id)?;
        Ok(())
    }

    /// Periodic housekeeping: records exits and removes sandboxes whose
    /// retention period has ended.
    pub async fn housekeep(&self) {
        let Ok(rows) = self.reg.list_sandboxes() else {
            return;
        };
        for row in rows {
            if row.state != "exited" {
                self.refresh(&row).await;
                continue;
            }
            if row
                .exited_at
                .is_some_and(|t| now() - t > self.cfg.retention.as_secs_f64())
            {
                tracing::info!(sandbox = %row.id, "retention over, removing");
                let _ = self.terminate(&row.id).await;
            }
        }
    }
}

/// The fd on which a supervisor reads its sandbox's secrets.
const SECRETS_FD: i32 = gworker_supervisor::server::SECRETS_FD;

/// Starts the supervisor of `dir` detached (own session), handing it the
/// bound listening socket as fd 3, so the daemon can connect at once and can
/// die without taking the supervisor along. Secrets go through a pipe on
/// [`SECRETS_FD`], never through a file. With a `standby` (see
/// [`standby`]) that process becomes the supervisor; else (or if it is gone)
/// `exe supervise DIR` is started.
fn spawn_supervisor(
    exe: &Path,
    dir: &Path,
    sock: &Path,
    launch: &LaunchConfig,
    secrets: Option<Vec<(String, String)>>,
    standby: Option<standby::Standby>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("launch.json"),
        serde_json::to_vec_pretty(launch).expect("launch serializes"),
    )?;
    let _ = std::fs::remove_file(sock);
    let listener = std::os::unix::net::UnixListener::bind(sock)?;
    std::fs::set_permissions(sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("supervisor.log"))?;
    let secret_pipe = match &secrets {
        Some(_) => Some(secrets::pipe_above(10)?),
        None => None,
    };
    let send_secrets = |secret_pipe: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>| {
        if let (Some((rd, wr)), Some(env)) = (secret_pipe, &secrets) {
            drop(rd);
            secrets::send(wr, env)?;
        }
        Ok(())
    };
    if let Some(standby) = standby {
        let mut fds = vec![listener.as_raw_fd(), log.as_raw_fd()];
        fds.extend(secret_pipe.as_ref().map(|(r, _)| r.as_raw_fd()));
        match standby.assign(dir, &fds) {
            Ok(()) => return send_secrets(secret_pipe),
            Err(e) => tracing::warn!(error = %e, "the standby supervisor is gone; starting one"),
        }
    }
    let mut fds = vec![(log.as_raw_fd(), 1), (log.as_raw_fd(), 2)];
    if let Some((rd, _)) = &secret_pipe {
        fds.push((rd.as_raw_fd(), SECRETS_FD));
    }
    fds.push((
        listener.as_raw_fd(),
        gworker_supervisor::server::LISTENER_FD,
    ));
    spawn_detached(exe, &["supervise".as_ref(), dir.as_os_str()], &fds)?;
    drop(listener);
    send_secrets(secret_pipe)
}

/// Starts `exe args` in a session of its own, stdin from /dev/null, each
/// `(fd, at)` of `fds` placed at descriptor number `at` in it (descriptors
/// not placed are not inherited: the daemon's are all close-on-exec), and
/// reaps it whenever it ends, so that it never lingers as a zombie of the
/// daemon.
///
/// Through `posix_spawn` (glibc's clone with `CLONE_VM | CLONE_VFORK`), not
/// `fork`: a fork copies the daemon's page tables under its memory map's
/// lock, which a burst of creates took one at a time (50 cold creates at
/// once: supervisors started over ~900 ms).
pub(crate) fn spawn_detached(
    exe: &Path,
    args: &[&std::ffi::OsStr],
    fds: &[(std::os::fd::RawFd, std::os::fd::RawFd)],
) -> std::io::Result<()> {
    let pid = spawn::posix_spawn_detached(exe, args, fds)?;
    std::thread::spawn(move || {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_are_checked() {
        assert!(valid_env_name("A_1"));
        assert!(valid_env_name("_x"));
        assert!(!valid_env_name("1A"));
        assert!(!valid_env_name("A-B"));
        assert!(!valid_env_name(""));
        assert!(!valid_env_name("A=B"));
    }

    #[test]
    fn env_layers_override_in_order() {
        let image = vec![
            ("PATH".to_string(), "/img".to_string()),
            ("A".to_string(), "image".to_string()),
        ];
        let user = vec![("A".to_string(), "user".to_string())];
        let env = merge_env(&[&image, &user]);
        assert!(env.contains(&"PATH=/img".to_string()));
        assert!(env.contains(&"A=user".to_string()));
        assert!(env.contains(&"HOME=/root".to_string()));
    }

    #[test]
    fn ids_are_unguessable_and_checked() {
        let a = new_id();
        assert_eq!(a.len(), 35);
        assert_ne!(a, new_id());
        assert!(check_id(&a).is_ok());
        assert!(check_id("sb-../../etc").is_err());
        assert!(check_id(&a.to_uppercase()).is_err());
    }
}
