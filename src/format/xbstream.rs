//! xbstream, the chunk format of Percona's `xbstream` and MariaDB's `mbstream`: no header or
//! trailer, each chunk is `XBSTCK01`, flags, type (`P` payload or `E` end of file), path, and
//! for payloads their length, file offset, zlib CRC-32 and bytes; integers little-endian.
//!
//! The writer refuses paths that `mbstream -x` cannot extract (it would skip them and
//! still exit 0). The reader verifies every CRC, that each file's offsets are contiguous
//! from 0, and that every started file is ended.

use std::collections::{HashMap, HashSet};
use std::io::Read;

use super::Unpack;
use super::{combine_crc, read_full, Encoder, FileMeta, Output, CHUNK_SIZE};
use crate::error::{Error, IoContext, Result};

pub const MAGIC: &[u8; 8] = b"XBSTCK01";
/// `mbstream` rejects paths of 512 bytes or more.
const MAX_WRITE_PATH: usize = 511;
/// What we accept when reading (Percona's xbstream allows longer paths than mbstream).
const MAX_READ_PATH: u32 = 4096;
/// `mbstream` allocates a buffer per chunk; real writers stay at or under 10 MiB.
const MAX_WRITE_PAYLOAD: usize = 10 << 20;
/// A bound for hostile or damaged input.
const MAX_READ_PAYLOAD: u64 = 64 << 20;

/// Writes an xbstream stream to `out`.
pub struct XbstreamWriter<W: Output> {
    out: W,
    path: Vec<u8>,
    offset: u64,
    expected: Option<u64>,
    /// Directories that `mbstream -x` will have created by the time it reaches a file:
    /// it creates a file's immediate parent, nothing above it.
    dirs: HashSet<String>,
    head: Vec<u8>,
}

impl<W: Output> XbstreamWriter<W> {
    pub fn new(out: W) -> XbstreamWriter<W> {
        XbstreamWriter {
            out,
            path: Vec::new(),
            offset: 0,
            expected: None,
            dirs: HashSet::new(),
            head: Vec::with_capacity(64 + MAX_WRITE_PATH),
        }
    }

    fn start_chunk(&mut self, kind: u8) {
        self.head.clear();
        self.head.extend_from_slice(MAGIC);
        self.head.push(0);
        self.head.push(kind);
        self.head
            .extend_from_slice(&(self.path.len() as u32).to_le_bytes());
        self.head.extend_from_slice(&self.path);
    }

    fn put(out: &mut W, bytes: &[u8]) -> Result<()> {
        out.put(bytes)
            .context(|| "cannot write the xbstream stream".into())
    }

