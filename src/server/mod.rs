//! Talking to the server: connecting, the preflight checks, and the few statements a
//! backup needs (checkpoints, BACKUP STAGE, binary log coordinates). Errors say what to do.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Conn, OptsBuilder};
use serde::{Deserialize, Serialize};

pub mod credentials;

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::format::logical::ident;
use crate::server::credentials::{Credentials, Endpoint};
use crate::{info, warn};

/// What the backup needs to know about the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    pub version: String,
    pub hostname: String,
    /// `@@port`: where a replica of the restored copy connects.
    #[serde(default)]
    pub port: Option<u16>,
    pub datadir: PathBuf,
    pub rocksdb_datadir: PathBuf,
    pub rocksdb_wal_dir: PathBuf,
    /// Where the Aria log lives (`@@aria_log_dir_path`).
    pub aria_log_dir: PathBuf,
    /// False on a server running without InnoDB (`--skip-innodb`).
    pub innodb: bool,
    /// `@@rocksdb_manual_wal_flush`: RocksDB may hold WAL records in memory.
    #[serde(default)]
    pub rocksdb_manual_wal_flush: bool,
    /// `@@global.rocksdb_write_disable_wal`: writes may bypass the WAL.
    #[serde(default)]
    pub rocksdb_write_disable_wal: bool,
}

/// Where a replica stood at the consistent point, for a copy to resume replication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// `@@gtid_slave_pos`: the GTID position the copy resumes from.
    pub gtid_slave_pos: String,
    /// Each replication connection (`SHOW ALL SLAVES STATUS`).
    pub connections: Vec<ReplicaConnection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaConnection {
    /// Empty for the default connection.
    pub name: String,
    pub master_host: String,
    pub master_port: u16,
    /// The source's binary log coordinates of the last transaction applied.
    pub relay_master_log_file: String,
    pub exec_master_log_pos: u64,
    /// `No`, `Slave_Pos` or `Current_Pos`.
    pub using_gtid: String,
}

/// Binary log coordinates of the backup's consistent point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinlogPosition {
    pub file: String,
    pub position: u64,
    /// `@@gtid_binlog_pos`: the GTID position to start a replica from.
    pub gtid_binlog_pos: String,
    pub gtid_current_pos: String,
}

/// Global privileges a backup needs, with why.
const PRIVILEGES: &[(&[&str], &str)] = &[
    (&["RELOAD"], "BACKUP STAGE"),
    (&["SUPER"], "creating RocksDB checkpoints"),
    (
        &["BINLOG MONITOR", "REPLICATION CLIENT", "SUPER"],
        "reading the binary log position",
    ),
    (
        &["SELECT", "SELECT ON mysql"],
        "reading the replication state and table definitions in the mysql schema",
    ),
];

pub struct Server {
    conn: Conn,
    guard: Arc<Guard>,
    /// A BACKUP STAGE is held by this connection.
    in_stage: bool,
}

/// Whether a statement is in flight on the connection, and whether a signal killed it.
#[derive(Default)]
struct Guard {
    in_statement: AtomicBool,
    killed: AtomicBool,
}

/// The thread that interrupts blocked statements on a signal; stopped when dropped.
pub struct Watcher {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Server {
    pub fn connect(creds: &Credentials) -> Result<Server> {
        let opts = OptsBuilder::new()
            .user(Some(&creds.user))
            .pass(creds.password.as_deref())
            .tcp_connect_timeout(Some(Duration::from_secs(10)));
        let opts = match &creds.endpoint {
            Endpoint::Socket(path) => opts.socket(Some(path.to_string_lossy())),
            // prefer_socket would silently switch a TCP request to a local socket.
            Endpoint::Tcp { host, port } => opts
                .ip_or_hostname(Some(host))
                .tcp_port(*port)
                .prefer_socket(false),
        };
        let conn = Conn::new(opts).map_err(|e| match &e {
            mysql::Error::MySqlError(me) if me.code == 1045 || me.code == 1698 => Error::Server(format!(
                "access denied for user {:?} at {}: check --user and --password, MYSQL_PWD or the option files",
                creds.user, creds.endpoint
            )),
            _ => Error::Server(format!(
                "cannot connect to the server at {}: {e}",
                creds.endpoint
            )),
        })?;
        let mut server = Server {
            conn,
            guard: Arc::new(Guard::default()),
            in_stage: false,
        };
        // Rounds send data for minutes without a query: the connection must not time out;
        // no server-wide statement limit may cut a BACKUP STAGE or checkpoint short; and
        // SHOW CREATE TABLE must quote with backticks whatever the server's sql_mode (the
        // restore's bootstrap reads it with the default mode).
        server
            .exec("SET SESSION wait_timeout = 31536000, max_statement_time = 0, sql_mode = ''")?;
        Ok(server)
    }

