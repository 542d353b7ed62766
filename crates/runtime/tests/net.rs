//! Real tests of sandbox networking (`gworker_runtime::net`): network
//! namespaces, veth pairs, iptables and, for one test, runsc. They need root;
//! without it (or without runsc, for the runsc test) they print why and pass.
//!
//! Test hosts are network namespaces made here (`gwtest-*`): each has a
//! "private" address 10.199.x.2 on a veth link to the host and a "public"
//! address 198.51.100.y on its loopback, routed by the host via the private
//! one — so the public one is not in a subnet connected to the host, like a
//! server on the internet. No traffic leaves the machine except DNS queries to
//! the host's own resolver.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gworker_runtime::net::{self, Ipv4Cidr, NetPolicy, SandboxNet};

const TIMEOUT: Duration = Duration::from_secs(2);

fn can_run() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: sandbox networking tests need root");
        return false;
    }
    for tool in ["ip", "iptables-save", "iptables-restore", "unshare"] {
        if Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("skipping: {tool} is not installed");
            return false;
        }
    }
    true
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique in this process; with the pid, unique on the machine.
fn next() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

fn uniq_id(tag: &str) -> String {
    format!("t{tag}-{}-{}", std::process::id(), next())
}

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "gworker-net-{tag}-{}-{}",
            std::process::id(),
            next()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Tears a sandbox network down on drop (also when a test fails).
struct NetGuard {
    id: String,
    state: PathBuf,
}

impl NetGuard {
    fn new(id: &str, state: &Path) -> NetGuard {
        NetGuard {
            id: id.to_string(),
            state: state.to_path_buf(),
        }
    }
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        if let Err(e) = SandboxNet::teardown(&self.id, &self.state) {
            eprintln!("teardown of {} failed: {e}", self.id);
        }
    }
}

/// A test host: its own netns with a private and a public address.
struct TestHost {
    netns: String,
    host_if: String,
    /// The host's end of the link (a host address).
    host_side: Ipv4Addr,
    private: Ipv4Addr,
    link: Ipv4Cidr,
    public: Ipv4Addr,
}

impl TestHost {
    fn new() -> TestHost {
        let n = next();
        let pid = std::process::id();
        let tag = format!("{:06x}{:02x}", pid & 0xff_ffff, n & 0xff);
        let k = (pid.wrapping_mul(16).wrapping_add(n)) % 16384;
        let base = u32::from(Ipv4Addr::new(10, 199, 0, 0)) + k * 4;
        let public = Ipv4Addr::new(198, 51, 100, ((pid * 8 + n) % 254 + 1) as u8);
        let th = TestHost {
            netns: format!("gwtest-{tag}"),
            host_if: format!("gwt{tag}"),
            host_side: Ipv4Addr::from(base + 1),
            private: Ipv4Addr::from(base + 2),
            link: Ipv4Cidr::new(Ipv4Addr::from(base), 30).unwrap(),
            public,
        };
        // Leftovers of an earlier run with the same pid.
        sh_quiet("ip", &["link", "del", &th.host_if]);
        sh_quiet("ip", &["netns", "del", &th.netns]);
        sh("ip", &["netns", "add", &th.netns]);
        sh(
            "ip",
            &[
                "link",
                "add",
                &th.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &th.netns,
            ],
        );
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/30", th.host_side),
                "dev",
                &th.host_if,
            ],
        );
        sh("ip", &["link", "set", &th.host_if, "up"]);
        let ns = |args: &[&str]| {
            let mut a = vec!["-n", th.netns.as_str()];
            a.extend_from_slice(args);
            sh("ip", &a);
        };
        ns(&["link", "set", "lo", "up"]);
        ns(&["addr", "add", &format!("{}/32", th.public), "dev", "lo"]);
        ns(&["addr", "add", &format!("{}/30", th.private), "dev", "eth0"]);
        ns(&["link", "set", "eth0", "up"]);
        ns(&["route", "add", "default", "via", &th.host_side.to_string()]);
        sh(
            "ip",
            &[
                "route",
                "add",
                &format!("{}/32", th.public),
                "via",
                &th.private.to_string(),
            ],
        );
        th
    }

    fn netns_path(&self) -> PathBuf {
        Path::new(net::NETNS_DIR).join(&self.netns)
    }

    /// A TCP server on `0.0.0.0:port` in the test host that answers with the
    /// address it was reached at.
    fn serve(&self, port: u16) -> Server {
        Server::start(Some(self.netns_path()), port)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        sh_quiet("ip", &["link", "del", &self.host_if]);
        sh_quiet("ip", &["netns", "del", &self.netns]);
    }
}

