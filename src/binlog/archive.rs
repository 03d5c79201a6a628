//! A binary log archive in a directory: each binary log file under its own name, byte for
//! byte as the server wrote it, and beside it `NAME.index`, a small JSON record of what is
//! archived of it. A file counts up to its index's `size` only: bytes past it (written
//! before a crash, not yet synced and recorded) are cut off when the archiver opens the
//! directory again. The index is written after the bytes are synced, so an index never
//! claims bytes a crash lost.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::event::{self, Gtid, Header, State, Step, Tracker};
use crate::error::{Error, IoContext, Result};
use crate::sink::dir::sync_dir;

pub const INDEX_SUFFIX: &str = ".index";
const LOCK_NAME: &str = ".archiver.lock";
/// Marks a directory as an archive: only there does the archiver remove a file.
const MARKER_NAME: &str = ".myrocks-hotbackup-binlogs";

/// What the archive holds of one binary log file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileIndex {
    pub name: String,
    /// The file's place in the archive (files are archived in the server's order).
    pub order: u64,
    /// The server that wrote the file (its format description's server id).
    pub server_id: u32,
    /// Bytes archived, up to the end of a whole transaction.
    pub size: u64,
    /// CRC-32 of those bytes.
    pub crc32: u32,
    /// Whether events carry checksums.
    pub checksums: bool,
    /// The file ended (a rotate or stop event, or the server went on to the next file).
    pub closed: bool,
    /// The binary log state at the file's start (its GTID list event), then after its last
    /// archived transaction.
    pub start: State,
    pub end: State,
    /// The first and last GTID of each domain in the file.
    pub gtids: BTreeMap<u32, (Gtid, Gtid)>,
    pub transactions: u64,
    /// Times of the first and last transaction's commit event (seconds since the epoch).
    pub first_time: Option<u32>,
    pub last_time: Option<u32>,
}

impl FileIndex {
    fn new(name: &str, order: u64) -> FileIndex {
        FileIndex {
            name: name.into(),
            order,
            server_id: 0,
            size: 0,
            crc32: 0,
            checksums: false,
            closed: false,
            start: State::default(),
            end: State::default(),
            gtids: BTreeMap::new(),
            transactions: 0,
            first_time: None,
            last_time: None,
        }
    }

    /// The next file continues this one: same state, and this one ended.
    pub fn chains_to(&self, next: &FileIndex) -> bool {
        self.closed && self.end == next.start
    }
}

/// Reads every index of an archive directory, in archive order.
pub fn load(dir: &Path) -> Result<Vec<FileIndex>> {
    let mut files = Vec::new();
    let entries = fs::read_dir(dir).with_path("read the binary log archive", dir)?;
    for entry in entries {
        let entry = entry.with_path("read", dir)?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !name.ends_with(INDEX_SUFFIX) {
            continue;
        }
        let path = entry.path();
        let text = fs::read(&path).with_path("read", &path)?;
        let index: FileIndex = serde_json::from_slice(&text).map_err(|e| {
            Error::Corrupt(format!("{}: not a binary log index: {e}", path.display()))
        })?;
        files.push(index);
    }
    files.sort_by_key(|f| f.order);
    Ok(files)
}

/// Refuses what is not a binary log archive.
pub fn check_dir(dir: &Path) -> Result<()> {
    let md = fs::metadata(dir).with_path("open the binary log archive", dir)?;
    if !md.is_dir() {
        return Err(Error::Usage(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if !dir.join(MARKER_NAME).exists() {
        return Err(Error::Usage(format!(
            "{} is not a binary log archive (`binlog archive --target-dir` makes one)",
            dir.display()
        )));
    }
    Ok(())
}

/// Makes `dir` an archive: created, or empty, or one already.
pub fn claim_dir(dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("cannot create {}", dir.display()), e)),
    }
    let marker = dir.join(MARKER_NAME);
    if marker.exists() {
        return check_dir(dir);
    }
    let mut entries = fs::read_dir(dir).with_path("read", dir)?;
    if entries.next().is_some() {
        return Err(Error::Refused(format!(
            "{} is not empty and not a binary log archive: give a new or empty directory",
            dir.display()
        )));
    }
    File::create(&marker).with_path("create", &marker)?;
    sync_dir(dir)
}

