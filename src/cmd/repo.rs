//! The repository commands: `repo init`, `snapshots`, `restore`, `verify --repo`, `forget`
//! and `prune`. Restores download every file in parallel, check it against the manifest
//! (and, encrypted, against its authentication tags) as it arrives, into a staging backup
//! directory beside the datadir, then restore it as `move-back` does.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::binlog::archive::later_name;
use crate::binlog::event::Gtid;
use crate::binlog::remote;
use crate::binlog::replay::Until;
use crate::cancel::Cancel;
use crate::cli::{
    ForgetArgs, PruneArgs, RepoArgs, RepoInitArgs, RepoRestoreArgs, RestoreArgs, SnapshotsArgs,
};
use crate::error::{Error, IoContext, Result};
use crate::format::manifest::FileRecord;
use crate::log::human;
use crate::pipeline::compress::StreamDecoder;
use crate::repo::crypto::{Opener, SEGMENT};
use crate::repo::{Place, Repo, Snapshot, Trash, SNAPSHOTS, TRASH};
use crate::restore::{self, Mode};
use crate::{error, info};

/// The S3 settings of the `[myrocks-hotbackup]` option group.
pub fn options() -> Result<HashMap<String, String>> {
    crate::server::credentials::option_values(&Default::default())
}

pub fn open(args: &RepoArgs) -> Result<Repo> {
    Repo::open(&args.repo, args.key_file.as_deref(), &options()?)
}

pub fn init(args: RepoInitArgs) -> Result<()> {
    let key_file = match (&args.repo.key_file, args.no_encryption) {
        (Some(_), true) => {
            return Err(Error::Usage(
                "--no-encryption and --key-file exclude each other".into(),
            ))
        }
        (None, false) => {
            return Err(Error::Usage(
                "a repository is encrypted: give --key-file FILE (created with a new key if it does not exist), or --no-encryption"
                    .into(),
            ))
        }
        (key, _) => key.clone(),
    };
    let repo = Repo::init(&args.repo.repo, key_file.as_deref(), &options()?)?;
    info!(
        "Created the repository {} ({})",
        repo.url,
        match repo.key() {
            Some(_) => "encrypted with AES-256-GCM",
            None => "not encrypted",
        }
    );
    Ok(())
}

/// A snapshot as `snapshots` shows it.
#[derive(Serialize)]
struct Listed<'a> {
    id: &'a str,
    host: &'a str,
    source: &'a str,
    time: i64,
    gtid: Option<&'a str>,
    binlog: Option<&'a str>,
    bytes_total: u64,
    bytes_new: u64,
    files_total: u64,
    files_new: u64,
}

pub fn snapshots(args: SnapshotsArgs) -> Result<()> {
    let repo = open(&args.repo)?;
    let all: Vec<Snapshot> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| {
            args.host
                .as_ref()
                .is_none_or(|h| &s.host == h || &s.source == h)
        })
        .collect();
    let listed: Vec<Listed> = all
        .iter()
        .map(|s| Listed {
            id: &s.id,
            host: &s.host,
            source: &s.source,
            time: s.time,
            gtid: s.gtid.as_deref(),
            binlog: s.binlog.as_deref(),
            bytes_total: s.bytes_total,
            bytes_new: s.bytes_new,
            files_total: s.files_total,
            files_new: s.files_new,
        })
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&listed).expect("serialisable")
        );
        return Ok(());
    }
    println!(
        "{:<12}  {:<19}  {:<20}  {:<24}  {:>10}  {:>10}",
        "ID", "TIME", "HOST", "GTID", "NEW", "TOTAL"
    );
    for s in &listed {
        println!(
            "{:<12}  {:<19}  {:<20}  {:<24}  {:>10}  {:>10}",
            s.id,
            crate::log::local_datetime(s.time),
            s.host,
            s.gtid.unwrap_or("-"),
            human(s.bytes_new),
            human(s.bytes_total)
        );
    }
    Ok(())
}

/// Sealed bytes read per request when downloading a file.
const RANGE: u64 = 8 * (SEGMENT as u64 + 16);

