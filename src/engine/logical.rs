//! The InnoDB user tables of a mixed server, copied logically from the consistent point.
//!
//! InnoDB's files cannot be copied hot without replaying its redo log (mariabackup's way);
//! its rows can be read from a read view instead. Under `BLOCK_DDL` the tables' definitions
//! and triggers are read ([`plan`]), and a few connections open read-only transactions;
//! under `BLOCK_COMMIT`, after the coordinates, each opens its InnoDB read view
//! ([`Snapshots::start`]): with commits blocked, every view holds exactly the transactions
//! the RocksDB copy and the binary log coordinates hold. After `END` the connections read
//! the tables, largest first, into compressed files in the run's scratch directory
//! ([`Snapshots::dump`]), while the RocksDB files are sent; the files are then sent as any
//! other.
//!
//! Each table is locked against DDL only while it is read (a savepoint rolled back after
//! each, as `mysqldump --single-transaction` does), and its definition is then compared with
//! the one read under `BLOCK_DDL`: a table changed or replaced since the consistent point
//! fails the backup rather than be copied wrong.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::cancel::Cancel;
use crate::error::{Error, IoContext, Result};
use crate::format::layout::INNODB_DIR;
use crate::format::logical::{
    encode_column, ident, Logical, LogicalTable, Trigger, LOGICAL_SUFFIX,
};
use crate::log::human;
use crate::server::credentials::Credentials;
use crate::server::{Server, Watcher};
use crate::{info, warn};

/// Connections that read tables at once, at most.
const MAX_THREADS: usize = 4;
/// zstd level of the data files: level 3 took 60% of a reading thread's time on rows of
/// random bytes, level 1 is several times faster and still takes text to a third.
const ZSTD_LEVEL: i32 = 1;
/// InnoDB tables from this size on are named in a warning ([`Plan::preflight`]): loaded at
/// the 25 MiB/s measured here, 4 GiB take about three minutes, where mariabackup's restore
/// copies files (docs/BENCHMARKS.md, "Mixed server").
const LARGE_TABLE: u64 = 4 << 30;
/// Tables from this size on get a log line of their own.
const LOG_TABLE: u64 = 64 << 20;
/// Bytes of rows encoded before they are compressed and written.
const BATCH: usize = 1 << 20;

/// The InnoDB user tables with their definitions, read while DDL is blocked.
pub struct Plan {
    tables: Vec<LogicalTable>,
    /// Each table's `CREATE_TIME` (its `.frm` file's change time, which a rename or an
    /// ALTER sets): with the definition, what tells a table replaced since the plan.
    created: Vec<Option<String>>,
    triggers: Vec<Trigger>,
    /// Tables with at least one trigger the backup's user can see.
    tables_with_triggers: usize,
}