    /// Makes a signal take effect even while a statement is blocked on the server (a
    /// BACKUP STAGE waiting behind a long lock, say): a watcher thread sees `cancel` and
    /// runs `KILL QUERY` on this connection from a second one. Stops when dropped.
    pub fn interrupt_on(&mut self, cancel: &Cancel, creds: &Credentials) -> Result<Watcher> {
        let id: u64 = self
            .guarded(|c| c.query_first("SELECT CONNECTION_ID()"))
            .map_err(|e| Server::fail("SELECT CONNECTION_ID()", e))?
            .unwrap_or_default();
        let (guard, cancel, creds) = (self.guard.clone(), cancel.clone(), creds.clone());
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let thread = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if cancel.check().is_err()
                    && guard.in_statement.load(Ordering::SeqCst)
                    && !guard.killed.swap(true, Ordering::SeqCst)
                {
                    match Server::connect(&creds)
                        .and_then(|mut s| s.exec(&format!("KILL QUERY {id}")))
                    {
                        Ok(()) => info!(
                            "Interrupted the statement the server was running for this backup"
                        ),
                        Err(e) => warn!("Could not interrupt the running statement: {e}"),
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Ok(Watcher {
            done,
            thread: Some(thread),
        })
    }

    /// Runs `f` with the statement marked as in flight (a signal may then kill it).
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Conn) -> mysql::Result<T>) -> mysql::Result<T> {
        self.guard.in_statement.store(true, Ordering::SeqCst);
        let result = f(&mut self.conn);
        self.guard.in_statement.store(false, Ordering::SeqCst);
        result
    }

    /// A BACKUP STAGE step, waiting at most `timeout` for running statements.
    pub fn backup_stage(&mut self, stage: &str, timeout: u64) -> Result<()> {
        self.exec(&format!("SET SESSION lock_wait_timeout = {timeout}"))?;
        let sql = format!("BACKUP STAGE {stage}");
        let done = self.guarded(|c| c.query_drop(&sql));
        match stage {
            "START" => self.in_stage = done.is_ok(),
            "END" => self.in_stage &= done.is_err(),
            _ => {}
        }
        done.map_err(|e| match &e {
            mysql::Error::MySqlError(me) if me.code == 1205 => Error::Server(format!(
                "{sql} waited {timeout} s for running statements (a long DDL, LOCK TABLES, a stuck \
                 transaction?) and gave up. Retry when they are done{}",
                if stage == "BLOCK_COMMIT" {
                    " (while commits are blocked the wait is capped at 10 s)"
                } else {
                    ", or raise --lock-wait-timeout"
                }
            )),
            _ => Server::fail(&sql, e),
        })
    }

    /// Ends the backup stage after a failure or a signal, if one is held. The watcher must
    /// not kill this statement too; if it fails, closing the connection releases the stage.
    pub fn release_stage(&mut self) {
        if !self.in_stage {
            return;
        }
        self.guard.killed.store(true, Ordering::SeqCst);
        if let Err(e) = self.backup_stage("END", 60) {
            warn!("{e}; the stage is released when the connection closes");
        }
    }

    fn fail(what: &str, e: mysql::Error) -> Error {
        Error::Server(format!("{what}: {e}"))
    }

    pub fn exec(&mut self, sql: &str) -> Result<()> {
        self.guarded(|c| c.query_drop(sql))
            .map_err(|e| Server::fail(sql, e))
    }

    /// The rows of a query, each read as `T`.
    pub fn rows<T: mysql::prelude::FromRow>(
        &mut self,
        sql: &str,
        params: impl Into<mysql::Params>,
    ) -> Result<Vec<T>> {
        self.guarded(|c| c.exec(sql, params))
            .map_err(|e| Server::fail(sql, e))
    }

    /// Streams the rows of a query to `f`, as values of their types (the binary protocol).
    /// When `f` fails the rest of the result is not read: the connection is left unusable.
    pub fn for_each_row(
        &mut self,
        sql: &str,
        mut f: impl FnMut(&[mysql::Column], &[mysql::Value]) -> Result<()>,
    ) -> Result<()> {
        let mut failed = None;
        let read = self.guarded(|c| {
            let mut result = c.exec_iter(sql, ())?;
            for row in result.by_ref() {
                let row = row?;
                let columns = row.columns();
                if let Err(e) = f(&columns, &row.unwrap()) {
                    failed = Some(e);
                    // Dropping the result would read every remaining row first.
                    std::mem::forget(result);
                    break;
                }
            }
            Ok(())
        });
        match failed {
            Some(e) => Err(e),
            None => read.map_err(|e| Server::fail(sql, e)),
        }
    }