/// A TCP server answering with the local address of each connection.
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(netns: Option<PathBuf>, port: u16) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            if let Some(p) = netns {
                enter_netns(&p);
            }
            let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            while !stop2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let me = s.local_addr().unwrap().ip();
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(format!("{me}\n").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Server {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves the calling thread into a network namespace (the network namespace
/// is per thread).
fn enter_netns(path: &Path) {
    let f = fs::File::open(path).unwrap();
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

/// Connects from inside `netns` and returns what the server said.
fn connect_from(netns: &Path, ip: Ipv4Addr, port: u16) -> Result<String, String> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        enter_netns(&netns);
        let addr = SocketAddr::from((ip, port));
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out.trim().to_string())
    })
    .join()
    .unwrap()
}

/// Control: the host itself reaches `ip:port` (so a refusal from a sandbox
/// is the policy, not a missing server).
fn assert_host_reaches(ip: Ipv4Addr, port: u16) {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, port)), TIMEOUT)
        .unwrap_or_else(|e| panic!("control: the host cannot reach {ip}:{port}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut hello = String::new();
    s.read_to_string(&mut hello).unwrap();
    assert_eq!(hello.trim(), ip.to_string());
}

fn resolves_in(netns: Option<&Path>, name: &'static str) -> bool {
    let netns = netns.map(Path::to_path_buf);
    std::thread::spawn(move || {
        if let Some(p) = netns {
            enter_netns(&p);
        }
        (name, 80)
            .to_socket_addrs()
            .map(|mut a| a.next().is_some())
            .unwrap_or(false)
    })
    .join()
    .unwrap()
}

fn assert_reaches(net: &SandboxNet, ip: Ipv4Addr, port: u16) {
    let got = connect_from(&net.netns_path(), ip, port);
    assert_eq!(
        got,
        Ok(ip.to_string()),
        "{} should reach {ip}:{port}",
        net.id
    );
}

fn assert_refused(net: &SandboxNet, ip: Ipv4Addr, port: u16) {
    let start = Instant::now();
    let got = connect_from(&net.netns_path(), ip, port);
    assert!(
        got.is_err(),
        "{} must not reach {ip}:{port}, got {got:?}",
        net.id
    );
    eprintln!(
        "{ip}:{port} refused in {:?}: {}",
        start.elapsed(),
        got.unwrap_err()
    );
}

/// An IPv4 address of the host outside the sandbox pool and the test links.
fn a_host_address() -> Ipv4Addr {
    let out = sh("ip", &["-o", "-4", "addr", "show", "scope", "global"]);
    out.lines()
        .filter(|l| !l.contains(" gwh-") && !l.contains(" gwt"))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "inet")?;
            w.get(i + 1)?.split('/').next()?.parse().ok()
        })
        .next()
        .unwrap_or(Ipv4Addr::new(127, 0, 0, 1))
}

/// What is left of a sandbox's network on the host. (Slots are reused at
/// once by tests running in parallel: owners are checked, not slot numbers.)
fn leftovers(id: &str, slot: u32) -> Vec<String> {
    let mut left = Vec::new();
    if sh("ip", &["netns", "list"])
        .lines()
        .any(|l| l.split_whitespace().next() == Some(&format!("gw-{id}")))
    {
        left.push("netns".into());
    }
    let links = sh("ip", &["-o", "link", "show"]);
    if links.contains(&format!("alias gw:{id}\n"))
        || links.contains(&format!("link-netns gw-{id}\\"))
        || links.contains(&format!("link-netns gw-{id}\n"))
    {
        left.push("link".into());
    }
    let rules = sh("iptables-save", &[]);
    let comment = format!("gw:{id}\"");
    if rules.contains(&comment) {
        left.push("rule".into());
    }
    // The slot's chain, unless another sandbox has the slot now.
    let jump = format!("-j GW-{slot}\n");
    let others_jump = rules
        .lines()
        .any(|l| format!("{l}\n").ends_with(&jump) && !l.contains(&comment));
    if rules.contains(&format!(":GW-{slot} ")) && !others_jump {
        left.push("chain".into());
    }
    left
}

