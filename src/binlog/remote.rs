//! A binary log archive in a repository. The archiver writes into a local directory (the
//! spool, in the directory format) and [`Mirror`] uploads what it has recorded, in pieces:
//!
//! - `binlog/HOST/FILE/START-END`: bytes START..END of the file, sealed as every object;
//! - `binlog/HOST/FILE/START-END.index`: the file's index once END bytes are archived,
//!   written after the piece (a piece without its index does not count).
//!
//! HOST is a tag of the server's host name (as in its snapshots) that reveals nothing
//! without the key. [`fetch`] puts the pieces back together into a directory archive.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::archive::{self, FileIndex, INDEX_SUFFIX};
use crate::error::{Error, IoContext, Result};
use crate::repo::Repo;

const PREFIX: &str = "binlog/";

fn host_prefix(repo: &Repo, host: &str) -> String {
    format!("{PREFIX}{}/", repo.tag(&format!("binlog host {host}")))
}

/// One uploaded piece.
#[derive(Debug, Clone)]
struct Piece {
    start: u64,
    end: u64,
}

/// The pieces of each file that have their index, in order.
fn pieces(repo: &Repo, prefix: &str) -> Result<BTreeMap<String, Vec<Piece>>> {
    let mut out: BTreeMap<String, Vec<Piece>> = BTreeMap::new();
    for listed in repo.store().list(prefix)? {
        let rest = &listed.name[prefix.len()..];
        let Some((file, piece)) = rest.split_once('/') else {
            continue;
        };
        let Some(range) = piece.strip_suffix(INDEX_SUFFIX) else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(start), Ok(end)) = (a.parse(), b.parse()) {
            out.entry(file.to_string())
                .or_default()
                .push(Piece { start, end });
        }
    }
    for list in out.values_mut() {
        list.sort_by_key(|p| p.start);
    }
    Ok(out)
}

fn piece_name(prefix: &str, file: &str, start: u64, end: u64) -> String {
    format!("{prefix}{file}/{start:012}-{end:012}")
}

/// Uploads what the spool records and the repository lacks.
pub struct Mirror {
    repo: Repo,
    prefix: String,
    /// Bytes of each file in the repository.
    uploaded: BTreeMap<String, u64>,
}

