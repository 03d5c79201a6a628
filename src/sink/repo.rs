//! A backup into a repository (see `repo`): SSTs the repository already holds are not
//! read at all; the others are uploaded, each as one object named by its identity, while
//! everything else is bundled into packs of this snapshot. The snapshot object, written
//! last, is the commit. A lock object, refreshed while the backup runs, keeps a concurrent
//! prune away from what the backup uses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use serde::Serialize;

use super::{Chunk, Sink, SinkFile};
use crate::error::{Error, Result};
use crate::format::layout::ZSTD_SUFFIX;
use crate::format::manifest::{FileRecord, Kind, Manifest};
use crate::format::FileMeta;
use crate::log::unix_now;
use crate::repo::crypto::{self, Sealer};
use crate::repo::store::{Listed, Upload};
use crate::repo::{
    Lock, Place, Repo, Snapshot, SstTrailer, DATA, LOCKS, LOCK_REFRESH, LOCK_STALE, PACKS,
    SNAPSHOTS,
};
use crate::{info, warn};

/// A pack is uploaded once it holds this many bytes.
const PACK_TARGET: usize = 32 << 20;

/// What a backup into a repository did, for `--report`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub snapshot: String,
    /// Files (SSTs) found in the repository and not read.
    pub files_reused: u64,
    pub bytes_reused: u64,
    /// Files and bytes (sealed) uploaded.
    pub files_new: u64,
    pub bytes_new: u64,
}

struct Pack {
    name: String,
    data: Vec<u8>,
}

pub struct RepoSink {
    repo: Arc<Repo>,
    id: String,
    lock: String,
    source: String,
    started: i64,
    /// SST objects by name stem, without those of trash lists this backup saw.
    held: HashMap<String, Vec<Listed>>,
    /// Records and places of the SST objects the source's previous snapshot used.
    known: HashMap<String, (FileRecord, Place)>,
    places: Mutex<BTreeMap<String, Place>>,
    pack: Mutex<Pack>,
    packs: AtomicU64,
    figures: Mutex<Figures>,
    /// Whether the lock has been kept fresh throughout.
    lock_held: Arc<Mutex<Held>>,
    refresher: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
}

impl RepoSink {
    /// Takes the lock, then learns what the repository holds.
    pub fn start(repo: Repo, source: String) -> Result<RepoSink> {
        let repo = Arc::new(repo);
        // The id starts with a tag of the server backed up, so that the next backup finds
        // this one's records by listing names, without reading every snapshot.
        let tag = repo.source_tag(&source);
        let id = format!("{tag}{}", crate::net::tls::random_hex(6)?);
        let lock = format!("{LOCKS}{id}");
        let started = unix_now();
        let mut state = Lock {
            host: crate::sys::hostname(),
            started,
            refreshed: started,
            seen_trash: Vec::new(),
        };
        // The lock first, then the trash lists: a prune that does not see this lock wrote
        // its list before this backup read them.
        repo.put_json(&lock, &state, true)?;
        let trash = repo.trash()?;
        state.seen_trash = trash.keys().cloned().collect();
        repo.put_json(&lock, &state, false)?;
        let trashed: HashSet<&String> = trash.values().flat_map(|(t, _)| &t.objects).collect();
        let mut held: HashMap<String, Vec<Listed>> = HashMap::new();
        for listed in repo.store().list(DATA)? {
            if trashed.contains(&listed.name) {
                continue;
            }
            if let Some((stem, _)) = listed.name.rsplit_once('.') {
                held.entry(stem.to_string()).or_default().push(listed);
            }
        }
        // The records of what this server's last backup stored: most SSTs of this one.
        let mut known = HashMap::new();
        let newest = repo
            .store()
            .list(SNAPSHOTS)?
            .into_iter()
            .filter(|l| l.name[SNAPSHOTS.len()..].starts_with(&tag))
            .max_by_key(|l| l.modified);
        let previous = match newest {
            Some(l) => repo
                .get_json::<Snapshot>(&l.name)?
                .filter(|s| s.source == source),
            None => None,
        };
        if let Some(previous) = previous {
            let manifest = previous.manifest()?;
            for record in manifest.files {
                if let Some(place) = previous.places.get(&record.path) {
                    if place.object.starts_with(DATA) {
                        known.insert(place.object.clone(), (record, place.clone()));
                    }
                }
            }
        }
        info!(
            "Repository {}: {} SST objects held; snapshot {id} started",
            repo.url,
            held.values().map(Vec::len).sum::<usize>()
        );
        let lock_held = Arc::new(Mutex::new(Held {
            last: Instant::now(),
            lost: false,
        }));
        let refresher = spawn_refresher(repo.clone(), lock.clone(), state, lock_held.clone());
        Ok(RepoSink {
            pack: Mutex::new(Pack {
                name: format!("{PACKS}{id}-0"),
                data: Vec::new(),
            }),
            repo,
            lock,
            source,
            started,
            held,
            known,
            places: Mutex::new(BTreeMap::new()),
            packs: AtomicU64::new(1),
            figures: Mutex::new(Figures {
                snapshot: id.clone(),
                ..Figures::default()
            }),
            id,
            lock_held,
            refresher: Mutex::new(Some(refresher)),
        })
    }

