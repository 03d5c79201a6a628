//! The one reader of backup files: reads each file once, in large chunks, computes the
//! CRC-32 of every chunk as it passes, and pushes the chunks to a [`Destination`].
//! The file's checksum is the combination of its chunk CRCs: no byte is read or hashed twice.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::cancel::Cancel;
use crate::destination::{Destination, FileMeta};
use crate::error::{Error, IoContext, Result};

/// Bytes read and pushed at a time. Large enough that syscalls and per-chunk headers cost
/// nothing measurable, small enough to stay far below the 10 MiB xbstream chunk limit.
pub const CHUNK_SIZE: usize = 1 << 20;

/// What was stored for one file: enough to verify it later.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub crc32: u32,
}

/// Reads files into a destination, reusing one buffer.
pub struct FileReader {
    buf: Vec<u8>,
    cancel: Cancel,
    bytes_sent: u64,
}

impl FileReader {
    pub fn new(cancel: Cancel) -> FileReader {
        FileReader {
            buf: vec![0; CHUNK_SIZE],
            cancel,
            bytes_sent: 0,
        }
    }

    /// Total payload bytes pushed so far, over all files.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Sends the regular file `src` under the name `path`. The size is taken when the file
    /// is opened; a file that shrinks while being read is an error, one that grows is cut
    /// at that size (it can only be a log that the consistent point does not need).
    pub fn send(
        &mut self,
        src: &Path,
        path: &str,
        dest: &mut dyn Destination,
    ) -> Result<FileRecord> {
        self.send_prefix(src, path, None, dest)
    }

    /// Like [`FileReader::send`], sending only the first `size` bytes when given (a log
    /// that goes on growing, sent up to a recorded point).
    pub fn send_prefix(
        &mut self,
        src: &Path,
        path: &str,
        size: Option<u64>,
        dest: &mut dyn Destination,
    ) -> Result<FileRecord> {
        // Never through a symbolic link: the checkpoint directory is the server's to write.
        let mut file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(src)
            .with_path("open", src)?;
        let md = file.metadata().with_path("stat", src)?;
        if !md.is_file() {
            return Err(Error::Refused(format!(
                "{} is not a regular file",
                src.display()
            )));
        }
        if size.is_some_and(|s| s > md.len()) {
            return Err(Error::Refused(format!(
                "{} is shorter than the {} bytes recorded for it",
                src.display(),
                size.unwrap_or_default()
            )));
        }
        // Sequential read-ahead; a failure here only costs speed.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        let meta = FileMeta {
            path: path.to_string(),
            size: size.unwrap_or(md.len()),
            mode: md.mode() & 0o7777,
            mtime: md.mtime(),
            uid: md.uid(),
            gid: md.gid(),
        };
        dest.begin_file(&meta)?;
        let mut crc = crc32fast::Hasher::new();
        let mut remaining = meta.size;
        while remaining > 0 {
            self.cancel.check()?;
            let want = remaining.min(CHUNK_SIZE as u64) as usize;
            let got = read_full(&mut file, &mut self.buf[..want]).with_path("read", src)?;
            if got < want {
                return Err(Error::io(
                    format!("cannot read {}", src.display()),
                    std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        format!(
                            "the file shrank while being read: {} bytes expected, {} found",
                            meta.size,
                            meta.size - remaining + got as u64
                        ),
                    ),
                ));
            }
            let chunk = &self.buf[..got];
            let chunk_crc = crc32fast::hash(chunk);
            dest.write_chunk(chunk, chunk_crc)?;
            combine_crc(&mut crc, chunk_crc, got);
            remaining -= got as u64;
            self.bytes_sent += got as u64;
        }
        dest.end_file()?;
        Ok(FileRecord {
            path: meta.path,
            size: meta.size,
            crc32: crc.finalize(),
        })
    }

    /// Sends bytes made in memory (the backup's metadata files) under the name `path`.
    pub fn send_bytes(
        &mut self,
        path: &str,
        bytes: &[u8],
        dest: &mut dyn Destination,
    ) -> Result<FileRecord> {
        let meta = FileMeta::generated(path, bytes.len() as u64);
        dest.begin_file(&meta)?;
        let mut crc = crc32fast::Hasher::new();
        for chunk in bytes.chunks(CHUNK_SIZE) {
            let chunk_crc = crc32fast::hash(chunk);
            dest.write_chunk(chunk, chunk_crc)?;
            combine_crc(&mut crc, chunk_crc, chunk.len());
        }
        dest.end_file()?;
        self.bytes_sent += bytes.len() as u64;
        Ok(FileRecord {
            path: meta.path,
            size: meta.size,
            crc32: crc.finalize(),
        })
    }
}

/// Appends a chunk, known only by its CRC and length, to a running CRC.
pub fn combine_crc(crc: &mut crc32fast::Hasher, chunk_crc: u32, len: usize) {
    crc.combine(&crc32fast::Hasher::new_with_initial_len(
        chunk_crc, len as u64,
    ));
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub fn read_full(input: &mut (impl Read + ?Sized), buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