    fn value(&mut self, sql: &str) -> Result<Option<String>> {
        let row: Option<Option<String>> = self
            .guarded(|c| c.query_first(sql))
            .map_err(|e| Server::fail(sql, e))?;
        Ok(row.flatten())
    }

    /// Refuses a server without an active RocksDB engine.
    pub fn check_rocksdb(&mut self) -> Result<()> {
        let status = self.value(
            "SELECT PLUGIN_STATUS FROM information_schema.PLUGINS WHERE PLUGIN_NAME = 'ROCKSDB'",
        )?;
        match status.as_deref() {
            Some("ACTIVE") => Ok(()),
            Some(other) => Err(Error::Server(format!("the RocksDB plugin is {other}, not ACTIVE"))),
            None => Err(Error::Server(
                "the RocksDB plugin is not loaded on this server (INSTALL SONAME 'ha_rocksdb', \
                 or plugin-load-add=ha_rocksdb.so in its configuration): there is no MyRocks data to back up"
                    .into(),
            )),
        }
    }

    /// Refuses a user that lacks a privilege the backup needs, naming all that are missing.
    pub fn check_privileges(&mut self) -> Result<()> {
        let current = self.value("SELECT CURRENT_USER()")?.unwrap_or_default();
        let (user, host) = current.rsplit_once('@').unwrap_or((&current, "%"));
        let grantee = format!("'{user}'@'{host}'");
        // Privileges of the user and of its current role (shown as 'role').
        let role = self
            .value("SELECT CURRENT_ROLE()")?
            .map(|r| format!("'{r}'"))
            .unwrap_or_default();
        // Global privileges, and SELECT on the mysql schema (as `SELECT ON mysql`).
        let granted: Vec<String> = self
            .guarded(|c| c.exec(
                "SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE IN (?, ?)
                 UNION SELECT CONCAT(PRIVILEGE_TYPE, ' ON mysql') FROM information_schema.SCHEMA_PRIVILEGES
                 WHERE GRANTEE IN (?, ?) AND TABLE_SCHEMA = 'mysql'",
                (grantee.as_str(), role.as_str(), grantee.as_str(), role.as_str()),
            ))
            .map_err(|e| Server::fail("reading privileges", e))?;
        let missing: Vec<String> = PRIVILEGES
            .iter()
            .filter(|(any_of, _)| !any_of.iter().any(|p| granted.iter().any(|g| g == p)))
            .map(|(any_of, why)| format!("{} (for {why})", any_of[0]))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = missing
            .iter()
            .map(|m| m.split(" (").next().unwrap())
            .collect();
        Err(Error::Server(format!(
            "user {current} lacks the privileges {}; grant them with: GRANT {} ON *.* TO {grantee}",
            missing.join(", "),
            names.join(", ")
        )))
    }

    pub fn info(&mut self) -> Result<ServerInfo> {
        type Row = (
            String,
            String,
            String,
            String,
            Option<String>,
            Option<String>,
        );
        let row: Option<Row> = self
            .guarded(|c| c.query_first(
                "SELECT @@version, @@hostname, @@datadir, @@rocksdb_datadir, @@rocksdb_wal_dir, @@aria_log_dir_path",
            ))
            .map_err(|e| Server::fail("reading server variables", e))?;
        let (version, hostname, datadir, rocksdb_datadir, wal_dir, aria_dir) =
            row.ok_or_else(|| Error::Server("the server returned no variables".into()))?;
        let datadir = PathBuf::from(datadir);
        let rocksdb_datadir = datadir.join(rocksdb_datadir);
        let rocksdb_wal_dir = match wal_dir.filter(|w| !w.is_empty()) {
            Some(w) => datadir.join(w),
            None => rocksdb_datadir.clone(),
        };
        let aria_log_dir = datadir.join(aria_dir.unwrap_or_default());
        let innodb = self.value(
            "SELECT SUPPORT IN ('YES', 'DEFAULT') FROM information_schema.ENGINES WHERE ENGINE = 'InnoDB'",
        )?;
        let port = self
            .value("SELECT @@port")?
            .and_then(|p| p.parse().ok())
            .filter(|&p: &u16| p > 0);
        // Unknown (an older plugin): assume the worst.
        let mut rocksdb_flag = |name: &str| -> Result<bool> {
            Ok(self
                .value(&format!(
                    "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_VARIABLES WHERE VARIABLE_NAME = '{name}'"
                ))?
                .is_none_or(|v| v != "OFF"))
        };
        let manual_wal_flush = rocksdb_flag("ROCKSDB_MANUAL_WAL_FLUSH")?;
        let write_disable_wal = rocksdb_flag("ROCKSDB_WRITE_DISABLE_WAL")?;
        Ok(ServerInfo {
            version,
            hostname,
            port,
            datadir: normalize(&datadir),
            rocksdb_datadir: normalize(&rocksdb_datadir),
            rocksdb_wal_dir: normalize(&rocksdb_wal_dir),
            aria_log_dir: normalize(&aria_log_dir),
            innodb: innodb.as_deref() == Some("1"),
            rocksdb_manual_wal_flush: manual_wal_flush,
            rocksdb_write_disable_wal: write_disable_wal,
        })
    }

