//! The command line: the subcommands and their flags, plus the original `myrocks_hotbackup`
//! invocation (no subcommand, `--snake_case` flags; see [`legacy`]), which is mapped onto
//! them so that existing scripts keep working. Every `--long_flag` may also be spelled
//! `--long-flag` and vice versa.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

mod legacy;

use crate::format::Format;
use crate::pipeline::Compression;
use legacy::LegacyArgs;

const EXAMPLES: &str = "\
Examples:
  Back up a local server over its socket into a compressed file:
    set -o pipefail
    myrocks-hotbackup backup --socket /run/mysqld/mysqld.sock --stream xbstream | zstd > backup.xb.zst

  Stream a backup to another host and unpack it there (no mbstream or tar needed there):
    myrocks-hotbackup backup --stream tar | ssh backup-host myrocks-hotbackup extract -C /backups/today

  Back up into a directory, compressed, four files at a time, at most 200 MiB/s:
    myrocks-hotbackup backup --target-dir /backups/today --compress --parallel 4 --avg-mbytes-per-sec 200

  Check a backup against its manifest, and see what it holds:
    myrocks-hotbackup verify /backups/today && myrocks-hotbackup info /backups/today

  Send a backup over the network: start a receiver on the other host, which prints its
  URL once, and give the URL to the backup through a file (it holds a secret):
    db2$ (umask 077; myrocks-hotbackup receive --target-dir /backups/today > /tmp/url)
    db1$ myrocks-hotbackup backup --to @/tmp/url        (or: ssh db2 cat /tmp/url | ... --to -)

  Copy this server onto another host over ssh, restored and ready to start as a replica:
    myrocks-hotbackup clone --to-host db2 --datadir /var/lib/mysql

  Restore into an empty datadir, then start the server on it:
    myrocks-hotbackup move-back --backup-dir /backups/today --datadir /var/lib/mysql

The original tool's flags work unchanged, without a subcommand:
    myrocks-hotbackup --user=root --stream=xbstream --checkpoint_dir=/data/snap > backup.xb
    myrocks-hotbackup --stream=wdt --destination=db2 --backup_dir=/backups/today
    myrocks-hotbackup --move_back --datadir=D --rocksdb_datadir=D/#rocksdb --rocksdb_waldir=D/#rocksdb --backup_dir=B

Credentials are read as the MySQL client tools read them: --password, MYSQL_PWD, then the
[client] group of option files (--defaults-file, --defaults-extra-file, ~/.my.cnf).

Exit codes: 0 success, 1 failure, 2 bad usage, 3 corrupt, incomplete or unsafe backup,
130 interrupted.";

#[derive(Parser, Debug)]
#[command(
    name = "myrocks-hotbackup",
    version,
    about = "Hot backup and restore for MyRocks (MariaDB with the RocksDB storage engine)",
    long_about = "Hot backup and restore for MyRocks (MariaDB with the RocksDB storage engine).\n\n\
        `backup` copies a live server's RocksDB data through short-lived checkpoints, plus its \
        schema and non-RocksDB files, at one consistent point in time whose binary log \
        coordinates it records, and writes one tar or xbstream archive to stdout or a \
        directory tree.",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Back up a running server into a stream on stdout or a directory; progress on stderr
    #[command(disable_help_flag = true)]
    Backup(BackupArgs),
    /// Check every file of a backup (a directory or a stream) against its manifest
    Verify(VerifyArgs),
    /// Say what a backup holds: versions, times, coordinates, files and bytes per kind
    Info(InfoArgs),
    /// Move an extracted backup into empty data directories (the backup directory is emptied)
    MoveBack(RestoreArgs),
    /// Copy an extracted backup into empty data directories (the backup is kept)
    CopyBack(RestoreArgs),
    /// Unpack a tar or xbstream stream into a directory, verifying it as it goes
    Extract(ExtractArgs),
    /// Receive a backup sent over the network (`backup --to`) into a directory; prints the
    /// URL to send to, once, on stdout
    Receive(ReceiveArgs),
    /// Copy this server onto another host over ssh, restored and ready to start as a replica
    #[command(disable_help_flag = true)]
    Clone(CloneArgs),
    /// Manage a repository of incremental backups (`repo init`)
    #[command(subcommand)]
    Repo(RepoCommand),
    /// List the snapshots of a repository
    Snapshots(SnapshotsArgs),
    /// Restore a snapshot of a repository into empty data directories
    Restore(RepoRestoreArgs),
    /// Remove snapshots from a repository by a keep policy (their data goes at the next prune)
    Forget(ForgetArgs),
    /// Delete the data of a repository that no snapshot uses, safely while backups run
    Prune(PruneArgs),
    /// Archive binary logs continuously, and list or verify an archive (`binlog archive`)
    #[command(subcommand)]
    Binlog(BinlogCommand),
}

