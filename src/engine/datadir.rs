//! Which files of a MariaDB datadir a MyRocks backup takes besides the RocksDB data: table
//! definitions and the files of non-transactional engines, per database directory, and the
//! Aria log at the root. An explicit list of extensions, not the original tool's pattern
//! (a character class that matched `notes.txt`). Never InnoDB files, binary logs, temporary
//! or crash-recovery files. InnoDB tables are recognised by the engine byte of their `.frm`.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Extensions of files that belong to a table or database and can be copied as they are.
const TABLE_EXTENSIONS: &[&str] = &[
    "frm", "par", "TRG", "TRN", "opt", "MYD", "MYI", "MAD", "MAI", "MRG", "ARM", "ARZ", "CSM",
    "CSV",
];
/// Tables of `mysql` that the server writes until commits are blocked (BACKUP STAGE
/// BLOCK_COMMIT), not only until BLOCK_DDL: persistent statistics and the log tables.
const WRITTEN_UNTIL_COMMIT_BLOCK: &[&str] = &[
    "table_stats",
    "column_stats",
    "index_stats",
    "general_log",
    "slow_log",
];

/// The legacy engine byte of a `.frm` (offset 3) and `.par` (offset 12).
const DB_TYPE_INNODB: u8 = 12;
const DB_TYPE_PARTITION: u8 = 20;

/// A file to copy: where it is, and its path in the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatadirFile {
    pub source: PathBuf,
    pub name: String,
}

/// The non-RocksDB part of a datadir, sorted into what a backup does with it.
#[derive(Debug, Default)]
pub struct Selection {
    /// Table definitions and database options: `.frm`, `.par`, `.TRG`, `.TRN`, `db.opt`.
    pub schema: Vec<DatadirFile>,
    /// Data of non-transactional engines (Aria, MyISAM, CSV, Archive, Merge).
    pub table_data: Vec<DatadirFile>,
    /// Data of the statistics and log tables of `mysql`: the server writes them until
    /// commits are blocked, so they are copied then.
    pub late_table_data: Vec<DatadirFile>,
    /// InnoDB tables of the `mysql` schema, as `table` names: re-created at restore.
    pub innodb_system_tables: Vec<String>,
    /// InnoDB tables elsewhere, as `db.table`: a RocksDB backup cannot hold them.
    pub innodb_user_tables: Vec<String>,
    /// Those of them that have triggers (a `.TRG` file).
    pub innodb_user_tables_with_triggers: Vec<String>,
}

/// Walks `datadir`, skipping the directories in `skip` (RocksDB data, WAL, checkpoints).
/// With `innodb` false (a server running without InnoDB), the `.frm` files of InnoDB
/// tables are copied as they are, like any definition: there is no InnoDB data to miss.
pub fn select(datadir: &Path, skip: &[&Path], innodb: bool) -> Result<Selection> {
    let mut sel = Selection::default();
    for entry in sorted_entries(datadir)? {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        let md = match fs::metadata(&entry) {
            Ok(md) => md,
            // Gone since the listing (a purged binary log), or a dangling link: not ours.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("cannot stat {}", entry.display()), e)),
        };
        if md.is_dir() && is_database_dir(&name) && !skip.iter().any(|s| same_dir(s, &entry)) {
            select_database(&entry, &name, innodb, &mut sel)?;
        }
    }
    Ok(sel)
}

/// `aria_log_control` and the `aria_log.*` files in the Aria log directory.
pub fn aria_logs(dir: &Path) -> Result<Vec<DatadirFile>> {
    let mut logs = Vec::new();
    for entry in sorted_entries(dir)? {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        if (name == "aria_log_control" || is_aria_log(&name)) && entry.is_file() {
            logs.push(DatadirFile {
                source: entry,
                name,
            });
        }
    }
    Ok(logs)
}

fn select_database(dir: &Path, db: &str, innodb: bool, sel: &mut Selection) -> Result<()> {
    let entries = sorted_entries(dir)?;
    // InnoDB tables first: their triggers and partition files stay out with them.
    let mut innodb_tables = HashSet::new();
    for entry in &entries {
        let file = entry.file_name().unwrap().to_string_lossy();
        if let Some(stem) = file.strip_suffix(".frm") {
            if innodb && !file.starts_with("#sql") && entry.is_file() && is_innodb_table(entry)? {
                innodb_tables.insert(stem.to_string());
            }
        }
    }
    for entry in entries {
        let file = entry.file_name().unwrap().to_string_lossy().into_owned();
        let Some((stem, ext)) = file.rsplit_once('.') else {
            continue;
        };
        if file.starts_with("#sql") || !TABLE_EXTENSIONS.contains(&ext) || !entry.is_file() {
            continue;
        }
        let table = match ext {
            "TRN" => trigger_table(&entry)?,
            _ => Some(stem.to_string()),
        };
        if let Some(table) = table.filter(|t| innodb_tables.contains(t)) {
            match (ext, db) {
                ("frm", "mysql") => sel.innodb_system_tables.push(table),
                ("frm", _) => sel.innodb_user_tables.push(format!("{db}.{table}")),
                ("TRG", db) if db != "mysql" => sel
                    .innodb_user_tables_with_triggers
                    .push(format!("{db}.{table}")),
                _ => {}
            }
            continue;
        }
        let f = DatadirFile {
            source: entry.clone(),
            name: format!("{db}/{file}"),
        };
        match ext {
            "frm" | "par" | "TRG" | "TRN" | "opt" => sel.schema.push(f),
            _ if db == "mysql" && WRITTEN_UNTIL_COMMIT_BLOCK.contains(&stem) => {
                sel.late_table_data.push(f)
            }
            _ => sel.table_data.push(f),
        }
    }
    Ok(())
}