/// Downloads one file of a snapshot into `out`, opening and checking it: its size and
/// CRC-32 must be the manifest's.
fn fetch(repo: &Repo, place: &Place, record: &FileRecord, out: &mut dyn Write) -> Result<()> {
    let what = format!("{} (object {})", record.path, place.object);
    let missing = || Error::Corrupt(format!("{what} is missing from the repository"));
    let end = place.offset + place.len;
    let head_len = 5u64 + if repo.key().is_some() { 32 } else { 0 };
    let head = repo
        .store()
        .get(
            &place.object,
            Some(place.offset..(place.offset + head_len).min(end)),
        )?
        .ok_or_else(missing)?;
    let (mut opener, header) = Opener::new(repo.key(), &head, &what)?;
    let mut at = place.offset + header as u64;
    let mut crc = crc32fast::Hasher::new();
    let mut size = 0u64;
    let mut plain = Vec::new();
    let mut emit =
        |plain: &mut Vec<u8>, crc: &mut crc32fast::Hasher, size: &mut u64| -> Result<()> {
            crc.update(plain);
            *size += plain.len() as u64;
            out.write_all(plain).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => {
                    Error::Corrupt(format!("{what} is damaged: it does not decode ({e})"))
                }
                _ => Error::io(format!("cannot write {}", record.path), e),
            })?;
            plain.clear();
            Ok(())
        };
    while at < end {
        let to = (at + RANGE).min(end);
        let piece = repo
            .store()
            .get(&place.object, Some(at..to))?
            .ok_or_else(missing)?;
        if piece.len() as u64 != to - at {
            return Err(Error::Corrupt(format!("{what} is shorter than recorded")));
        }
        opener.push(&piece, &mut plain, &what)?;
        emit(&mut plain, &mut crc, &mut size)?;
        at = to;
    }
    opener.finish(&mut plain, &what)?;
    emit(&mut plain, &mut crc, &mut size)?;
    let crc = crc.finalize();
    if size != record.size || crc != record.crc32 {
        return Err(Error::Corrupt(format!(
            "{what} is damaged: {size} bytes with CRC-32 {crc:08x}, the manifest says {} bytes with {:08x}",
            record.size, record.crc32
        )));
    }
    Ok(())
}

/// Runs `work` on every file of a snapshot, `threads` at once; returns every failure.
fn each_file(
    snapshot: &Snapshot,
    threads: usize,
    cancel: &Cancel,
    work: &(dyn Fn(&FileRecord, &Place) -> Result<()> + Sync),
) -> Result<Vec<(String, Error)>> {
    let manifest = snapshot.manifest()?;
    let queue = Mutex::new(manifest.files.iter());
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                if cancel.check().is_err() {
                    return;
                }
                let Some(record) = queue.lock().expect("not poisoned").next() else {
                    return;
                };
                let result = match snapshot.places.get(&record.path) {
                    Some(place) => work(record, place),
                    None => Err(Error::Corrupt(format!(
                        "{}: the snapshot does not say where it lies",
                        record.path
                    ))),
                };
                if let Err(e) = result {
                    failures
                        .lock()
                        .expect("not poisoned")
                        .push((record.path.clone(), e));
                }
            });
        }
    });
    cancel.check()?;
    Ok(failures.into_inner().expect("not poisoned"))
}

pub fn restore(args: RepoRestoreArgs) -> Result<()> {
    let cancel = super::on_signals()?;
    let repo = open(&args.repo)?;
    let until = Until::of(&args.until)?;
    let snapshot = match &until {
        Some(until) if args.snapshot == "latest" => {
            newest_before(&repo, until, args.host.as_deref())?
        }
        _ => repo.snapshot(&args.snapshot, args.host.as_deref())?,
    };
    for dir in [
        Some(&args.datadir),
        args.rocksdb_datadir.as_ref(),
        args.rocksdb_waldir.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        restore::check_empty(dir)?;
    }
    let staging = match &args.staging_dir {
        Some(dir) => dir.clone(),
        None => {
            let name = args
                .datadir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "datadir".into());
            args.datadir
                .parent()
                .unwrap_or(Path::new("."))
                .join(format!(".{name}.restoring-{}", snapshot.id))
        }
    };
    fs::create_dir(&staging).with_path("create the staging directory", &staging)?;
    let binlogs = until.as_ref().map(|_| {
        let mut name = staging.as_os_str().to_owned();
        name.push(".binlogs");
        PathBuf::from(name)
    });
    // Created here (never an existing directory), so removed here.
    let created = match &binlogs {
        Some(dir) => fs::create_dir(dir).with_path("create", dir),
        None => Ok(()),
    };
    let result = match (&binlogs, created) {
        (_, Err(e)) => Err(e),
        (Some(dir), Ok(())) => {
            let fetched = fetch_binlogs(&repo, &snapshot, dir);
            let result = fetched
                .and_then(|()| restore_via(&repo, &snapshot, &staging, Some(dir), &args, &cancel));
            let _ = fs::remove_dir_all(dir);
            result
        }
        (None, Ok(())) => restore_via(&repo, &snapshot, &staging, None, &args, &cancel),
    };
    if let Err(e) = fs::remove_dir_all(&staging) {
        error!(
            "cannot remove the staging directory {}: {e}",
            staging.display()
        );
    }
    result
}

