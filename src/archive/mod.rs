//! Archive formats: streaming writers (which are [`Destination`](crate::destination::Destination)s)
//! and readers for tar and xbstream. Readers push what they decode into an [`Unpack`], so
//! that the code that creates files on disk is written once, in [`crate::extract`].

pub mod tar;
pub mod xbstream;

use crate::error::{Error, Result};

/// The stream formats a backup can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One POSIX/GNU tar archive (read with `tar -x`).
    Tar,
    /// Percona/MariaDB xbstream (read with `mbstream -x` or `xbstream -x`).
    Xbstream,
}

impl Format {
    /// Recognises a stream from its first bytes (at least 512 of them, unless the stream is
    /// shorter).
    pub fn detect(head: &[u8]) -> Result<Format> {
        if head.is_empty() {
            return Err(Error::Corrupt("the input is empty".into()));
        }
        if head.starts_with(xbstream::MAGIC) {
            return Ok(Format::Xbstream);
        }
        if head.len() >= tar::BLOCK && tar::looks_like_header(&head[..tar::BLOCK]) {
            return Ok(Format::Tar);
        }
        Err(Error::Corrupt(
            "the input is neither a tar archive nor an xbstream stream".into(),
        ))
    }
}

/// Metadata an archive may carry for an entry (tar does, xbstream does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    pub mode: u32,
    pub mtime: i64,
}

/// Receives what an archive reader decodes. Offsets within one file arrive in order.
pub trait Unpack {
    /// `data` belongs to `path` at byte `offset`; a file's first call has offset 0.
    /// `crc32` is the CRC-32 of `data`, computed once by the reader.
    fn write(&mut self, path: &str, offset: u64, data: &[u8], crc32: u32) -> Result<()>;
    /// `path` is complete (a file that never had data is empty).
    fn end_file(&mut self, path: &str, attrs: Option<Attrs>) -> Result<()>;
    /// A directory entry (tar only).
    fn directory(&mut self, path: &str, attrs: Option<Attrs>) -> Result<()>;
}

/// Checks an archive member name and returns its components, with `.` components removed
/// (`./` alone gives none: the target itself). Refuses absolute paths, `..` and NUL bytes:
/// nothing may land outside the extraction target.
pub fn safe_components(path: &str) -> Result<Vec<&str>> {
    let refuse = |why: &str| {
        Err(Error::Corrupt(format!(
            "unsafe path {path:?} in the stream: {why}"
        )))
    };
    if path.starts_with('/') {
        return refuse("absolute paths are not allowed");
    }
    if path.contains('\0') {
        return refuse("NUL byte in the name");
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return refuse("`..` is not allowed"),
            _ => parts.push(part),
        }
    }
    Ok(parts)
}