/// The writing side: one archiver per directory (it holds a lock), appending to the
/// newest file.
pub struct Writer {
    dir: PathBuf,
    _lock: File,
    pub files: Vec<FileIndex>,
    current: Option<Open>,
}

/// The file being written: what is recorded, and what is written past it.
struct Open {
    file: File,
    /// What the index says (synced).
    recorded: FileIndex,
    /// The state at the last transaction boundary written (not yet synced).
    boundary: FileIndex,
    tracker: Tracker,
    crc: crc32fast::Hasher,
    len: u64,
    /// Bytes written since the last sync.
    unsynced: bool,
    /// A sync failed: nothing more may be recorded.
    failed: bool,
}

impl Writer {
    /// Opens (creating) the archive directory, cuts every file back to what its index
    /// records, and removes files that no index records.
    pub fn open(dir: &Path) -> Result<Writer> {
        claim_dir(dir)?;
        let lock_path = dir.join(LOCK_NAME);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o640)
            .open(&lock_path)
            .with_path("open", &lock_path)?;
        if !crate::sys::try_lock_exclusive(&lock).with_path("lock", &lock_path)? {
            return Err(Error::Refused(format!(
                "another archiver is writing to {}: stop it first",
                dir.display()
            )));
        }
        let files = load(dir)?;
        let recorded: BTreeMap<&str, u64> =
            files.iter().map(|f| (f.name.as_str(), f.size)).collect();
        for entry in fs::read_dir(dir).with_path("read", dir)? {
            let entry = entry.with_path("read", dir)?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || name.ends_with(INDEX_SUFFIX) {
                continue;
            }
            let path = entry.path();
            match recorded.get(name.as_str()) {
                // Written before a crash, never recorded: nothing of it counts.
                None if is_binlog_name(&name) => {
                    fs::remove_file(&path).with_path("remove the unrecorded", &path)?
                }
                None => {}
                Some(&size) => {
                    let len = entry.metadata().with_path("stat", &path)?.len();
                    if len > size {
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .with_path("open", &path)?;
                        f.set_len(size).with_path("truncate", &path)?;
                        f.sync_all().with_path("sync", &path)?;
                    } else if len < size {
                        return Err(Error::Corrupt(format!(
                            "{} is {len} bytes but its index records {size}: the archive was damaged",
                            path.display()
                        )));
                    }
                }
            }
        }
        Ok(Writer {
            dir: dir.to_path_buf(),
            _lock: lock,
            files,
            current: None,
        })
    }

    /// The last file, if it may still grow.
    pub fn resume_point(&self) -> Option<&FileIndex> {
        self.files.last().filter(|f| !f.closed)
    }

    /// Opens the last file again to append to it (after a restart).
    fn reopen(&mut self) -> Result<()> {
        let Some(last) = self.files.last().cloned() else {
            return Ok(());
        };
        let path = self.dir.join(&last.name);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .with_path("open", &path)?;
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).with_path("read", &path)?;
            if n == 0 {
                break;
            }
            crc.update(&buf[..n]);
        }
        if crc.clone().finalize() != last.crc32 {
            return Err(Error::Corrupt(format!(
                "{} does not match the CRC-32 its index records: the archive was damaged",
                path.display()
            )));
        }
        let tracker = Tracker::at(last.checksums, last.end.clone());
        self.current = Some(Open {
            file,
            len: last.size,
            boundary: last.clone(),
            recorded: last,
            tracker,
            crc,
            unsynced: false,
            failed: false,
        });
        Ok(())
    }

    /// Starts a new file `name` (the previous one must be closed).
    pub fn begin(&mut self, name: &str) -> Result<()> {
        if self.current.is_none() && self.resume_point().is_some() {
            self.reopen()?;
        }
        if let Some(o) = &self.current {
            if o.recorded.name == name {
                return Ok(());
            }
            // The server went on to another file: this one will not grow.
            self.close()?;
        }
        if self.files.iter().any(|f| f.name == name) {
            return Err(Error::Refused(format!(
                "{name} is archived already in {}: the server's binary logs do not continue the archive",
                self.dir.display()
            )));
        }
        if !is_binlog_name(name) {
            return Err(Error::Server(format!(
                "the server sent an unexpected file name {name:?}"
            )));
        }
        let path = self.dir.join(name);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .append(true)
            .mode(0o640)
            .open(&path)
            .with_path("create", &path)?;
        let order = self.files.last().map_or(0, |f| f.order + 1);
        let index = FileIndex::new(name, order);
        self.current = Some(Open {
            file,
            recorded: index.clone(),
            boundary: index,
            tracker: Tracker::default(),
            crc: crc32fast::Hasher::new(),
            len: 0,
            unsynced: false,
            failed: false,
        });
        Ok(())
    }

    /// Where the next event must start in the current file.
    pub fn position(&self) -> u64 {
        self.current.as_ref().map_or(0, |o| o.len)
    }

    /// Appends one event (as the server sent it, which is as it is in the file).
    /// Returns whether the event ends the file.
    pub fn append(&mut self, ev: &[u8]) -> Result<bool> {
        let dir = self.dir.clone();
        let o = self
            .current
            .as_mut()
            .ok_or_else(|| Error::Server("an event before the stream named its file".into()))?;
        let h = Header::parse(ev).ok_or_else(|| Error::Server("a truncated event".into()))?;
        let path = dir.join(&o.recorded.name);
        if o.len == 0 {
            o.file.write_all(event::MAGIC).with_path("write", &path)?;
            o.crc.update(event::MAGIC);
            o.len = 4;
        }
        if h.len as usize != ev.len() || u64::from(h.next_pos) != o.len + ev.len() as u64 {
            return Err(Error::Corrupt(format!(
                "{}: an event at {} says it ends at {} (length {}): the stream skipped or repeated events",
                o.recorded.name, o.len, h.next_pos, ev.len()
            )));
        }
        if h.kind == event::START_ENCRYPTION {
            return Err(Error::Refused(format!(
                "{} is encrypted (encrypt_binlog): an archive of it could not be checked or replayed; not supported",
                o.recorded.name
            )));
        }
        if h.kind == event::FORMAT_DESCRIPTION {
            o.boundary.server_id = h.server_id;
        }
        let step = o
            .tracker
            .step(ev)
            .map_err(|e| Error::Corrupt(format!("{} at {}: {e}", o.recorded.name, o.len)))?;
        if o.tracker.checksum && !event::checksum_ok(ev) {
            return Err(Error::Corrupt(format!(
                "{} at {}: an event arrived with a wrong checksum",
                o.recorded.name, o.len
            )));
        }
        o.file.write_all(ev).with_path("write", &path)?;
        o.crc.update(ev);
        o.len += ev.len() as u64;
        o.unsynced = true;
        let ends = matches!(h.kind, event::ROTATE | event::STOP);
        match step {
            Step::Inside => {}
            Step::Outside | Step::Commit(_) => {
                let b = &mut o.boundary;
                b.size = o.len;
                b.crc32 = o.crc.clone().finalize();
                b.checksums = o.tracker.checksum;
                b.end = o.tracker.state.clone();
                if h.kind == event::GTID_LIST && b.transactions == 0 {
                    b.start = o.tracker.state.clone();
                }
                if let Step::Commit(g) = step {
                    b.transactions += 1;
                    b.gtids
                        .entry(g.domain)
                        .and_modify(|(_, last)| *last = g)
                        .or_insert((g, g));
                    b.first_time.get_or_insert(h.timestamp);
                    b.last_time = Some(h.timestamp);
                }
                if ends {
                    b.closed = true;
                }
            }
        }
        Ok(ends)
    }

    /// The state of the archive up to the last whole transaction written.
    pub fn archived_state(&self) -> Option<&State> {
        match &self.current {
            Some(o) => Some(&o.boundary.end),
            None => self.files.last().map(|f| &f.end),
        }
    }

    /// Syncs the current file and records it up to its last transaction boundary.
    pub fn commit(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        let Some(o) = self.current.as_mut() else {
            return Ok(());
        };
        if o.boundary == o.recorded && !o.unsynced {
            return Ok(());
        }
        let path = dir.join(&o.recorded.name);
        if o.failed {
            return Err(Error::Closed);
        }
        // After a failed sync the written bytes may be lost whatever a second sync says:
        // nothing more is recorded of this file until it is opened again.
        if let Err(e) = o.file.sync_data() {
            o.failed = true;
            return Err(Error::io(format!("cannot sync {}", path.display()), e));
        }
        o.unsynced = false;
        if o.boundary != o.recorded {
            write_index(&dir, &o.boundary)?;
            o.recorded = o.boundary.clone();
            match self.files.last_mut() {
                Some(last) if last.name == o.recorded.name => *last = o.recorded.clone(),
                _ => self.files.push(o.recorded.clone()),
            }
        }
        Ok(())
    }

    /// Records the current file as ended, and lets go of it.
    pub fn close(&mut self) -> Result<()> {
        if let Some(o) = self.current.as_mut() {
            o.boundary.closed = true;
        }
        self.commit()?;
        self.current = None;
        Ok(())
    }

    /// Archives a whole closed file (copied from the server's directory): its events are
    /// checked as they would be from the server.
    pub fn import(&mut self, name: &str, data: &[u8]) -> Result<()> {
        if data.get(..4) != Some(event::MAGIC) {
            return Err(Error::Corrupt(format!("{name} is not a binary log")));
        }
        // A server that crashed may have left half an event at the end: whole events count.
        let mut whole = 4;
        while let Some(h) = Header::parse(&data[whole..]) {
            let end = whole + h.len as usize;
            if (h.len as usize) < event::HEADER_LEN || end > data.len() {
                break;
            }
            whole = end;
        }
        if whole < data.len() {
            crate::warn!(
                "{name} ends with {} bytes that are no whole event (a crash?): archived up to {whole}",
                data.len() - whole
            );
        }
        self.begin(name)?;
        let imported = (|| {
            for item in Walk::new(&data[..whole], 4) {
                let (_, ev) = item.map_err(|e| Error::Corrupt(format!("{name}: {e}")))?;
                self.append(ev)?;
            }
            self.close()
        })();
        if imported.is_err() {
            let _ = self.abandon();
        }
        imported
    }

    /// Lets go of the current file without ending it (the connection dropped): bytes past
    /// the last transaction boundary are cut off, to be sent again.
    pub fn rewind(&mut self) -> Result<()> {
        let committed = match self.current.as_ref().is_some_and(|o| o.failed) {
            true => Ok(()),
            false => self.commit(),
        };
        if let Some(o) = self.current.take() {
            let path = self.dir.join(&o.recorded.name);
            o.file
                .set_len(o.recorded.size)
                .with_path("truncate", &path)?;
            o.file.sync_all().with_path("sync", &path)?;
            if o.recorded.size == 0 {
                fs::remove_file(&path).with_path("remove", &path)?;
                sync_dir(&self.dir)?;
            }
        }
        committed
    }

    /// Removes the file being written and its index (an import that failed).
    fn abandon(&mut self) -> Result<()> {
        if let Some(o) = self.current.take() {
            let index = self.dir.join(format!("{}{INDEX_SUFFIX}", o.recorded.name));
            for path in [self.dir.join(&o.recorded.name), index] {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(Error::io(format!("cannot remove {}", path.display()), e))
                    }
                }
            }
            self.files.retain(|f| f.name != o.recorded.name);
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

