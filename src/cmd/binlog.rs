//! `binlog archive`, `binlog list`, `binlog verify`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::binlog::archive::{self, FileIndex};
use crate::binlog::archiver::{self, Options};
use crate::binlog::remote::{self, Mirror};
use crate::binlog::{self, Gap, Range};
use crate::cli::{ArchiveArgs, BinlogArchiveArgs, BinlogListArgs, BinlogVerifyArgs};
use crate::error::{Error, IoContext, Result};
use crate::log::human;
use crate::repo::Repo;
use crate::server::credentials;
use crate::server::Server;
use crate::{error, info, warn};

pub fn archive(args: &BinlogArchiveArgs) -> Result<()> {
    for (name, value) in [
        ("--heartbeat", args.heartbeat),
        ("--poll", args.poll),
        ("--upload-interval", args.upload_interval),
    ] {
        if !(0.1..=3600.0).contains(&value) {
            return Err(Error::Usage(format!("{name} takes 0.1 to 3600 seconds")));
        }
    }
    let dir = match (&args.target_dir, &args.spool_dir) {
        (Some(d), _) | (None, Some(d)) => d.clone(),
        (None, None) => {
            return Err(Error::Usage(
                "give --target-dir, or --repo and --spool-dir".into(),
            ))
        }
    };
    let creds = match &args.from_datadir {
        Some(_) => None,
        None => Some(credentials::resolve(&args.conn)?),
    };
    let mirror = match &args.repo {
        Some(url) => {
            let options = credentials::option_values(&args.conn)?;
            let repo = Repo::open(url, args.key_file.as_deref(), &options)?;
            let host = match &creds {
                Some(c) => {
                    let names: Vec<String> = Server::connect(c)?.rows("SELECT @@hostname", ())?;
                    names
                        .into_iter()
                        .next()
                        .unwrap_or_else(crate::sys::hostname)
                }
                None => crate::sys::hostname(),
            };
            info!("Uploading into {url} as the binary logs of {host}");
            Some(Mirror::open(repo, &host)?)
        }
        None => None,
    };
    let opts = Options {
        creds,
        server_id: args
            .server_id
            .unwrap_or_else(|| archiver::default_server_id(&dir)),
        dir: dir.clone(),
        heartbeat: Duration::from_secs_f64(args.heartbeat),
        start_file: args.start_file.clone(),
        sync_interval: Duration::from_millis(200),
    };
    let cancel = super::on_signals()?;
    let done = AtomicBool::new(false);
    let interval = Duration::from_secs_f64(args.upload_interval);
    std::thread::scope(|s| {
        let uploader = mirror.map(|m| s.spawn(|| upload(m, &dir, interval, &done)));
        let archived = match &args.from_datadir {
            Some(source) => {
                archiver::run_from_files(source, &opts, Duration::from_secs_f64(args.poll), &cancel)
            }
            None => archiver::run(&opts, &cancel),
        };
        done.store(true, Ordering::Relaxed);
        let uploaded = uploader.map_or(Ok(()), |u| u.join().expect("the uploader panicked"));
        archived.and(uploaded)
    })
}

/// Spool bytes not uploaded beyond which the archiver warns.
const SPOOL_WARNING: u64 = 1 << 30;

/// Uploads the spool's recorded bytes every `interval`, and once more at the end.
fn upload(mut mirror: Mirror, spool: &Path, interval: Duration, done: &AtomicBool) -> Result<()> {
    let mut warned = std::time::Instant::now() - Duration::from_secs(3600);
    loop {
        let last = done.load(Ordering::Relaxed);
        match mirror.sync(spool) {
            Ok((_, pending)) if last => {
                return match pending {
                    0 => Ok(()),
                    n => Err(Error::Store(format!(
                        "{} of archived binary logs are not uploaded yet: they wait in {} for the next start",
                        human(n),
                        spool.display()
                    ))),
                };
            }
            Ok((_, pending)) => {
                if pending > SPOOL_WARNING && warned.elapsed() > Duration::from_secs(60) {
                    warned = std::time::Instant::now();
                    warn!(
                        "{} of archived binary logs wait in the spool {}: the repository is slower than the server writes",
                        human(pending),
                        spool.display()
                    );
                }
            }
            Err(e) if last => {
                return Err(Error::Store(format!(
                    "{e}; what is not uploaded waits in {} for the next start",
                    spool.display()
                )))
            }
            Err(e) => {
                if warned.elapsed() > Duration::from_secs(60) {
                    warned = std::time::Instant::now();
                    warn!("Uploading binary logs: {e}; the spool keeps them, retrying");
                }
            }
        }
        let until = std::time::Instant::now() + interval;
        while std::time::Instant::now() < until && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The archive to read: the directory given, or the repository's fetched into a temporary
/// one (whole files with `whole`, their indexes alone otherwise).
fn open_archive(args: &ArchiveArgs, whole: bool) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match (&args.target_dir, &args.repo) {
        (Some(dir), _) => {
            archive::check_dir(dir)?;
            Ok((dir.clone(), None))
        }
        (None, Some(url)) => {
            let repo = super::repo::open(&crate::cli::RepoArgs {
                repo: url.clone(),
                key_file: args.key_file.clone(),
            })?;
            let host = remote::pick_host(&repo, args.host.as_deref())?;
            let tmp = tempfile::Builder::new()
                .prefix("myrocks-hotbackup-binlogs-")
                .tempdir()
                .context(|| "cannot create a temporary directory".into())?;
            remote::fetch(&repo, &host, tmp.path(), &|_| whole)?;
            Ok((tmp.path().to_path_buf(), Some(tmp)))
        }
        (None, None) => Err(Error::Usage("give --target-dir or --repo".into())),
    }
}

#[derive(Serialize)]
struct Listing {
    files: usize,
    bytes: u64,
    ranges: Vec<Range>,
    gaps: Vec<Gap>,
}

pub fn list(args: &BinlogListArgs) -> Result<()> {
    let (dir, _tmp) = open_archive(&args.archive, false)?;
    let files = archive::load(&dir)?;
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
        args.archive
            .repo
            .clone()
            .unwrap_or_else(|| dir.display().to_string())
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
    let (dir, _tmp) = open_archive(&args.archive, true)?;
    let dir = &dir;
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
            "the binary log archive has {} problem(s)",
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
fn check_file(dir: &Path, f: &FileIndex) -> std::result::Result<(), String> {
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