    pub fn figures(&self) -> Figures {
        self.figures.lock().expect("not poisoned").clone()
    }

    /// The name of a new pack of this snapshot.
    fn next_pack(&self) -> String {
        format!(
            "{PACKS}{}-{}",
            self.id,
            self.packs.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Uploads the current pack if it holds anything (or is full, with `full_only`).
    fn flush_pack(&self, full_only: bool) -> Result<()> {
        let pack = {
            let mut pack = self.pack.lock().expect("not poisoned");
            if pack.data.is_empty() || (full_only && pack.data.len() < PACK_TARGET) {
                return Ok(());
            }
            std::mem::replace(
                &mut *pack,
                Pack {
                    name: self.next_pack(),
                    data: Vec::new(),
                },
            )
        };
        match self.repo.store().put(&pack.name, pack.data, true)? {
            true => Ok(()),
            false => Err(Error::Store(format!(
                "{} already exists in {}: no snapshot was written, run the backup again",
                pack.name, self.repo.url
            ))),
        }
    }

    fn stop_refresher(&self) {
        if let Some((stop, thread)) = self.refresher.lock().expect("not poisoned").take() {
            drop(stop);
            let _ = thread.join();
        }
    }

    fn placed(&self, record: &FileRecord, place: Place, new_bytes: Option<u64>) {
        self.places
            .lock()
            .expect("not poisoned")
            .insert(record.path.clone(), place);
        let mut f = self.figures.lock().expect("not poisoned");
        match new_bytes {
            Some(bytes) => {
                f.files_new += 1;
                f.bytes_new += bytes;
            }
            None => {
                f.files_reused += 1;
                f.bytes_reused += record.original_size();
            }
        }
    }
}

/// When the lock was last refreshed (a monotonic clock: a paused process sees the pause),
/// and whether a gap between refreshes was ever long enough for a prune to take it as dead.
struct Held {
    last: Instant,
    lost: bool,
}

impl Held {
    fn check(&self) -> Result<()> {
        let gap = self.last.elapsed();
        if self.lost || gap > LOCK_STALE / 2 {
            return Err(Error::Store(format!(
                "the backup's lock was not refreshed for {} s or more: a prune may have taken it as dead and deleted its objects; no snapshot was written, run the backup again",
                gap.max(LOCK_STALE / 2).as_secs()
            )));
        }
        Ok(())
    }
}

fn spawn_refresher(
    repo: Arc<Repo>,
    name: String,
    mut state: Lock,
    held: Arc<Mutex<Held>>,
) -> (Sender<()>, JoinHandle<()>) {
    let (stop, stopped) = bounded::<()>(0);
    let thread = std::thread::spawn(move || loop {
        match stopped.recv_timeout(LOCK_REFRESH) {
            Err(RecvTimeoutError::Timeout) => {
                state.refreshed = unix_now();
                match repo.put_json(&name, &state, false) {
                    Ok(_) => {
                        let mut held = held.lock().expect("not poisoned");
                        held.lost |= held.last.elapsed() > LOCK_STALE / 2;
                        held.last = Instant::now();
                    }
                    Err(e) => warn!("cannot refresh the backup's lock {name}: {e}"),
                }
            }
            _ => return,
        }
    });
    (stop, thread)
}

/// The name a reused file has in this backup: its own, with the suffix of how it is stored.
fn renamed(stored: &FileRecord, meta: &FileMeta) -> FileRecord {
    let base = meta.path.strip_suffix(ZSTD_SUFFIX).unwrap_or(&meta.path);
    let mut record = stored.clone();
    record.kind = meta.kind;
    match &mut record.original {
        Some(original) => {
            original.path = base.to_string();
            record.path = format!("{base}{ZSTD_SUFFIX}");
        }
        None => record.path = base.to_string(),
    }
    record
}

impl Sink for RepoSink {
    fn max_in_flight(&self) -> usize {
        usize::MAX
    }

    fn wants_identity(&self) -> bool {
        true
    }

    fn lookup(&self, meta: &FileMeta, size: u64) -> Result<Option<FileRecord>> {
        let Some(identity) = &meta.identity else {
            return Ok(None);
        };
        let stem = self.repo.sst_stem(identity);
        for listed in self.held.get(&stem).into_iter().flatten() {
            let found = match self.known.get(&listed.name) {
                Some(known) => Some(known.clone()),
                None => match self.repo.sst_record(&listed.name, listed.size, identity) {
                    Ok(found) => found,
                    Err(Error::Corrupt(e)) => {
                        warn!("{e}: the SST is uploaded again");
                        None
                    }
                    Err(e) => return Err(e),
                },
            };
            let Some((stored, place)) = found else {
                continue;
            };
            if stored.original_size() != size {
                continue;
            }
            let record = renamed(&stored, meta);
            self.placed(&record, place, None);
            return Ok(Some(record));
        }
        Ok(None)
    }

    fn open(&self, meta: &FileMeta) -> Result<Box<dyn SinkFile + '_>> {
        let mut head = Vec::new();
        let sealer = Sealer::new(self.repo.key(), &mut head)?;
        match (&meta.identity, meta.kind) {
            (Some(identity), Kind::Sst) => {
                let object = format!(
                    "{}.{}",
                    self.repo.sst_stem(identity),
                    crate::net::tls::random_hex(4)?
                );
                let mut upload = self.repo.store().upload(&object)?;
                let sent = head.len() as u64;
                upload.write(head)?;
                Ok(Box::new(SstFile {
                    sink: self,
                    identity: identity.clone(),
                    object,
                    upload: Some(upload),
                    sealer: Some(sealer),
                    sent,
                }))
            }
            _ => Ok(Box::new(PackedFile {
                sink: self,
                sealer: Some(sealer),
                data: head,
                upload: None,
                sent: 0,
            })),
        }
    }

    fn commit(&self, manifest: &[u8]) -> Result<()> {
        self.flush_pack(false)?;
        let parsed: Manifest<serde_json::Value> = Manifest::parse(manifest)?;
        let places = std::mem::take(&mut *self.places.lock().expect("not poisoned"));
        if let Some(missing) = parsed.files.iter().find(|r| !places.contains_key(&r.path)) {
            return Err(Error::Store(format!(
                "{} of the manifest was never stored",
                missing.path
            )));
        }
        // Every object the snapshot names is there, and the lock was held throughout: a
        // prune that took this backup for dead would otherwise leave a snapshot that cannot
        // restore.
        self.lock_held.lock().expect("not poisoned").check()?;
        let present = self.repo.objects()?;
        if let Some(gone) = places.values().find(|p| !present.contains_key(&p.object)) {
            return Err(Error::Store(format!(
                "{}, which this backup uses, was deleted meanwhile; no snapshot was written: run the backup again",
                gone.object
            )));
        }
        self.lock_held.lock().expect("not poisoned").check()?;
        let summary = crate::cmd::Summary::of(&parsed);
        let figures = self.figures();
        let snapshot = Snapshot {
            id: self.id.clone(),
            host: summary
                .server_host
                .clone()
                .unwrap_or_else(crate::sys::hostname),
            source: self.source.clone(),
            time: summary.finished.unwrap_or(self.started),
            committed_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            gtid: summary.gtid_binlog_pos.clone(),
            binlog: summary
                .binlog_file
                .as_ref()
                .map(|f| format!("{f}:{}", summary.binlog_position.unwrap_or(0))),
            bytes_total: summary.bytes,
            bytes_new: figures.bytes_new,
            files_total: parsed.files.len() as u64,
            files_new: figures.files_new,
            places,
            manifest: String::from_utf8_lossy(manifest).into_owned(),
        };
        let name = format!("{SNAPSHOTS}{}", self.id);
        let bytes = serde_json::to_vec(&snapshot).expect("serialisable");
        // Refused as existing: ours, when a retried request had in fact succeeded.
        if !self.repo.put(&name, &bytes, true)? && self.repo.get(&name)? != Some(bytes) {
            return Err(Error::Store(format!(
                "a snapshot {} already exists in {}",
                self.id, self.repo.url
            )));
        }
        self.stop_refresher();
        if let Err(e) = self.repo.store().delete(&self.lock) {
            warn!("cannot remove the backup's lock {}: {e}", self.lock);
        }
        Ok(())
    }

    fn abort(&self) -> Option<Error> {
        self.stop_refresher();
        if let Err(e) = self.repo.store().delete(&self.lock) {
            warn!("cannot remove the backup's lock {}: {e}", self.lock);
        }
        None
    }
}

impl Drop for RepoSink {
    fn drop(&mut self) {
        self.stop_refresher();
    }
}

/// An SST, uploaded as it is read.
struct SstFile<'a> {
    sink: &'a RepoSink,
    identity: String,
    object: String,
    upload: Option<Box<dyn Upload>>,
    sealer: Option<Sealer>,
    /// Sealed bytes written so far.
    sent: u64,
}

