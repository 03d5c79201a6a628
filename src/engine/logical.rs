//! The InnoDB user tables of a mixed server, copied logically from the consistent point.
//!
//! InnoDB's files cannot be copied hot without replaying its redo log (mariabackup's way);
//! its rows can be read from a snapshot instead. Under `BLOCK_DDL` the tables' definitions
//! and triggers are read ([`plan`]); under `BLOCK_COMMIT`, after the coordinates, each of a
//! few connections opened beforehand starts `START TRANSACTION WITH CONSISTENT SNAPSHOT`
//! ([`Snapshots::start`]): with commits blocked, every snapshot sees exactly the
//! transactions the RocksDB copy and the binary log coordinates hold, which the server
//! confirms (`binlog_snapshot_file` and `_position` equal the coordinates). After `END`
//! the connections read the tables, largest first, into compressed files in the run's
//! scratch directory ([`Snapshots::dump`]), while the RocksDB files are sent; the files
//! are then sent as any other.
//!
//! A table dropped or rebuilt between `END` and its reading fails the backup with the
//! server's error ("Table definition has changed"): holding metadata locks instead would
//! queue the DBA's DDL, and every query behind it, for the length of the copy.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::cancel::Cancel;
use crate::error::{Error, IoContext, Result};
use crate::format::layout::INNODB_DIR;
use crate::format::logical::{encode_value, ident, Logical, LogicalTable, Trigger};
use crate::log::human;
use crate::server::credentials::Credentials;
use crate::server::{BinlogPosition, Server, Watcher};
use crate::{info, warn};

/// Connections that read tables at once, at most.
const MAX_THREADS: usize = 4;
/// zstd level of the data files: level 3 took 60% of a reading thread's time on rows of
/// random bytes, level 1 is several times faster and still takes text to a third.
const ZSTD_LEVEL: i32 = 1;
/// InnoDB tables from this size on are named in a warning (see `plan`).
const LARGE_TABLE: u64 = 8 << 30;
/// Tables from this size on get a log line of their own.
const LOG_TABLE: u64 = 64 << 20;
/// Bytes of rows encoded before they are compressed and written.
const BATCH: usize = 1 << 20;

/// The InnoDB user tables with their definitions, read while DDL is blocked.
pub struct Plan {
    tables: Vec<LogicalTable>,
    triggers: Vec<Trigger>,
}

/// Reads the definitions of the InnoDB tables outside `mysql`, and their triggers.
pub fn plan(server: &mut Server) -> Result<Plan> {
    let listed: Vec<(String, String, String, Option<u64>)> = server.rows(
        "SELECT TABLE_SCHEMA, TABLE_NAME, TABLE_TYPE, DATA_LENGTH + INDEX_LENGTH FROM information_schema.TABLES
         WHERE ENGINE = 'InnoDB' AND TABLE_SCHEMA NOT IN ('mysql', 'information_schema', 'performance_schema')
         ORDER BY TABLE_SCHEMA, TABLE_NAME",
        (),
    )?;
    let versioned: Vec<String> = listed
        .iter()
        .filter(|(_, _, kind, _)| kind == "SYSTEM VERSIONED")
        .map(|(db, t, _, _)| format!("{db}.{t}"))
        .collect();
    if !versioned.is_empty() {
        return Err(Error::Refused(format!(
            "these InnoDB tables are system-versioned, whose history a logical copy cannot restore: {}. \
             Back the server up with mariabackup, or pass --skip-innodb-tables to leave the InnoDB tables out",
            versioned.join(", ")
        )));
    }
    let mut tables = Vec::new();
    let mut triggers = Vec::new();
    for (schema, name, kind, size) in listed {
        let sequence = kind == "SEQUENCE";
        let create =
            server.show_create(if sequence { "SEQUENCE" } else { "TABLE" }, &schema, &name)?;
        let columns: Vec<(String, String)> = server.rows(
            "SELECT COLUMN_NAME, IS_GENERATED FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (&schema, &name),
        )?;
        let names: Vec<(String,)> = server.rows(
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS
             WHERE EVENT_OBJECT_SCHEMA = ? AND EVENT_OBJECT_TABLE = ?
             ORDER BY EVENT_MANIPULATION, ACTION_TIMING, ACTION_ORDER",
            (&schema, &name),
        )?;
        for (trigger,) in names {
            let sql = format!("SHOW CREATE TRIGGER {}.{}", ident(&schema), ident(&trigger));
            let rows: Vec<mysql::Row> = server.rows(&sql, ())?;
            let row = rows
                .into_iter()
                .next()
                .ok_or_else(|| Error::Server(format!("{sql}: no such trigger")))?;
            let column = |name: &str| -> Result<String> {
                row.get_opt::<String, _>(name)
                    .and_then(|v| v.ok())
                    .ok_or_else(|| Error::Server(format!("{sql}: no column {name}")))
            };
            let (sql_mode, statement) = (column("sql_mode")?, column("SQL Original Statement")?);
            let character_set_client = column("character_set_client")?;
            let collation_connection = column("collation_connection")?;
            triggers.push(Trigger {
                schema: schema.clone(),
                name: trigger,
                sql_mode,
                character_set_client,
                collation_connection,
                statement,
            });
        }
        tables.push(LogicalTable {
            schema,
            name,
            create,
            sequence: None,
            columns: columns
                .into_iter()
                .filter(|(_, generated)| generated == "NEVER")
                .map(|(c, _)| c)
                .collect(),
            file: None,
            rows: 0,
            bytes: 0,
            crc32: 0,
            size_on_server: size.unwrap_or(0),
        });
        if sequence {
            tables.last_mut().unwrap().columns.clear();
        }
    }
    let large: Vec<String> = tables
        .iter()
        .filter(|t| t.size_on_server >= LARGE_TABLE)
        .map(|t| format!("{}.{} ({})", t.schema, t.name, human(t.size_on_server)))
        .collect();
    if !large.is_empty() {
        warn!(
            "InnoDB tables this large are read and loaded row by row, which takes longer than \
             copying their files: {}. Back up a server with this much InnoDB data with mariabackup, \
             or convert the tables to RocksDB",
            large.join(", ")
        );
    }
    Ok(Plan { tables, triggers })
}

