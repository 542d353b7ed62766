//! Sandbox networking: a private network namespace per sandbox, with a policy
//! enforced on the host by iptables.
//!
//! A sandbox either has no network at all ([`NetPolicy::Blocked`]: runsc's
//! `--network=none`, loopback only, nothing here is involved) or gets its own
//! network namespace `gw-<id>` holding one end (`eth0`) of a veth pair whose
//! host end is `gwh-<slot>`. gVisor's own network stack (`runsc
//! --network=sandbox`) takes that interface over. Everything the sandbox sends
//! arrives on the host end and is filtered there, outside the sandbox's reach,
//! by iptables rules in dedicated chains, then NATed (MASQUERADE) out of
//! whichever host interface routes it.
//!
//! See `docs/network.md` for the design, the default policy and the reasons.
//!
//! # API
//!
//! ```text
//! pub enum NetPolicy { Blocked, Internet { extra_allowed: Vec<Ipv4Cidr> }, Allowlist(Vec<Ipv4Cidr>) }
//! SandboxNet::setup(id: &str, policy: &NetPolicy, state_dir: &Path) -> Result<SandboxNet, NetError>
//! SandboxNet::setup_with(id, policy, state_dir, nameservers: &[Ipv4Addr]) -> Result<SandboxNet, NetError>
//! SandboxNet::teardown(id: &str, state_dir: &Path) -> Result<(), NetError>
//! SandboxNet::netns_path(&self) -> PathBuf            // /run/netns/gw-<id>
//! SandboxNet::oci_namespace(&self) -> serde_json::Value  // {"type":"network","path":...}
//! SandboxNet::resolv_conf() -> String                 // the host's usable nameservers
//! cleanup_stale(keep: &dyn Fn(&str) -> bool, state_dir: &Path) -> Result<Vec<String>, NetError>
//! runsc_wrapper() -> Vec<String>                      // unshare … sh -c 'mount … && exec "$@"' sh
//! wrap_runsc(cmd: &Command) -> Command                // a runsc Command, wrapped, --network=sandbox
//! host_nameservers() -> Vec<Ipv4Addr>                 // what setup() allows on port 53
//! Ipv4Cidr: FromStr ("10.0.0.0/8", "1.2.3.4"), Display, serde as a string
//! ```
//!
//! # Policies
//!
//! * [`NetPolicy::Blocked`]: no network namespace of ours; runsc keeps
//!   `--network=none`. [`SandboxNet::setup`] refuses it ([`NetError::Blocked`]).
//!   This is the default.
//! * [`NetPolicy::Internet`]: outbound to public addresses. Refused: every
//!   address of the host (all of them, whatever the interface), loopback,
//!   `0.0.0.0/8`, link-local `169.254.0.0/16` (cloud metadata), `10/8`,
//!   `172.16/12`, `192.168/16`, `100.64/10`, `192.0.0.0/24`, `198.18/15`,
//!   multicast `224/4`, reserved `240/4` (incl. broadcast), the host's directly
//!   connected subnets, the sandbox pool [`POOL`]. `extra_allowed` CIDRs are
//!   accepted before that deny list (an operator's internal mirror, say) —
//!   except the host itself and other sandboxes, which stay refused.
//! * [`NetPolicy::Allowlist`]: only the listed CIDRs. The host itself and other
//!   sandboxes stay refused **even if listed** (decision: anything the host
//!   offers to sandboxes must be offered some other way; a listed CIDR that
//!   contains a host address still reaches the rest of that subnet).
//!
//! Both add DNS (udp and tcp port 53) to the nameservers of the host's
//! `/etc/resolv.conf` (loopback nameservers such as systemd-resolved's
//! `127.0.0.53` cannot be reached from a sandbox and are left out), even if
//! they are private addresses. Nothing can connect *into* a sandbox (not other
//! sandboxes, not the outside); replies to the sandbox's own connections
//! (conntrack ESTABLISHED,RELATED) come back. The host itself may connect to
//! a sandbox's address (its own output is not filtered; the replies are
//! accepted as ESTABLISHED). IPv4 only: IPv6 is disabled on both veth ends.
//!
//! # Rules
//!
//! All rules live in chains of our own; the host's other rules are untouched
//! except for one jump at the top of `INPUT`, `FORWARD` (filter) and
//! `POSTROUTING` (nat):
//!
//! * `GWORKER-IN` (from `INPUT`): traffic from a sandbox to the host itself is
//!   rejected (replies to connections the host opened are allowed).
//! * `GWORKER-FWD` (from `FORWARD`): replies into sandboxes accepted, anything
//!   else into a sandbox rejected (so sandboxes cannot reach each other), the
//!   pool rejected, then `GWORKER-SB`, then reject (fail closed: an interface
//!   without its own rules gets nothing).
//! * `GWORKER-SB`: one jump per sandbox, `-i gwh-<slot> -m comment --comment
//!   gw:<id> -j GW-<slot>`.
//! * `GW-<slot>`: the sandbox's chain: drop spoofed sources, accept
//!   established, DNS, the policy.
//! * `GWORKER-PUBLIC`: the deny list of [`NetPolicy::Internet`], then accept.
//! * `GWORKER-REJECT`: how refusals look: a TCP reset (immediate "connection
//!   refused"), else ICMP "administratively prohibited".
//! * `GWORKER-NAT` (from nat `POSTROUTING`): MASQUERADE of the pool leaving
//!   through any non-sandbox interface.
//!
//! The shared chains carry a `gworker:<digest>` comment; each setup checks
//! them and rewrites them atomically if they are missing or out of date (for
//! example after the host got a new address). Every change is one
//! `iptables-restore --noflush` transaction.
//!
//! # Names, addresses, state
//!
//! Sandbox `id` (1–64 of `[A-Za-z0-9_-]`) gets netns `gw-<id>`
//! (`/run/netns/gw-<id>`; `/var/run` is not a link to `/run` on these
//! machines) and a *slot* `N` of the pool: host end `gwh-N` with
//! `10.231.x.y+1/30`, guest end `eth0` with `+2/30`, default route via the
//! host end. A slot is claimed by creating the interface `gwh-N`: interface
//! names are unique in the kernel, so the claim is atomic even between
//! processes that do not share a lock. The host end carries the alias
//! `gw:<id>`, and the kernel also knows the name of its peer's netns, so the
//! owner of every interface is known after any crash. `state_dir/<id>.json`
//! remembers an id's slot, so a sandbox set up again (for a restore, say)
//! keeps its address. [`HOST_LOCK`] (flock) serialises setup, teardown and
//! cleanup of all callers on the host, whatever their state dir.
//!
//! Setup enables `net.ipv4.ip_forward` if it is 0, which makes the host route
//! between *all* its interfaces (subject to the `FORWARD` chain's policy).
//!
//! # What the caller must do (OCI bundle and runsc command line)
//!
//! For a sandbox with a policy other than `Blocked`:
//!
//! 1. `let net = SandboxNet::setup(id, &policy, &state_dir)?` before `runsc
//!    run` (and again before each `runsc restore`: runsc moves the veth's
//!    addresses into the sandbox, so every run needs a fresh veth; setting up
//!    an id again replaces its veth and keeps its slot). Or, to make the
//!    network while runsc boots (~15 ms of a cold start): only
//!    [`SandboxNet::create_netns`] before runsc, a [`ReadyGate`] in
//!    `config.json`, and [`SandboxNet::setup_in_netns`] then
//!    [`ReadyGate::open_gate`] while runsc starts.
//! 2. In `config.json`, replace `{"type":"network"}` in `linux.namespaces`
//!    with [`SandboxNet::oci_namespace`]:
//!    `{"type":"network","path":"/run/netns/gw-<id>"}`.
//! 3. Write [`SandboxNet::resolv_conf`] to a file of the sandbox and add the
//!    mount `{"destination":"/etc/resolv.conf","type":"bind","source":FILE,
//!    "options":["rbind","ro"]}`.
//! 4. Give runsc `--network=sandbox` instead of `--network=none` (for `run`
//!    and `restore`; the other subcommands do not care) and start it through
//!    [`runsc_wrapper`] ([`wrap_runsc`] does both to a `Command`, with the
//!    wrapper's work done in the child before exec). This runsc
//!    refuses `--network=sandbox` when it believes it is in the host's network
//!    namespace, which it decides by the existence of
//!    `/proc/sys/net/core/rmem_default`; the wrapper hides `/proc/sys/net`
//!    under an empty read-only tmpfs in a private mount namespace. The
//!    namespace is a *slave* of the host's: host mounts made later (volumes
//!    attached to a running sandbox, other sandboxes' netns files and their
//!    removal) still propagate into it. The wrapper `exec`s, so the spawned
//!    process is runsc itself (same pid).
//! 5. After runsc is gone (`delete`d), [`SandboxNet::teardown`]. At daemon
//!    start, [`cleanup_stale`] with the ids of the sandboxes that still live.
//!
//! Checkpoints: this runsc refuses to checkpoint a sandbox that has a TCP
//! endpoint connected or in TIME_WAIT ("endpoint cannot be saved in connected
//! state"; TIME_WAIT lasts about 60 s after a close). A networked sandbox
//! without such endpoints checkpoints, and restores with working network into
//! its netns after a new [`SandboxNet::setup`] (verified by hand).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// The addresses of all sandboxes: one /30 per sandbox (16384 slots).
pub const POOL: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(10, 231, 0, 0),
    prefix: 16,
};
/// Prefix of each sandbox's link (host end `.1`, guest end `.2`).
pub const SUBNET_PREFIX: u8 = 30;
const SLOTS: u32 = 1 << (SUBNET_PREFIX - POOL.prefix);
/// Where iproute2 keeps named network namespaces on these machines.
pub const NETNS_DIR: &str = "/run/netns";
/// Network namespaces are named `gw-<id>`.
pub const NETNS_PREFIX: &str = "gw-";
/// Host ends of the veth pairs are named `gwh-<slot>`.
pub const HOST_IF_PREFIX: &str = "gwh-";
/// The sandbox's end of the veth pair, inside its netns.
pub const GUEST_IF: &str = "eth0";
/// The runsc flag for a sandbox with a network namespace of ours.
pub const RUNSC_NETWORK_FLAG: &str = "--network=sandbox";