/// The newest snapshot whose consistent point is before `until` (and has coordinates).
fn newest_before(repo: &Repo, until: &Until, host: Option<&str>) -> Result<Snapshot> {
    let before = |s: &Snapshot| -> bool {
        let Some((file, pos)) = s.binlog.as_deref().and_then(|b| b.rsplit_once(':')) else {
            return false;
        };
        match until {
            Until::Time(t) => s.time <= *t,
            Until::Gtid(list) => {
                let held: Vec<Gtid> = s
                    .gtid
                    .as_deref()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|x| x.parse().ok())
                    .collect();
                !list
                    .iter()
                    .any(|g| held.iter().any(|b| b.domain == g.domain && b.seq >= g.seq))
            }
            Until::Position(f, p) => {
                later_name(f, file) || (f == file && pos.parse::<u64>().is_ok_and(|pos| pos <= *p))
            }
        }
    };
    repo.snapshots()?
        .into_iter()
        .filter(|s| host.is_none_or(|h| s.host == h || s.source == h))
        .rfind(before)
        .ok_or_else(|| {
            Error::Refused(format!(
                "no snapshot{} in {} is older than the target: nothing to replay onto",
                host.map(|h| format!(" of {h}")).unwrap_or_default(),
                repo.url
            ))
        })
}

/// The archived binary logs of the snapshot's server, from the snapshot's file on, into a
/// directory archive.
fn fetch_binlogs(repo: &Repo, snapshot: &Snapshot, dir: &Path) -> Result<()> {
    let first = snapshot
        .binlog
        .as_deref()
        .and_then(|b| b.rsplit_once(':'))
        .map(|(f, _)| f.to_string())
        .ok_or_else(|| {
            Error::Refused(format!(
                "snapshot {} has no binary log coordinates: nothing to replay from",
                snapshot.id
            ))
        })?;
    info!(
        "Fetching the archived binary logs of {} from {first} on",
        snapshot.host
    );
    remote::fetch(repo, &snapshot.host, dir, &|f| {
        f.name == first || later_name(&f.name, &first)
    })
}

fn restore_via(
    repo: &Repo,
    snapshot: &Snapshot,
    staging: &Path,
    binlogs: Option<&Path>,
    args: &RepoRestoreArgs,
    cancel: &Cancel,
) -> Result<()> {
    info!(
        "Restoring snapshot {} of {} ({}, {} files) from {}",
        snapshot.id,
        snapshot.host,
        human(snapshot.bytes_total),
        snapshot.files_total,
        repo.url
    );
    let start = std::time::Instant::now();
    let failures = each_file(
        snapshot,
        args.parallel.map_or(8, usize::from),
        cancel,
        &|record, place| download(repo, staging, record, place),
    )?;
    if let Some((path, e)) = failures.into_iter().next() {
        return Err(match e {
            Error::Corrupt(m) => {
                Error::Corrupt(format!("cannot restore snapshot {}: {m}", snapshot.id))
            }
            e => Error::Store(format!(
                "cannot restore snapshot {}: {path}: {e}",
                snapshot.id
            )),
        });
    }
    crate::sink::dir::publish_manifest(staging, snapshot.manifest.as_bytes())?;
    let secs = start.elapsed().as_secs_f64();
    info!(
        "Downloaded and checked {} in {secs:.1} s ({}/s)",
        human(snapshot.bytes_total),
        human((snapshot.bytes_total as f64 / secs.max(1e-3)) as u64)
    );
    let restore_args = RestoreArgs {
        backup_dir: staging.to_path_buf(),
        datadir: args.datadir.clone(),
        rocksdb_datadir: args.rocksdb_datadir.clone(),
        rocksdb_waldir: args.rocksdb_waldir.clone(),
        defaults_file: args.defaults_file.clone(),
        mariadbd: args.mariadbd.clone(),
        binlog_dir: binlogs.map(Path::to_path_buf),
        until: args.until.clone(),
        replay_threads: args.replay_threads,
        skip_bootstrap: args.skip_bootstrap,
    };
    restore::run(&restore_args, Mode::Move, cancel)
}

