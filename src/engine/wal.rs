//! The final checkpoint without a stall that grows with the number of SSTs.
//!
//! Creating a checkpoint hard-links every live SST (about 30 µs each here): taken while
//! commits are blocked, that is a write stall of 300 ms at 10,000 SSTs. So the final
//! checkpoint is taken just *before* commits are blocked, and its RocksDB write-ahead log
//! (WAL) is brought forward to the consistent point instead: right after the checkpoint,
//! and again while commits are blocked, every live WAL file is hard-linked into the run's
//! directory (a link keeps the file's data even when RocksDB deletes its name; WALs created
//! in between are known from an inotify watch, not by listing a directory of thousands of
//! SSTs under the block), and under the block each one's size is recorded. After the block, each WAL is sent up to that size:
//! the checkpoint's SSTs and MANIFEST plus a WAL that replays to the consistent point.
//!
//! This is exact only under conditions that are all checked while commits are blocked;
//! when one fails, the checkpoint is taken again under the block (correct, and as slow as
//! a checkpoint is):
//! - **Every commit is in the WAL file.** With `rocksdb_manual_wal_flush` on (MariaDB's
//!   default) RocksDB keeps WAL records in the server's memory until the next synced write,
//!   and with the binary log on, the commit markers of the last transactions before the
//!   block stay there for the whole block; MariaDB offers no statement that writes them
//!   out without flushing the memtables. So this path is taken only with
//!   `rocksdb_manual_wal_flush=OFF`, where each record reaches the file as it is written,
//!   and not with `rocksdb_write_disable_wal` on globally. (A session that sets it for
//!   itself is not seen: its writes between the checkpoint and the block would be missed.)
//! - **No WAL the copy needs was deleted.** RocksDB deletes a WAL only once a flush has
//!   moved a log number, and it records that in the MANIFEST: the live MANIFEST must still be
//!   the checkpoint's file, and every edit written to it since (compactions write theirs
//!   all the time) must move no log number, add or drop no column family, and hold no field
//!   this reader does not know. Checked after the WALs are linked and measured; every WAL
//!   of the checkpoint must still be pinned.
//! - **Each WAL ends with a whole record** at the recorded size (a background write is not
//!   held back by the block), checked by reading the last block(s) of the log's framing.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use inotify::{EventMask, Inotify, WatchMask};

use crate::error::{Error, IoContext, Result};
use crate::server::ServerInfo;

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
    /// Files created in the WAL directory since just before the pins were taken: under the
    /// block, new WALs are found here rather than by listing a directory that may hold
    /// thousands of SSTs. None when no watch could be set (the directory is listed then).
    created: Option<Inotify>,
    pin_dir: PathBuf,
    /// The checkpoint's WAL files, by number: name and size.
    in_checkpoint: BTreeMap<u64, (String, u64)>,
    /// Pinned WALs by name, with their size under the block once recorded.
    pins: BTreeMap<String, Option<u64>>,
}

/// Why the fast path was not taken, for the log.
pub type Fallback = String;

impl WalPins {
    /// Right after the checkpoint `checkpoint` was created: pins the live WALs it may need
    /// into `pin_dir`, or says why the WAL cannot be brought forward on this server.
    pub fn pin(
        server: &ServerInfo,
        checkpoint: &Path,
        pin_dir: PathBuf,
    ) -> Result<std::result::Result<WalPins, Fallback>> {
        if server.rocksdb_manual_wal_flush {
            return Ok(Err(
                "rocksdb_manual_wal_flush is on, so the last commits may still be in the server's \
                 memory (a server started with --skip-rocksdb-manual-wal-flush has a shorter stall)"
                    .into(),
            ));
        }
        if server.rocksdb_write_disable_wal {
            return Ok(Err(
                "rocksdb_write_disable_wal is on: writes may not be in the WAL".into(),
            ));
        }
        let wal_dir = &server.rocksdb_wal_dir;
        let dev = |p: &Path| fs::metadata(p).with_path("stat", p).map(|m| m.dev());
        if dev(wal_dir)? != dev(&pin_dir)? {
            return Ok(Err(format!(
                "the WAL directory {} is on another filesystem than the checkpoints",
                wal_dir.display()
            )));
        }
        // Watch first, then list: a WAL created in between is seen by one or the other.
        let created = Inotify::init().and_then(|watch| {
            watch
                .watches()
                .add(wal_dir, WatchMask::CREATE | WatchMask::MOVED_TO)?;
            Ok(watch)
        });
        let mut pins = WalPins {
            wal_dir: wal_dir.to_path_buf(),
            created: created.ok(),
            pin_dir,
            in_checkpoint: wal_numbers(checkpoint)?,
            pins: BTreeMap::new(),
        };
        Ok(pins.link_new()?.map(|()| pins))
    }

