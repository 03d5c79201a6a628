//! A throwaway S3 store: SeaweedFS's `weed mini` (master, volume server, filer and S3 gateway
//! in one process) in a temporary directory, on loopback only, with a fresh bucket and
//! generated credentials. [`S3::stop`] and [`S3::restart`] keep the data (the same
//! directory, the same ports), and dropping the sandbox stops it and removes everything.
//!
//! `weed` comes from `$WEED`, else from where `scripts/install-deps` puts it
//! (`${XDG_CACHE_HOME:-$HOME/.cache}/myrocks-hotbackup/seaweedfs/bin/weed`), else from
//! PATH; a missing `weed` is a loud failure naming the script, never a skipped test.
//!
//! `weed mini` listens on ten TCP ports: HTTP and gRPC of the master, the volume server,
//! the filer and the S3 gateway, and of the admin server (which it runs even with its UI
//! off: its maintenance workers dial it). All ten are chosen here, free on every address and
//! below the kernel's ephemeral range (so an outgoing connection cannot take one between a
//! stop and a restart), and bound to 127.0.0.1; the readiness check verifies that the
//! process listens on exactly these. WebDAV, Iceberg and Lance are off, telemetry is off.
//! The admin server's gRPC port must be its HTTP port + 10000: that is where the workers
//! dial, whatever `-admin.port.grpc` says. Besides its own Unix sockets (kept in the
//! directory), weed makes `/tmp/seaweedfs-<service>-grpc-<port>.sock` for its gRPC ports;
//! those of this sandbox's ports are removed when it stops.
//!
//! The child gets `PR_SET_PDEATHSIG`: it dies with the thread that started it (as the
//! MariaDB sandbox does), so start and use a sandbox on one thread.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const INSTALL_HINT: &str =
    "run scripts/install-deps (it installs SeaweedFS's weed), or set WEED to a weed binary";

/// Where `scripts/install-deps` installs `weed`, below the cache directory.
const INSTALLED_WEED: &str = "myrocks-hotbackup/seaweedfs/bin/weed";

/// How long a start or a restart may take until the store answers.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a stop waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// weed mini puts the admin server's gRPC port at its HTTP port + this, for its workers.
const ADMIN_GRPC_OFFSET: u16 = 10000;

/// Ports are chosen from here up to the kernel's ephemeral range.
const LOWEST_PORT: u16 = 10000;

/// Ports handed to the sandboxes of this process, so parallel tests never share one.
static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Finds `weed`: `$WEED`, else the install-deps location, else PATH; panics if absent.
pub fn weed() -> PathBuf {
    if let Some(path) = std::env::var_os("WEED").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "WEED={} is not a file; {INSTALL_HINT}",
            path.display()
        );
        return path;
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")),
    };
    if let Some(cache) = cache {
        let path = cache.join(INSTALLED_WEED);
        if path.is_file() {
            return path;
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let path = dir.join("weed");
        if path.is_file() {
            return path;
        }
    }
    panic!("SeaweedFS's weed is not installed (not in $WEED, the install-deps location or PATH); {INSTALL_HINT}");
}

/// A running (or stopped) throwaway S3 store.
pub struct S3 {
    /// `http://127.0.0.1:PORT`, path-style addressing.
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    dir: tempfile::TempDir,
    ports: Ports,
    child: Option<Child>,
}

/// The ten ports of one `weed mini`.
#[derive(Clone, Copy, Debug)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
    admin: u16,
}

impl Ports {
    fn admin_grpc(&self) -> u16 {
        self.admin + ADMIN_GRPC_OFFSET
    }

    fn all(&self) -> BTreeSet<u16> {
        [
            self.master,
            self.master_grpc,
            self.volume,
            self.volume_grpc,
            self.filer,
            self.filer_grpc,
            self.s3,
            self.s3_grpc,
            self.admin,
            self.admin_grpc(),
        ]
        .into_iter()
        .collect()
    }

    /// Picks ten ports free now and not handed out in this process, and marks them taken.
    fn pick() -> Ports {
        let top = ephemeral_start().max(LOWEST_PORT + 2 * ADMIN_GRPC_OFFSET);
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        let mut random = Random::new();
        let mut one = |taken: &mut BTreeSet<u16>, span_top: u16, offset: u16| -> u16 {
            for _ in 0..100_000 {
                let port = LOWEST_PORT + (random.next() % u64::from(span_top - LOWEST_PORT)) as u16;
                let pair = [port, port + offset];
                if pair.iter().all(|p| !taken.contains(p) && port_is_free(*p)) {
                    taken.extend(pair);
                    return port;
                }
            }
            panic!("no free ports between {LOWEST_PORT} and {top}");
        };
        Ports {
            master: one(&mut taken, top, 0),
            master_grpc: one(&mut taken, top, 0),
            volume: one(&mut taken, top, 0),
            volume_grpc: one(&mut taken, top, 0),
            filer: one(&mut taken, top, 0),
            filer_grpc: one(&mut taken, top, 0),
            s3: one(&mut taken, top, 0),
            s3_grpc: one(&mut taken, top, 0),
            admin: one(&mut taken, top - ADMIN_GRPC_OFFSET, ADMIN_GRPC_OFFSET),
        }
    }

