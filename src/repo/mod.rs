//! A repository of backups in an object store or a directory: incremental forever.
//!
//! Objects (all sealed, see [`crypto`]; names never hold a user's words):
//! - `config`: the format, the repository's id, whether it is encrypted and a value that
//!   recognises the right key (plain JSON: it must be readable before the key is checked).
//! - `data/HH/NAME.GEN`: one SST, stored once for every backup that holds it. NAME is
//!   derived from RocksDB's identity of the file (db id, session id, file number) and its
//!   size, never from its name; GEN tells apart copies uploaded again (see prune). The
//!   object is the file's bytes, then its record (sizes, CRCs), then the record's length.
//! - `packs/SNAPSHOT-N`: everything else of one backup (WAL, MANIFEST, table definitions,
//!   the backup's own files), bundled; each file is sealed on its own, at an offset. A
//!   file larger than a pack (32 MiB) is a pack of its own.
//! - `snapshots/ID`: one backup's manifest and where each of its files lies. Written last,
//!   with `If-None-Match`: the commit point.
//! - `locks/ID`: a running backup, refreshed every minute; `trash/ID`: objects a prune
//!   found unreferenced, deleted by a later step once no backup can still use them.

pub mod crypto;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::manifest::{FileRecord, Manifest};
use crypto::Key;
use store::{DirStore, S3Store, Store};

const CONFIG: &str = "config";
pub const DATA: &str = "data/";
pub const PACKS: &str = "packs/";
pub const SNAPSHOTS: &str = "snapshots/";
pub const LOCKS: &str = "locks/";
pub const TRASH: &str = "trash/";
const FORMAT: u32 = 1;

/// A lock not refreshed for this long belongs to a backup that died.
pub const LOCK_STALE: Duration = Duration::from_secs(600);
/// How often a running backup refreshes its lock.
pub const LOCK_REFRESH: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
struct Config {
    format: u32,
    id: String,
    encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_check: Option<String>,
    created: i64,
}

/// Where one file of a snapshot lies: a range of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    pub object: String,
    pub offset: u64,
    /// Sealed bytes.
    pub len: u64,
}

/// One committed backup.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub host: String,
    /// The server backed up (`HOST:SOCKET` or `HOST:HOST:PORT`, as the backup was told).
    pub source: String,
    /// Seconds since the epoch: when the backup's consistent point was taken.
    pub time: i64,
    /// Milliseconds since the epoch when the snapshot was committed: orders snapshots taken
    /// within one second (`latest`). Zero in snapshots of format 1.
    #[serde(default)]
    pub committed_ms: u64,
    pub gtid: Option<String>,
    /// `FILE:POSITION` in the binary log.
    pub binlog: Option<String>,
    /// Bytes of the backup's files (as read from the server).
    pub bytes_total: u64,
    /// Bytes this backup uploaded (sealed): what it added to the repository.
    pub bytes_new: u64,
    pub files_total: u64,
    pub files_new: u64,
    /// Where each file (by its path in the manifest) lies.
    pub places: BTreeMap<String, Place>,
    /// The backup's manifest, as a directory backup holds it.
    pub manifest: String,
}

impl Snapshot {
    pub fn manifest(&self) -> Result<Manifest<serde_json::Value>> {
        Manifest::parse(self.manifest.as_bytes())
    }
}

/// What follows an SST's bytes in its object: which SST it is, and its record.
#[derive(Debug, Serialize, Deserialize)]
pub struct SstTrailer {
    pub identity: String,
    pub record: FileRecord,
}

/// A running backup's lock.
#[derive(Debug, Serialize, Deserialize)]
pub struct Lock {
    pub host: String,
    pub started: i64,
    pub refreshed: i64,
    /// The trash lists this backup saw when it started: it never uses their objects.
    pub seen_trash: Vec<String>,
}

/// Objects a prune found unreferenced.
#[derive(Debug, Serialize, Deserialize)]
pub struct Trash {
    pub created: i64,
    pub objects: Vec<String>,
}

/// An open repository.
pub struct Repo {
    store: Box<dyn Store>,
    key: Option<Key>,
    /// The URL, for messages.
    pub url: String,
}

/// How a repository is reached: `s3://BUCKET/PREFIX`, or a directory.
enum Address {
    S3 { bucket: String, prefix: String },
    Dir(PathBuf),
}

fn address(url: &str) -> Result<Address> {
    match url.strip_prefix("s3://") {
        Some(rest) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::Usage(format!("{url}: no bucket in the S3 URL")));
            }
            Ok(Address::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            })
        }
        None if url.contains("://") => Err(Error::Usage(format!(
            "{url}: a repository is s3://BUCKET/PREFIX or a directory"
        ))),
        None => Ok(Address::Dir(PathBuf::from(url))),
    }
}

