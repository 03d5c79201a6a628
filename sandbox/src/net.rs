//! Networks for the tests: a [`Link`] is two private network namespaces ("hosts") joined
//! by a veth pair, which a test can cut silently and mend (established TCP connections
//! survive), or throttle; a [`Path`] joins two hosts through a third namespace, a router
//! that limits the rate and delays every packet (a long, slow path with a round-trip time);
//! an [`Sshd`] is a real OpenSSH server on the far host of a link or a path,
//! with its own keys and configuration; a [`FlipRelay`] is a TCP relay that corrupts one
//! bit of the first connection it relays. Everything is removed when dropped (also when a
//! test panics); only namespaces, processes and files the harness made are ever touched.
//!
//! Links need root and iproute2, cutting one needs nftables, a path ethtool and the TUN
//! device (/dev/net/tun), and the server needs OpenSSH:
//! their absence is a loud failure naming the install command (`scripts/install-deps`
//! installs them all).

use std::ffi::OsStr;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::path::{self, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The names of the veth ends, inside the tx and the rx namespace.
pub const TX_DEV: &str = "mhb-tx";
pub const RX_DEV: &str = "mhb-rx";

/// Namespaces are named `mhb-<pid>-<n>-tx` and `mhb-<pid>-<n>-rx` (and `mhb-<pid>-<n>-mid`
/// for the router of a [`Path`]).
const PREFIX: &str = "mhb-";

/// The nftables table [`Link::cut`] adds to each namespace.
const CUT_TABLE: &str = "mhb_cut";

static NEXT_LINK: AtomicU32 = AtomicU32::new(0);

/// `ip netns add` mounts /run/netns on first use: one creation at a time in this process.
static CREATING: Mutex<()> = Mutex::new(());

/// Finds a system program, or panics naming the package that has it.
fn tool(name: &str, package: &str) -> PathBuf {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ] {
        let p = path::Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed; install it with: apt-get install -y {package} (or run scripts/install-deps)");
}

fn ip() -> PathBuf {
    tool("ip", "iproute2")
}

/// Runs a command, panicking with its output if it fails.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `nft -f -` with a script inside a namespace.
fn nft(ns: &str, script: &str) {
    let mut child = Command::new(ip())
        .args(["netns", "exec", ns])
        .arg(tool("nft", "nftables"))
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft in {ns} failed with {}:\n{script}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn require_root(what: &str) {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "{what} needs root (it creates network namespaces)"
    );
}

fn process_alive(pid: u32) -> bool {
    path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills every process in a namespace and deletes it (which deletes its veth end).
fn remove_namespace(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(ip())
            .args(["netns", "pids", ns])
            .stderr(Stdio::null())
            .output();
        let pids: Vec<i32> = match out {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect(),
            Err(_) => Vec::new(),
        };
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new(ip())
        .args(["netns", "delete", ns])
        .stderr(Stdio::null())
        .status();
}

/// Removes the namespaces of test processes that died without dropping their links (killed
/// outright): those named by this harness whose process is gone.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new(ip()).args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let ours = parts.len() == 3
            && parts[1].parse::<u32>().is_ok()
            && ["tx", "rx", "mid"].contains(&parts[2]);
        if let (true, Ok(pid)) = (ours, parts[0].parse::<u32>()) {
            if !process_alive(pid) {
                remove_namespace(name);
            }
        }
    }
}

/// Whether an address of the host (the root namespace) lies in `10.a.b.0/24`.
fn host_uses_subnet(a: u8, b: u8) -> bool {
    let out = run(Command::new(ip()).args(["-o", "-4", "addr", "show"]));
    let prefix = format!(" 10.{a}.{b}.");
    String::from_utf8_lossy(&out.stdout).contains(&prefix)
}

