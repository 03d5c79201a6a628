//! Standard input and output as raw files. `Stdout` is line-buffered and would scan every
//! byte for newlines; archives are written straight to a duplicate of fd 1 instead. When
//! either is a pipe its kernel buffer is raised from 64 KiB to 1 MiB, which more than
//! doubles throughput: with the default size every large write stalls until the reader
//! catches up.

use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::AsFd;

use crate::error::{Error, IoContext, Result};

const PIPE_SIZE: libc::c_int = 1 << 20;

/// Standard output for an archive; refuses a terminal.
pub fn stdout() -> Result<File> {
    let out = std::io::stdout();
    if out.is_terminal() {
        return Err(Error::Usage(
            "refusing to write an archive to a terminal: redirect stdout to a file or a pipe, or use --target-dir"
                .into(),
        ));
    }
    let file = File::from(
        out.as_fd()
            .try_clone_to_owned()
            .context(|| "cannot use stdout".into())?,
    );
    crate::sys::set_pipe_size(&file, PIPE_SIZE);
    Ok(file)
}

/// Standard input for a stream; refuses a terminal.
pub fn stdin() -> Result<File> {
    let input = std::io::stdin();
    if input.is_terminal() {
        return Err(Error::Usage(
            "expected a stream on stdin (or a file argument), but stdin is a terminal".into(),
        ));
    }
    let file = File::from(
        input
            .as_fd()
            .try_clone_to_owned()
            .context(|| "cannot use stdin".into())?,
    );
    crate::sys::set_pipe_size(&file, PIPE_SIZE);
    Ok(file)
}