fn open_store(url: &str, options: &HashMap<String, String>) -> Result<Box<dyn Store>> {
    Ok(match address(url)? {
        Address::S3 { bucket, prefix } => Box::new(S3Store::open(
            &store::s3_config(&bucket, options)?,
            &prefix,
        )?),
        Address::Dir(dir) => Box::new(DirStore::open(&dir)),
    })
}

impl Repo {
    /// Creates a repository. Encrypted unless `key_file` is None; the key file is created
    /// with a new key when it does not exist.
    pub fn init(
        url: &str,
        key_file: Option<&Path>,
        options: &HashMap<String, String>,
    ) -> Result<Repo> {
        if let Address::Dir(dir) = address(url)? {
            if dir.exists()
                && std::fs::read_dir(&dir)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(true)
            {
                return Err(Error::Refused(format!(
                    "{} is not empty: a repository is created in a new or empty directory",
                    dir.display()
                )));
            }
        }
        let store = open_store(url, options)?;
        let key = match key_file {
            Some(path) if path.exists() => Some(Key::load(path)?),
            Some(path) => {
                let key = Key::create(path)?;
                crate::info!("Created a new key in {}: keep a copy of it apart from the repository, nothing can be restored without it", path.display());
                Some(key)
            }
            None => None,
        };
        let id = crate::net::tls::random_hex(16)?;
        let config = Config {
            format: FORMAT,
            key_check: key.as_ref().map(|k| k.check_value(&id)),
            encrypted: key.is_some(),
            id,
            created: crate::log::unix_now(),
        };
        let bytes = serde_json::to_vec_pretty(&config).expect("serialisable");
        if !store.put(CONFIG, bytes, true)? {
            return Err(Error::Refused(format!("{url} already holds a repository")));
        }
        Ok(Repo {
            store,
            key,
            url: url.to_string(),
        })
    }

    /// Opens a repository and checks the key against it.
    pub fn open(
        url: &str,
        key_file: Option<&Path>,
        options: &HashMap<String, String>,
    ) -> Result<Repo> {
        let store = open_store(url, options)?;
        let bytes = store.get(CONFIG, None)?.ok_or_else(|| {
            Error::Refused(format!(
                "{url} holds no repository (no config object): create one with `repo init`"
            ))
        })?;
        let config: Config = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Corrupt(format!("the repository's config is damaged: {e}")))?;
        if config.format > FORMAT {
            return Err(Error::Refused(format!(
                "{url} was written by a newer version (format {})",
                config.format
            )));
        }
        let key = match (config.encrypted, key_file) {
            (true, None) => {
                return Err(Error::Usage(format!(
                    "{url} is encrypted: give its --key-file"
                )))
            }
            (true, Some(path)) => {
                let key = Key::load(path)?;
                let expected = config.key_check.as_deref().unwrap_or("");
                if !crate::net::tls::same_secret(&key.check_value(&config.id), expected) {
                    return Err(Error::Refused(format!(
                        "the key in {} is not the key of {url}: nothing was read or written",
                        path.display()
                    )));
                }
                Some(key)
            }
            // Never store plain what the caller means to be encrypted.
            (false, Some(path)) => {
                return Err(Error::Refused(format!(
                    "{url} is not encrypted, but a key file ({}) was given: nothing was read or written; run without --key-file to use it",
                    path.display()
                )))
            }
            (false, None) => None,
        };
        Ok(Repo {
            store,
            key,
            url: url.to_string(),
        })
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub fn key(&self) -> Option<&Key> {
        self.key.as_ref()
    }

    /// The stem of the object name of an SST with this identity (which holds its size).
    pub fn sst_stem(&self, identity: &str) -> String {
        let name = self.name(&format!("sst {identity}"));
        format!("{DATA}{}/{name}", &name[..2])
    }

    /// A name derived from `text`: an HMAC under the key, or a SHA-256 unencrypted.
    fn name(&self, text: &str) -> String {
        match &self.key {
            Some(k) => k.name(text),
            None => crate::net::tls::hex(
                ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref(),
            ),
        }
    }

    /// Sixteen hex digits derived from `text`, revealing nothing without the key.
    pub fn tag(&self, text: &str) -> String {
        self.name(text)[..16].to_string()
    }

    /// Four hex digits that tell apart the servers backed up (the start of their snapshots'
    /// ids), revealing nothing without the key.
    pub fn source_tag(&self, source: &str) -> String {
        self.name(&format!("source {source}"))[..4].to_string()
    }

    /// Seals and stores a small object.
    pub fn put(&self, name: &str, plain: &[u8], create_only: bool) -> Result<bool> {
        self.store
            .put(name, crypto::seal(self.key(), plain)?, create_only)
    }

