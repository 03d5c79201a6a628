//! Where backup files go: one small trait that every destination implements.
//!
//! The backup engine reads each file once (see [`crate::source`]) and pushes it here in
//! chunks whose CRC-32 is already computed, so a destination never reads or hashes a byte
//! again: the xbstream writer puts that CRC in its chunk header, a directory or object-store
//! destination can record it. Tar and xbstream stream writers implement this trait today;
//! directory, network and object-store destinations slot in beside them.

use crate::error::Result;

/// What a destination needs to know about a file before its bytes arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    /// Relative path inside the backup, `/`-separated, no `.` or `..` components.
    pub path: String,
    /// Exact number of bytes that will follow.
    pub size: u64,
    /// Permission bits (`0o640` and the like).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    pub uid: u32,
    pub gid: u32,
}

impl FileMeta {
    /// Metadata for a file that exists only in memory (the backup's own metadata files).
    pub fn generated(path: &str, size: u64) -> FileMeta {
        FileMeta {
            path: path.to_string(),
            size,
            mode: 0o640,
            mtime: crate::log::unix_now(),
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
        }
    }
}

/// A place that stores the files of one backup.
///
/// Calls come in the order `begin_file`, any number of `write_chunk`, `end_file`, for each
/// file in turn, then `finish` once. The chunks of a file add up to exactly `meta.size` bytes.
pub trait Destination {
    fn begin_file(&mut self, meta: &FileMeta) -> Result<()>;
    /// `crc32` is the zlib CRC-32 of `data`, already computed by the caller.
    fn write_chunk(&mut self, data: &[u8], crc32: u32) -> Result<()>;
    fn end_file(&mut self) -> Result<()>;
    /// Completes the backup: flushes, writes trailers. Nothing is valid before it returns.
    fn finish(&mut self) -> Result<()>;
}
