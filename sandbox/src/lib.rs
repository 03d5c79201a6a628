//! Throwaway MariaDB servers with the RocksDB plugin, for the tests, the demo and the
//! benchmark. A [`Server`] lives in its own temporary directory, listens on a free port
//! and a private socket, and is shut down and removed when dropped (also when a test
//! panics). Missing server binaries are a loud failure naming the install command.

pub mod net;
pub mod s3;
pub mod workload;
pub mod zoo;

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use mysql::{Conn, OptsBuilder};

pub const INSTALL_HINT: &str =
    "apt-get install -y mariadb-server mariadb-plugin-rocksdb mariadb-backup";

/// Server options used for every sandbox: small caches, binary log on, RocksDB loaded.
const SERVER_ARGS: &[&str] = &[
    "--plugin-load-add=ha_rocksdb.so",
    "--binlog-format=ROW",
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=16M",
    "--rocksdb-block-cache-size=64M",
    "--skip-name-resolve",
    "--max-connections=300",
];

/// A running throwaway server.
pub struct Server {
    home: tempfile::TempDir,
    pub datadir: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
    extra: Vec<String>,
    child: Child,
}

/// Makes a child started by `cmd` die with the thread that starts it: a killed test
/// leaves no server, sshd or store behind.
pub fn die_with_parent(cmd: &mut Command) {
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Finds a server binary, or panics with the install command.
pub fn binary(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed; install the server with: {INSTALL_HINT}");
}

/// A binary of this workspace built beside the running example (`target/<profile>/NAME`).
pub fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --bins)",
        bin.display()
    );
    bin
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn private_tmpdir(home: &Path) -> PathBuf {
    let dir = home.join("tmp");
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Creates a fresh datadir and starts a server on it.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Like [`Server::start`], with extra server options (`--rocksdb-...=...`).
    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_split(extra, extra)
    }

    /// Like [`Server::start_with`], with options for the installation and others for the
    /// server's run (a datadir installed with InnoDB, run with `--skip-innodb`, say).
    pub fn start_split(install_extra: &[&str], extra: &[&str]) -> Server {
        let home = tempfile::Builder::new()
            .prefix("sandbox-")
            .tempdir()
            .unwrap();
        let datadir = home.path().join("data");
        let mut install = Command::new(binary("mariadb-install-db"));
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!(
                "--tmpdir={}",
                private_tmpdir(home.path()).display()
            ))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .args(SERVER_ARGS)
            .args(install_extra);
        if is_root() {
            install.arg("--user=root");
        }
        let out = install.output().expect("cannot run mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Server::launch(home, datadir, extra)
    }

    /// Starts a server on an existing datadir (a restored backup, say). Its RocksDB
    /// directory is the default `#rocksdb` unless `extra` says otherwise.
    pub fn start_on(datadir: &Path, extra: &[&str]) -> Server {
        let home = tempfile::Builder::new()
            .prefix("sandbox-")
            .tempdir()
            .unwrap();
        Server::launch(home, datadir.to_path_buf(), extra)
    }

    fn launch(home: tempfile::TempDir, datadir: PathBuf, extra: &[&str]) -> Server {
        let socket = home.path().join("mysqld.sock");
        let port = free_port();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = Server::spawn(home.path(), &datadir, &socket, port, &extra);
        let mut server = Server {
            home,
            datadir,
            socket,
            port,
            extra,
            child,
        };
        server.wait_ready();
        server
    }

    fn spawn(home: &Path, datadir: &Path, socket: &Path, port: u16, extra: &[String]) -> Child {
        let mut cmd = Command::new(binary("mariadbd"));
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--log-error={}", home.join("error.log").display()))
            .arg(format!("--pid-file={}", home.join("mysqld.pid").display()))
            .arg(format!("--log-bin={}", home.join("binlog").display()))
            .arg(format!("--server-id={port}"))
            // A shared tmpdir makes parallel servers collide on temporary table names.
            .arg(format!("--tmpdir={}", private_tmpdir(home).display()))
            .args(SERVER_ARGS)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            cmd.arg("--user=root");
        }
        die_with_parent(&mut cmd);
        cmd.spawn().expect("cannot start mariadbd")
    }

    /// Stops the server cleanly and starts it again on the same datadir, port and options
    /// (it opens a new binary log file).
    pub fn restart(&mut self) {
        self.shutdown();
        self.child = Server::spawn(
            self.home.path(),
            &self.datadir,
            &self.socket,
            self.port,
            &self.extra,
        );
        self.wait_ready();
    }

    /// The directory of the server's binary logs (`binlog.NNNNNN`).
    pub fn binlog_dir(&self) -> &Path {
        self.home.path()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "mariadbd exited with {status} at start:\n{}",
                    self.error_log()
                );
            }
            if self.socket.exists() && Conn::new(self.opts("root")).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not answer in 60 s:\n{}",
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Connection options for `user` (no password) over the socket.
    pub fn opts(&self, user: &str) -> OptsBuilder {
        OptsBuilder::new()
            .socket(Some(self.socket.to_str().unwrap()))
            .user(Some(user))
    }

    /// A new connection as root over the socket.
    pub fn conn(&self) -> Conn {
        Conn::new(self.opts("root")).expect("cannot connect to the sandbox server")
    }

    /// Runs statements as root, panicking on the first error of any of them (the mysql
    /// crate's `query_drop` loses errors of all but the first statement).
    pub fn exec(&self, sql: &str) {
        let mut conn = self.conn();
        let mut result = conn
            .query_iter(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        while let Some(set) = result.iter() {
            for row in set {
                row.unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        }
    }

    /// The first column of the first row of a query, as a string (NULL as "NULL").
    pub fn value(&self, sql: &str) -> String {
        let row: Option<mysql::Row> = self
            .conn()
            .query_first(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let row = row.unwrap_or_else(|| panic!("{sql}: no rows"));
        match row.as_ref(0) {
            Some(mysql::Value::NULL) | None => "NULL".into(),
            Some(v) => mysql::from_value::<String>(v.clone()),
        }
    }

    /// Every row of a query, each value as a string (NULL as "NULL").
    pub fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        let rows: Vec<mysql::Row> = self
            .conn()
            .query(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.into_iter()
            .map(|row| {
                row.unwrap()
                    .into_iter()
                    .map(|v| match v {
                        mysql::Value::NULL => "NULL".into(),
                        mysql::Value::Bytes(b) => String::from_utf8_lossy(&b).into_owned(),
                        other => other.as_sql(true),
                    })
                    .collect()
            })
            .collect()
    }

    /// `CHECKSUM TABLE` and row count of every base table of `db`, by table name.
    pub fn checksums(&self, db: &str) -> BTreeMap<String, (u64, u64)> {
        let mut conn = self.conn();
        let tables: Vec<String> = conn
            .exec(
                "SELECT TABLE_NAME FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = ? AND TABLE_TYPE = 'BASE TABLE' ORDER BY 1",
                (db,),
            )
            .unwrap();
        tables
            .into_iter()
            .map(|t| {
                let name = format!("`{db}`.`{}`", t.replace('`', "``"));
                let sum: (String, Option<u64>) = conn
                    .query_first(format!("CHECKSUM TABLE {name}"))
                    .unwrap()
                    .unwrap();
                let count: u64 = conn
                    .query_first(format!("SELECT COUNT(*) FROM {name}"))
                    .unwrap()
                    .unwrap();
                (t, (sum.1.unwrap_or(0), count))
            })
            .collect()
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.home.path().join("error.log")).unwrap_or_default()
    }

    /// Lines of the error log that report errors (`[ERROR]`).
    pub fn logged_errors(&self) -> Vec<String> {
        self.error_log()
            .lines()
            .filter(|l| l.contains("[ERROR]"))
            .map(str::to_string)
            .collect()
    }

    /// Stops the server cleanly and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}
