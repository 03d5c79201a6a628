//! Loading a backup's InnoDB user tables (see `format::logical`) with the bootstrap that
//! re-creates the `mysql` schema's InnoDB tables, so that the restored datadir holds both
//! engines at the backup's consistent point before the server first starts.
//!
//! The script creates each table as the source showed it, loads its rows with `LOAD DATA`
//! (foreign key and unique checks off, so that InnoDB builds each empty table's indexes in
//! bulk, sorted), checks the row count, and creates the triggers last, each under its own
//! `sql_mode` (so that loading fires none). The data files are decompressed on the way,
//! through named pipes the bootstrap reads from: the restore needs no room for them.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::format::logical::{ident, literal, Logical, LogicalTable};
use crate::pipeline::compress;
use crate::warn;

/// A delimiter no statement of a trigger ends a line with.
const DELIMITER: &str = "$$myrocks_hotbackup$$";
/// The bootstrap refuses statements over 60,000 bytes, and reads lines in pieces of 20,000:
/// definitions beyond these are sent in pieces and run as a prepared statement.
const MAX_STATEMENT: usize = 50_000;
const MAX_LINE: usize = 10_000;

/// The statements that create and load the tables. `source(i)` is where the bootstrap
/// reads the rows of table `i` from.
pub fn script(logical: &Logical, source: impl Fn(usize) -> String) -> String {
    // Not strict, no CHECK constraints: the rows come from tables of the same definitions,
    // and legacy values the source kept (an ENUM's '', a date stored under
    // ALLOW_INVALID_DATES, rows older than a CHECK) load as they were.
    let mut sql = String::from(
        "SET NAMES utf8mb4;\n\
         SET SESSION sql_mode = 'NO_AUTO_VALUE_ON_ZERO,NO_ENGINE_SUBSTITUTION,ALLOW_INVALID_DATES', \
         time_zone = '+00:00', foreign_key_checks = 0, unique_checks = 0, innodb_strict_mode = 0, \
         check_constraint_checks = 0;\n",
    );
    for (i, t) in logical.tables.iter().enumerate() {
        sql.push_str(&format!(
            "CREATE DATABASE IF NOT EXISTS {0};\nUSE {0};\n",
            ident(&t.schema)
        ));
        sql.push_str(&statement(&local_paths_removed(t)));
        if let Some((next, round)) = t.sequence {
            sql.push_str(&format!(
                "SELECT SETVAL({}, {next}, 0, {round});\n",
                ident(&t.name)
            ));
        }
        if t.file.is_some() && t.rows > 0 {
            // One per line: a line of the bootstrap's input holds at most 20,000 bytes.
            let columns: Vec<String> = t.columns.iter().map(|c| ident(c)).collect();
            let message = literal(&format!(
                "{}.{}: the backup holds {} rows, a different number was loaded",
                t.schema, t.name, t.rows
            ));
            sql.push_str(&format!(
                "LOAD DATA INFILE {} INTO TABLE {} CHARACTER SET binary (\n{}\n);\n\
                 IF ROW_COUNT() <> {} THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = {message}; END IF;\n",
                literal(&source(i)),
                ident(&t.name),
                columns.join(",\n"),
                t.rows
            ));
        }
    }
    for t in &logical.triggers {
        sql.push_str(&format!(
            "USE {};\nSET SESSION sql_mode = {}, collation_connection = {};\nDELIMITER {DELIMITER}\n{}{DELIMITER}\nDELIMITER ;\n",
            ident(&t.schema),
            literal(&t.sql_mode),
            literal(&t.collation_connection),
            t.statement
        ));
    }
    sql
}

/// A statement for the bootstrap: as it is, or, when too long for its reader, built from
/// pieces in a variable and run as a prepared statement.
fn statement(sql: &str) -> String {
    if sql.len() <= MAX_STATEMENT && sql.lines().all(|l| l.len() <= MAX_LINE) {
        return format!("{sql};\n");
    }
    let mut out = String::from("SET @myrocks_hotbackup_sql = '';\n");
    let mut piece = String::new();
    for c in sql.chars() {
        piece.push(c);
        if piece.len() >= MAX_LINE / 2 {
            out.push_str(&format!(
                "SET @myrocks_hotbackup_sql = CONCAT(@myrocks_hotbackup_sql, {});\n",
                literal(&piece)
            ));
            piece.clear();
        }
    }
    out.push_str(&format!(
        "SET @myrocks_hotbackup_sql = CONCAT(@myrocks_hotbackup_sql, {});\n\
         PREPARE myrocks_hotbackup_statement FROM @myrocks_hotbackup_sql;\n\
         EXECUTE myrocks_hotbackup_statement;\n\
         DEALLOCATE PREPARE myrocks_hotbackup_statement;\n",
        literal(&piece)
    ));
    out
}

