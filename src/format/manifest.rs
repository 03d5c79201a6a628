//! The backup's own record. Every backup this tool writes opens with a small marker file
//! and closes with a manifest listing every file: its kind, size and CRC-32, and for a file
//! stored compressed, the size and CRC-32 of both the stored bytes and the original. Neither
//! tar nor xbstream can tell a stream cut at a file boundary from a whole one, and xbstream's
//! CRCs do not cover file names; the marker says a manifest must follow, and the manifest
//! proves that every file arrived whole, under its own name. A directory backup is complete
//! once its manifest exists: it is written last, atomically.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::layout::{BEGIN_NAME, MANIFEST_NAME};
use crate::error::{Error, Result};

/// The manifest format this version writes. 1: no `format` field, no kinds, no compression.
pub const FORMAT_VERSION: u32 = 2;

pub fn tool_version() -> String {
    concat!("myrocks-hotbackup ", env!("CARGO_PKG_VERSION")).to_string()
}

/// Contents of the marker file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Begin {
    pub tool: String,
    /// Seconds since the epoch.
    pub started: i64,
    /// `zstd:LEVEL` when the files that follow are stored compressed (`.zst`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
}

impl Begin {
    pub fn now(compression: Option<String>) -> Vec<u8> {
        let begin = Begin {
            tool: tool_version(),
            started: crate::log::unix_now(),
            compression,
        };
        serde_json::to_vec_pretty(&begin).expect("serialisable")
    }

    /// True when a marker (its bytes) says the `.zst` files that follow are compressed by
    /// the backup.
    pub fn says_compressed(bytes: &[u8]) -> bool {
        serde_json::from_slice::<Begin>(bytes).is_ok_and(|b| b.compression.is_some())
    }
}

/// What a file is, for reports and for destinations that treat kinds differently.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A RocksDB table file: immutable once written.
    Sst,
    /// A RocksDB write-ahead log, up to the consistent point.
    Wal,
    /// RocksDB's MANIFEST, OPTIONS and CURRENT.
    RocksdbMeta,
    /// `.frm`, `.par`, `.TRG`, `.TRN`, `db.opt`.
    TableDef,
    /// The data and index files of non-RocksDB tables, the Aria log.
    TableData,
    /// The rows of an InnoDB table, read from the consistent snapshot and compressed by
    /// the backup (never compressed again).
    Logical,
    /// Files the backup writes itself: coordinates, the marker, SQL for the restore.
    Metadata,
    /// A manifest of format 1 does not say.
    #[default]
    Unknown,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sst => "sst",
            Kind::Wal => "wal",
            Kind::RocksdbMeta => "rocksdb_meta",
            Kind::TableDef => "table_def",
            Kind::TableData => "table_data",
            Kind::Logical => "logical",
            Kind::Metadata => "metadata",
            Kind::Unknown => "unknown",
        }
    }
}

/// One file of a backup. `path`, `size` and `crc32` describe the bytes as stored (what
/// `extract` and `verify` read); `original` what they decode to, when stored compressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub crc32: u32,
    #[serde(default)]
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<Original>,
}

/// The file a compressed one decodes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Original {
    pub path: String,
    pub size: u64,
    pub crc32: u32,
}

impl FileRecord {
    /// The record of bytes made in memory (the backup's own metadata).
    pub fn of_bytes(path: &str, data: &[u8]) -> FileRecord {
        FileRecord {
            path: path.to_string(),
            size: data.len() as u64,
            crc32: crc32fast::hash(data),
            kind: Kind::Metadata,
            original: None,
        }
    }

    /// The path the file has once restored (without a compression suffix).
    pub fn restored_path(&self) -> &str {
        self.original.as_ref().map_or(&self.path, |o| &o.path)
    }

    pub fn original_size(&self) -> u64 {
        self.original.as_ref().map_or(self.size, |o| o.size)
    }
}

/// Contents of the manifest. `backup` describes where the data came from (absent for
/// streams that are not database backups).
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest<B> {
    #[serde(default = "format_1")]
    pub format: u32,
    pub tool: String,
    /// `zstd:LEVEL` when files were stored compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    pub backup: B,
    /// Every file of the backup except the manifest itself.
    pub files: Vec<FileRecord>,
}

