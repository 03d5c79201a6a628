//! The directory where the server creates this run's RocksDB checkpoints.
//!
//! Each run works in its own `myrocks_hotbackup-run-<pid>-<time>` directory, marked with an
//! owner file that the run holds locked (`flock`) for as long as it lives. The directory is
//! removed when the run ends, however it ends; a run killed outright leaves it behind, and
//! the next run finds its owner file unlocked and removes it. A lock, unlike a pid, is
//! right across PID namespaces and containers. Nothing without our owner file is touched.
//!
//! The run directory is ours (mode 0711); the server writes only into its `ckpt/`
//! subdirectory, which it owns, and our copies of the Aria log and the log tables sit in
//! subdirectories readable by us alone.
//!
//! Checkpoints are hard links, but they pin files that compaction deletes, and the run
//! keeps small copies of its own here: the run stops before the filesystem, which is the
//! server's, runs out of space.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::{info, warn};

const RUN_PREFIX: &str = "myrocks_hotbackup-run-";
const OWNER_FILE: &str = "owner";
const OWNER_TAG: &str = "myrocks-hotbackup";
/// The one directory of a run the server writes into.
const CKPT_DIR: &str = "ckpt";

/// This run's checkpoint directory, removed on drop.
pub struct CheckpointArea {
    run_dir: PathBuf,
    /// The owner file, locked while the run lives.
    _owner: fs::File,
    /// The checkpoint directory itself, when this run created it (removed too, if empty).
    created_parent: Option<PathBuf>,
}

impl CheckpointArea {
    /// Prepares `parent` for checkpoints of the RocksDB data in `rocksdb_dir`: it must be on
    /// the same filesystem (checkpoints are hard links there, full copies elsewhere).
    pub fn prepare(parent: &Path, rocksdb_dir: &Path) -> Result<CheckpointArea> {
        let rocks =
            fs::metadata(rocksdb_dir).with_path("stat the RocksDB data directory", rocksdb_dir)?;
        let created_parent = match fs::metadata(parent) {
            Ok(md) if md.is_dir() => None,
            Ok(_) => {
                return Err(Error::Refused(format!(
                    "checkpoint directory {} is not a directory",
                    parent.display()
                )))
            }
            Err(_) => {
                create_private_dir(parent, 0o711)
                    .with_path("create the checkpoint directory", parent)?;
                Some(parent.to_path_buf())
            }
        };
        let cleanup_parent = |e: Error| {
            if let Some(p) = &created_parent {
                let _ = fs::remove_dir(p);
            }
            e
        };
        let md = fs::metadata(parent)
            .with_path("stat", parent)
            .map_err(cleanup_parent)?;
        if md.dev() != rocks.dev() {
            return Err(cleanup_parent(Error::Refused(format!(
                "checkpoint directory {} is on another filesystem than the RocksDB data ({}): \
                 checkpoints would be full copies instead of hard links; choose a directory on the same filesystem",
                parent.display(),
                rocksdb_dir.display()
            ))));
        }
        remove_stale_runs(parent).map_err(cleanup_parent)?;
        let run_dir = parent.join(format!(
            "{RUN_PREFIX}{}-{}",
            std::process::id(),
            crate::log::unix_now()
        ));
        // Ours alone: the server may only traverse it, into `ckpt/`, which it owns.
        create_private_dir(&run_dir, 0o711)
            .with_path("create a directory in the checkpoint directory", &run_dir)
            .map_err(cleanup_parent)?;
        let owner_path = run_dir.join(OWNER_FILE);
        let owner = (|| {
            let mut f = fs::File::create(&owner_path)?;
            f.try_lock().map_err(std::io::Error::from)?;
            writeln!(f, "{OWNER_TAG} {}", std::process::id())?;
            Ok(f)
        })();
        let owner = match owner {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&run_dir);
                return Err(cleanup_parent(Error::io(
                    format!("cannot create and lock {}", owner_path.display()),
                    e,
                )));
            }
        };
        let area = CheckpointArea {
            run_dir,
            _owner: owner,
            created_parent,
        };
        let ckpt = area.run_dir.join(CKPT_DIR);
        create_private_dir(&ckpt, 0o700).with_path("create", &ckpt)?;
        give_to_server(&ckpt, &rocks)?;
        area.check_space()?;
        Ok(area)
    }

    /// Refuses to go on when the filesystem of the checkpoints (the server's own) has less
    /// than [`reserve`] bytes free: the server comes first. Removing the checkpoints, which
    /// the caller does on error, gives back what they pinned.
    pub fn check_space(&self) -> Result<()> {
        self.check_space_for(0)
    }

    /// Like [`CheckpointArea::check_space`], before writing `bytes` of copies here.
    pub fn check_space_for(&self, bytes: u64) -> Result<()> {
        let (free, total) = crate::sys::free_space(&self.run_dir)?;
        let keep = reserve(total);
        if free < keep.saturating_add(bytes) {
            return Err(Error::Refused(format!(
                "the filesystem of {} (the server's data) has {} free; this backup needs {} there \
                 and keeps {} free for the server, so it stopped and released its checkpoints. \
                 Free space on that filesystem",
                self.run_dir.display(),
                crate::log::human(free),
                crate::log::human(bytes),
                crate::log::human(keep)
            )));
        }
        Ok(())
    }

    /// Where the checkpoint called `name` goes (the server creates it; it must not exist).
    pub fn checkpoint_path(&self, name: &str) -> PathBuf {
        self.run_dir.join(CKPT_DIR).join(name)
    }

    /// A scratch directory of ours inside the run directory, readable by us alone (it
    /// holds copies of the Aria log and the log tables).
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.run_dir.join(name);
        create_private_dir(&dir, 0o700).with_path("create", &dir)?;
        Ok(dir)
    }
}

