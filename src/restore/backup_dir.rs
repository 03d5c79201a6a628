//! A backup on disk (a directory backup, or an extracted stream): its files, its manifest,
//! and the check of one against the other that `verify` reports and every restore runs
//! first. A file stored compressed is accepted in either form: as stored (`.zst`, checked,
//! then decoded and checked again) or already decoded.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::cancel::Cancel;
use crate::error::{Error, IoContext, Result};
use crate::format::layout::{BEGIN_NAME, MANIFEST_NAME, ROCKSDB_DIR};
use crate::format::manifest::{FileRecord, Manifest, Problem};
use crate::format::{read_full, CHUNK_SIZE};
use crate::pipeline::compress;

pub struct BackupDir {
    pub root: PathBuf,
    /// `None`: no manifest (incomplete, or written by the original tool).
    pub manifest: Option<Manifest<serde_json::Value>>,
    /// Every regular file below the root, by `/`-separated path, with its size; the files
    /// of a `lost+found` (a backup at a filesystem's root) are left out.
    pub files: BTreeMap<String, u64>,
}

/// What a check found.
#[derive(Debug, Default)]
pub struct Checked {
    pub files: usize,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

impl BackupDir {
    /// Reads the tree and the manifest. Refuses anything but directories and regular files
    /// anywhere in it: a symbolic link would make a restore write, or move, something
    /// outside the backup.
    pub fn open(root: &Path) -> Result<BackupDir> {
        if !root.is_dir() {
            return Err(Error::Refused(format!(
                "backup directory {} does not exist",
                root.display()
            )));
        }
        let mut files = BTreeMap::new();
        walk(root, "", true, &mut files)?;
        let manifest = match files.contains_key(MANIFEST_NAME) {
            true => {
                let path = root.join(MANIFEST_NAME);
                Some(Manifest::parse(&fs::read(&path).with_path("read", &path)?)?)
            }
            false => None,
        };
        Ok(BackupDir {
            root: root.to_path_buf(),
            manifest,
            files,
        })
    }

    /// True when the directory says it was written by this tool (the marker is there).
    pub fn is_ours(&self) -> bool {
        self.files.contains_key(BEGIN_NAME) || self.manifest.is_some()
    }

    /// A backup of the original tool: RocksDB files, no marker, no manifest.
    pub fn is_original_tools(&self) -> bool {
        !self.is_ours()
            && (self.files.contains_key("CURRENT")
                || self.files.contains_key(&format!("{ROCKSDB_DIR}/CURRENT")))
    }

    /// The manifest, or why there is none.
    pub fn manifest(&self) -> Result<&Manifest<serde_json::Value>> {
        match &self.manifest {
            Some(m) => Ok(m),
            None if self.is_ours() => Err(Error::Corrupt(format!(
                "{} holds an incomplete backup: {MANIFEST_NAME} is missing (the backup was interrupted, \
                 or the copy of it is partial)",
                self.root.display()
            ))),
            None => Err(Error::Corrupt(format!(
                "{} does not look like a MyRocks backup of this tool (no {MANIFEST_NAME})",
                self.root.display()
            ))),
        }
    }