/// Runs `f` on a thread that entered network namespace `ns`: sockets it makes belong to
/// that namespace, and can be used from any thread afterwards.
fn in_namespace<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    thread::scope(|s| {
        s.spawn(|| {
            let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "cannot enter {ns}: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Two network namespaces made by the harness, "tx" (where the tool under test runs) and
/// "rx" (the far host), joined by a veth pair with an address each in a /24 of their own.
/// Each namespace has its loopback up and no route anywhere else: the host is unreachable
/// from them, and they from it.
///
/// Dropping the link kills every process still running in its namespaces and deletes them.
pub struct Link {
    pub tx_ns: String,
    pub rx_ns: String,
    pub tx_addr: Ipv4Addr,
    pub rx_addr: Ipv4Addr,
    /// How many [`Sshd`]s were started on this link: the first listens on port 22, the
    /// next ones on 2201, 2202...
    servers: AtomicU16,
}

impl Link {
    /// Creates the namespaces and the veth pair between them. Panics if not root, or if
    /// iproute2 is missing.
    pub fn new() -> Link {
        require_root("Link::new");
        let ip = ip();
        let _creating = CREATING.lock().unwrap_or_else(|e| e.into_inner());
        remove_stale_namespaces();
        let pid = std::process::id();
        let (tx_ns, rx_ns, subnet) = loop {
            let n = NEXT_LINK.fetch_add(1, Ordering::Relaxed);
            let tx_ns = format!("{PREFIX}{pid}-{n}-tx");
            let rx_ns = format!("{PREFIX}{pid}-{n}-rx");
            // 10.200.0.0 to 10.249.255.0: the process picks the second byte, the link the
            // third, so parallel test processes rarely share a subnet (and the namespaces
            // are isolated if they do).
            let subnet = (200 + (pid % 50) as u8, (n % 256) as u8);
            let taken = [&tx_ns, &rx_ns]
                .iter()
                .any(|ns| path::Path::new("/run/netns").join(ns).exists());
            if !taken && !host_uses_subnet(subnet.0, subnet.1) {
                break (tx_ns, rx_ns, subnet);
            }
            assert!(n < 100_000, "no free namespace name or subnet");
        };
        let tx_addr = Ipv4Addr::new(10, subnet.0, subnet.1, 1);
        let rx_addr = Ipv4Addr::new(10, subnet.0, subnet.1, 2);
        // From here on, a panic drops the link and removes what was made.
        let link = Link {
            tx_ns,
            rx_ns,
            tx_addr,
            rx_addr,
            servers: AtomicU16::new(0),
        };
        for ns in [&link.tx_ns, &link.rx_ns] {
            run(Command::new(&ip).args(["netns", "add", ns]));
        }
        // Each end is created right in its namespace: the host's namespace never sees it.
        run(Command::new(&ip).args([
            "link",
            "add",
            TX_DEV,
            "netns",
            &link.tx_ns,
            "type",
            "veth",
            "peer",
            "name",
            RX_DEV,
            "netns",
            &link.rx_ns,
        ]));
        for (ns, dev, addr) in [
            (&link.tx_ns, TX_DEV, tx_addr),
            (&link.rx_ns, RX_DEV, rx_addr),
        ] {
            run(Command::new(&ip).args([
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]));
            run(Command::new(&ip).args(["-n", ns, "link", "set", "lo", "up"]));
            run(Command::new(&ip).args(["-n", ns, "link", "set", dev, "up"]));
        }
        link
    }

    /// A command running `program` in the tx namespace (`ip netns exec`, which execs it: the
    /// child's pid is the program's); add its arguments.
    pub fn tx(&self, program: impl AsRef<OsStr>) -> Command {
        Link::exec(&self.tx_ns, program)
    }

    /// A command running `program` in the rx namespace; add its arguments.
    pub fn rx(&self, program: impl AsRef<OsStr>) -> Command {
        Link::exec(&self.rx_ns, program)
    }

    fn exec(ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(ip());
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }

    /// Runs `f` on a thread inside the tx namespace: a `TcpStream` it connects, or a
    /// `TcpListener` it binds, belongs to that namespace (and works from any thread).
    pub fn in_tx<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_namespace(&self.tx_ns, f)
    }

    /// Runs `f` on a thread inside the rx namespace (see [`Link::in_tx`]).
    pub fn in_rx<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_namespace(&self.rx_ns, f)
    }

    /// Makes the path silently dead in both directions, as a pulled cable far away: each
    /// namespace drops every IP packet arriving on its veth end (ARP still passes, so no
    /// host is reported unreachable). Senders get no error, established TCP connections
    /// retransmit, new ones time out; after [`Link::mend`] established connections go on
    /// (at their next retransmission, a few seconds at most after a short cut).
    pub fn cut(&self) {
        for (ns, dev) in [(&self.tx_ns, TX_DEV), (&self.rx_ns, RX_DEV)] {
            // Declaring, deleting and re-creating the table in one transaction makes a
            // second cut replace the first.
            nft(
                ns,
                &format!(
                    "table netdev {CUT_TABLE}\n\
                     delete table netdev {CUT_TABLE}\n\
                     table netdev {CUT_TABLE} {{\n\
                     \x20 chain ingress {{\n\
                     \x20   type filter hook ingress device \"{dev}\" priority 0; policy accept;\n\
                     \x20   meta protocol {{ ip, ip6 }} drop\n\
                     \x20 }}\n\
                     }}\n"
                ),
            );
        }
    }

    /// Makes the path alive again after [`Link::cut`] (nothing happens if it was not cut).
    pub fn mend(&self) {
        for ns in [&self.tx_ns, &self.rx_ns] {
            nft(
                ns,
                &format!("table netdev {CUT_TABLE}\ndelete table netdev {CUT_TABLE}\n"),
            );
        }
    }

    /// Limits both directions to `mbit` megabits per second (a token bucket filter on each
    /// veth end's egress, replacing any earlier limit).
    pub fn shape(&self, mbit: u32) {
        assert!(
            mbit > 0,
            "Link::shape needs a rate above 0 (unshape removes it)"
        );
        // Ten milliseconds' worth of bytes, at least a few full-size packets.
        let burst = (u64::from(mbit) * 1_000_000 / 8 / 100).max(16 * 1024);
        let tc = tool("tc", "iproute2");
        for (ns, dev) in [(&self.tx_ns, TX_DEV), (&self.rx_ns, RX_DEV)] {
            run(Link::exec(ns, &tc).args([
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                &burst.to_string(),
                "latency",
                "100ms",
            ]));
        }
    }

    /// Removes the limit of [`Link::shape`] (nothing happens if there is none).
    pub fn unshape(&self) {
        let tc = tool("tc", "iproute2");
        for (ns, dev) in [(&self.tx_ns, TX_DEV), (&self.rx_ns, RX_DEV)] {
            let _ = Link::exec(ns, &tc)
                .args(["qdisc", "del", "dev", dev, "root"])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Two hosts made by the harness, "tx" and "rx", that reach each other: the ends of a [`Link`]
/// or of a [`Path`]. An [`Sshd`] runs on the rx host of either.
pub trait Hosts {
    /// A command running `program` in the tx namespace; add its arguments.
    fn tx(&self, program: impl AsRef<OsStr>) -> Command;
    /// A command running `program` in the rx namespace; add its arguments.
    fn rx(&self, program: impl AsRef<OsStr>) -> Command;
    /// The rx host's address, as the tx host reaches it.
    fn rx_addr(&self) -> Ipv4Addr;
    /// The port of the next [`Sshd`] on the rx host: 22 for the first, then 2201, 2202...
    fn sshd_port(&self) -> u16;
}

/// The port of the `n`th sshd of a pair of hosts (from 0).
fn sshd_port(n: u16) -> u16 {
    match n {
        0 => 22,
        k => 2200 + k,
    }
}

impl Hosts for Link {
    fn tx(&self, program: impl AsRef<OsStr>) -> Command {
        Link::tx(self, program)
    }

    fn rx(&self, program: impl AsRef<OsStr>) -> Command {
        Link::rx(self, program)
    }

    fn rx_addr(&self) -> Ipv4Addr {
        self.rx_addr
    }

    fn sshd_port(&self) -> u16 {
        sshd_port(self.servers.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for Link {
    fn default() -> Link {
        Link::new()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.tx_ns, &self.rx_ns] {
            if path::Path::new("/run/netns").join(ns).exists() {
                remove_namespace(ns);
            }
        }
    }
}

/// Device names in the router of a [`Path`]: its veth ends toward the tx and the rx host,
/// and the TUN devices of the delay line, one per direction (named after where their
/// packets go).
const MID_TX_DEV: &str = "mhb-mid-tx";
const MID_RX_DEV: &str = "mhb-mid-rx";
const DELAY_TO_RX: &str = "mhb-delay-rx";
const DELAY_TO_TX: &str = "mhb-delay-tx";

/// The policy routing tables of the router: what comes from tx goes into [`DELAY_TO_RX`],
/// what comes from rx into [`DELAY_TO_TX`].
const TABLE_TO_RX: &str = "100";
const TABLE_TO_TX: &str = "101";

/// Packets a delay line's TUN device queues before the thread reads them; past that it
/// drops them (counted in [`PathStats::line_drops`]: the line did not keep up).
const LINE_QUEUE: &str = "1000";

/// A long, slow path between two hosts, as across a WAN: namespaces "tx" and "rx", each
/// joined by a veth pair to a third, "mid", that routes between them. The router limits
/// each direction to `mbit` megabits per second (a token bucket on its own egress toward
/// each host, queueing about one bandwidth-delay product, so TCP sees a slow path and not
/// a slow interface of its own), and delays every packet by half the round-trip time: it
/// routes what arrives from one host into a TUN device (policy routing by input interface),
/// where a thread of this process reads it, holds it until it is due, and writes it back
/// into the same device, from where the router forwards it on to the other host. Offloads
/// are off on every veth end, so packets are MTU-sized (1500 bytes) end to end, as on a
/// real path.
///
/// The delay line costs two system calls per packet, and its write carries the packet
/// through the router and the receiving host's stack on this process's CPU (about 20 µs a
/// packet on a 2-core VM, where it emulates about 420 Mbit/s at most): it limits the rate
/// a machine can emulate; [`Path::stats`] tells whether it kept up.
///
/// Dropping the path kills every process still running in its namespaces, stops the delay
/// line and deletes the namespaces.
pub struct Path {
    pub tx_ns: String,
    pub mid_ns: String,
    pub rx_ns: String,
    pub tx_addr: Ipv4Addr,
    pub rx_addr: Ipv4Addr,
    /// The rate of each direction, in megabits per second.
    pub mbit: u32,
    /// The round-trip time the delay line adds, in milliseconds.
    pub rtt_ms: u32,
    servers: AtomicU16,
    stop: Arc<AtomicBool>,
    lines: Vec<JoinHandle<()>>,
    counters: Arc<LineCounters>,
}

/// What the delay line of a [`Path`] did so far, both directions together.
#[derive(Clone, Copy, Debug)]
pub struct PathStats {
    /// Packets delayed and passed on.
    pub packets: u64,
    /// Packets passed on more than a millisecond after they were due.
    pub late_packets: u64,
    /// The latest a packet was passed on after it was due.
    pub worst_late: Duration,
    /// Packets dropped before the delay line read them (its queue was full: the line did
    /// not keep up with the traffic).
    pub line_drops: u64,
    /// Packets dropped by the rate limit (its queue was full: congestion, as on a real path).
    pub queue_drops: u64,
    /// Bytes the router sent on to rx: whole packets (IP and Ethernet headers too), as the
    /// rate limit counts them.
    pub to_rx_bytes: u64,
}

#[derive(Default)]
struct LineCounters {
    packets: AtomicU64,
    late_packets: AtomicU64,
    worst_late_us: AtomicU64,
}

impl Path {
    /// Creates the three namespaces, the router's limits and the delay line: `mbit`
    /// megabits per second each way, `rtt_ms` milliseconds of round trip. Panics if not
    /// root, or if iproute2, ethtool or the TUN device is missing.
    pub fn new(mbit: u32, rtt_ms: u32) -> Path {
        require_root("Path::new");
        assert!(mbit > 0, "Path::new needs a rate above 0");
        let (ip, tc) = (ip(), tool("tc", "iproute2"));
        let ethtool = tool("ethtool", "ethtool");
        let _creating = CREATING.lock().unwrap_or_else(|e| e.into_inner());
        remove_stale_namespaces();
        let pid = std::process::id();
        // As for a link: 10.(200 + pid % 50).n.0/24, halved: tx .1 and the router .2 in
        // the lower /25, the router .129 and rx .130 in the upper one.
        let (name, (a, b)) = loop {
            let n = NEXT_LINK.fetch_add(1, Ordering::Relaxed);
            let name = format!("{PREFIX}{pid}-{n}");
            let subnet = (200 + (pid % 50) as u8, (n % 256) as u8);
            let taken = ["tx", "mid", "rx"].iter().any(|end| {
                path::Path::new("/run/netns")
                    .join(format!("{name}-{end}"))
                    .exists()
            });
            if !taken && !host_uses_subnet(subnet.0, subnet.1) {
                break (name, subnet);
            }
            assert!(n < 100_000, "no free namespace name or subnet");
        };
        let addr = |d| Ipv4Addr::new(10, a, b, d);
        // From here on, a panic drops the path and removes what was made.
        let mut path = Path {
            tx_ns: format!("{name}-tx"),
            mid_ns: format!("{name}-mid"),
            rx_ns: format!("{name}-rx"),
            tx_addr: addr(1),
            rx_addr: addr(130),
            mbit,
            rtt_ms,
            servers: AtomicU16::new(0),
            stop: Arc::new(AtomicBool::new(false)),
            lines: Vec::new(),
            counters: Arc::new(LineCounters::default()),
        };
        let (tx, mid, rx) = (&path.tx_ns, &path.mid_ns, &path.rx_ns);
        for ns in [tx, mid, rx] {
            run(Command::new(&ip).args(["netns", "add", ns]));
        }
        // The router forwards, and checks no packet's source against its routes: the delay
        // line's come back in on a TUN device, not on the interface toward their source.
        in_namespace(mid, || {
            for (key, value) in [
                ("ipv4/ip_forward", "1"),
                ("ipv4/conf/all/rp_filter", "0"),
                ("ipv4/conf/default/rp_filter", "0"),
            ] {
                fs::write(format!("/proc/sys/net/{key}"), value)
                    .unwrap_or_else(|e| panic!("cannot set {key} in {mid}: {e}"));
            }
        });
        let ends = [
            (tx, TX_DEV, addr(1), mid, MID_TX_DEV, addr(2)),
            (rx, RX_DEV, addr(130), mid, MID_RX_DEV, addr(129)),
        ];
        for (host, host_dev, host_addr, mid, mid_dev, mid_addr) in ends {
            run(Command::new(&ip).args([
                "link", "add", host_dev, "netns", host, "type", "veth", "peer", "name", mid_dev,
                "netns", mid,
            ]));
            for (ns, dev, addr) in [(host, host_dev, host_addr), (mid, mid_dev, mid_addr)] {
                run(Command::new(&ip).args([
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/25"),
                    "dev",
                    dev,
                ]));
                run(Command::new(&ip).args(["-n", ns, "link", "set", "lo", "up"]));
                run(Command::new(&ip).args(["-n", ns, "link", "set", dev, "up"]));
                run(Link::exec(ns, &ethtool)
                    .args(["-K", dev, "gro", "off", "tso", "off", "gso", "off"]));
            }
        }
        // Each host reaches the other's half through the router.
        run(Command::new(&ip).args([
            "-n",
            tx,
            "route",
            "add",
            &format!("{}/25", addr(128)),
            "via",
            &addr(2).to_string(),
        ]));
        run(Command::new(&ip).args([
            "-n",
            rx,
            "route",
            "add",
            &format!("{}/25", addr(0)),
            "via",
            &addr(129).to_string(),
        ]));

        // The delay line: a TUN device per direction, made in the router by this process
        // (it lives as long as the file), fed by policy routing on the input interface.
        // What the thread writes back comes in on the TUN device, which no rule names: the
        // main table forwards it to the other host.
        let tuns = in_namespace(mid, || [open_tun(DELAY_TO_RX), open_tun(DELAY_TO_TX)]);
        for (from, tun, table) in [
            (MID_TX_DEV, DELAY_TO_RX, TABLE_TO_RX),
            (MID_RX_DEV, DELAY_TO_TX, TABLE_TO_TX),
        ] {
            run(Command::new(&ip).args(["-n", mid, "link", "set", tun, "up"]));
            run(Link::exec(mid, &tc).args([
                "qdisc", "replace", "dev", tun, "root", "pfifo", "limit", LINE_QUEUE,
            ]));
            run(Command::new(&ip).args(["-n", mid, "rule", "add", "iif", from, "table", table]));
            run(Command::new(&ip).args([
                "-n", mid, "route", "add", "default", "dev", tun, "table", table,
            ]));
        }
        // The rate limit, on the router's egress toward each host. Two milliseconds' worth
        // of bucket (a few packets at least) absorbs the timer's lateness; the queue holds
        // about one bandwidth-delay product (a few dozen packets at least).
        let bytes_per_sec = u64::from(mbit) * 1_000_000 / 8;
        let burst = (bytes_per_sec / 500).max(16 * 1024);
        let limit = (bytes_per_sec * u64::from(rtt_ms) / 1000).max(64 * 1024);
        for dev in [MID_TX_DEV, MID_RX_DEV] {
            run(Link::exec(mid, &tc).args([
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                &burst.to_string(),
                "limit",
                &limit.to_string(),
            ]));
        }
        let delay = Duration::from_micros(u64::from(rtt_ms) * 500);
        for tun in tuns {
            path.lines.push(delay_line(
                tun,
                delay,
                path.stop.clone(),
                path.counters.clone(),
            ));
        }
        path
    }

    /// A command running `program` in the tx namespace (`ip netns exec`, which execs it: the
    /// child's pid is the program's); add its arguments.
    pub fn tx(&self, program: impl AsRef<OsStr>) -> Command {
        Link::exec(&self.tx_ns, program)
    }

    /// A command running `program` in the rx namespace; add its arguments.
    pub fn rx(&self, program: impl AsRef<OsStr>) -> Command {
        Link::exec(&self.rx_ns, program)
    }

    /// Runs `f` on a thread inside the tx namespace (see [`Link::in_tx`]).
    pub fn in_tx<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_namespace(&self.tx_ns, f)
    }

    /// Runs `f` on a thread inside the rx namespace (see [`Link::in_tx`]).
    pub fn in_rx<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_namespace(&self.rx_ns, f)
    }

    /// What the delay line and the rate limit did so far.
    pub fn stats(&self) -> PathStats {
        let c = &self.counters;
        let [to_rx_line, to_tx_line, to_tx, to_rx] =
            [DELAY_TO_RX, DELAY_TO_TX, MID_TX_DEV, MID_RX_DEV].map(|dev| self.qdisc(dev));
        PathStats {
            packets: c.packets.load(Ordering::Relaxed),
            late_packets: c.late_packets.load(Ordering::Relaxed),
            worst_late: Duration::from_micros(c.worst_late_us.load(Ordering::Relaxed)),
            line_drops: to_rx_line.1 + to_tx_line.1,
            queue_drops: to_tx.1 + to_rx.1,
            to_rx_bytes: to_rx.0,
        }
    }

    /// The bytes the router's queue on a device sent and the packets it dropped (`tc -s`:
    /// "Sent N bytes M pkt (dropped D, ...").
    fn qdisc(&self, dev: &str) -> (u64, u64) {
        let tc = tool("tc", "iproute2");
        let out = run(Link::exec(&self.mid_ns, &tc).args(["-s", "qdisc", "show", "dev", dev]));
        let text = String::from_utf8_lossy(&out.stdout);
        let number = |after: &str| -> u64 {
            text.split(after)
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        (number(" Sent "), number("(dropped "))
    }
}

impl Hosts for Path {
    fn tx(&self, program: impl AsRef<OsStr>) -> Command {
        Path::tx(self, program)
    }

    fn rx(&self, program: impl AsRef<OsStr>) -> Command {
        Path::rx(self, program)
    }

    fn rx_addr(&self) -> Ipv4Addr {
        self.rx_addr
    }

    fn sshd_port(&self) -> u16 {
        sshd_port(self.servers.fetch_add(1, Ordering::Relaxed))
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        // The hosts first (their processes are killed: no more traffic), then the delay
        // line (its threads look at the stop flag every 100 ms at most), then the router,
        // whose TUN devices went with the line's files.
        for ns in [&self.tx_ns, &self.rx_ns] {
            if path::Path::new("/run/netns").join(ns).exists() {
                remove_namespace(ns);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        for line in self.lines.drain(..) {
            let _ = line.join();
        }
        if path::Path::new("/run/netns").join(&self.mid_ns).exists() {
            remove_namespace(&self.mid_ns);
        }
    }
}

/// Creates a TUN device (IP packets, no header before them) in the calling thread's
/// namespace; it is deleted when the file is closed.
fn open_tun(name: &str) -> fs::File {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap_or_else(|e| panic!("/dev/net/tun: {e} (the kernel needs TUN support)"));
    // struct ifreq: the name, then a union of which TUNSETIFF reads the flags.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    assert!(name.len() < libc::IFNAMSIZ, "{name}: too long for a device");
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(
        rc,
        0,
        "cannot create TUN device {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// How often the delay line wakes up while it holds packets: it then reads all those that
/// arrived since (waking up for each would cost more CPU than the packet itself), and
/// passes on those due within the same span. A packet's delay is thus exact within about
/// this much either way.
const TICK: Duration = Duration::from_micros(250);

/// One direction of the delay line, on a thread: takes each packet the router sends into
/// `tun`, holds it `delay`, then writes it back into `tun` (the router forwards it on). The
/// delay is the same for every packet, so the held ones are in due order. The thread ends
/// when `stop` is set (the packets it holds are lost, as on a cut wire).
fn delay_line(
    tun: fs::File,
    delay: Duration,
    stop: Arc<AtomicBool>,
    counters: Arc<LineCounters>,
) -> JoinHandle<()> {
    let fd = tun.as_raw_fd();
    // Non-blocking: the thread reads until the device's queue is empty.
    unsafe {
        libc::fcntl(
            fd,
            libc::F_SETFL,
            libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
        )
    };
    thread::spawn(move || {
        let mut held: std::collections::VecDeque<(Instant, Vec<u8>)> = Default::default();
        // Buffers of packets passed on, for the next ones.
        let mut free: Vec<Vec<u8>> = Vec::new();
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            loop {
                match (&tun).read(&mut buf) {
                    Ok(n) => {
                        let mut packet = free.pop().unwrap_or_default();
                        packet.clear();
                        packet.extend_from_slice(&buf[..n]);
                        held.push_back((Instant::now() + delay, packet));
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => return,
                }
            }
            let now = Instant::now();
            while let Some((due, _)) = held.front() {
                if *due > now + TICK / 2 {
                    break;
                }
                let (due, packet) = held.pop_front().unwrap();
                // A packet the kernel refuses is lost, as on a wire.
                let _ = (&tun).write(&packet);
                free.push(packet);
                let late = now.saturating_duration_since(due);
                counters.packets.fetch_add(1, Ordering::Relaxed);
                if late > Duration::from_millis(1) {
                    counters.late_packets.fetch_add(1, Ordering::Relaxed);
                }
                counters
                    .worst_late_us
                    .fetch_max(late.as_micros() as u64, Ordering::Relaxed);
            }
            if held.is_empty() {
                // Nothing held: sleep until a packet comes (or 100 ms, to see the stop flag).
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                unsafe { libc::poll(&mut pfd, 1, 100) };
            } else {
                thread::sleep(TICK);
            }
        }
    })
}

/// A real OpenSSH server (`/usr/sbin/sshd`) in the rx namespace of a [`Link`] or a [`Path`]
/// (any [`Hosts`]), listening on the rx address, with its own host key, a client key that logs in as root, and
/// its own configuration, all in a private temporary directory. Commands it runs get the
/// `PATH` of the test process (plus the system directories). Dropping it stops the server;
/// sessions still open are killed when the link is dropped.
pub struct Sshd {
    home: tempfile::TempDir,
    child: Child,
    host: Ipv4Addr,
    port: u16,
}

const SSH_HINT: &str = "openssh-server openssh-client";

impl Sshd {
    /// Starts the server and waits (10 s at most) until a client in the tx namespace logs in.
    pub fn start(link: &impl Hosts) -> Sshd {
        require_root("Sshd::start");
        let sshd = PathBuf::from("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "/usr/sbin/sshd is not installed; install it with: apt-get install -y {SSH_HINT} \
             (or run scripts/install-deps)"
        );
        let keygen = tool("ssh-keygen", "openssh-client");
        // The privilege separation directory: the standard path, left in place afterwards.
        fs::create_dir_all("/run/sshd").expect("cannot create /run/sshd");
        let home = tempfile::Builder::new()
            .prefix("sandbox-sshd-")
            .tempdir()
            .unwrap();
        let dir = home.path();
        assert!(
            !dir.to_string_lossy().contains(char::is_whitespace),
            "{} has whitespace: the ssh command line would not split",
            dir.display()
        );
        for key in ["host_key", "id_ed25519"] {
            run(Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "sandbox", "-f"])
                .arg(dir.join(key)));
        }
        fs::copy(dir.join("id_ed25519.pub"), dir.join("authorized_keys")).unwrap();
        let port = link.sshd_port();
        let mut path = std::env::var("PATH").unwrap_or_default();
        for system in [
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ] {
            if !path.split(':').any(|p| p == system) {
                if !path.is_empty() {
                    path.push(':');
                }
                path.push_str(system);
            }
        }
        let config = format!(
            "ListenAddress {host}:{port}\n\
             HostKey {dir}/host_key\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             StrictModes no\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UseDNS no\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             PermitUserRC no\n\
             MaxStartups 100\n\
             MaxSessions 100\n\
             LogLevel VERBOSE\n\
             SetEnv \"PATH={path}\"\n\
             Subsystem sftp internal-sftp\n",
            host = link.rx_addr(),
            dir = dir.display(),
        );
        fs::write(dir.join("sshd_config"), config).unwrap();
        let log = fs::File::create(dir.join("sshd.log")).unwrap();
        let mut cmd = link.rx(&sshd);
        cmd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        crate::die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("cannot start sshd");
        let mut server = Sshd {
            home,
            child,
            host: link.rx_addr(),
            port,
        };
        server.wait_ready(link);
        server
    }

    fn wait_ready(&mut self, link: &impl Hosts) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("sshd exited with {status} at start:\n{}", self.log());
            }
            let mut cmd = self.command(link);
            let out = cmd
                .args(["-o", "ConnectTimeout=2"])
                .arg(format!("root@{}", self.host))
                .arg("true")
                .stdin(Stdio::null())
                .output()
                .expect("cannot run ssh");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not let the client in within 10 s; ssh said:\n{}\nsshd log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The ssh command, arguments and all, run in the tx namespace.
    fn command(&self, link: &impl Hosts) -> Command {
        let line = self.ssh_command();
        let mut words = line.split_whitespace();
        let mut cmd = link.tx(words.next().unwrap());
        cmd.args(words);
        cmd
    }

    /// The ssh client command line that logs in to this server, as one string to split on
    /// whitespace; append `root@HOST` and the remote command. It works in the tx namespace
    /// of its hosts only. It reads no ssh configuration file, offers only the test key,
    /// trusts the host key unseen and never prompts.
    pub fn ssh_command(&self) -> String {
        let ssh = tool("ssh", "openssh-client");
        format!(
            "{} -F /dev/null -i {} -o IdentitiesOnly=yes -p {} -o StrictHostKeyChecking=no \
             -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR",
            ssh.display(),
            self.home.path().join("id_ed25519").display(),
            self.port
        )
    }

    /// The server's address (the rx address of its hosts).
    pub fn host(&self) -> String {
        self.host.to_string()
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What sshd logged so far (its standard error).
    pub fn log(&self) -> String {
        fs::read_to_string(self.home.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay in this process: it listens on 127.0.0.1 (a free port) and forwards each
/// connection to a target, byte for byte, except one: in the client-to-server direction of
/// the first connection, the lowest bit of the byte at offset `flip_at` is inverted (if
/// that connection carries so many bytes). Later connections, and everything else, pass
/// intact. Dropping it stops accepting; connections already relayed go on until their ends
/// close them.
pub struct FlipRelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    flipped: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
}

/// The bit [`FlipRelay`] flips.
pub const FLIP_MASK: u8 = 0x01;

impl FlipRelay {
    /// Starts relaying to `target`. "The first connection" is the first one accepted, even
    /// if the target refused it (its client then sees the connection closed at once).
    pub fn start(target: SocketAddr, flip_at: u64) -> FlipRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind the relay");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flipped = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (stop, flipped, connections) = (stop.clone(), flipped.clone(), connections.clone());
            thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let first = connections.fetch_add(1, Ordering::SeqCst) == 0;
                    let Ok(server) = TcpStream::connect(target) else {
                        // The client sees the target's refusal as a closed connection.
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let flip = first.then(|| (flip_at, flipped.clone()));
                    pump(&client, &server, flip);
                    pump(&server, &client, None);
                }
            })
        };
        FlipRelay {
            addr,
            stop,
            flipped,
            connections,
            acceptor: Some(acceptor),
        }
    }

    /// Where the relay listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the bit was flipped (the first connection passed byte `flip_at`).
    pub fn flipped(&self) -> bool {
        self.flipped.load(Ordering::SeqCst)
    }

    /// How many connections the relay accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to` on a detached thread, flipping [`FLIP_MASK`] in the byte at the
/// given offset, then half-closes `to` (or closes both on an error).
fn pump(from: &TcpStream, to: &TcpStream, flip: Option<(u64, Arc<AtomicBool>)>) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            };
            if let Some((at, flipped)) = &flip {
                if (offset..offset + n as u64).contains(at) {
                    buf[(at - offset) as usize] ^= FLIP_MASK;
                    flipped.store(true, Ordering::SeqCst);
                }
            }
            offset += n as u64;
            if to.write_all(&buf[..n]).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Drop for FlipRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which sees the stop flag and returns, closing the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}