#[derive(Subcommand, Debug)]
pub enum BinlogCommand {
    /// Archive the server's binary logs as a replica, until stopped (SIGTERM, SIGINT)
    #[command(disable_help_flag = true)]
    Archive(Box<BinlogArchiveArgs>),
    /// Show the archived ranges (files, GTIDs, times) and any gap
    List(BinlogListArgs),
    /// Check every event of an archive and its continuity, and that backups fall inside it
    Verify(BinlogVerifyArgs),
}

#[derive(Args, Debug)]
pub struct BinlogArchiveArgs {
    #[command(flatten)]
    pub conn: ConnectionArgs,
    /// The archive directory (created if absent; an archive there is continued)
    #[arg(long, value_name = "DIR", required_unless_present = "repo")]
    pub target_dir: Option<PathBuf>,
    /// Archive into a repository (`repo init`) instead, through a local --spool-dir
    #[arg(
        long,
        value_name = "URL",
        conflicts_with = "target_dir",
        requires = "spool_dir"
    )]
    pub repo: Option<String>,
    /// The repository's key file
    #[arg(long, value_name = "FILE", requires = "repo")]
    pub key_file: Option<PathBuf>,
    /// With --repo: where the archiver writes first (a directory archive); files leave it
    /// once uploaded. Keep it on a disk with room for what the store may lag behind
    #[arg(long, value_name = "DIR", requires = "repo")]
    pub spool_dir: Option<PathBuf>,
    /// With --repo: seconds between uploads (the repository's lag behind the spool)
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    pub upload_interval: f64,
    /// Copy the closed binary logs from the server's directory (or its BASENAME.index)
    /// instead of connecting as a replica; the open file waits until the server closes it
    #[arg(long, value_name = "PATH")]
    pub from_datadir: Option<PathBuf>,
    /// With --from-datadir: seconds between looks at the directory
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub poll: f64,
    /// The server id the archiver registers with; unique among the server's replicas
    /// [default: derived from the archive directory, 4026531840 and up]
    #[arg(long, value_name = "ID")]
    pub server_id: Option<u32>,
    /// Seconds between heartbeats of an idle server; three missed mean a dead link
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    pub heartbeat: f64,
    /// Where an empty archive starts [default: the oldest binary log the server has]
    #[arg(long, value_name = "FILE")]
    pub start_file: Option<String>,
    /// Print help
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
}

/// Where an archive of binary logs is: a directory, or a repository.
#[derive(Args, Debug, Clone)]
pub struct ArchiveArgs {
    /// The archive directory
    #[arg(long, value_name = "DIR", required_unless_present = "repo")]
    pub target_dir: Option<PathBuf>,
    /// The binary logs archived in a repository instead
    #[arg(long, value_name = "URL", conflicts_with = "target_dir")]
    pub repo: Option<String>,
    /// The repository's key file
    #[arg(long, value_name = "FILE", requires = "repo")]
    pub key_file: Option<PathBuf>,
    /// The server (its host name) whose binary logs [default: the only one archived]
    #[arg(long, value_name = "HOST", requires = "repo")]
    pub host: Option<String>,
}

#[derive(Args, Debug)]
pub struct BinlogListArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// Print as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BinlogVerifyArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// A backup whose binary log coordinates must fall inside the archive (repeatable)
    #[arg(long, value_name = "DIR")]
    pub backup_dir: Vec<PathBuf>,
    /// Print the result as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum RepoCommand {
    /// Create a repository: encrypted with a key file, or --no-encryption
    Init(RepoInitArgs),
}

