//! Where a repository's objects live: a bucket of an S3-compatible store, or a directory.
//! Both offer the same few operations on named objects; names are `/`-separated and never
//! hold anything a user wrote. The S3 store is `object_store`'s client (signing, retries
//! with backoff, multipart uploads, `If-None-Match`), driven from the pipeline's threads
//! through a small runtime. The directory store is written here: `object_store`'s local
//! store does not fsync, and a backup counts an object stored only once it is durable.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectStore,
    ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use crate::error::{Error, IoContext, Result};

/// One object, as a listing shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// The operations a repository needs of its store.
pub trait Store: Send + Sync {
    /// Stores an object whole. With `create_only`, an object of that name that already
    /// exists is left alone and the call returns false.
    fn put(&self, name: &str, data: Vec<u8>, create_only: bool) -> Result<bool>;
    /// Starts an object written piece by piece (a large SST); it exists once finished.
    fn upload(&self, name: &str) -> Result<Box<dyn Upload>>;
    /// An object's bytes, or a range of them; None when there is no such object.
    fn get(&self, name: &str, range: Option<Range<u64>>) -> Result<Option<Vec<u8>>>;
    /// Every object whose name starts with `prefix` (a folder, ending in `/`).
    fn list(&self, prefix: &str) -> Result<Vec<Listed>>;
    /// Removes an object; one that is already gone is not an error.
    fn delete(&self, name: &str) -> Result<()>;
}

/// An object being written in parts.
pub trait Upload: Send {
    fn write(&mut self, data: Vec<u8>) -> Result<()>;
    /// Returns once the object is stored durably.
    fn finish(self: Box<Self>) -> Result<()>;
    fn abort(self: Box<Self>);
}

/// Where an S3 store is and who we are to it. `Debug` never shows the secret.
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub bucket: String,
    /// Seconds a request is retried (with backoff) before the store counts as down.
    pub retry_secs: u64,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<hidden>")
            .field("bucket", &self.bucket)
            .field("retry_secs", &self.retry_secs)
            .finish()
    }
}

/// A bucket (and a prefix in it) of an S3-compatible store.
pub struct S3Store {
    client: Arc<AmazonS3>,
    prefix: String,
    runtime: tokio::runtime::Runtime,
    what: String,
}

/// Bytes of a multipart upload's parts (S3 wants at least 5 MiB but for the last).
const PART_SIZE: usize = 8 << 20;
/// Parts of one object uploading at once.
const PARTS_IN_FLIGHT: usize = 2;

impl S3Store {
    pub fn open(config: &S3Config, prefix: &str) -> Result<S3Store> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(200),
                    max_backoff: Duration::from_secs(10),
                    base: 2.0,
                },
                max_retries: 1000,
                retry_timeout: Duration::from_secs(config.retry_secs),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(300)),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let prefix = prefix.trim_matches('/');
        if Key::from(prefix).to_string() != prefix {
            return Err(Error::Usage(format!(
                "the S3 prefix {prefix:?} has characters or empty parts object keys cannot hold as they are: use letters, digits, '-', '_', '.' and single '/'"
            )));
        }
        let client = builder
            .build()
            .map_err(|e| Error::Usage(format!("cannot use the S3 store: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start the S3 client's threads", e))?;
        Ok(S3Store {
            client: Arc::new(client),
            prefix: prefix.trim_matches('/').to_string(),
            runtime,
            what: format!(
                "s3://{}/{} at {}",
                config.bucket,
                prefix.trim_matches('/'),
                config.endpoint.as_deref().unwrap_or("AWS")
            ),
        })
    }

    fn key(&self, name: &str) -> Key {
        match self.prefix.is_empty() {
            true => Key::from(name),
            false => Key::from(format!("{}/{name}", self.prefix)),
        }
    }

    fn failed(&self, what: &str, name: &str, e: object_store::Error) -> Error {
        Error::Store(format!("{what} {name} in {}: {e}", self.what))
    }
}