/// The table a trigger's `.TRN` file names (`trigger_table=t`).
fn trigger_table(trn: &Path) -> Result<Option<String>> {
    let text = fs::read_to_string(trn).with_path("read", trn)?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("trigger_table="))
        .map(str::to_string))
}

/// Directories in the datadir that are databases.
fn is_database_dir(name: &str) -> bool {
    !name.starts_with('.')
        && name != "lost+found"
        && name != "#innodb_temp"
        && !name.starts_with("#sql")
}

fn is_aria_log(name: &str) -> bool {
    name.strip_prefix("aria_log.")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// True for an InnoDB table's `.frm`, including a partitioned table whose partitions are InnoDB.
fn is_innodb_table(frm: &Path) -> Result<bool> {
    let mut head = [0u8; 4];
    let got = fs::File::open(frm)
        .and_then(|mut f| f.read(&mut head))
        .with_path("read", frm)?;
    if got < 4 || head[0] != 0xfe {
        return Ok(false); // a view, or not a table definition at all
    }
    match head[3] {
        DB_TYPE_INNODB => Ok(true),
        DB_TYPE_PARTITION => {
            let par = frm.with_extension("par");
            let bytes = fs::read(&par).unwrap_or_default();
            Ok(bytes.get(12) == Some(&DB_TYPE_INNODB))
        }
        _ => Ok(false),
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_path("list", dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_path("list", dir)?;
    entries.sort();
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frm(engine: u8) -> Vec<u8> {
        vec![0xfe, 1, 10, engine, 0, 0]
    }

    #[test]
    fn selects_the_right_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for dir in ["mysql", "app", "#rocksdb", "ckpt", ".hidden", "lost+found"] {
            fs::create_dir(p.join(dir)).unwrap();
        }
        let files: &[(&str, Vec<u8>)] = &[
            ("aria_log_control", vec![]),
            ("aria_log.00000001", vec![]),
            ("binlog.000001", vec![]),
            ("ibdata1", vec![]),
            ("ddl_recovery.log", vec![]),
            ("ib_buffer_pool", vec![]),
            ("mysql/user.frm", frm(42)),
            ("mysql/user.MAD", vec![]),
            ("mysql/gtid_slave_pos.frm", frm(DB_TYPE_INNODB)),
            ("mysql/gtid_slave_pos.ibd", vec![]),
            ("app/db.opt", vec![]),
            ("app/t.frm", frm(45)),
            ("app/inno.frm", frm(DB_TYPE_INNODB)),
            ("app/parted.frm", frm(DB_TYPE_PARTITION)),
            (
                "app/parted.par",
                vec![7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, DB_TYPE_INNODB],
            ),
            ("app/v.frm", b"TYPE=VIEW\n".to_vec()),
            ("app/notes.txt", vec![]),
            ("app/t.frm.bak", vec![]),
            ("app/#sql-1a2b.frm", frm(45)),
            ("app/trg.TRG", vec![]),
            ("app/inno.TRG", vec![]),
            (
                "app/inno_trigger.TRN",
                b"TYPE=TRIGGERNAME\ntrigger_table=inno\n".to_vec(),
            ),
            (
                "app/t_trigger.TRN",
                b"TYPE=TRIGGERNAME\ntrigger_table=t\n".to_vec(),
            ),
            ("mysql/table_stats.MAD", vec![]),
            ("mysql/general_log.CSV", vec![]),
            ("app/csv.CSV", vec![]),
            ("#rocksdb/000001.sst", vec![]),
            ("ckpt/x.frm", frm(45)),
            (".hidden/y.frm", frm(45)),
        ];
        for (name, data) in files {
            fs::write(p.join(name), data).unwrap();
        }
        let sel = select(p, &[&p.join("#rocksdb"), &p.join("ckpt")], true).unwrap();
        let names = |v: &[DatadirFile]| v.iter().map(|f| f.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&aria_logs(p).unwrap()),
            ["aria_log.00000001", "aria_log_control"]
        );
        assert_eq!(
            names(&sel.schema),
            [
                "app/db.opt",
                "app/t.frm",
                "app/t_trigger.TRN",
                "app/trg.TRG",
                "app/v.frm",
                "mysql/user.frm"
            ]
        );
        assert_eq!(names(&sel.table_data), ["app/csv.CSV", "mysql/user.MAD"]);
        assert_eq!(
            names(&sel.late_table_data),
            ["mysql/general_log.CSV", "mysql/table_stats.MAD"]
        );
        assert_eq!(sel.innodb_system_tables, ["gtid_slave_pos"]);
        assert_eq!(sel.innodb_user_tables, ["app.inno", "app.parted"]);

        // A server without InnoDB: the definitions are copied like any other.
        let sel = select(p, &[&p.join("#rocksdb"), &p.join("ckpt")], false).unwrap();
        assert!(sel.innodb_system_tables.is_empty() && sel.innodb_user_tables.is_empty());
        assert!(names(&sel.schema).contains(&"mysql/gtid_slave_pos.frm".to_string()));
    }
}