    /// Reads and opens a small object; None when it does not exist.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self.store.get(name, None)? {
            Some(sealed) => Ok(Some(crypto::open(self.key(), &sealed, name)?)),
            None => Ok(None),
        }
    }

    /// Reads a JSON object.
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        match self.get(name)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("{name} in {} is damaged: {e}", self.url))),
            None => Ok(None),
        }
    }

    pub fn put_json(&self, name: &str, value: &impl Serialize, create_only: bool) -> Result<bool> {
        self.put(
            name,
            &serde_json::to_vec(value).expect("serialisable"),
            create_only,
        )
    }

    /// Every committed snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        for listed in self.store.list(SNAPSHOTS)? {
            // A snapshot deleted by a concurrent forget is simply gone.
            if let Some(s) = self.get_json::<Snapshot>(&listed.name)? {
                out.push(s);
            }
        }
        out.sort_by(|a, b| (a.time, a.committed_ms, &a.id).cmp(&(b.time, b.committed_ms, &b.id)));
        Ok(out)
    }

    /// The snapshot `id` (a unique prefix will do), or the newest for `latest`; of `host`
    /// (a host or a source) only, when given.
    pub fn snapshot(&self, id: &str, host: Option<&str>) -> Result<Snapshot> {
        let mut all = self
            .snapshots()?
            .into_iter()
            .filter(|s| host.is_none_or(|h| s.host == h || s.source == h));
        let found: Vec<Snapshot> = match id {
            "latest" => all.next_back().into_iter().collect(),
            _ => all.filter(|s| s.id.starts_with(id)).collect(),
        };
        let of = host.map(|h| format!(" of {h}")).unwrap_or_default();
        match found.len() {
            1 => Ok(found.into_iter().next().expect("one")),
            0 => Err(Error::Refused(format!(
                "no snapshot {id}{of} in {}",
                self.url
            ))),
            _ => Err(Error::Usage(format!(
                "{id} names several snapshots: give more of the id"
            ))),
        }
    }

    /// The record stored after an SST object's bytes (`size`: the object's size), if the
    /// object holds the SST of this `identity` (an object copied under another name is not
    /// taken for what its name says).
    pub fn sst_record(
        &self,
        object: &str,
        size: u64,
        identity: &str,
    ) -> Result<Option<(FileRecord, Place)>> {
        let tail = 4096.min(size);
        let Some(end) = self.store.get(object, Some(size - tail..size))? else {
            return Ok(None);
        };
        let damaged = || {
            Error::Corrupt(format!(
                "{object} in {} is damaged: its record is unreadable",
                self.url
            ))
        };
        if end.len() < 4 {
            return Err(damaged());
        }
        let len = u32::from_le_bytes(end[end.len() - 4..].try_into().expect("4 bytes")) as u64;
        if len + 4 > size {
            return Err(damaged());
        }
        let sealed = match len + 4 <= tail {
            true => end[(tail - 4 - len) as usize..end.len() - 4].to_vec(),
            false => self
                .store
                .get(object, Some(size - 4 - len..size - 4))?
                .ok_or_else(damaged)?,
        };
        let trailer: SstTrailer =
            serde_json::from_slice(&crypto::open(self.key(), &sealed, object)?)
                .map_err(|_| damaged())?;
        if trailer.identity != identity {
            return Ok(None);
        }
        let record = trailer.record;
        let place = Place {
            object: object.to_string(),
            offset: 0,
            len: size - 4 - len,
        };
        Ok(Some((record, place)))
    }

    /// Every data and pack object, with its size.
    pub fn objects(&self) -> Result<HashMap<String, u64>> {
        let mut out = HashMap::new();
        for prefix in [DATA, PACKS] {
            out.extend(
                self.store
                    .list(prefix)?
                    .into_iter()
                    .map(|l| (l.name, l.size)),
            );
        }
        Ok(out)
    }

    /// The trash lists, by name, with when the store wrote each (its own clock).
    pub fn trash(&self) -> Result<BTreeMap<String, (Trash, SystemTime)>> {
        let mut out = BTreeMap::new();
        for listed in self.store.list(TRASH)? {
            if let Some(t) = self.get_json::<Trash>(&listed.name)? {
                out.insert(listed.name, (t, listed.modified));
            }
        }
        Ok(out)
    }

    /// The locks of backups that may still run: written by the store less than
    /// [`LOCK_STALE`] before `now`, a time of the store's own clock (when it wrote an
    /// object), so that no two hosts' clocks are compared.
    pub fn live_locks(&self, now: SystemTime) -> Result<BTreeMap<String, Lock>> {
        let mut out = BTreeMap::new();
        for listed in self.store.list(LOCKS)? {
            let age = now.duration_since(listed.modified).unwrap_or_default();
            if age >= LOCK_STALE {
                // A backup that died. One merely paused refuses to commit when it wakes.
                self.store.delete(&listed.name)?;
                continue;
            }
            if let Some(lock) = self.get_json::<Lock>(&listed.name)? {
                out.insert(listed.name, lock);
            }
        }
        Ok(out)
    }
}