/// Downloads one file of a snapshot into the staging directory, checked. A file stored
/// compressed is decoded on the way (the restore then only moves it), and what it decodes
/// to is checked against the manifest too.
fn download(repo: &Repo, staging: &Path, record: &FileRecord, place: &Place) -> Result<()> {
    let parts = crate::format::safe_components(record.restored_path())?;
    let path: PathBuf = parts.iter().fold(staging.to_path_buf(), |p, c| p.join(c));
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_path("create", dir)?;
    }
    let file = BufWriter::with_capacity(
        1 << 20,
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_path("create", &path)?,
    );
    let file = match &record.original {
        None => {
            let mut file = file;
            fetch(repo, place, record, &mut file)?;
            file
        }
        Some(original) => {
            let decoder = StreamDecoder::new(file).with_path("decode", &path)?;
            let mut decoding = Decoding(decoder);
            fetch(repo, place, record, &mut decoding)?;
            let (file, size, crc) = decoding
                .0
                .finish()
                .map_err(|e| Error::Corrupt(format!("{} does not decode: {e}", record.path)))?;
            if size != original.size || crc != original.crc32 {
                return Err(Error::Corrupt(format!(
                    "{} decodes to {size} bytes with CRC-32 {crc:08x}, the manifest says {} bytes with {:08x}",
                    record.path, original.size, original.crc32
                )));
            }
            file
        }
    };
    file.into_inner()
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e.into_error()))?
        .sync_all()
        .with_path("sync", &path)
}

/// A zstd decoder as a `Write`.
struct Decoding<W: Write>(StreamDecoder<W>);

impl<W: Write> Write for Decoding<W> {
    /// An error that is not the system's is the decoder's: the data is damaged.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.write(buf) {
            Ok(()) => Ok(buf.len()),
            Err(e) if e.raw_os_error().is_none() => {
                Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            }
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `verify --repo`: every object each snapshot needs exists and is large enough; with
/// `read_data`, every file is downloaded and checked.
pub fn verify(args: &RepoArgs, snapshot: Option<&str>, read_data: bool, json: bool) -> Result<()> {
    let cancel = super::on_signals()?;
    let repo = open(args)?;
    let snapshots = match snapshot {
        Some(id) => vec![repo.snapshot(id, None)?],
        None => repo.snapshots()?,
    };
    let sizes = repo.objects()?;
    #[derive(Serialize)]
    struct Problem {
        snapshot: String,
        file: String,
        problem: String,
    }
    let mut problems = Vec::new();
    let mut bytes = 0u64;
    // Files the store failed to give: not known damaged, not verified either.
    let mut unreadable = 0;
    for snapshot in &snapshots {
        let found = match read_data {
            true => each_file(snapshot, 8, &cancel, &|record, place| {
                fetch(&repo, place, record, &mut std::io::sink())
            })?,
            false => snapshot
                .places
                .iter()
                .filter_map(|(path, place)| match sizes.get(&place.object) {
                    None => Some((
                        path.clone(),
                        Error::Corrupt(format!(
                            "{path} (object {}) is missing from the repository",
                            place.object
                        )),
                    )),
                    Some(&size) if size < place.offset + place.len => Some((
                        path.clone(),
                        Error::Corrupt(format!(
                            "{path} (object {}) is shorter than recorded",
                            place.object
                        )),
                    )),
                    _ => None,
                })
                .collect(),
        };
        bytes += snapshot.bytes_total;
        for (file, e) in found {
            unreadable += usize::from(!matches!(e, Error::Corrupt(_)));
            problems.push(Problem {
                snapshot: snapshot.id.clone(),
                file,
                problem: e.to_string(),
            });
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "repository": repo.url,
                "snapshots": snapshots.len(),
                "read_data": read_data,
                "ok": problems.is_empty(),
                "problems": problems,
            }))
            .expect("serialisable")
        );
    }
    for p in &problems {
        error!("snapshot {}: {}", p.snapshot, p.problem);
    }
    if unreadable > 0 {
        return Err(Error::Store(format!(
            "{}: {unreadable} file(s) could not be read from the store (see above): the repository was not verified",
            repo.url
        )));
    }
    match problems.is_empty() {
        true => {
            info!(
                "Verified {} snapshot{} ({}{}) in {}: completed OK!",
                snapshots.len(),
                if snapshots.len() == 1 { "" } else { "s" },
                human(bytes),
                if read_data {
                    ", every byte read"
                } else {
                    ", objects present"
                },
                repo.url
            );
            Ok(())
        }
        false => Err(Error::Corrupt(format!(
            "{}: {} problem{} found",
            repo.url,
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        ))),
    }
}