#[test]
fn internet_and_allowlist_policies_from_the_netns() {
    if !can_run() {
        return;
    }
    let th = TestHost::new();
    let srv = th.serve(0);
    let host_srv = Server::start(None, 0);
    let state = TempDir::new("state");
    let id = uniq_id("pol");
    let _guard = NetGuard::new(&id, &state.0);

    let net = SandboxNet::setup(
        &id,
        &NetPolicy::Internet {
            extra_allowed: vec![],
        },
        &state.0,
    )
    .unwrap();
    assert_eq!(
        net.netns_path(),
        PathBuf::from(format!("/run/netns/gw-{id}"))
    );
    assert!(net.netns_path().exists());
    assert!(net.host_if.len() <= 15);
    assert!(net::POOL.contains(net.guest_ip));
    assert_eq!(
        fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );
    // The guest end: its address, a default route, lo up, no IPv6 at all.
    let addrs = sh("ip", &["-n", &net.netns, "-o", "addr", "show"]);
    assert!(
        addrs.contains(&format!("inet {}/30", net.guest_ip)),
        "{addrs}"
    );
    assert!(!addrs.contains("inet6 fe80"), "{addrs}");
    assert!(addrs.contains("inet 127.0.0.1/8"), "{addrs}");
    let routes = sh("ip", &["-n", &net.netns, "route"]);
    assert!(
        routes.contains(&format!("default via {}", net.host_ip)),
        "{routes}"
    );
    assert!(!sh("ip", &["-o", "addr", "show", "dev", &net.host_if]).contains("inet6"));

    // Controls: each server listens where the sandbox will be refused.
    assert_host_reaches(th.private, srv.port);
    assert_host_reaches(Ipv4Addr::LOCALHOST, host_srv.port);
    assert_host_reaches(net.host_ip, host_srv.port);
    assert_host_reaches(a_host_address(), host_srv.port);
    assert_host_reaches(th.host_side, host_srv.port);

    // Internet: the public host yes; private addresses and the host no.
    assert_reaches(&net, th.public, srv.port);
    assert_refused(&net, th.private, srv.port);
    assert_refused(&net, Ipv4Addr::LOCALHOST, host_srv.port);
    assert_refused(&net, net.host_ip, host_srv.port);
    assert_refused(&net, a_host_address(), host_srv.port);
    assert_refused(&net, th.host_side, host_srv.port);
    // DNS through the host's resolver (the only traffic that leaves the machine).
    if resolves_in(None, "deb.debian.org") {
        assert!(
            resolves_in(Some(&net.netns_path()), "deb.debian.org"),
            "DNS must work from the sandbox's netns"
        );
    } else {
        eprintln!("the host cannot resolve deb.debian.org: DNS check skipped");
    }

    // extra_allowed opens a private range (setting up again keeps the slot).
    let net2 = SandboxNet::setup(
        &id,
        &NetPolicy::Internet {
            extra_allowed: vec![th.link],
        },
        &state.0,
    )
    .unwrap();
    assert_eq!(net2.guest_ip, net.guest_ip);
    assert_reaches(&net2, th.private, srv.port);
    assert_reaches(&net2, th.public, srv.port);
    assert_refused(&net2, th.host_side, host_srv.port);

    // Allowlist: the listed private range yes (except the host's own address
    // in it), the public host no.
    let net3 = SandboxNet::setup(&id, &NetPolicy::Allowlist(vec![th.link]), &state.0).unwrap();
    assert_eq!(net3.guest_ip, net.guest_ip);
    assert_reaches(&net3, th.private, srv.port);
    assert_refused(&net3, th.public, srv.port);
    assert_refused(&net3, th.host_side, host_srv.port);
    assert_refused(&net3, net3.host_ip, host_srv.port);

    // Teardown removes everything, and again is fine.
    assert_eq!(
        leftovers(&id, net3.slot),
        ["netns", "link", "rule", "chain"]
    );
    SandboxNet::teardown(&id, &state.0).unwrap();
    assert_eq!(leftovers(&id, net3.slot), Vec::<String>::new());
    assert!(!state.0.join(format!("{id}.json")).exists());
    SandboxNet::teardown(&id, &state.0).unwrap();
}

#[test]
fn dns_exception_is_port_53_of_the_nameservers_only() {
    if !can_run() {
        return;
    }
    let th = TestHost::new();
    let dns = th.serve(53);
    let other = th.serve(0);
    let state = TempDir::new("state");
    let id = uniq_id("dns");
    let _guard = NetGuard::new(&id, &state.0);
    assert_host_reaches(th.private, other.port);
    // The test host's private address plays the nameserver.
    for policy in [
        NetPolicy::Internet {
            extra_allowed: vec![],
        },
        NetPolicy::Allowlist(vec![]),
    ] {
        let net = SandboxNet::setup_with(&id, &policy, &state.0, &[th.private]).unwrap();
        assert_reaches(&net, th.private, dns.port);
        assert_refused(&net, th.private, other.port);
    }
    let net = SandboxNet::setup_with(&id, &NetPolicy::Allowlist(vec![]), &state.0, &[]).unwrap();
    assert_refused(&net, th.private, dns.port);
    assert_refused(&net, th.public, other.port);
}

