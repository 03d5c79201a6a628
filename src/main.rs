//! The `myrocks-hotbackup` binary: parses the command line, runs one command, and turns
//! its outcome into a message on stderr and an exit code.

use std::fs::File;

use myrocks_hotbackup::archive::tar::TarWriter;
use myrocks_hotbackup::archive::xbstream::XbstreamWriter;
use myrocks_hotbackup::archive::Format;
use myrocks_hotbackup::cancel::Cancel;
use myrocks_hotbackup::cli::{self, BackupArgs, Command, ExtractArgs};
use myrocks_hotbackup::error::{exit, IoContext, Result};
use myrocks_hotbackup::restore::{self, Mode};
use myrocks_hotbackup::{backup, error, extract, info, pipe};

fn main() {
    let command = match cli::parse(std::env::args_os()) {
        Ok(command) => command,
        Err(e) => e.exit(),
    };
    // SAFETY: one thread so far, and the arguments are parsed.
    unsafe { myrocks_hotbackup::sys::scrub_password_args() };
    let code = match run(command) {
        Ok(()) => exit::OK,
        Err(e) if e.is_broken_pipe() => {
            error!(
                "the reader of the backup stream went away (broken pipe): the backup is incomplete"
            );
            e.exit_code()
        }
        Err(e) => {
            error!("{e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Backup(args) => run_backup(args),
        Command::MoveBack(args) => restore::run(&args, Mode::Move, &on_signals()?),
        Command::CopyBack(args) => restore::run(&args, Mode::Copy, &on_signals()?),
        Command::Extract(args) => run_extract(args),
    }
}

fn run_backup(args: BackupArgs) -> Result<()> {
    let out = pipe::stdout()?;
    let cancel = on_signals()?;
    match args.stream {
        Format::Tar => backup::run(&args, &mut TarWriter::new(&*out), cancel)?,
        Format::Xbstream => backup::run(&args, &mut XbstreamWriter::new(&*out), cancel)?,
    };
    Ok(())
}

fn on_signals() -> Result<Cancel> {
    Cancel::on_signals().context(|| "cannot install signal handlers".into())
}

fn run_extract(args: ExtractArgs) -> Result<()> {
    let summary = match args.input.as_deref().filter(|p| p.as_os_str() != "-") {
        Some(path) => {
            let mut file = File::open(path).with_path("open", path)?;
            extract::extract(&mut file, &args.directory)?
        }
        None => extract::extract(&mut *pipe::stdin()?, &args.directory)?,
    };
    info!(
        "Extracted {} files, {} bytes ({:?}) into {}",
        summary.files,
        summary.bytes,
        summary.format,
        args.directory.display()
    );
    Ok(())
}
