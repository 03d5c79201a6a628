//! The `myrocks-hotbackup` binary: parses the command line, runs one command, and turns
//! its outcome into a message on stderr and an exit code.

use std::fs::File;

use myrocks_hotbackup::cli::{self, Command, ExtractArgs};
use myrocks_hotbackup::error::{exit, Error, IoContext, Result};
use myrocks_hotbackup::{error, extract, info, pipe};

fn main() {
    let command = match cli::parse(std::env::args_os()) {
        Ok(command) => command,
        Err(e) => e.exit(),
    };
    let code = match run(command) {
        Ok(()) => exit::OK,
        Err(e) => {
            error!("{e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Extract(args) => run_extract(args),
        Command::Backup(_) | Command::MoveBack(_) | Command::CopyBack(_) => {
            Err(Error::Usage("this command is not implemented yet".into()))
        }
    }
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
