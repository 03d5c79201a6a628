//! `binlog archive`, `binlog list`, `binlog verify`.

use std::time::Duration;

use serde::Serialize;

use crate::binlog::archive::{self, FileIndex};
use crate::binlog::archiver::{self, Options};
use crate::binlog::{self, Gap, Range};
use crate::cli::{BinlogArchiveArgs, BinlogListArgs, BinlogVerifyArgs};
use crate::error::{Error, Result};
use crate::log::human;
use crate::server::credentials;
use crate::{error, info};

pub fn archive(args: &BinlogArchiveArgs) -> Result<()> {
    if !(0.1..=3600.0).contains(&args.heartbeat) {
        return Err(Error::Usage("--heartbeat takes 0.1 to 3600 seconds".into()));
    }
    let creds = credentials::resolve(&args.conn)?;
    let opts = Options {
        creds,
        server_id: args
            .server_id
            .unwrap_or_else(|| archiver::default_server_id(&args.target_dir)),
        dir: args.target_dir.clone(),
        heartbeat: Duration::from_secs_f64(args.heartbeat),
        start_file: args.start_file.clone(),
        sync_interval: Duration::from_millis(200),
    };
    archiver::run(&opts, &super::on_signals()?)
}

#[derive(Serialize)]
struct Listing {
    files: usize,
    bytes: u64,
    ranges: Vec<Range>,
    gaps: Vec<Gap>,
}

pub fn list(args: &BinlogListArgs) -> Result<()> {
    archive::check_dir(&args.target_dir)?;
    let files = archive::load(&args.target_dir)?;
    let (ranges, gaps) = binlog::ranges(&files);
    let listing = Listing {
        files: files.len(),
        bytes: files.iter().map(|f| f.size).sum(),
        ranges,
        gaps,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&listing).expect("serialisable")
        );
        return Ok(());
    }
    println!(
        "{} files, {} in {}",
        listing.files,
        human(listing.bytes),
        args.target_dir.display()
    );
    for r in &listing.ranges {
        println!(
            "range {} .. {}:{}{}: {} files, {}, {} transactions\n  GTID {} .. {}\n  time {} .. {}",
            r.first_file,
            r.last_file,
            r.last_size,
            if r.open { " (still growing)" } else { "" },
            r.files,
            human(r.bytes),
            r.transactions,
            if r.start_gtid.is_empty() {
                "(none)"
            } else {
                &r.start_gtid
            },
            r.end_gtid,
            r.first_time.as_deref().unwrap_or("-"),
            r.last_time.as_deref().unwrap_or("-"),
        );
    }
    for g in &listing.gaps {
        println!("{}", g.message);
    }
    Ok(())
}

#[derive(Serialize)]
struct BackupCheck {
    backup_dir: String,
    file: String,
    position: u64,
    gtid: String,
    inside: bool,
}

#[derive(Serialize)]
struct Verified {
    ok: bool,
    files: usize,
    bytes: u64,
    transactions: u64,
    ranges: Vec<Range>,
    gaps: Vec<Gap>,
    problems: Vec<String>,
    backups: Vec<BackupCheck>,
}

pub fn verify(args: &BinlogVerifyArgs) -> Result<()> {
    let dir = &args.target_dir;
    archive::check_dir(dir)?;
    let files = archive::load(dir)?;
    let mut problems = Vec::new();
    for f in &files {
        if let Err(e) = check_file(dir, f) {
            problems.push(e);
        }
    }
    let (ranges, gaps) = binlog::ranges(&files);
    problems.extend(gaps.iter().map(|g| g.message.clone()));
    let mut backups = Vec::new();
    for b in &args.backup_dir {
        let Some((file, position, gtid)) = binlog::backup_coordinates(b) else {
            problems.push(format!(
                "{}: no binary log coordinates (a backup of a server without a binary log?)",
                b.display()
            ));
            continue;
        };
        let inside = inside(&files, &file, position);
        if !inside {
            problems.push(format!(
                "backup {} at {file}:{position} (GTID {gtid}) is not inside an archived range",
                b.display()
            ));
        }
        backups.push(BackupCheck {
            backup_dir: b.display().to_string(),
            file,
            position,
            gtid,
            inside,
        });
    }
    let out = Verified {
        ok: problems.is_empty(),
        files: files.len(),
        bytes: files.iter().map(|f| f.size).sum(),
        transactions: files.iter().map(|f| f.transactions).sum(),
        ranges,
        gaps,
        problems,
        backups,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serialisable")
        );
    }
    for p in &out.problems {
        error!("{p}");
    }
    if !out.ok {
        return Err(Error::Corrupt(format!(
            "the binary log archive in {} has {} problem(s)",
            dir.display(),
            out.problems.len()
        )));
    }
    info!(
        "Verified {} files, {}, {} transactions in {} range(s): every event's checksum, every file's \
         continuity{}; completed OK!",
        out.files,
        human(out.bytes),
        out.transactions,
        out.ranges.len(),
        if out.backups.is_empty() {
            String::new()
        } else {
            format!(", {} backup(s) inside", out.backups.len())
        }
    );
    Ok(())
}

/// One file read and checked event by event.
fn check_file(dir: &std::path::Path, f: &FileIndex) -> std::result::Result<(), String> {
    let data = archive::read_file(dir, f).map_err(|e| e.to_string())?;
    let t = archive::check_events(f, &data).map_err(|e| format!("{}: {e}", f.name))?;
    if t.checksum != f.checksums {
        return Err(format!("{}: its index is wrong about checksums", f.name));
    }
    Ok(())
}

/// Whether `file`:`position` is inside an archived file.
fn inside(files: &[FileIndex], file: &str, position: u64) -> bool {
    files
        .iter()
        .any(|f| f.name == file && position >= 4 && position <= f.size)
}