/// Which repository, and its key.
#[derive(Args, Debug, Clone)]
pub struct RepoArgs {
    /// The repository: s3://BUCKET/PREFIX (settings from AWS_ENDPOINT_URL, AWS_REGION,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or the [myrocks-hotbackup] option group:
    /// s3-endpoint, s3-region, s3-access-key-id, s3-secret-access-key), or a directory
    #[arg(long, value_name = "URL")]
    pub repo: String,
    /// The repository's key file (64 hex digits); never give a key on the command line
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RepoInitArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Store objects unencrypted (names still reveal nothing about tables)
    #[arg(long)]
    pub no_encryption: bool,
}

#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Only the snapshots of this host (or source)
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// Print as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RepoRestoreArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The snapshot to restore: its id (a unique prefix will do) or `latest`
    #[arg(long, value_name = "ID|latest", default_value = "latest")]
    pub snapshot: String,
    /// Of this host (or source) only: `--snapshot latest --host db7` in a fleet's repository
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// Target datadir: must be empty or absent
    #[arg(short = 'd', long, value_name = "DIR")]
    pub datadir: PathBuf,
    /// Target for RocksDB data files [default: DATADIR/#rocksdb]
    #[arg(short = 'r', long, value_name = "DIR")]
    pub rocksdb_datadir: Option<PathBuf>,
    /// Target for RocksDB WAL files [default: the RocksDB data directory]
    #[arg(short = 'w', long, value_name = "DIR")]
    pub rocksdb_waldir: Option<PathBuf>,
    /// Where the files are downloaded to before they move into place; on the datadir's
    /// filesystem [default: .DATADIR.restoring-ID beside the datadir]
    #[arg(long, value_name = "DIR")]
    pub staging_dir: Option<PathBuf>,
    /// Files downloaded at once
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: Option<u16>,
    /// The server's option file, for re-creating the mysql schema's InnoDB tables
    #[arg(long, value_name = "FILE")]
    pub defaults_file: Option<PathBuf>,
    /// The server binary that re-creates the mysql schema's InnoDB tables
    #[arg(long, value_name = "PATH")]
    pub mariadbd: Option<PathBuf>,
    /// Restore the files only (on a host without mariadbd)
    #[arg(long)]
    pub skip_bootstrap: bool,
    /// Then replay the repository's archived binary logs up to this point; with
    /// `--snapshot latest`, the newest snapshot before the point is restored
    #[command(flatten)]
    pub until: UntilArgs,
    /// Parallel appliers of the replay (MariaDB's slave_parallel_threads, conservative
    /// mode) [default: 0, the replication thread applies itself: the fastest measured]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=64))]
    pub replay_threads: Option<u16>,
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Keep the newest N snapshots (of each server backed up)
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Keep the newest snapshot of each of the last N days that have one
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<usize>,
    /// Keep the newest snapshot of each of the last N weeks that have one
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<usize>,
    /// Keep the newest snapshot of each of the last N months that have one
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<usize>,
    /// Only the snapshots of this host (or of this source, as `snapshots --json` shows it)
    /// [default: every server, each by the policy]
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// Prune afterwards
    #[arg(long)]
    pub prune: bool,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
}

/// How to reach the server. Values not given here come from MYSQL_PWD and option files.
#[derive(Args, Clone, Default)]
pub struct ConnectionArgs {
    /// Server host, reached over TCP [default: the local socket]
    #[arg(short = 'h', long)]
    pub host: Option<String>,
    /// TCP port [default: 3306]
    #[arg(short = 'P', long)]
    pub port: Option<u16>,
    /// Unix socket of the server
    #[arg(short = 'S', long)]
    pub socket: Option<PathBuf>,
    /// User name [default: your login name]
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Password; with no value, asked for on the terminal. Prefer an option file or
    /// MYSQL_PWD: a password on the command line is scrubbed, but visible for a moment
    #[arg(short = 'p', long, value_name = "PASSWORD", num_args = 0..=1)]
    pub password: Option<Option<String>>,
    /// Read options only from this file
    #[arg(long, value_name = "FILE")]
    pub defaults_file: Option<PathBuf>,
    /// Read this option file after the usual ones
    #[arg(long, value_name = "FILE")]
    pub defaults_extra_file: Option<PathBuf>,
    /// Read no option files
    #[arg(long)]
    pub no_defaults: bool,
}