    /// Reads every file and compares it with the manifest: missing, truncated, altered
    /// and extra files are all named.
    /// Files are read by several threads at once (one per CPU).
    pub fn check(&self, cancel: &Cancel) -> Result<Checked> {
        let manifest = self.manifest()?;
        let mut accounted = HashSet::from([MANIFEST_NAME.to_string()]);
        for f in &manifest.files {
            accounted.insert(f.path.clone());
            // The decoded form counts only in place of the stored one: both there, the
            // decoded one is a stray (a restore would put the two on the same path).
            if let Some(o) = f
                .original
                .as_ref()
                .filter(|_| !self.files.contains_key(&f.path))
            {
                accounted.insert(o.path.clone());
            }
        }
        let next = AtomicUsize::new(0);
        let results = Mutex::new(Vec::new());
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        std::thread::scope(|s| {
            for _ in 0..threads.min(manifest.files.len()).max(1) {
                s.spawn(|| {
                    let mut buf = vec![0u8; CHUNK_SIZE];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(f) = manifest.files.get(i) else {
                            return;
                        };
                        let result = cancel
                            .check()
                            .and_then(|()| self.check_file(f, &mut buf, cancel));
                        let failed = result.is_err();
                        results
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((i, result));
                        if failed {
                            next.store(usize::MAX / 2, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results.sort_by_key(|(i, _)| *i);
        let mut checked = Checked::default();
        for (_, result) in results {
            match result? {
                Ok(bytes) => {
                    checked.files += 1;
                    checked.bytes += bytes;
                }
                Err(problem) => checked.problems.push(problem),
            }
        }
        for path in self.files.keys() {
            if !accounted.contains(path) {
                checked.problems.push(Problem {
                    path: path.clone(),
                    problem: "extra",
                    detail: "in the backup, not in its manifest".into(),
                });
            }
        }
        Ok(checked)
    }

    /// Bytes read, or the problem found.
    fn check_file(
        &self,
        f: &FileRecord,
        buf: &mut [u8],
        cancel: &Cancel,
    ) -> Result<std::result::Result<u64, Problem>> {
        let problem = |path: &str, problem, detail| {
            Err(Problem {
                path: path.to_string(),
                problem,
                detail,
            })
        };
        // As stored, or (a compressed file) already decoded by `extract`.
        let (path, size, crc32, decode) = match (self.files.get(&f.path), &f.original) {
            (Some(_), _) => (&f.path, f.size, f.crc32, f.original.as_ref()),
            (None, Some(o)) if self.files.contains_key(&o.path) => (&o.path, o.size, o.crc32, None),
            (None, _) => {
                return Ok(problem(
                    &f.path,
                    "missing",
                    "listed in the manifest, not in the backup".into(),
                ))
            }
        };
        let actual = self.files[path];
        if actual != size {
            let what = if actual < size {
                "truncated"
            } else {
                "altered"
            };
            return Ok(problem(
                path,
                what,
                format!("{actual} bytes, the manifest says {size}"),
            ));
        }
        let full = self.root.join(path);
        let crc = file_crc(&full, buf, cancel)?;
        if crc != crc32 {
            return Ok(problem(
                path,
                "altered",
                format!("CRC-32 {crc:08x}, the manifest says {crc32:08x}"),
            ));
        }
        if let Some(o) = decode {
            match compress::decode_file(&full, None) {
                Ok((s, c)) if (s, c) == (o.size, o.crc32) => {}
                Ok((s, c)) => {
                    return Ok(problem(
                        path,
                        "altered",
                        format!(
                            "decodes to {s} bytes with CRC-32 {c:08x}, the manifest says {} bytes with {:08x}",
                            o.size, o.crc32
                        ),
                    ))
                }
                Err(e) => return Ok(problem(path, "altered", e.to_string())),
            }
        }
        Ok(Ok(size))
    }
}

fn walk(dir: &Path, prefix: &str, listed: bool, out: &mut BTreeMap<String, u64>) -> Result<()> {
    for entry in fs::read_dir(dir).with_path("list", dir)? {
        let path = entry.with_path("list", dir)?.path();
        let name = format!(
            "{prefix}{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        let md = fs::symlink_metadata(&path).with_path("stat", &path)?;
        let kind = md.file_type();
        if kind.is_dir() {
            let listed = listed && name != "lost+found";
            walk(&path, &format!("{name}/"), listed, out)?;
        } else if !kind.is_file() {
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else {
                "a special file"
            };
            return Err(Error::Corrupt(format!(
                "{} is {what}: a backup holds only directories and regular files, refusing it",
                path.display()
            )));
        } else if listed {
            out.insert(name, md.len());
        }
    }
    Ok(())
}

/// The CRC-32 of a whole file.
pub(crate) fn file_crc(path: &Path, buf: &mut [u8], cancel: &Cancel) -> Result<u32> {
    let mut f = fs::File::open(path).with_path("open", path)?;
    crate::sys::advise_sequential(&f);
    let mut crc = crc32fast::Hasher::new();
    loop {
        cancel.check()?;
        let n = read_full(&mut f, buf).with_path("read", path)?;
        if n == 0 {
            return Ok(crc.finalize());
        }
        crc.update(&buf[..n]);
    }
}
