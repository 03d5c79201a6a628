//! The hot backup engine: the rounds and the consistent point. It talks to the server
//! ([`crate::server`]), keeps its checkpoints in a [`checkpoint`] area, picks the datadir's
//! files ([`datadir`]), brings the WAL to the consistent point ([`wal`]), copies what the
//! server writes until commits are blocked aside ([`aside`]), and hands every file to the
//! [`Pipeline`], in batches, with its kind.
//!
//! 1. **Catch-up rounds.** Create a checkpoint, send its SST files (oldest first), deleting
//!    each hard link once sent. After `--interval` seconds abandon the round, delete the
//!    checkpoint and start a new one, skipping SSTs already sent (same name and size: SST
//!    files are immutable). So a checkpoint never pins files that compaction made obsolete
//!    for long. The rounds end with one that sent everything it held.
//! 2. **The consistent point**, through `BACKUP STAGE`. Before it, all but the tail of the
//!    Aria log and of the log tables is copied aside. Under `BLOCK_DDL` (which also blocks
//!    writes to non-transactional tables) the table definitions and the files of
//!    non-transactional tables are sent, and the final checkpoint is created, its live WAL
//!    pinned (see [`crate::wal`]). Under `BLOCK_COMMIT`, what the server writes until then
//!    (the statistics and log tables of `mysql`, the Aria log's tail) is copied aside, the
//!    WAL sizes are recorded (or, when the WAL cannot be brought forward exactly, the final
//!    checkpoint is taken again), and the binary log coordinates and the replication state
//!    are read. `END` releases the server; the time in between is the commit stall,
//!    measured and recorded.
//! 3. **The rest**: the final checkpoint's new SSTs, its WAL, OPTIONS, MANIFEST and CURRENT,
//!    the copies made aside, then `xtrabackup_binlog_info`, `xtrabackup_slave_info`, the
//!    InnoDB system tables and the manifest.
//!
//! The log lines carry the original tool's words (`Waiting until ... is created..`,
//! `RocksDB Backup Done.`, `All Backups Done.`), which scripts and MariaDB's test suite grep;
//! the last line of a successful run also says `completed OK!`, as mariabackup's does.

mod aside;
mod checkpoint;
mod datadir;
mod logical;
pub mod sst;
mod wal;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cancel::Cancel;
use crate::cli::{BackupArgs, InnodbMode};
use crate::error::{Error, IoContext, Result};
use crate::format::layout::{BINLOG_INFO_NAME, INNODB_SQL_NAME, ROCKSDB_DIR, SLAVE_INFO_NAME};
use crate::format::logical::Logical;
use crate::format::manifest::{Kind, Manifest};
use crate::log::human;
use crate::pipeline::progress::Progress;
use crate::pipeline::{Item, Pipeline, Source};
use crate::server::credentials::{self, Credentials};
use crate::server::{BinlogPosition, ReplicaState, Server, ServerInfo};
use crate::{info, warn};
use aside::Aside;
use checkpoint::CheckpointArea;
use datadir::DatadirFile;
use wal::{WalFile, WalPins};

/// Name of the default checkpoint directory, beside the RocksDB data directory.
const DEFAULT_CHECKPOINT_DIR: &str = "#myrocks_hotbackup";

