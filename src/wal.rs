//! The final checkpoint without a stall that grows with the number of SSTs.
//!
//! Creating a checkpoint hard-links every live SST (about 16 µs each): taken while commits
//! are blocked, that is a write stall of 160 ms at 10,000 SSTs. So the final checkpoint is
//! taken just *before* commits are blocked, and its RocksDB write-ahead log (WAL) is brought
//! forward to the consistent point instead: right after the checkpoint, and again while
//! commits are blocked, every live WAL file is hard-linked into the run's directory (a link
//! keeps the file's data even when RocksDB deletes its name), and under the block each
//! one's size is recorded. After the block, each WAL is sent up to that size: the
//! checkpoint's SSTs and MANIFEST plus a WAL that replays to the consistent point.
//!
//! That holds only if no WAL file the copy needs was deleted between the checkpoint and the
//! block. RocksDB deletes a WAL only after a flush, and every flush (or compaction) writes
//! to the MANIFEST: so under the block the live MANIFEST is compared with the checkpoint's
//! copy (same file, same size). If it changed, or a WAL cannot be linked (another
//! filesystem), the checkpoint is taken again under the block, as before: correct, and as
//! slow as before, in the rare case.
//!
//! A WAL's size read while RocksDB writes to it (a background statistics write is not held
//! back by the block) could end inside a record, and MyRocks recovers its WAL in absolute
//! consistency mode: so what is sent ends at the last complete record within that size.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// A WAL file as the backup sends it.
pub struct WalFile {
    pub source: PathBuf,
    pub name: String,
    /// Bytes to send: the file holds this many at least.
    pub size: u64,
}

/// Live WAL files pinned by hard links since the final checkpoint was taken.
pub struct WalPins {
    wal_dir: PathBuf,
    pin_dir: PathBuf,
    /// Pinned WALs by name, with their size under the block once recorded.
    pins: BTreeMap<String, Option<u64>>,
    /// The lowest WAL number the checkpoint holds: older WALs are not needed.
    oldest_needed: u64,
}

/// Why the fast path was not taken, for the log.
pub type Fallback = String;

impl WalPins {
    /// Right after the checkpoint `checkpoint` was created: pins the live WALs it may need.
    /// `pin_dir` must be on the WAL's filesystem; if it is not, returns why.
    pub fn pin(
        wal_dir: &Path,
        checkpoint: &Path,
        pin_dir: PathBuf,
    ) -> Result<std::result::Result<WalPins, Fallback>> {
        let dev = |p: &Path| fs::metadata(p).with_path("stat", p).map(|m| m.dev());
        if dev(wal_dir)? != dev(&pin_dir)? {
            return Ok(Err(format!(
                "the WAL directory {} is on another filesystem than the checkpoints",
                wal_dir.display()
            )));
        }
        let oldest_needed = wal_numbers(checkpoint)?.keys().next().copied().unwrap_or(0);
        let mut pins = WalPins {
            wal_dir: wal_dir.to_path_buf(),
            pin_dir,
            pins: BTreeMap::new(),
            oldest_needed,
        };
        Ok(pins.link_new()?.map(|()| pins))
    }

    /// Under the block: pins WALs created since, and records every pinned WAL's size.
    /// Returns why the checkpoint must be taken again, if it must.
    pub fn record_under_block(
        &mut self,
        rocksdb_dir: &Path,
        checkpoint: &Path,
    ) -> Result<Option<Fallback>> {
        if let Some(why) = manifest_changed(rocksdb_dir, checkpoint)? {
            return Ok(Some(why));
        }
        if let Err(why) = self.link_new()? {
            return Ok(Some(why));
        }
        for (name, size) in self.pins.iter_mut() {
            let pinned = self.pin_dir.join(name);
            *size = Some(fs::metadata(&pinned).with_path("stat", &pinned)?.len());
        }
        for (name, ckpt_size) in wal_numbers(checkpoint)?.into_values() {
            match self.pins.get(&name) {
                Some(Some(size)) if *size >= ckpt_size => {}
                Some(_) => {
                    return Ok(Some(format!(
                        "WAL {name} is shorter than in the checkpoint"
                    )))
                }
                None => {} // closed before the checkpoint: its copy there is whole
            }
        }
        Ok(None)
    }