impl Plan {
    pub fn len(&self) -> usize {
        self.tables.len()
    }
}

/// Connections opened before the consistent point, each to hold one snapshot.
pub struct Snapshots {
    conns: Vec<(Server, Watcher)>,
}

impl Snapshots {
    /// Opens the connections (`tables` InnoDB tables to read) and readies their sessions.
    pub fn connect(creds: &Credentials, tables: usize, cancel: &Cancel) -> Result<Snapshots> {
        let mut conns = Vec::new();
        for _ in 0..tables.clamp(1, MAX_THREADS) {
            let mut conn = Server::connect(creds)?;
            let watcher = conn.interrupt_on(cancel, creds)?;
            // Values as stored (no charset conversion), TIMESTAMPs in UTC, out of the
            // general log, and no server timeout while this side writes.
            conn.exec(
                "SET SESSION sql_log_off = 1, time_zone = '+00:00', character_set_results = binary, \
                 net_write_timeout = 3600, tx_isolation = 'REPEATABLE-READ'",
            )?;
            conns.push((conn, watcher));
        }
        Ok(Snapshots { conns })
    }

    /// Under `BLOCK_COMMIT`: every connection starts its snapshot.
    pub fn start(&mut self) -> Result<()> {
        for (conn, _) in &mut self.conns {
            conn.exec("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")?;
        }
        Ok(())
    }

    /// Refuses snapshots that do not stand at the backup's binary log coordinates.
    pub fn check(&mut self, binlog: Option<&BinlogPosition>) -> Result<()> {
        let Some(at) = binlog else { return Ok(()) };
        for (conn, _) in &mut self.conns {
            let status: Vec<(String, String)> =
                conn.rows("SHOW STATUS LIKE 'binlog_snapshot_%'", ())?;
            let value = |name: &str| {
                status
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_str())
                    .unwrap_or_default()
            };
            let (file, pos) = (
                value("binlog_snapshot_file"),
                value("binlog_snapshot_position"),
            );
            if file != at.file || pos != at.position.to_string() {
                return Err(Error::Server(format!(
                    "the InnoDB snapshot stands at {file}:{pos}, not at the backup's coordinates {}:{}: \
                     commits were not blocked when it started",
                    at.file, at.position
                )));
            }
        }
        Ok(())
    }

    /// Reads every table into a file in `dir`. Returns what the manifest records, and the
    /// files with their names in the backup. `space` is asked before each megabyte is written
    /// (the files sit on the server's filesystem); `stop` ends the reading early.
    pub fn dump(
        self,
        plan: Plan,
        dir: &Path,
        space: &(dyn Fn() -> Result<()> + Sync),
        stop: &AtomicBool,
    ) -> Result<(Logical, Vec<(String, PathBuf)>)> {
        let started = Instant::now();
        let threads = self.conns.len();
        let mut queue: Vec<(usize, LogicalTable)> = plan.tables.into_iter().enumerate().collect();
        // Largest last: popped first.
        queue.sort_by_key(|(_, t)| t.size_on_server);
        let queue = Mutex::new(queue);
        let done = Mutex::new(Vec::new());
        let failed = AtomicBool::new(false);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let workers: Vec<_> = self
                .conns
                .into_iter()
                .map(|(mut conn, watcher)| {
                    let (queue, done, failed) = (&queue, &done, &failed);
                    s.spawn(move || -> Result<()> {
                        let _watcher = watcher;
                        loop {
                            if stop.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed) {
                                return Ok(());
                            }
                            let Some((index, mut table)) = queue.lock().unwrap().pop() else {
                                return Ok(());
                            };
                            let read = dump_one(&mut conn, index, &mut table, dir, space, stop);
                            if read.is_err() {
                                failed.store(true, Ordering::Relaxed);
                                return read.map(|_| ());
                            }
                            done.lock().unwrap().push((index, table, read?));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a dump thread panicked"))
                .collect()
        });
        results.into_iter().collect::<Result<Vec<()>>>()?;
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Interrupted(
                "stopped while reading the InnoDB tables",
            ));
        }
        let mut done = done.into_inner().unwrap();
        done.sort_by_key(|(index, _, _)| *index);
        let files = done
            .iter()
            .filter_map(|(_, t, path)| Some((t.file.clone()?, path.clone()?)))
            .collect();
        let tables: Vec<LogicalTable> = done.into_iter().map(|(_, t, _)| t).collect();
        let logical = Logical {
            threads,
            seconds: started.elapsed().as_secs_f64(),
            triggers: plan.triggers,
            tables,
        };
        let (rows, bytes): (u64, u64) = logical
            .tables
            .iter()
            .fold((0, 0), |(r, b), t| (r + t.rows, b + t.bytes));
        info!(
            "Read {} InnoDB tables from the consistent snapshot: {rows} rows, {} of text, in {:.1} s with {threads} connections",
            logical.tables.len(),
            human(bytes),
            logical.seconds
        );
        Ok((logical, files))
    }
}

