//! Reading one file into the sink: each byte is read once, checksummed once as it passes,
//! optionally compressed, and handed over in owned chunks. An SST, which nobody changes, is
//! mapped into memory rather than copied out of the page cache: its chunks are windows on
//! the mapping, which the sink may pass on without a copy either. Pages of the file that
//! were not in the page cache before are dropped from it again once read, so that a backup
//! leaves the server's cache as it found it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use super::compress::{self, Job};
use super::{Ctx, Item, Source};
use crate::error::{Error, IoContext, Result};
use crate::format::layout::ZSTD_SUFFIX;
use crate::format::manifest::{FileRecord, Kind, Original};
use crate::format::{combine_crc, read_full, FileMeta, CHUNK_SIZE};
use crate::pipeline::Buf;
use crate::sink::{Chunk, SinkFile};

/// Stores one item; returns its manifest record.
pub fn store(item: Item, ctx: &Ctx) -> Result<FileRecord> {
    match &item.source {
        Source::File { path, len, unlink } => {
            let record = store_file(&item.name, item.kind, path, *len, ctx)?;
            if *unlink {
                std::fs::remove_file(path).with_path("remove", path)?;
            }
            Ok(record)
        }
        Source::Bytes(bytes) => store_bytes(&item.name, item.kind, bytes, ctx),
    }
}

/// Whether a file of this kind is compressed. The backup's own small files stay readable:
/// scripts read `xtrabackup_binlog_info` where it lies.
fn compressed(kind: Kind, ctx: &Ctx) -> bool {
    ctx.compress.as_ref().is_some_and(|c| {
        kind != Kind::Metadata && kind != Kind::Logical && (c.ssts || kind != Kind::Sst)
    })
}

fn store_file(
    name: &str,
    kind: Kind,
    src: &Path,
    len: Option<u64>,
    ctx: &Ctx,
) -> Result<FileRecord> {
    // Never through a symbolic link: the checkpoint directory is the server's to write.
    let file = File::options()
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
    if len.is_some_and(|l| l > md.len()) {
        return Err(Error::Refused(format!(
            "{} is shorter than the {} bytes recorded for it",
            src.display(),
            len.unwrap_or_default()
        )));
    }
    let size = len.unwrap_or(md.len());
    let compress = compressed(kind, ctx);
    let mut meta = FileMeta {
        path: stored_name(name, compress),
        size: (!compress).then_some(size),
        mode: md.mode() & 0o7777,
        mtime: md.mtime(),
        uid: md.uid(),
        gid: md.gid(),
        kind,
        identity: None,
    };
    if kind == Kind::Sst && ctx.sink.wants_identity() {
        match crate::engine::sst::unique_id(&file, size) {
            Ok(Some(id)) => {
                meta.identity = Some(format!(
                    "{} {} {} {size}",
                    id.db_id, id.db_session_id, id.file_number
                ))
            }
            Ok(None) => {}
            Err(e) => crate::warn!("{}: no identity read ({e}): stored whole", src.display()),
        }
    }
    if let Some(record) = ctx.sink.lookup(&meta, size)? {
        ctx.progress.add(size);
        return Ok(record);
    }
    crate::sys::advise_sequential(&file);
    // SSTs are immutable: read where the page cache holds them. A file that cannot be
    // mapped is read the usual way.
    let map = match kind == Kind::Sst && len.is_none() && size > 0 {
        true => crate::sys::map_immutable(&file, size).ok().map(Arc::new),
        false => None,
    };
    let resident = match &map {
        Some(map) => crate::sys::resident_in(map),
        None => crate::sys::resident_pages(&file, size),
    };
    let file = Arc::new(file);
    let mut out = Writer::new(ctx, ctx.sink.open(&meta)?, compress);
    let piece = ctx.throttle.as_ref().map_or(CHUNK_SIZE, |t| t.piece());
    let mut offset = 0;
    while offset < size {
        ctx.cancel.check()?;
        let want = (size - offset).min(piece as u64) as usize;
        if let Some(t) = &ctx.throttle {
            t.take(want, &ctx.cancel)?;
        }
        if let Some(map) = &map {
            let buf = Buf::mapped(map.clone(), file.clone(), offset as usize, want);
            offset += want as u64;
            ctx.progress.add(want as u64);
            out.push(buf)?;
            continue;
        }
        let mut buf = ctx.pool.get(&ctx.cancel)?;
        let got = read_full(&mut &*file, &mut buf.space()[..want]).with_path("read", src)?;
        if got < want {
            return Err(Error::io(
                format!("cannot read {}", src.display()),
                std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!(
                        "the file shrank while being read: {size} bytes expected, {} found",
                        offset + got as u64
                    ),
                ),
            ));
        }
        buf.set_len(got);
        drop_unless_resident(&file, resident.as_deref(), offset, got as u64);
        offset += got as u64;
        ctx.progress.add(got as u64);
        out.push(buf)?;
    }
    let record = out.finish(name, kind)?;
    if map.is_some() {
        // The sink holds the file and every window on the mapping is gone: unmap it, then
        // drop what the backup brought into the cache.
        drop(map);
        drop_unless_resident(&file, resident.as_deref(), 0, size);
    }
    Ok(record)
}

