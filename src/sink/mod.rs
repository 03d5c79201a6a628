//! Where a backup goes. A [`Sink`] receives the files the pipeline reads, each as a
//! sequence of checksummed [`Chunk`]s, and stores them: as one tar or xbstream stream
//! ([`stream`]), or as a directory tree ([`dir`]); network and object-store sinks fit the
//! same interface. A sink says how many files it takes at once, may say that it already
//! holds a file (the reader then skips it), acknowledges each file once it holds it safely
//! (only then is a checkpoint's hard link removed), and ends with an explicit commit that
//! stores the manifest last, or an abort.

pub mod dir;
pub mod net;
pub mod repo;
pub mod stream;

use crate::error::{Error, Result};
use crate::format::manifest::FileRecord;
use crate::format::FileMeta;
use crate::pipeline::Buf;

/// Bytes of one file, with the CRC-32 of exactly these bytes.
pub struct Chunk {
    pub data: Buf,
    pub crc32: u32,
}

/// A destination of a backup. Shared by the pipeline's reader threads.
pub trait Sink: Sync {
    /// How many files may be written at once. Streams take them in turn: a reader that opens
    /// a file while another is being written reads ahead, into bounded buffers.
    fn max_in_flight(&self) -> usize;

    /// The record of a file the sink already holds (same name, kind and `size`, the size
    /// before any compression), so that it is not read again: a receiver resuming holds
    /// the SSTs of an interrupted transfer, a repository those of earlier backups.
    fn lookup(&self, _meta: &FileMeta, _size: u64) -> Result<Option<FileRecord>> {
        Ok(None)
    }

    /// True when the sink dedups SSTs by identity: the reader then reads each SST's
    /// identity from its properties into [`FileMeta::identity`] before the lookup.
    fn wants_identity(&self) -> bool {
        false
    }

    /// Starts a file. Its chunks follow through the returned handle.
    fn open(&self, meta: &FileMeta) -> Result<Box<dyn SinkFile + '_>>;

    /// Stores the manifest, last: once this returns, the backup is complete.
    fn commit(&self, manifest: &[u8]) -> Result<()>;

    /// Gives up: removes what can be removed (a stream cannot be taken back; its reader
    /// finds no manifest). Returns the sink's own failure, if that is why.
    fn abort(&self) -> Option<Error>;
}

/// One file being stored.
pub trait SinkFile: Send {
    fn write(&mut self, chunk: Chunk) -> Result<()>;
    /// Returns once the sink holds the whole file safely: stored durably, or its bytes
    /// kept until the destination acknowledges them (a failure there then fails the
    /// commit), so the source may go (a checkpoint's link is removed). `record` describes what was
    /// written (size and CRC-32 of the stored bytes, and of the original when compressed).
    fn finish(self: Box<Self>, record: &FileRecord) -> Result<()>;
}
