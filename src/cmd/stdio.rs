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

/// Standard output for an archive. Small writes (headers) are gathered, and go out in one
/// system call before the next file's pages or when the stream ends.
pub struct Stdout {
    file: File,
    pipe: bool,
    pending: Vec<u8>,
}

/// Headers gathered before they are written.
const GATHER: usize = 64 << 10;

impl Stdout {
    fn write_pending(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            self.file.write_all(&self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }
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
    let pipe = crate::sys::is_pipe(&file);
    if pipe {
        crate::sys::set_pipe_size(&file, PIPE_SIZE);
    }
    Ok(Stdout {
        file,
        pipe,
        pending: Vec::with_capacity(GATHER),
    })
}

impl Output for Stdout {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.pending.len() + bytes.len() > GATHER {
            self.write_pending()?;
        }
        if bytes.len() >= GATHER {
            return self.file.write_all(bytes);
        }
        self.pending.extend_from_slice(bytes);
        Ok(())
    }

    fn put_pages(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_pending()?;
        match self.pipe {
            true => crate::sys::vmsplice_all(&self.file, bytes),
            false => self.file.write_all(bytes),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.write_pending()
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
