//! The warm pool: pre-booted sandboxes per image, so that `create` claims a
//! running sandbox and only applies what is per-sandbox (entry command, env,
//! workdir, deadline) instead of booting gVisor.
//!
//! Rules:
//! - A slot is used once: a claimed sandbox is the user's for good, and a slot
//!   never held anyone's processes or files before (it is a fresh boot that ran
//!   nothing), so a claimed sandbox is indistinguishable from a cold one.
//! - Slots are not in the registry until claimed; after a daemon restart,
//!   unclaimed slots (sandbox directories the registry does not know) are
//!   shut down and removed, and the pool is filled anew.
//! - Only sandboxes without a snapshot come from the pool; restores start
//!   cold. A claim's volumes are bound under the slot's volume directory and
//!   mounted at their paths before anything runs (`gworker_runtime::volbind`).
//!   Slots boot with the daemon's default network
//!   (`--pool`) or none at all (`--pool-blocked`, for `block_network`
//!   creates); a networked slot also serves a `cidr_allowlist` create, whose
//!   rules replace the slot's at claim. Secrets and limits are applied at
//!   claim too.
//! - A pool is configured by the name `create` is given (a built-in, a tag
//!   or an image ID); a slot belongs to the image that name resolved to when
//!   it booted, and only a create of that image claims it (a create resolves
//!   tags to IDs too). A tag that moves leaves its older slots to creates of
//!   the older image ID.
//! - The pool never holds more than its memory budget (each idle sandbox costs
//!   about [`SLOT_COST_MB`] of host memory).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gworker_api as api;
use gworker_supervisor::{LaunchConfig, Phase, SupClient};

use crate::{new_id, spawn_supervisor, Engine};

/// Approximate host memory of one idle sandbox (sentry + gofer + supervisor).
pub const SLOT_COST_MB: u64 = 50;

/// The network a pool's slots boot with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolNetwork {
    /// The daemon's default network (`--pool`).
    #[default]
    Default,
    /// None, loopback only (`--pool-blocked`): for `block_network` creates.
    Blocked,
}

impl PoolNetwork {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolNetwork::Default => "default",
            PoolNetwork::Blocked => "blocked",
        }
    }
}

/// One pool: an image (as configured, or as resolved for booting slots) and
/// the network of its slots.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub image: String,
    pub network: PoolNetwork,
}

impl PoolKey {
    pub fn new(image: &str, network: PoolNetwork) -> PoolKey {
        PoolKey {
            image: image.to_string(),
            network,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PoolConfig {
    /// Warm sandboxes to keep per image and network.
    pub sizes: BTreeMap<PoolKey, usize>,
    /// Most memory the pool may hold, in MiB.
    pub memory_budget_mb: u64,
}

#[derive(Default)]
pub(crate) struct Pool {
    pub(crate) cfg: PoolConfig,
    /// Per configured pool: (slot's sandbox ID, the image it runs).
    ready: Mutex<HashMap<PoolKey, VecDeque<(String, String)>>>,
    starting: Mutex<HashMap<PoolKey, usize>>,
    /// When a slot was last claimed (see [`REFILL_QUIET`]).
    last_claim: Mutex<Option<std::time::Instant>>,
    /// When an exec, wait or output read last came (see [`Pool::burst`]).
    last_activity: Mutex<Option<std::time::Instant>>,
    /// Slots booting per resolved image (a built-in's name or an image ID)
    /// and network.
    booting: Mutex<HashMap<PoolKey, usize>>,
    /// Notified whenever a slot becomes ready.
    became_ready: tokio::sync::Notify,
    /// Creates waiting for a slot (see [`Pool::take_or_wait`]).
    waiting: std::sync::atomic::AtomicUsize,
    /// Set when the daemon stops: no more refills (see [`Engine::stop_pool`]).
    stopped: std::sync::atomic::AtomicBool,
}

/// How long a create whose image has no ready slot waits for one that is
/// booting before it starts cold: a slot already booting is ahead of a cold
/// boot started now, which would also compete with it for the CPU. 3 s;
/// `GWORKER_POOL_MISS_WAIT_SECS` overrides it (tests on a busy machine).
pub fn miss_wait() -> Duration {
    gworker_runtime::env_secs("GWORKER_POOL_MISS_WAIT_SECS", 3)
}

/// Counts a slot as booting for its image and network while alive.
struct Booting<'a> {
    pool: &'a Pool,
    key: PoolKey,
}

impl<'a> Booting<'a> {
    fn new(pool: &'a Pool, key: PoolKey) -> Self {
        *pool.booting.lock().unwrap().entry(key.clone()).or_default() += 1;
        Booting { pool, key }
    }
}

impl Drop for Booting<'_> {
    fn drop(&mut self) {
        let mut b = self.pool.booting.lock().unwrap();
        if let Some(n) = b.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
        drop(b);
        // A create waiting for this image stops waiting if none is left.
        self.pool.became_ready.notify_waiters();
    }
}

/// A burst of creates is on while the last claim is this recent. During a
/// burst, refills wait (see [`refill_now`]): a boot costs ~60-100 ms of CPU,
/// more than a claimed sandbox's whole create and first command, and on a
/// small host every boot started in a burst makes the burst's creates slower.
/// A steady stream slower than one create per this period still finds the
/// pool refilling between its creates.
pub const REFILL_QUIET: Duration = Duration::from_millis(100);

/// How long after its last claim a burst's own follow-up (the claimed
/// sandboxes' commands, their output) still holds refills back.
pub const BURST_TAIL: Duration = Duration::from_secs(2);

/// During a burst, at most this many slots of an image boot at once, and
/// only for creates waiting on an empty pool.
pub const BURST_BOOTS: usize = 2;

/// The count under `key` (0 if none).
fn count(counts: &Mutex<HashMap<PoolKey, usize>>, key: &PoolKey) -> usize {
    counts.lock().unwrap().get(key).copied().unwrap_or(0)
}

/// What holds refills back now (see [`Pool::burst`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Burst {
    None,
    /// Claims are coming: refills wait, unless creates wait on an empty pool.
    Claims,
    /// The claims are over but their sandboxes' first commands still run:
    /// refills wait while the pool holds at least a quarter of its size, so
    /// that steady traffic (creates every second or two beside busy
    /// sandboxes) never drains it.
    Tail,
}