    fn release(&self) {
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        for port in self.all() {
            taken.remove(&port);
        }
    }
}

/// The first port of the kernel's ephemeral range (outgoing connections take those).
fn ephemeral_start() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Free on loopback and on every address (weed checks both before it binds).
fn port_is_free(port: u16) -> bool {
    // One at a time: the first listener must be closed before the second binds.
    [Ipv4Addr::LOCALHOST, Ipv4Addr::UNSPECIFIED]
        .into_iter()
        .all(|ip| TcpListener::bind((ip, port)).is_ok())
}

/// Random numbers from the kernel (for ports, the bucket name and the credentials).
struct Random(File);

impl Random {
    fn new() -> Random {
        Random(File::open("/dev/urandom").expect("cannot open /dev/urandom"))
    }

    fn next(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.0.read_exact(&mut b).unwrap();
        u64::from_ne_bytes(b)
    }

    fn hex(&mut self, bytes: usize) -> String {
        let mut b = vec![0u8; bytes];
        self.0.read_exact(&mut b).unwrap();
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

/// Why a launch did not come up.
enum LaunchError {
    /// A port was taken by someone else meanwhile: worth another try on other ports.
    PortClash(String),
    Other(String),
}

impl S3 {
    /// Starts a fresh store with one empty bucket and waits until it answers.
    pub fn start() -> S3 {
        let weed = weed();
        let dir = tempfile::Builder::new()
            .prefix("s3-sandbox-")
            .tempdir()
            .unwrap();
        for sub in ["data", "log", "tmp", "config"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let mut random = Random::new();
        let bucket = format!("sandbox-{}", random.hex(6));
        let access_key = format!("SANDBOX{}", random.hex(8).to_uppercase());
        let secret_key = random.hex(20);
        let config = format!(
            r#"{{"identities":[{{"name":"sandbox","credentials":[{{"accessKey":"{access_key}","secretKey":"{secret_key}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.path().join("s3.json"))
            .and_then(|mut f| f.write_all(config.as_bytes()))
            .unwrap();
        let mut s3 = S3 {
            endpoint: String::new(),
            bucket,
            access_key,
            secret_key,
            region: "us-east-1".into(),
            dir,
            ports: Ports::pick(),
            child: None,
        };
        let mut attempt = 1;
        loop {
            s3.endpoint = format!("http://127.0.0.1:{}", s3.ports.s3);
            match s3.launch(&weed) {
                Ok(()) => return s3,
                Err(LaunchError::PortClash(why)) if attempt < 3 => {
                    // Another process took a port between the choice and weed's bind.
                    s3.kill_and_clean();
                    s3.note(&format!("{why}: starting again on other ports"));
                    let data = s3.dir.path().join("data");
                    fs::remove_dir_all(&data).unwrap();
                    fs::create_dir(&data).unwrap();
                    s3.ports.release();
                    s3.ports = Ports::pick();
                    attempt += 1;
                }
                Err(LaunchError::PortClash(why) | LaunchError::Other(why)) => {
                    s3.kill_and_clean();
                    panic!("weed mini did not come up: {why}\n{}", s3.log_tail());
                }
            }
        }
    }

    /// Stops the store (SIGTERM, SIGKILL after 10 s) and keeps its data.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
        self.remove_tmp_sockets();
    }

    /// Starts the store again on the same directory and ports (the data is still there) and
    /// waits until it answers; stops it first if it runs.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(LaunchError::PortClash(why) | LaunchError::Other(why)) = self.launch(&weed()) {
            self.kill_and_clean();
            panic!(
                "weed mini did not come up again: {why}\n{}",
                self.log_tail()
            );
        }
    }

    /// The environment an AWS client needs to use this store.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", &self.endpoint),
            ("AWS_REGION", &self.region),
            ("AWS_ACCESS_KEY_ID", &self.access_key),
            ("AWS_SECRET_ACCESS_KEY", &self.secret_key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_start_matches('/'))
    }

    /// The last lines of weed's output and of its INFO log.
    pub fn log_tail(&self) -> String {
        let tail = |path: &Path| {
            let text = fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- {0}/weed.log (tail)\n{1}\n--- {0}/log/weed.INFO (tail)\n{2}",
            self.dir.path().display(),
            tail(&self.dir.path().join("weed.log")),
            tail(&self.dir.path().join("log/weed.INFO")),
        )
    }

