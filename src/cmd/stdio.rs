//! Standard input and output as raw files. `Stdout` is line-buffered and would scan every
//! byte for newlines; archives are written straight to a duplicate of fd 1 instead. When
//! either is a pipe its kernel buffer is raised from 64 KiB to 1 MiB, which more than
//! doubles throughput: with the default size every large write stalls until the reader
//! catches up. Into a pipe, the pages of immutable files (SSTs, mapped into memory) go by
//! reference (`vmsplice`) instead of being copied: the backup process then spends almost
//! no CPU moving them.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;

use crate::error::{Error, IoContext, Result};
use crate::format::Output;

const PIPE_SIZE: libc::c_int = 1 << 20;

/// Standard output for an archive.
pub enum Stdout {
    Pipe(File),
    File(File),
}

/// Standard output for an archive; refuses a terminal.
pub fn stdout() -> Result<Stdout> {
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
    if crate::sys::is_pipe(&file) {
        crate::sys::set_pipe_size(&file, PIPE_SIZE);
        return Ok(Stdout::Pipe(file));
    }
    Ok(Stdout::File(file))
}

impl Output for Stdout {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stdout::Pipe(f) | Stdout::File(f) => f.write_all(bytes),
        }
    }

    fn put_pages(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stdout::Pipe(f) => crate::sys::vmsplice_all(f, bytes),
            Stdout::File(f) => f.write_all(bytes),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