/// The host names whose binary logs the repository holds.
pub fn hosts(repo: &Repo) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for listed in repo.store().list(PREFIX)? {
        if listed.name.ends_with(HOST_NAME) && listed.name.matches('/').count() == 2 {
            if let Some(h) = repo.get_json::<Host>(&listed.name)? {
                out.push(h.host);
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The host named, or the only one the repository holds binary logs of.
pub fn pick_host(repo: &Repo, host: Option<&str>) -> Result<String> {
    if let Some(h) = host {
        return Ok(h.to_string());
    }
    let mut all = hosts(repo)?;
    match all.len() {
        1 => Ok(all.remove(0)),
        0 => Err(Error::Refused(
            "the repository holds no binary logs: run `binlog archive --repo` on the server".into(),
        )),
        _ => Err(Error::Usage(format!(
            "the repository holds the binary logs of several servers ({}): give --host",
            all.join(", ")
        ))),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Host {
    host: String,
}

const HOST_NAME: &str = "/host";

impl Mirror {
    pub fn open(repo: Repo, host: &str) -> Result<Mirror> {
        let prefix = host_prefix(&repo, host);
        repo.put_json(
            &format!("{}{}", prefix.trim_end_matches('/'), HOST_NAME),
            &Host { host: host.into() },
            true,
        )?;
        let uploaded = pieces(&repo, &prefix)?
            .into_iter()
            .map(|(f, p)| (f, p.last().map_or(0, |p| p.end)))
            .collect();
        Ok(Mirror {
            repo,
            prefix,
            uploaded,
        })
    }

    /// Uploads every recorded byte of the spool not uploaded yet; then removes from the
    /// spool the ended files that are wholly uploaded, but the last. Returns the bytes
    /// uploaded and the bytes the spool holds that are not uploaded.
    pub fn sync(&mut self, spool: &Path) -> Result<(u64, u64)> {
        let files = archive::load(spool)?;
        let mut sent = 0;
        for f in &files {
            let done = self.uploaded.get(&f.name).copied().unwrap_or(0);
            if f.size <= done {
                continue;
            }
            let path = spool.join(&f.name);
            let mut file = File::open(&path).with_path("open", &path)?;
            file.seek(SeekFrom::Start(done)).with_path("read", &path)?;
            let mut bytes = Vec::with_capacity((f.size - done) as usize);
            (&mut file)
                .take(f.size - done)
                .read_to_end(&mut bytes)
                .with_path("read", &path)?;
            if (bytes.len() as u64) < f.size - done {
                return Err(Error::Corrupt(format!(
                    "{} is shorter than its index",
                    path.display()
                )));
            }
            let name = piece_name(&self.prefix, &f.name, done, f.size);
            self.repo.put(&name, &bytes, false)?;
            let index = serde_json::to_vec(f).expect("an index serializes");
            self.repo
                .put(&format!("{name}{INDEX_SUFFIX}"), &index, false)?;
            self.uploaded.insert(f.name.clone(), f.size);
            sent += bytes.len() as u64;
        }
        if let Some((_, ended)) = files.split_last() {
            for f in ended {
                if f.closed && self.uploaded.get(&f.name) == Some(&f.size) {
                    let _ = fs::remove_file(spool.join(format!("{}{INDEX_SUFFIX}", f.name)));
                    let _ = fs::remove_file(spool.join(&f.name));
                }
            }
        }
        let pending = files
            .iter()
            .map(|f| {
                f.size
                    .saturating_sub(self.uploaded.get(&f.name).copied().unwrap_or(0))
            })
            .sum();
        Ok((sent, pending))
    }
}

/// Writes the archive of `host` into the directory `dir` (new or empty), the files whose
/// `keep` says so whole, the others as their index alone (enough for a listing).
pub fn fetch(repo: &Repo, host: &str, dir: &Path, keep: &dyn Fn(&FileIndex) -> bool) -> Result<()> {
    let prefix = host_prefix(repo, host);
    let all = pieces(repo, &prefix)?;
    if all.is_empty() {
        return Err(Error::Refused(format!(
            "the repository holds no binary logs of {host}: run `binlog archive --repo` on it"
        )));
    }
    archive::claim_dir(dir)?;
    for (file, list) in all {
        let Some(last) = list.last() else { continue };
        let name = format!(
            "{}{INDEX_SUFFIX}",
            piece_name(&prefix, &file, last.start, last.end)
        );
        let index: FileIndex = repo
            .get_json(&name)?
            .ok_or_else(|| Error::Corrupt(format!("{name} vanished from the repository")))?;
        if keep(&index) {
            let mut data = Vec::with_capacity(last.end as usize);
            for p in &list {
                if p.start != data.len() as u64 {
                    return Err(Error::Corrupt(format!(
                        "{file} in the repository lacks bytes {} to {}",
                        data.len(),
                        p.start
                    )));
                }
                let piece = piece_name(&prefix, &file, p.start, p.end);
                let bytes = repo.get(&piece)?.ok_or_else(|| {
                    Error::Corrupt(format!("{piece} is missing from the repository"))
                })?;
                if bytes.len() as u64 != p.end - p.start {
                    return Err(Error::Corrupt(format!("{piece} has the wrong length")));
                }
                data.extend_from_slice(&bytes);
            }
            let path = dir.join(&file);
            fs::write(&path, &data).with_path("write", &path)?;
        }
        let path = dir.join(format!("{file}{INDEX_SUFFIX}"));
        fs::write(
            &path,
            serde_json::to_vec_pretty(&index).expect("serializes"),
        )
        .with_path("write", &path)?;
    }
    Ok(())
}

/// Removes the archived files of `host` that come before `first` (its indexes first, so
/// that a removal cut short leaves no file that seems whole). Returns files and bytes.
pub fn remove_before(repo: &Repo, host: &str, first: &str) -> Result<(usize, u64)> {
    let prefix = host_prefix(repo, host);
    let (mut files, mut bytes) = (0, 0);
    for (file, list) in pieces(repo, &prefix)? {
        if !archive::later_name(first, &file) {
            continue;
        }
        for p in &list {
            let name = piece_name(&prefix, &file, p.start, p.end);
            repo.store().delete(&format!("{name}{INDEX_SUFFIX}"))?;
        }
        for p in &list {
            repo.store()
                .delete(&piece_name(&prefix, &file, p.start, p.end))?;
            bytes += p.end - p.start;
        }
        files += 1;
    }
    Ok((files, bytes))
}