impl Store for S3Store {
    fn put(&self, name: &str, data: Vec<u8>, create_only: bool) -> Result<bool> {
        let opts = PutOptions {
            mode: match create_only {
                true => PutMode::Create,
                false => PutMode::Overwrite,
            },
            ..Default::default()
        };
        let key = self.key(name);
        match self
            .runtime
            .block_on(self.client.put_opts(&key, PutPayload::from(data), opts))
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. })
                if create_only =>
            {
                Ok(false)
            }
            Err(e) => Err(self.failed("cannot store", name, e)),
        }
    }

    fn upload(&self, name: &str) -> Result<Box<dyn Upload>> {
        let key = self.key(name);
        let upload = self
            .runtime
            .block_on(self.client.put_multipart(&key))
            .map_err(|e| self.failed("cannot start uploading", name, e))?;
        Ok(Box::new(S3Upload {
            upload,
            handle: self.runtime.handle().clone(),
            buffer: Vec::new(),
            parts: Vec::new(),
            name: name.to_string(),
            what: self.what.clone(),
        }))
    }

    fn get(&self, name: &str, range: Option<Range<u64>>) -> Result<Option<Vec<u8>>> {
        let key = self.key(name);
        let opts = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let got = self.runtime.block_on(async {
            let result = self.client.get_opts(&key, opts).await?;
            result.bytes().await
        });
        match got {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed("cannot read", name, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let key = self.key(prefix.trim_end_matches('/'));
        let strip = match self.prefix.is_empty() {
            true => 0,
            false => self.prefix.len() + 1,
        };
        let metas: Vec<_> = self.runtime.block_on(async {
            let stream = self.client.list(Some(&key));
            stream.collect::<Vec<_>>().await
        });
        let mut out = Vec::with_capacity(metas.len());
        for meta in metas {
            let meta = meta.map_err(|e| self.failed("cannot list", prefix, e))?;
            let full = meta.location.to_string();
            out.push(Listed {
                name: full[strip.min(full.len())..].to_string(),
                size: meta.size,
                modified: meta.last_modified.into(),
            });
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name);
        match self.runtime.block_on(self.client.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed("cannot delete", name, e)),
        }
    }
}

struct S3Upload {
    upload: Box<dyn MultipartUpload>,
    handle: tokio::runtime::Handle,
    buffer: Vec<u8>,
    parts: Vec<tokio::task::JoinHandle<object_store::Result<()>>>,
    name: String,
    what: String,
}

impl S3Upload {
    fn send_part(&mut self) -> Result<()> {
        let part = std::mem::take(&mut self.buffer);
        let future = self.upload.put_part(PutPayload::from(part));
        self.parts.push(self.handle.spawn(future));
        while self.parts.len() > PARTS_IN_FLIGHT {
            let first = self.parts.remove(0);
            self.wait(first)?;
        }
        Ok(())
    }

    fn complete(&mut self) -> Result<()> {
        if !self.buffer.is_empty() || self.parts.is_empty() {
            self.send_part()?;
        }
        for part in std::mem::take(&mut self.parts) {
            self.wait(part)?;
        }
        let handle = self.handle.clone();
        handle
            .block_on(self.upload.complete())
            .map(|_| ())
            .map_err(|e| {
                Error::Store(format!(
                    "cannot complete the upload of {} to {}: {e}",
                    self.name, self.what
                ))
            })
    }

    fn wait(&self, part: tokio::task::JoinHandle<object_store::Result<()>>) -> Result<()> {
        match self.handle.block_on(part) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Store(format!(
                "cannot upload {} to {}: {e}",
                self.name, self.what
            ))),
            Err(e) => Err(Error::Store(format!("an upload task failed: {e}"))),
        }
    }
}

