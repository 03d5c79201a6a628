//! Talking to the server: connecting, the preflight checks, and the few statements a
//! backup needs (checkpoints, BACKUP STAGE, binary log coordinates). Errors say what to do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Conn, OptsBuilder};
use serde::{Deserialize, Serialize};

use crate::credentials::{Credentials, Endpoint};
use crate::error::{Error, Result};

/// What the backup needs to know about the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    pub version: String,
    pub hostname: String,
    pub datadir: PathBuf,
    pub rocksdb_datadir: PathBuf,
    pub rocksdb_wal_dir: PathBuf,
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
];

pub struct Server {
    conn: Conn,
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
        let mut server = Server { conn };
        // Rounds send data for minutes without a query: the connection must not time out.
        server.exec("SET SESSION wait_timeout = 31536000")?;
        Ok(server)
    }

    /// A BACKUP STAGE step, waiting at most `timeout` for running statements.
    pub fn backup_stage(&mut self, stage: &str, timeout: u64) -> Result<()> {
        self.exec(&format!("SET SESSION lock_wait_timeout = {timeout}"))?;
        let sql = format!("BACKUP STAGE {stage}");
        self.conn.query_drop(&sql).map_err(|e| match &e {
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

    fn fail(what: &str, e: mysql::Error) -> Error {
        Error::Server(format!("{what}: {e}"))
    }

    pub fn exec(&mut self, sql: &str) -> Result<()> {
        self.conn.query_drop(sql).map_err(|e| Server::fail(sql, e))
    }

    fn value(&mut self, sql: &str) -> Result<Option<String>> {
        let row: Option<Option<String>> = self
            .conn
            .query_first(sql)
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
        let granted: Vec<String> = self
            .conn
            .exec(
                "SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE IN (?, ?)",
                (grantee.as_str(), role.as_str()),
            )
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
        type Row = (String, String, String, String, Option<String>);
        let row: Option<Row> = self
            .conn
            .query_first(
                "SELECT @@version, @@hostname, @@datadir, @@rocksdb_datadir, @@rocksdb_wal_dir",
            )
            .map_err(|e| Server::fail("reading server variables", e))?;
        let (version, hostname, datadir, rocksdb_datadir, wal_dir) =
            row.ok_or_else(|| Error::Server("the server returned no variables".into()))?;
        let datadir = PathBuf::from(datadir);
        let rocksdb_datadir = datadir.join(rocksdb_datadir);
        let rocksdb_wal_dir = match wal_dir.filter(|w| !w.is_empty()) {
            Some(w) => datadir.join(w),
            None => rocksdb_datadir.clone(),
        };
        Ok(ServerInfo {
            version,
            hostname,
            datadir: normalize(&datadir),
            rocksdb_datadir: normalize(&rocksdb_datadir),
            rocksdb_wal_dir: normalize(&rocksdb_wal_dir),
        })
    }

    /// Creates a RocksDB checkpoint (the server flushes its memtables first).
    pub fn create_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let sql = format!(
            "SET GLOBAL rocksdb_create_checkpoint = {}",
            quote(&dir.to_string_lossy())
        );
        self.exec(&sql)
    }

    /// Flushes RocksDB's memtables, so that a checkpoint right after has little to flush.
    pub fn flush_memtables(&mut self) -> Result<()> {
        self.exec("SET GLOBAL rocksdb_force_flush_memtable_now = 1")
    }

    /// `SHOW CREATE TABLE` of `db`.`table`.
    pub fn create_table_sql(&mut self, db: &str, table: &str) -> Result<String> {
        let sql = format!("SHOW CREATE TABLE `{db}`.`{table}`");
        let row: Option<(String, String)> = self
            .conn
            .query_first(&sql)
            .map_err(|e| Server::fail(&sql, e))?;
        Ok(row.map(|(_, create)| create).unwrap_or_default())
    }

    /// The binary log position, or None when the binary log is off.
    pub fn binlog_position(&mut self) -> Result<Option<BinlogPosition>> {
        let status: Option<mysql::Row> = self
            .conn
            .query_first("SHOW MASTER STATUS")
            .map_err(|e| Server::fail("SHOW MASTER STATUS", e))?;
        let Some(row) = status else { return Ok(None) };
        let (file, position): (String, u64) = (
            row.get(0)
                .ok_or_else(|| Error::Server("SHOW MASTER STATUS: no file".into()))?,
            row.get(1)
                .ok_or_else(|| Error::Server("SHOW MASTER STATUS: no position".into()))?,
        );
        let gtids: Option<(String, String)> = self
            .conn
            .query_first("SELECT @@gtid_binlog_pos, @@gtid_current_pos")
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

/// A single-quoted SQL string literal.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Removes `.` components and trailing slashes (the server reports `/var/lib/mysql/./#rocksdb`).
fn normalize(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}