/// What the manifest records about a backup.
#[derive(Debug, Serialize, Deserialize)]
pub struct BackupInfo {
    pub server: ServerInfo,
    /// Seconds since the epoch.
    pub started: i64,
    pub finished: i64,
    /// None when the server's binary log is off.
    pub binlog: Option<BinlogPosition>,
    /// None when the server is not a replica and never was.
    #[serde(default)]
    pub replica: Option<ReplicaState>,
    /// How long commits were blocked (BACKUP STAGE BLOCK_COMMIT to END).
    pub commit_stall_ms: f64,
    /// How long DDL was blocked (BLOCK_DDL to END).
    pub ddl_block_ms: f64,
    pub rounds: Vec<RoundStats>,
    /// InnoDB tables of `mysql`, re-created empty at restore from their definitions.
    pub innodb_system_tables: Vec<String>,
    /// User InnoDB tables left out (with --skip-innodb-tables).
    pub skipped_innodb_tables: Vec<String>,
    /// User InnoDB tables read from the consistent snapshot (with --innodb=logical).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub innodb_logical: Option<Logical>,
    /// SSTs sent in earlier rounds that compaction removed before the final checkpoint:
    /// in the backup, but not part of the database (a restore leaves them behind).
    pub obsolete_sst: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundStats {
    pub round: u32,
    /// Bytes of SSTs the round's checkpoint held that were not yet sent.
    pub unsent_at_start: u64,
    pub sst_files: usize,
    pub bytes: u64,
    pub seconds: f64,
    /// True when the round sent every SST of its checkpoint.
    pub complete: bool,
}

/// Runs a backup through `pipeline`, and commits it.
pub fn run(
    args: &BackupArgs,
    pipeline: Pipeline,
    progress: &dyn Progress,
    cancel: Cancel,
) -> Result<Manifest<BackupInfo>> {
    let result = backup(args, pipeline, progress, cancel.clone());
    match (result, cancel.check()) {
        // A statement killed by the signal watcher fails with a server error: say why.
        (Err(e), Err(stop)) if !matches!(e, Error::Interrupted(_)) => {
            warn!("Stopped while: {e}");
            Err(stop)
        }
        (result, _) => result,
    }
}

fn backup(
    args: &BackupArgs,
    pipeline: Pipeline,
    progress: &dyn Progress,
    cancel: Cancel,
) -> Result<Manifest<BackupInfo>> {
    let started = crate::log::unix_now();
    info!("Starting backup.");
    let creds = credentials::resolve(&args.conn)?;
    let mut server = Server::connect(&creds)?;
    let _watcher = server.interrupt_on(&cancel, &creds)?;
    server.check_rocksdb()?;
    server.check_privileges()?;
    // The backup's own statements stay out of the general log (a log table it copies).
    server.exec("SET SESSION sql_log_off = 1")?;
    // Every statement the run needs, tried now rather than after hours of rounds.
    server.replica_state()?;
    let mut info = server.info()?;
    locate_datadir(args, &mut info)?;
    info!(
        "Server {} ({}), datadir {}, RocksDB data {}",
        info.version,
        info.hostname,
        info.datadir.display(),
        info.rocksdb_datadir.display()
    );

    let checkpoint_parent = match &args.checkpoint_dir {
        // The server resolves a relative path from its datadir, we from here: make it absolute.
        Some(dir) => std::path::absolute(dir).with_path("resolve", dir)?,
        None => info
            .rocksdb_datadir
            .parent()
            .unwrap_or(&info.datadir)
            .join(DEFAULT_CHECKPOINT_DIR),
    };
    let area = CheckpointArea::prepare(&checkpoint_parent, &info.rocksdb_datadir)?;
    let skip = [
        &*info.rocksdb_datadir,
        &*info.rocksdb_wal_dir,
        &*checkpoint_parent,
    ];
    // Fail now, not after hours of rounds, if InnoDB user tables make the backup impossible.
    let sel = datadir::select(&info.datadir, &skip, info.innodb)?;
    check_innodb(&sel.innodb_user_tables, args.innodb_mode())?;
    if args.innodb_mode() == InnodbMode::Logical && !sel.innodb_user_tables.is_empty() {
        // Read again under BLOCK_DDL; now to refuse what cannot be copied early.
        let plan = logical::plan(&mut server)?;
        plan.check_complete(
            &sel.innodb_user_tables,
            &sel.innodb_user_tables_with_triggers,
        )?;
        plan.preflight(&mut server)?;
    }
    for table in &sel.innodb_system_tables {
        server.create_table_sql("mysql", table)?;
    }
    datadir::aria_logs(&info.aria_log_dir)?;

    let mut job = Job {
        pipeline,
        sent_sst: HashMap::new(),
        progress,
        other_bytes: 0,
        cancel,
    };
    job.pipeline.begin()?;

    let rounds = job.catch_up(&mut server, &area, Duration::from_secs(args.interval))?;
    let sent_gb = job.sent_sst.values().sum::<u64>() as f64 / (1u64 << 30) as f64;
    info!(
        "Sent {sent_gb:6.2} GB of sst files, {} files in total.",
        job.sent_sst.len()
    );
    if let Some(signal_file) = &args.debug_signal_file {
        // The original's words, repeated each second, so the last line says it is waiting.
        while !signal_file.exists() {
            info!("Waiting until {} is created..", signal_file.display());
            job.cancel.sleep(Duration::from_secs(1))?;
        }
    }
    area.check_space()?;

    server.backup_stage("START", args.lock_wait_timeout)?;
    let aside = copy_logs_early(&area, &info)?;
    let consistent = job.consistent_point(&mut server, &creds, &area, &info, &skip, args, aside);
    // On error the stage is released below; a failed statement does not end it.
    if consistent.is_err() {
        server.release_stage();
    }
    let mut point = consistent?;
    info!(
        "Consistent point: commits were blocked for {:.1} ms, DDL for {:.1} ms; binary log {}",
        point.commit_stall_ms,
        point.ddl_block_ms,
        point.binlog.as_ref().map_or("is off".into(), |b| format!(
            "{}:{} (GTID {})",
            b.file, b.position, b.gtid_binlog_pos
        ))
    );

    // The InnoDB tables are read while the RocksDB files are sent.
    let reading = point.logical.take();
    let spool = match &reading {
        Some(_) => Some(area.scratch_dir("innodb")?),
        None => None,
    };
    let stop = AtomicBool::new(false);
    let (obsolete_sst, logical) = std::thread::scope(|s| -> Result<_> {
        let dump = reading.map(|(plan, snapshots)| {
            let (spool, area, stop) = (spool.as_deref().expect("made"), &area, &stop);
            s.spawn(move || snapshots.dump(plan, spool, &|| area.check_space(), stop))
        });
        let sent = job.send_final(&point, &area).and_then(|obsolete| {
            info!("Taking MySQL misc backups..");
            let aside_files = point.aside.files().into_iter();
            job.send_all(
                aside_files
                    .map(|f| Item::file(f.name, Kind::TableData, f.source))
                    .collect(),
            )?;
            info!("MySQL misc backups done.");
            Ok(obsolete)
        });
        if sent.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let dumped = dump
            .map(|d| d.join().expect("the InnoDB reader panicked"))
            .transpose();
        Ok((sent?, dumped?))
    })?;
    let logical = match logical {
        Some((logical, files)) => {
            job.send_logical(files)?;
            Some(logical)
        }
        None => None,
    };
    let mut extra: Vec<(&str, Vec<u8>)> = Vec::new();
    match &point.binlog {
        Some(b) => extra.push((
            BINLOG_INFO_NAME,
            format!("{}\t{}\t{}\n", b.file, b.position, b.gtid_binlog_pos).into_bytes(),
        )),
        None if point.replica.is_some() => info!(
            "The server's binary log is off: the backup records the replication position only"
        ),
        None => warn!("The server's binary log is off: the backup records no coordinates"),
    }
    if let Some(replica) = &point.replica {
        extra.push((SLAVE_INFO_NAME, slave_info(replica).into_bytes()));
    }
    if !point.innodb_sql.is_empty() {
        extra.push((INNODB_SQL_NAME, point.innodb_sql.clone().into_bytes()));
    }
    job.send_all(
        extra
            .into_iter()
            .map(|(name, bytes)| Item::bytes(name, Kind::Metadata, bytes))
            .collect(),
    )?;

    let backup = BackupInfo {
        server: info,
        started,
        finished: crate::log::unix_now(),
        binlog: point.binlog,
        replica: point.replica,
        commit_stall_ms: point.commit_stall_ms,
        ddl_block_ms: point.ddl_block_ms,
        rounds,
        innodb_system_tables: point.innodb_system_tables,
        skipped_innodb_tables: point.skipped_innodb_tables,
        innodb_logical: logical,
        obsolete_sst,
    };
    let manifest = job.pipeline.commit(backup)?;
    drop(area);
    Ok(manifest)
}

/// Before the consistent point: copies all but the tail of the logs the server writes until
/// commits are blocked (the Aria log, the CSV log tables), so that only their tails are
/// copied while commits are blocked, and DDL is not held back by a long copy either.
fn copy_logs_early(area: &CheckpointArea, info: &ServerInfo) -> Result<Aside> {
    let mut aside = Aside::new(area.scratch_dir("aside")?);
    let mut growing: Vec<DatadirFile> = datadir::aria_logs(&info.aria_log_dir)?
        .into_iter()
        .filter(|f| f.name != "aria_log_control")
        .collect();
    for table in ["general_log", "slow_log"] {
        let name = format!("mysql/{table}.CSV");
        let source = info.datadir.join(&name);
        if source.is_file() {
            growing.push(DatadirFile { source, name });
        }
    }
    let sizes = growing.iter().filter_map(|f| fs::metadata(&f.source).ok());
    area.check_space_for(sizes.map(|md| md.len()).sum())?;
    let mut early = 0;
    for f in &growing {
        early += aside.copy_early(f)?;
    }
    info!(
        "Copied {} of the Aria log and log tables aside; their tails follow while commits are blocked",
        human(early)
    );
    Ok(aside)
}

/// mariabackup's `xtrabackup_slave_info`: the statements that make a copy of a replica
/// resume from where the replica stood (the connection's host and user are the DBA's).
fn slave_info(replica: &ReplicaState) -> String {
    let mut text = String::new();
    let uses_gtid = replica
        .connections
        .iter()
        .all(|c| !c.using_gtid.eq_ignore_ascii_case("No"));
    if !replica.gtid_slave_pos.is_empty() && uses_gtid {
        text.push_str(&format!(
            "SET GLOBAL gtid_slave_pos = '{}';\n",
            replica.gtid_slave_pos
        ));
    }
    for c in &replica.connections {
        let name = match c.name.as_str() {
            "" => String::new(),
            n => format!(" '{}'", n.replace('\'', "''")),
        };
        if uses_gtid && !replica.gtid_slave_pos.is_empty() {
            text.push_str(&format!(
                "CHANGE MASTER{name} TO master_use_gtid = slave_pos;\n"
            ));
        } else {
            text.push_str(&format!(
                "CHANGE MASTER{name} TO MASTER_LOG_FILE='{}', MASTER_LOG_POS={};\n",
                c.relay_master_log_file, c.exec_master_log_pos
            ));
        }
    }
    text
}

/// Statements that put the rows of `mysql.gtid_slave_pos` back, from `@@gtid_slave_pos`
/// (`domain-server-seq` per domain): the restored server then has the same position.
fn gtid_slave_pos_rows(gtid_slave_pos: &str) -> Result<String> {
    let mut sql = String::new();
    for (sub_id, gtid) in gtid_slave_pos
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .enumerate()
    {
        let parts: Vec<u64> = gtid
            .split('-')
            .map(|n| n.parse::<u64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                Error::Server(format!("unexpected @@gtid_slave_pos {gtid_slave_pos:?}"))
            })?;
        let [domain, server, seq] = parts[..] else {
            return Err(Error::Server(format!(
                "unexpected @@gtid_slave_pos {gtid_slave_pos:?}"
            )));
        };
        sql.push_str(&format!(
            "INSERT INTO gtid_slave_pos (domain_id, sub_id, server_id, seq_no) VALUES ({domain}, {}, {server}, {seq});\n",
            sub_id + 1
        ));
    }
    Ok(sql)
}

