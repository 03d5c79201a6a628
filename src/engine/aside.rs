//! Copies, in the run's scratch directory, of files the server writes until commits are
//! blocked: the Aria log and its control file, and the statistics and log tables of `mysql`.
//! They must be taken while commits are blocked, and that block is a write stall, so a log
//! that only grows is copied in two steps: all but its tail before the block, the tail
//! under it. A log's last pages are rewritten in place as they fill, so the part copied
//! early stops [`TAIL`] bytes short of the end, and under the block the last stretch of
//! that part is read again and compared: if it changed, the whole file is copied again.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::engine::datadir::DatadirFile;
use crate::error::{IoContext, Result};
use crate::warn;

/// What is left to copy under the block: Aria writes its log through buffers of up to
/// 1 MiB whose last page is rewritten until full.
const TAIL: u64 = 2 << 20;
/// How much of the early copy is read again under the block.
const RECHECK: u64 = 256 << 10;

/// A file copied aside, or being copied.
struct Copy {
    source: PathBuf,
    copy: PathBuf,
    /// Bytes copied before the block.
    early: u64,
}

/// The files copied aside, by their name in the backup.
pub struct Aside {
    dir: PathBuf,
    copies: BTreeMap<String, Copy>,
}

impl Aside {
    pub fn new(dir: PathBuf) -> Aside {
        Aside {
            dir,
            copies: BTreeMap::new(),
        }
    }

    /// Before the block: copies all of a growing log but its tail. Returns the bytes copied.
    pub fn copy_early(&mut self, f: &DatadirFile) -> Result<u64> {
        let copy = self.scratch_path(&f.name);
        let size = fs::metadata(&f.source).with_path("stat", &f.source)?.len();
        let early = size.saturating_sub(TAIL);
        let mut out = private_file(&copy)?;
        let mut src = File::open(&f.source).with_path("open", &f.source)?;
        let copied =
            std::io::copy(&mut (&mut src).take(early), &mut out).with_path("copy", &f.source)?;
        self.copies.insert(
            f.name.clone(),
            Copy {
                source: f.source.clone(),
                copy,
                early: copied,
            },
        );
        Ok(copied)
    }

