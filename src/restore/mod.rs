//! Reading backups back. [`extract`] unpacks a stream, [`backup_dir`] checks a backup on
//! disk against its manifest (`verify`), and this module restores one (`move-back`,
//! `copy-back`): from a backup directory into empty data directories that a
//! stock server starts from. RocksDB WAL files go to the WAL directory, the other RocksDB
//! files to the RocksDB data directory, everything else to the datadir; the backup's own
//! metadata stays in the backup directory. Both layouts are read: ours (RocksDB files under
//! `#rocksdb/`) and the original tool's (RocksDB files at the top level).
//!
//! Everything is checked before anything moves: the backup is complete (against its
//! manifest), the targets are empty, `mariadbd` is there. If a step fails half-way, what
//! was moved is moved back and what was created is removed. Last, the InnoDB tables of the
//! `mysql` schema are re-created with `mariadbd --bootstrap`.

pub mod backup_dir;
pub mod extract;
mod logical;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::binlog::replay::{self, Until};
use crate::cancel::Cancel;
use crate::cli::RestoreArgs;
use crate::error::{Error, IoContext, Result};
use crate::format::layout::{
    BEGIN_NAME, BINLOG_INFO_NAME, INNODB_DIR, INNODB_SQL_NAME, MANIFEST_NAME, ROCKSDB_DIR,
    ZSTD_SUFFIX,
};
use crate::format::logical::Logical;
use crate::format::manifest::Original;
use crate::log::human;
use crate::pipeline::compress;
use crate::{info, warn};
use backup_dir::BackupDir;
use serde::Deserialize;

/// The files of a backup stored compressed, with what they must decode to.
type Decode = HashMap<PathBuf, Original>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Move,
    Copy,
}

/// Names at the backup's top level that describe the backup and stay with it.
const METADATA: &[&str] = &[
    BEGIN_NAME,
    MANIFEST_NAME,
    INNODB_SQL_NAME,
    BINLOG_INFO_NAME,
    INNODB_DIR,
];
/// Where a restore run with --skip-bootstrap leaves the InnoDB tables' rows, in the datadir.
const UNPACKED_DIR: &str = "myrocks_hotbackup_innodb";
/// Where the bootstrap's named pipes go, in the datadir, while it runs.
const PIPES_DIR: &str = "#myrocks_hotbackup_load";