impl fmt::Debug for ConnectionArgs {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("ConnectionArgs")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("socket", &self.socket)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("defaults_file", &self.defaults_file)
            .field("defaults_extra_file", &self.defaults_extra_file)
            .field("no_defaults", &self.no_defaults)
            .finish()
    }
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub conn: ConnectionArgs,
    /// Archive format written to stdout [default: tar]
    #[arg(short = 's', long, value_enum, conflicts_with_all = ["target_dir", "to"])]
    pub stream: Option<Format>,
    /// Write the backup as a directory tree into DIR (new, or empty) instead of to stdout
    #[arg(short = 't', long, value_name = "DIR", conflicts_with = "to")]
    pub target_dir: Option<PathBuf>,
    /// Send the backup to a receiver (`myrocks-hotbackup receive`), its URL read from FILE
    /// (`@FILE`) or from standard input (`-`). The URL holds a secret: never pass it here
    #[arg(long, value_name = "@FILE|-")]
    pub to: Option<To>,
    /// Back up into a repository (`repo init`): s3://BUCKET/PREFIX or a directory. Only the
    /// SSTs it does not hold yet are read; prints the snapshot id on stdout
    #[arg(long, value_name = "URL", conflicts_with_all = ["target_dir", "to", "stream"])]
    pub repo: Option<String>,
    /// The repository's key file
    #[arg(long, value_name = "FILE", requires = "repo")]
    pub key_file: Option<PathBuf>,
    /// Connections to the receiver [default: as many as the receiver asks for, 8]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: Option<u16>,
    /// A receiver to start over ssh and send to (`--stream=wdt`, `clone`).
    #[arg(skip)]
    pub via_ssh: Option<SshReceiver>,
    /// Files read and written at once [default: the number of CPUs, from 2 to 8]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: Option<u16>,
    /// Compress every file with zstd (level 1 to 22, or negative for speed; default 3); files
    /// get a .zst suffix.
    /// Needs --target-dir, --to, --repo (where it is the default) or --stream xbstream
    #[arg(long, value_name = "zstd[:LEVEL]", num_args = 0..=1, default_missing_value = "zstd")]
    pub compress: Option<Compression>,
    /// Compression workers [default: the number of CPUs]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub compress_threads: Option<u16>,
    /// Cap the rate at which the backup reads files, in MiB per second
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub avg_mbytes_per_sec: Option<u64>,
    /// How to show progress: a bar when stderr is a terminal, else log lines every 10 s
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Write a summary of the finished backup as JSON into FILE, for monitoring
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Where the temporary checkpoints go; must be on the RocksDB data's filesystem
    /// [default: #myrocks_hotbackup beside the RocksDB data directory]
    #[arg(short = 'c', long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Seconds after which a checkpoint is renewed, so it never pins deleted SST files for long
    #[arg(short = 'i', long, value_name = "SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub interval: u64,
    /// Where to read the datadir's table files, if not at the path the server reports
    #[arg(short = 'd', long, value_name = "DIR")]
    pub datadir: Option<PathBuf>,
    /// Seconds BACKUP STAGE may wait for running statements (a long ALTER, say) before the
    /// backup gives up; while commits are being blocked, at most 10
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub lock_wait_timeout: u64,
    /// InnoDB user tables: read them from the consistent point into the backup (logical),
    /// refuse to back the server up (refuse), or leave them out, listed in the manifest (skip)
    #[arg(long, value_enum, value_name = "MODE", default_value = "logical")]
    pub innodb: InnodbMode,
    /// The same as --innodb=skip
    #[arg(long, conflicts_with = "innodb")]
    pub skip_innodb_tables: bool,
    /// Accepted for compatibility; BACKUP STAGE BLOCK_DDL already keeps .frm files consistent
    #[arg(short = 'f', long)]
    pub skip_check_frm_timestamp: bool,
    /// Testing aid: before the consistent point, wait until this file exists
    #[arg(short = 'D', long, value_name = "FILE")]
    pub debug_signal_file: Option<PathBuf>,
    /// Print help
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
}