const CHAIN_IN: &str = "GWORKER-IN";
const CHAIN_FWD: &str = "GWORKER-FWD";
const CHAIN_SB: &str = "GWORKER-SB";
const CHAIN_PUBLIC: &str = "GWORKER-PUBLIC";
const CHAIN_NAT: &str = "GWORKER-NAT";
const SANDBOX_CHAIN_PREFIX: &str = "GW-";
const CHAIN_REJECT: &str = "GWORKER-REJECT";
/// How everything refused is refused: TCP gets a reset (an immediate
/// "connection refused"; ICMP errors are rate-limited by the kernel, so a
/// client would often wait for a SYN retransmission), the rest an ICMP
/// "administratively prohibited".
const REJECT: &str = "-j GWORKER-REJECT";
/// Comment prefix of per-sandbox rules (`gw:<id>`) and of interface aliases.
const OWNER_TAG: &str = "gw:";
/// Comment prefix of the shared chains' rules (`gworker:<digest>`).
const SHARED_TAG: &str = "gworker:";

/// Destinations [`NetPolicy::Internet`] refuses besides the host's own
/// addresses and connected subnets.
const NON_PUBLIC: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),      // "this network"
    (Ipv4Addr::new(10, 0, 0, 0), 8),     // private
    (Ipv4Addr::new(100, 64, 0, 0), 10),  // carrier-grade NAT
    (Ipv4Addr::new(127, 0, 0, 0), 8),    // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16), // link-local, cloud metadata
    (Ipv4Addr::new(172, 16, 0, 0), 12),  // private
    (Ipv4Addr::new(192, 0, 0, 0), 24),   // IETF protocol assignments
    (Ipv4Addr::new(192, 168, 0, 0), 16), // private
    (Ipv4Addr::new(198, 18, 0, 0), 15),  // benchmarking
    (Ipv4Addr::new(224, 0, 0, 0), 4),    // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4),    // reserved, broadcast
];

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid sandbox id for networking {0:?}: 1-64 characters of [A-Za-z0-9_-]")]
    InvalidId(String),
    #[error("invalid IPv4 CIDR {0:?}")]
    InvalidCidr(String),
    #[error("NetPolicy::Blocked needs no network namespace: run runsc with --network=none")]
    Blocked,
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("no free address in the sandbox pool {POOL}")]
    PoolExhausted,
    #[error("the host network lock {HOST_LOCK} was not free for {secs} s (held by {holder}); a stuck `ip` or `iptables` command, or a stopped gworker process, holds it")]
    LockTimeout { secs: u64, holder: String },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NetError + 'a {
    move |source| NetError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// An IPv4 network, `a.b.c.d/p` (a bare address is a /32). Always normalised
/// to its network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Cidr, NetError> {
        if prefix > 32 {
            return Err(NetError::InvalidCidr(format!("{addr}/{prefix}")));
        }
        Ok(Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// A single address.
    pub fn host(addr: Ipv4Addr) -> Ipv4Cidr {
        Ipv4Cidr { addr, prefix: 32 }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Ipv4Cidr, NetError> {
        let bad = || NetError::InvalidCidr(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| bad())?),
            None => (s, 32),
        };
        let addr = addr.parse::<Ipv4Addr>().map_err(|_| bad())?;
        Ipv4Cidr::new(addr, prefix).map_err(|_| bad())
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Ipv4Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a sandbox may reach over the network. Serialised as `"blocked"`,
/// `{"internet":{"extra_allowed":["10.1.0.0/16"]}}`, `{"allowlist":["1.2.3.0/24"]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetPolicy {
    /// Loopback only: no netns at all, runsc `--network=none` (the caller
    /// handles this; [`SandboxNet::setup`] is not called).
    #[default]
    Blocked,
    /// Outbound to public addresses, plus `extra_allowed` (accepted even if
    /// private), plus DNS to the host's nameservers. Never the host itself or
    /// other sandboxes.
    Internet { extra_allowed: Vec<Ipv4Cidr> },
    /// Only these destinations, plus DNS to the host's nameservers. Never the
    /// host itself or other sandboxes, even if listed.
    Allowlist(Vec<Ipv4Cidr>),
}

impl NetPolicy {
    /// Whether the sandbox needs [`SandboxNet::setup`] (everything but `Blocked`).
    pub fn needs_netns(&self) -> bool {
        !matches!(self, NetPolicy::Blocked)
    }
}

/// One sandbox's network, as set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNet {
    pub id: String,
    /// `gw-<id>`.
    pub netns: String,
    /// `gwh-<slot>`, in the host's namespace.
    pub host_if: String,
    /// `eth0`, in the sandbox's namespace.
    pub guest_if: String,
    /// The sandbox's gateway (the host end).
    pub host_ip: Ipv4Addr,
    /// The sandbox's address.
    pub guest_ip: Ipv4Addr,
    /// Prefix of the link (30).
    pub prefix: u8,
    /// The slot in [`POOL`].
    pub slot: u32,
    /// Nameservers the sandbox may reach on port 53.
    pub nameservers: Vec<Ipv4Addr>,
}

impl SandboxNet {
    /// Creates the netns `gw-<id>`, a veth pair (guest end `eth0` in the
    /// netns, addressed, up, default route via the host end; `lo` up), the
    /// iptables rules of `policy` and the NAT, and enables
    /// `net.ipv4.ip_forward` if it is 0. Setting up an id again replaces its
    /// network with a fresh one on the same slot (same addresses): safe to
    /// retry, not to call while runsc uses the old one. Safe to call
    /// concurrently from threads and processes sharing `state_dir`. On error
    /// nothing of the id is left behind.
    pub fn setup(id: &str, policy: &NetPolicy, state_dir: &Path) -> Result<SandboxNet, NetError> {
        SandboxNet::setup_with(id, policy, state_dir, &host_nameservers())
    }

    /// [`SandboxNet::setup`] with the nameservers the sandbox may reach on
    /// port 53 given explicitly instead of read from `/etc/resolv.conf`.
    pub fn setup_with(
        id: &str,
        policy: &NetPolicy,
        state_dir: &Path,
        nameservers: &[Ipv4Addr],
    ) -> Result<SandboxNet, NetError> {
        SandboxNet::setup_inner(id, policy, state_dir, nameservers, false)
    }

    /// The first half of a setup that overlaps runsc's boot: creates the
    /// empty netns `gw-<id>` (replacing a leftover one) and records the id.
    /// runsc joins the netns when it starts the sandbox process, early; it
    /// reads the interfaces, addresses and routes only after its prestart
    /// hooks ran, ~100 ms later. [`SandboxNet::setup_in_netns`] makes them
    /// (and the rules) meanwhile, and a prestart hook waits for it. On error
    /// nothing of the id is left behind.
    ///
    /// Without the host lock: the netns and the state file are the id's
    /// own, and nothing shared (slots, rules) is touched. A create would
    /// otherwise queue behind every setup and teardown in flight (~10 ms
    /// behind one teardown) before its runsc could even start.
    pub fn create_netns(id: &str, state_dir: &Path) -> Result<PathBuf, NetError> {
        check_id(id)?;
        fs::create_dir_all(state_dir).map_err(io_err("cannot create", state_dir))?;
        let netns = format!("{NETNS_PREFIX}{id}");
        let made = (|| {
            write_state(state_dir, id, recorded_slot(state_dir, id))?;
            del_netns(&netns)?;
            add_netns(&netns)
        })();
        if let Err(e) = made {
            let cleaned =
                lock(state_dir, Wait::Forever).and_then(|_lock| teardown_locked(id, state_dir));
            if let Err(e2) = cleaned {
                tracing::warn!(id, error = %e2, "cannot remove a half-made sandbox network");
            }
            return Err(e);
        }
        Ok(Path::new(NETNS_DIR).join(netns))
    }

    /// The second half: [`SandboxNet::setup`] in the netns that
    /// [`SandboxNet::create_netns`] made (and runsc may already have
    /// joined), which is kept. On error nothing of the id is left behind,
    /// the netns included.
    pub fn setup_in_netns(
        id: &str,
        policy: &NetPolicy,
        state_dir: &Path,
    ) -> Result<SandboxNet, NetError> {
        SandboxNet::setup_inner(id, policy, state_dir, &host_nameservers(), true)
    }

    fn setup_inner(
        id: &str,
        policy: &NetPolicy,
        state_dir: &Path,
        nameservers: &[Ipv4Addr],
        keep_netns: bool,
    ) -> Result<SandboxNet, NetError> {
        check_id(id)?;
        if !policy.needs_netns() {
            return Err(NetError::Blocked);
        }
        // Read before the lock, which every sandbox's setup and teardown
        // waits for: the host's addresses, and the ruleset (~8 ms at 100
        // sandboxes) that the first attempt builds its transaction from. If
        // the rules changed meanwhile so that the transaction no longer
        // applies, it fails as a whole and is built again from fresh rules.
        let host = host_info()?;
        let rules = iptables_save().ok();
        let _lock = lock(state_dir, Wait::Bounded)?;
        let start = std::time::Instant::now();
        match setup_locked(id, policy, state_dir, nameservers, keep_netns, &host, rules) {
            Ok(net) => {
                tracing::debug!(id, slot = net.slot, elapsed = ?start.elapsed(), "sandbox network set up");
                Ok(net)
            }
            Err(e) => {
                if let Err(e2) = teardown_locked(id, state_dir) {
                    tracing::warn!(id, error = %e2, "cannot remove a half-made sandbox network");
                }
                Err(e)
            }
        }
    }

