//! Networks for the tests: a [`Link`] is two private network namespaces ("hosts") joined
//! by a veth pair, which a test can cut silently and mend (established TCP connections
//! survive), or throttle; an [`Sshd`] is a real OpenSSH server on the far host of a link,
//! with its own keys and configuration; a [`FlipRelay`] is a TCP relay that corrupts one
//! bit of the first connection it relays. Everything is removed when dropped (also when a
//! test panics); only namespaces, processes and files the harness made are ever touched.
//!
//! Links need root and iproute2, cutting one needs nftables, and the server needs OpenSSH:
//! their absence is a loud failure naming the install command (`scripts/install-deps`
//! installs them all).

use std::ffi::OsStr;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The names of the veth ends, inside the tx and the rx namespace.
pub const TX_DEV: &str = "mhb-tx";
pub const RX_DEV: &str = "mhb-rx";

/// Namespaces are named `mhb-<pid>-<n>-tx` and `mhb-<pid>-<n>-rx`.
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
        let p = Path::new(dir).join(name);
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
    Path::new(&format!("/proc/{pid}")).exists()
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
            && (parts[2] == "tx" || parts[2] == "rx");
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
                .any(|ns| Path::new("/run/netns").join(ns).exists());
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

impl Default for Link {
    fn default() -> Link {
        Link::new()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.tx_ns, &self.rx_ns] {
            if Path::new("/run/netns").join(ns).exists() {
                remove_namespace(ns);
            }
        }
    }
}

/// A real OpenSSH server (`/usr/sbin/sshd`) in the rx namespace of a [`Link`], listening
/// on the link's rx address, with its own host key, a client key that logs in as root, and
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
    pub fn start(link: &Link) -> Sshd {
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
        let port = match link.servers.fetch_add(1, Ordering::Relaxed) {
            0 => 22,
            k => 2200 + k,
        };
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
            host = link.rx_addr,
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
        // If the test process dies, the server dies with it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("cannot start sshd");
        let mut server = Sshd {
            home,
            child,
            host: link.rx_addr,
            port,
        };
        server.wait_ready(link);
        server
    }

    fn wait_ready(&mut self, link: &Link) {
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
    fn command(&self, link: &Link) -> Command {
        let line = self.ssh_command();
        let mut words = line.split_whitespace();
        let mut cmd = link.tx(words.next().unwrap());
        cmd.args(words);
        cmd
    }

    /// The ssh client command line that logs in to this server, as one string to split on
    /// whitespace; append `root@HOST` and the remote command. It works in the link's tx
    /// namespace only. It reads no ssh configuration file, offers only the test key,
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

    /// The server's address (the link's rx address).
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
