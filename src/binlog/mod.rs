//! Point-in-time recovery: binary logs archived as they are written ([`archiver`], into the
//! directory format of [`archive`]), checked for continuity ([`check`]), and replayed onto
//! a restored backup up to a chosen transaction ([`replay`]).

pub mod archive;
pub mod archiver;
mod client;
pub mod event;
pub mod remote;
pub mod replay;

use std::path::Path;

use serde::Serialize;

use archive::FileIndex;

/// A run of archived files that continue one another.
#[derive(Debug, Clone, Serialize)]
pub struct Range {
    pub first_file: String,
    pub last_file: String,
    /// Where the range ends in its last file.
    pub last_size: u64,
    pub files: usize,
    pub bytes: u64,
    pub transactions: u64,
    /// `@@gtid_binlog_pos` at the range's start and end.
    pub start_gtid: String,
    pub end_gtid: String,
    pub first_time: Option<String>,
    pub last_time: Option<String>,
    /// The last file may still grow (the archiver has not seen it end).
    pub open: bool,
}

/// Where the archive does not continue.
#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    pub after: String,
    pub before: String,
    pub message: String,
}

/// The archive's files cut into ranges at every gap.
pub fn ranges(files: &[FileIndex]) -> (Vec<Range>, Vec<Gap>) {
    let mut ranges: Vec<Range> = Vec::new();
    let mut gaps = Vec::new();
    let mut start = 0;
    for i in 0..files.len() {
        let last = i + 1 == files.len();
        if !last && files[i].chains_to(&files[i + 1]) {
            continue;
        }
        let run = &files[start..=i];
        let (first, end) = (&run[0], &run[run.len() - 1]);
        ranges.push(Range {
            first_file: first.name.clone(),
            last_file: end.name.clone(),
            last_size: end.size,
            files: run.len(),
            bytes: run.iter().map(|f| f.size).sum(),
            transactions: run.iter().map(|f| f.transactions).sum(),
            start_gtid: first.start.position_text(),
            end_gtid: end.end.position_text(),
            first_time: run.iter().find_map(|f| f.first_time).map(time_text),
            last_time: run.iter().rev().find_map(|f| f.last_time).map(time_text),
            open: !end.closed,
        });
        if !last {
            let next = &files[i + 1];
            let missing = missing_between(&end.name, &next.name);
            let message = if !end.closed {
                format!(
                    "{} was not archived to its end (the archive holds {} bytes of it, to GTID {}); \
                     the next file, {}, starts at GTID {}",
                    end.name,
                    end.size,
                    end.end.position_text(),
                    next.name,
                    next.start.position_text()
                )
            } else {
                format!(
                    "gap: {} ends at GTID {} but {} starts at GTID {}{}",
                    end.name,
                    end.end.position_text(),
                    next.name,
                    next.start.position_text(),
                    match missing {
                        Some(m) => format!(": {m} missing"),
                        None => String::new(),
                    }
                )
            };
            gaps.push(Gap {
                after: end.name.clone(),
                before: next.name.clone(),
                message,
            });
        }
        start = i + 1;
    }
    (ranges, gaps)
}

/// "bin.000004" or "bin.000004 to bin.000006" between two file names of one base.
fn missing_between(a: &str, b: &str) -> Option<String> {
    let (base, na) = a.rsplit_once('.')?;
    let (base_b, nb) = b.rsplit_once('.')?;
    let (x, y): (u64, u64) = (na.parse().ok()?, nb.parse().ok()?);
    if base != base_b || y <= x + 1 {
        return None;
    }
    let name = |n: u64| format!("{base}.{n:0width$}", width = na.len());
    Some(match y - x {
        2 => name(x + 1),
        _ => format!("{} to {}", name(x + 1), name(y - 1)),
    })
}

/// `YYYY-MM-DD HH:MM:SS` in local time, as the server's clients show event times.
pub fn time_text(secs: u32) -> String {
    let (y, mo, d, h, mi, s) = crate::sys::local_time(i64::from(secs));
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

/// A backup's binary log coordinates (`xtrabackup_binlog_info`), if it has them.
pub fn backup_coordinates(backup: &Path) -> Option<(String, u64, String)> {
    let text =
        std::fs::read_to_string(backup.join(crate::format::layout::BINLOG_INFO_NAME)).ok()?;
    let fields: Vec<&str> = text.trim_end_matches('\n').split('\t').collect();
    match fields[..] {
        [file, pos, gtid] => Some((file.to_string(), pos.parse().ok()?, gtid.to_string())),
        [file, pos] => Some((file.to_string(), pos.parse().ok()?, String::new())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        assert_eq!(missing_between("b.000003", "b.000005").unwrap(), "b.000004");
        assert_eq!(
            missing_between("b.000003", "b.000007").unwrap(),
            "b.000004 to b.000006"
        );
        assert!(missing_between("b.000003", "b.000004").is_none());
    }
}