impl Upload for S3Upload {
    fn write(&mut self, data: Vec<u8>) -> Result<()> {
        match self.buffer.is_empty() && data.len() >= PART_SIZE {
            true => self.buffer = data,
            false => self.buffer.extend_from_slice(&data),
        }
        if self.buffer.len() >= PART_SIZE {
            self.send_part()?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let result = self.complete();
        if result.is_err() {
            // The store keeps (and bills) the parts of an upload never completed.
            self.abort();
        }
        result
    }

    fn abort(mut self: Box<Self>) {
        for part in std::mem::take(&mut self.parts) {
            part.abort();
        }
        let handle = self.handle.clone();
        let _ = handle.block_on(self.upload.abort());
    }
}

/// A repository in a directory (a local disk, NFS). Objects are files; each is written to
/// a temporary name, fsynced, and renamed into place, its directory fsynced too.
pub struct DirStore {
    root: PathBuf,
}

/// Temporary files of objects being written start with this.
const PARTIAL: &str = ".partial-";

impl DirStore {
    pub fn open(root: &Path) -> DirStore {
        DirStore {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// A new temporary file beside where `name` goes.
    fn temporary(&self, name: &str) -> Result<(File, PathBuf)> {
        let path = self.path(name);
        let dir = path.parent().expect("object names have a folder");
        if !dir.is_dir() {
            fs::create_dir_all(dir).with_path("create", dir)?;
            // The new folder's entry is durable too, not only the files in it.
            let mut parent = dir;
            while let Some(up) = parent.parent().filter(|_| parent != self.root) {
                crate::sink::dir::sync_dir(up)?;
                parent = up;
            }
        }
        let tmp = dir.join(format!("{PARTIAL}{}", crate::net::tls::random_hex(8)?));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_path("create", &tmp)?;
        Ok((file, tmp))
    }

    /// Makes a written temporary file the object `name`.
    fn publish(&self, file: File, tmp: &Path, name: &str, create_only: bool) -> Result<bool> {
        file.sync_all().with_path("sync", tmp)?;
        drop(file);
        let path = self.path(name);
        let placed = match create_only {
            // NFS and CIFS lack RENAME_NOREPLACE; a hard link fails as well on an existing name.
            true => crate::sys::rename_noreplace(tmp, &path).or_else(|e| {
                match e.raw_os_error() == Some(libc::EINVAL) {
                    true => fs::hard_link(tmp, &path).and_then(|()| fs::remove_file(tmp)),
                    false => Err(e),
                }
            }),
            false => fs::rename(tmp, &path),
        };
        match placed {
            Ok(()) => {
                crate::sink::dir::sync_dir(path.parent().expect("in a folder"))?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && create_only => {
                let _ = fs::remove_file(tmp);
                Ok(false)
            }
            Err(e) => {
                let _ = fs::remove_file(tmp);
                Err(Error::io(format!("cannot store {}", path.display()), e))
            }
        }
    }
}

impl Store for DirStore {
    fn put(&self, name: &str, data: Vec<u8>, create_only: bool) -> Result<bool> {
        let (mut file, tmp) = self.temporary(name)?;
        if let Err(e) = file.write_all(&data) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(format!("cannot write {}", tmp.display()), e));
        }
        self.publish(file, &tmp, name, create_only)
    }

    fn upload(&self, name: &str) -> Result<Box<dyn Upload>> {
        let (file, tmp) = self.temporary(name)?;
        Ok(Box::new(DirUpload {
            store: DirStore::open(&self.root),
            file,
            tmp,
            name: name.to_string(),
        }))
    }

    fn get(&self, name: &str, range: Option<Range<u64>>) -> Result<Option<Vec<u8>>> {
        let path = self.path(name);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot open {}", path.display()), e)),
        };
        let mut data = Vec::new();
        match range {
            Some(r) => {
                file.seek(SeekFrom::Start(r.start))
                    .with_path("read", &path)?;
                file.take(r.end - r.start)
                    .read_to_end(&mut data)
                    .with_path("read", &path)?;
            }
            None => {
                file.read_to_end(&mut data).with_path("read", &path)?;
            }
        }
        Ok(Some(data))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        let top = self.path(prefix.trim_end_matches('/'));
        let mut dirs = vec![(top, prefix.trim_end_matches('/').to_string())];
        while let Some((dir, name)) = dirs.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
            };
            for entry in entries {
                let entry = entry.with_path("list", &dir)?;
                let file_name = entry.file_name().to_string_lossy().into_owned();
                let md = entry.metadata().with_path("stat", &entry.path())?;
                let child = format!("{name}/{file_name}");
                if md.is_dir() {
                    dirs.push((entry.path(), child));
                } else if !file_name.starts_with(PARTIAL) {
                    out.push(Listed {
                        name: child,
                        size: md.len(),
                        modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    });
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("cannot delete {}", path.display()), e)),
        }
    }
}

struct DirUpload {
    store: DirStore,
    file: File,
    tmp: PathBuf,
    name: String,
}

impl Upload for DirUpload {
    fn write(&mut self, data: Vec<u8>) -> Result<()> {
        self.file.write_all(&data).with_path("write", &self.tmp)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let DirUpload {
            store,
            file,
            tmp,
            name,
        } = *self;
        store.publish(file, &tmp, &name, false).map(|_| ())
    }

    fn abort(self: Box<Self>) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// The S3 settings from the environment (the standard `AWS_*` variables) and the
/// `[myrocks-hotbackup]` group of option files (`s3-endpoint`, `s3-region`,
/// `s3-access-key-id`, `s3-secret-access-key`, `s3-retry-secs`); the environment wins.
pub fn s3_config(bucket: &str, options: &HashMap<String, String>) -> Result<S3Config> {
    let pick = |env: &str, option: &str| {
        std::env::var(env)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| options.get(option).cloned())
    };
    let missing = |what: &str, env: &str, option: &str| {
        Error::Usage(format!(
            "no S3 {what}: set {env} or {option}= in the [myrocks-hotbackup] group of an option file"
        ))
    };
    let retry_secs = match pick("MYROCKS_HOTBACKUP_S3_RETRY_SECS", "s3-retry-secs") {
        Some(v) => v
            .parse()
            .map_err(|_| Error::Usage(format!("s3-retry-secs: {v:?} is not a number")))?,
        None => 120,
    };
    Ok(S3Config {
        endpoint: pick("AWS_ENDPOINT_URL", "s3-endpoint"),
        region: pick("AWS_REGION", "s3-region")
            .or_else(|| pick("AWS_DEFAULT_REGION", "s3-region"))
            .unwrap_or_else(|| "us-east-1".into()),
        access_key_id: pick("AWS_ACCESS_KEY_ID", "s3-access-key-id")
            .ok_or_else(|| missing("access key", "AWS_ACCESS_KEY_ID", "s3-access-key-id"))?,
        secret_access_key: pick("AWS_SECRET_ACCESS_KEY", "s3-secret-access-key").ok_or_else(
            || {
                missing(
                    "secret key",
                    "AWS_SECRET_ACCESS_KEY",
                    "s3-secret-access-key",
                )
            },
        )?,
        bucket: bucket.to_string(),
        retry_secs,
    })
}
