//! A directory as a sink: the backup tree written directly, several files at once. Each
//! file is created new (never over an existing one), written behind (handed to the disk in
//! steps and dropped from the page cache, so gigabytes of dirty pages never pile up), and
//! synced before it is acknowledged. The commit syncs every directory, then writes the
//! manifest under a temporary name, syncs it and renames it into place: a directory
//! without `myrocks_hotbackup.json` is an incomplete backup, and is never taken for a
//! complete one. An abort removes everything the backup created.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::{Chunk, Sink, SinkFile};
use crate::error::{Error, IoContext, Result};
use crate::format::layout::MANIFEST_NAME;
use crate::format::manifest::FileRecord;
use crate::format::{safe_components, FileMeta};

/// Written data that may wait in the page cache before it is handed to the disk.
const WRITE_BEHIND: u64 = 8 << 20;

pub struct DirSink {
    root: PathBuf,
    /// True when the backup created the root (an abort then removes it too).
    created_root: bool,
    /// Directories created, and files created, for the syncs and for an abort.
    dirs: Mutex<BTreeSet<PathBuf>>,
    files: Mutex<Vec<PathBuf>>,
}

impl DirSink {
    /// Takes `root`, which must be an empty directory or not exist yet (its parent must).
    pub fn create(root: &Path) -> Result<DirSink> {
        let created_root = match fs::symlink_metadata(root) {
            Ok(md) if md.is_dir() => {
                let mut entries = fs::read_dir(root).with_path("list", root)?;
                if let Some(e) =
                    entries.find(|e| !e.as_ref().is_ok_and(|e| e.file_name() == "lost+found"))
                {
                    let name = e.map(|e| e.file_name()).unwrap_or_default();
                    return Err(Error::Refused(format!(
                        "backup target {} is not empty (it holds {name:?}): back up into a new or empty directory",
                        root.display()
                    )));
                }
                false
            }
            Ok(_) => {
                return Err(Error::Refused(format!(
                    "backup target {} exists and is not a directory",
                    root.display()
                )))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir(root).with_path("create the backup directory", root)?;
                true
            }
            Err(e) => return Err(Error::io(format!("cannot stat {}", root.display()), e)),
        };
        Ok(DirSink {
            root: root.to_path_buf(),
            created_root,
            dirs: Mutex::new(BTreeSet::new()),
            files: Mutex::new(Vec::new()),
        })
    }

    /// Creates the parent directories of a file; returns the file's full path.
    fn prepare(&self, path: &str) -> Result<PathBuf> {
        let parts = safe_components(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(Error::Refused(format!(
                "cannot store a file named {path:?}"
            )));
        };
        let mut dir = self.root.clone();
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        for part in parents {
            dir.push(part);
            if dirs.contains(&dir) {
                continue;
            }
            match fs::create_dir(&dir) {
                Ok(()) => {
                    dirs.insert(dir.clone());
                }
                Err(e) => return Err(Error::io(format!("cannot create {}", dir.display()), e)),
            }
        }
        Ok(dir.join(name))
    }
}

impl Sink for DirSink {
    /// A directory takes as many files at once as the pipeline reads.
    fn max_in_flight(&self) -> usize {
        usize::MAX
    }

    fn open(&self, meta: &FileMeta) -> Result<Box<dyn SinkFile + '_>> {
        let path = self.prepare(&meta.path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_path("create", &path)?;
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.clone());
        Ok(Box::new(DirFile {
            file,
            path,
            mode: meta.mode & 0o777,
            mtime: meta.mtime,
            written: 0,
            submitted: 0,
            dropped: 0,
        }))
    }

    fn commit(&self, manifest: &[u8]) -> Result<()> {
        let dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for dir in dirs.iter().rev().chain([&self.root]) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .with_path("sync", dir)?;
        }
        {
            let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
            files.push(partial_manifest(&self.root));
            files.push(self.root.join(MANIFEST_NAME));
        }
        publish_manifest(&self.root, manifest)?;
        if self.created_root {
            // The new directory's own entry, in its parent.
            if let Some(parent) = self.root.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        Ok(())
    }

    /// Removes the files newest first: the manifest, when it was written, goes before the
    /// files it lists.
    fn abort(&self) -> Option<Error> {
        for file in self
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
        {
            let _ = fs::remove_file(file);
        }
        for dir in self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
        {
            let _ = fs::remove_dir(dir);
        }
        if self.created_root {
            let _ = fs::remove_dir(&self.root);
        }
        None
    }
}

fn partial_manifest(root: &Path) -> PathBuf {
    root.join(format!(".{MANIFEST_NAME}.partial"))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_path("sync", dir)
}