    /// The TCP addresses the running weed process listens on (empty when stopped).
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.child
            .as_ref()
            .map(|c| listening_addresses(c.id()))
            .unwrap_or_default()
    }

    /// Appends a line of this sandbox's own to weed.log.
    fn note(&self, line: &str) {
        if let Ok(mut f) = OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.path().join("weed.log"))
        {
            let _ = writeln!(f, "--- sandbox: {line}");
        }
    }

    fn launch(&mut self, weed: &Path) -> Result<(), LaunchError> {
        let dir = self.dir.path();
        let p = self.ports;
        let log = OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join("weed.log"))
            .unwrap();
        let mut cmd = Command::new(weed);
        // Nothing of the caller's environment: weed reads AWS_ACCESS_KEY_ID and
        // AWS_SECRET_ACCESS_KEY (an extra identity), S3_BUCKET, WEED_* settings and looks for
        // configuration files in $HOME.
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir)
            .env("TMPDIR", dir.join("tmp"))
            .current_dir(dir)
            .arg(arg("-logdir=", dir.join("log")))
            .arg(arg("-config_dir=", dir.join("config")))
            .arg("mini")
            .arg(arg("-dir=", dir.join("data")))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args([
                "-master.telemetry=false",
                "-admin.ui=false",
                "-webdav=false",
            ])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-master.port.grpc={}", p.master_grpc))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-volume.port.grpc={}", p.volume_grpc))
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-filer.port.grpc={}", p.filer_grpc))
            .arg(format!("-s3.port={}", p.s3))
            .arg(format!("-s3.port.grpc={}", p.s3_grpc))
            .arg(format!("-admin.port={}", p.admin))
            .arg(format!("-admin.port.grpc={}", p.admin_grpc()))
            .arg(arg("-filer.localSocket=", dir.join("filer.sock")))
            .arg(arg("-s3.localSocket=", dir.join("s3.sock")))
            .arg(arg("-s3.config=", dir.join("s3.json")))
            .arg(format!("-bucket={}", self.bucket))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        crate::die_with_parent(&mut cmd);
        self.note(&format!("{cmd:?}"));
        self.child = Some(cmd.spawn().expect("cannot start weed"));
        self.wait_ready()
    }

    /// Waits until the process listens on exactly its ten ports, the S3 gateway answers an
    /// HTTP request and the filer has the bucket (weed creates it a moment after S3 is up).
    fn wait_ready(&mut self) -> Result<(), LaunchError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let expected = self.ports.all();
        let bucket_path = format!("/buckets/{}", self.bucket);
        let mut stray_before = None;
        loop {
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                let log = fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
                let why = format!("weed exited with {status}");
                return Err(
                    if log.contains("not available") || log.contains("address already in use") {
                        LaunchError::PortClash(why)
                    } else {
                        LaunchError::Other(why)
                    },
                );
            }
            let listening = listening_addresses(child.id());
            let stray = listening
                .iter()
                .find(|a| a.ip() != Ipv4Addr::LOCALHOST || !expected.contains(&a.port()))
                .copied();
            // weed moves a gRPC port it finds taken, so it is not one of ours any more. (At
            // its start it also listens for a moment on ports it checks: a stray counts when
            // it is still there at the next look.)
            if let Some(stray) = stray.filter(|s| stray_before == Some(*s)) {
                return Err(LaunchError::PortClash(format!(
                    "weed listens on {stray}, not only on 127.0.0.1 at {expected:?}"
                )));
            }
            stray_before = stray;
            let ports: BTreeSet<u16> = listening.iter().map(|a| a.port()).collect();
            if ports == expected
                && http_status(self.ports.s3, "GET", "/").is_some()
                && http_status(self.ports.filer, "HEAD", &bucket_path) == Some(200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LaunchError::Other(format!(
                    "no answer in {READY_TIMEOUT:?} (listening on {ports:?} of {expected:?})"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_and_clean(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.remove_tmp_sockets();
    }

    /// Removes the Unix sockets weed makes in /tmp for this sandbox's gRPC ports (call only
    /// when the process is gone).
    fn remove_tmp_sockets(&self) {
        let p = self.ports;
        for (service, port) in [
            ("master", p.master_grpc),
            ("volume", p.volume_grpc),
            ("filer", p.filer_grpc),
            ("s3", p.s3_grpc),
            ("admin", p.admin_grpc()),
        ] {
            let path = PathBuf::from(format!("/tmp/seaweedfs-{service}-grpc-{port}.sock"));
            if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.stop();
        self.ports.release();
    }
}

/// `-flag=PATH` as one argument.
fn arg(flag: &str, path: PathBuf) -> OsString {
    let mut s = OsString::from(flag);
    s.push(path);
    s
}

/// The status of one HTTP/1.1 request to 127.0.0.1:port, or None if nothing answers.
fn http_status(port: u16, method: &str, path: &str) -> Option<u16> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    if !words.next()?.starts_with("HTTP/1.") {
        return None;
    }
    words.next()?.parse().ok()
}

/// The TCP addresses a process listens on, from its file descriptors and /proc/net/tcp{,6}.
fn listening_addresses(pid: u32) -> Vec<SocketAddr> {
    let mut inodes = BTreeSet::new();
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let target = target.to_string_lossy();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            if let Some(addr) = parse_proc_address(f[1]) {
                out.push(addr);
            }
        }
    }
    out.sort();
    out
}

/// `0100007F:1F90` (the address as the kernel's 32-bit words in host order) to an address.
fn parse_proc_address(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<[u8; 4]> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::to_ne_bytes))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words.len() {
        1 => IpAddr::V4(Ipv4Addr::from(words[0])),
        4 => {
            let mut b = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(w);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}