impl Drop for CheckpointArea {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.run_dir) {
            Ok(()) => info!("Removed checkpoint directory {}", self.run_dir.display()),
            Err(e) => warn!(
                "Could not remove checkpoint directory {}: {e}",
                self.run_dir.display()
            ),
        }
        if let Some(parent) = &self.created_parent {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// Creates a directory with exactly `mode`, whatever the umask.
fn create_private_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new().mode(mode).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// The server creates checkpoints in `ckpt/`: when we run as root and the server as another
/// user, that user must own it (and only it).
fn give_to_server(dir: &Path, rocks: &fs::Metadata) -> Result<()> {
    if crate::sys::is_root() {
        std::os::unix::fs::chown(dir, Some(rocks.uid()), Some(rocks.gid()))
            .with_path("chown", dir)?;
    }
    Ok(())
}

/// Space a backup leaves free on the server's filesystem: 1% of it, at least 256 MiB and at
/// most 10 GiB.
pub fn reserve(total: u64) -> u64 {
    (total / 100).clamp(256 << 20, 10 << 30)
}

/// Removes run directories left by runs that were killed; refuses to share the directory
/// with a run that is still alive (its owner file is locked).
fn remove_stale_runs(parent: &Path) -> Result<()> {
    for entry in fs::read_dir(parent).with_path("list", parent)? {
        let path = entry.with_path("list", parent)?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !name.starts_with(RUN_PREFIX) || !path.is_dir() {
            continue;
        }
        let owner_path = path.join(OWNER_FILE);
        let Ok(text) = fs::read_to_string(&owner_path) else {
            continue;
        };
        let mut fields = text.split_whitespace();
        if fields.next() != Some(OWNER_TAG) {
            continue;
        }
        let pid = fields.next().unwrap_or("?").to_string();
        let owner = fs::File::open(&owner_path).with_path("open", &owner_path)?;
        match owner.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::Refused(format!(
                    "another backup (pid {pid}, perhaps in another container) is running with checkpoints in {}",
                    parent.display()
                )))
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(format!("cannot lock {}", owner_path.display()), e)),
        }
        fs::remove_dir_all(&path).with_path("remove the stale checkpoint directory", &path)?;
        info!(
            "Removed checkpoint directory {} left by an earlier run that was killed (pid {pid})",
            path.display()
        );
    }
    Ok(())
}