#[test]
fn sandboxes_cannot_reach_each_other() {
    if !can_run() {
        return;
    }
    let state = TempDir::new("state");
    let (a, b) = (uniq_id("a"), uniq_id("b"));
    let _ga = NetGuard::new(&a, &state.0);
    let _gb = NetGuard::new(&b, &state.0);
    let everything = NetPolicy::Allowlist(vec!["0.0.0.0/0".parse().unwrap()]);
    let na = SandboxNet::setup(&a, &everything, &state.0).unwrap();
    let nb = SandboxNet::setup(&b, &everything, &state.0).unwrap();
    assert_ne!(na.guest_ip, nb.guest_ip);
    let srv_b = Server::start(Some(nb.netns_path()), 0);
    // Control: b's server answers inside b.
    assert_eq!(
        connect_from(&nb.netns_path(), Ipv4Addr::LOCALHOST, srv_b.port),
        Ok("127.0.0.1".to_string())
    );
    assert_host_reaches(nb.guest_ip, srv_b.port);
    assert_refused(&na, nb.guest_ip, srv_b.port);
    assert_refused(&na, nb.host_ip, srv_b.port);
}

#[test]
fn cleanup_stale_removes_what_a_crashed_process_left() {
    if !can_run() {
        return;
    }
    let state = TempDir::new("state");
    let policy = NetPolicy::Internet {
        extra_allowed: vec![],
    };
    let (crashed, alive, half) = (uniq_id("crash"), uniq_id("alive"), uniq_id("half"));
    let _g1 = NetGuard::new(&crashed, &state.0);
    let _g2 = NetGuard::new(&alive, &state.0);
    let _g3 = NetGuard::new(&half, &state.0);
    let c = SandboxNet::setup(&crashed, &policy, &state.0).unwrap();
    let a = SandboxNet::setup(&alive, &policy, &state.0).unwrap();
    // A process that died right after creating the netns.
    sh("ip", &["netns", "add", &format!("gw-{half}")]);
    assert_eq!(leftovers(&crashed, c.slot).len(), 4);

    // Keep everything but our two "crashed" ids: other tests (and any real
    // sandbox on this machine) run at the same time.
    let removed = net::cleanup_stale(&|id: &str| id != crashed && id != half, &state.0).unwrap();
    let mut want = vec![crashed.clone(), half.clone()];
    want.sort();
    assert_eq!(removed, want);
    assert_eq!(leftovers(&crashed, c.slot), Vec::<String>::new());
    assert_eq!(leftovers(&half, u32::MAX), Vec::<String>::new());
    assert!(!state.0.join(format!("{crashed}.json")).exists());
    assert_eq!(
        leftovers(&alive, a.slot).len(),
        4,
        "the kept sandbox is untouched"
    );
    assert!(state.0.join(format!("{alive}.json")).exists());
    // Nothing left to do the second time (for our ids).
    let again = net::cleanup_stale(&|id: &str| id != crashed && id != half, &state.0).unwrap();
    assert!(again.is_empty(), "{again:?}");
}

/// Not a test by itself: the child process of
/// `concurrent_setups_from_threads_and_processes`.
#[test]
fn concurrency_child() {
    let (Ok(ids), Ok(state)) = (
        std::env::var("GWORKER_NET_CHILD_IDS"),
        std::env::var("GWORKER_NET_CHILD_STATE"),
    ) else {
        return;
    };
    let policy = NetPolicy::Internet {
        extra_allowed: vec![],
    };
    for id in ids.split(',') {
        let n = SandboxNet::setup(id, &policy, Path::new(&state)).unwrap();
        println!("SLOT {id} {}", n.slot);
    }
}