    /// Under the block: pins WALs created since, records every pinned WAL's size, and
    /// checks that the copy is exact. Returns why the checkpoint must be taken again, if so.
    pub fn record_under_block(
        &mut self,
        rocksdb_dir: &Path,
        checkpoint: &Path,
    ) -> Result<Option<Fallback>> {
        let linked = match self.created.is_some() {
            true => self.link_created()?,
            false => self.link_new()?,
        };
        if let Err(why) = linked {
            return Ok(Some(why));
        }
        for (name, size) in self.pins.iter_mut() {
            let pinned = self.pin_dir.join(name.as_str());
            let recorded = fs::metadata(&pinned).with_path("stat", &pinned)?.len();
            // The last block only: under the block, a long walk back is not worth it.
            if complete_prefix(&pinned, recorded, 1)? != Some(recorded) {
                return Ok(Some(format!("WAL {name} does not end with a whole record")));
            }
            *size = Some(recorded);
        }
        for (name, ckpt_size) in self.in_checkpoint.values() {
            match self.pins.get(name) {
                Some(Some(size)) if size >= ckpt_size => {}
                Some(_) => {
                    return Ok(Some(format!(
                        "WAL {name} is shorter than in the checkpoint"
                    )))
                }
                None => return Ok(Some(format!("WAL {name} was deleted after the checkpoint"))),
            }
        }
        // Last: a flush that deleted a WAL after the links above shows here.
        manifest_changed(rocksdb_dir, checkpoint)
    }

    /// The WAL files to send: the pinned ones, up to the size recorded under the block.
    pub fn files(&self) -> Vec<WalFile> {
        self.pins
            .iter()
            .map(|(name, size)| WalFile {
                source: self.pin_dir.join(name),
                name: name.clone(),
                size: size.expect("recorded under the block"),
            })
            .collect()
    }

    /// The WAL files of a checkpoint taken while commits were blocked, each up to its last
    /// whole record (a background write may have been in progress when RocksDB copied it).
    pub fn checkpoint_files(checkpoint: &Path) -> Result<Vec<WalFile>> {
        let mut files = Vec::new();
        for (name, size) in wal_numbers(checkpoint)?.into_values() {
            let source = checkpoint.join(&name);
            // A log of a format not read here is sent as RocksDB copied it.
            let whole = complete_prefix(&source, size, usize::MAX)?.unwrap_or(size);
            if whole < size {
                crate::warn!(
                    "WAL {name}: {} bytes after its last whole record left out (a write in progress)",
                    size - whole
                );
            }
            files.push(WalFile {
                source,
                name,
                size: whole,
            });
        }
        Ok(files)
    }

    /// Links every live WAL not yet pinned and not older than the checkpoint's oldest.
    fn link_new(&mut self) -> Result<std::result::Result<(), Fallback>> {
        let names: Vec<(u64, String)> = wal_numbers(&self.wal_dir)?
            .into_iter()
            .map(|(number, (name, _))| (number, name))
            .collect();
        self.link(names)
    }

    /// Links the WALs created since the watch began (and not yet pinned).
    fn link_created(&mut self) -> Result<std::result::Result<(), Fallback>> {
        let watch = self.created.as_mut().expect("watching");
        let mut buf = [0u8; 4096];
        let mut names = Vec::new();
        loop {
            let events = match watch.read_events(&mut buf) {
                Ok(events) => events,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Ok(Err(format!("cannot read the WAL directory's events: {e}"))),
            };
            for event in events {
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    return Ok(Err(
                        "too many files were created in the WAL directory".into()
                    ));
                }
                let name = event.name.map(|n| n.to_string_lossy().into_owned());
                let number = name.as_deref().and_then(wal_number);
                if let (Some(name), Some(number)) = (name, number) {
                    names.push((number, name));
                }
            }
        }
        self.link(names)
    }

    fn link(&mut self, names: Vec<(u64, String)>) -> Result<std::result::Result<(), Fallback>> {
        let oldest = self.in_checkpoint.keys().next().copied().unwrap_or(0);
        for (number, name) in names {
            if number < oldest || self.pins.contains_key(&name) {
                continue;
            }
            match fs::hard_link(self.wal_dir.join(&name), self.pin_dir.join(&name)) {
                Ok(()) => {}
                // Purged since the listing: not one the checkpoint holds (checked later), so
                // obsolete before it; a deletion after it shows in the MANIFEST.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Ok(Err(format!("cannot link WAL {name}: {e}"))),
            }
            self.pins.insert(name, None);
        }
        Ok(Ok(()))
    }
}

