//! The original tool's invocation: its flags, short forms and defaults, mapped onto the
//! subcommands.

use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};

use super::{BackupArgs, Command, ConnectionArgs, ProgressMode, RestoreArgs, SshReceiver};
use crate::format::Format;

/// The original tool's options, as its scripts pass them.
#[derive(Parser, Debug)]
#[command(
    name = "myrocks-hotbackup",
    about = "The original myrocks_hotbackup invocation"
)]
pub struct LegacyArgs {
    #[arg(short = 'i', long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    interval: u64,
    #[arg(short = 'c', long)]
    checkpoint_dir: Option<PathBuf>,
    #[arg(short = 'd', long)]
    datadir: Option<PathBuf>,
    #[arg(short = 's', long, default_value = "tar")]
    stream: String,
    #[arg(long)]
    destination: Option<String>,
    #[arg(long)]
    avg_mbytes_per_sec: Option<u64>,
    #[arg(long, allow_hyphen_values = true)]
    extra_wdt_sender_options: Option<String>,
    #[arg(long, allow_hyphen_values = true)]
    extra_wdt_receiver_options: Option<String>,
    #[arg(short = 'u', long)]
    user: Option<String>,
    #[arg(short = 'p', long)]
    password: Option<String>,
    #[arg(short = 'P', long, default_value_t = 3306)]
    port: u16,
    #[arg(short = 'S', long)]
    socket: Option<PathBuf>,
    #[arg(short = 'm', long)]
    move_back: bool,
    #[arg(short = 'r', long)]
    rocksdb_datadir: Option<PathBuf>,
    #[arg(short = 'w', long)]
    rocksdb_waldir: Option<PathBuf>,
    #[arg(short = 'b', long)]
    backup_dir: Option<PathBuf>,
    #[arg(short = 'f', long)]
    skip_check_frm_timestamp: bool,
    #[arg(short = 'D', long)]
    debug_signal_file: Option<PathBuf>,
    /// Not in the original: an option file, read for the connection's credentials (backup)
    /// and by the restore's bootstrap (move-back), as the MySQL tools read it.
    #[arg(long)]
    defaults_file: Option<PathBuf>,
    /// Not in the original: the server binary for the restore's bootstrap.
    #[arg(long)]
    mariadbd: Option<PathBuf>,
}

impl LegacyArgs {
    pub fn into_command(self) -> Result<Command, clap::Error> {
        let usage = |msg: String| LegacyArgs::command().error(ErrorKind::ArgumentConflict, msg);
        if self.move_back {
            let (Some(backup_dir), Some(datadir), Some(rocksdb_datadir), Some(rocksdb_waldir)) = (
                self.backup_dir,
                self.datadir,
                self.rocksdb_datadir,
                self.rocksdb_waldir,
            ) else {
                return Err(LegacyArgs::command().error(
                    ErrorKind::MissingRequiredArgument,
                    "--move_back needs --backup_dir, --datadir, --rocksdb_datadir and --rocksdb_waldir",
                ));
            };
            return Ok(Command::MoveBack(RestoreArgs {
                backup_dir,
                datadir,
                rocksdb_datadir: Some(rocksdb_datadir),
                rocksdb_waldir: Some(rocksdb_waldir),
                defaults_file: self.defaults_file,
                mariadbd: self.mariadbd,
                binlog_dir: None,
                until: Default::default(),
                replay_threads: None,
                skip_bootstrap: false,
            }));
        }
        let (stream, via_ssh) = match self.stream.as_str() {
            "tar" => (Some(Format::Tar), None),
            "xbstream" => (Some(Format::Xbstream), None),
            "wdt" => {
                // The receiver is this tool's, started over ssh as the original started
                // WDT's; WDT's own options mean nothing to it.
                let (Some(host), Some(dir)) = (&self.destination, &self.backup_dir) else {
                    return Err(LegacyArgs::command().error(
                        ErrorKind::MissingRequiredArgument,
                        "--stream=wdt needs --destination (the receiving host) and --backup_dir (the directory there)",
                    ));
                };
                for (flag, value) in [
                    ("--extra_wdt_sender_options", &self.extra_wdt_sender_options),
                    (
                        "--extra_wdt_receiver_options",
                        &self.extra_wdt_receiver_options,
                    ),
                ] {
                    if value.is_some() {
                        crate::warn!(
                            "{flag} is ignored: transfers use this tool's own receiver, not WDT"
                        );
                    }
                }
                let receiver = SshReceiver {
                    host: host.clone(),
                    args: vec!["--target-dir".into(), dir.display().to_string()],
                };
                (None, Some(receiver))
            }
            other => return Err(usage(format!("--stream={other}: use tar, xbstream or wdt"))),
        };
        // The original connected over TCP to 127.0.0.1 unless given a socket.
        let host = self.socket.is_none().then(|| "127.0.0.1".to_string());
        Ok(Command::Backup(BackupArgs {
            conn: ConnectionArgs {
                host,
                port: Some(self.port),
                socket: self.socket,
                user: self.user,
                password: self.password.map(Some),
                defaults_file: self.defaults_file,
                ..ConnectionArgs::default()
            },
            stream,
            target_dir: None,
            to: None,
            repo: None,
            key_file: None,
            streams: None,
            via_ssh,
            parallel: None,
            compress: None,
            compress_threads: None,
            avg_mbytes_per_sec: self.avg_mbytes_per_sec,
            progress: ProgressMode::Auto,
            report: None,
            checkpoint_dir: self.checkpoint_dir,
            interval: self.interval,
            datadir: self.datadir,
            lock_wait_timeout: 60,
            innodb: super::InnodbMode::Logical,
            skip_innodb_tables: false,
            skip_check_frm_timestamp: self.skip_check_frm_timestamp,
            debug_signal_file: self.debug_signal_file,
            help: None,
        }))
    }
}
