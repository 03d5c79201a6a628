//! `info`: what a backup holds, from its manifest. The same summary is the backup's
//! `--report`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::cli::InfoArgs;
use crate::error::{Error, IoContext, Result};
use crate::format::layout::BEGIN_NAME;
use crate::format::manifest::{Kind, Manifest};
use crate::log::human;
use crate::restore::backup_dir::BackupDir;

/// Files and bytes of one kind.
#[derive(Debug, Default, Serialize)]
pub struct KindTotals {
    pub files: u64,
    /// Bytes of the files as they are (restored).
    pub bytes: u64,
    /// Bytes as stored in the backup (compressed, when compressed).
    pub stored_bytes: u64,
    /// `bytes / stored_bytes`.
    pub compression_ratio: f64,
}

/// What a backup holds.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub complete: bool,
    pub manifest_format: u32,
    pub tool: String,
    pub server_version: Option<String>,
    pub server_host: Option<String>,
    /// Seconds since the epoch.
    pub started: Option<i64>,
    pub finished: Option<i64>,
    pub binlog_file: Option<String>,
    pub binlog_position: Option<u64>,
    pub gtid_binlog_pos: Option<String>,
    pub gtid_slave_pos: Option<String>,
    pub commit_stall_ms: Option<f64>,
    pub ddl_block_ms: Option<f64>,
    pub rounds: usize,
    pub compression: Option<String>,
    pub files: u64,
    pub bytes: u64,
    pub stored_bytes: u64,
    pub compression_ratio: f64,
    pub kinds: BTreeMap<&'static str, KindTotals>,
    /// InnoDB user tables read from the consistent snapshot (`--innodb=logical`).
    pub innodb_tables: Vec<InnodbTable>,
    /// InnoDB user tables left out (`--innodb=skip`).
    pub skipped_innodb_tables: Vec<String>,
}

/// One InnoDB table copied logically.
#[derive(Debug, Serialize)]
pub struct InnodbTable {
    /// `schema.table`.
    pub table: String,
    pub rows: u64,
    /// Bytes of its rows as text, and as stored (compressed).
    pub bytes: u64,
    pub stored_bytes: u64,
    /// Its data and indexes in InnoDB on the source.
    pub size_on_server: u64,
}

/// Tables named one by one in `info`'s text; the JSON lists all.
const LISTED_TABLES: usize = 20;