fn format_1() -> u32 {
    1
}

impl<B: Serialize> Manifest<B> {
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("serialisable");
        json.push(b'\n');
        json
    }
}

impl<B: for<'de> Deserialize<'de>> Manifest<B> {
    /// Parses a manifest, refusing one written in a format newer than this tool reads.
    pub fn parse(json: &[u8]) -> Result<Manifest<B>> {
        let manifest: Manifest<B> = serde_json::from_slice(json)
            .map_err(|e| Error::Corrupt(format!("{MANIFEST_NAME} is not a valid manifest: {e}")))?;
        if manifest.format > FORMAT_VERSION {
            return Err(Error::Refused(format!(
                "the backup's manifest has format {}, this {} reads up to {FORMAT_VERSION}: use a newer version",
                manifest.format,
                tool_version()
            )));
        }
        Ok(manifest)
    }
}

/// What is wrong with one file of a backup, against its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub path: String,
    /// `missing`, `truncated`, `altered`, `extra`, `unreadable`.
    pub problem: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.path, self.problem, self.detail)
    }
}

/// Compares what a backup holds (path → stored size and CRC-32) with its manifest and
/// names every difference. `None` for a file means its size is known but its bytes were
/// not read (a size check only).
pub fn compare(
    found: &BTreeMap<String, (u64, Option<u32>)>,
    manifest: &[FileRecord],
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut listed = std::collections::HashSet::new();
    for f in manifest {
        listed.insert(f.path.as_str());
        let problem = |problem, detail| Problem {
            path: f.path.clone(),
            problem,
            detail,
        };
        match found.get(&f.path) {
            None => problems.push(problem(
                "missing",
                "listed in the manifest, not in the backup".into(),
            )),
            Some(&(size, _)) if size < f.size => problems.push(problem(
                "truncated",
                format!("{size} bytes, the manifest says {}", f.size),
            )),
            Some(&(size, _)) if size != f.size => problems.push(problem(
                "altered",
                format!("{size} bytes, the manifest says {}", f.size),
            )),
            Some(&(_, Some(crc32))) if crc32 != f.crc32 => problems.push(problem(
                "altered",
                format!("CRC-32 {crc32:08x}, the manifest says {:08x}", f.crc32),
            )),
            Some(_) => {}
        }
    }
    for path in found.keys() {
        if path != MANIFEST_NAME && !listed.contains(path.as_str()) {
            problems.push(Problem {
                path: path.clone(),
                problem: "extra",
                detail: "in the backup, not in its manifest".into(),
            });
        }
    }
    problems
}

/// Checks what a stream delivered (path → size and CRC-32) against the manifest that came
/// with it. A stream that opened with the marker must close with a manifest.
pub fn verify_received(
    received: &BTreeMap<String, (u64, u32)>,
    manifest_json: Option<&[u8]>,
) -> Result<()> {
    let Some(json) = manifest_json else {
        if received.contains_key(BEGIN_NAME) {
            return Err(Error::Corrupt(format!(
                "the stream was written by myrocks-hotbackup but ends without its manifest \
                 ({MANIFEST_NAME}): it is truncated"
            )));
        }
        return Ok(());
    };
    let manifest: Manifest<serde_json::Value> = Manifest::parse(json)?;
    let found = received
        .iter()
        .map(|(p, &(size, crc))| (p.clone(), (size, Some(crc))))
        .collect();
    match compare(&found, &manifest.files).first() {
        None => Ok(()),
        Some(p) if p.problem == "missing" => Err(Error::Corrupt(format!(
            "{:?} is listed in the manifest but missing from the stream",
            p.path
        ))),
        Some(p) if p.problem == "extra" => Err(Error::Corrupt(format!(
            "{:?} is in the stream but not in its manifest",
            p.path
        ))),
        Some(p) => Err(Error::Corrupt(format!(
            "{:?} does not match the manifest: {}",
            p.path, p.detail
        ))),
    }
}
