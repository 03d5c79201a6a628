//! One file per command: each turns the parsed command line into a run of the library,
//! and its outcome into output on stdout (archives, JSON) and stderr (log lines).

mod backup;
mod binlog;
mod extract;
mod info;
mod receive;
mod repo;
mod stdio;
mod verify;

pub use info::Summary;

use crate::cancel::Cancel;
use crate::cli::{BinlogCommand, Command, RepoCommand};
use crate::error::{IoContext, Result};
use crate::restore::{self, Mode};

/// Runs one command.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Backup(args) => backup::run(args),
        Command::MoveBack(args) if args.binlog_dir.is_some() => Err(crate::error::Error::Usage(
            "move-back cannot replay binary logs (a failed replay would leave the backup changed): use copy-back"
                .into(),
        )),
        Command::MoveBack(args) => restore::run(&args, Mode::Move, &on_signals()?),
        Command::CopyBack(args) => restore::run(&args, Mode::Copy, &on_signals()?),
        Command::Extract(args) => extract::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Info(args) => info::run(args),
        Command::Receive(args) => receive::run(args),
        Command::Clone(args) => backup::run(args.into_backup()),
        Command::Repo(RepoCommand::Init(args)) => repo::init(args),
        Command::Snapshots(args) => repo::snapshots(args),
        Command::Restore(args) => repo::restore(args),
        Command::Forget(args) => repo::forget(args),
        Command::Prune(args) => repo::prune(&args),
        Command::Binlog(BinlogCommand::Archive(args)) => binlog::archive(&args),
        Command::Binlog(BinlogCommand::List(args)) => binlog::list(&args),
        Command::Binlog(BinlogCommand::Verify(args)) => binlog::verify(&args),
    }
}

fn on_signals() -> Result<Cancel> {
    Cancel::on_signals().context(|| "cannot install signal handlers".into())
}

/// The number of CPUs this process may use.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
