//! What a backup looks like, on disk and in a stream: the names of its files ([`layout`]),
//! its manifest ([`manifest`]), and the tar and xbstream encoders and decoders. Encoders
//! take one file after another through [`Encoder`]; decoders push what they read into an
//! [`Unpack`], so that the code that creates files from a stream is written once, in
//! `restore::extract`.

pub mod layout;
pub mod logical;
pub mod manifest;
pub mod tar;
pub mod xbstream;

use crate::error::{Error, Result};

/// Bytes read, checksummed and written at a time. Large enough that syscalls and
/// per-chunk headers cost nothing measurable, small enough to stay far below the 10 MiB
/// xbstream chunk limit.
pub const CHUNK_SIZE: usize = 1 << 20;

/// Appends a chunk, known only by its CRC and length, to a running CRC.
pub fn combine_crc(crc: &mut crc32fast::Hasher, chunk_crc: u32, len: usize) {
    crc.combine(&crc32fast::Hasher::new_with_initial_len(
        chunk_crc, len as u64,
    ));
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub fn read_full(
    input: &mut (impl std::io::Read + ?Sized),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// What an encoder needs to know about a file before its bytes arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    /// Relative path inside the backup, `/`-separated, no `.` or `..` components.
    pub path: String,
    /// Exact number of bytes that will follow, when known in advance (a file compressed on
    /// the way has no size until it is written: tar cannot carry it, xbstream can).
    pub size: Option<u64>,
    /// Permission bits (`0o640` and the like).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    pub uid: u32,
    pub gid: u32,
    /// What the file is: sinks decide by kind, never by name (only SSTs are immutable).
    pub kind: manifest::Kind,
    /// RocksDB's identity of an SST and its size (db id, session id, file number, size),
    /// when the sink dedups SSTs and the file's properties hold it.
    pub identity: Option<String>,
}

impl FileMeta {
    /// Metadata for a file that exists only in memory (the backup's own metadata files).
    pub fn generated(path: &str, size: u64) -> FileMeta {
        let (uid, gid) = crate::sys::ids();
        FileMeta {
            path: path.to_string(),
            size: Some(size),
            mode: 0o640,
            mtime: crate::log::unix_now(),
            uid,
            gid,
            kind: manifest::Kind::Metadata,
            identity: None,
        }
    }
}

/// Where an encoder writes: any `Write`, or a pipe that takes the pages of immutable files
/// by reference instead of copying them (see `cmd::stdio`).
pub trait Output: Send {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Bytes that are pages of a file nobody will change (an SST, mapped into memory).
    fn put_pages(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.put(bytes)
    }
    fn flush(&mut self) -> std::io::Result<()>;
}

impl<W: std::io::Write + Send> Output for W {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(self)
    }
}

/// A stream format's writer. Calls come in the order `begin_file`, any number of
/// `write_chunk`, `end_file`, for each file in turn, then `finish` once.
pub trait Encoder: Send {
    fn begin_file(&mut self, meta: &FileMeta) -> Result<()>;
    /// `crc32` is the zlib CRC-32 of `data`, already computed by the caller. `pages`: the
    /// bytes are pages of an immutable file, which the output may take by reference.
    fn write_chunk(&mut self, data: &[u8], crc32: u32, pages: bool) -> Result<()>;
    fn end_file(&mut self) -> Result<()>;
    /// Writes the trailer and flushes. Nothing is valid before it returns.
    fn finish(&mut self) -> Result<()>;
}

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
