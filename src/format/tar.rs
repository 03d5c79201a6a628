//! Tar: a streaming writer producing ONE archive for the whole backup (GNU format: long
//! names as `././@LongLink` records, sizes of 8 GiB and more in base-256), and a strict
//! reader. The reader checks every header checksum in its canonical form, so any damaged
//! header is detected, and it reads archives glued together (the original tool wrote one
//! archive per file) by skipping zero blocks between them, as `tar -i` does.

use std::io::Read;

use super::{read_full, Encoder, FileMeta, Output, CHUNK_SIZE};
use super::{Attrs, Unpack};
use crate::error::{Error, IoContext, Result};

pub const BLOCK: usize = 512;
const NAME_LEN: usize = 100;
const GNU_MAGIC: &[u8; 8] = b"ustar  \0";
const POSIX_MAGIC: &[u8; 6] = b"ustar\0";
/// Longest name or PAX header we accept: a bound on memory for hostile input.
const MAX_META_LEN: u64 = 1 << 20;

/// Writes one tar archive to `out`.
pub struct TarWriter<W: Output> {
    out: W,
    expected: u64,
    written: u64,
}

impl<W: Output> TarWriter<W> {
    pub fn new(out: W) -> TarWriter<W> {
        TarWriter {
            out,
            expected: 0,
            written: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .put(bytes)
            .context(|| "cannot write the tar stream".into())
    }
}

impl<W: Output> Encoder for TarWriter<W> {
    fn begin_file(&mut self, meta: &FileMeta) -> Result<()> {
        let Some(size) = meta.size else {
            return Err(Error::Usage(format!(
                "tar needs the size of {} before its bytes, and a compressed file has none until it is written: \
                 compress into xbstream (--stream xbstream) or a directory (--target-dir)",
                meta.path
            )));
        };
        let name = meta.path.as_bytes();
        if name.len() > NAME_LEN {
            // GNU long name: a pseudo-entry whose data is the full name, NUL-terminated.
            let mut long = name.to_vec();
            long.push(0);
            let head = header(b"././@LongLink", long.len() as u64, 0o644, 0, 0, 0, b'L');
            long.resize(padded(long.len() as u64) as usize, 0);
            self.put(&head)?;
            self.put(&long)?;
        }
        let head = header(
            &name[..name.len().min(NAME_LEN)],
            size,
            meta.mode,
            meta.mtime,
            meta.uid,
            meta.gid,
            b'0',
        );
        self.put(&head)?;
        self.expected = size;
        self.written = 0;
        Ok(())
    }

    fn write_chunk(&mut self, data: &[u8], _crc32: u32, pages: bool) -> Result<()> {
        self.written += data.len() as u64;
        debug_assert!(self.written <= self.expected);
        match pages {
            true => self
                .out
                .put_pages(data)
                .context(|| "cannot write the tar stream".into()),
            false => self.put(data),
        }
    }

    fn end_file(&mut self) -> Result<()> {
        assert_eq!(self.written, self.expected, "tar entry size mismatch");
        let pad = (padded(self.written) - self.written) as usize;
        self.put(&[0; BLOCK][..pad])
    }

    fn finish(&mut self) -> Result<()> {
        self.put(&[0; 2 * BLOCK])?;
        self.out
            .flush()
            .context(|| "cannot write the tar stream".into())
    }
}

fn padded(len: u64) -> u64 {
    len.div_ceil(BLOCK as u64) * BLOCK as u64
}

fn header(
    name: &[u8],
    size: u64,
    mode: u32,
    mtime: i64,
    uid: u32,
    gid: u32,
    kind: u8,
) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name);
    put_number(&mut h[100..108], u64::from(mode & 0o7777));
    put_number(&mut h[108..116], u64::from(uid));
    put_number(&mut h[116..124], u64::from(gid));
    put_number(&mut h[124..136], size);
    put_number(&mut h[136..148], mtime.max(0) as u64);
    h[156] = kind;
    h[257..265].copy_from_slice(GNU_MAGIC);
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Octal with a NUL terminator when it fits, GNU base-256 otherwise.
fn put_number(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    if value < 1u64 << (3 * digits) {
        field[..digits].copy_from_slice(format!("{value:0digits$o}").as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        let be = value.to_be_bytes();
        let n = field.len();
        field[n - 8..].copy_from_slice(&be);
        field[0] = 0x80;
    }
}

/// True when `block` is a tar header with a valid checksum.
pub fn looks_like_header(block: &[u8]) -> bool {
    verify_checksum(block).is_ok()
}

/// The checksum field must be in a form real writers produce (six octal digits, NUL,
/// space; or seven digits and NUL) and match: lenient parsing would let a damaged
/// terminator pass unnoticed.
fn verify_checksum(h: &[u8]) -> std::result::Result<(), String> {
    let field = &h[148..156];
    let digits = match field {
        [d @ .., 0, b' '] if d.len() == 6 => d,
        [d @ .., 0] if d.len() == 7 => d,
        _ => return Err("malformed header checksum field".into()),
    };
    if !digits.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return Err("malformed header checksum field".into());
    }
    let stored = digits
        .iter()
        .fold(0u32, |acc, &d| acc * 8 + u32::from(d - b'0'));
    let sum: u32 = h[..148]
        .iter()
        .chain(&h[156..])
        .map(|&b| u32::from(b))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    if stored != sum {
        return Err(format!(
            "header checksum mismatch (stored {stored}, computed {sum})"
        ));
    }
    Ok(())
}

