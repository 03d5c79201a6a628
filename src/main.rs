//! The `myrocks-hotbackup` binary: parses the command line, runs one command, and turns
//! its outcome into a message on stderr and an exit code.

use myrocks_hotbackup::error::exit;
use myrocks_hotbackup::{cli, cmd, error};

fn main() {
    let command = match cli::parse(std::env::args_os()) {
        Ok(command) => command,
        Err(e) => e.exit(),
    };
    // SAFETY: one thread so far, and the arguments are parsed.
    unsafe { myrocks_hotbackup::sys::scrub_password_args() };
    let code = match cmd::run(command) {
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