/// Makes sure the server's files are the ones on this host, and applies `--datadir`.
fn locate_datadir(args: &BackupArgs, info: &mut ServerInfo) -> Result<()> {
    match &args.datadir {
        // Only the table files are read from there; checkpoints stay the server's paths.
        Some(local) => info.datadir = local.clone(),
        None => {
            let here = crate::sys::hostname();
            if !here.is_empty() && here != info.hostname {
                return Err(Error::Refused(format!(
                    "the server runs on host {:?} and this is {here:?}: run the backup on the database host \
                     (checkpoints are created by the server, next to its data)",
                    info.hostname
                )));
            }
        }
    }
    if !info.rocksdb_datadir.join("CURRENT").is_file() {
        return Err(Error::Refused(format!(
            "the server's RocksDB data directory {} is not readable here: run the backup on the database host, \
             as root or the server's user",
            info.rocksdb_datadir.display()
        )));
    }
    Ok(())
}

fn check_innodb(user_tables: &[String], mode: InnodbMode) -> Result<()> {
    if user_tables.is_empty() || mode != InnodbMode::Refuse {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "these tables use InnoDB (--innodb=refuse): {}. Convert them to RocksDB, pass \
         --innodb=logical to copy their rows from the consistent point, or --skip-innodb-tables \
         to leave them out (the manifest then lists them)",
        user_tables.join(", ")
    )))
}