    /// Removes the netns, the veth pair and the iptables rules of `id`, and
    /// its state file. Idempotent: succeeds if they are already gone.
    pub fn teardown(id: &str, state_dir: &Path) -> Result<(), NetError> {
        check_id(id)?;
        let ids = BTreeSet::from([id.to_string()]);
        {
            let _lock = lock(state_dir, Wait::Forever)?;
            // Fast path: the exact rules its setup made, without reading
            // the host's whole ruleset first (~8 ms at 100 sandboxes). Any
            // difference makes the transaction fail as a whole; then the
            // general path finds whatever is there.
            let slot = recorded_slot(state_dir, id);
            let fast = slot.is_some_and(|slot| iptables_restore(&teardown_batch(id, slot)).is_ok());
            if !fast {
                remove_rules_locked(&ids)?;
            }
        }
        // The kernel takes tens of milliseconds to delete a veth and a
        // netns; other sandboxes' setups need not wait for that. Safe
        // unlocked: the rules are gone, the slot stays taken until its
        // interface is, and the state file (which says leftovers may exist)
        // goes last.
        remove_objects(&ids, state_dir)
    }

    /// Replaces the iptables rules of `id`'s network with those of `policy`,
    /// in one transaction: a warm-pool slot booted with the default policy
    /// and claimed for another (an allowlist) is then as a cold start with
    /// `policy` would have made it. Its netns, veth and address stay.
    pub fn set_policy(id: &str, policy: &NetPolicy, state_dir: &Path) -> Result<(), NetError> {
        check_id(id)?;
        if !policy.needs_netns() {
            return Err(NetError::Blocked);
        }
        let slot = recorded_slot(state_dir, id).ok_or_else(|| NetError::Command {
            command: "set_policy".into(),
            message: format!("no network recorded for {id}"),
        })?;
        let host = host_info()?;
        let nameservers = host_nameservers();
        let _lock = lock(state_dir, Wait::Bounded)?;
        apply_rules(&|rs| setup_batch(rs, &host, id, slot, policy, &nameservers))
    }

    /// Gives the guest end of `id`'s veth its address and routes again, in
    /// its netns as its setup left it. runsc takes them over when it starts
    /// a sandbox (its network stack has them, the interface no longer), so a
    /// restore into the same netns after a checkpoint needs them back; the
    /// veth, the host end and the rules stay as they were. No host lock: it
    /// touches nothing outside that netns.
    pub fn readdress(id: &str, state_dir: &Path) -> Result<(), NetError> {
        check_id(id)?;
        let slot = recorded_slot(state_dir, id).ok_or_else(|| NetError::Command {
            command: "readdress".into(),
            message: format!("no network recorded for {id}"),
        })?;
        let (host_ip, guest_ip) = slot_addrs(slot);
        let netns = format!("{NETNS_PREFIX}{id}");
        let batch = format!(
            "link set dev lo up\n\
             address replace {guest_ip}/{SUBNET_PREFIX} dev {GUEST_IF}\n\
             link set dev {GUEST_IF} up\n\
             route replace default via {host_ip} dev {GUEST_IF}\n"
        );
        run("ip", &["-netns", &netns, "-batch", "-"], Some(&batch)).map(|_| ())
    }

    /// `/run/netns/gw-<id>`: the `path` of the OCI network namespace.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// The entry for `linux.namespaces` of `config.json`.
    pub fn oci_namespace(&self) -> serde_json::Value {
        serde_json::json!({"type": "network", "path": self.netns_path()})
    }

    /// Contents for the sandbox's `/etc/resolv.conf`: the host's nameservers
    /// a sandbox can reach (not loopback ones). The caller bind-mounts it
    /// read-only. Empty if the host has none: the sandbox then has no DNS.
    pub fn resolv_conf() -> String {
        host_nameservers()
            .iter()
            .map(|ns| format!("nameserver {ns}\n"))
            .collect()
    }
}

/// The IPv4 nameservers of the host's `/etc/resolv.conf` that a sandbox can
/// reach (loopback and unspecified addresses left out).
pub fn host_nameservers() -> Vec<Ipv4Addr> {
    let text = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    parse_nameservers(&text)
}

fn parse_nameservers(text: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        if let Some(Ok(ip)) = words.next().map(str::parse::<Ipv4Addr>) {
            if !ip.is_loopback() && !ip.is_unspecified() && !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// Removes every gworker netns, veth pair and iptables rule whose sandbox id
/// is not kept (`keep(id)` false), and state files of such ids; also
/// interfaces and sandbox chains no sandbox owns. Returns the ids removed.
/// Call it at daemon start, after a crash: it sweeps the whole host, so
/// `keep` must say yes to every sandbox that lives, whoever started it.
pub fn cleanup_stale(
    keep: &dyn Fn(&str) -> bool,
    state_dir: &Path,
) -> Result<Vec<String>, NetError> {
    let _lock = lock(state_dir, Wait::Forever)?;
    let mut ids: BTreeSet<String> = read_states(state_dir).into_keys().collect();
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for e in entries.flatten() {
            if let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(NETNS_PREFIX))
            {
                ids.insert(id.to_string());
            }
        }
    }
    let links = scan_links()?;
    ids.extend(links.iter().filter_map(|l| l.owner.clone()));
    let rules = iptables_save()?;
    for table in rules.tables.values() {
        ids.extend(
            table
                .rules
                .iter()
                .filter_map(|r| owner_of(r).map(str::to_string)),
        );
    }
    let stale: Vec<String> = ids
        .into_iter()
        .filter(|id| valid_id(id) && !keep(id))
        .collect();
    let mut first_err = None;
    if !stale.is_empty() {
        tracing::info!(ids = ?stale, "removing stale sandbox networks");
        let set: BTreeSet<String> = stale.iter().cloned().collect();
        if let Err(e) = teardown_many_locked(&set, state_dir) {
            tracing::warn!(error = %e, "cannot remove stale sandbox networks");
            first_err.get_or_insert(e);
        }
    }
    // Interfaces nobody owns (no alias, peer netns gone or unnamed).
    let orphans: Vec<String> = scan_links()?
        .into_iter()
        .filter(|l| l.owner.is_none())
        .map(|l| l.name)
        .collect();
    if let Err(e) = del_links(&orphans) {
        first_err.get_or_insert(e);
    }
    // Sandbox chains no rule jumps to.
    if let Err(e) = apply_rules(&|rs| match rs.tables.get("filter") {
        Some(filter) => {
            let lines = drop_unreferenced_chains(filter, &BTreeSet::new(), &BTreeSet::new());
            if lines.is_empty() {
                String::new()
            } else {
                format!("*filter\n{}COMMIT\n", lines.concat())
            }
        }
        None => String::new(),
    }) {
        first_err.get_or_insert(e);
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(stale),
    }
}

/// Program and leading arguments that wrap a runsc command line: a private
/// mount namespace (slave of the host's, so later host mounts still reach
/// it) with an empty read-only tmpfs over `/proc/sys/net`, then `exec` of the
/// rest: `[wrapper.., runsc, args..]`. See the module documentation.
pub fn runsc_wrapper() -> Vec<String> {
    [
        "unshare",
        "-m",
        "--propagation",
        "slave",
        "sh",
        "-c",
        "mount -t tmpfs -o ro,size=4k none /proc/sys/net && exec \"$@\"",
        "sh",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The runsc command `cmd` (as built by [`crate::Runsc`]) in the mount
/// namespace work-around of [`runsc_wrapper`], made in the child between
/// fork and exec ([`enter_runsc_mount_namespace`]) rather than by three more
/// programs (`unshare`, `sh`, `mount`: ~4 ms of a cold start), with its
/// `--network=…` flag (`none` from [`crate::Runsc`]) replaced by
/// `--network=sandbox` (added before the subcommand if there was none).
/// Environment and working directory are copied; stdio is the caller's to set.
pub fn wrap_runsc(cmd: &Command) -> Command {
    use std::os::unix::process::CommandExt;
    let mut out = Command::new(cmd.get_program());
    let args: Vec<_> = cmd.get_args().collect();
    let has_network = args
        .iter()
        .any(|a| a.to_string_lossy().starts_with("--network="));
    if !has_network {
        out.arg(RUNSC_NETWORK_FLAG);
    }
    for a in args {
        if a.to_string_lossy().starts_with("--network=") {
            out.arg(RUNSC_NETWORK_FLAG);
        } else {
            out.arg(a);
        }
    }
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => out.env(k, v),
            None => out.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        out.current_dir(dir);
    }
    // SAFETY: the closure runs in the forked child before exec and makes only
    // raw syscalls (unshare, mount) on paths that fit nix's stack buffer: no
    // allocation, no lock.
    unsafe {
        out.pre_exec(enter_runsc_mount_namespace);
    }
    out
}

/// What [`runsc_wrapper`] does, for the calling process (a child between
/// fork and exec): a private mount namespace, a slave of the host's, with an
/// empty read-only tmpfs over `/proc/sys/net`.
pub fn enter_runsc_mount_namespace() -> io::Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )?;
    mount(
        Some("none"),
        "/proc/sys/net",
        Some("tmpfs"),
        MsFlags::MS_RDONLY,
        Some("size=4k"),
    )?;
    Ok(())
}

/// The FIFO through which a supervisor lets runsc go on once the network it
/// makes while runsc boots is ready (see [`SandboxNet::create_netns`]).
/// runsc runs its prestart hook ([`ReadyGate::hook`], in `config.json`)
/// right before it reads the netns, on `run` and `restore` alike; the hook
/// reads one line and succeeds only on `ok`, else runsc gives up. The gate's
/// own read-write descriptor keeps the FIFO open: the hook never blocks on
/// open, and it reads EOF (and fails) if the gate's owner is gone.
pub struct ReadyGate {
    file: fs::File,
}

impl ReadyGate {
    /// Makes the FIFO at `path` (replacing whatever was there).
    pub fn create(path: &Path) -> io::Result<ReadyGate> {
        use std::os::unix::fs::OpenOptionsExt;
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        nix::unistd::mkfifo(
            path,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)?;
        Ok(ReadyGate { file })
    }