pub fn run(args: &RestoreArgs, mode: Mode, cancel: &Cancel) -> Result<()> {
    let backup = &args.backup_dir;
    let datadir = args.datadir.clone();
    let rocksdb_dir = args
        .rocksdb_datadir
        .clone()
        .unwrap_or_else(|| datadir.join(ROCKSDB_DIR));
    let wal_dir = args
        .rocksdb_waldir
        .clone()
        .unwrap_or_else(|| rocksdb_dir.clone());
    let replay = replay_plan(args)?;
    let (obsolete, decode, logical) = check_complete(backup, cancel)?;
    let plan = plan(backup, &datadir, &rocksdb_dir, &wal_dir, &obsolete, &decode)?;
    for target in [&datadir, &rocksdb_dir, &wal_dir] {
        check_empty(target)?;
    }
    let innodb_sql = match fs::read_to_string(backup.join(INNODB_SQL_NAME)) {
        Ok(sql) => Some(sql),
        Err(e) if e.kind() == ErrorKind::NotFound => logical.as_ref().map(|_| String::new()),
        Err(e) => return Err(Error::io(format!("cannot read {INNODB_SQL_NAME}"), e)),
    };
    let mariadbd = match (&innodb_sql, args.skip_bootstrap) {
        (Some(_), false) => Some(find_mariadbd(args.mariadbd.as_deref())?),
        _ => None,
    };
    let replay_mariadbd = match &replay {
        Some(_) => Some(find_mariadbd(args.mariadbd.as_deref())?),
        None => None,
    };

    let mut undo = Undo::default();
    let result = (|| -> Result<()> {
        for target in [&datadir, &rocksdb_dir, &wal_dir] {
            undo.create_dirs(target)?;
        }
        for (src, dst) in &plan {
            cancel.check()?;
            // The bootstrap writes into mysql/ and the Aria log: the backup's own copies
            // must stay untouched until the restore has succeeded.
            let name = src.file_name().unwrap_or_default().to_string_lossy();
            let bootstrap_touches = innodb_sql.is_some()
                && dst.parent() == Some(datadir.as_path())
                && (name == "mysql" || name.starts_with("aria_log"));
            // A compressed file is decoded on the way: a copy, even for a move.
            let decodes = decode.keys().any(|p| p.starts_with(src));
            undo.transfer(
                src,
                dst,
                mode,
                bootstrap_touches || decodes,
                &decode,
                cancel,
            )?;
        }
        match (&innodb_sql, &mariadbd) {
            (Some(sql), Some(mariadbd)) => {
                let before = listing(&datadir);
                let script = format!("USE mysql;\n{sql}");
                let defaults = args.defaults_file.as_deref();
                let booted = match &logical {
                    Some(l) => {
                        bootstrap_with_tables(mariadbd, defaults, &datadir, script, backup, l)
                    }
                    None => bootstrap_innodb(mariadbd, defaults, &datadir, &script, &|| false),
                };
                undo.created
                    .extend(listing(&datadir).difference(&before).cloned());
                booted?;
            }
            (Some(sql), None) => {
                let mut text = format!("USE mysql;\n{sql}");
                if let Some(l) = &logical {
                    let dir = datadir.join(UNPACKED_DIR);
                    undo.created.push(dir.clone());
                    fs::create_dir(&dir).with_path("create", &dir)?;
                    let names = logical::unpack(backup, l, &dir, UNPACKED_DIR)?;
                    text.push_str(&logical::script(l, |i| names[i].clone()));
                }
                let script = datadir.join(INNODB_SQL_NAME);
                undo.created.push(script.clone());
                fs::write(&script, text).with_path("write", &script)?;
            }
            _ => {}
        }
        if let (Some(plan), Some(mariadbd)) = (&replay, &replay_mariadbd) {
            let targets = [&datadir, &rocksdb_dir, &wal_dir];
            let before: HashSet<PathBuf> = targets.iter().flat_map(|d| listing(d)).collect();
            let target = replay::Target {
                mariadbd,
                defaults_file: args.defaults_file.as_deref(),
                datadir: &datadir,
                rocksdb_dir: &rocksdb_dir,
                wal_dir: &wal_dir,
                threads: args
                    .replay_threads
                    .map_or_else(replay::default_threads, usize::from),
            };
            let replayed = replay::run(plan, &target, cancel);
            if replayed.is_err() {
                let after: HashSet<PathBuf> = targets.iter().flat_map(|d| listing(d)).collect();
                undo.created.extend(after.difference(&before).cloned());
                // The replay's server may have removed files moved in (WAL files replayed,
                // SSTs compacted): nothing is left of them to move back.
                undo.moved.retain(|(_, dst)| dst.exists());
            }
            replayed?;
        }
        for target in [&datadir, &rocksdb_dir, &wal_dir] {
            sync(target)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        return Err(match undo.roll_back() {
            Ok(()) => e,
            Err(stuck) => Error::Refused(format!("{e}; undoing the restore failed too: {stuck}")),
        });
    }
    if let Err(e) = undo.commit() {
        warn!("The restore is complete, but the backup directory could not be emptied: {e}");
    }
    if mode == Mode::Move {
        let _ = fs::remove_dir(backup.join(ROCKSDB_DIR)); // emptied by the move
    }
    if !obsolete.is_empty() {
        info!(
            "Left {} SST files that compaction made obsolete during the backup in {}",
            obsolete.len(),
            backup.display()
        );
    }
    let verb = if mode == Mode::Move {
        "Moved"
    } else {
        "Copied"
    };
    info!(
        "{verb} {} entries into {} (RocksDB data {}, WAL {})",
        plan.len(),
        datadir.display(),
        rocksdb_dir.display(),
        wal_dir.display()
    );
    if let Some(plan) = &replay {
        info!(
            "The restored server stands at GTID {} (its gtid_slave_pos), binary log coordinates {}:{} of the source",
            plan.target_gtid, plan.stop.0, plan.stop.1
        );
    } else if let Ok(coords) = fs::read_to_string(backup.join(BINLOG_INFO_NAME)) {
        let fields: Vec<&str> = coords.trim_end().split('\t').collect();
        if let [file, pos, gtid] = fields[..] {
            info!("Binary log coordinates of the backup: {file}:{pos}, GTID {gtid}");
            info!("To make the restored server a replica: SET GLOBAL gtid_slave_pos = '{gtid}'; CHANGE MASTER TO ..., MASTER_USE_GTID = slave_pos");
        }
    }
    if innodb_sql.is_some() && mariadbd.is_none() {
        let args: Vec<String> = bootstrap_args(args.defaults_file.as_deref(), &datadir)
            .into_iter()
            .map(|a| shell_quote(&a))
            .collect();
        let script = shell_quote(&datadir.join(INNODB_SQL_NAME).to_string_lossy());
        let d = shell_quote(&datadir.to_string_lossy());
        let (what, unpacked) = match &logical {
            Some(_) => (
                "The InnoDB tables (of the mysql schema and the backup's own) are",
                format!(
                    " {}",
                    shell_quote(&datadir.join(UNPACKED_DIR).to_string_lossy())
                ),
            ),
            None => ("The InnoDB tables of the mysql schema are", String::new()),
        };
        warn!(
            "{what} not re-created yet (--skip-bootstrap). Before the first start, on the database host, \
             as root, run: chown -R mysql:mysql {d} && mariadbd {} --user=mysql < {script} && rm -r {script}{unpacked}",
            args.join(" ")
        );
    }
    info!("Before starting the server, give the files to its user (chown -R mysql:mysql, as after mariabackup)");
    info!("{verb} back: completed OK!");
    Ok(())
}

/// The replay of archived binary logs asked for, worked out before anything is restored.
fn replay_plan(args: &RestoreArgs) -> Result<Option<replay::Plan>> {
    let until = Until::of(&args.until)?;
    let (dir, until) = match (&args.binlog_dir, until) {
        (Some(dir), Some(until)) => (dir, until),
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(Error::Usage(
                "--binlog-dir needs a target: --until-time, --until-gtid or --until-position"
                    .into(),
            ))
        }
        (None, Some(_)) => {
            return Err(Error::Usage(
                "--until-* needs the archived binary logs: --binlog-dir DIR".into(),
            ))
        }
    };
    if args.skip_bootstrap {
        return Err(Error::Usage(
            "--skip-bootstrap restores the files only; a replay needs mariadbd".into(),
        ));
    }
    let plan = replay::plan(dir, &args.backup_dir, &until)?;
    info!(
        "The archive reaches the target: {} transactions from {}:{} to {}:{}",
        plan.transactions, plan.start.0, plan.start.1, plan.stop.0, plan.stop.1
    );
    Ok(Some(plan))
}

/// Refuses a backup whose files do not match its manifest (mbstream skips files silently;
/// a disk may flip a bit). Returns the obsolete SSTs the manifest lists (sent in early
/// rounds, compacted away since), the files stored compressed, to decode, and the InnoDB
/// user tables to load.
fn check_complete(
    backup: &Path,
    cancel: &Cancel,
) -> Result<(HashSet<String>, Decode, Option<Logical>)> {
    let dir = BackupDir::open(backup)?;
    if dir.is_original_tools() {
        return Ok(Default::default()); // nothing to check against
    }
    let manifest = dir.manifest()?;
    let total: u64 = manifest.files.iter().map(|f| f.size).sum();
    info!(
        "Verifying {} files ({}) against the backup's manifest",
        manifest.files.len(),
        human(total)
    );
    let checked = dir.check(cancel)?;
    if let Some(first) = checked.problems.first() {
        let more = match checked.problems.len() {
            1 => String::new(),
            n => format!(" (and {} more problems: run verify to see them all)", n - 1),
        };
        let hint = match first.problem {
            "extra" => ": remove it, or extract the backup into an empty directory (a stray file, such as a WAL, would be replayed by the server)",
            _ => "",
        };
        return Err(Error::Corrupt(format!(
            "the backup in {} does not match its manifest, nothing was restored: {}{hint}{more}",
            backup.display(),
            first
        )));
    }
    let obsolete = manifest.backup["obsolete_sst"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    let decode = manifest
        .files
        .iter()
        .filter(|f| dir.files.contains_key(&f.path))
        .filter_map(|f| Some((backup.join(&f.path), f.original.clone()?)))
        .collect();
    let logical = match manifest.backup.get("innodb_logical") {
        Some(v) if !v.is_null() => Some(Logical::deserialize(v).map_err(|e| {
            Error::Corrupt(format!(
                "the manifest's innodb_logical is not readable: {e}"
            ))
        })?),
        _ => None,
    };
    Ok((obsolete, decode, logical))
}

/// Where every entry of the backup goes.
fn plan(
    backup: &Path,
    datadir: &Path,
    rocksdb_dir: &Path,
    wal_dir: &Path,
    obsolete: &HashSet<String>,
    decode: &Decode,
) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut moves = BTreeMap::new();
    let rocksdb_target = |name: &str| {
        if is_wal(name) {
            wal_dir.join(name)
        } else {
            rocksdb_dir.join(name)
        }
    };
    for entry in fs::read_dir(backup).with_path("list", backup)? {
        let path = entry.with_path("list", backup)?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if METADATA.contains(&name.as_str()) || name == "lost+found" {
            continue;
        }
        if path.is_file() && is_server_state(&name) {
            warn!("Leaving {name} in the backup directory: server state that a restored server must not replay");
            continue;
        }
        if name == ROCKSDB_DIR && path.is_dir() {
            for inner in fs::read_dir(&path).with_path("list", &path)? {
                let inner = inner.with_path("list", &path)?.path();
                let inner_name = decoded_name(&inner, decode);
                if !obsolete.contains(&inner_name) {
                    moves.insert(inner.clone(), rocksdb_target(&inner_name));
                }
            }
        } else if path.is_file() && is_rocksdb_file(&decoded_name(&path, decode)) {
            moves.insert(path.clone(), rocksdb_target(&decoded_name(&path, decode)));
        } else {
            moves.insert(path.clone(), datadir.join(decoded_name(&path, decode)));
        }
    }
    Ok(moves.into_iter().collect())
}

/// A file's name once restored: without `.zst` when it is decoded on the way.
fn decoded_name(path: &Path, decode: &Decode) -> String {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    match decode.contains_key(path) {
        true => name.strip_suffix(ZSTD_SUFFIX).unwrap_or(&name).to_string(),
        false => name.into_owned(),
    }
}

/// Files of a running server that backups of the original tool carried along: restored,
/// they would make the new server replay DDL, XA or InnoDB recovery from a state the backup
/// never captured consistently.
fn is_server_state(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "ddl.log",
        "ddl_recovery.log",
        "tc.log",
        "ibtmp1",
        "ib_buffer_pool",
        "auto.cnf",
        "master.info",
        "relay-log.info",
        "multi-master.info",
    ];
    let numbered = |n: &str| {
        n.rsplit_once('.')
            .is_some_and(|(_, ext)| ext.len() == 6 && ext.bytes().all(|b| b.is_ascii_digit()))
    };
    NAMES.contains(&name)
        || name.starts_with("ibdata")
        || name.starts_with("ib_logfile")
        || name.starts_with("undo")
        || name.ends_with(".index")
        || name.ends_with(".pid")
        || name.ends_with(".err")
        || numbered(name) // binary and relay logs: binlog.000001
}