/// Reads the definitions of the InnoDB tables outside `mysql`, and their triggers.
pub fn plan(server: &mut Server) -> Result<Plan> {
    // Definitions and times as the reading connections check them (`dump_one`).
    server.exec("SET NAMES utf8mb4, time_zone = '+00:00'")?;
    type Listed = (String, String, String, Option<u64>, Option<String>);
    let listed: Vec<Listed> = server.rows(
        "SELECT TABLE_SCHEMA, TABLE_NAME, TABLE_TYPE, DATA_LENGTH + INDEX_LENGTH, CAST(CREATE_TIME AS CHAR)
         FROM information_schema.TABLES
         WHERE ENGINE = 'InnoDB' AND TABLE_SCHEMA NOT IN ('mysql', 'information_schema', 'performance_schema')
         ORDER BY TABLE_SCHEMA, TABLE_NAME",
        (),
    )?;
    let versioned: Vec<String> = listed
        .iter()
        .filter(|(_, _, kind, _, _)| kind == "SYSTEM VERSIONED")
        .map(|(db, t, _, _, _)| format!("{db}.{t}"))
        .collect();
    if !versioned.is_empty() {
        return Err(Error::Refused(format!(
            "these InnoDB tables are system-versioned, whose history a logical copy cannot restore: {}. \
             Back the server up with mariabackup, or pass --skip-innodb-tables to leave the InnoDB tables out",
            versioned.join(", ")
        )));
    }
    let mut tables = Vec::new();
    let mut created = Vec::new();
    let mut triggers = Vec::new();
    let mut tables_with_triggers = 0;
    for (schema, name, kind, size, create_time) in listed {
        created.push(create_time);
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
        tables_with_triggers += usize::from(!names.is_empty());
        // SHOW CREATE TRIGGER leaves out PRECEDES and FOLLOWS: created in this order, each
        // after the last, the triggers fire in the order they did.
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
    Ok(Plan {
        tables,
        created,
        triggers,
        tables_with_triggers,
    })
}

impl Plan {
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// Refuses to go on when the backup's user cannot see every InnoDB table the datadir
    /// holds (`tables`) and the triggers of every one that has some (`with_triggers`):
    /// without privileges on them the server hides them, and the copy would silently lack them.
    pub fn check_complete(&self, tables: &[String], with_triggers: &[String]) -> Result<()> {
        if self.tables.len() < tables.len() {
            return Err(Error::Refused(format!(
                "the backup's user sees {} of the {} InnoDB tables of the datadir ({}): grant it SELECT ON *.*, \
                 or pass --skip-innodb-tables",
                self.tables.len(),
                tables.len(),
                tables.join(", ")
            )));
        }
        if self.tables_with_triggers < with_triggers.len() {
            return Err(Error::Refused(format!(
                "these InnoDB tables have triggers that the backup's user cannot see: {} (it sees those \
                 of {} tables). Grant it TRIGGER ON *.*, or pass --skip-innodb-tables",
                with_triggers.join(", "),
                self.tables_with_triggers
            )));
        }
        Ok(())
    }

    /// Before the rounds: refuses tables the backup's user cannot read (rather than after
    /// hours of rounds), and names the large ones.
    pub fn preflight(&self, server: &mut Server) -> Result<()> {
        for t in &self.tables {
            let sql = format!("SELECT 1 FROM {} LIMIT 0", t.qualified());
            server.exec(&sql).map_err(|e| {
                Error::Refused(format!(
                    "the InnoDB table {}.{} cannot be read ({e}): grant SELECT on it to the backup's user, \
                     or pass --skip-innodb-tables to leave the InnoDB tables out",
                    t.schema, t.name
                ))
            })?;
        }
        let large: Vec<String> = self
            .tables
            .iter()
            .filter(|t| t.size_on_server >= LARGE_TABLE)
            .map(|t| format!("{}.{} ({})", t.schema, t.name, human(t.size_on_server)))
            .collect();
        if !large.is_empty() {
            warn!(
                "These InnoDB tables are copied row by row and loaded at restore, which takes far longer \
                 than copying their files: {}. For that much InnoDB data mariabackup restores faster \
                 (or convert the tables to RocksDB)",
                large.join(", ")
            );
        }
        Ok(())
    }
}

/// Connections opened before the consistent point, each to hold one snapshot.
pub struct Snapshots {
    conns: Vec<(Server, Watcher)>,
    /// The InnoDB table of `mysql` whose read opens each connection's read view.
    view_table: Option<String>,
}

impl Snapshots {
    /// Opens the connections (`tables` InnoDB tables to read) and readies their sessions,
    /// their transactions begun when `view_table` is known (see [`Snapshots::start`]).
    pub fn connect(
        creds: &Credentials,
        tables: usize,
        view_table: Option<&str>,
        lock_wait_timeout: u64,
        cancel: &Cancel,
    ) -> Result<Snapshots> {
        let mut conns = Vec::new();
        for _ in 0..tables.clamp(1, MAX_THREADS) {
            let mut conn = Server::connect(creds)?;
            let watcher = conn.interrupt_on(cancel, creds)?;
            // Values as stored (no charset conversion), TIMESTAMPs in UTC, out of the
            // general log, no server timeout while this side writes, and no endless wait
            // behind a DDL's lock.
            conn.exec("SET NAMES utf8mb4")?;
            conn.exec(&format!(
                "SET SESSION sql_log_off = 1, time_zone = '+00:00', character_set_results = binary, \
                 net_write_timeout = 3600, tx_isolation = 'REPEATABLE-READ', \
                 lock_wait_timeout = {lock_wait_timeout}"
            ))?;
            // InnoDB and RocksDB begin their parts of it at its first read.
            if view_table.is_some() {
                conn.exec("START TRANSACTION READ ONLY")?;
            }
            conns.push((conn, watcher));
        }
        Ok(Snapshots {
            conns,
            view_table: view_table.map(str::to_string),
        })
    }

    /// Under `BLOCK_COMMIT`: every connection opens its InnoDB read view, which then holds
    /// exactly the transactions committed before the block. A read of the view table (an
    /// InnoDB table of `mysql`) opens it; `START TRANSACTION WITH CONSISTENT SNAPSHOT` would
    /// also pin a RocksDB snapshot, which keeps compaction from dropping overwritten rows for
    /// the length of the copy, and is used only when there is no such table.
    pub fn start(&mut self) -> Result<()> {
        for (conn, _) in &mut self.conns {
            match &self.view_table {
                Some(t) => conn.exec(&format!("SELECT 1 FROM mysql.{} LIMIT 1", ident(t)))?,
                None => conn.exec("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")?,
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
        let mut conns = self.conns;
        for (conn, _) in &mut conns {
            // Each table's metadata lock is released once it is read (ROLLBACK TO SAVEPOINT),
            // so that DDL waits for no more than the reading of its own table.
            conn.exec("SAVEPOINT myrocks_hotbackup")?;
        }
        let mut queue: Vec<(usize, LogicalTable, Option<String>)> = plan
            .tables
            .into_iter()
            .zip(plan.created)
            .enumerate()
            .map(|(i, (t, created))| (i, t, created))
            .collect();
        // Largest last: popped first.
        queue.sort_by_key(|(_, t, _)| t.size_on_server);
        let queue = Mutex::new(queue);
        let done = Mutex::new(Vec::new());
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let workers: Vec<_> = conns
                .into_iter()
                .map(|(mut conn, watcher)| {
                    let (queue, done) = (&queue, &done);
                    s.spawn(move || -> Result<()> {
                        let _watcher = watcher;
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                return Ok(());
                            }
                            let Some((index, mut table, created)) = queue.lock().unwrap().pop()
                            else {
                                return Ok(());
                            };
                            let read =
                                dump_one(&mut conn, index, &mut table, &created, dir, space, stop);
                            if read.is_err() {
                                // The others stop too.
                                stop.store(true, Ordering::Relaxed);
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
        // The failure that stopped the others, rather than their being stopped.
        let mut errors: Vec<Error> = results.into_iter().filter_map(Result::err).collect();
        errors.sort_by_key(|e| matches!(e, Error::Interrupted(_)));
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
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
#[allow(clippy::too_many_arguments)]
fn dump_one(
    conn: &mut Server,
    index: usize,
    table: &mut LogicalTable,
    created: &Option<String>,
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
        conn.exec(RELEASE_LOCKS)?;
        return Ok(None);
    }
    let name = format!(
        "{INNODB_DIR}/{:04}-{}.{}.{LOGICAL_SUFFIX}",
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
    conn.for_each_row(&sql, |columns, values| {
        for (i, (c, v)) in columns.iter().zip(values).enumerate() {
            if i > 0 {
                buf.push(b'\t');
            }
            encode_column(&mut buf, v, c.column_type());
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
    // A table renamed into this one's place since the consistent point (the cut-over of an
    // online schema change) reads without an error: its definition or its CREATE_TIME (the
    // `.frm`'s change time, which a rename sets) tells. The table's metadata lock, held
    // since the read, keeps it from changing until the lock is released.
    conn.exec("SET SESSION character_set_results = utf8mb4")?;
    let now = conn.show_create("TABLE", &table.schema, &table.name)?;
    let created_now: Vec<(Option<String>,)> = conn.rows(
        "SELECT CAST(CREATE_TIME AS CHAR) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
        (&table.schema, &table.name),
    )?;
    conn.exec("SET SESSION character_set_results = binary")?;
    let created_now = created_now.into_iter().next().and_then(|(c,)| c);
    if without_auto_increment(&now) != without_auto_increment(&table.create)
        || created_now != *created
    {
        return Err(Error::Refused(format!(
            "the InnoDB table {}.{} was altered, replaced or renamed after the backup's consistent point, \
             before it was read: run the backup again once the DDL is done",
            table.schema, table.name
        )));
    }
    conn.exec(RELEASE_LOCKS)?;
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

/// Releases the metadata lock of the table just read (see [`Snapshots::start`]).
const RELEASE_LOCKS: &str = "ROLLBACK TO SAVEPOINT myrocks_hotbackup";

/// `SHOW CREATE TABLE` without its ` AUTO_INCREMENT=N`, which inserts change.
fn without_auto_increment(create: &str) -> String {
    let mut out = String::with_capacity(create.len());
    let mut rest = create;
    while let Some(at) = rest.find(" AUTO_INCREMENT=") {
        out.push_str(&rest[..at]);
        let after = &rest[at + " AUTO_INCREMENT=".len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            out.push_str(" AUTO_INCREMENT=");
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_increment_values_do_not_count_as_a_change() {
        assert_eq!(
            without_auto_increment("CREATE TABLE `t` (\n  `id` int NOT NULL AUTO_INCREMENT\n) ENGINE=InnoDB AUTO_INCREMENT=103 DEFAULT CHARSET=latin1"),
            "CREATE TABLE `t` (\n  `id` int NOT NULL AUTO_INCREMENT\n) ENGINE=InnoDB DEFAULT CHARSET=latin1"
        );
    }
}