impl SinkFile for SstFile<'_> {
    fn write(&mut self, chunk: Chunk) -> Result<()> {
        let mut out = Vec::with_capacity(chunk.data.len() + 64);
        self.sealer
            .as_mut()
            .expect("open until finished")
            .push(&chunk.data, &mut out);
        self.sent += out.len() as u64;
        self.upload
            .as_mut()
            .expect("open until finished")
            .write(out)
    }

    fn finish(mut self: Box<Self>, record: &FileRecord) -> Result<()> {
        let mut out = Vec::new();
        self.sealer.take().expect("finished once").finish(&mut out);
        let data_len = self.sent + out.len() as u64;
        let trailer = SstTrailer {
            identity: std::mem::take(&mut self.identity),
            record: record.clone(),
        };
        let trailer = crypto::seal(
            self.sink.repo.key(),
            &serde_json::to_vec(&trailer).expect("serialisable"),
        )?;
        out.extend_from_slice(&trailer);
        out.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        let total = data_len + trailer.len() as u64 + 4;
        let mut upload = self.upload.take().expect("finished once");
        if let Err(e) = upload.write(out) {
            upload.abort();
            return Err(e);
        }
        upload.finish()?;
        let place = Place {
            object: self.object.clone(),
            offset: 0,
            len: data_len,
        };
        self.sink.placed(record, place, Some(total));
        Ok(())
    }
}