/// What the consistent point produced.
struct ConsistentPoint {
    checkpoint: PathBuf,
    /// The WAL files up to the consistent point (from the checkpoint or pinned live ones).
    wal: Vec<WalFile>,
    /// The Aria log and the statistics and log tables, as they were under the block.
    aside: Aside,
    binlog: Option<BinlogPosition>,
    replica: Option<ReplicaState>,
    commit_stall_ms: f64,
    ddl_block_ms: f64,
    innodb_sql: String,
    innodb_system_tables: Vec<String>,
    skipped_innodb_tables: Vec<String>,
    /// The InnoDB user tables to read, and the connections holding their snapshots.
    logical: Option<(logical::Plan, logical::Snapshots)>,
}

/// The state of one backup run.
struct Job<'a> {
    pipeline: Pipeline<'a>,
    /// SSTs already in the backup, by name, with their size.
    sent_sst: HashMap<String, u64>,
    progress: &'a dyn Progress,
    /// Bytes of files other than SSTs expected (for the progress total).
    other_bytes: u64,
    cancel: Cancel,
}

impl Job<'_> {
    fn send_all(&mut self, items: Vec<Item>) -> Result<()> {
        let left = self.pipeline.send(items, None)?;
        debug_assert!(left.is_empty(), "no deadline, nothing left");
        Ok(())
    }

    /// Sends SSTs of a checkpoint (removing each hard link once the sink holds the file);
    /// those not started by `deadline` are left. Returns the bytes sent.
    fn send_ssts(
        &mut self,
        area: &CheckpointArea,
        dir: &Path,
        ssts: &[(String, u64)],
        deadline: Option<Instant>,
    ) -> Result<(usize, u64)> {
        let items = ssts
            .iter()
            .map(|(name, _)| Item {
                name: format!("{ROCKSDB_DIR}/{name}"),
                kind: Kind::Sst,
                source: Source::File {
                    path: dir.join(name),
                    len: None,
                    unlink: true,
                },
            })
            .collect();
        // The checkpoint pins what compaction deletes: free space is checked after each file.
        let left: HashSet<String> = self
            .pipeline
            .send_checked(items, deadline, &|| area.check_space())?
            .into_iter()
            .map(|item| item.name)
            .collect();
        let (mut files, mut bytes) = (0, 0);
        for (name, size) in ssts {
            if !left.contains(&format!("{ROCKSDB_DIR}/{name}")) {
                self.sent_sst.insert(name.clone(), *size);
                files += 1;
                bytes += size;
            }
        }
        Ok((files, bytes))
    }

    /// Sends the InnoDB tables' data files (each removed once sent).
    fn send_logical(&mut self, files: Vec<(String, PathBuf)>) -> Result<()> {
        let sizes = files.iter().filter_map(|(_, p)| fs::metadata(p).ok());
        self.other_bytes += sizes.map(|md| md.len()).sum::<u64>();
        self.set_total(0);
        let items = files.into_iter().map(|(name, path)| Item {
            name,
            kind: Kind::Logical,
            source: Source::File {
                path,
                len: None,
                unlink: true,
            },
        });
        self.send_all(items.collect())
    }

    /// Tells the progress display what the whole backup will read, as known now.
    fn set_total(&self, unsent: u64) {
        let sent: u64 = self.sent_sst.values().sum();
        self.progress.set_total(sent + unsent + self.other_bytes);
    }

    /// SSTs of a checkpoint listing not yet sent (a file's name and size identify it).
    fn unsent_ssts(&self, listing: &[(String, u64)]) -> Vec<(String, u64)> {
        listing
            .iter()
            .filter(|(name, size)| name.ends_with(".sst") && self.sent_sst.get(name) != Some(size))
            .cloned()
            .collect()
    }

    /// Sends SSTs through renewed checkpoints until one round sends all of its checkpoint.
    fn catch_up(
        &mut self,
        server: &mut Server,
        area: &CheckpointArea,
        interval: Duration,
    ) -> Result<Vec<RoundStats>> {
        let mut rounds: Vec<RoundStats> = Vec::new();
        let mut behind_in_a_row = 0;
        for round in 1.. {
            self.cancel.check()?;
            let dir = area.checkpoint_path(&format!("round-{round}"));
            let start = Instant::now();
            info!("Starting backup round {round}");
            info!("Creating checkpoint at {}", dir.display());
            server.create_checkpoint(&dir)?;
            info!("Created checkpoint at {}", dir.display());
            if !dir.is_dir() {
                return Err(Error::Refused(format!(
                    "the server created checkpoint {} but it is not visible here: run the backup on the database host",
                    dir.display()
                )));
            }
            let ssts = self.unsent_ssts(&list_checkpoint(&dir)?);
            let unsent: u64 = ssts.iter().map(|(_, size)| size).sum();
            info!(
                "Starting backup from snapshot: target files {} ({} not yet sent)",
                ssts.len(),
                human(unsent)
            );
            // A round fell behind when the backlog fell by less than half of what the round
            // before sent. Two in a row: new writes and compaction keep pace with the copy,
            // more rounds would not catch up, and the final checkpoint takes the rest.
            if let Some(prev) = rounds.last() {
                let fell_behind = unsent + prev.bytes / 2 > prev.unsent_at_start;
                behind_in_a_row = if fell_behind { behind_in_a_row + 1 } else { 0 };
            }
            if behind_in_a_row == 2 {
                info!("Round {round}: not catching up with compaction; taking the consistent point now");
                fs::remove_dir_all(&dir).with_path("remove checkpoint", &dir)?;
                break;
            }
            self.set_total(unsent);
            area.check_space()?;
            let (files, bytes) = self.send_ssts(area, &dir, &ssts, Some(start + interval))?;
            fs::remove_dir_all(&dir).with_path("remove checkpoint", &dir)?;
            info!("Cleaned up checkpoint from {}", dir.display());
            let stats = RoundStats {
                round,
                unsent_at_start: unsent,
                sst_files: files,
                bytes,
                seconds: start.elapsed().as_secs_f64(),
                complete: files == ssts.len(),
            };
            info!(
                "Snapshot round finished. Elapsed Time: {:5.2}. Remaining sst files: {} (round {round} sent {files} SST files, {})",
                stats.seconds,
                ssts.len() - files,
                human(bytes),
            );
            rounds.push(stats);
            if files == ssts.len() {
                break;
            }
        }
        Ok(rounds)
    }

    /// BACKUP STAGE from FLUSH to END (START already taken). The caller ends the stage on error.
    #[allow(clippy::too_many_arguments)]
    fn consistent_point(
        &mut self,
        server: &mut Server,
        creds: &Credentials,
        area: &CheckpointArea,
        info: &ServerInfo,
        skip: &[&Path],
        args: &BackupArgs,
        mut aside: Aside,
    ) -> Result<ConsistentPoint> {
        let timeout = args.lock_wait_timeout;
        server.backup_stage("FLUSH", timeout)?;
        // Timers start before the statement: DDL (then commits) are blocked while it waits.
        let ddl_blocked = Instant::now();
        server.backup_stage("BLOCK_DDL", timeout)?;
        let sel = datadir::select(&info.datadir, skip, info.innodb)?;
        let mode = args.innodb_mode();
        check_innodb(&sel.innodb_user_tables, mode)?;
        let mut logical = match mode {
            InnodbMode::Logical if !sel.innodb_user_tables.is_empty() => {
                let plan = logical::plan(server)?;
                plan.check_complete(
                    &sel.innodb_user_tables,
                    &sel.innodb_user_tables_with_triggers,
                )?;
                let view_table = sel
                    .innodb_system_tables
                    .iter()
                    .find(|t| *t == "innodb_table_stats");
                let snapshots = logical::Snapshots::connect(
                    creds,
                    plan.len(),
                    view_table.map(String::as_str),
                    args.lock_wait_timeout,
                    &self.cancel,
                )?;
                Some((plan, snapshots))
            }
            _ => None,
        };
        let mut innodb_sql = String::new();
        for table in &sel.innodb_system_tables {
            innodb_sql.push_str(&format!("{};\n", server.create_table_sql("mysql", table)?));
        }
        let schema = sel
            .schema
            .iter()
            .map(|f| Item::file(&f.name, Kind::TableDef, &f.source));
        let data = sel
            .table_data
            .iter()
            .map(|f| Item::file(&f.name, Kind::TableData, &f.source));
        self.send_all(schema.chain(data).collect())?;
        info!(
            "Sent {} table definition and {} table data files",
            sel.schema.len(),
            sel.table_data.len()
        );
        // The statistics and log tables: copied under the block (the logs' early parts
        // already are), where they need room on the server's filesystem.
        let needed: u64 = sel
            .late_table_data
            .iter()
            .filter_map(|f| fs::metadata(&f.source).ok())
            .map(|md| md.len())
            .sum();
        area.check_space_for(needed)?;
        self.cancel.check()?;
        // The final checkpoint, before commits are blocked: under the block only the
        // WAL's end is recorded (see `wal`), so the stall does not grow with the SSTs.
        let checkpoint = area.checkpoint_path("final");
        let step = Instant::now();
        server.create_checkpoint(&checkpoint)?;
        let pin_dir = area.scratch_dir("wal")?;
        let pins = WalPins::pin(info, &checkpoint, pin_dir.clone())?;
        info!(
            "Created the final checkpoint at {} in {:.1} ms",
            checkpoint.display(),
            step.elapsed().as_secs_f64() * 1e3
        );

        let early = area.checkpoint_path("final-early");
        let commits_blocked = Instant::now();
        server.backup_stage("BLOCK_COMMIT", timeout.min(10))?;
        let mut steps = vec![("waiting for commits in flight", commits_blocked.elapsed())];
        let blocked = (|| -> Result<_> {
            // First what the server flushed and closed for the block: the log tables.
            let step = Instant::now();
            let mut late = datadir::aria_logs(&info.aria_log_dir)?;
            late.extend(sel.late_table_data.iter().cloned());
            aside.copy_under_block(&late)?;
            steps.push(("Aria log, statistics and log tables", step.elapsed()));
            let step = Instant::now();
            let fallback = match pins {
                Ok(mut pins) => {
                    match pins.record_under_block(&info.rocksdb_datadir, &checkpoint)? {
                        None => Ok(pins),
                        Some(why) => Err(why),
                    }
                }
                Err(why) => Err(why),
            };
            steps.push(("WAL sizes", step.elapsed()));
            let pins = match fallback {
                Ok(pins) => Some(pins),
                Err(why) => {
                    let step = Instant::now();
                    // Set aside (a rename), removed once commits flow again.
                    fs::rename(&checkpoint, &early).with_path("rename", &checkpoint)?;
                    server.create_checkpoint(&checkpoint)?;
                    steps.push(("checkpoint again", step.elapsed()));
                    info!("Took the final checkpoint again while commits were blocked: {why}");
                    None
                }
            };
            let step = Instant::now();
            let binlog = server.binlog_position()?;
            let replica = server.replica_state()?;
            steps.push(("coordinates", step.elapsed()));
            if let Some((_, snapshots)) = &mut logical {
                let step = Instant::now();
                snapshots.start()?;
                steps.push(("InnoDB snapshots", step.elapsed()));
            }
            Ok((binlog, replica, pins))
        })();
        server.backup_stage("END", timeout)?;
        let commit_stall_ms = commits_blocked.elapsed().as_secs_f64() * 1e3;
        let parts: Vec<String> = steps
            .iter()
            .map(|(what, d)| format!("{what} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect();
        info!(
            "Commits blocked for {commit_stall_ms:.1} ms: {}",
            parts.join(", ")
        );
        let ddl_block_ms = ddl_blocked.elapsed().as_secs_f64() * 1e3;
        if early.exists() {
            // The early checkpoint and its WAL pins are not needed after all.
            fs::remove_dir_all(&early).with_path("remove checkpoint", &early)?;
            fs::remove_dir_all(&pin_dir).with_path("remove", &pin_dir)?;
        }
        let (binlog, replica, pins) = blocked?;
        aside.finish()?;
        let wal = match pins {
            Some(pins) => pins.files(),
            None => WalPins::checkpoint_files(&checkpoint)?,
        };
        // The rows go where the restore re-creates the table; a server without InnoDB has
        // none, and its position is in the slave info only.
        let has_table = sel
            .innodb_system_tables
            .iter()
            .any(|t| t == "gtid_slave_pos");
        if let (true, Some(r)) = (has_table, &replica) {
            innodb_sql.push_str(&gtid_slave_pos_rows(&r.gtid_slave_pos)?);
        }
        Ok(ConsistentPoint {
            checkpoint,
            wal,
            aside,
            binlog,
            replica,
            commit_stall_ms,
            ddl_block_ms,
            innodb_sql,
            innodb_system_tables: sel.innodb_system_tables,
            skipped_innodb_tables: match mode {
                InnodbMode::Skip => sel.innodb_user_tables,
                _ => Vec::new(),
            },
            logical,
        })
    }

    /// Sends the final checkpoint (new SSTs, then WAL, OPTIONS, MANIFEST, CURRENT), removing
    /// each file once sent. Returns the SSTs sent earlier that the final checkpoint no longer
    /// holds: it links every live SST, so those are obsolete.
    fn send_final(
        &mut self,
        point: &ConsistentPoint,
        area: &CheckpointArea,
    ) -> Result<Vec<String>> {
        let dir = &point.checkpoint;
        let listing = list_checkpoint(dir)?;
        let ssts = self.unsent_ssts(&listing);
        info!("Final checkpoint: {} new SST files", ssts.len());
        let wal_bytes: u64 = point.wal.iter().map(|w| w.size).sum();
        let rest_bytes: u64 = listing
            .iter()
            .filter(|(n, _)| !n.ends_with(".sst") && !n.ends_with(".log"))
            .map(|(_, size)| size)
            .sum();
        self.other_bytes += wal_bytes + rest_bytes;
        self.set_total(ssts.iter().map(|(_, size)| size).sum());
        area.check_space()?;
        self.send_ssts(area, dir, &ssts, None)?;
        let live: HashSet<&String> = listing.iter().map(|(name, _)| name).collect();
        let mut obsolete: Vec<String> = self
            .sent_sst
            .keys()
            .filter(|n| !live.contains(n))
            .cloned()
            .collect();
        obsolete.sort();
        info!("Backup WAL..");
        let wal = point.wal.iter().map(|w| Item {
            name: format!("{ROCKSDB_DIR}/{}", w.name),
            kind: Kind::Wal,
            source: Source::File {
                path: w.source.clone(),
                len: Some(w.size),
                unlink: false,
            },
        });
        self.send_all(wal.collect())?;
        let rest = listing
            .iter()
            .map(|(name, _)| name)
            .filter(|n| !n.ends_with(".sst") && !n.ends_with(".log"));
        // CURRENT last: it names the MANIFEST, which must be complete before it.
        let (current, rest): (Vec<&String>, Vec<&String>) = rest.partition(|n| *n == "CURRENT");
        info!("Backup Manifest..");
        for batch in [rest, current] {
            let items = batch.into_iter().map(|name| {
                Item::file(
                    format!("{ROCKSDB_DIR}/{name}"),
                    Kind::RocksdbMeta,
                    dir.join(name),
                )
            });
            self.send_all(items.collect())?;
        }
        fs::remove_dir_all(dir).with_path("remove checkpoint", dir)?;
        info!("Cleaned up checkpoint from {}", dir.display());
        info!("RocksDB Backup Done.");
        Ok(obsolete)
    }
}

/// Every file of a checkpoint with its size, by name (SSTs therefore oldest first).
fn list_checkpoint(dir: &Path) -> Result<Vec<(String, u64)>> {
    if !fs::symlink_metadata(dir).with_path("stat", dir)?.is_dir() {
        return Err(Error::Refused(format!(
            "checkpoint {} is not a directory (replaced by a link?)",
            dir.display()
        )));
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_path("list", dir)? {
        let entry = entry.with_path("list", dir)?;
        let size = entry.metadata().with_path("stat", &entry.path())?.len();
        files.push((entry.file_name().to_string_lossy().into_owned(), size));
    }
    files.sort();
    Ok(files)
}