#[test]
fn concurrent_setups_from_threads_and_processes() {
    if !can_run() {
        return;
    }
    let state = TempDir::new("state");
    let policy = NetPolicy::Internet {
        extra_allowed: vec![],
    };
    let ids: Vec<String> = (0..12).map(|_| uniq_id("cc")).collect();
    let _guards: Vec<NetGuard> = ids.iter().map(|i| NetGuard::new(i, &state.0)).collect();
    // Two child processes set up 4 each while 4 threads here set up 1 each.
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = [&ids[0..4], &ids[4..8]]
        .iter()
        .map(|chunk| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "concurrency_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("GWORKER_NET_CHILD_IDS", chunk.join(","))
                .env("GWORKER_NET_CHILD_STATE", &state.0)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let threads: Vec<_> = ids[8..]
        .iter()
        .map(|id| {
            let (id, st, p) = (id.clone(), state.0.clone(), policy.clone());
            std::thread::spawn(move || SandboxNet::setup(&id, &p, &st).unwrap())
        })
        .collect();
    let mut slots = Vec::new();
    for t in threads {
        slots.push(t.join().unwrap().slot);
    }
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "child failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let found: Vec<u32> = text
            .lines()
            .filter_map(|l| l.split_once("SLOT ").map(|(_, rest)| rest))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(found.len(), 4, "{text}");
        slots.extend(found);
    }
    let mut unique = slots.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 12, "slots must be distinct: {slots:?}");
    for id in &ids {
        assert!(Path::new(&format!("/run/netns/gw-{id}")).exists());
    }
    // Concurrent teardowns.
    let threads: Vec<_> = ids
        .iter()
        .map(|id| {
            let (id, st) = (id.clone(), state.0.clone());
            std::thread::spawn(move || SandboxNet::teardown(&id, &st).unwrap())
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let rules = sh("iptables-save", &[]);
    for id in &ids {
        assert!(!Path::new(&format!("/run/netns/gw-{id}")).exists());
        assert!(!rules.contains(&format!("gw:{id}\"")));
    }
}

/// Teardown removes the exact rules setup made in one transaction; when they
/// are not what setup made (here: the jump already removed by hand, and a
/// stray rule with the id's comment added), it falls back to reading the
/// ruleset, and either way nothing of the id is left.
#[test]
fn teardown_removes_everything_on_the_fast_and_the_general_path() {
    if !can_run() {
        return;
    }
    let state = TempDir::new("state");
    let policy = NetPolicy::Internet {
        extra_allowed: vec![],
    };
    for disturb in [false, true] {
        let id = uniq_id("td");
        let _guard = NetGuard::new(&id, &state.0);
        let net = SandboxNet::setup(&id, &policy, &state.0).unwrap();
        if disturb {
            let jump = format!(
                "-i gwh-{} -m comment --comment gw:{id} -j GW-{}",
                net.slot, net.slot
            );
            let mut args = vec!["-D", "GWORKER-SB"];
            args.extend(jump.split(' '));
            sh("iptables", &args);
            let stray = format!("-m comment --comment gw:{id} -j RETURN");
            let mut args = vec!["-A", "GWORKER-SB"];
            args.extend(stray.split(' '));
            sh("iptables", &args);
        }
        SandboxNet::teardown(&id, &state.0).unwrap();
        assert_eq!(
            leftovers(&id, net.slot),
            Vec::<String>::new(),
            "disturbed: {disturb}"
        );
    }
}

#[test]
fn setup_and_teardown_time() {
    if !can_run() {
        return;
    }
    let state = TempDir::new("state");
    let policy = NetPolicy::Internet {
        extra_allowed: vec![],
    };
    let ids: Vec<String> = (0..20).map(|_| uniq_id("tm")).collect();
    let _guards: Vec<NetGuard> = ids.iter().map(|i| NetGuard::new(i, &state.0)).collect();
    let start = Instant::now();
    for id in &ids {
        SandboxNet::setup(id, &policy, &state.0).unwrap();
    }
    let setup = start.elapsed();
    let start = Instant::now();
    for id in &ids {
        SandboxNet::teardown(id, &state.0).unwrap();
    }
    let teardown = start.elapsed();
    eprintln!(
        "20 sandboxes: setup {:?} each, teardown {:?} each",
        setup / 20,
        teardown / 20
    );
    // Generous bounds: this is a measurement, not a benchmark gate.
    assert!(setup / 20 < Duration::from_secs(2));
    assert!(teardown / 20 < Duration::from_secs(2));
}

#[test]
fn blocked_and_bad_ids_are_refused() {
    let state = TempDir::new("state");
    assert!(matches!(
        SandboxNet::setup("x", &NetPolicy::Blocked, &state.0),
        Err(net::NetError::Blocked)
    ));
    assert!(matches!(
        SandboxNet::setup("../x", &NetPolicy::Allowlist(vec![]), &state.0),
        Err(net::NetError::InvalidId(_))
    ));
    assert!(matches!(
        SandboxNet::teardown("a b", &state.0),
        Err(net::NetError::InvalidId(_))
    ));
}

/// A busybox root filesystem (static busybox from the host).
fn busybox_rootfs(dir: &Path) -> Option<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    for applet in ["sh", "nc", "echo", "cat", "ip", "nslookup", "sleep"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    Some(())
}

/// Deletes a runsc container and its state dir on drop.
/// runsc, a work dir and a static busybox rootfs in it, for the tests that
/// boot real sandboxes; `None` (with a note why) where this machine cannot.
fn runsc_fixture(tag: &str) -> Option<(PathBuf, TempDir, PathBuf)> {
    if !can_run() {
        return None;
    }
    let runsc = gworker_runtime::find_runsc();
    if !runsc.exists() {
        eprintln!("skipping: runsc not found ({})", runsc.display());
        return None;
    }
    let work = TempDir::new(tag);
    let rootfs = work.0.join("rootfs");
    if busybox_rootfs(&rootfs).is_none() {
        eprintln!("skipping: no static busybox (apt-get install busybox-static)");
        return None;
    }
    Some((runsc, work, rootfs))
}

/// Writes a bundle's `config.json`.
fn write_config(bundle: &Path, config: &serde_json::Value) {
    fs::create_dir_all(bundle).unwrap();
    fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(config).unwrap(),
    )
    .unwrap();
}