/// Makes a backup directory complete: writes its manifest under a temporary name, syncs it,
/// renames it into place (never over another) and syncs the directory. The files it lists
/// and their directories must be synced already.
pub fn publish_manifest(root: &Path, manifest: &[u8]) -> Result<()> {
    let partial = partial_manifest(root);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&partial)
        .with_path("create", &partial)?;
    f.write_all(manifest)
        .and_then(|()| f.sync_all())
        .with_path("write", &partial)?;
    let target = root.join(MANIFEST_NAME);
    match crate::sys::rename_noreplace(&partial, &target) {
        Ok(()) => {}
        // NFS, older ZFS and FUSE filesystems lack RENAME_NOREPLACE. The directory is
        // this backup's alone: a plain rename, unless a manifest is somehow there.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
            ) && !target.exists() =>
        {
            fs::rename(&partial, &target).with_path("rename the manifest to", &target)?;
        }
        Err(e) => {
            return Err(Error::io(
                format!("cannot rename the manifest to {}", target.display()),
                e,
            ))
        }
    }
    sync_dir(root)
}

struct DirFile {
    file: File,
    path: PathBuf,
    mode: u32,
    mtime: i64,
    written: u64,
    /// Bytes handed to the disk so far, and of those, bytes known on disk and dropped from
    /// the page cache.
    submitted: u64,
    dropped: u64,
}

impl SinkFile for DirFile {
    fn write(&mut self, chunk: Chunk) -> Result<()> {
        let len = chunk.data.len() as u64;
        // Pages of an immutable file are copied inside the kernel (shared, on a filesystem
        // with reflinks); anything else, or where the kernel cannot, is written.
        let copied = match chunk.data.file_range() {
            Some((src, offset)) => {
                crate::sys::copy_range(src, offset, &self.file, self.written, len)
                    .with_path("copy into", &self.path)?
            }
            None => false,
        };
        if !copied {
            self.file
                .write_all_at(&chunk.data, self.written)
                .with_path("write", &self.path)?;
        }
        self.written += len;
        if self.written - self.submitted >= WRITE_BEHIND {
            // Only hints: the sync at the end makes everything durable.
            crate::sys::start_writeback(&self.file, self.submitted, self.written - self.submitted);
            if self.submitted > self.dropped {
                crate::sys::wait_writeback(&self.file, self.dropped, self.submitted - self.dropped);
                crate::sys::drop_cache(&self.file, self.dropped, self.submitted - self.dropped);
            }
            self.dropped = self.submitted;
            self.submitted = self.written;
        }
        Ok(())
    }

    fn finish(self: Box<Self>, _record: &FileRecord) -> Result<()> {
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(self.mtime.max(0) as u64);
        self.file
            .set_permissions(fs::Permissions::from_mode(self.mode))
            .and_then(|()| self.file.set_modified(mtime))
            .and_then(|()| self.file.sync_all())
            .with_path("sync", &self.path)?;
        crate::sys::drop_cache(&self.file, 0, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Buf;

    fn put(sink: &DirSink, path: &str, data: &[u8]) {
        let mut f = sink
            .open(&FileMeta::generated(path, data.len() as u64))
            .unwrap();
        f.write(Chunk {
            data: Buf::from_vec(data.to_vec()),
            crc32: crc32fast::hash(data),
        })
        .unwrap();
        f.finish(&FileRecord::of_bytes(path, data)).unwrap();
    }

    #[test]
    fn the_manifest_comes_last_and_an_abort_removes_everything() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("b");
        let sink = DirSink::create(&root).unwrap();
        put(&sink, "#rocksdb/000001.sst", b"sst");
        put(&sink, "db/t.frm", b"frm");
        assert!(!root.join(MANIFEST_NAME).exists());
        sink.commit(b"{}").unwrap();
        assert_eq!(fs::read(root.join(MANIFEST_NAME)).unwrap(), b"{}");
        assert_eq!(fs::read(root.join("db/t.frm")).unwrap(), b"frm");
        assert!(!root.join(format!(".{MANIFEST_NAME}.partial")).exists());

        let other = tmp.path().join("c");
        let sink = DirSink::create(&other).unwrap();
        put(&sink, "#rocksdb/000001.sst", b"sst");
        assert!(sink.abort().is_none());
        assert!(!other.exists(), "the directory it created is gone too");
    }

    #[test]
    fn a_non_empty_target_is_refused_and_an_empty_one_is_kept_on_abort() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("x"), b"mine").unwrap();
        assert!(DirSink::create(tmp.path()).is_err());
        assert_eq!(fs::read(tmp.path().join("x")).unwrap(), b"mine");

        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let sink = DirSink::create(&empty).unwrap();
        put(&sink, "a/b", b"1");
        sink.abort();
        assert!(empty.is_dir() && fs::read_dir(&empty).unwrap().next().is_none());
    }

    #[test]
    fn files_are_never_written_outside_the_target() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = DirSink::create(&tmp.path().join("b")).unwrap();
        for bad in ["../x", "/etc/x", "a/../../x"] {
            assert!(sink.open(&FileMeta::generated(bad, 0)).is_err(), "{bad}");
        }
    }
}