    /// Lets the next hook run go on (`ok`) or fail. Anything an earlier
    /// launch left unread is dropped first.
    pub fn open_gate(&self, ok: bool) -> io::Result<()> {
        use std::io::Read;
        let mut buf = [0u8; 64];
        loop {
            match (&self.file).read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        (&self.file).write_all(if ok { b"ok\n" } else { b"fail\n" })
    }

    /// The OCI prestart hook that waits on the FIFO at `path`.
    pub fn hook(path: &Path) -> serde_json::Value {
        serde_json::json!({
            "path": "/bin/sh",
            "args": ["sh", "-c", "read -r line < \"$0\" && [ \"$line\" = ok ]", path],
            "timeout": 60,
        })
    }
}

// ---------------------------------------------------------------------------
// Setup and teardown (with the lock held)

fn setup_locked(
    id: &str,
    policy: &NetPolicy,
    state_dir: &Path,
    nameservers: &[Ipv4Addr],
    keep_netns: bool,
    host: &HostInfo,
    rules: Option<Ruleset>,
) -> Result<SandboxNet, NetError> {
    let netns = format!("{NETNS_PREFIX}{id}");
    let links = scan_links()?;
    let states = read_states(state_dir);
    // Slots this id had (its interface, its state file): preferred, so a
    // sandbox set up again keeps its address.
    let mut preferred: Vec<u32> = links
        .iter()
        .filter(|l| l.owner.as_deref() == Some(id))
        .map(|l| l.slot)
        .collect();
    preferred.extend(states.get(id).copied().flatten());
    // Recorded before anything is made (see `StateFile`).
    write_state(state_dir, id, preferred.first().copied())?;
    for l in links.iter().filter(|l| l.owner.as_deref() == Some(id)) {
        del_link(&l.name)?;
    }
    let netns_exists = Path::new(NETNS_DIR).join(&netns).exists();
    if keep_netns && !netns_exists {
        return Err(NetError::Command {
            command: "setup_in_netns".into(),
            message: format!("the netns {netns} does not exist (create_netns makes it)"),
        });
    }
    if !keep_netns {
        del_netns(&netns)?;
    }
    let mut used: BTreeSet<u32> = links
        .iter()
        .filter(|l| l.owner.as_deref() != Some(id))
        .map(|l| l.slot)
        .collect();
    used.extend(
        states
            .iter()
            .filter(|(i, _)| i.as_str() != id)
            .filter_map(|(_, s)| *s),
    );

    if !keep_netns {
        add_netns(&netns)?;
    }

    // Claim a slot by creating its interface: the kernel refuses a second
    // `gwh-N`, whichever process (or state dir) tries. The same `ip` names
    // it, addresses it and brings it up (one process instead of two on a
    // cold create's path); its rules are added before the sandbox can send
    // anything (runsc waits on the gate).
    let mut slot = None;
    let candidates = preferred
        .iter()
        .copied()
        .chain(0..SLOTS)
        .filter(|s| *s < SLOTS && !used.contains(s));
    let mut tried = BTreeSet::new();
    for s in candidates {
        if !tried.insert(s) {
            continue;
        }
        let host_if = format!("{HOST_IF_PREFIX}{s}");
        let (host_ip, _) = slot_addrs(s);
        // No IPv6 on the host end (a link-local address would be a way to
        // the host): none is generated, and IPv6 is disabled on it below.
        let batch = format!(
            "link add {host_if} type veth peer name {GUEST_IF} netns {netns}\n\
             link set dev {host_if} alias {OWNER_TAG}{id}\n\
             link set dev {host_if} addrgenmode none\n\
             address add {host_ip}/{SUBNET_PREFIX} dev {host_if}\n\
             link set dev {host_if} up\n"
        );
        match run("ip", &["-batch", "-"], Some(&batch)) {
            Ok(_) => {
                slot = Some(s);
                break;
            }
            // Only the first line can find the slot taken.
            Err(NetError::Command { message, .. })
                if message.contains("File exists") && message.contains("-:1") =>
            {
                continue
            }
            Err(e) => {
                // A later line failed after the link was made: recorded, so
                // that teardown finds it.
                if Path::new("/sys/class/net").join(&host_if).exists() {
                    let _ = write_state(state_dir, id, Some(s));
                }
                return Err(e);
            }
        }
    }
    let slot = slot.ok_or(NetError::PoolExhausted)?;
    write_state(state_dir, id, Some(slot))?;

    let (host_ip, guest_ip) = slot_addrs(slot);
    let host_if = format!("{HOST_IF_PREFIX}{slot}");
    let v6 = format!("/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6");
    if Path::new(&v6).exists() {
        fs::write(&v6, "1").map_err(io_err("cannot disable IPv6 on", Path::new(&v6)))?;
    }
    apply_rules_from(rules, &|rs| {
        setup_batch(rs, host, id, slot, policy, nameservers)
    })?;
    let guest_batch = format!(
        "link set dev lo up\n\
         link set dev {GUEST_IF} addrgenmode none\n\
         address add {guest_ip}/{SUBNET_PREFIX} dev {GUEST_IF}\n\
         link set dev {GUEST_IF} up\n\
         route add default via {host_ip} dev {GUEST_IF}\n"
    );
    run("ip", &["-netns", &netns, "-batch", "-"], Some(&guest_batch))?;
    enable_forwarding()?;
    Ok(SandboxNet {
        id: id.to_string(),
        netns,
        host_if,
        guest_if: GUEST_IF.to_string(),
        host_ip,
        guest_ip,
        prefix: SUBNET_PREFIX,
        slot,
        nameservers: nameservers.to_vec(),
    })
}

fn teardown_locked(id: &str, state_dir: &Path) -> Result<(), NetError> {
    teardown_many_locked(&BTreeSet::from([id.to_string()]), state_dir)
}

/// Tears down several ids at once: one iptables transaction, one `ip`
/// batch for the interfaces, one for the namespaces.
fn teardown_many_locked(ids: &BTreeSet<String>, state_dir: &Path) -> Result<(), NetError> {
    if ids.is_empty() {
        return Ok(());
    }
    remove_rules_locked(ids)?;
    remove_objects(ids, state_dir)
}

/// The rules [`setup_batch`] made for `id` on `slot`, removed.
fn teardown_batch(id: &str, slot: u32) -> String {
    let chain = format!("{SANDBOX_CHAIN_PREFIX}{slot}");
    format!(
        "*filter\n-D {CHAIN_SB} -i {HOST_IF_PREFIX}{slot} -m comment --comment {OWNER_TAG}{id} -j {chain}\n         -F {chain}\n-X {chain}\nCOMMIT\n"
    )
}

/// Removes the iptables rules of `ids` (with the lock held).
fn remove_rules_locked(ids: &BTreeSet<String>) -> Result<(), NetError> {
    let owned = |owner: Option<&str>| owner.is_some_and(|o| ids.contains(o));
    // Rules first: once an interface is gone its slot can be claimed by
    // another process at once, and the slot must not carry our rules then.
    apply_rules(&|rs| {
        let mut batch = String::new();
        for (name, table) in &rs.tables {
            let doomed = |r: &str| owned(owner_of(r));
            let lines = removal_lines(table, &doomed, &BTreeSet::new());
            if !lines.is_empty() {
                batch.push_str(&format!("*{name}\n{}COMMIT\n", lines.concat()));
            }
        }
        batch
    })
}

/// Removes the interfaces, netns and state files of `ids` (their rules
/// already gone).
fn remove_objects(ids: &BTreeSet<String>, state_dir: &Path) -> Result<(), NetError> {
    let owned = |owner: Option<&str>| owner.is_some_and(|o| ids.contains(o));
    let links: Vec<String> = scan_links()?
        .into_iter()
        .filter(|l| owned(l.owner.as_deref()))
        .map(|l| l.name)
        .collect();
    del_links(&links)?;
    let namespaces: Vec<String> = ids
        .iter()
        .map(|id| format!("{NETNS_PREFIX}{id}"))
        .filter(|n| Path::new(NETNS_DIR).join(n).exists())
        .collect();
    if !namespaces.is_empty() {
        let batch: String = namespaces
            .iter()
            .map(|n| format!("netns del {n}\n"))
            .collect();
        let r = run("ip", &["-force", "-batch", "-"], Some(&batch));
        if let Some(n) = namespaces
            .iter()
            .find(|n| Path::new(NETNS_DIR).join(n).exists())
        {
            return Err(r.err().unwrap_or(NetError::Command {
                command: format!("ip netns del {n}"),
                message: "the netns is still there".into(),
            }));
        }
    }
    for id in ids {
        let path = state_path(state_dir, id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("cannot remove", &path)(e))
            }
            _ => {}
        }
    }
    Ok(())
}

fn slot_addrs(slot: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(POOL.addr) + slot * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn check_id(id: &str) -> Result<(), NetError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(NetError::InvalidId(id.to_string()))
    }
}

fn enable_forwarding() -> Result<(), NetError> {
    let p = Path::new("/proc/sys/net/ipv4/ip_forward");
    let v = fs::read_to_string(p).map_err(io_err("cannot read", p))?;
    if v.trim() == "0" {
        fs::write(p, "1").map_err(io_err("cannot enable forwarding in", p))?;
    }
    Ok(())
}

fn del_link(name: &str) -> Result<(), NetError> {
    match run("ip", &["link", "del", "dev", name], None) {
        Err(NetError::Command { message, .. }) if message.contains("Cannot find device") => Ok(()),
        r => r.map(|_| ()),
    }
}

/// Deletes interfaces (one `ip` batch); fine if some are already gone.
fn del_links(names: &[String]) -> Result<(), NetError> {
    match names {
        [] => Ok(()),
        [one] => del_link(one),
        _ => {
            let batch: String = names
                .iter()
                .map(|n| format!("link del dev {n}\n"))
                .collect();
            match run("ip", &["-force", "-batch", "-"], Some(&batch)) {
                Ok(_) => Ok(()),
                Err(e) => {
                    let left = scan_links()?;
                    if left.iter().any(|l| names.contains(&l.name)) {
                        Err(e)
                    } else {
                        Ok(())
                    }
                }
            }
        }
    }
}