struct RunscGuard {
    runsc: PathBuf,
    root: PathBuf,
    id: String,
}

impl Drop for RunscGuard {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .arg("20")
            .arg(&self.runsc)
            .arg(format!("--root={}", self.root.display()))
            .args(["delete", "--force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn runsc_sandbox_gets_the_policy() {
    let Some((runsc, work, rootfs)) = runsc_fixture("runsc") else {
        return;
    };
    let th = TestHost::new();
    let srv = th.serve(0);
    let host_srv = Server::start(None, 0);
    let state = work.0.join("state");
    let id = uniq_id("rs");
    let _guard = NetGuard::new(&id, &state);
    let net = SandboxNet::setup(
        &id,
        &NetPolicy::Internet {
            extra_allowed: vec![],
        },
        &state,
    )
    .unwrap();

    // The project's own config.json, changed as the module documentation says.
    let bundle = work.0.join("bundle");
    let resolv = work.0.join("resolv.conf");
    fs::write(&resolv, SandboxNet::resolv_conf()).unwrap();
    let mut config = gworker_runtime::oci_config(&gworker_runtime::BundleSpec {
        user: None,
        network: None,
        network_gate: None,
        slot_volumes: None,
        agent_mounts: false,
        rootfs: rootfs.clone(),
        agent: rootfs.join("bin/busybox"),
        hostname: "nettest".into(),
        mounts: vec![],
        cgroup: None,
    });
    for ns in config["linux"]["namespaces"].as_array_mut().unwrap() {
        if ns["type"] == "network" {
            *ns = net.oci_namespace();
        }
    }
    config["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/etc/resolv.conf", "type": "bind",
            "source": resolv, "options": ["rbind", "ro"]
        }));
    let probe = |name: &str, ip: Ipv4Addr, port: u16| {
        format!("r=$(nc -w 2 {ip} {port} </dev/null 2>&1); echo \"{name}:$?:$r\"; ")
    };
    let dns = resolves_in(None, "deb.debian.org");
    let script = format!(
        "ip -o addr; {}{}{}{}{}",
        probe("PUBLIC", th.public, srv.port),
        probe("PRIVATE", th.private, srv.port),
        probe("GATEWAY", net.host_ip, host_srv.port),
        probe("HOSTSIDE", th.host_side, host_srv.port),
        if dns {
            "nslookup deb.debian.org >/dev/null 2>&1; echo \"DNS:$?\"; "
        } else {
            ""
        },
    );
    config["process"]["args"] = serde_json::json!(["/bin/sh", "-c", script]);
    write_config(&bundle, &config);

    // The project's own runsc command line, wrapped.
    let root = work.0.join("runsc-root");
    let cid = format!("gwnet-{}-{}", std::process::id(), next());
    let _container = RunscGuard {
        runsc: runsc.clone(),
        root: root.clone(),
        id: cid.clone(),
    };
    let run = gworker_runtime::Runsc::new(&runsc, &root).run_command(&bundle, &cid);
    let wrapped = net::wrap_runsc(&run);
    let args: Vec<String> = wrapped
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert!(args.contains(&"--network=sandbox".to_string()));
    assert!(!args.contains(&"--network=none".to_string()));
    let start = Instant::now();
    let out = output_within(wrapped, 20);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "runsc ran in {:?}, status {}\n{stdout}{}",
        start.elapsed(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "runsc failed");
    let line = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} line in {stdout}"))
            .to_string()
    };
    assert!(
        stdout.contains(&format!("inet {}/30", net.guest_ip)),
        "the sandbox has its address"
    );
    assert_eq!(line("PUBLIC"), format!("0:{}", th.public));
    for refused in ["PRIVATE", "GATEWAY", "HOSTSIDE"] {
        let l = line(refused);
        assert!(!l.starts_with("0:"), "{refused} must be refused: {l}");
    }
    if dns {
        assert_eq!(line("DNS"), "0", "DNS through the host's resolver");
    }
    // Controls: the refused servers were there.
    assert_host_reaches(th.private, srv.port);
    assert_host_reaches(net.host_ip, host_srv.port);
}