/// Where `--to` finds the receiver's URL (`@FILE`, `-`, or, discouraged, the URL itself,
/// which `Debug` never shows).
#[derive(Clone)]
pub struct To(pub String);

impl std::str::FromStr for To {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<To, Self::Err> {
        Ok(To(s.to_string()))
    }
}

impl fmt::Debug for To {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0.contains("token=") {
            true => f.write_str("To(<a URL, hidden>)"),
            false => write!(f, "To({:?})", self.0),
        }
    }
}

/// A receiver started on `host` over ssh with `receive ARGS`.
#[derive(Debug, Clone, Default)]
pub struct SshReceiver {
    pub host: String,
    pub args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Directory to receive into: new, empty, or that of an interrupted transfer (resumed)
    #[arg(short = 't', long, value_name = "DIR")]
    pub target_dir: PathBuf,
    /// Where to listen: IP, IP:PORT or :PORT [default: every address, a free port]
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub listen: Option<String>,
    /// Connections the sender should open
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: u16,
    /// Seconds to wait for a sender, at first and after one went away
    #[arg(long, value_name = "SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub wait: u64,
    /// Once the backup is received and verified, restore it into this datadir (as
    /// move-back does) and write replica-setup.sql beside it
    #[arg(long, value_name = "DATADIR")]
    pub restore_to: Option<PathBuf>,
    /// With --restore-to: target for RocksDB data files [default: DATADIR/#rocksdb]
    #[arg(long, value_name = "DIR", requires = "restore_to")]
    pub rocksdb_datadir: Option<PathBuf>,
    /// With --restore-to: target for RocksDB WAL files [default: the RocksDB data directory]
    #[arg(long, value_name = "DIR", requires = "restore_to")]
    pub rocksdb_waldir: Option<PathBuf>,
    /// With --restore-to: the server's option file, for the restore's bootstrap
    #[arg(long, value_name = "FILE", requires = "restore_to")]
    pub defaults_file: Option<PathBuf>,
    /// With --restore-to: the server binary for the restore's bootstrap
    #[arg(long, value_name = "PATH", requires = "restore_to")]
    pub mariadbd: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CloneArgs {
    #[command(flatten)]
    pub conn: ConnectionArgs,
    /// The host to make the copy on, reached with ssh ([USER@]HOST)
    #[arg(long, value_name = "HOST")]
    pub to_host: String,
    /// The datadir to create there (absent or empty)
    #[arg(long, value_name = "DIR")]
    pub datadir: PathBuf,
    /// Target for RocksDB WAL files there [default: the RocksDB data directory]
    #[arg(long, value_name = "DIR")]
    pub rocksdb_waldir: Option<PathBuf>,
    /// Where the backup lands there before it is moved into place
    /// [default: DATADIR.receiving, on the datadir's filesystem]
    #[arg(long, value_name = "DIR")]
    pub staging_dir: Option<PathBuf>,
    /// Where to read this server's table files, if not at the path the server reports
    #[arg(long, value_name = "DIR")]
    pub source_datadir: Option<PathBuf>,
    /// Files read at once [default: the number of CPUs, from 2 to 8]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: Option<u16>,
    /// Connections to the receiver
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: Option<u16>,
    /// Cap the rate at which the backup reads files, in MiB per second
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub avg_mbytes_per_sec: Option<u64>,
    /// How to show progress
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Where the temporary checkpoints go
    #[arg(short = 'c', long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Seconds after which a checkpoint is renewed
    #[arg(short = 'i', long, value_name = "SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub interval: u64,
    /// InnoDB user tables: logical (copied and loaded), refuse, or skip (left out)
    #[arg(long, value_enum, value_name = "MODE", default_value = "logical")]
    pub innodb: InnodbMode,
    /// The same as --innodb=skip
    #[arg(long, conflicts_with = "innodb")]
    pub skip_innodb_tables: bool,
    /// Print help
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
}

impl CloneArgs {
    /// The backup that sends to a receiver started on the other host with `--restore-to`.
    pub fn into_backup(self) -> BackupArgs {
        let staging = self.staging_dir.unwrap_or_else(|| {
            let mut name = self.datadir.clone().into_os_string();
            name.push(".receiving");
            PathBuf::from(name)
        });
        let mut args = vec![
            "--target-dir".to_string(),
            staging.display().to_string(),
            "--restore-to".to_string(),
            self.datadir.display().to_string(),
            "--wait".to_string(),
            "120".to_string(),
        ];
        if let Some(w) = &self.rocksdb_waldir {
            args.extend(["--rocksdb-waldir".to_string(), w.display().to_string()]);
        }
        BackupArgs {
            conn: self.conn,
            stream: None,
            target_dir: None,
            to: None,
            repo: None,
            key_file: None,
            streams: self.streams,
            via_ssh: Some(SshReceiver {
                host: self.to_host,
                args,
            }),
            parallel: self.parallel,
            compress: None,
            compress_threads: None,
            avg_mbytes_per_sec: self.avg_mbytes_per_sec,
            progress: self.progress,
            report: None,
            checkpoint_dir: self.checkpoint_dir,
            interval: self.interval,
            datadir: self.source_datadir,
            lock_wait_timeout: 60,
            innodb: self.innodb,
            skip_innodb_tables: self.skip_innodb_tables,
            skip_check_frm_timestamp: false,
            debug_signal_file: None,
            help: None,
        }
    }
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The extracted backup
    #[arg(short = 'b', long, value_name = "DIR")]
    pub backup_dir: PathBuf,
    /// Target datadir: must be empty or absent
    #[arg(short = 'd', long, value_name = "DIR")]
    pub datadir: PathBuf,
    /// Target for RocksDB data files [default: DATADIR/#rocksdb]
    #[arg(short = 'r', long, value_name = "DIR")]
    pub rocksdb_datadir: Option<PathBuf>,
    /// Target for RocksDB WAL files [default: the RocksDB data directory]
    #[arg(short = 'w', long, value_name = "DIR")]
    pub rocksdb_waldir: Option<PathBuf>,
    /// The server's option file, for re-creating the mysql schema's InnoDB tables with the
    /// server's InnoDB settings [default: none, InnoDB defaults]
    #[arg(long, value_name = "FILE")]
    pub defaults_file: Option<PathBuf>,
    /// The server binary that re-creates the mysql schema's InnoDB tables
    /// [default: mariadbd on PATH, /usr/sbin, /usr/local/sbin, /usr/libexec]
    #[arg(long, value_name = "PATH")]
    pub mariadbd: Option<PathBuf>,
    /// Restore the files only (on a host without mariadbd); the restore then prints the
    /// command that re-creates the mysql schema's InnoDB tables on the database host
    #[arg(long)]
    pub skip_bootstrap: bool,
    /// Then replay the binary logs archived in DIR (`binlog archive`) from the backup's
    /// coordinates up to --until-time, --until-gtid or --until-position (copy-back only)
    #[arg(long, value_name = "DIR", requires = "until")]
    pub binlog_dir: Option<PathBuf>,
    #[command(flatten)]
    pub until: UntilArgs,
    /// Parallel appliers of the replay (MariaDB's slave_parallel_threads, conservative
    /// mode) [default: 0, the replication thread applies itself: the fastest measured]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=64))]
    pub replay_threads: Option<u16>,
}

/// Where a replay of archived binary logs stops: one of the three.
#[derive(Args, Debug, Clone, Default)]
#[group(id = "until", multiple = false)]
pub struct UntilArgs {
    /// Up to the last transaction committed at or before this local time,
    /// 'YYYY-MM-DD HH:MM:SS' (every transaction before the first committed later)
    #[arg(long, value_name = "TIME")]
    pub until_time: Option<String>,
    /// Up to and including this transaction (DOMAIN-SERVER-SEQUENCE), or these (a
    /// position of several domains, as @@gtid_binlog_pos shows it)
    #[arg(long, value_name = "GTID")]
    pub until_gtid: Option<String>,
    /// Every transaction that ends at or before this position (FILE:POSITION)
    #[arg(long, value_name = "FILE:POS")]
    pub until_position: Option<String>,
}

/// What a backup does with InnoDB tables outside the `mysql` schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InnodbMode {
    /// Read them from the consistent snapshot; the restore loads them
    Logical,
    /// Refuse to back up a server that has any
    Refuse,
    /// Leave them out (the manifest lists them)
    Skip,
}