/// Parses a numeric field: octal (leading spaces, NUL or space terminated) or base-256.
fn number(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        if field[0] != 0x80 {
            return None; // negative
        }
        // Big-endian in the remaining bytes; None when larger than 64 bits.
        return field[1..]
            .iter()
            .try_fold(0u64, |v, &b| v.checked_mul(256)?.checked_add(u64::from(b)));
    }
    let text = field.iter().skip_while(|&&b| b == b' ');
    let mut value: u64 = 0;
    let mut ended = false;
    for &b in text {
        match b {
            b'0'..=b'7' if !ended => value = value.checked_mul(8)? + u64::from(b - b'0'),
            0 | b' ' => ended = true,
            _ => return None,
        }
    }
    Some(value)
}

fn text(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Reads a tar stream (or several glued together) and hands its files to `out`.
/// Returns the number of files.
pub fn read(input: &mut (impl Read + ?Sized), out: &mut dyn Unpack) -> Result<u64> {
    let mut r = Reader { input, offset: 0 };
    let mut files = 0;
    let mut after_zero_block = false;
    let mut long_name: Option<String> = None;
    let mut pax = Pax::default();
    let mut block = [0u8; BLOCK];
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let at = r.offset;
        let got = r.fill(&mut block)?;
        if got == 0 {
            if after_zero_block {
                return Ok(files);
            }
            return Err(Error::Corrupt(format!(
                "the tar stream ends at byte {at} without an end-of-archive marker: it is truncated"
            )));
        }
        if got < BLOCK {
            return Err(Error::Corrupt(format!(
                "the tar stream is truncated inside a header at byte {at}"
            )));
        }
        if block.iter().all(|&b| b == 0) {
            after_zero_block = true;
            continue;
        }
        after_zero_block = false;
        verify_checksum(&block)
            .map_err(|why| Error::Corrupt(format!("corrupt tar header at byte {at}: {why}")))?;
        let size = number(&block[124..136]).ok_or_else(|| {
            Error::Corrupt(format!("corrupt tar header at byte {at}: bad size field"))
        })?;
        let kind = block[156];
        match kind {
            b'L' | b'K' | b'x' | b'g' => {
                if size > MAX_META_LEN {
                    return Err(Error::Corrupt(format!(
                        "tar metadata record at byte {at} claims {size} bytes: not plausible"
                    )));
                }
                let data = r.read_meta(size)?;
                match kind {
                    b'L' => long_name = Some(utf8(text(&data), at)?),
                    b'x' => pax = Pax::parse(&data, at)?,
                    _ => {} // long link names and global PAX headers: nothing we use
                }
                continue;
            }
            _ => {}
        }
        let name = match (long_name.take(), pax.path.take()) {
            (_, Some(p)) => p,
            (Some(l), None) => l,
            (None, None) => {
                let mut name = text(&block[..NAME_LEN]).to_vec();
                let prefix = text(&block[345..500]);
                if &block[257..263] == POSIX_MAGIC && !prefix.is_empty() {
                    name = [prefix, b"/", &name].concat();
                }
                utf8(&name, at)?
            }
        };
        let size = pax.size.take().unwrap_or(size);
        let mtime = pax
            .mtime
            .take()
            .or_else(|| number(&block[136..148]).map(|t| t as i64));
        let attrs = number(&block[100..108])
            .zip(mtime)
            .map(|(mode, mtime)| Attrs {
                mode: mode as u32 & 0o7777,
                mtime,
            });
        match kind {
            b'0' | b'\0' | b'7' => {
                let mut done = 0;
                while done < size {
                    let want = (size - done).min(buf.len() as u64) as usize;
                    let got = r.fill(&mut buf[..want])?;
                    if got < want {
                        return Err(Error::Corrupt(format!(
                            "the tar stream is truncated in {name:?} at byte {} of {size} (stream byte {})",
                            done + got as u64,
                            r.offset
                        )));
                    }
                    let piece = &buf[..got];
                    out.write(&name, done, piece, crc32fast::hash(piece))?;
                    done += got as u64;
                }
                r.skip_padding(size, &name)?;
                out.end_file(&name, attrs)?;
                files += 1;
            }
            b'5' if size == 0 => out.directory(&name, attrs)?,
            other => {
                let what = match other {
                    b'1' => "a hard link",
                    b'2' => "a symbolic link",
                    b'3' | b'4' => "a device node",
                    b'6' => "a FIFO",
                    b'S' => "a sparse file",
                    _ => "an entry of an unknown type",
                };
                return Err(Error::Refused(format!(
                    "{name:?} at byte {at} is {what}: backups hold only regular files and directories"
                )));
            }
        }
    }
}

