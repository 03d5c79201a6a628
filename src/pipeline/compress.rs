//! zstd compression on all cores, and decompression for the readers of a backup.
//!
//! Each chunk of a file is compressed on its own, into one zstd frame, by a pool of
//! workers; a file's frames, concatenated in order, are a valid `.zst` file (`zstd -d`
//! reads it, and so does every decoder here). A reader keeps several chunks of one file
//! in the workers at once, so one large file keeps every core busy.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use crossbeam_channel::{Receiver, Sender};

use super::Buf;
use crate::error::{Error, IoContext, Result};
use crate::format::combine_crc;
use crate::sink::Chunk;

/// `--compress=zstd[:LEVEL]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    pub level: i32,
    /// SSTs too: MyRocks SSTs are usually compressed block by block already, so where
    /// compression is a default (a repository) it leaves them as they are.
    pub ssts: bool,
}

impl Compression {
    pub const DEFAULT_LEVEL: i32 = 3;

    /// As recorded in the manifest: `zstd:3`.
    pub fn label(&self) -> String {
        format!("zstd:{}", self.level)
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Compression, String> {
        let (algo, level) = s.split_once(':').unwrap_or((s, ""));
        if algo != "zstd" {
            return Err(format!("{algo:?}: the only compression is zstd"));
        }
        let level = match level {
            "" => Compression::DEFAULT_LEVEL,
            l => l
                .parse::<i32>()
                .ok()
                .filter(|l| zstd::compression_level_range().contains(l))
                .ok_or_else(|| {
                    let r = zstd::compression_level_range();
                    format!(
                        "zstd level {l:?}: give a number from {} to {}",
                        r.start(),
                        r.end()
                    )
                })?,
        };
        Ok(Compression { level, ssts: true })
    }
}

/// A chunk on its way through a worker: the bytes to compress, the buffer for the result,
/// and where to send it.
pub struct Job {
    pub input: Buf,
    pub output: Buf,
    pub reply: Sender<Result<Chunk>>,
}

/// Largest output of a chunk of `len` bytes.
pub fn bound(len: usize) -> usize {
    zstd::zstd_safe::compress_bound(len)
}

/// A compression worker: takes jobs until every sender is gone.
pub fn worker(jobs: Receiver<Job>, level: i32) {
    let mut compressor = match zstd::bulk::Compressor::new(level) {
        Ok(c) => c,
        Err(e) => {
            for job in jobs {
                let _ = job
                    .reply
                    .send(Err(Error::io("cannot start zstd", e.kind().into())));
            }
            return;
        }
    };
    for mut job in jobs {
        let result = compressor
            .compress_to_buffer(&job.input[..], job.output.space())
            .map(|n| {
                job.output.set_len(n);
                let crc32 = crc32fast::hash(&job.output);
                Chunk {
                    data: job.output,
                    crc32,
                }
            })
            .context(|| "zstd could not compress a chunk".into());
        let _ = job.reply.send(result);
    }
}

/// Size and CRC-32 of what a `.zst` file decodes to, writing the decoded bytes to `out`
/// when given.
pub fn decode_file(src: &Path, mut out: Option<&mut File>) -> Result<(u64, u32)> {
    let file = File::open(src).with_path("open", src)?;
    let mut decoder = zstd::stream::read::Decoder::new(file).with_path("read", src)?;
    let mut buf = vec![0u8; crate::format::CHUNK_SIZE];
    let (mut size, mut crc) = (0u64, crc32fast::Hasher::new());
    loop {
        // A disk that fails to read is not a damaged backup.
        let n = crate::format::read_full(&mut decoder, &mut buf).map_err(|e| {
            match e.raw_os_error() {
                Some(_) => Error::io(format!("cannot read {}", src.display()), e),
                None => Error::Corrupt(format!("{} does not decompress: {e}", src.display())),
            }
        })?;
        if n == 0 {
            return Ok((size, crc.finalize()));
        }
        crc.update(&buf[..n]);
        size += n as u64;
        if let Some(out) = out.as_deref_mut() {
            out.write_all(&buf[..n])
                .context(|| format!("cannot write what {} decodes to", src.display()))?;
        }
    }
}

/// Decodes a `.zst` file that arrives in pieces (from a stream) into `out`, keeping the
/// size and CRC-32 of what it decodes to.
pub struct StreamDecoder<W: Write> {
    inner: zstd::stream::write::Decoder<'static, Counted<W>>,
}

impl<W: Write> StreamDecoder<W> {
    pub fn new(out: W) -> std::io::Result<StreamDecoder<W>> {
        let counted = Counted {
            out,
            size: 0,
            crc: crc32fast::Hasher::new(),
        };
        Ok(StreamDecoder {
            inner: zstd::stream::write::Decoder::new(counted)?,
        })
    }

    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(data)
    }

    /// The writer, and the size and CRC-32 of everything decoded.
    pub fn finish(self) -> std::io::Result<(W, u64, u32)> {
        // Fails when the input does not end with a whole frame.
        let counted = self.inner.finish()?;
        let crc = counted.crc.finalize();
        Ok((counted.out, counted.size, crc))
    }
}

/// A writer that counts and checksums what passes through it.
pub struct Counted<W> {
    out: W,
    size: u64,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.crc.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Appends a compressed chunk's CRC to a running CRC (the stored bytes' checksum).
pub fn add_crc(crc: &mut crc32fast::Hasher, chunk: &Chunk) {
    combine_crc(crc, chunk.crc32, chunk.data.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_bad_ones_are_refused() {
        assert_eq!("zstd".parse::<Compression>().unwrap().level, 3);
        assert_eq!("zstd:19".parse::<Compression>().unwrap().level, 19);
        assert!("gzip".parse::<Compression>().is_err());
        assert!("zstd:99".parse::<Compression>().is_err());
        assert!("zstd:x".parse::<Compression>().is_err());
    }

    #[test]
    fn concatenated_chunk_frames_decode_to_the_file() {
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut stored = Vec::new();
        for piece in data.chunks(100_000) {
            stored.extend(zstd::bulk::compress(piece, 3).unwrap());
        }
        assert_eq!(zstd::stream::decode_all(&stored[..]).unwrap(), data);
        let mut dec = StreamDecoder::new(Vec::new()).unwrap();
        for piece in stored.chunks(777) {
            dec.write(piece).unwrap();
        }
        let (out, size, crc) = dec.finish().unwrap();
        assert_eq!((out.len() as u64, crc), (size, crc32fast::hash(&data)));
    }
}