/// Runs `cmd` (stdin null) and collects its output; kills it after `secs`.
/// (Not through `timeout`: [`net::wrap_runsc`]'s work-around runs between
/// fork and exec of the command itself.)
fn output_within(mut cmd: Command, secs: u64) -> std::process::Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let watchdog = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if d2.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
    out
}

/// runsc joins the netns `create_netns` made, boots, and waits in its
/// prestart hook on the gate; the veth, addresses and rules made meanwhile
/// (`setup_in_netns`, 150 ms late on purpose) are what the sandbox gets. A
/// gate opened with `false`, or dropped, makes runsc give up.
#[test]
fn runsc_waits_on_the_gate_for_a_network_made_while_it_boots() {
    let Some((runsc, work, rootfs)) = runsc_fixture("gate") else {
        return;
    };
    let state = work.0.join("state");
    let policy = NetPolicy::Internet {
        extra_allowed: vec![],
    };
    // (gate opened late with ok, gate opened with fail, gate dropped)
    for (round, outcome) in ["ok", "fail", "dropped"].iter().enumerate() {
        let id = uniq_id("gt");
        let _guard = NetGuard::new(&id, &state);
        let netns = SandboxNet::create_netns(&id, &state).unwrap();
        let fifo = work.0.join(format!("gate{round}"));
        let gate = net::ReadyGate::create(&fifo).unwrap();
        let bundle = work.0.join(format!("bundle{round}"));
        let resolv = work.0.join("resolv.conf");
        fs::write(&resolv, SandboxNet::resolv_conf()).unwrap();
        let mut config = gworker_runtime::oci_config(&gworker_runtime::BundleSpec {
            user: None,
            network: Some((netns.clone(), resolv.clone())),
            network_gate: Some(fifo.clone()),
            slot_volumes: None,
            agent_mounts: false,
            rootfs: rootfs.clone(),
            agent: rootfs.join("bin/busybox"),
            hostname: "gatetest".into(),
            mounts: vec![],
            cgroup: None,
        });
        config["process"]["args"] = serde_json::json!(["/bin/sh", "-c", "ip -o addr; ip route"]);
        write_config(&bundle, &config);
        let root = work.0.join("runsc-root");
        let cid = format!("gwgate-{}-{}", std::process::id(), next());
        let _container = RunscGuard {
            runsc: runsc.clone(),
            root: root.clone(),
            id: cid.clone(),
        };
        let run = gworker_runtime::Runsc::new(&runsc, &root).run_command(&bundle, &cid);
        let wrapped = net::wrap_runsc(&run);
        let (id2, state2, policy2) = (id.clone(), state.clone(), policy.clone());
        let outcome2 = outcome.to_string();
        let maker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            match outcome2.as_str() {
                "ok" => {
                    let net = SandboxNet::setup_in_netns(&id2, &policy2, &state2).unwrap();
                    gate.open_gate(true).unwrap();
                    Some(net.guest_ip)
                }
                "fail" => {
                    gate.open_gate(false).unwrap();
                    None
                }
                _ => {
                    drop(gate);
                    None
                }
            }
        });
        let out = output_within(wrapped, 30);
        let guest_ip = maker.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!(
            "{outcome}: status {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        match guest_ip {
            Some(ip) => {
                assert!(out.status.success(), "runsc failed");
                assert!(
                    stdout.contains(&format!("inet {ip}/30")),
                    "the sandbox has its address"
                );
                assert!(stdout.contains("default via"), "and its default route");
            }
            None => {
                assert!(
                    !out.status.success(),
                    "runsc must give up when the gate says {outcome}"
                );
                assert!(!stdout.contains("inet "), "the sandbox never ran");
            }
        }
    }
}

