//! Standard input and output as raw files. `Stdout` is line-buffered and would scan every
//! byte for newlines; archives are written straight to fd 1 instead. When either is a pipe
//! its kernel buffer is raised from 64 KiB to 1 MiB, which more than doubles throughput:
//! with the default size every large write stalls until the reader catches up.

use std::fs::File;
use std::io::IsTerminal;
use std::mem::ManuallyDrop;
use std::os::unix::io::FromRawFd;

use crate::error::{Error, Result};

const PIPE_SIZE: libc::c_int = 1 << 20;

/// Standard output for an archive; refuses a terminal.
pub fn stdout() -> Result<ManuallyDrop<File>> {
    if std::io::stdout().is_terminal() {
        return Err(Error::Usage(
            "refusing to write an archive to a terminal: redirect stdout to a file or a pipe"
                .into(),
        ));
    }
    Ok(raw(libc::STDOUT_FILENO))
}

/// Standard input for a stream; refuses a terminal.
pub fn stdin() -> Result<ManuallyDrop<File>> {
    if std::io::stdin().is_terminal() {
        return Err(Error::Usage(
            "expected a stream on stdin (or a file argument), but stdin is a terminal".into(),
        ));
    }
    Ok(raw(libc::STDIN_FILENO))
}

fn raw(fd: libc::c_int) -> ManuallyDrop<File> {
    // Fails harmlessly on anything but a pipe, or past the system's pipe-max-size.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_SIZE) };
    // ManuallyDrop: the process's standard descriptors are not ours to close.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}
