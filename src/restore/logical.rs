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

/// The statements that create and load the tables. `source(i)` is where the bootstrap
/// reads the rows of table `i` from.
pub fn script(logical: &Logical, source: impl Fn(usize) -> String) -> String {
    let mut sql = String::from(
        "SET NAMES utf8mb4;\n\
         SET SESSION sql_mode = 'NO_AUTO_VALUE_ON_ZERO,NO_ENGINE_SUBSTITUTION,STRICT_ALL_TABLES', \
         time_zone = '+00:00', foreign_key_checks = 0, unique_checks = 0;\n",
    );
    for (i, t) in logical.tables.iter().enumerate() {
        sql.push_str(&format!(
            "CREATE DATABASE IF NOT EXISTS {0};\nUSE {0};\n{1};\n",
            ident(&t.schema),
            local_paths_removed(t)
        ));
        if let Some((next, round)) = t.sequence {
            sql.push_str(&format!(
                "SELECT SETVAL({}, {next}, 0, {round});\n",
                ident(&t.name)
            ));
        }
        if t.file.is_some() && t.rows > 0 {
            let columns: Vec<String> = t.columns.iter().map(|c| ident(c)).collect();
            let message = literal(&format!(
                "{}.{}: the backup holds {} rows, a different number was loaded",
                t.schema, t.name, t.rows
            ));
            sql.push_str(&format!(
                "LOAD DATA INFILE {} INTO TABLE {} CHARACTER SET binary ({});\n\
                 IF ROW_COUNT() <> {} THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = {message}; END IF;\n",
                literal(&source(i)),
                ident(&t.name),
                columns.join(", "),
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

/// `CREATE TABLE` without `DATA DIRECTORY` and `INDEX DIRECTORY`: the source's paths may
/// be another server's files on this host. The tables go into the restored datadir.
fn local_paths_removed(t: &LogicalTable) -> String {
    let mut create = t.create.clone();
    for clause in [" DATA DIRECTORY='", " INDEX DIRECTORY='"] {
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
        let thread = std::thread::spawn(move || {
            for (pipe, source, table) in jobs {
                let Some(mut out) = open_when_read(&pipe, &stop)? else {
                    return Err(Error::Server(format!(
                        "the bootstrap ended before it loaded {}.{}",
                        table.schema, table.name
                    )));
                };
                check(&table, compress::decode_file(&source, Some(&mut out))?)?;
            }
            Ok(())
        });
        Ok(Pipes {
            done,
            thread: Some(thread),
            paths,
        })
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
            file: Some("#innodb/0001-d.t.tsv.zst".into()),
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
            .find("LOAD DATA INFILE '/p/0' INTO TABLE `t` CHARACTER SET binary (`a`, `b c`);")
            .unwrap();
        let count = sql.find("IF ROW_COUNT() <> 3 THEN").unwrap();
        let trigger = sql
            .find("DELIMITER $$myrocks_hotbackup$$\nCREATE TRIGGER")
            .unwrap();
        assert!(sql.find("CREATE TABLE `t`").unwrap() < load && load < count && count < trigger);
        assert!(sql.contains("END$$myrocks_hotbackup$$\nDELIMITER ;\n"));
    }
}