/// A network namespace made ahead of the sandbox that will use it (see
/// [`premake_netns`]).
static PREMADE: std::sync::Mutex<Option<std::os::fd::OwnedFd>> = std::sync::Mutex::new(None);

/// Makes an empty network namespace now for this process's next
/// [`SandboxNet::create_netns`], which then only bind-mounts it: a standby
/// supervisor calls this while it waits for its sandbox, since
/// `unshare(CLONE_NEWNET)` takes ~0.5 ms and the netns is made before runsc
/// can start.
pub fn premake_netns() -> io::Result<()> {
    let fd = new_netns()?;
    *PREMADE.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
    Ok(())
}

/// A new, empty network namespace, held by the returned descriptor.
/// unshare(CLONE_NEWNET) moves only the calling thread: a thread of its
/// own, whose namespace outlives it through the descriptor.
fn new_netns() -> io::Result<std::os::fd::OwnedFd> {
    std::thread::spawn(|| -> io::Result<std::os::fd::OwnedFd> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(fs::File::open("/proc/thread-self/ns/net")?.into())
    })
    .join()
    .map_err(|_| io::Error::other("the netns thread panicked"))?
}

/// Drops a namespace [`premake_netns`] made (a sandbox without a network).
pub fn discard_premade_netns() {
    PREMADE.lock().unwrap_or_else(|e| e.into_inner()).take();
}

fn add_netns(name: &str) -> Result<(), NetError> {
    let path = Path::new(NETNS_DIR).join(name);
    let premade = PREMADE.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Err(e) = add_netns_here(&path, premade) {
        tracing::debug!(name, error = %e, "making the netns in-process failed; using ip");
        let _ = fs::remove_file(&path);
        run("ip", &["netns", "add", name], None)?;
    }
    if !path.exists() {
        return Err(NetError::Command {
            command: format!("ip netns add {name}"),
            message: format!("the netns did not appear under {NETNS_DIR}"),
        });
    }
    Ok(())
}

/// `ip netns add NAME`, done in this process (the program costs ~2 ms of a
/// cold start, before runsc can start): `premade` (see [`premake_netns`]) or
/// a new network namespace, kept by a bind mount of it on `path`
/// (`/run/netns/NAME`), which is made a shared mount point first, as `ip`
/// does, so that the namespace shows in every mount namespace. `ip` remains
/// the fallback.
fn add_netns_here(path: &Path, premade: Option<std::os::fd::OwnedFd>) -> io::Result<()> {
    use nix::mount::{mount, MsFlags};
    use std::os::unix::fs::OpenOptionsExt;
    fs::create_dir_all(NETNS_DIR)?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if let Err(nix::errno::Errno::EINVAL) = shared() {
        // Not a mount point yet: make it one (a bind mount on itself).
        mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )?;
        shared()?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(path)?;
    use std::os::fd::AsRawFd;
    let fd = match premade {
        Some(fd) => fd,
        None => new_netns()?,
    };
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    mount(
        Some(source.as_str()),
        path,
        Some("none"),
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    Ok(())
}

/// `ip netns del NAME`, in this process: detach the bind mount that keeps
/// the namespace, remove the file. `ip` remains the fallback.
fn del_netns(name: &str) -> Result<(), NetError> {
    let path = Path::new(NETNS_DIR).join(name);
    if !path.exists() {
        return Ok(());
    }
    let here = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH)
        .map_err(io::Error::from)
        .and_then(|()| fs::remove_file(&path));
    if here.is_ok() || !path.exists() {
        return Ok(());
    }
    match run("ip", &["netns", "del", name], None) {
        Err(_) if !path.exists() => Ok(()),
        r => r.map(|_| ()),
    }
}

// ---------------------------------------------------------------------------
// State dir: lock and slot records

/// Whether this process's setups and teardowns yield the lock (see
/// [`set_background`]).
static BACKGROUND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks this process's network work as background work (a teardown after
/// the user was answered) or not. Background work takes the state dir's
/// lock only when nobody holds it, retrying every 3 ms, instead of queueing
/// for it: a create a user waits for gets the lock first even while many
/// sandboxes end. (Warm-pool slots' setups stay in the queue: yielding there
/// too left the pool empty more often; measured in bench/RESULTS.md.)
pub fn set_background(on: bool) {
    BACKGROUND.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The lock every setup, teardown and cleanup takes, whatever its state
/// dir: slots (interface names) and iptables are the host's, and a daemon's
/// sandboxes, its image builds (another state dir) and tests share them. With
/// a lock per state dir, an id set up again could lose its slot to another
/// state dir's setup between removing its old veth and making the new one.
pub const HOST_LOCK: &str = "/run/gworker-net.lock";

/// How long [`lock`] waits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// A setup someone waits for: [`lock_wait`], then an error naming the
    /// holder.
    Bounded,
    /// Cleanup (teardown, stale sweep): until the lock is free, since giving
    /// up would leave the sandbox's netns, veth and rules behind.
    Forever,
}

fn lock(state_dir: &Path, how: Wait) -> Result<Flock<fs::File>, NetError> {
    fs::create_dir_all(state_dir).map_err(io_err("cannot create", state_dir))?;
    let path = Path::new(HOST_LOCK);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err("cannot open", path))?;
    let wait = lock_wait();
    let deadline = match how {
        Wait::Bounded => Some(std::time::Instant::now() + wait),
        Wait::Forever => None,
    };
    let timed_out = |file: &fs::File| NetError::LockTimeout {
        secs: wait.as_secs(),
        holder: lock_holder(file),
    };
    if !BACKGROUND.load(std::sync::atomic::Ordering::Relaxed) {
        if deadline.is_none() {
            return Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| io_err("cannot lock", path)(io::Error::from(e)));
        }
        // A blocking flock keeps the kernel's FIFO order among waiters; it
        // runs on a helper thread so that the wait is bounded. Should the
        // helper get the lock after the deadline, nobody receives it and
        // dropping it releases the lock at once.
        let probe = file.try_clone().map_err(io_err("cannot open", path))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("net-lock".into())
            .spawn(move || {
                let _ = tx.send(
                    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| {
                        io_err("cannot lock", Path::new(HOST_LOCK))(io::Error::from(e))
                    }),
                );
            })
            .map_err(io_err("cannot start a thread to lock", path))?;
        return match rx.recv_timeout(wait) {
            Ok(res) => res,
            Err(_) => Err(timed_out(&probe)),
        };
    }
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                if deadline.is_some_and(|d| std::time::Instant::now() > d) {
                    return Err(timed_out(&f));
                }
                file = f;
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
            Err((_, e)) => return Err(io_err("cannot lock", path)(io::Error::from(e))),
        }
    }
}

/// How long a setup waits for [`HOST_LOCK`] ([`Wait::Bounded`]): each holder
/// keeps it for milliseconds, so a wait this long means a holder is stuck,
/// and the sandbox fails with a message naming it instead of hanging.
/// `GWORKER_NET_LOCK_WAIT_SECS` overrides it (tests use a short one).
fn lock_wait() -> std::time::Duration {
    crate::env_secs("GWORKER_NET_LOCK_WAIT_SECS", 20)
}

/// Who holds the flock on `file`, from /proc/locks: "pid N (its command
/// line)", or "an unknown process".
fn lock_holder(file: &fs::File) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return "an unknown process".into();
    };
    let key = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
        meta.ino()
    );
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:19:567 0 EOF"; waiters have "->".
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && f[1] == "FLOCK" && f[5] == key {
            let cmd = fs::read(format!("/proc/{}/cmdline", f[4]))
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .replace('\0', " ")
                        .trim()
                        .to_string()
                })
                .unwrap_or_default();
            return format!("pid {} ({cmd})", f[4]);
        }
    }
    "an unknown process".into()
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    id: String,
    /// None until a slot is claimed: the file is written before anything
    /// else of the id exists, so a state dir lists every id that may have
    /// leftovers.
    slot: Option<u32>,
}

fn state_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join(format!("{id}.json"))
}

fn write_state(state_dir: &Path, id: &str, slot: Option<u32>) -> Result<(), NetError> {
    let path = state_path(state_dir, id);
    let tmp = state_dir.join(format!(".{id}.json.tmp"));
    let body = serde_json::to_vec(&StateFile {
        id: id.to_string(),
        slot,
    })
    .expect("state serializes");
    fs::write(&tmp, body).map_err(io_err("cannot write", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("cannot write", &path))
}

/// id → slot (if claimed) of every readable state file.
/// The ids that have a network recorded in `state_dir` (set up, or being set
/// up, and not torn down): what a crash may have left, scoped to one owner.
pub fn recorded_ids(state_dir: &Path) -> Vec<String> {
    read_states(state_dir).into_keys().collect()
}

fn read_states(state_dir: &Path) -> BTreeMap<String, Option<u32>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = fs::read_dir(state_dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if !valid_id(id) {
            continue;
        }
        match read_state_file(&e.path(), id) {
            Some(slot) => {
                out.insert(id.to_string(), slot);
            }
            None => {
                tracing::warn!(path = %e.path().display(), "ignoring an unreadable network state file")
            }
        }
    }
    out
}

/// The slot `state_dir/<id>.json` records for `id` (one file, not the whole
/// dir: this is on every setup's and teardown's path).
fn recorded_slot(state_dir: &Path, id: &str) -> Option<u32> {
    read_state_file(&state_path(state_dir, id), id).flatten()
}

/// A state file's slot (`Some(None)`: recorded before a slot was claimed);
/// `None` if it is missing, unreadable or not `id`'s.
fn read_state_file(path: &Path, id: &str) -> Option<Option<u32>> {
    let s: StateFile = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    (s.id == id && s.slot.is_none_or(|n| n < SLOTS)).then_some(s.slot)
}