impl Drop for SstFile<'_> {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            upload.abort();
        }
    }
}

/// A file bundled into the snapshot's packs: sealed in memory, then appended. One that
/// grows past a pack's size (a large WAL) becomes a pack of its own, uploaded as it is read.
struct PackedFile<'a> {
    sink: &'a RepoSink,
    sealer: Option<Sealer>,
    data: Vec<u8>,
    /// The pack of its own, once the file is that large.
    upload: Option<(String, Box<dyn Upload>)>,
    /// Sealed bytes uploaded so far.
    sent: u64,
}

impl PackedFile<'_> {
    fn send(&mut self) -> Result<()> {
        if self.upload.is_none() && self.data.len() >= PACK_TARGET {
            let name = self.sink.next_pack();
            let upload = self.sink.repo.store().upload(&name)?;
            self.upload = Some((name, upload));
        }
        if let Some((_, upload)) = &mut self.upload {
            self.sent += self.data.len() as u64;
            upload.write(std::mem::take(&mut self.data))?;
        }
        Ok(())
    }
}

impl SinkFile for PackedFile<'_> {
    fn write(&mut self, chunk: Chunk) -> Result<()> {
        self.sealer
            .as_mut()
            .expect("open until finished")
            .push(&chunk.data, &mut self.data);
        self.send()
    }

    fn finish(mut self: Box<Self>, record: &FileRecord) -> Result<()> {
        self.sealer
            .take()
            .expect("finished once")
            .finish(&mut self.data);
        self.send()?;
        if let Some((object, upload)) = self.upload.take() {
            upload.finish()?;
            let place = Place {
                object,
                offset: 0,
                len: self.sent,
            };
            self.sink.placed(record, place, Some(self.sent));
            return Ok(());
        }
        let len = self.data.len() as u64;
        let place = {
            let mut pack = self.sink.pack.lock().expect("not poisoned");
            let place = Place {
                object: pack.name.clone(),
                offset: pack.data.len() as u64,
                len,
            };
            pack.data.extend_from_slice(&self.data);
            place
        };
        self.sink.placed(record, place, Some(len));
        // The bytes are held until the pack is stored; a failure then fails the commit.
        self.sink.flush_pack(true)
    }
}

impl Drop for PackedFile<'_> {
    fn drop(&mut self) {
        if let Some((_, upload)) = self.upload.take() {
            upload.abort();
        }
    }
}