/// The number of a RocksDB WAL file's name (`000123.log`).
fn wal_number(name: &str) -> Option<u64> {
    name.strip_suffix(".log")?.parse().ok()
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
            Err(e) => return Err(Error::io(format!("cannot stat {name}"), e)),
        };
        wals.insert(number, (name, size));
    }
    Ok(wals)
}

/// Whether the live MANIFEST has changed since the checkpoint's copy in a way that may have
/// let RocksDB delete a WAL: another file, or new edits that move a log number (a flush).
/// Edits of compactions (files added and deleted, sequence and file counters) do not.
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
    let live_size = match fs::metadata(rocksdb_dir.join(&live)) {
        Ok(md) => md.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some(format!("RocksDB replaced {live}")))
        }
        Err(e) => return Err(Error::io(format!("cannot stat {live}"), e)),
    };
    let ours_path = checkpoint.join(&ours);
    let our_size = fs::metadata(&ours_path)
        .with_path("stat", &ours_path)?
        .len();
    if live_size == our_size {
        return Ok(None);
    }
    if live_size < our_size {
        return Ok(Some(format!(
            "{live} is shorter than the checkpoint's copy"
        )));
    }
    let path = rocksdb_dir.join(&live);
    let mut tail = vec![0u8; (live_size - our_size) as usize];
    let read = File::open(&path).and_then(|mut f| {
        f.seek(SeekFrom::Start(our_size))?;
        f.read_exact(&mut tail)
    });
    if let Err(e) = read {
        return Ok(Some(format!("cannot read {live}: {e}")));
    }
    let records = log_records(&tail, our_size);
    match records.and_then(|r| {
        r.iter()
            .try_for_each(|e| edit_keeps_wals(e))
            .map(|()| r.len())
    }) {
        Ok(edits) => {
            crate::info!(
                "{live} recorded {edits} edits after the checkpoint (compactions), none that lets RocksDB delete a WAL"
            );
            Ok(None)
        }
        Err(why) => Ok(Some(format!("after the checkpoint, {live} recorded {why}"))),
    }
}

/// The records of a piece of a log that starts at offset `start` of the file on a record
/// boundary, fragments joined. The piece must end on a record boundary too.
fn log_records(piece: &[u8], start: u64) -> std::result::Result<Vec<Vec<u8>>, String> {
    let (mut records, mut partial) = (Vec::new(), None::<Vec<u8>>);
    let mut pos = 0usize;
    while pos < piece.len() {
        let left_in_block = (BLOCK - (start + pos as u64) % BLOCK) as usize;
        if left_in_block < HEADER {
            pos += left_in_block; // the block's trailer
            continue;
        }
        let header = piece
            .get(pos..pos + HEADER)
            .ok_or("an edit being written")?;
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let body = piece
            .get(pos + HEADER..pos + HEADER + len)
            .ok_or("an edit being written")?;
        match (header[6], partial.take()) {
            (1, None) => records.push(body.to_vec()),
            (2, None) => partial = Some(body.to_vec()),
            (3, Some(mut r)) => {
                r.extend_from_slice(body);
                partial = Some(r);
            }
            (4, Some(mut r)) => {
                r.extend_from_slice(body);
                records.push(r);
            }
            (kind, _) => return Err(format!("a log record of unexpected type {kind}")),
        }
        pos += HEADER + len;
    }
    match partial {
        None => Ok(records),
        Some(_) => Err("an edit being written".into()),
    }
}