// ---------------------------------------------------------------------------
// Interfaces and host addresses

#[derive(Debug)]
struct Link {
    name: String,
    slot: u32,
    /// From the alias `gw:<id>`, else from the peer's netns `gw-<id>`.
    owner: Option<String>,
}

/// The host's `gwh-N` links and their owners, from /sys/class/net (no
/// process to start, on a cold create's path). A link without its alias (a
/// setup cut short between making it and naming it) is owned by its peer's
/// netns, which only `ip` shows: then `ip -o link show` is read instead.
fn scan_links() -> Result<Vec<Link>, NetError> {
    let sys = Path::new("/sys/class/net");
    let mut out = Vec::new();
    let entries = fs::read_dir(sys).map_err(io_err("cannot read", sys))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(slot) = name
            .strip_prefix(HOST_IF_PREFIX)
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let alias = fs::read_to_string(e.path().join("ifalias")).unwrap_or_default();
        let Some(owner) = alias
            .trim()
            .strip_prefix(OWNER_TAG)
            .filter(|id| valid_id(id))
        else {
            return Ok(parse_links(&run("ip", &["-o", "link", "show"], None)?));
        };
        out.push(Link {
            name,
            slot,
            owner: Some(owner.to_string()),
        });
    }
    Ok(out)
}

fn parse_links(text: &str) -> Vec<Link> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(name) = words.nth(1) else { continue };
        let name = name.trim_end_matches(':');
        let name = name.split('@').next().unwrap_or(name);
        let Some(slot) = name
            .strip_prefix(HOST_IF_PREFIX)
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
                .copied()
        };
        let owner = after("alias")
            .and_then(|a| a.strip_prefix(OWNER_TAG))
            .or_else(|| after("link-netns").and_then(|n| n.strip_prefix(NETNS_PREFIX)))
            .filter(|id| valid_id(id))
            .map(str::to_string);
        out.push(Link {
            name: name.to_string(),
            slot,
            owner,
        });
    }
    out
}

/// The host's own addresses and directly connected subnets (sandbox links
/// excluded: the pool is refused as a whole).
#[derive(Debug, Default)]
struct HostInfo {
    addrs: BTreeSet<Ipv4Cidr>,
    subnets: BTreeSet<Ipv4Cidr>,
}

/// The host's IPv4 addresses, from getifaddrs(3) (what `ip -o -4 addr show`
/// lists, without starting it).
fn host_info() -> Result<HostInfo, NetError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| NetError::Command {
        command: "getifaddrs".into(),
        message: e.to_string(),
    })?;
    let mut info = HostInfo::default();
    for ifa in addrs {
        let ip = |a: Option<nix::sys::socket::SockaddrStorage>| {
            a.and_then(|a| a.as_sockaddr_in().map(|s| s.ip()))
        };
        let (Some(addr), Some(mask)) = (ip(ifa.address), ip(ifa.netmask)) else {
            continue;
        };
        let prefix = u32::from(mask).count_ones() as u8;
        add_host_addr(&mut info, &ifa.interface_name, addr, prefix);
    }
    Ok(info)
}

/// Records one of the host's addresses (sandbox links and the pool excluded).
fn add_host_addr(info: &mut HostInfo, ifname: &str, addr: Ipv4Addr, prefix: u8) {
    if ifname.starts_with(HOST_IF_PREFIX) || POOL.contains(addr) {
        return;
    }
    info.addrs.insert(Ipv4Cidr::host(addr));
    if prefix < 32 {
        if let Ok(cidr) = Ipv4Cidr::new(addr, prefix) {
            info.subnets.insert(cidr);
        }
    }
}

/// `ip -o -4 addr show`'s lines, as [`host_info`] reads them (tests compare
/// the two).
#[cfg(test)]
fn parse_host_addrs(text: &str) -> HostInfo {
    let mut info = HostInfo::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(ifname) = words.get(1) else { continue };
        let Some(i) = words.iter().position(|w| *w == "inet") else {
            continue;
        };
        let Some(Ok(cidr)) = words.get(i + 1).map(|w| w.parse::<Ipv4Cidr>()) else {
            continue;
        };
        let Some(addr) = words[i + 1]
            .split('/')
            .next()
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        add_host_addr(&mut info, ifname, addr, cidr.prefix);
    }
    info
}

// ---------------------------------------------------------------------------
// iptables

#[derive(Debug, Default)]
struct Table {
    chains: BTreeSet<String>,
    /// `-A CHAIN ...` lines, as iptables-save prints them.
    rules: Vec<String>,
}

#[derive(Debug, Default)]
struct Ruleset {
    tables: BTreeMap<String, Table>,
}

fn iptables_save() -> Result<Ruleset, NetError> {
    Ok(parse_save(&run("iptables-save", &[], None)?))
}

fn iptables_restore(batch: &str) -> Result<(), NetError> {
    run("iptables-restore", &["--noflush"], Some(batch))
        .map(|_| ())
        .map_err(|e| match e {
            NetError::Command { command, message } => NetError::Command {
                command,
                message: format!("{message}\n--- input ---\n{batch}"),
            },
            e => e,
        })
}

/// Applies the batch `build` makes from the current rules (nothing if it
/// is empty). Processes that do not share our lock (another state dir) may
/// change the rules between our save and our restore — say, remove a stale
/// rule we meant to remove: the batch then fails as a whole (it is one
/// transaction) and is built again from fresh rules.
fn apply_rules(build: &dyn Fn(&Ruleset) -> String) -> Result<(), NetError> {
    apply_rules_from(None, build)
}

/// [`apply_rules`], the first attempt built from `rules` if given.
fn apply_rules_from(
    mut rules: Option<Ruleset>,
    build: &dyn Fn(&Ruleset) -> String,
) -> Result<(), NetError> {
    let mut attempt = 0;
    loop {
        let current = match rules.take() {
            Some(r) => r,
            None => iptables_save()?,
        };
        let batch = build(&current);
        if batch.is_empty() {
            return Ok(());
        }
        match iptables_restore(&batch) {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= 4 => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "iptables batch failed, retrying with fresh rules");
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(5 << attempt));
            }
        }
    }
}

fn parse_save(text: &str) -> Ruleset {
    let mut rs = Ruleset::default();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            current = Some(t.trim().to_string());
            rs.tables.entry(t.trim().to_string()).or_default();
        } else if let Some(table) = current.as_ref().and_then(|t| rs.tables.get_mut(t)) {
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    table.chains.insert(name.to_string());
                }
            } else if line.starts_with("-A ") {
                table.rules.push(line.trim_end().to_string());
            }
        }
    }
    rs
}

fn words_after<'a>(rule: &'a str, key: &str) -> Option<&'a str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next().map(|v| v.trim_matches('"'));
        }
    }
    None
}

fn chain_of(rule: &str) -> &str {
    rule.split_whitespace().nth(1).unwrap_or("")
}

/// The sandbox id of a per-sandbox rule (`--comment gw:<id>`).
fn owner_of(rule: &str) -> Option<&str> {
    words_after(rule, "--comment").and_then(|c| c.strip_prefix(OWNER_TAG))
}

fn target_of(rule: &str) -> Option<&str> {
    words_after(rule, "-j")
}

/// `-D` lines for the doomed rules, then `-F`/`-X` of sandbox chains
/// (`GW-*`) that no remaining rule jumps to (except `keep_chains`).
fn removal_lines(
    table: &Table,
    doomed: &dyn Fn(&str) -> bool,
    keep_chains: &BTreeSet<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut removed = BTreeSet::new();
    for r in table.rules.iter().filter(|r| doomed(r)) {
        out.push(format!("-D{}\n", &r[2..]));
        removed.insert(r.clone());
    }
    if !removed.is_empty() {
        out.extend(drop_unreferenced_chains(table, &removed, keep_chains));
    }
    out
}

fn drop_unreferenced_chains(
    table: &Table,
    removed: &BTreeSet<String>,
    keep_chains: &BTreeSet<String>,
) -> Vec<String> {
    let referenced: BTreeSet<&str> = table
        .rules
        .iter()
        .filter(|r| !removed.contains(*r))
        .filter_map(|r| target_of(r))
        .collect();
    let mut out = Vec::new();
    for c in &table.chains {
        if c.starts_with(SANDBOX_CHAIN_PREFIX)
            && c[SANDBOX_CHAIN_PREFIX.len()..].parse::<u32>().is_ok()
            && !referenced.contains(c.as_str())
            && !keep_chains.contains(c)
        {
            out.push(format!("-F {c}\n-X {c}\n"));
        }
    }
    out
}

/// Rules of the shared chains: (table, chain, matches, target).
fn shared_rules(host: &HostInfo) -> Vec<(&'static str, &'static str, String, String)> {
    let mut v = Vec::new();
    let mut add = |t, c, m: &str, j: &str| v.push((t, c, m.to_string(), j.to_string()));
    let est = "-m conntrack --ctstate RELATED,ESTABLISHED";
    add(
        "filter",
        CHAIN_REJECT,
        "-p tcp",
        "-j REJECT --reject-with tcp-reset",
    );
    add(
        "filter",
        CHAIN_REJECT,
        "",
        "-j REJECT --reject-with icmp-admin-prohibited",
    );
    // To the host itself: only replies to connections the host opened.
    add(
        "filter",
        CHAIN_IN,
        &format!("-i {HOST_IF_PREFIX}+ {est}"),
        "-j ACCEPT",
    );
    add("filter", CHAIN_IN, &format!("-i {HOST_IF_PREFIX}+"), REJECT);
    // Into sandboxes: only replies. Out of sandboxes: never to the pool, then
    // each sandbox's own chain; an interface without one gets nothing.
    add(
        "filter",
        CHAIN_FWD,
        &format!("-o {HOST_IF_PREFIX}+ {est}"),
        "-j ACCEPT",
    );
    add(
        "filter",
        CHAIN_FWD,
        &format!("-o {HOST_IF_PREFIX}+"),
        REJECT,
    );
    add(
        "filter",
        CHAIN_FWD,
        &format!("-i {HOST_IF_PREFIX}+ -d {POOL}"),
        REJECT,
    );
    add(
        "filter",
        CHAIN_FWD,
        &format!("-i {HOST_IF_PREFIX}+"),
        &format!("-j {CHAIN_SB}"),
    );
    add(
        "filter",
        CHAIN_FWD,
        &format!("-i {HOST_IF_PREFIX}+"),
        REJECT,
    );
    // The deny list of the Internet policy.
    let mut deny: BTreeSet<Ipv4Cidr> = NON_PUBLIC
        .iter()
        .map(|(a, p)| Ipv4Cidr::new(*a, *p).expect("valid constant"))
        .collect();
    deny.insert(POOL);
    deny.extend(host.addrs.iter().copied());
    deny.extend(host.subnets.iter().copied());
    for d in &deny {
        add("filter", CHAIN_PUBLIC, &format!("-d {d}"), REJECT);
    }
    add("filter", CHAIN_PUBLIC, "", "-j ACCEPT");
    add(
        "nat",
        CHAIN_NAT,
        &format!("-s {POOL} ! -o {HOST_IF_PREFIX}+"),
        "-j MASQUERADE",
    );
    v
}