/// `CREATE TABLE` without `DATA DIRECTORY` and `INDEX DIRECTORY`: the source's paths may
/// be another server's files on this host. The tables go into the restored datadir.
fn local_paths_removed(t: &LogicalTable) -> String {
    let mut create = t.create.clone();
    // Tables say `DATA DIRECTORY='...'`, partitions `DATA DIRECTORY = '...'`.
    for clause in [
        " DATA DIRECTORY='",
        " INDEX DIRECTORY='",
        " DATA DIRECTORY = '",
        " INDEX DIRECTORY = '",
    ] {
        while let Some(start) = create.find(clause) {
            let rest = &create[start + clause.len()..];
            // The path ends at a quote that is not doubled.
            let mut end = None;
            let mut chars = rest.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                match (c, chars.peek()) {
                    ('\\', _) => {
                        chars.next();
                    }
                    ('\'', Some((_, '\''))) => {
                        chars.next();
                    }
                    ('\'', _) => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let Some(end) = end else { break };
            warn!(
                "{}.{} is restored into the datadir, not into its{}{}'",
                t.schema,
                t.name,
                clause,
                &rest[..end]
            );
            create.replace_range(start..start + clause.len() + end + 1, "");
        }
    }
    create
}

/// The tables whose rows are loaded from a data file: (index, table).
fn loaded(logical: &Logical) -> impl Iterator<Item = (usize, &LogicalTable)> {
    logical
        .tables
        .iter()
        .enumerate()
        .filter(|(_, t)| t.file.is_some() && t.rows > 0)
}

/// Writes each data file decompressed into `dir` (for a bootstrap run by hand); returns
/// the names the script reads them by, relative to the datadir (`rel` is `dir` from there).
pub fn unpack(backup: &Path, logical: &Logical, dir: &Path, rel: &str) -> Result<Vec<String>> {
    let mut names = vec![String::new(); logical.tables.len()];
    for (i, t) in loaded(logical) {
        let name = format!("{:04}.tsv", i + 1);
        let path = dir.join(&name);
        let mut out = fs::File::create_new(&path).with_path("create", &path)?;
        check(
            t,
            compress::decode_file(&data_file(backup, t), Some(&mut out))?,
        )?;
        names[i] = format!("{rel}/{name}");
    }
    Ok(names)
}

fn data_file(backup: &Path, t: &LogicalTable) -> PathBuf {
    backup.join(t.file.as_deref().unwrap_or_default())
}

fn check(t: &LogicalTable, (size, crc): (u64, u32)) -> Result<()> {
    if (size, crc) != (t.bytes, t.crc32) {
        return Err(Error::Corrupt(format!(
            "the rows of {}.{} decoded to {size} bytes with CRC-32 {crc:08x}, the manifest says {} bytes with {:08x}",
            t.schema, t.name, t.bytes, t.crc32
        )));
    }
    Ok(())
}

/// Named pipes the bootstrap reads the tables from, fed from the backup by a thread.
pub struct Pipes {
    done: Arc<AtomicBool>,
    /// Set when the feeding failed (or panicked).
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
    /// The pipe of each table (empty for tables not loaded).
    pub paths: Vec<String>,
}

impl Pipes {
    /// Creates the pipes in `dir` and starts feeding them, in the script's order.
    pub fn feed(backup: &Path, logical: &Logical, dir: &Path) -> Result<Pipes> {
        let mut paths = vec![String::new(); logical.tables.len()];
        let mut jobs = Vec::new();
        for (i, t) in loaded(logical) {
            let pipe = dir.join(format!("{:04}.tsv", i + 1));
            let c = std::ffi::CString::new(pipe.as_os_str().as_encoded_bytes())
                .map_err(|_| Error::Usage(format!("{}: a NUL in the path", pipe.display())))?;
            // SAFETY: a valid NUL-terminated path.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                return Err(Error::io(
                    format!("cannot create the pipe {}", pipe.display()),
                    std::io::Error::last_os_error(),
                ));
            }
            paths[i] = pipe.to_string_lossy().into_owned();
            jobs.push((pipe, data_file(backup, t), t.clone()));
        }
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        let thread = std::thread::spawn(move || {
            let panicked = SetOnDrop(Some(flag.clone()));
            let fed = feed(jobs, &stop);
            if fed.is_err() {
                flag.store(true, Ordering::Relaxed);
            }
            panicked.disarm();
            fed
        });
        Ok(Pipes {
            done,
            failed,
            thread: Some(thread),
            paths,
        })
    }

    /// True once the feeding has failed: the bootstrap is to be stopped.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Called once the bootstrap has ended: the feeding's error, if any.
    pub fn finish(mut self) -> Result<()> {
        self.done.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("the pipe feeder panicked")
    }
}