/// The snapshots a keep policy keeps, of one host's, newest first.
fn keep(times: &[(String, i64)], args: &ForgetArgs) -> BTreeSet<String> {
    let mut sorted: Vec<&(String, i64)> = times.iter().collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.1));
    let mut kept = BTreeSet::new();
    for (id, _) in sorted.iter().take(args.keep_last.unwrap_or(0)) {
        kept.insert(id.clone());
    }
    type Period = fn(i64) -> i64;
    let buckets: [(Option<usize>, Period); 3] = [
        (args.keep_daily, |t| day(t)),
        (args.keep_weekly, |t| (day(t) + 3).div_euclid(7)),
        (args.keep_monthly, |t| {
            let (y, m, ..) = crate::sys::local_time(t);
            (y * 12 + m) as i64
        }),
    ];
    for (count, bucket) in buckets {
        let mut seen = BTreeSet::new();
        for (id, time) in &sorted {
            if seen.len() >= count.unwrap_or(0) {
                break;
            }
            if seen.insert(bucket(*time)) {
                kept.insert(id.clone());
            }
        }
    }
    kept
}

/// The local calendar day of a time, as days since 1970-01-01.
fn day(t: i64) -> i64 {
    let (y, m, d, ..) = crate::sys::local_time(t);
    // Days from the civil date (proleptic Gregorian).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) as i64
}

pub fn forget(args: ForgetArgs) -> Result<()> {
    let keeps = [
        args.keep_last,
        args.keep_daily,
        args.keep_weekly,
        args.keep_monthly,
    ];
    if keeps.iter().all(|k| k.unwrap_or(0) == 0) {
        return Err(Error::Usage(
            "forget needs a policy that keeps something: --keep-last, --keep-daily, --keep-weekly or --keep-monthly N (N > 0)"
                .into(),
        ));
    }
    let repo = open(&args.repo)?;
    // The policy applies to each server apart: a host may run several.
    let mut by_host: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
    for s in repo.snapshots()? {
        if args
            .host
            .as_ref()
            .is_none_or(|h| &s.host == h || &s.source == h)
        {
            by_host.entry(s.source).or_default().push((s.id, s.time));
        }
    }
    let mut removed = 0;
    for (host, times) in &by_host {
        let kept = keep(times, &args);
        for (id, time) in times {
            if kept.contains(id) {
                continue;
            }
            repo.store().delete(&format!("{SNAPSHOTS}{id}"))?;
            removed += 1;
            info!(
                "Forgot snapshot {id} of {host} ({})",
                crate::log::local_datetime(*time)
            );
        }
        info!("{host}: kept {} snapshot(s)", kept.len());
    }
    info!("Forgot {removed} snapshot(s); their data goes at the next prune");
    if args.prune {
        prune(&PruneArgs {
            repo: args.repo.clone(),
        })?;
    }
    Ok(())
}