    /// Under the block: completes the early copies of `files` and copies the others whole.
    /// Early copies of files that no longer exist (a purged log) are dropped.
    pub fn copy_under_block(&mut self, files: &[DatadirFile]) -> Result<()> {
        let wanted: Vec<&String> = files.iter().map(|f| &f.name).collect();
        let gone: Vec<String> = self
            .copies
            .keys()
            .filter(|name| !wanted.contains(name))
            .cloned()
            .collect();
        for name in gone {
            let c = self.copies.remove(&name).expect("listed");
            fs::remove_file(&c.copy).with_path("remove", &c.copy)?;
        }
        for f in files {
            match self.copies.get(&f.name) {
                Some(c) => complete(c)?,
                None => {
                    let copy = self.scratch_path(&f.name);
                    let mut out = private_file(&copy)?;
                    let mut src = File::open(&f.source).with_path("open", &f.source)?;
                    std::io::copy(&mut src, &mut out).with_path("copy", &f.source)?;
                    self.copies.insert(
                        f.name.clone(),
                        Copy {
                            source: f.source.clone(),
                            copy,
                            early: 0,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Once commits flow again: seals the CSV log tables, and gives every copy its source's
    /// permissions, owner and modification time (the backup stores those).
    pub fn finish(&self) -> Result<()> {
        self.seal_csv_tables()?;
        for c in self.copies.values() {
            let md = fs::metadata(&c.source).with_path("stat", &c.source)?;
            File::open(&c.copy)
                .and_then(|f| f.set_modified(md.modified()?))
                .with_path("set the time of", &c.copy)?;
            fs::set_permissions(&c.copy, md.permissions()).with_path("chmod", &c.copy)?;
            if crate::sys::is_root() {
                std::os::unix::fs::chown(&c.copy, Some(md.uid()), Some(md.gid()))
                    .with_path("chown", &c.copy)?;
            }
        }
        Ok(())
    }

    /// Leaves each copied CSV log table (`mysql.general_log`, `mysql.slow_log`) as a closed
    /// table: its data cut after the last whole row, and its `.CSM` rewritten clean with
    /// that row count. The server reopens a log table to log any statement, which marks
    /// its `.CSM` dirty (the restored server would call the table crashed), and a row may
    /// be half written when the copy is taken.
    fn seal_csv_tables(&self) -> Result<()> {
        for (name, c) in &self.copies {
            let Some(stem) = name.strip_suffix(".CSV") else {
                continue;
            };
            let Some(meta) = self.copies.get(&format!("{stem}.CSM")) else {
                continue;
            };
            // Rows end with a newline (the CSV engine escapes those inside values).
            let (mut rows, mut whole, mut offset) = (0u64, 0u64, 0u64);
            let mut input = File::open(&c.copy).with_path("open", &c.copy)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n =
                    crate::format::read_full(&mut input, &mut buf).with_path("read", &c.copy)?;
                if n == 0 {
                    break;
                }
                for (i, _) in buf[..n].iter().enumerate().filter(|(_, &b)| b == b'\n') {
                    rows += 1;
                    whole = offset + i as u64 + 1;
                }
                offset += n as u64;
            }
            if whole < offset {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(&c.copy)
                    .with_path("open", &c.copy)?;
                f.set_len(whole).with_path("truncate", &c.copy)?;
            }
            fs::write(&meta.copy, csv_meta(rows)).with_path("write", &meta.copy)?;
        }
        Ok(())
    }

    /// The copies, as files to send under their names in the backup.
    pub fn files(&self) -> Vec<DatadirFile> {
        self.copies
            .iter()
            .map(|(name, c)| DatadirFile {
                source: c.copy.clone(),
                name: name.clone(),
            })
            .collect()
    }

    fn scratch_path(&self, name: &str) -> PathBuf {
        self.dir.join(name.replace('/', "@"))
    }
}

/// A new file readable by us alone, until [`Aside::finish`] gives it its source's mode.
fn private_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_path("create", path)
}

/// The CSV engine's `.CSM` file of a cleanly closed table (MariaDB's `ha_tina`): a check
/// byte, the format version, the row count, three counters left at zero, and the dirty
/// flag, off. Written by hand: 35 bytes that no library writes.
fn csv_meta(rows: u64) -> Vec<u8> {
    const CHECK_HEADER: u8 = 254;
    const VERSION: u8 = 1;
    let mut meta = vec![CHECK_HEADER, VERSION];
    meta.extend_from_slice(&rows.to_le_bytes());
    meta.extend_from_slice(&[0; 24]); // check point, auto_increment, forced flushes
    meta.push(0); // not dirty
    meta
}

/// Appends what a file gained since its early copy, after checking that the end of the
/// early copy is still what the file holds there; if not, copies the whole file again.
fn complete(c: &Copy) -> Result<()> {
    let mut src = File::open(&c.source).with_path("open", &c.source)?;
    let from = c.early.saturating_sub(RECHECK);
    if !same_bytes(&mut src, &c.copy, from, c.early - from)? {
        warn!(
            "{} changed before the end of its early copy: copied it again while commits were blocked",
            c.source.display()
        );
        fs::copy(&c.source, &c.copy).with_path("copy", &c.source)?;
        return Ok(());
    }
    src.seek(SeekFrom::Start(c.early))
        .with_path("seek in", &c.source)?;
    let mut out = fs::OpenOptions::new()
        .append(true)
        .open(&c.copy)
        .with_path("open", &c.copy)?;
    std::io::copy(&mut src, &mut out).with_path("copy", &c.source)?;
    out.flush().with_path("write", &c.copy)
}

/// True when `src` and the file at `copy` hold the same `len` bytes from `offset`.
fn same_bytes(src: &mut File, copy: &Path, offset: u64, len: u64) -> Result<bool> {
    let read_at = |f: &mut File, what: &Path| -> Result<Vec<u8>> {
        let mut buf = vec![0; len as usize];
        f.seek(SeekFrom::Start(offset)).with_path("seek in", what)?;
        let got = crate::format::read_full(f, &mut buf).with_path("read", what)?;
        buf.truncate(got);
        Ok(buf)
    };
    let theirs = read_at(src, copy)?;
    let ours = read_at(&mut File::open(copy).with_path("open", copy)?, copy)?;
    Ok(theirs == ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, data: &[u8]) -> DatadirFile {
        fs::write(dir.join(name), data).unwrap();
        DatadirFile {
            source: dir.join(name),
            name: name.to_string(),
        }
    }

    #[test]
    fn early_copy_plus_tail_equals_the_file_at_the_block() {
        let src = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 251) as u8).collect();
        let log = file(src.path(), "aria_log.00000001", &big);
        let old = file(src.path(), "aria_log.00000000", b"purged later");
        let mut aside = Aside::new(scratch.path().to_path_buf());
        assert_eq!(aside.copy_early(&log).unwrap(), (5 << 20) - TAIL);
        aside.copy_early(&old).unwrap();

        // The log grows and its last page is rewritten; a control file appears; the old
        // log is purged.
        let mut grown = big.clone();
        let last = grown.len() - 100;
        grown[last] ^= 0xff;
        grown.extend_from_slice(b"appended under the block");
        fs::write(&log.source, &grown).unwrap();
        fs::remove_file(&old.source).unwrap();
        let control = file(src.path(), "aria_log_control", b"control");
        aside.copy_under_block(&[log.clone(), control]).unwrap();

        let files = aside.files();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["aria_log.00000001", "aria_log_control"]);
        assert_eq!(fs::read(&files[0].source).unwrap(), grown);
        assert_eq!(fs::read(&files[1].source).unwrap(), b"control");
    }

    #[test]
    fn a_csv_log_table_is_sealed_at_its_last_whole_row() {
        let src = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let csv = file(src.path(), "general_log.CSV", b"\"a\",1\n\"b\",2\n\"half");
        let mut dirty = csv_meta(7);
        dirty[34] = 1;
        let csm = file(src.path(), "general_log.CSM", &dirty);
        let mut aside = Aside::new(scratch.path().to_path_buf());
        aside.copy_under_block(&[csv, csm]).unwrap();
        aside.finish().unwrap();
        let files = aside.files();
        assert_eq!(fs::read(&files[0].source).unwrap(), csv_meta(2));
        assert_eq!(fs::read(&files[1].source).unwrap(), b"\"a\",1\n\"b\",2\n");
        assert_eq!(csv_meta(2).len(), 35);
    }

    #[test]
    fn a_change_inside_the_early_copy_copies_the_whole_file_again() {
        let src = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let big = vec![7u8; 4 << 20];
        let log = file(
            src.path(),
            "mysql/general_log.CSV".replace('/', "_").as_str(),
            &big,
        );
        let mut aside = Aside::new(scratch.path().to_path_buf());
        aside.copy_early(&log).unwrap();
        let mut changed = big.clone();
        changed[(2 << 20) - 10] = 1; // inside the early copy's last stretch
        fs::write(&log.source, &changed).unwrap();
        aside.copy_under_block(std::slice::from_ref(&log)).unwrap();
        assert_eq!(fs::read(&aside.files()[0].source).unwrap(), changed);
    }
}