impl Drop for Pipes {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Decodes each data file into its pipe, in the script's order, once the bootstrap opens it.
fn feed(jobs: Vec<(PathBuf, PathBuf, LogicalTable)>, stop: &AtomicBool) -> Result<()> {
    for (pipe, source, table) in jobs {
        let Some(mut out) = open_when_read(&pipe, stop)? else {
            return Ok(()); // the bootstrap has ended: its status tells
        };
        check(&table, compress::decode_file(&source, Some(&mut out))?)?;
    }
    Ok(())
}

/// Sets its flag when dropped, unless disarmed: a thread's "I panicked".
struct SetOnDrop(Option<Arc<AtomicBool>>);

impl SetOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// Opens a pipe for writing once its reader has opened it; None when `stop` comes first.
fn open_when_read(pipe: &Path, stop: &AtomicBool) -> Result<Option<fs::File>> {
    loop {
        match fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(pipe)
        {
            Ok(f) => {
                // Blocking writes from here on.
                let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
                // SAFETY: fcntl on a descriptor we own.
                unsafe {
                    let flags = libc::fcntl(fd, libc::F_GETFL);
                    libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
                }
                return Ok(Some(f));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(Error::io(format!("cannot open {}", pipe.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(create: &str) -> LogicalTable {
        LogicalTable {
            schema: "d".into(),
            name: "t".into(),
            create: create.into(),
            sequence: None,
            columns: vec!["a".into(), "b c".into()],
            file: Some("#innodb/0001-d.t.tsv.zstd".into()),
            rows: 3,
            bytes: 10,
            crc32: 1,
            size_on_server: 0,
        }
    }

    #[test]
    fn data_and_index_directories_are_dropped() {
        let t = table("CREATE TABLE `t` (\n  `a` int\n) ENGINE=InnoDB DATA DIRECTORY='/srv/it''s' INDEX DIRECTORY='/x'");
        assert_eq!(
            local_paths_removed(&t),
            "CREATE TABLE `t` (\n  `a` int\n) ENGINE=InnoDB"
        );
    }

    #[test]
    fn long_definitions_are_sent_in_pieces() {
        let create = format!(
            "CREATE TABLE `t` (\n  `a` enum({})\n)",
            vec!["'it''s'"; 5000].join(",")
        );
        let sql = statement(&create);
        assert!(sql.contains("PREPARE myrocks_hotbackup_statement"));
        assert!(sql.lines().all(|l| l.len() < 20_000));
        // The pieces put back together are the statement.
        let pieces: String = sql
            .lines()
            .filter_map(|l| {
                l.strip_prefix("SET @myrocks_hotbackup_sql = CONCAT(@myrocks_hotbackup_sql, '")
            })
            .map(|l| unquote(l.strip_suffix("');").unwrap()))
            .collect();
        assert_eq!(pieces, create);
        assert_eq!(
            statement("CREATE TABLE `t` (`a` int)"),
            "CREATE TABLE `t` (`a` int);\n"
        );
    }

    /// Undoes `literal`'s escapes.
    fn unquote(quoted: &str) -> String {
        let mut out = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(match chars.next().unwrap() {
                    'n' => '\n',
                    'r' => '\r',
                    '0' => '\0',
                    other => other,
                }),
                '\'' => out.push(chars.next().unwrap()),
                c => out.push(c),
            }
        }
        out
    }

    #[test]
    fn partition_directories_are_dropped_too() {
        let t = table("CREATE TABLE `t` (`a` int)\n PARTITION BY HASH (`a`)\n(PARTITION `p0` DATA DIRECTORY = '/srv/p0' ENGINE = InnoDB)");
        assert_eq!(
            local_paths_removed(&t),
            "CREATE TABLE `t` (`a` int)\n PARTITION BY HASH (`a`)\n(PARTITION `p0` ENGINE = InnoDB)"
        );
    }

    #[test]
    fn script_loads_then_checks_then_creates_triggers() {
        let logical = Logical {
            tables: vec![table("CREATE TABLE `t` (`a` int)")],
            triggers: vec![crate::format::logical::Trigger {
                schema: "d".into(),
                name: "tr".into(),
                sql_mode: "STRICT_TRANS_TABLES".into(),
                character_set_client: "utf8mb4".into(),
                collation_connection: "utf8mb4_general_ci".into(),
                statement: "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW\nBEGIN\n  SET NEW.a = 1;\nEND".into(),
            }],
            threads: 1,
            seconds: 0.0,
        };
        let sql = script(&logical, |i| format!("/p/{i}"));
        let load = sql
            .find("LOAD DATA INFILE '/p/0' INTO TABLE `t` CHARACTER SET binary (\n`a`,\n`b c`\n);")
            .unwrap();
        let count = sql.find("IF ROW_COUNT() <> 3 THEN").unwrap();
        let trigger = sql
            .find("DELIMITER $$myrocks_hotbackup$$\nCREATE TRIGGER")
            .unwrap();
        assert!(sql.find("CREATE TABLE `t`").unwrap() < load && load < count && count < trigger);
        assert!(sql.contains("END$$myrocks_hotbackup$$\nDELIMITER ;\n"));
    }
}