    /// The WAL files to send: the pinned ones up to their last complete record within the
    /// size recorded under the block, and those only the checkpoint holds.
    pub fn files(&self, checkpoint: &Path) -> Result<Vec<WalFile>> {
        let mut files = Vec::new();
        for (name, ckpt_size) in wal_numbers(checkpoint)?.into_values() {
            if !self.pins.contains_key(&name) {
                files.push(WalFile {
                    source: checkpoint.join(&name),
                    name,
                    size: ckpt_size,
                });
            }
        }
        for (name, size) in &self.pins {
            let source = self.pin_dir.join(name);
            let recorded = size.expect("recorded under the block");
            let size = complete_prefix(&source, recorded)?;
            if size < recorded {
                crate::warn!(
                    "WAL {name}: {} bytes after its last complete record left out (a write in progress)",
                    recorded - size
                );
            }
            files.push(WalFile {
                source,
                name: name.clone(),
                size,
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }

    /// The WAL files of a checkpoint taken while commits were blocked: whole.
    pub fn checkpoint_files(checkpoint: &Path) -> Result<Vec<WalFile>> {
        Ok(wal_numbers(checkpoint)?
            .into_values()
            .map(|(name, size)| WalFile {
                source: checkpoint.join(&name),
                name,
                size,
            })
            .collect())
    }

    /// Links every live WAL not yet pinned and not older than the checkpoint needs.
    fn link_new(&mut self) -> Result<std::result::Result<(), Fallback>> {
        for (number, (name, _)) in wal_numbers(&self.wal_dir)? {
            if number < self.oldest_needed || self.pins.contains_key(&name) {
                continue;
            }
            match fs::hard_link(self.wal_dir.join(&name), self.pin_dir.join(&name)) {
                Ok(()) => {}
                // Deleted since the listing: it was obsolete, or the MANIFEST check fails.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Ok(Err(format!("cannot link WAL {name}: {e}"))),
            }
            self.pins.insert(name, None);
        }
        Ok(Ok(()))
    }
}

/// The RocksDB WAL files (`000123.log`) of a directory, by number, with name and size.
fn wal_numbers(dir: &Path) -> Result<BTreeMap<u64, (String, u64)>> {
    let mut wals = BTreeMap::new();
    for entry in fs::read_dir(dir).with_path("list", dir)? {
        let entry = entry.with_path("list", dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(number) = name
            .strip_suffix(".log")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let size = match entry.metadata() {
            Ok(md) => md.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(crate::error::Error::io(format!("cannot stat {name}"), e)),
        };
        wals.insert(number, (name, size));
    }
    Ok(wals)
}

/// Whether the live MANIFEST differs from the checkpoint's copy (another file, or longer):
/// a flush or compaction finished since, which may have deleted a WAL.
fn manifest_changed(rocksdb_dir: &Path, checkpoint: &Path) -> Result<Option<Fallback>> {
    let current = |dir: &Path| -> Result<String> {
        let path = dir.join("CURRENT");
        Ok(fs::read_to_string(&path)
            .with_path("read", &path)?
            .trim_end()
            .to_string())
    };
    let (live, ours) = (current(rocksdb_dir)?, current(checkpoint)?);
    if live != ours {
        return Ok(Some(format!("RocksDB switched from {ours} to {live}")));
    }
    let size = |p: PathBuf| fs::metadata(&p).with_path("stat", &p).map(|m| m.len());
    let (live_size, our_size) = (
        size(rocksdb_dir.join(&live))?,
        size(checkpoint.join(&ours))?,
    );
    if live_size != our_size {
        return Ok(Some(format!(
            "a flush or compaction finished after the checkpoint ({live} grew from {our_size} to {live_size} bytes)"
        )));
    }
    Ok(None)
}

/// RocksDB's log format: 32 KiB blocks of records, each with a header of checksum (4),
/// length (2) and type (1); the recyclable types add a log number (4).
const BLOCK: u64 = 32 << 10;
const HEADER: u64 = 7;
const RECYCLABLE_HEADER: u64 = 11;

/// The end of the last complete record of the log at `path` within its first `limit` bytes.
pub fn complete_prefix(path: &Path, limit: u64) -> Result<u64> {
    let file = File::open(path).with_path("open", path)?;
    let mut input = BufReader::with_capacity(1 << 20, file.take(limit));
    let (mut pos, mut complete) = (0u64, 0u64);
    let mut header = [0u8; RECYCLABLE_HEADER as usize];
    loop {
        let left_in_block = BLOCK - pos % BLOCK;
        if left_in_block < HEADER {
            // A block's trailer: padding too short for a header.
            if pos + left_in_block > limit {
                break;
            }
            skip(&mut input, left_in_block).with_path("read", path)?;
            pos += left_in_block;
            continue;
        }
        if pos + HEADER > limit {
            break;
        }
        input
            .read_exact(&mut header[..HEADER as usize])
            .with_path("read", path)?;
        let len = u16::from_le_bytes([header[4], header[5]]) as u64;
        let kind = header[6];
        let header_len = match kind {
            1..=4 => HEADER,
            5..=8 => RECYCLABLE_HEADER,
            _ => break, // zeros past the end of the data, or not a record
        };
        let end = pos + header_len + len;
        if end > limit || end > pos + left_in_block {
            break;
        }
        skip(&mut input, header_len - HEADER + len).with_path("read", path)?;
        pos = end;
        // Full and last fragments end a logical record.
        if matches!(kind, 1 | 4 | 5 | 8) {
            complete = pos;
        }
    }
    Ok(complete)
}

fn skip(input: &mut impl Read, n: u64) -> std::io::Result<()> {
    let skipped = std::io::copy(&mut input.take(n), &mut std::io::sink())?;
    if skipped < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes logical records as RocksDB's log writer does (fragments across blocks).
    fn log(records: &[usize]) -> (Vec<u8>, Vec<u64>) {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for &len in records {
            let mut left = len;
            let mut first = true;
            loop {
                let room = BLOCK as usize - out.len() % BLOCK as usize;
                if room < HEADER as usize {
                    out.extend(std::iter::repeat_n(0, room));
                    continue;
                }
                let take = left.min(room - HEADER as usize);
                let last = take == left;
                let kind = match (first, last) {
                    (true, true) => 1,
                    (true, false) => 2,
                    (false, false) => 3,
                    (false, true) => 4,
                };
                out.extend_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd]);
                out.extend_from_slice(&(take as u16).to_le_bytes());
                out.push(kind);
                out.extend(std::iter::repeat_n(0x5a, take));
                left -= take;
                first = false;
                if last {
                    break;
                }
            }
            ends.push(out.len() as u64);
        }
        (out, ends)
    }

    #[test]
    fn a_cut_inside_a_record_falls_back_to_the_last_whole_one() {
        let (bytes, ends) = log(&[100, 40_000, 32_700, 5, 70_000, 300]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000007.log");
        fs::write(&path, &bytes).unwrap();
        assert_eq!(
            complete_prefix(&path, bytes.len() as u64).unwrap(),
            *ends.last().unwrap()
        );
        let cuts = (0..bytes.len() as u64)
            .step_by(97)
            .chain(ends.iter().flat_map(|&e| [e - 1, e, e + 1]))
            .filter(|&c| c <= bytes.len() as u64);
        for cut in cuts {
            let want = ends
                .iter()
                .copied()
                .filter(|&e| e <= cut)
                .max()
                .unwrap_or(0);
            assert_eq!(complete_prefix(&path, cut).unwrap(), want, "cut at {cut}");
        }
        // Preallocated zeros after the data end the log.
        let mut padded = bytes.clone();
        padded.extend(std::iter::repeat_n(0, 5000));
        fs::write(&path, &padded).unwrap();
        assert_eq!(
            complete_prefix(&path, padded.len() as u64).unwrap(),
            *ends.last().unwrap()
        );
    }
}