fn write_index(dir: &Path, index: &FileIndex) -> Result<()> {
    let path = dir.join(format!("{}{INDEX_SUFFIX}", index.name));
    let tmp = dir.join(format!(".{}{INDEX_SUFFIX}.tmp", index.name));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(&tmp)
        .with_path("create", &tmp)?;
    let text = serde_json::to_vec_pretty(index).expect("an index serializes");
    f.write_all(&text).with_path("write", &tmp)?;
    f.sync_all().with_path("sync", &tmp)?;
    fs::rename(&tmp, &path).with_path("rename", &tmp)?;
    sync_dir(dir)
}

/// `basename.NNNNNN`, as the server names binary logs.
pub fn is_binlog_name(name: &str) -> bool {
    match name.rsplit_once('.') {
        Some((base, n)) => {
            !base.is_empty()
                && !base.contains('/')
                && n.len() >= 6
                && n.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// `bin.000010` after `bin.000009` (the same base, a larger number).
pub fn later_name(a: &str, b: &str) -> bool {
    match (a.rsplit_once('.'), b.rsplit_once('.')) {
        (Some((ba, na)), Some((bb, nb))) => {
            ba == bb && na.parse::<u64>().ok() > nb.parse::<u64>().ok()
        }
        _ => false,
    }
}

/// Reads a file's archived bytes (its index's size), checking size and CRC-32.
pub fn read_file(dir: &Path, index: &FileIndex) -> Result<Vec<u8>> {
    let path = dir.join(&index.name);
    let mut f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(Error::Corrupt(format!(
                "{} is missing from the archive (its index is there)",
                index.name
            )))
        }
        Err(e) => return Err(Error::io(format!("cannot open {}", path.display()), e)),
    };
    let mut data = Vec::with_capacity(index.size as usize);
    (&mut f)
        .take(index.size)
        .read_to_end(&mut data)
        .with_path("read", &path)?;
    if (data.len() as u64) < index.size {
        return Err(Error::Corrupt(format!(
            "{} is truncated: {} bytes of {}",
            index.name,
            data.len(),
            index.size
        )));
    }
    if crc32fast::hash(&data) != index.crc32 {
        return Err(Error::Corrupt(format!(
            "{} does not match its CRC-32: damaged",
            index.name
        )));
    }
    Ok(data)
}

/// One event of a file and where it ends.
pub struct Walk<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Walk<'a> {
    /// Walks the events of a file's bytes from `pos` (4: the first event).
    pub fn new(data: &'a [u8], pos: usize) -> Walk<'a> {
        Walk { data, pos }
    }
}

impl<'a> Iterator for Walk<'a> {
    /// (offset, event) or a description of the damage.
    type Item = std::result::Result<(usize, &'a [u8]), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.data.len() {
            return None;
        }
        let at = self.pos;
        let Some(h) = Header::parse(&self.data[at..]) else {
            self.pos = self.data.len();
            return Some(Err(format!("a truncated event header at {at}")));
        };
        let end = at + h.len as usize;
        if (h.len as usize) < event::HEADER_LEN
            || end > self.data.len()
            || h.next_pos as usize != end
        {
            self.pos = self.data.len();
            return Some(Err(format!(
                "the event at {at} has a bad length or position ({} bytes, next at {})",
                h.len, h.next_pos
            )));
        }
        self.pos = end;
        Some(Ok((at, &self.data[at..end])))
    }
}