/// Reads one RocksDB VersionEdit, every field of it, and says why it may have let a WAL be
/// deleted: a log number moved, a column family added or dropped, or a field this reader
/// does not know (then it cannot tell). Tag numbers are RocksDB's (`version_edit.h`).
fn edit_keeps_wals(edit: &[u8]) -> std::result::Result<(), String> {
    let mut r = Reader(edit);
    let (mut added, mut deleted) = (false, false);
    while !r.0.is_empty() {
        let tag = r.varint()?;
        match tag {
            1 => r.skip_slice()?,                                 // comparator
            3 | 4 => r.skip_varints(1)?,                          // next file number, last sequence
            5 => r.skip_varints(1).and_then(|_| r.skip_slice())?, // compaction cursor
            6 => r.skip_varints(2)?,                              // deleted file: level, number
            7 => r.skip_new_file(3, 0)?,                          // new file: level, number, size
            100 => r.skip_new_file(3, 2)?,                        // + smallest and largest seqno
            102 => r.skip_new_file(4, 2)?,                        // + path id
            103 => {
                // level, number, size, keys, seqnos, then tagged fields up to kTerminate (1);
                // field 3 is where a flush records the minimum log number to keep
                r.skip_new_file(3, 2)?;
                loop {
                    match r.varint()? {
                        1 => break,
                        3 => return Err("a flush (a minimum log number to keep)".into()),
                        _ => r.skip_slice()?,
                    }
                }
            }
            9 => {
                // prev log number: written into every edit, 0 unless a legacy DB set it
                if r.varint()? != 0 {
                    return Err("a previous log number".into());
                }
            }
            200 | 203 | 300 => r.skip_varints(1)?, // column family, max, atomic group
            2 | 10 => return Err("a flush (a new log number)".into()),
            201 | 202 => return Err("a column family added or dropped".into()),
            other => return Err(format!("an edit field this tool does not read ({other})")),
        }
        added |= matches!(tag, 7 | 100 | 102 | 103);
        deleted |= tag == 6;
    }
    // A compaction (or a move between levels) replaces files; files added alone come from
    // a flush or an ingestion (a bulk load), whose rows are in no WAL.
    if added && !deleted {
        return Err("files added without a compaction (a flush or a bulk load)".into());
    }
    Ok(())
}

/// A cursor over an edit's bytes.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut value = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err("a malformed edit".into())
    }

    fn skip_varints(&mut self, n: usize) -> std::result::Result<(), String> {
        (0..n).try_for_each(|_| self.varint().map(|_| ()))
    }

    fn skip_slice(&mut self) -> std::result::Result<(), String> {
        let len = self.varint()? as usize;
        self.0 = self.0.get(len..).ok_or("a malformed edit")?;
        Ok(())
    }

    /// A new file's numbers before its two keys, the keys, and the numbers after them.
    fn skip_new_file(&mut self, before: usize, after: usize) -> std::result::Result<(), String> {
        self.skip_varints(before)?;
        self.skip_slice()?;
        self.skip_slice()?;
        self.skip_varints(after)
    }
}

/// RocksDB's log format: 32 KiB blocks of records, each with a header of checksum (4),
/// length (2) and type (1: a full record; 2, 3, 4: first, middle and last fragment). A
/// block always starts with a header, so the end of a log is read from its last blocks only.
const BLOCK: u64 = 32 << 10;
const HEADER: usize = 7;

