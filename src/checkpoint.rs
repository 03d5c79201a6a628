//! The directory where the server creates this run's RocksDB checkpoints.
//!
//! Each run works in its own `myrocks_hotbackup-run-<pid>-<time>` directory, marked with an
//! owner file. It is removed when the run ends, however it ends; a run killed outright
//! leaves it behind, and the next run recognises it by the owner file and a dead pid, and
//! removes it. Nothing without our owner file is ever touched.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::{info, warn};

const RUN_PREFIX: &str = "myrocks_hotbackup-run-";
const OWNER_FILE: &str = "owner";
const OWNER_TAG: &str = "myrocks-hotbackup";

/// This run's checkpoint directory, removed on drop.
pub struct CheckpointArea {
    run_dir: PathBuf,
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
                fs::create_dir(parent).with_path("create the checkpoint directory", parent)?;
                give_to_server(parent, &rocks)?;
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
        fs::create_dir(&run_dir)
            .with_path("create a directory in the checkpoint directory", &run_dir)
            .map_err(cleanup_parent)?;
        let area = CheckpointArea {
            run_dir,
            created_parent,
        };
        let me = std::process::id();
        fs::write(
            area.run_dir.join(OWNER_FILE),
            format!("{OWNER_TAG} {me} {}\n", start_time(me).unwrap_or(0)),
        )
        .with_path("write", &area.run_dir.join(OWNER_FILE))?;
        give_to_server(&area.run_dir, &rocks)?;
        Ok(area)
    }

    /// Where the checkpoint called `name` goes (the server creates it; it must not exist).
    pub fn checkpoint_path(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }

    /// A scratch directory of ours inside the run directory.
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.run_dir.join(name);
        fs::create_dir(&dir).with_path("create", &dir)?;
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

/// The server creates checkpoints in our directory: when we run as root and the server as
/// another user, that user must own it.
fn give_to_server(dir: &Path, rocks: &fs::Metadata) -> Result<()> {
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(dir, Some(rocks.uid()), Some(rocks.gid()))
            .with_path("chown", dir)?;
    }
    Ok(())
}

/// Removes run directories left by runs that were killed; refuses to share the directory
/// with a run that is still alive.
fn remove_stale_runs(parent: &Path) -> Result<()> {
    for entry in fs::read_dir(parent).with_path("list", parent)? {
        let path = entry.with_path("list", parent)?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !name.starts_with(RUN_PREFIX) || !path.is_dir() {
            continue;
        }
        let Ok(owner) = fs::read_to_string(path.join(OWNER_FILE)) else {
            continue;
        };
        let fields: Vec<&str> = owner.split_whitespace().collect();
        let [OWNER_TAG, pid, started] = fields[..] else {
            continue;
        };
        let (Ok(pid), Ok(started)) = (pid.parse::<u32>(), started.parse::<u64>()) else {
            continue;
        };
        if still_running(pid, started) {
            return Err(Error::Refused(format!(
                "another backup (pid {pid}) is running with checkpoints in {}",
                parent.display()
            )));
        }
        fs::remove_dir_all(&path).with_path("remove the stale checkpoint directory", &path)?;
        info!(
            "Removed checkpoint directory {} left by an earlier run that was killed (pid {pid})",
            path.display()
        );
    }
    Ok(())
}

/// True if the run that wrote an owner file is still alive: the same pid, started at the
/// same time (a recycled pid, or our own in a container that always starts us with the
/// same pid, is not that run).
fn still_running(pid: u32, started: u64) -> bool {
    pid != std::process::id() && start_time(pid) == Some(started)
}

/// When a process started, in clock ticks since boot (field 22 of /proc/PID/stat).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}