/// Every event of a file checked: magic, lengths, positions, checksums, transactions.
/// Returns the tracker at the end.
pub fn check_events(index: &FileIndex, data: &[u8]) -> std::result::Result<Tracker, String> {
    if data.get(..4) != Some(event::MAGIC) {
        return Err("not a binary log (no magic number)".into());
    }
    let mut t = Tracker::default();
    let mut last_seq: BTreeMap<u32, u64> = BTreeMap::new();
    for item in Walk::new(data, 4) {
        let (at, ev) = item?;
        let step = t.step(ev).map_err(|e| format!("at {at}: {e}"))?;
        if t.checksum && !event::checksum_ok(ev) {
            return Err(format!("the event at {at} fails its checksum"));
        }
        if let Step::Commit(g) = step {
            if let Some(prev) = last_seq.insert(g.domain, g.seq) {
                if g.seq <= prev {
                    return Err(format!(
                        "GTID {g} at {at} goes backwards in domain {} (after sequence {prev})",
                        g.domain
                    ));
                }
            }
        }
    }
    if t.in_transaction() {
        return Err("ends inside a transaction".into());
    }
    if t.state != index.end {
        return Err(format!(
            "ends at GTID {} but its index says {}",
            t.state.position_text(),
            index.end.position_text()
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binlog_names_are_base_dot_number() {
        assert!(is_binlog_name("bin.000001"));
        assert!(is_binlog_name("mysql-bin.1000000"));
        assert!(!is_binlog_name("bin.index"));
        assert!(!is_binlog_name(".000001"));
        assert!(!is_binlog_name("bin.0001"));
    }
}