/// The end of the last whole record of the log at `path` within its first `limit` bytes,
/// read from at most `blocks` blocks back from there. None when there is none in those
/// blocks, or a record of another format (a recycled log's) comes first.
pub fn complete_prefix(path: &Path, limit: u64, blocks: usize) -> Result<Option<u64>> {
    if limit == 0 {
        return Ok(Some(0));
    }
    let mut file = File::open(path).with_path("open", path)?;
    let mut block_start = (limit - 1) / BLOCK * BLOCK;
    for _ in 0..blocks {
        let end = limit.min(block_start + BLOCK);
        let mut block = vec![0u8; (end - block_start) as usize];
        file.seek(SeekFrom::Start(block_start))
            .and_then(|_| file.read_exact(&mut block))
            .with_path("read", path)?;
        let mut last_whole = None;
        let mut pos = 0usize;
        while pos + HEADER <= block.len() {
            let len = u16::from_le_bytes([block[pos + 4], block[pos + 5]]) as usize;
            let kind = block[pos + 6];
            if kind == 0 && len == 0 {
                break; // zeros: the block's trailer
            }
            if !(1..=4).contains(&kind) {
                return Ok(None);
            }
            let record_end = pos + HEADER + len;
            if record_end > block.len() {
                break; // cut inside this record
            }
            pos = record_end;
            if kind == 1 || kind == 4 {
                last_whole = Some(block_start + pos as u64);
            }
        }
        match last_whole {
            Some(end) => return Ok(Some(end)),
            None if block_start == 0 => return Ok(Some(0)),
            // Only fragments of a record that goes on: its start is in an earlier block.
            None => block_start -= BLOCK,
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log of records of the given lengths, and where each record ends.
    fn log(records: &[usize]) -> (Vec<u8>, Vec<u64>) {
        let (mut out, mut ends) = (Vec::new(), Vec::new());
        for &len in records {
            let start = out.len() as u64;
            out.extend(frame(&[vec![0x5a; len]], start));
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
            complete_prefix(&path, bytes.len() as u64, usize::MAX).unwrap(),
            ends.last().copied()
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
            assert_eq!(
                complete_prefix(&path, cut, usize::MAX).unwrap(),
                Some(want),
                "cut at {cut}"
            );
        }
        // Preallocated zeros after the data end the log.
        let mut padded = bytes.clone();
        padded.extend(std::iter::repeat_n(0, 5000));
        fs::write(&path, &padded).unwrap();
        assert_eq!(
            complete_prefix(&path, padded.len() as u64, usize::MAX).unwrap(),
            ends.last().copied()
        );
        // One block back at most: a cut inside the 40,000-byte record finds no end.
        assert_eq!(complete_prefix(&path, ends[0] + 35_000, 1).unwrap(), None);
        // A record of the recyclable format is not read.
        let mut recycled = bytes.clone();
        recycled[6] = 5;
        fs::write(&path, &recycled).unwrap();
        assert_eq!(complete_prefix(&path, 50, usize::MAX).unwrap(), None);
    }

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn slice(bytes: &[u8], out: &mut Vec<u8>) {
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    /// Frames records as RocksDB's log writer does, from file offset `start`.
    fn frame(records: &[Vec<u8>], start: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            let mut left: &[u8] = r;
            let mut first = true;
            loop {
                let room = (BLOCK - (start + out.len() as u64) % BLOCK) as usize;
                if room < HEADER {
                    out.extend(std::iter::repeat_n(0, room));
                    continue;
                }
                let take = left.len().min(room - HEADER);
                let last = take == left.len();
                let kind = match (first, last) {
                    (true, true) => 1,
                    (true, false) => 2,
                    (false, false) => 3,
                    (false, true) => 4,
                };
                out.extend_from_slice(&[0, 0, 0, 0]);
                out.extend_from_slice(&(take as u16).to_le_bytes());
                out.push(kind);
                out.extend_from_slice(&left[..take]);
                left = &left[take..];
                first = false;
                if last {
                    break;
                }
            }
        }
        out
    }

    /// A compaction's edit: files deleted and added (with tagged fields), counters, and the
    /// previous log number RocksDB writes into every edit.
    fn compaction_edit(big_key: usize) -> Vec<u8> {
        let mut e = Vec::new();
        for (tag, v) in [(200, 2), (9, 0), (3, 77), (4, 123_456)] {
            varint(tag, &mut e);
            varint(v, &mut e);
        }
        for number in [12, 13] {
            varint(6, &mut e);
            varint(0, &mut e);
            varint(number, &mut e);
        }
        varint(103, &mut e);
        for v in [1, 76, 4096] {
            varint(v, &mut e);
        }
        slice(&vec![b'a'; big_key], &mut e);
        slice(b"zz", &mut e);
        varint(5, &mut e);
        varint(900, &mut e);
        varint(66, &mut e); // a tagged field (say, the file's creation time)
        slice(&[1, 2, 3], &mut e);
        varint(1, &mut e); // kTerminate
        e
    }

    #[test]
    fn compaction_edits_keep_wals_and_flush_edits_do_not() {
        let start = 32_700; // near a block's end: the first record is fragmented
        let edits = vec![compaction_edit(10), compaction_edit(40_000)];
        let bytes = frame(&edits, start);
        let records = log_records(&bytes, start).unwrap();
        assert_eq!(records, edits);
        assert!(records.iter().all(|r| edit_keeps_wals(r).is_ok()));

        let mut flush = compaction_edit(10);
        varint(2, &mut flush); // a new log number
        varint(80, &mut flush);
        assert!(edit_keeps_wals(&flush).unwrap_err().contains("flush"));
        let mut min_log = compaction_edit(10);
        varint(10, &mut min_log);
        varint(80, &mut min_log);
        assert!(edit_keeps_wals(&min_log).is_err());
        let mut prev_log = Vec::new();
        varint(9, &mut prev_log);
        varint(5, &mut prev_log);
        assert!(edit_keeps_wals(&prev_log).is_err());
        // A bulk load's ingestion adds a file and deletes none; a 6.29 flush records its
        // minimum log number in custom field 3 of the new file.
        let mut ingestion = Vec::new();
        for (tag, v) in [(200, 2), (9, 0), (3, 78), (4, 123_999)] {
            varint(tag, &mut ingestion);
            varint(v, &mut ingestion);
        }
        varint(103, &mut ingestion);
        for v in [6, 77, 4096] {
            varint(v, &mut ingestion);
        }
        slice(b"a", &mut ingestion);
        slice(b"b", &mut ingestion);
        varint(5, &mut ingestion);
        varint(9, &mut ingestion);
        varint(1, &mut ingestion);
        assert!(edit_keeps_wals(&ingestion)
            .unwrap_err()
            .contains("bulk load"));
        let mut hack = ingestion.clone();
        hack.pop();
        varint(3, &mut hack);
        slice(&80u64.to_le_bytes(), &mut hack);
        varint(1, &mut hack);
        assert!(edit_keeps_wals(&hack).unwrap_err().contains("minimum log"));
        let mut unknown = compaction_edit(10);
        varint(400, &mut unknown);
        assert!(edit_keeps_wals(&unknown).is_err());
        // A truncated edit, and a log that ends inside a record, are not trusted.
        assert!(edit_keeps_wals(&compaction_edit(10)[..20]).is_err());
        assert!(log_records(&bytes[..bytes.len() - 3], start).is_err());
    }

    #[test]
    fn wals_created_after_the_checkpoint_are_pinned_and_sent() {
        let d = tempfile::tempdir().unwrap();
        let (rocks, ckpt, pin_dir) = (
            d.path().join("rocks"),
            d.path().join("ckpt"),
            d.path().join("pins"),
        );
        for dir in [&rocks, &ckpt, &pin_dir] {
            fs::create_dir(dir).unwrap();
        }
        let (whole, _) = log(&[100, 200]);
        for dir in [&rocks, &ckpt] {
            fs::write(dir.join("CURRENT"), "MANIFEST-000005\n").unwrap();
            fs::write(dir.join("MANIFEST-000005"), b"same").unwrap();
            fs::write(dir.join("000010.log"), &whole[..107]).unwrap();
        }
        fs::write(rocks.join("000004.log"), b"older than the checkpoint's").unwrap();
        let server = ServerInfo {
            version: String::new(),
            hostname: String::new(),
            port: None,
            datadir: d.path().to_path_buf(),
            rocksdb_datadir: rocks.clone(),
            rocksdb_wal_dir: rocks.clone(),
            aria_log_dir: d.path().to_path_buf(),
            innodb: true,
            rocksdb_manual_wal_flush: false,
            rocksdb_write_disable_wal: false,
        };
        let mut pins = WalPins::pin(&server, &ckpt, pin_dir).unwrap().unwrap();
        // After the checkpoint: the WAL grows, and a memtable switch starts a new one.
        fs::write(rocks.join("000010.log"), &whole).unwrap();
        fs::write(rocks.join("000012.log"), &whole[..107]).unwrap();
        assert_eq!(pins.record_under_block(&rocks, &ckpt).unwrap(), None);
        let sent: Vec<(String, u64)> = pins.files().into_iter().map(|f| (f.name, f.size)).collect();
        assert_eq!(
            sent,
            [
                ("000010.log".to_string(), whole.len() as u64),
                ("000012.log".to_string(), 107)
            ]
        );

        // A WAL torn at its end: the checkpoint must be taken again under the block.
        let pin_dir = d.path().join("pins2");
        fs::create_dir(&pin_dir).unwrap();
        let mut pins = WalPins::pin(&server, &ckpt, pin_dir).unwrap().unwrap();
        fs::write(rocks.join("000012.log"), &whole[..150]).unwrap();
        let why = pins.record_under_block(&rocks, &ckpt).unwrap().unwrap();
        assert!(why.contains("whole record"), "{why}");
    }
}