/// Values from a PAX extended header that apply to the next entry.
#[derive(Default)]
struct Pax {
    path: Option<String>,
    size: Option<u64>,
    mtime: Option<i64>,
}

impl Pax {
    fn parse(data: &[u8], at: u64) -> Result<Pax> {
        let bad = || Error::Corrupt(format!("corrupt PAX header at byte {at}"));
        let mut pax = Pax::default();
        let mut rest = data;
        while !rest.is_empty() && rest[0] != 0 {
            let space = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
            let len: usize = std::str::from_utf8(&rest[..space])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
            if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
                return Err(bad());
            }
            let record = &rest[space + 1..len - 1];
            let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
            let value = &record[eq + 1..];
            match &record[..eq] {
                b"path" => pax.path = Some(utf8(value, at)?),
                b"size" => {
                    pax.size = Some(
                        std::str::from_utf8(value)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(bad)?,
                    )
                }
                b"mtime" => {
                    let secs = value.split(|&b| b == b'.').next().unwrap_or(value);
                    pax.mtime = std::str::from_utf8(secs).ok().and_then(|s| s.parse().ok());
                }
                _ => {}
            }
            rest = &rest[len..];
        }
        Ok(pax)
    }
}

fn utf8(bytes: &[u8], at: u64) -> Result<String> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| Error::Corrupt(format!("the entry name at byte {at} is not valid UTF-8")))
}

/// The input, with the count of bytes consumed so that errors can say where.
struct Reader<'a, R: Read + ?Sized> {
    input: &'a mut R,
    offset: u64,
}

impl<R: Read + ?Sized> Reader<'_, R> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let got = read_full(self.input, buf).context(|| "cannot read the input stream".into())?;
        self.offset += got as u64;
        Ok(got)
    }

    fn read_meta(&mut self, size: u64) -> Result<Vec<u8>> {
        let mut data = vec![0; size as usize];
        if self.fill(&mut data)? < data.len() {
            return Err(Error::Corrupt(format!(
                "the tar stream is truncated at byte {}",
                self.offset
            )));
        }
        self.skip_padding(size, "a metadata record")?;
        Ok(data)
    }

    fn skip_padding(&mut self, size: u64, name: &str) -> Result<()> {
        let pad = (padded(size) - size) as usize;
        let mut padding = [0u8; BLOCK];
        if self.fill(&mut padding[..pad])? < pad {
            return Err(Error::Corrupt(format!(
                "the tar stream is truncated after {name:?} (stream byte {})",
                self.offset
            )));
        }
        // Writers pad with zeros; anything else is damage.
        if padding.iter().any(|&b| b != 0) {
            return Err(Error::Corrupt(format!(
                "corrupt tar stream: non-zero padding after {name:?} (stream byte {})",
                self.offset
            )));
        }
        Ok(())
    }
}