impl BackupArgs {
    pub fn innodb_mode(&self) -> InnodbMode {
        match self.skip_innodb_tables {
            true => InnodbMode::Skip,
            false => self.innodb,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar on a terminal, log lines otherwise
    Auto,
    Bar,
    Log,
    /// One JSON object per line on stderr
    Json,
    None,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The backup directory (a directory backup, or an extracted stream)
    #[arg(
        value_name = "DIR",
        required_unless_present_any = ["stream", "repo"],
        conflicts_with = "stream"
    )]
    pub dir: Option<PathBuf>,
    /// Verify a tar or xbstream stream instead (a file, or - for stdin)
    #[arg(long, value_name = "FILE")]
    pub stream: Option<PathBuf>,
    /// Verify a repository instead: every snapshot's objects are there
    #[arg(long, value_name = "URL", conflicts_with_all = ["stream", "dir"])]
    pub repo: Option<String>,
    /// The repository's key file
    #[arg(long, value_name = "FILE", requires = "repo")]
    pub key_file: Option<PathBuf>,
    /// Only this snapshot of the repository
    #[arg(long, value_name = "ID", requires = "repo")]
    pub snapshot: Option<String>,
    /// Download and check every byte of the repository's snapshots
    #[arg(long, requires = "repo")]
    pub read_data: bool,
    /// Print the result as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// The backup directory
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// Directory to extract into (created if missing; existing files are never overwritten)
    #[arg(short = 'C', long, value_name = "DIR", default_value = ".")]
    pub directory: PathBuf,
    /// The stream to read [default: stdin]
    pub input: Option<PathBuf>,
    /// Keep the files of a compressed backup compressed (`.zst`, as stored); the restore
    /// decodes them [default: decode them while extracting]
    #[arg(long)]
    pub keep_compressed: bool,
}