fn store_bytes(name: &str, kind: Kind, bytes: &[u8], ctx: &Ctx) -> Result<FileRecord> {
    let compress = compressed(kind, ctx);
    let mut meta = FileMeta::generated(&stored_name(name, compress), bytes.len() as u64);
    meta.kind = kind;
    if compress {
        meta.size = None;
    }
    let mut out = Writer::new(ctx, ctx.sink.open(&meta)?, compress);
    for piece in bytes.chunks(CHUNK_SIZE) {
        let mut buf = ctx.pool.get(&ctx.cancel)?;
        buf.space()[..piece.len()].copy_from_slice(piece);
        buf.set_len(piece.len());
        ctx.progress.add(piece.len() as u64);
        out.push(buf)?;
    }
    out.finish(name, kind)
}

fn stored_name(name: &str, compress: bool) -> String {
    match compress {
        true => format!("{name}{ZSTD_SUFFIX}"),
        false => name.to_string(),
    }
}

/// Drops the pages of `[offset, offset + len)` that were not cached before the read.
fn drop_unless_resident(file: &File, resident: Option<&[bool]>, offset: u64, len: u64) {
    let Some(resident) = resident else { return };
    let page = crate::sys::page_size();
    let (first, end) = (offset / page, (offset + len).div_ceil(page));
    let mut run: Option<u64> = None;
    for p in first..=end {
        let cold = p < end && !resident.get(p as usize).copied().unwrap_or(true);
        match (cold, run) {
            (true, None) => run = Some(p),
            (false, Some(start)) => {
                crate::sys::drop_cache(file, start * page, (p - start) * page);
                run = None;
            }
            _ => {}
        }
    }
}

/// Checksums what is read and hands it to the sink, through the compression workers when
/// compressing (several chunks of the file at once, taken back in order).
struct Writer<'a> {
    ctx: &'a Ctx<'a>,
    file: Box<dyn SinkFile + 'a>,
    compress: bool,
    pending: VecDeque<crossbeam_channel::Receiver<Result<Chunk>>>,
    size: u64,
    crc: crc32fast::Hasher,
    stored_size: u64,
    stored_crc: crc32fast::Hasher,
}

impl<'a> Writer<'a> {
    fn new(ctx: &'a Ctx<'a>, file: Box<dyn SinkFile + 'a>, compress: bool) -> Writer<'a> {
        Writer {
            ctx,
            file,
            compress,
            pending: VecDeque::new(),
            size: 0,
            crc: crc32fast::Hasher::new(),
            stored_size: 0,
            stored_crc: crc32fast::Hasher::new(),
        }
    }

    fn push(&mut self, data: super::Buf) -> Result<()> {
        let crc32 = crc32fast::hash(&data);
        combine_crc(&mut self.crc, crc32, data.len());
        self.size += data.len() as u64;
        let chunk = Chunk { data, crc32 };
        match (self.compress, &self.ctx.compress) {
            (true, Some(c)) => {
                let (reply, result) = crossbeam_channel::bounded(1);
                let job = Job {
                    output: c.pool.get(&self.ctx.cancel)?,
                    input: chunk.data,
                    reply,
                };
                c.jobs.send(job).expect("workers outlive readers");
                self.pending.push_back(result);
                if self.pending.len() >= c.depth {
                    self.take_one()?;
                }
                Ok(())
            }
            _ => self.put(chunk),
        }
    }

    fn take_one(&mut self) -> Result<()> {
        let result = self.pending.pop_front().expect("a chunk is pending");
        let chunk = result
            .recv()
            .map_err(|_| Error::Refused("a compression worker stopped".into()))??;
        self.put(chunk)
    }

    fn put(&mut self, chunk: Chunk) -> Result<()> {
        compress::add_crc(&mut self.stored_crc, &chunk);
        self.stored_size += chunk.data.len() as u64;
        self.file.write(chunk)
    }

    fn finish(mut self, name: &str, kind: Kind) -> Result<FileRecord> {
        if self.compress && self.size == 0 {
            // An empty file still becomes one zstd frame: `.zst` files are never empty.
            self.push(self.ctx.pool.get(&self.ctx.cancel)?)?;
        }
        while !self.pending.is_empty() {
            self.take_one()?;
        }
        let Writer {
            file,
            compress,
            size,
            crc,
            stored_size,
            stored_crc,
            ..
        } = self;
        let original = compress.then(|| Original {
            path: name.to_string(),
            size,
            crc32: crc.clone().finalize(),
        });
        let record = FileRecord {
            path: stored_name(name, compress),
            size: stored_size,
            crc32: stored_crc.finalize(),
            kind,
            original,
        };
        file.finish(&record)?;
        Ok(record)
    }
}