    /// Refuses what `mbstream -x` would not extract.
    fn check_path(&self, path: &str) -> Result<()> {
        let refuse = |why: String| {
            Err(Error::Refused(format!(
                "xbstream cannot carry {path:?}: {why} (mbstream -x would skip it); use --stream=tar"
            )))
        };
        if path.len() > MAX_WRITE_PATH {
            return refuse(format!(
                "the path is {} bytes, mbstream takes at most {MAX_WRITE_PATH}",
                path.len()
            ));
        }
        if path.starts_with('.') || path.starts_with('/') {
            return refuse("it starts with `.` or `/`".into());
        }
        if path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return refuse("it has an empty, `.` or `..` component".into());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            if let Some((grandparent, _)) = parent.rsplit_once('/') {
                if !self.dirs.contains(grandparent) {
                    return refuse(format!(
                        "mbstream creates only a file's immediate parent directory, and no earlier file created {grandparent}/"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl<W: Output> Encoder for XbstreamWriter<W> {
    fn begin_file(&mut self, meta: &FileMeta) -> Result<()> {
        self.check_path(&meta.path)?;
        if let Some((parent, _)) = meta.path.rsplit_once('/') {
            self.dirs.insert(parent.to_string());
        }
        self.path = meta.path.as_bytes().to_vec();
        self.offset = 0;
        self.expected = meta.size;
        Ok(())
    }

    fn write_chunk(&mut self, data: &[u8], crc32: u32, pages: bool) -> Result<()> {
        assert!(data.len() <= MAX_WRITE_PAYLOAD, "xbstream chunk too large");
        self.start_chunk(b'P');
        self.head
            .extend_from_slice(&(data.len() as u64).to_le_bytes());
        self.head.extend_from_slice(&self.offset.to_le_bytes());
        self.head.extend_from_slice(&crc32.to_le_bytes());
        Self::put(&mut self.out, &self.head)?;
        match pages {
            true => self
                .out
                .put_pages(data)
                .context(|| "cannot write the xbstream stream".into())?,
            false => Self::put(&mut self.out, data)?,
        }
        self.offset += data.len() as u64;
        Ok(())
    }

    fn end_file(&mut self) -> Result<()> {
        if let Some(expected) = self.expected {
            assert_eq!(self.offset, expected, "xbstream file size mismatch");
        }
        self.start_chunk(b'E');
        Self::put(&mut self.out, &self.head)
    }

    fn finish(&mut self) -> Result<()> {
        self.out
            .flush()
            .context(|| "cannot write the xbstream stream".into())
    }
}

/// Reads an xbstream stream and hands its files to `out`. Returns the number of files.
pub fn read(input: &mut (impl Read + ?Sized), out: &mut dyn Unpack) -> Result<u64> {
    let mut at: u64 = 0;
    let mut fill = |buf: &mut [u8], at: &mut u64| -> Result<usize> {
        let got = read_full(input, buf).context(|| "cannot read the input stream".into())?;
        *at += got as u64;
        Ok(got)
    };
    let truncated =
        |at: u64| Error::Corrupt(format!("the xbstream stream is truncated at byte {at}"));
    // Next expected offset of every file started and not yet ended.
    let mut open: HashMap<String, u64> = HashMap::new();
    let mut ended: HashSet<String> = HashSet::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let chunk_at = at;
        let mut fixed = [0u8; 14];
        match fill(&mut fixed, &mut at)? {
            0 => break,
            14 => {}
            _ => return Err(truncated(at)),
        }
        if &fixed[..8] != MAGIC {
            return Err(Error::Corrupt(format!(
                "corrupt xbstream: no chunk magic at byte {chunk_at}"
            )));
        }
        let (flags, kind) = (fixed[8], fixed[9]);
        if flags != 0 || (kind != b'P' && kind != b'E') {
            return Err(Error::Corrupt(format!(
                "corrupt xbstream: unsupported chunk (flags {flags:#x}, type {kind:#x}) at byte {chunk_at}"
            )));
        }
        let path_len = u32::from_le_bytes(fixed[10..14].try_into().unwrap());
        if path_len == 0 || path_len > MAX_READ_PATH {
            return Err(Error::Corrupt(format!(
                "corrupt xbstream: path length {path_len} at byte {chunk_at}"
            )));
        }
        let mut path = vec![0u8; path_len as usize];
        if fill(&mut path, &mut at)? < path.len() {
            return Err(truncated(at));
        }
        let path = String::from_utf8(path).map_err(|_| {
            Error::Corrupt(format!(
                "corrupt xbstream: path at byte {chunk_at} is not UTF-8"
            ))
        })?;
        if ended.contains(&path) {
            return Err(Error::Corrupt(format!(
                "corrupt xbstream: {path:?} appears again at byte {chunk_at} after it ended"
            )));
        }
        if kind == b'E' {
            open.remove(&path);
            out.end_file(&path, None)?;
            ended.insert(path);
            continue;
        }
        let mut payload_head = [0u8; 20];
        if fill(&mut payload_head, &mut at)? < 20 {
            return Err(truncated(at));
        }
        let len = u64::from_le_bytes(payload_head[..8].try_into().unwrap());
        let offset = u64::from_le_bytes(payload_head[8..16].try_into().unwrap());
        let stored_crc = u32::from_le_bytes(payload_head[16..20].try_into().unwrap());
        if len > MAX_READ_PAYLOAD {
            return Err(Error::Corrupt(format!(
                "corrupt xbstream: chunk of {path:?} at byte {chunk_at} claims {len} bytes"
            )));
        }
        let next = open.entry(path.clone()).or_insert(0);
        if offset != *next {
            return Err(Error::Corrupt(format!(
                "corrupt xbstream: chunk of {path:?} at byte {chunk_at} is for file offset {offset}, expected {next}"
            )));
        }
        let mut crc = crc32fast::Hasher::new();
        let mut done = 0;
        while done < len {
            let want = (len - done).min(buf.len() as u64) as usize;
            if fill(&mut buf[..want], &mut at)? < want {
                return Err(Error::Corrupt(format!(
                    "the xbstream stream is truncated in {path:?} at file offset {} (stream byte {at})",
                    offset + done
                )));
            }
            let piece = &buf[..want];
            let piece_crc = crc32fast::hash(piece);
            combine_crc(&mut crc, piece_crc, want);
            out.write(&path, offset + done, piece, piece_crc)?;
            done += want as u64;
        }
        let crc = crc.finalize();
        if crc != stored_crc {
            return Err(Error::Corrupt(format!(
                "corrupt xbstream: CRC mismatch in {path:?} at file offset {offset} (stream byte {chunk_at}): stored {stored_crc:#010x}, computed {crc:#010x}"
            )));
        }
        *next += len;
    }
    if let Some(path) = open.keys().min() {
        return Err(Error::Corrupt(format!(
            "the xbstream stream is truncated: it ends at byte {at} before the end of {path:?}"
        )));
    }
    if ended.is_empty() && at == 0 {
        return Err(Error::Corrupt("the input is empty".into()));
    }
    Ok(ended.len() as u64)
}