    /// The replication state, or None when the server replicates from no source and has
    /// no replication position.
    pub fn replica_state(&mut self) -> Result<Option<ReplicaState>> {
        let rows: Vec<mysql::Row> = self
            .guarded(|c| c.query("SHOW ALL SLAVES STATUS"))
            .map_err(|e| Server::fail("SHOW ALL SLAVES STATUS", e))?;
        let text = |r: &mysql::Row, col: &str| -> String {
            r.get_opt::<String, _>(col)
                .and_then(|v| v.ok())
                .unwrap_or_default()
        };
        let connections: Vec<ReplicaConnection> = rows
            .iter()
            .map(|r| ReplicaConnection {
                name: text(r, "Connection_name"),
                master_host: text(r, "Master_Host"),
                master_port: text(r, "Master_Port").parse().unwrap_or(0),
                relay_master_log_file: text(r, "Relay_Master_Log_File"),
                exec_master_log_pos: text(r, "Exec_Master_Log_Pos").parse().unwrap_or(0),
                using_gtid: text(r, "Using_Gtid"),
            })
            .collect();
        let gtid_slave_pos = self.value("SELECT @@gtid_slave_pos")?.unwrap_or_default();
        if connections.is_empty() && gtid_slave_pos.is_empty() {
            return Ok(None);
        }
        Ok(Some(ReplicaState {
            gtid_slave_pos,
            connections,
        }))
    }

    /// Creates a RocksDB checkpoint (the server flushes its memtables first).
    pub fn create_checkpoint(&mut self, dir: &Path) -> Result<()> {
        // A parameter, not a literal: no quoting that depends on the sql_mode.
        let sql = "SET GLOBAL rocksdb_create_checkpoint = ?";
        let path = dir.to_string_lossy().into_owned();
        self.guarded(|c| c.exec_drop(sql, (path,)))
            .map_err(|e| Server::fail(&format!("creating checkpoint {}", dir.display()), e))
    }

    /// `SHOW CREATE TABLE` of `db`.`table`.
    pub fn create_table_sql(&mut self, db: &str, table: &str) -> Result<String> {
        self.show_create("TABLE", db, table)
    }

    /// `SHOW CREATE TABLE|SEQUENCE` of `db`.`name`.
    pub fn show_create(&mut self, what: &str, db: &str, name: &str) -> Result<String> {
        let sql = format!("SHOW CREATE {what} {}.{}", ident(db), ident(name));
        let row: Option<(String, String)> = self
            .guarded(|c| c.query_first(&sql))
            .map_err(|e| Server::fail(&sql, e))?;
        Ok(row.map(|(_, create)| create).unwrap_or_default())
    }

    /// The binary log position, or None when the binary log is off.
    pub fn binlog_position(&mut self) -> Result<Option<BinlogPosition>> {
        let status: Option<mysql::Row> = self
            .guarded(|c| c.query_first("SHOW MASTER STATUS"))
            .map_err(|e| Server::fail("SHOW MASTER STATUS", e))?;
        let Some(row) = status else { return Ok(None) };
        let (file, position): (String, u64) = (
            row.get(0)
                .ok_or_else(|| Error::Server("SHOW MASTER STATUS: no file".into()))?,
            row.get(1)
                .ok_or_else(|| Error::Server("SHOW MASTER STATUS: no position".into()))?,
        );
        let gtids: Option<(String, String)> = self
            .guarded(|c| c.query_first("SELECT @@gtid_binlog_pos, @@gtid_current_pos"))
            .map_err(|e| Server::fail("reading GTID positions", e))?;
        let (gtid_binlog_pos, gtid_current_pos) = gtids.unwrap_or_default();
        Ok(Some(BinlogPosition {
            file,
            position,
            gtid_binlog_pos,
            gtid_current_pos,
        }))
    }
}

/// Removes `.` components and trailing slashes (the server reports `/var/lib/mysql/./#rocksdb`).
fn normalize(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}