impl Summary {
    pub fn of(manifest: &Manifest<Value>) -> Summary {
        let b = &manifest.backup;
        let mut kinds: BTreeMap<&'static str, KindTotals> = BTreeMap::new();
        for f in &manifest.files {
            let k = kinds.entry(f.kind.name()).or_default();
            k.files += 1;
            k.bytes += f.original_size();
            k.stored_bytes += f.size;
        }
        for k in kinds.values_mut() {
            k.compression_ratio = ratio(k.bytes, k.stored_bytes);
        }
        let bytes = kinds.values().map(|k| k.bytes).sum();
        let stored_bytes = kinds.values().map(|k| k.stored_bytes).sum();
        let text = |v: &Value| v.as_str().map(str::to_string);
        let stored: BTreeMap<&str, u64> = manifest
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.size))
            .collect();
        let logical = b["innodb_logical"]["tables"].as_array();
        let innodb_tables = logical
            .into_iter()
            .flatten()
            .map(|t| InnodbTable {
                table: format!(
                    "{}.{}",
                    t["schema"].as_str().unwrap_or_default(),
                    t["name"].as_str().unwrap_or_default()
                ),
                rows: t["rows"].as_u64().unwrap_or_default(),
                bytes: t["bytes"].as_u64().unwrap_or_default(),
                stored_bytes: t["file"]
                    .as_str()
                    .and_then(|f| stored.get(f).copied())
                    .unwrap_or_default(),
                size_on_server: t["size_on_server"].as_u64().unwrap_or_default(),
            })
            .collect();
        let skipped_innodb_tables = b["skipped_innodb_tables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(text)
            .collect();
        Summary {
            complete: true,
            manifest_format: manifest.format,
            tool: manifest.tool.clone(),
            server_version: text(&b["server"]["version"]),
            server_host: text(&b["server"]["hostname"]),
            started: b["started"].as_i64(),
            finished: b["finished"].as_i64(),
            binlog_file: text(&b["binlog"]["file"]),
            binlog_position: b["binlog"]["position"].as_u64(),
            gtid_binlog_pos: text(&b["binlog"]["gtid_binlog_pos"]),
            gtid_slave_pos: text(&b["replica"]["gtid_slave_pos"]),
            commit_stall_ms: b["commit_stall_ms"].as_f64(),
            ddl_block_ms: b["ddl_block_ms"].as_f64(),
            rounds: b["rounds"].as_array().map_or(0, Vec::len),
            compression: manifest.compression.clone(),
            files: manifest.files.len() as u64,
            bytes,
            stored_bytes,
            compression_ratio: ratio(bytes, stored_bytes),
            kinds,
            innodb_tables,
            skipped_innodb_tables,
        }
    }

    /// What can be said of a backup without a manifest: only that it is incomplete.
    fn incomplete(dir: &BackupDir) -> Summary {
        let begin: Value = std::fs::read(dir.root.join(BEGIN_NAME))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Summary {
            complete: false,
            manifest_format: 0,
            tool: begin["tool"].as_str().unwrap_or_default().to_string(),
            server_version: None,
            server_host: None,
            started: begin["started"].as_i64(),
            finished: None,
            binlog_file: None,
            binlog_position: None,
            gtid_binlog_pos: None,
            gtid_slave_pos: None,
            commit_stall_ms: None,
            ddl_block_ms: None,
            rounds: 0,
            compression: None,
            files: dir.files.len() as u64,
            bytes: dir.files.values().sum(),
            stored_bytes: dir.files.values().sum(),
            compression_ratio: 1.0,
            kinds: BTreeMap::new(),
            innodb_tables: Vec::new(),
            skipped_innodb_tables: Vec::new(),
        }
    }

    /// The kinds in a fixed, readable order.
    fn kinds_in_order(&self) -> impl Iterator<Item = (&'static str, &KindTotals)> {
        let order = [
            Kind::Sst,
            Kind::Wal,
            Kind::RocksdbMeta,
            Kind::TableDef,
            Kind::TableData,
            Kind::Logical,
            Kind::Metadata,
            Kind::Unknown,
        ];
        order
            .into_iter()
            .filter_map(|k| self.kinds.get(k.name()).map(|t| (k.name(), t)))
    }

    pub fn print(&self, dir: &Path) {
        let time = |t: Option<i64>| t.map_or("-".into(), crate::log::local_datetime);
        println!("Backup:            {}", dir.display());
        println!(
            "Complete:          {}",
            if self.complete {
                "yes"
            } else {
                "NO (no manifest: interrupted or partial)"
            }
        );
        println!(
            "Written by:        {} (manifest format {})",
            self.tool, self.manifest_format
        );
        if let Some(v) = &self.server_version {
            println!(
                "Server:            {v} on {}",
                self.server_host.as_deref().unwrap_or("?")
            );
        }
        println!("Started:           {}", time(self.started));
        println!("Finished:          {}", time(self.finished));
        match (&self.binlog_file, self.binlog_position) {
            (Some(f), Some(p)) => println!(
                "Binary log:        {f}:{p}, GTID {}",
                self.gtid_binlog_pos.as_deref().unwrap_or("")
            ),
            _ if self.complete => println!("Binary log:        off"),
            _ => {}
        }
        if let Some(g) = &self.gtid_slave_pos {
            println!("Replica position:  gtid_slave_pos {g}");
        }
        if let Some(ms) = self.commit_stall_ms {
            println!(
                "Commit stall:      {ms:.1} ms (DDL blocked {:.1} ms), {} rounds",
                self.ddl_block_ms.unwrap_or_default(),
                self.rounds
            );
        }
        println!(
            "Compression:       {}",
            self.compression.as_deref().unwrap_or("none")
        );
        println!(
            "Files:             {} files, {} ({} stored, ratio {:.2})",
            self.files,
            human(self.bytes),
            human(self.stored_bytes),
            self.compression_ratio
        );
        for (name, k) in self.kinds_in_order() {
            println!(
                "  {name:<14}   {:>7} files {:>12} {:>12} stored  ratio {:.2}",
                k.files,
                human(k.bytes),
                human(k.stored_bytes),
                k.compression_ratio
            );
        }
        self.print_innodb();
    }

    fn print_innodb(&self) {
        if !self.innodb_tables.is_empty() {
            let sum = |f: fn(&InnodbTable) -> u64| self.innodb_tables.iter().map(f).sum::<u64>();
            println!(
                "InnoDB tables:     {} copied logically: {} rows, {} as text, {} stored ({} in InnoDB on the server)",
                self.innodb_tables.len(),
                sum(|t| t.rows),
                human(sum(|t| t.bytes)),
                human(sum(|t| t.stored_bytes)),
                human(sum(|t| t.size_on_server)),
            );
            let mut largest: Vec<&InnodbTable> = self.innodb_tables.iter().collect();
            largest.sort_by_key(|t| std::cmp::Reverse(t.size_on_server));
            for t in largest.iter().take(LISTED_TABLES) {
                println!(
                    "  {:<40} {:>12} rows {:>12} stored {:>12} on the server",
                    t.table,
                    t.rows,
                    human(t.stored_bytes),
                    human(t.size_on_server)
                );
            }
            if largest.len() > LISTED_TABLES {
                println!(
                    "  ... and {} smaller tables (--json lists them all)",
                    largest.len() - LISTED_TABLES
                );
            }
        }
        if !self.skipped_innodb_tables.is_empty() {
            println!(
                "InnoDB tables left out (--skip-innodb-tables): {}",
                self.skipped_innodb_tables.join(", ")
            );
        }
    }
}

fn ratio(bytes: u64, stored: u64) -> f64 {
    match stored {
        0 => 1.0,
        s => (bytes as f64 / s as f64 * 1000.0).round() / 1000.0,
    }
}

pub fn run(args: InfoArgs) -> Result<()> {
    let dir = BackupDir::open(&args.dir)?;
    let summary = match &dir.manifest {
        Some(m) => Summary::of(m),
        None if dir.is_ours() => Summary::incomplete(&dir),
        None => {
            return Err(Error::Corrupt(format!(
                "{} is not a backup of this tool (it has neither a manifest nor the marker {BEGIN_NAME})",
                args.dir.display()
            )))
        }
    };
    if args.json {
        let json = serde_json::to_string_pretty(&summary).expect("serialisable");
        println!("{json}");
    } else {
        summary.print(&args.dir);
    }
    Ok(())
}

/// Writes `value` as JSON into `path`, atomically (a temporary file renamed into place).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(value).expect("serialisable");
    json.push(b'\n');
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_path("create a file in", dir)?;
    std::io::Write::write_all(&mut tmp, &json).with_path("write", path)?;
    tmp.persist(path)
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e.error))?;
    Ok(())
}