/// A RocksDB write-ahead log: digits and `.log` (MariaDB's `ddl.log` is not one).
fn is_wal(name: &str) -> bool {
    name.strip_suffix(".log")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// RocksDB files at the top level of an original-tool backup.
fn is_rocksdb_file(name: &str) -> bool {
    name.ends_with(".sst")
        || is_wal(name)
        || name == "CURRENT"
        || name.starts_with("MANIFEST-")
        || name.starts_with("OPTIONS-")
}

/// A target must be empty; `lost+found` (a target that is a filesystem's root) is allowed.
pub fn check_empty(dir: &Path) -> Result<()> {
    match fs::read_dir(dir) {
        Ok(mut entries) => match entries
            .find(|e| !e.as_ref().is_ok_and(|e| e.file_name() == "lost+found"))
        {
            None => Ok(()),
            Some(e) => Err(Error::Refused(format!(
                "restore target {} is not empty (it holds {:?}); restore only into empty or new directories",
                dir.display(),
                e.map(|e| e.file_name()).unwrap_or_default()
            ))),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot read restore target {}", dir.display()), e)),
    }
}

fn find_mariadbd(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        return match path.is_file() {
            true => Ok(path.to_path_buf()),
            false => Err(Error::Usage(format!(
                "--mariadbd {}: no such file",
                path.display()
            ))),
        };
    }
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/libexec"].map(PathBuf::from))
        .map(|d| d.join("mariadbd"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Refused(
                "mariadbd is needed to re-create the InnoDB tables of the mysql schema and was not found: \
                 restore on the database host, give its path with --mariadbd PATH, or pass --skip-bootstrap \
                 and run the bootstrap command the restore prints on the database host before the first start"
                    .into(),
            )
        })
}

/// The bootstrap's options. Whatever the option file says, InnoDB's and Aria's files go into
/// the new datadir, RocksDB stays off, and the bootstrap writes no binary log and opens no
/// port: it cannot touch the files of a server running on the same host.
fn bootstrap_args(defaults_file: Option<&Path>, datadir: &Path) -> Vec<String> {
    let d = datadir.display();
    let defaults = match defaults_file {
        Some(f) => format!("--defaults-file={}", f.display()),
        None => "--no-defaults".into(),
    };
    vec![
        defaults,
        "--bootstrap".into(),
        format!("--datadir={d}"),
        format!("--innodb-data-home-dir={d}"),
        format!("--innodb-log-group-home-dir={d}"),
        format!("--innodb-undo-directory={d}"),
        "--skip-log-bin".into(),
        format!("--aria-log-dir-path={d}"),
        "--loose-rocksdb=OFF".into(),
        "--skip-networking".into(),
        // The InnoDB user tables' rows are read from inside the datadir only.
        format!("--secure-file-priv={d}"),
    ]
}

/// A word for a POSIX shell, quoted when it needs to be.
fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_=/.,:@+".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// Runs `script` (which starts with `USE mysql`) with `mariadbd --bootstrap` in the new
/// datadir, creating the InnoDB system tablespace; stops it when `abort` says so.
fn bootstrap_innodb(
    mariadbd: &Path,
    defaults_file: Option<&Path>,
    datadir: &Path,
    script: &str,
    abort: &(dyn Fn() -> bool + Sync),
) -> Result<()> {
    let log = tempfile::NamedTempFile::new().context(|| "cannot create a temporary file".into())?;
    let mut cmd = Command::new(mariadbd);
    cmd.args(bootstrap_args(defaults_file, datadir))
        .arg(format!("--log-error={}", log.path().display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if crate::sys::is_root() {
        cmd.arg("--user=root");
    }
    let mut child = cmd.spawn().with_path("run", mariadbd)?;
    let mut stdin = child.stdin.take().expect("piped");
    // Written from a thread: the script may outgrow the pipe while the bootstrap waits.
    let (wrote, status) = std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(script.as_bytes()));
        let mut stopped = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) if abort() && !stopped => {
                    stopped = true;
                    let _ = child.kill();
                }
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
                Err(e) => break Err(e),
            }
        };
        (
            writer.join().expect("the script writer panicked"),
            status.map(|s| (s, stopped)),
        )
    });
    let (status, stopped) = status.with_path("wait for", mariadbd)?;
    if stopped {
        return Err(Error::Closed); // the caller reports why
    }
    if !status.success() || wrote.is_err() {
        let text = fs::read_to_string(log.path()).unwrap_or_default();
        return Err(Error::Server(format!(
            "mariadbd --bootstrap could not create the InnoDB tables ({status}):\n{text}"
        )));
    }
    info!("Re-created the InnoDB tables of the mysql schema with mariadbd --bootstrap");
    Ok(())
}