/// Whether to start booting another slot of an image now.
fn refill_now(want: usize, ready: usize, starting: usize, burst: Burst, waiting: usize) -> bool {
    if ready + starting >= want {
        return false;
    }
    match burst {
        Burst::None => true,
        Burst::Tail => (ready + starting) * 4 < want,
        Burst::Claims => ready == 0 && waiting > 0 && starting < BURST_BOOTS,
    }
}

impl Pool {
    pub(crate) fn new(cfg: PoolConfig) -> Pool {
        Pool {
            cfg,
            ..Default::default()
        }
    }

    fn total(&self) -> usize {
        // Starting first: see [`Pool::counts`].
        let starting = self.starting_total();
        starting
            + self
                .ready
                .lock()
                .unwrap()
                .values()
                .map(|q| q.len())
                .sum::<usize>()
    }

    /// Slots booting, of every image.
    fn starting_total(&self) -> usize {
        self.starting.lock().unwrap().values().sum()
    }

    /// `(ready, starting)` slots of pool `key`. A booted slot joins `ready`
    /// before it leaves `starting`, so reading `starting` first may count it
    /// twice but never misses it: read the other way round, a slot that
    /// moved in between was in neither count, and the pool booted one slot
    /// too many (seen: 101 of 100).
    fn counts(&self, key: &PoolKey) -> (usize, usize) {
        let starting = count(&self.starting, key);
        (self.ready_count(key), starting)
    }

    /// Takes a ready slot's sandbox ID for `image` (a built-in's name or a
    /// built image's ID) with `network`: the one that became ready last in
    /// its pool (when a tag's pool and its ID's pool both hold the image,
    /// the first pool found serves).
    ///
    /// Newest first, because a slot's memory gets slower to touch the longer
    /// it sits idle: on a VM whose host reclaims idle guest memory, reading
    /// 512 MiB untouched for 3 minutes took 295 ms against 136-150 ms
    /// fresh, and in 7 of 9 pairs 50 claims at once of slots idle for
    /// 150-240 s answered later at p95 (by ~30 ms on average) than of slots
    /// just booted (`bench/RESULTS.md`, session 13).
    pub(crate) fn take(&self, image: &str, network: PoolNetwork) -> Option<String> {
        let mut ready = self.ready.lock().unwrap();
        let slot = ready
            .iter_mut()
            .filter(|(k, _)| k.network == network)
            .find_map(|(_, q)| {
                let at = q.iter().rposition(|(_, i)| i == image)?;
                q.remove(at).map(|(id, _)| id)
            });
        if slot.is_some() {
            *self.last_claim.lock().unwrap() = Some(std::time::Instant::now());
        }
        slot
    }