/// Unmounts (lazily) on drop.
struct MountGuard(Vec<PathBuf>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(p)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The wrapper's mount namespace is a slave of the host's: a directory
/// bind-mounted on the host under a shared volume directory *after* the
/// sandbox started is visible inside it (what attaching volumes to running
/// sandboxes relies on).
#[test]
fn runsc_wrapper_keeps_later_host_mounts_visible() {
    let Some((runsc, work, rootfs)) = runsc_fixture("prop") else {
        return;
    };
    let (shared, later) = (work.0.join("shared"), work.0.join("later"));
    fs::create_dir_all(&shared).unwrap();
    fs::create_dir_all(&later).unwrap();
    fs::write(later.join("file"), "mounted-later\n").unwrap();
    let sub = shared.join("sub");
    fs::create_dir_all(&sub).unwrap();
    let mut mounts = MountGuard(vec![shared.clone()]);
    let s = shared.to_str().unwrap();
    sh("mount", &["--bind", s, s]);
    sh("mount", &["--make-shared", s]);

    let mut config = gworker_runtime::oci_config(&gworker_runtime::BundleSpec {
        user: None,
        network: None,
        network_gate: None,
        slot_volumes: None,
        agent_mounts: false,
        rootfs: rootfs.clone(),
        agent: rootfs.join("bin/busybox"),
        hostname: "proptest".into(),
        mounts: vec![],
        cgroup: None,
    });
    config["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/mnt/vol", "type": "bind",
            "source": shared, "options": ["rbind", "rw", "rslave"]
        }));
    config["process"]["args"] = serde_json::json!([
        "/bin/sh",
        "-c",
        "for i in $(seq 1 40); do if cat /mnt/vol/sub/file 2>/dev/null; then exit 0; fi; sleep 0.1; done; exit 7"
    ]);
    let bundle = work.0.join("bundle");
    write_config(&bundle, &config);
    let root = work.0.join("runsc-root");
    let cid = format!("gwprop-{}-{}", std::process::id(), next());
    let _container = RunscGuard {
        runsc: runsc.clone(),
        root: root.clone(),
        id: cid.clone(),
    };
    let mut cmd = Command::new("timeout");
    let wrapper = net::runsc_wrapper();
    cmd.arg("20")
        .args(&wrapper)
        .arg(&runsc)
        .arg(format!("--root={}", root.display()))
        .args(["--network=none", "run", "--bundle"])
        .arg(&bundle)
        .arg(&cid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Mount once the sandbox runs (it prints nothing until it sees the file).
    std::thread::sleep(Duration::from_millis(800));
    sh(
        "mount",
        &["--bind", later.to_str().unwrap(), sub.to_str().unwrap()],
    );
    mounts.0.push(sub.clone());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("mounted-later"),
        "the later mount must reach the sandbox: {} {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A background setup (a pool slot's) waits while the lock is held and gets
/// it once it is free; the network it makes works like any other.
#[test]
fn background_setup_takes_the_lock_when_it_is_free() {
    if !can_run() {
        return;
    }
    let state = TempDir::new("state");
    fs::create_dir_all(&state.0).unwrap();
    let held = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(net::HOST_LOCK)
        .unwrap();
    let held = nix::fcntl::Flock::lock(held, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let id = uniq_id("bg");
    let _guard = NetGuard::new(&id, &state.0);
    let (id2, dir2) = (id.clone(), state.0.clone());
    let started = Instant::now();
    let t = std::thread::spawn(move || {
        net::set_background(true);
        let r = SandboxNet::setup(
            &id2,
            &NetPolicy::Internet {
                extra_allowed: vec![],
            },
            &dir2,
        );
        net::set_background(false);
        (r, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!t.is_finished(), "the setup waited for the held lock");
    drop(held);
    let (r, took) = t.join().unwrap();
    let net = r.unwrap();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(Path::new("/run/netns").join(format!("gw-{id}")).exists());
    SandboxNet::teardown(&id, &state.0).unwrap();
    assert_eq!(leftovers(&id, net.slot), Vec::<String>::new());
}

#[test]
fn readdress_gives_back_what_runsc_takes_from_the_guest_end() {
    if !can_run() {
        return;
    }
    let th = TestHost::new();
    let srv = th.serve(0);
    let state = TempDir::new("state");
    let id = uniq_id("rad");
    let _guard = NetGuard::new(&id, &state.0);
    let policy = NetPolicy::Internet {
        extra_allowed: vec![],
    };
    let net = SandboxNet::setup(&id, &policy, &state.0).unwrap();
    assert_reaches(&net, th.public, srv.port);
    // What runsc does when it starts the sandbox: the guest end's address
    // and routes move into its network stack.
    let ns = format!("gw-{id}");
    let cidr = format!("{}/{}", net.guest_ip, net::SUBNET_PREFIX);
    sh("ip", &["-netns", &ns, "route", "flush", "dev", "eth0"]);
    sh(
        "ip",
        &["-netns", &ns, "address", "del", &cidr, "dev", "eth0"],
    );
    assert_refused(&net, th.public, srv.port);
    SandboxNet::readdress(&id, &state.0).unwrap();
    assert_reaches(&net, th.public, srv.port);
    // Idempotent: again with everything in place.
    SandboxNet::readdress(&id, &state.0).unwrap();
    assert_reaches(&net, th.public, srv.port);
    // The same veth: its host end is still there.
    assert!(Path::new(&format!("/sys/class/net/{}", net.host_if)).exists());
    SandboxNet::teardown(&id, &state.0).unwrap();
    assert!(
        SandboxNet::readdress(&id, &state.0).is_err(),
        "no network recorded"
    );
}