/// Objects no snapshot refers to go in two steps: a trash list now, deleted once every
/// running backup has seen that list (they never use what it names), so a backup that
/// decided to reuse an object before the list existed has committed or died.
pub fn prune(args: &PruneArgs) -> Result<()> {
    let repo = open(&args.repo)?;
    let referenced = |repo: &Repo| -> Result<HashSet<String>> {
        Ok(repo
            .snapshots()?
            .into_iter()
            .flat_map(|s| s.places.into_values().map(|p| p.object))
            .collect())
    };
    // Step 1: list what nothing refers to and no trash list names yet. The list is written
    // even when empty: its time, by the store's clock, is the "now" that locks are judged by.
    let used = referenced(&repo)?;
    let trash = repo.trash()?;
    let listed: HashSet<&String> = trash.values().flat_map(|(t, _)| &t.objects).collect();
    let sizes = repo.objects()?;
    let list = Trash {
        created: crate::log::unix_now(),
        objects: sizes
            .keys()
            .filter(|o| !used.contains(*o) && !listed.contains(o))
            .cloned()
            .collect(),
    };
    let name = format!("{TRASH}{}", crate::net::tls::random_hex(8)?);
    repo.put_json(&name, &list, true)?;
    if !list.objects.is_empty() {
        info!(
            "{} unreferenced object(s) listed in {name}",
            list.objects.len()
        );
    }
    // Step 2: delete the lists every running backup has seen. The lists are read first,
    // then the locks, then the snapshots: a list a backup did not see was written after
    // it started, so its lock is there; a backup whose lock is gone has committed its
    // snapshot by then. Locks are judged by the store's clock: this run's list's time.
    let trash = repo.trash()?;
    let now = trash
        .get(&name)
        .map_or(SystemTime::now(), |(_, written)| *written);
    let locks = repo.live_locks(now)?;
    let used = referenced(&repo)?;
    let (mut deleted, mut freed, mut deferred) = (0u64, 0u64, 0usize);
    for (name, (list, _)) in trash {
        if !locks.values().all(|l| l.seen_trash.contains(&name)) {
            deferred += usize::from(!list.objects.is_empty());
            continue;
        }
        for object in &list.objects {
            if used.contains(object) {
                continue;
            }
            repo.store().delete(object)?;
            deleted += 1;
            freed += sizes.get(object).copied().unwrap_or(0);
        }
        repo.store().delete(&name)?;
    }
    if deferred > 0 {
        info!(
            "{deferred} trash list(s) kept for now: {} backup(s) running since before they were made; the next prune deletes them",
            locks.len()
        );
    }
    prune_binlogs(&repo)?;
    info!(
        "Pruned {deleted} object(s), {} freed; completed OK!",
        human(freed)
    );
    Ok(())
}

/// Archived binary logs that end before every snapshot of their server serve no restore:
/// the files before the oldest snapshot's file go. A server with no snapshot keeps all.
fn prune_binlogs(repo: &Repo) -> Result<()> {
    let snapshots = repo.snapshots()?;
    for host in remote::hosts(repo)? {
        let files = snapshots
            .iter()
            .filter(|s| s.host == host)
            .filter_map(|s| s.binlog.as_deref()?.rsplit_once(':').map(|(f, _)| f));
        let Some(oldest) = files.reduce(|a, b| if later_name(a, b) { b } else { a }) else {
            continue;
        };
        let (removed, bytes) = remote::remove_before(repo, &host, oldest)?;
        if removed > 0 {
            info!(
                "Removed {removed} archived binary log(s) of {host} ({}) older than its oldest snapshot ({oldest})",
                human(bytes)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(last: usize, daily: usize, weekly: usize, monthly: usize) -> ForgetArgs {
        ForgetArgs {
            repo: RepoArgs {
                repo: String::new(),
                key_file: None,
            },
            keep_last: Some(last),
            keep_daily: Some(daily),
            keep_weekly: Some(weekly),
            keep_monthly: Some(monthly),
            host: None,
            prune: false,
        }
    }

    #[test]
    fn keep_policies_take_the_newest_of_each_period() {
        // Four backups a day, at noon and later, for 70 days.
        let base = 1_700_000_000 - 1_700_000_000 % 86_400 + 43_200;
        let times: Vec<(String, i64)> = (0..280)
            .map(|i| (format!("s{i:03}"), base + (i / 4) * 86_400 + (i % 4) * 600))
            .collect();
        assert_eq!(keep(&times, &args(3, 0, 0, 0)).len(), 3);
        assert!(keep(&times, &args(3, 0, 0, 0)).contains("s279"));
        let daily = keep(&times, &args(0, 7, 0, 0));
        assert_eq!(daily.len(), 7);
        assert!(daily.contains("s279") && daily.contains("s255"));
        assert_eq!(keep(&times, &args(0, 0, 4, 0)).len(), 4);
        assert!(keep(&times, &args(0, 0, 0, 12)).len() <= 4);
        assert!(keep(&times, &args(0, 0, 0, 12)).len() >= 3);
        // Rules add up, and never keep one twice.
        assert_eq!(keep(&times, &args(1, 1, 0, 0)).len(), 1);
        assert_eq!(day(86_400 * 2 + 43_200) - day(43_200), 2);
    }
}