/// FNV-1a, 64 bits: a stable digest for the shared chains' marker.
fn fnv(data: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Jumps from built-in chains to ours: (table, built-in chain, our chain).
const JUMPS: &[(&str, &str, &str)] = &[
    ("filter", "INPUT", CHAIN_IN),
    ("filter", "FORWARD", CHAIN_FWD),
    ("nat", "POSTROUTING", CHAIN_NAT),
];

/// Lines (declarations, rules) that make the shared chains and jumps of
/// `table` what they should be, given what `rs` holds.
fn shared_fixes(rs: &Ruleset, host: &HostInfo, table: &str) -> (Vec<String>, Vec<String>) {
    let rules = shared_rules(host);
    let digest = format!("{SHARED_TAG}{:016x}", fnv(&format!("{rules:?}")));
    let empty = Table::default();
    let current = rs.tables.get(table).unwrap_or(&empty);
    let (mut decls, mut lines) = (Vec::new(), Vec::new());
    let mut chains: Vec<&str> = rules.iter().filter(|r| r.0 == table).map(|r| r.1).collect();
    chains.dedup();
    for chain in chains {
        let want: Vec<String> = rules
            .iter()
            .filter(|r| r.0 == table && r.1 == chain)
            .map(|(_, c, m, j)| {
                let m = if m.is_empty() {
                    String::new()
                } else {
                    format!("{m} ")
                };
                format!("-A {c} {m}-m comment --comment {digest} {j}\n")
            })
            .collect();
        let have: Vec<&String> = current
            .rules
            .iter()
            .filter(|r| chain_of(r) == chain)
            .collect();
        let up_to_date = current.chains.contains(chain)
            && have.len() == want.len()
            && have.iter().all(|r| r.contains(&digest));
        if !up_to_date {
            // Declaring an existing chain in a --noflush restore flushes it.
            decls.push(format!(":{chain} - [0:0]\n"));
            lines.extend(want);
        }
    }
    if table == "filter" && !current.chains.contains(CHAIN_SB) {
        decls.push(format!(":{CHAIN_SB} - [0:0]\n"));
    }
    for (t, builtin, ours) in JUMPS {
        if *t != table {
            continue;
        }
        let jump = format!("-A {builtin} -j {ours}");
        let n = current.rules.iter().filter(|r| **r == jump).count();
        if n == 0 {
            lines.push(format!("-I {builtin} 1 -j {ours}\n"));
        }
        for _ in 1..n {
            lines.push(format!("-D {builtin} -j {ours}\n"));
        }
    }
    (decls, lines)
}

fn setup_batch(
    rs: &Ruleset,
    host: &HostInfo,
    id: &str,
    slot: u32,
    policy: &NetPolicy,
    nameservers: &[Ipv4Addr],
) -> String {
    let host_if = format!("{HOST_IF_PREFIX}{slot}");
    let chain = format!("{SANDBOX_CHAIN_PREFIX}{slot}");
    let (_, guest_ip) = slot_addrs(slot);

    let (mut decls, mut lines) = shared_fixes(rs, host, "filter");
    // Whatever jumped for this id, or to this slot's chain, or from this
    // slot's interface before (a crashed sandbox's leftovers) goes.
    let empty = Table::default();
    let filter = rs.tables.get("filter").unwrap_or(&empty);
    let iface_match = format!("-i {host_if} ");
    let doomed = |r: &str| {
        owner_of(r) == Some(id)
            || (chain_of(r) == CHAIN_SB
                && (target_of(r) == Some(chain.as_str()) || r.contains(&iface_match)))
    };
    let keep = BTreeSet::from([chain.clone()]);
    lines.extend(removal_lines(filter, &doomed, &keep));
    decls.push(format!(":{chain} - [0:0]\n"));
    lines.push(format!(
        "-A {CHAIN_SB} -i {host_if} -m comment --comment {OWNER_TAG}{id} -j {chain}\n"
    ));
    let mut add = |rule: String| lines.push(format!("-A {chain} {rule}\n"));
    add(format!("! -s {guest_ip}/32 -j DROP"));
    add("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string());
    for ns in nameservers {
        add(format!("-d {ns}/32 -p udp -m udp --dport 53 -j ACCEPT"));
        add(format!("-d {ns}/32 -p tcp -m tcp --dport 53 -j ACCEPT"));
    }
    match policy {
        NetPolicy::Blocked => add(REJECT.to_string()),
        NetPolicy::Internet { extra_allowed } => {
            for c in extra_allowed {
                add(format!("-d {c} -j ACCEPT"));
            }
            add(format!("-j {CHAIN_PUBLIC}"));
        }
        NetPolicy::Allowlist(allowed) => {
            for c in allowed {
                add(format!("-d {c} -j ACCEPT"));
            }
            add(REJECT.to_string());
        }
    }
    let mut batch = format!("*filter\n{}{}COMMIT\n", decls.concat(), lines.concat());
    let (decls, lines) = shared_fixes(rs, host, "nat");
    if !decls.is_empty() || !lines.is_empty() {
        batch.push_str(&format!(
            "*nat\n{}{}COMMIT\n",
            decls.concat(),
            lines.concat()
        ));
    }
    batch
}

// ---------------------------------------------------------------------------
// Commands

/// Runs a short host command (ip, iptables) to completion; stdout on success.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, NetError> {
    let command = format!("{program} {}", args.join(" "));
    let fail = |message: String| NetError::Command {
        command: command.clone(),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start {program}: {e}")))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| fail(format!("cannot write to {program}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("cannot wait for {program}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// getifaddrs finds the host addresses `ip -o -4 addr show` lists.
    #[test]
    fn host_info_matches_ip() {
        let ours = host_info().unwrap();
        let ip = parse_host_addrs(&run("ip", &["-o", "-4", "addr", "show"], None).unwrap());
        assert_eq!(ours.addrs, ip.addrs);
        assert_eq!(ours.subnets, ip.subnets);
        assert!(
            !ours.addrs.is_empty(),
            "no address at all (not even 127.0.0.1)"
        );
    }

    /// The netns made in-process is a real network namespace other than
    /// ours, seen by `ip`, and deleting it leaves nothing mounted.
    #[test]
    fn netns_is_made_and_removed_without_ip() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let name = format!("gwtest-{}", std::process::id());
        let path = Path::new(NETNS_DIR).join(&name);
        add_netns_here(&path, None).unwrap();
        let ns = fs::metadata(&path).unwrap();
        let ours = fs::metadata("/proc/self/ns/net").unwrap();
        assert_eq!(ns.dev(), ours.dev(), "not an nsfs bind mount");
        assert_ne!(ns.ino(), ours.ino(), "our own netns");
        let listed = run("ip", &["netns", "list"], None).unwrap();
        assert!(listed.contains(&name), "{listed}");
        del_netns(&name).unwrap();
        assert!(!path.exists());
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&name), "left mounted");
    }

    /// A namespace made ahead (as a standby supervisor does) is the one the
    /// path then names.
    #[test]
    fn a_premade_netns_is_the_one_mounted() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let premade = new_netns().unwrap();
        let made = fs::File::from(premade.try_clone().unwrap())
            .metadata()
            .unwrap();
        let name = format!("gwtest-pre-{}", std::process::id());
        let path = Path::new(NETNS_DIR).join(&name);
        add_netns_here(&path, Some(premade)).unwrap();
        let ns = fs::metadata(&path).unwrap();
        assert_eq!((ns.dev(), ns.ino()), (made.dev(), made.ino()));
        let ours = fs::metadata("/proc/self/ns/net").unwrap();
        assert_ne!(ns.ino(), ours.ino(), "our own netns");
        // A veth can be moved into it by name, as setup does.
        let veth = format!("gwtp{}", std::process::id() % 100000);
        run(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ],
            None,
        )
        .unwrap();
        let links = run("ip", &["-netns", &name, "-o", "link", "show"], None).unwrap();
        let _ = run("ip", &["link", "del", &veth], None);
        del_netns(&name).unwrap();
        assert!(links.contains("eth0"), "{links}");
        assert!(!path.exists());
    }

    #[test]
    fn cidr_parses_normalises_and_matches() {
        let c: Ipv4Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(Ipv4Addr::new(10, 200, 0, 1)));
        assert!(!c.contains(Ipv4Addr::new(11, 0, 0, 1)));
        assert_eq!(
            "1.2.3.4".parse::<Ipv4Cidr>().unwrap().to_string(),
            "1.2.3.4/32"
        );
        assert_eq!("0.0.0.0/0".parse::<Ipv4Cidr>().unwrap().prefix(), 0);
        assert!("1.2.3.4/33".parse::<Ipv4Cidr>().is_err());
        assert!("1.2.3/8".parse::<Ipv4Cidr>().is_err());
        assert!("::1/128".parse::<Ipv4Cidr>().is_err());
        let p = NetPolicy::Internet {
            extra_allowed: vec!["192.168.5.0/24".parse().unwrap()],
        };
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(s, r#"{"internet":{"extra_allowed":["192.168.5.0/24"]}}"#);
        assert_eq!(serde_json::from_str::<NetPolicy>(&s).unwrap(), p);
        assert_eq!(NetPolicy::default(), NetPolicy::Blocked);
    }

    #[test]
    fn slots_fit_the_pool_and_names_fit_ifnamsiz() {
        assert_eq!(SLOTS, 16384);
        assert_eq!(
            slot_addrs(0),
            (Ipv4Addr::new(10, 231, 0, 1), Ipv4Addr::new(10, 231, 0, 2))
        );
        let (h, g) = slot_addrs(SLOTS - 1);
        assert_eq!(
            (h, g),
            (
                Ipv4Addr::new(10, 231, 255, 253),
                Ipv4Addr::new(10, 231, 255, 254)
            )
        );
        assert!(format!("{HOST_IF_PREFIX}{}", SLOTS - 1).len() <= 15);
    }

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("sb-0123456789abcdef0123456789abcdef"));
        for bad in ["", "a/b", "a b", "..", "x".repeat(65).as_str(), "a\"b"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn nameservers_skip_loopback_and_ipv6() {
        let ns = parse_nameservers(
            "# c\nnameserver 10.255.255.53\nnameserver 127.0.0.53\nnameserver fd00::1\nsearch x\nnameserver 1.1.1.1\nnameserver 10.255.255.53\n",
        );
        assert_eq!(
            ns,
            vec![Ipv4Addr::new(10, 255, 255, 53), Ipv4Addr::new(1, 1, 1, 1)]
        );
    }

    #[test]
    fn links_are_attributed_to_their_owner() {
        let text = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n\
            9: gwh-7@if2: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN mode DEFAULT group default qlen 1000\\    link/ether ca:4f:a9:d7:79:3f brd ff:ff:ff:ff:ff:ff link-netns gw-sb-b\\    alias gw:sb-a\n\
            10: gwh-8@if2: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN mode DEFAULT group default qlen 1000\\    link/ether ca:4f:a9:d7:79:3f brd ff:ff:ff:ff:ff:ff link-netns gw-sb-c\n\
            11: gwh-9@if2: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN mode DEFAULT group default qlen 1000\\    link/ether ca:4f:a9:d7:79:3f brd ff:ff:ff:ff:ff:ff link-netnsid 3\n\
            12: gwhx@if2: <BROADCAST>\n";
        let links = parse_links(text);
        let got: Vec<(u32, Option<&str>)> =
            links.iter().map(|l| (l.slot, l.owner.as_deref())).collect();
        assert_eq!(got, vec![(7, Some("sb-a")), (8, Some("sb-c")), (9, None)]);
    }

    #[test]
    fn host_addresses_exclude_sandbox_links() {
        let text = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n\
            2: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever\n\
            7: gwh-3    inet 10.231.0.13/30 scope global gwh-3\n\
            8: tun0    inet 203.0.113.9/32 scope global tun0\n";
        let h = parse_host_addrs(text);
        let addrs: Vec<String> = h.addrs.iter().map(|c| c.to_string()).collect();
        let subnets: Vec<String> = h.subnets.iter().map(|c| c.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1/32", "192.0.2.2/32", "203.0.113.9/32"]);
        assert_eq!(subnets, ["127.0.0.0/8", "192.0.2.0/24"]);
    }

    #[test]
    fn setup_batch_orders_rules_and_replaces_leftovers() {
        let host =
            parse_host_addrs("2: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\n");
        let ns = [Ipv4Addr::new(10, 255, 255, 53)];
        // Fresh host: everything is created.
        let b = setup_batch(
            &Ruleset::default(),
            &host,
            "sb-1",
            5,
            &NetPolicy::Internet {
                extra_allowed: vec!["10.9.0.0/16".parse().unwrap()],
            },
            &ns,
        );
        for want in [
            ":GWORKER-REJECT - [0:0]",
            ":GWORKER-IN - [0:0]",
            ":GWORKER-FWD - [0:0]",
            ":GWORKER-SB - [0:0]",
            ":GWORKER-PUBLIC - [0:0]",
            ":GW-5 - [0:0]",
            "-I INPUT 1 -j GWORKER-IN",
            "-I FORWARD 1 -j GWORKER-FWD",
            "-I POSTROUTING 1 -j GWORKER-NAT",
            "-A GWORKER-SB -i gwh-5 -m comment --comment gw:sb-1 -j GW-5",
            "-A GWORKER-NAT -s 10.231.0.0/16 ! -o gwh-+ -m comment",
        ] {
            assert!(b.contains(want), "{want} missing in\n{b}");
        }
        let chain: Vec<&str> = b.lines().filter(|l| l.starts_with("-A GW-5 ")).collect();
        assert_eq!(
            chain,
            [
                "-A GW-5 ! -s 10.231.0.22/32 -j DROP",
                "-A GW-5 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-A GW-5 -d 10.255.255.53/32 -p udp -m udp --dport 53 -j ACCEPT",
                "-A GW-5 -d 10.255.255.53/32 -p tcp -m tcp --dport 53 -j ACCEPT",
                "-A GW-5 -d 10.9.0.0/16 -j ACCEPT",
                "-A GW-5 -j GWORKER-PUBLIC",
            ]
        );
        let public: Vec<&str> = b
            .lines()
            .filter(|l| l.starts_with("-A GWORKER-PUBLIC "))
            .collect();
        assert!(public.iter().any(|l| l.contains("-d 169.254.0.0/16 ")));
        assert!(public.iter().any(|l| l.contains("-d 192.0.2.0/24 ")));
        assert!(public.iter().any(|l| l.contains("-d 192.0.2.2/32 ")));
        assert!(public.last().unwrap().ends_with("-j ACCEPT"));

        // The same rules already in place (as iptables-save prints them), plus
        // a crashed sandbox's jump for slot 5 and this id's old slot 2.
        let save_rules: Vec<String> = b
            .lines()
            .filter(|l| l.starts_with("-A GWORKER-") && !l.starts_with("-A GWORKER-SB"))
            .map(str::to_string)
            .collect();
        let filter_rules: String = save_rules
            .iter()
            .filter(|l| !l.starts_with("-A GWORKER-NAT"))
            .map(|l| format!("{l}\n"))
            .collect();
        let nat_rules: String = save_rules
            .iter()
            .filter(|l| l.starts_with("-A GWORKER-NAT"))
            .map(|l| format!("{l}\n"))
            .collect();
        let save = format!(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:GWORKER-IN - [0:0]\n:GWORKER-FWD - [0:0]\n:GWORKER-SB - [0:0]\n:GWORKER-PUBLIC - [0:0]\n:GW-2 - [0:0]\n:GW-5 - [0:0]\n:GW-6 - [0:0]\n\
             -A INPUT -j GWORKER-IN\n-A FORWARD -j GWORKER-FWD\n-A FORWARD -j GWORKER-FWD\n{filter_rules}\
             -A GWORKER-SB -i gwh-5 -m comment --comment \"gw:sb-dead\" -j GW-5\n\
             -A GWORKER-SB -i gwh-2 -m comment --comment \"gw:sb-1\" -j GW-2\n\
             -A GWORKER-SB -i gwh-6 -m comment --comment \"gw:sb-other\" -j GW-6\n\
             -A GW-2 -j DROP\n-A GW-5 -j DROP\n-A GW-6 -j DROP\nCOMMIT\n\
             *nat\n:POSTROUTING ACCEPT [0:0]\n:GWORKER-NAT - [0:0]\n-A POSTROUTING -j GWORKER-NAT\n{nat_rules}COMMIT\n"
        );
        let rs = parse_save(&save);
        let b2 = setup_batch(&rs, &host, "sb-1", 5, &NetPolicy::Allowlist(vec![]), &ns);
        assert!(!b2.contains(":GWORKER-FWD"), "{b2}");
        assert!(!b2.contains(":GWORKER-SB"), "{b2}");
        assert!(!b2.contains("-I "), "{b2}");
        assert!(!b2.contains("*nat"), "{b2}");
        assert!(b2.contains("-D FORWARD -j GWORKER-FWD\n"), "{b2}");
        assert!(b2.contains("-D GWORKER-SB -i gwh-5 -m comment --comment \"gw:sb-dead\" -j GW-5\n"));
        assert!(b2.contains("-D GWORKER-SB -i gwh-2 -m comment --comment \"gw:sb-1\" -j GW-2\n"));
        assert!(b2.contains("-F GW-2\n-X GW-2\n"), "{b2}");
        assert!(!b2.contains("GW-6"), "{b2}");
        assert!(!b2.contains("-X GW-5"), "{b2}");
        assert!(b2.contains("-A GW-5 -j GWORKER-REJECT"), "{b2}");
    }

    #[test]
    fn wrap_runsc_swaps_the_network_flag() {
        let mut c = Command::new("/usr/bin/runsc");
        c.args([
            "--root=/r",
            "--network=none",
            "run",
            "--bundle",
            "/b",
            "sb-1",
        ]);
        c.env("A", "1");
        let w = wrap_runsc(&c);
        let args: Vec<String> = w
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        // runsc itself, the work-around being done before its exec.
        assert_eq!(w.get_program(), "/usr/bin/runsc");
        assert_eq!(
            &args[..],
            [
                "--root=/r",
                "--network=sandbox",
                "run",
                "--bundle",
                "/b",
                "sb-1"
            ]
        );
        assert!(w
            .get_envs()
            .any(|(k, v)| k == "A" && v == Some("1".as_ref())));
        let mut c = Command::new("runsc");
        c.args(["run", "x"]);
        let args: Vec<String> = wrap_runsc(&c)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&args[args.len() - 3..], ["--network=sandbox", "run", "x"]);
    }
}