/// Reads one table (or a sequence's state). Returns the data file written, if any.
fn dump_one(
    conn: &mut Server,
    index: usize,
    table: &mut LogicalTable,
    dir: &Path,
    space: &(dyn Fn() -> Result<()> + Sync),
    stop: &AtomicBool,
) -> Result<Option<PathBuf>> {
    let started = Instant::now();
    if table.columns.is_empty() {
        let sql = format!(
            "SELECT next_not_cached_value, cycle_count FROM {}",
            table.qualified()
        );
        let row: Vec<(i64, i64)> = conn.rows(&sql, ())?;
        table.sequence = row.into_iter().next();
        return Ok(None);
    }
    let name = format!(
        "{INNODB_DIR}/{:04}-{}.{}.tsv.zst",
        index + 1,
        file_safe(&table.schema),
        file_safe(&table.name)
    );
    let path = dir.join(name.rsplit('/').next().unwrap());
    let file = fs::File::create_new(&path).with_path("create", &path)?;
    let mut zstd = zstd::Encoder::new(BufWriter::with_capacity(BATCH, file), ZSTD_LEVEL)
        .with_path("compress into", &path)?;
    zstd.include_checksum(true)
        .with_path("compress into", &path)?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = Vec::with_capacity(BATCH + (64 << 10));
    let columns: Vec<String> = table.columns.iter().map(|c| ident(c)).collect();
    let sql = format!("SELECT {} FROM {}", columns.join(", "), table.qualified());
    let mut flush = |buf: &mut Vec<u8>, table: &mut LogicalTable| -> Result<()> {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Interrupted("stopped"));
        }
        space()?;
        crc.update(buf);
        table.bytes += buf.len() as u64;
        zstd.write_all(buf).with_path("write", &path)?;
        buf.clear();
        Ok(())
    };
    conn.for_each_row(&sql, |values| {
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                buf.push(b'\t');
            }
            encode_value(&mut buf, v);
        }
        buf.push(b'\n');
        table.rows += 1;
        if buf.len() >= BATCH {
            flush(&mut buf, table)?;
        }
        Ok(())
    })
    .map_err(|e| match e {
        Error::Server(msg) => Error::Server(format!(
            "reading InnoDB table {}.{} from the backup's snapshot: {msg}",
            table.schema, table.name
        )),
        e => e,
    })?;
    flush(&mut buf, table)?;
    table.crc32 = crc.finalize();
    zstd.finish()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .with_path("write", &path)?;
    table.file = Some(name);
    // Only the large ones: a server may hold thousands of small tables.
    if table.bytes >= LOG_TABLE {
        info!(
            "Read InnoDB table {}.{}: {} rows, {} in {:.1} s",
            table.schema,
            table.name,
            table.rows,
            human(table.bytes),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(Some(path))
}

/// A name part made of letters, digits, `_` and `-` only (the file's index makes it unique).
fn file_safe(name: &str) -> String {
    name.chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                true => c,
                false => '_',
            },
        )
        .take(48)
        .collect()
}