    /// Like [`Pool::take`], but when none is ready and the image has a pool
    /// (or slots of it are booting), waits up to `limit` for one.
    pub(crate) async fn take_or_wait(
        &self,
        image: &str,
        network: PoolNetwork,
        limit: Duration,
    ) -> Option<String> {
        if let Some(slot) = self.take(image, network) {
            return Some(slot);
        }
        let key = PoolKey::new(image, network);
        let pooled = self.cfg.sizes.get(&key).is_some_and(|n| *n > 0);
        let booting = || count(&self.booting, &key);
        if !pooled && booting() == 0 {
            return None;
        }
        // Counted while this create waits, also if its request is dropped.
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.became_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(slot) = self.take(image, network) {
                break Some(slot);
            }
            if !pooled && booting() == 0 {
                break None;
            }
            // Woken by a slot that became ready (or gave up), or every 50 ms
            // to look again (a boot that fill_pool starts for this wait).
            let tick = (tokio::time::Instant::now() + Duration::from_millis(50)).min(deadline);
            let _ = tokio::time::timeout_at(tick, notified).await;
            if tokio::time::Instant::now() >= deadline {
                break self.take(image, network);
            }
        }
    }

    /// A burst is on while the last claim is recent (REFILL_QUIET); its tail
    /// goes on while execs and output reads keep coming until REFILL_QUIET
    /// before now, up to BURST_TAIL after the last claim. Fifty creates at
    /// once are claimed within ~100 ms, but their first commands answer over
    /// the next ~150 ms; refill boots started then made the slowest of them
    /// slower (`bench/RESULTS.md`, session 7). Activity long after a claim
    /// (a user's exec loop) does not hold refills back.
    fn burst(&self) -> Burst {
        let since = |t: &Mutex<Option<std::time::Instant>>| t.lock().unwrap().map(|t| t.elapsed());
        let Some(claim) = since(&self.last_claim) else {
            return Burst::None;
        };
        if claim < REFILL_QUIET {
            Burst::Claims
        } else if claim < BURST_TAIL && since(&self.last_activity).is_some_and(|a| a < REFILL_QUIET)
        {
            Burst::Tail
        } else {
            Burst::None
        }
    }

    /// Notes an exec, a wait or an output read (see [`Pool::burst`]).
    pub(crate) fn note_activity(&self) {
        *self.last_activity.lock().unwrap() = Some(std::time::Instant::now());
    }

    pub(crate) fn ready_count(&self, key: &PoolKey) -> usize {
        self.ready.lock().unwrap().get(key).map_or(0, |q| q.len())
    }
}

impl Engine {
    /// Each configured pool: image, network, size, ready and booting slots.
    pub fn pool_status(&self) -> Vec<api::PoolImage> {
        let cfg = &self.pool.cfg.sizes;
        cfg.iter()
            .filter(|(_, n)| **n > 0)
            .map(|(key, size)| {
                let (ready, booting) = self.pool.counts(key);
                api::PoolImage {
                    image: key.image.clone(),
                    network: key.network.as_str().to_string(),
                    size: *size,
                    ready,
                    booting,
                }
            })
            .collect()
    }
}

