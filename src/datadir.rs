//! Which files of a MariaDB datadir a MyRocks backup takes besides the RocksDB data: table
//! definitions and the files of non-transactional engines, per database directory, and the
//! Aria log at the root. An explicit list of extensions, not the original tool's pattern
//! (a character class that matched `notes.txt`). Never InnoDB files, binary logs, temporary
//! or crash-recovery files. InnoDB tables are recognised by the engine byte of their `.frm`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Extensions of files that belong to a table or database and can be copied as they are.
const TABLE_EXTENSIONS: &[&str] = &[
    "frm", "par", "TRG", "TRN", "opt", "MYD", "MYI", "MAD", "MAI", "MRG", "ARM", "ARZ", "CSM",
    "CSV",
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
    /// `aria_log_control` and `aria_log.*`: copied last, at the consistent point.
    pub aria_logs: Vec<DatadirFile>,
    /// InnoDB tables of the `mysql` schema, as `table` names: re-created at restore.
    pub innodb_system_tables: Vec<String>,
    /// InnoDB tables elsewhere, as `db.table`: a RocksDB backup cannot hold them.
    pub innodb_user_tables: Vec<String>,
}

/// Walks `datadir`, skipping the directories in `skip` (RocksDB data, WAL, checkpoints).
pub fn select(datadir: &Path, skip: &[&Path]) -> Result<Selection> {
    let mut sel = Selection::default();
    for entry in sorted_entries(datadir)? {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        let md = match fs::metadata(&entry) {
            Ok(md) => md,
            // Gone since the listing (a purged binary log), or a dangling link: not ours.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("cannot stat {}", entry.display()), e)),
        };
        if md.is_file() && (name == "aria_log_control" || is_aria_log(&name)) {
            sel.aria_logs.push(DatadirFile {
                source: entry,
                name,
            });
        } else if md.is_dir() && is_database_dir(&name) && !skip.iter().any(|s| same_dir(s, &entry))
        {
            select_database(&entry, &name, &mut sel)?;
        }
    }
    Ok(sel)
}

fn select_database(dir: &Path, db: &str, sel: &mut Selection) -> Result<()> {
    for entry in sorted_entries(dir)? {
        let file = entry.file_name().unwrap().to_string_lossy().into_owned();
        let Some((stem, ext)) = file.rsplit_once('.') else {
            continue;
        };
        if file.starts_with("#sql") || !TABLE_EXTENSIONS.contains(&ext) || !entry.is_file() {
            continue;
        }
        if ext == "frm" && is_innodb_table(&entry)? {
            match db {
                "mysql" => sel.innodb_system_tables.push(stem.to_string()),
                _ => sel.innodb_user_tables.push(format!("{db}.{stem}")),
            }
            continue;
        }
        if ext == "par"
            && dir.join(format!("{stem}.frm")).is_file()
            && is_innodb_table(&dir.join(format!("{stem}.frm")))?
        {
            continue;
        }
        let f = DatadirFile {
            source: entry.clone(),
            name: format!("{db}/{file}"),
        };
        match ext {
            "frm" | "par" | "TRG" | "TRN" | "opt" => sel.schema.push(f),
            _ => sel.table_data.push(f),
        }
    }
    Ok(())
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
            ("app/csv.CSV", vec![]),
            ("#rocksdb/000001.sst", vec![]),
            ("ckpt/x.frm", frm(45)),
            (".hidden/y.frm", frm(45)),
        ];
        for (name, data) in files {
            fs::write(p.join(name), data).unwrap();
        }
        let sel = select(p, &[&p.join("#rocksdb"), &p.join("ckpt")]).unwrap();
        let names = |v: &[DatadirFile]| v.iter().map(|f| f.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&sel.aria_logs),
            ["aria_log.00000001", "aria_log_control"]
        );
        assert_eq!(
            names(&sel.schema),
            [
                "app/db.opt",
                "app/t.frm",
                "app/trg.TRG",
                "app/v.frm",
                "mysql/user.frm"
            ]
        );
        assert_eq!(names(&sel.table_data), ["app/csv.CSV", "mysql/user.MAD"]);
        assert_eq!(sel.innodb_system_tables, ["gtid_slave_pos"]);
        assert_eq!(sel.innodb_user_tables, ["app.inno", "app.parted"]);
    }
}