/// Parses a full argument vector (program name first).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, clap::Error> {
    let args = normalize(args);
    let first = args.get(1).and_then(|a| a.to_str());
    let modern = matches!(
        first,
        Some(
            "backup"
                | "move-back"
                | "copy-back"
                | "extract"
                | "verify"
                | "info"
                | "receive"
                | "clone"
                | "repo"
                | "snapshots"
                | "restore"
                | "forget"
                | "prune"
                | "binlog"
                | "help"
                | "-h"
                | "--help"
                | "-V"
                | "--version"
        )
    );
    if modern {
        Cli::try_parse_from(args).map(|cli| cli.command)
    } else {
        LegacyArgs::try_parse_from(args)?.into_command()
    }
}

/// Spells every `--long_flag` as `--long-flag`, up to a `--` terminator.
fn normalize(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut done = false;
    args.into_iter()
        .map(|arg| {
            let Some(s) = arg.to_str().filter(|s| !done && s.starts_with("--")) else {
                return arg;
            };
            if s == "--" {
                done = true;
                return arg;
            }
            let (name, value) = s.split_at(s.find('=').unwrap_or(s.len()));
            OsString::from(format!("{}{value}", name.replace('_', "-")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Command, clap::Error> {
        parse(
            std::iter::once("myrocks-hotbackup")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn original_backup_invocation_maps_to_backup() {
        let cmd = parse_strs(&[
            "--user=bk",
            "--password",
            "pw",
            "--port=3307",
            "--stream=xbstream",
            "--checkpoint_dir=/data/snap",
            "--interval=60",
            "-f",
        ])
        .unwrap();
        let Command::Backup(b) = cmd else {
            panic!("not a backup: {cmd:?}")
        };
        assert_eq!(b.stream, Some(Format::Xbstream));
        assert_eq!(b.checkpoint_dir, Some(PathBuf::from("/data/snap")));
        assert_eq!(b.interval, 60);
        assert_eq!(b.conn.user.as_deref(), Some("bk"));
        assert_eq!(b.conn.password, Some(Some("pw".into())));
        assert_eq!(b.conn.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(b.conn.port, Some(3307));
        assert!(b.skip_check_frm_timestamp);
    }

    #[test]
    fn original_short_flags_and_socket() {
        let cmd = parse_strs(&[
            "-u", "root", "-S", "/tmp/s", "-s", "tar", "-c", "/snap", "-i", "5",
        ])
        .unwrap();
        let Command::Backup(b) = cmd else { panic!() };
        assert_eq!(b.conn.socket, Some(PathBuf::from("/tmp/s")));
        assert_eq!(b.conn.host, None, "a socket means no TCP host");
        assert_eq!(b.interval, 5);
    }

    #[test]
    fn original_move_back_needs_all_four_directories() {
        let cmd = parse_strs(&[
            "--move_back",
            "--datadir=/d",
            "--rocksdb_datadir=/d/r",
            "--rocksdb_waldir=/d/w",
            "--backup_dir=/b",
        ])
        .unwrap();
        let Command::MoveBack(r) = cmd else { panic!() };
        assert_eq!(r.rocksdb_waldir, Some(PathBuf::from("/d/w")));
        let err = parse_strs(&["-m", "--datadir=/d"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--backup_dir"), "{err}");
    }

    #[test]
    fn wdt_starts_a_receiver_over_ssh() {
        let Command::Backup(b) = parse_strs(&[
            "--stream=wdt",
            "--destination=db2",
            "--backup_dir=/b",
            "--avg_mbytes_per_sec=50",
            "--extra_wdt_sender_options=-num_ports 4",
        ])
        .unwrap() else {
            panic!()
        };
        let ssh = b.via_ssh.unwrap();
        assert_eq!(
            (ssh.host.as_str(), ssh.args.as_slice()),
            ("db2", &["--target-dir".to_string(), "/b".into()][..])
        );
        assert_eq!((b.stream, b.avg_mbytes_per_sec), (None, Some(50)));
        let err = parse_strs(&["--stream=wdt", "--backup_dir=/b"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--destination"), "{err}");
    }

    #[test]
    fn hyphens_and_underscores_are_interchangeable() {
        for flag in ["--checkpoint-dir=/x", "--checkpoint_dir=/x"] {
            let Command::Backup(b) = parse_strs(&["backup", flag]).unwrap() else {
                panic!()
            };
            assert_eq!(b.checkpoint_dir, Some(PathBuf::from("/x")));
        }
        let Command::CopyBack(r) =
            parse_strs(&["copy-back", "--backup_dir", "/b", "--datadir", "/d"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.backup_dir, PathBuf::from("/b"));
    }

    #[test]
    fn values_after_the_terminator_are_untouched() {
        assert_eq!(
            normalize(["x", "--a_b=c_d", "--", "--e_f"].map(OsString::from)),
            ["x", "--a-b=c_d", "--", "--e_f"].map(OsString::from)
        );
    }

    #[test]
    fn backup_takes_h_for_host() {
        let Command::Backup(b) = parse_strs(&["backup", "-h", "db1", "-P", "3307"]).unwrap() else {
            panic!()
        };
        assert_eq!(b.conn.host.as_deref(), Some("db1"));
    }

    #[test]
    fn bad_stream_and_interval_are_usage_errors() {
        assert_eq!(
            parse_strs(&["backup", "--stream", "zip"])
                .unwrap_err()
                .exit_code(),
            2
        );
        assert_eq!(
            parse_strs(&["backup", "--interval", "0"])
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    #[test]
    fn debug_output_hides_the_password_and_the_url_token() {
        let Command::Backup(b) = parse_strs(&["backup", "-p", "s3cret"]).unwrap() else {
            panic!()
        };
        assert!(!format!("{b:?}").contains("s3cret"));
        let Command::Backup(b) =
            parse_strs(&["backup", "--to", "mhb://h:1/s?key=k&token=s3cret"]).unwrap()
        else {
            panic!()
        };
        assert!(!format!("{b:?}").contains("s3cret"));
    }

    #[test]
    fn p_without_a_value_asks_for_the_password() {
        let Command::Backup(b) = parse_strs(&["backup", "-p", "--stream", "tar"]).unwrap() else {
            panic!()
        };
        assert_eq!(b.conn.password, Some(None));
        let Command::Backup(b) = parse_strs(&["backup", "-ps3cret"]).unwrap() else {
            panic!()
        };
        assert_eq!(b.conn.password, Some(Some("s3cret".into())));
    }
}