impl Engine {
    /// Keeps the pool filled, in the background, one slot at a time per image.
    pub fn start_pool(self: &Arc<Self>) {
        if self.pool.cfg.sizes.values().all(|n| *n == 0) {
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move {
            loop {
                engine.fill_pool().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }

    async fn fill_pool(self: &Arc<Self>) {
        if self.pool.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let budget_slots = (self.pool.cfg.memory_budget_mb / SLOT_COST_MB) as usize;
        for (key, want) in &self.pool.cfg.sizes {
            let (ready, starting) = self.pool.counts(key);
            if self.pool.total() >= budget_slots
                || !refill_now(
                    *want,
                    ready,
                    starting,
                    self.pool.burst(),
                    self.pool.waiting.load(std::sync::atomic::Ordering::Relaxed),
                )
            {
                continue;
            }
            *self
                .pool
                .starting
                .lock()
                .unwrap()
                .entry(key.clone())
                .or_default() += 1;
            let engine = self.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let res = engine.boot_slot(&key).await;
                match res {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(image = %key.image, network = key.network.as_str(), error = %e, "warm pool: slot failed to boot");
                        // Do not spin on a broken (or not yet built) image:
                        // the slot counts as starting until the pause ends.
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
                *engine.pool.starting.lock().unwrap().entry(key).or_default() -= 1;
            });
        }
    }

    /// Boots one unclaimed sandbox for the pool configured as `key`, waits
    /// until its agent is up, and adds it to the ready slots with the image it
    /// runs (the name resolved: a built-in's name or a built image's ID).
    async fn boot_slot(&self, key: &PoolKey) -> Result<(), String> {
        let images = self.images.clone();
        let name = key.image.clone();
        let info = tokio::task::spawn_blocking(move || images.ensure(&name, &mut |_| {}))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let id = new_id();
        let resolved = info.name.clone();
        let _booting = Booting::new(&self.pool, PoolKey::new(&resolved, key.network));
        let launch = LaunchConfig {
            sandbox_id: id.clone(),
            runsc_bin: self.cfg.runsc_bin.clone(),
            runsc_root: self.cfg.data_dir.join("runsc"),
            rootfs: info.rootfs,
            agent: self.cfg.agent.clone(),
            entry: None,
            // Ignored until the claim sets it (JSON has no infinity).
            deadline: 0.0,
            restore: None,
            volumes: Vec::new(),
            // A claim's volumes are bound under it (see `claim_slot`).
            slot_volumes: Some(self.slot_volumes_dir(&id)),
            secrets_fd: None,
            pooled: true,
            limits: self.cfg.default_limits.clone(),
            // The image's user, as a cold start would have it.
            user: info.user_ids,
            network: Some(match key.network {
                PoolNetwork::Default => self.cfg.default_network.clone(),
                PoolNetwork::Blocked => gworker_runtime::net::NetPolicy::Blocked,
            }),
            net_state_dir: Some(self.net_state_dir()),
        };
        let dir = self.sandbox_dir(&id);
        let sock = self.sock_path(&id);
        let exe = self.cfg.supervisor_exe.clone();
        let (d2, s2) = (dir.clone(), sock.clone());
        tokio::task::spawn_blocking(move || spawn_supervisor(&exe, &d2, &s2, &launch, None, None))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let sup = SupClient::new(&sock);
        let start = std::time::Instant::now();
        loop {
            match sup.status().await {
                Ok(st) if st.phase == Phase::Running => {
                    // Ready before it stops counting as booting, so that a
                    // create waiting for it never sees neither.
                    self.pool
                        .ready
                        .lock()
                        .unwrap()
                        .entry(key.clone())
                        .or_default()
                        .push_back((id, resolved));
                    self.pool.became_ready.notify_waiters();
                    return Ok(());
                }
                Ok(st) if st.phase == Phase::Exited => break,
                _ if start.elapsed() > Duration::from_secs(60) => break,
                // Not faster: with many slots booting at once, 10 ms polls
                // cost the daemon and supervisors real CPU.
                _ => tokio::time::sleep(Duration::from_millis(40)).await,
            }
        }
        self.discard_slot(&id).await;
        Err("the sandbox did not come up".into())
    }

    /// Shuts down an unclaimed (or failed) slot and removes its files.
    pub(crate) async fn discard_slot(&self, id: &str) {
        let _ = SupClient::new(self.sock_path(id)).shutdown().await;
        let _ = std::fs::remove_file(self.sock_path(id));
        self.remove_slot_volumes(id);
        let _ = std::fs::remove_dir_all(self.sandbox_dir(id));
    }

    /// Sandbox directories the registry has no row for: unclaimed pool
    /// slots, or a create cut short.
    fn unregistered_sandboxes(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("sandboxes")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|id| {
                crate::check_id(id).is_ok() && matches!(self.reg.get_sandbox(id), Ok(None))
            })
            .collect()
    }

    /// For a daemon that stops: no more refills, and every unclaimed slot
    /// (ready or booting: every sandbox the registry does not know) shut down
    /// and removed, so that a stopped daemon leaves only its users'
    /// sandboxes running. Waits for them, at most `limit`.
    pub async fn stop_pool(self: &Arc<Self>, limit: Duration) {
        self.pool
            .stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.pool.ready.lock().unwrap().clear();
        // A slot still booting is let finish, then shut down: its directory
        // may not exist yet when this starts.
        let deadline = tokio::time::Instant::now() + limit;
        while self.pool.starting_total() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut stops = tokio::task::JoinSet::new();
        for id in self.unregistered_sandboxes() {
            let engine = self.clone();
            stops.spawn(async move { engine.discard_slot(&id).await });
        }
        let _ = tokio::time::timeout_at(deadline, async {
            while stops.join_next().await.is_some() {}
        })
        .await;
    }

    /// Removes sandboxes the registry does not know: unclaimed pool slots of
    /// an earlier daemon, or a create cut short by a crash; and snapshot
    /// directories of snapshots cut short by a crash. Call before serving and
    /// before the pool starts: the list is taken at once, the sandboxes are
    /// stopped in the background, in parallel.
    pub async fn remove_orphans(self: &Arc<Self>) {
        if let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("snapshots")) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if matches!(self.reg.get_snapshot(&id), Ok(None)) {
                    tracing::info!(snapshot = %id, "removing an unfinished snapshot");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        // Volume directories of sandboxes whose directory is gone.
        if let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("volbinds")) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if !self.sandbox_dir(&id).exists() {
                    self.remove_slot_volumes(&id);
                }
            }
        }
        for id in self.unregistered_sandboxes() {
            tracing::info!(sandbox = %id, "removing an orphaned sandbox (unclaimed pool slot or interrupted create)");
            let engine = self.clone();
            tokio::spawn(async move { engine.discard_slot(&id).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_with(slots: &[(&str, &str, &str)]) -> Pool {
        let pool = Pool::new(PoolConfig::default());
        {
            let mut ready = pool.ready.lock().unwrap();
            for (name, id, image) in slots {
                ready
                    .entry(PoolKey::new(name, PoolNetwork::Default))
                    .or_default()
                    .push_back((id.to_string(), image.to_string()));
            }
        }
        pool
    }

    #[test]
    fn a_booted_slot_is_always_counted_while_it_moves_from_starting_to_ready() {
        const SLOTS: usize = 20_000;
        let pool = std::sync::Arc::new(Pool::new(PoolConfig::default()));
        let key = PoolKey::new("busybox", PoolNetwork::Default);
        pool.starting.lock().unwrap().insert(key.clone(), SLOTS);
        let mover = {
            let pool = pool.clone();
            let key = key.clone();
            std::thread::spawn(move || {
                // As boot_slot and its task do: into ready, then out of starting.
                for i in 0..SLOTS {
                    pool.ready
                        .lock()
                        .unwrap()
                        .entry(key.clone())
                        .or_default()
                        .push_back((format!("sb-{i}"), "busybox".into()));
                    *pool.starting.lock().unwrap().get_mut(&key).unwrap() -= 1;
                }
            })
        };
        while !mover.is_finished() {
            let (ready, starting) = pool.counts(&key);
            assert!(
                ready + starting >= SLOTS,
                "{ready} ready + {starting} starting"
            );
            assert!(pool.total() >= SLOTS);
        }
        mover.join().unwrap();
        assert_eq!(pool.counts(&key), (SLOTS, 0));
    }

    #[test]
    fn a_slot_is_claimed_by_the_image_its_name_resolved_to() {
        // `my-tag` resolved to im-1 when its slots booted; creates resolve
        // tags to IDs, so a create of im-1 claims them, a create of the tag's
        // name (never sent) or another image does not.
        let pool = pool_with(&[
            ("my-tag", "sb-a", "im-1"),
            ("my-tag", "sb-b", "im-1"),
            ("busybox", "sb-c", "busybox"),
        ]);
        assert_eq!(pool.take("im-2", PoolNetwork::Default), None);
        assert_eq!(pool.take("my-tag", PoolNetwork::Default), None);
        assert_eq!(
            pool.take("im-1", PoolNetwork::Default).as_deref(),
            Some("sb-b")
        );
        assert_eq!(
            pool.take("busybox", PoolNetwork::Default).as_deref(),
            Some("sb-c")
        );
        assert_eq!(pool.take("busybox", PoolNetwork::Default), None);
        assert_eq!(
            pool.ready_count(&PoolKey::new("my-tag", PoolNetwork::Default)),
            1
        );
    }

    #[test]
    fn the_slot_that_became_ready_last_is_claimed_first() {
        let pool = pool_with(&[
            ("busybox", "sb-old", "busybox"),
            ("debian-slim", "sb-other", "debian-slim"),
            ("busybox", "sb-new", "busybox"),
        ]);
        let take = || pool.take("busybox", PoolNetwork::Default);
        assert_eq!(take().as_deref(), Some("sb-new"));
        assert_eq!(take().as_deref(), Some("sb-old"));
        assert_eq!(take(), None);
    }

    #[test]
    fn a_slot_is_claimed_only_with_the_network_it_booted_with() {
        let pool = Pool::new(PoolConfig::default());
        pool.ready
            .lock()
            .unwrap()
            .entry(PoolKey::new("busybox", PoolNetwork::Blocked))
            .or_default()
            .push_back(("sb-none".into(), "busybox".into()));
        assert_eq!(pool.take("busybox", PoolNetwork::Default), None);
        assert_eq!(
            pool.take("busybox", PoolNetwork::Blocked).as_deref(),
            Some("sb-none")
        );
    }

    #[test]
    fn refills_wait_for_a_burst_to_end_unless_creates_wait_on_an_empty_pool() {
        // (want, ready, starting, burst, waiting)
        assert!(refill_now(10, 3, 0, Burst::None, 0), "quiet: refill");
        assert!(
            !refill_now(10, 7, 3, Burst::None, 0),
            "full counting the booting ones"
        );
        assert!(
            !refill_now(10, 1, 0, Burst::Claims, 0),
            "burst with slots left: wait"
        );
        assert!(
            !refill_now(10, 0, 0, Burst::Claims, 0),
            "burst, empty, nobody waiting: wait"
        );
        assert!(
            refill_now(10, 0, 0, Burst::Claims, 1),
            "burst, empty, a create waits: boot"
        );
        assert!(refill_now(10, 0, BURST_BOOTS - 1, Burst::Claims, 5));
        assert!(
            !refill_now(10, 0, BURST_BOOTS, Burst::Claims, 5),
            "at most BURST_BOOTS in a burst"
        );
    }

    #[test]
    fn a_claim_starts_a_quiet_period_for_refills() {
        let pool = pool_with(&[
            ("busybox", "sb-a", "busybox"),
            ("busybox", "sb-b", "busybox"),
        ]);
        assert_eq!(pool.burst(), Burst::None, "no claim yet");
        assert!(pool.take("nothing-here", PoolNetwork::Default).is_none());
        assert_eq!(pool.burst(), Burst::None, "a miss is not a claim");
        pool.take("busybox", PoolNetwork::Default).unwrap();
        assert_eq!(pool.burst(), Burst::Claims);
        *pool.last_claim.lock().unwrap() =
            Some(std::time::Instant::now() - REFILL_QUIET - Duration::from_millis(1));
        assert_eq!(pool.burst(), Burst::None, "claims paused for REFILL_QUIET");
    }

    #[test]
    fn a_bursts_tail_holds_refills_back_only_while_a_quarter_is_left() {
        // (want, ready, starting, burst, waiting)
        assert!(!refill_now(100, 50, 0, Burst::Tail, 0), "half left: wait");
        assert!(
            !refill_now(100, 20, 5, Burst::Tail, 0),
            "a quarter left: wait"
        );
        assert!(
            refill_now(100, 24, 0, Burst::Tail, 0),
            "under a quarter: refill"
        );
        assert!(
            refill_now(1, 0, 0, Burst::Tail, 0),
            "a pool of one never waits empty"
        );
    }

    #[test]
    fn a_bursts_follow_up_holds_refills_back_for_a_while() {
        let pool = pool_with(&[("busybox", "sb-a", "busybox")]);
        pool.note_activity();
        assert_eq!(pool.burst(), Burst::None, "activity without a claim");
        pool.take("busybox", PoolNetwork::Default).unwrap();
        let ago = |d: Duration| Some(std::time::Instant::now() - d);
        *pool.last_claim.lock().unwrap() = ago(REFILL_QUIET * 2);
        pool.note_activity();
        assert_eq!(
            pool.burst(),
            Burst::Tail,
            "the claimed sandboxes' commands still run"
        );
        *pool.last_activity.lock().unwrap() = ago(REFILL_QUIET + Duration::from_millis(1));
        assert_eq!(pool.burst(), Burst::None, "follow-up over");
        *pool.last_claim.lock().unwrap() = ago(BURST_TAIL);
        pool.note_activity();
        assert_eq!(
            pool.burst(),
            Burst::None,
            "activity long after the last claim"
        );
    }
}