/// The bootstrap, loading the backup's InnoDB user tables after the mysql schema's.
fn bootstrap_with_tables(
    mariadbd: &Path,
    defaults_file: Option<&Path>,
    datadir: &Path,
    mut script: String,
    backup: &Path,
    tables: &Logical,
) -> Result<()> {
    let started = std::time::Instant::now();
    let dir = datadir.join(PIPES_DIR);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_path("create", &dir)?;
    let booted = logical::Pipes::feed(backup, tables, &dir).and_then(|pipes| {
        script.push_str(&logical::script(tables, |i| pipes.paths[i].clone()));
        // A feeder that fails stops the bootstrap: it may be waiting on a pipe never opened.
        let booted = bootstrap_innodb(mariadbd, defaults_file, datadir, &script, &|| {
            pipes.failed()
        });
        match (booted, pipes.finish()) {
            (Ok(()), fed) => fed,
            // A damaged file, or a feeding that failed and had the bootstrap stopped, says
            // more than the bootstrap's end; a bootstrap that failed by itself says why.
            (Err(Error::Closed), Err(e)) | (Err(_), Err(e @ Error::Corrupt(_))) => Err(e),
            (Err(e), _) => Err(e),
        }
    });
    let _ = fs::remove_dir_all(&dir);
    booted?;
    let rows: u64 = tables.tables.iter().map(|t| t.rows).sum();
    info!(
        "Loaded {} InnoDB tables ({rows} rows, {}) in {:.1} s",
        tables.tables.len(),
        human(tables.tables.iter().map(|t| t.bytes).sum()),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn sync(dir: &Path) -> Result<()> {
    crate::sys::syncfs(dir)
}

/// What a restore did so far, to undo it after a failure. Only what is recorded here is
/// ever removed: never a file this restore did not put there.
#[derive(Default)]
struct Undo {
    created_dirs: Vec<PathBuf>,
    moved: Vec<(PathBuf, PathBuf)>,
    /// Files and trees this restore created: copies, and what the bootstrap wrote.
    created: Vec<PathBuf>,
    /// Sources copied instead of moved (another filesystem, or about to be changed by the
    /// bootstrap): removed only once the whole restore has succeeded.
    remove_on_success: Vec<PathBuf>,
}

impl Undo {
    fn create_dirs(&mut self, dir: &Path) -> Result<()> {
        let missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.exists()).collect();
        fs::create_dir_all(dir).with_path("create", dir)?;
        self.created_dirs
            .extend(missing.into_iter().rev().map(Path::to_path_buf));
        Ok(())
    }

    fn transfer(
        &mut self,
        src: &Path,
        dst: &Path,
        mode: Mode,
        copy_first: bool,
        decode: &Decode,
        cancel: &Cancel,
    ) -> Result<()> {
        if mode == Mode::Move && !copy_first {
            match crate::sys::rename_noreplace(src, dst) {
                Ok(()) => {
                    self.moved.push((src.to_path_buf(), dst.to_path_buf()));
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {} // another filesystem: copy
                Err(e) => return Err(transfer_error(src, dst, e)),
            }
        }
        if dst.symlink_metadata().is_ok() {
            return Err(transfer_error(
                src,
                dst,
                std::io::ErrorKind::AlreadyExists.into(),
            ));
        }
        self.created.push(dst.to_path_buf());
        copy_tree(src, dst, decode, cancel)?;
        if mode == Mode::Move {
            self.remove_on_success.push(src.to_path_buf());
        }
        Ok(())
    }

    /// The restore succeeded: finish the moves that had to copy.
    fn commit(&mut self) -> Result<()> {
        self.remove_on_success
            .iter()
            .try_for_each(|src| remove_tree(src))
    }

    /// Removes what this restore created, puts every moved file back, and removes the
    /// directories it created if they are empty again. If something cannot be moved back,
    /// nothing more is touched and the error says where things are.
    fn roll_back(&mut self) -> std::result::Result<(), String> {
        for path in self.created.iter().rev() {
            let _ = remove_tree(path);
        }
        let stuck: Vec<String> = self
            .moved
            .iter()
            .rev()
            .filter(|(src, dst)| fs::rename(dst, src).is_err())
            .map(|(src, dst)| format!("{} (belongs at {})", dst.display(), src.display()))
            .collect();
        if !stuck.is_empty() {
            return Err(format!("these stay where they are: {}", stuck.join(", ")));
        }
        for dir in self.created_dirs.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
        Ok(())
    }
}

fn transfer_error(src: &Path, dst: &Path, e: std::io::Error) -> Error {
    match e.kind() {
        ErrorKind::AlreadyExists => Error::Refused(format!(
            "{} appeared in the target while restoring (is another restore running?)",
            dst.display()
        )),
        _ => Error::io(
            format!("cannot move {} to {}", src.display(), dst.display()),
            e,
        ),
    }
}

/// The paths in a datadir and in its databases' directories: what the bootstrap may add to
/// (the `mysql` schema, and the InnoDB user tables it loads).
fn listing(datadir: &Path) -> HashSet<PathBuf> {
    let top: HashSet<PathBuf> = fs::read_dir(datadir)
        .into_iter()
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .collect();
    let inner = top
        .iter()
        .filter(|p| p.is_dir())
        .filter_map(|d| fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()));
    inner.chain(top.iter().cloned()).collect()
}

/// Copies a file or directory tree, keeping modes and modification times, and decoding the
/// files stored compressed (their copies lose the `.zst`).
fn copy_tree(src: &Path, dst: &Path, decode: &Decode, cancel: &Cancel) -> Result<()> {
    cancel.check()?;
    let md = fs::metadata(src).with_path("stat", src)?;
    if md.is_dir() {
        fs::create_dir(dst).with_path("create", dst)?;
        for entry in fs::read_dir(src).with_path("list", src)? {
            let path = entry.with_path("list", src)?.path();
            copy_tree(
                &path,
                &dst.join(decoded_name(&path, decode)),
                decode,
                cancel,
            )?;
        }
    } else if let Some(original) = decode.get(src) {
        let mut out = fs::File::options()
            .write(true)
            .create_new(true)
            .open(dst)
            .with_path("create", dst)?;
        let (size, crc) = compress::decode_file(src, Some(&mut out))?;
        if (size, crc) != (original.size, original.crc32) {
            return Err(Error::Corrupt(format!(
                "{} decoded to {size} bytes with CRC-32 {crc:08x}, the manifest says {} bytes with {:08x}",
                src.display(),
                original.size,
                original.crc32
            )));
        }
        out.set_modified(md.modified().with_path("stat", src)?)
            .with_path("set the time of", dst)?;
    } else {
        fs::copy(src, dst)
            .context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
        let f = fs::File::options()
            .write(true)
            .open(dst)
            .with_path("open", dst)?;
        f.set_modified(md.modified().with_path("stat", src)?)
            .with_path("set the time of", dst)?;
    }
    fs::set_permissions(dst, md.permissions()).with_path("set permissions of", dst)
}

fn remove_tree(p: &Path) -> Result<()> {
    if p.is_dir() {
        fs::remove_dir_all(p).with_path("remove", p)
    } else {
        fs::remove_file(p).with_path("remove", p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_never_replace_what_is_already_there() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::write(&a, b"mine").unwrap();
        fs::write(&b, b"someone else's").unwrap();
        assert_eq!(
            crate::sys::rename_noreplace(&a, &b).unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        assert_eq!(fs::read(&b).unwrap(), b"someone else's");
        fs::remove_file(&b).unwrap();
        crate::sys::rename_noreplace(&a, &b).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"mine");
    }

    #[test]
    fn server_state_files_are_recognised() {
        for name in [
            "ddl_recovery.log",
            "ibdata1",
            "ib_logfile0",
            "binlog.000001",
            "binlog.index",
            "mysqld.pid",
        ] {
            assert!(is_server_state(name), "{name}");
        }
        for name in [
            "aria_log.00000001",
            "aria_log_control",
            "000012.log",
            "CURRENT",
            "xtrabackup_binlog_info",
        ] {
            assert!(!is_server_state(name), "{name}");
        }
    }
}
