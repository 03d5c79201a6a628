//! `extract`: unpacks a tar or xbstream stream into a directory, safely. Nothing lands
//! outside the target (no absolute paths, no `..`, no symlinked parents), nothing existing
//! is overwritten, and when the stream turns out damaged everything this run created is
//! removed again, so that a half-extracted backup can never be mistaken for a whole one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Cursor, ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, IoContext, Result};
use crate::format::layout::{BEGIN_NAME, MANIFEST_NAME, ZSTD_SUFFIX};
use crate::format::manifest;
use crate::format::{self, combine_crc, read_full, safe_components, Attrs, Format, Unpack};
use crate::pipeline::compress::StreamDecoder;

/// What an extraction produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub format: Format,
    pub files: u64,
    pub bytes: u64,
}

/// Extracts the stream `input` into `target` (created if missing; its parent must exist).
/// A stream written by this tool is checked against its manifest: every file's size and
/// CRC-32, and that nothing is missing or extra. Files it stored compressed are decoded on
/// the way (and checked against their originals' CRC-32), unless `keep_compressed`.
pub fn extract(input: &mut dyn Read, target: &Path, keep_compressed: bool) -> Result<Summary> {
    let mut head = vec![0u8; format::tar::BLOCK];
    let n = read_full(input, &mut head).context(|| "cannot read the input stream".into())?;
    head.truncate(n);
    let detected = Format::detect(&head)?;
    let mut stream = Cursor::new(head).chain(input);
    let mut unpacker = Extractor::new(target)?;
    unpacker.may_decode = !keep_compressed;
    let result = match detected {
        Format::Tar => format::tar::read(&mut stream, &mut unpacker),
        Format::Xbstream => format::xbstream::read(&mut stream, &mut unpacker),
    }
    .and_then(|files| unpacker.finish().map(|()| files));
    match result {
        Ok(files) => Ok(Summary {
            format: detected,
            files,
            bytes: unpacker.bytes,
        }),
        Err(err) => {
            unpacker.remove_created();
            Err(err)
        }
    }
}

/// Creates files under a root directory as an archive reader decodes them.
struct Extractor {
    root: PathBuf,
    open: HashMap<String, OpenFile>,
    /// Every file extracted: its normalised path, size and CRC-32.
    received: BTreeMap<String, (u64, u32)>,
    /// Everything this run created, in creation order, for the clean-up after a failure.
    created: Vec<PathBuf>,
    known_dirs: HashSet<PathBuf>,
    dir_attrs: Vec<(PathBuf, Attrs)>,
    bytes: u64,
    /// Decode what the stream's marker says is compressed.
    may_decode: bool,
    /// The marker said the stream's `.zst` files are compressed by the backup.
    compressed: bool,
    /// Stored name → size and CRC-32 of what it decoded to.
    decoded: BTreeMap<String, (u64, u32)>,
}

impl Extractor {
    fn new(root: &Path) -> Result<Extractor> {
        let mut created = Vec::new();
        match fs::symlink_metadata(root) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(Error::Refused(format!(
                    "{} exists and is not a directory",
                    root.display()
                )))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir(root).with_path("create directory", root)?;
                created.push(root.to_path_buf());
            }
            Err(e) => return Err(Error::io(format!("cannot stat {}", root.display()), e)),
        }
        Ok(Extractor {
            root: root.to_path_buf(),
            open: HashMap::new(),
            received: BTreeMap::new(),
            created,
            known_dirs: HashSet::from([root.to_path_buf()]),
            dir_attrs: Vec::new(),
            bytes: 0,
            may_decode: true,
            compressed: false,
            decoded: BTreeMap::new(),
        })
    }

    /// Makes sure `dir` (under the root) exists as a real directory, creating what is missing.
    fn ensure_dir(&mut self, parts: &[&str]) -> Result<PathBuf> {
        let mut dir = self.root.clone();
        for part in parts {
            dir.push(part);
            if self.known_dirs.contains(&dir) {
                continue;
            }
            match fs::symlink_metadata(&dir) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    return Err(Error::Refused(format!(
                        "{} exists and is not a directory (symbolic links are not followed)",
                        dir.display()
                    )))
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    fs::create_dir(&dir).with_path("create directory", &dir)?;
                    self.created.push(dir.clone());
                }
                Err(e) => return Err(Error::io(format!("cannot stat {}", dir.display()), e)),
            }
            self.known_dirs.insert(dir.clone());
        }
        Ok(dir)
    }

    fn create_file(&mut self, path: &str) -> Result<OpenFile> {
        let parts = safe_components(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(Error::Corrupt(format!(
                "the stream has a file with the empty name {path:?}"
            )));
        };
        let stored = parts.join("/");
        let plain = name.strip_suffix(ZSTD_SUFFIX).filter(|_| self.compressed);
        let full = self.ensure_dir(parents)?.join(plain.unwrap_or(name));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&full)
            .map_err(|e| match e.kind() {
                ErrorKind::AlreadyExists => Error::Refused(format!(
                    "{} already exists; extract refuses to overwrite files",
                    full.display()
                )),
                _ => Error::io(format!("cannot create {}", full.display()), e),
            })?;
        self.created.push(full.clone());
        let decoder = match plain {
            Some(_) => Some(
                file.try_clone()
                    .and_then(StreamDecoder::new)
                    .with_path("decode into", &full)?,
            ),
            None => None,
        };
        Ok(OpenFile {
            file,
            decoder,
            name: stored,
            written: 0,
            submitted: 0,
            dropped: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    /// Checks the manifest, applies directory attributes, then makes it all durable.
    fn finish(&mut self) -> Result<()> {
        assert!(self.open.is_empty(), "readers end every file they start");
        let manifest = match self.received.contains_key(MANIFEST_NAME) {
            true => {
                let path = self.root.join(MANIFEST_NAME);
                Some(fs::read(&path).with_path("read", &path)?)
            }
            false => None,
        };
        manifest::verify_received(&self.received, manifest.as_deref())?;
        if let (false, Some(json)) = (self.decoded.is_empty(), &manifest) {
            let m: manifest::Manifest<serde_json::Value> = manifest::Manifest::parse(json)?;
            for f in &m.files {
                let Some(&(size, crc)) = self.decoded.get(&f.path) else {
                    continue;
                };
                match &f.original {
                    Some(o) if (o.size, o.crc32) == (size, crc) => {}
                    Some(o) => {
                        return Err(Error::Corrupt(format!(
                            "{:?} decodes to {size} bytes with CRC-32 {crc:08x}, the manifest says {} bytes with {:08x}",
                            f.path, o.size, o.crc32
                        )))
                    }
                    None => {
                        return Err(Error::Corrupt(format!(
                            "{:?} was decoded, but the manifest does not list it as compressed",
                            f.path
                        )))
                    }
                }
            }
        }
        for (dir, attrs) in self.dir_attrs.iter().rev() {
            set_attrs(dir, None, *attrs)?;
        }
        crate::sys::syncfs(&self.root)
    }

    fn remove_created(&mut self) {
        self.open.clear();
        for path in self.created.iter().rev() {
            let _ = fs::remove_file(path).or_else(|_| fs::remove_dir(path));
        }
    }
}

impl Unpack for Extractor {
    fn write(&mut self, path: &str, offset: u64, data: &[u8], crc32: u32) -> Result<()> {
        if !self.open.contains_key(path) {
            assert_eq!(offset, 0, "readers check that files start at offset 0");
            let file = self.create_file(path)?;
            self.open.insert(path.to_string(), file);
        }
        let open = self.open.get_mut(path).expect("inserted above");
        assert_eq!(
            offset, open.written,
            "readers check that offsets are contiguous"
        );
        match &mut open.decoder {
            Some(decoder) => decoder
                .write(data)
                .map_err(|e| Error::Corrupt(format!("{path:?} does not decompress: {e}")))?,
            None => {
                open.file
                    .write_all(data)
                    .context(|| format!("cannot write {} in {}", path, self.root.display()))?;
            }
        }
        combine_crc(&mut open.crc, crc32, data.len());
        open.written += data.len() as u64;
        if open.decoder.is_none() {
            open.write_behind();
        }
        self.bytes += data.len() as u64;
        Ok(())
    }

    fn end_file(&mut self, path: &str, attrs: Option<Attrs>) -> Result<()> {
        let mut open = match self.open.remove(path) {
            Some(open) => open,
            None => self.create_file(path)?,
        };
        if let Some(decoder) = open.decoder.take() {
            let (_, size, crc) = decoder
                .finish()
                .map_err(|e| Error::Corrupt(format!("{path:?} does not decompress: {e}")))?;
            self.decoded.insert(open.name.clone(), (size, crc));
        }
        if let Some(attrs) = attrs {
            set_attrs(Path::new(path), Some(&open.file), attrs)?;
        }
        if open.name == BEGIN_NAME && self.received.is_empty() && self.may_decode {
            // Our marker, first: it says whether the `.zst` files that follow are ours.
            let begin = fs::read(self.root.join(BEGIN_NAME)).unwrap_or_default();
            self.compressed = manifest::Begin::says_compressed(&begin);
        }
        self.received
            .insert(open.name, (open.written, open.crc.finalize()));
        Ok(())
    }

    fn directory(&mut self, path: &str, attrs: Option<Attrs>) -> Result<()> {
        let parts = safe_components(path)?;
        if parts.is_empty() {
            return Ok(()); // `./`: the target itself, which we leave as it is
        }
        let dir = self.ensure_dir(&parts)?;
        if let Some(attrs) = attrs {
            self.dir_attrs.push((dir, attrs));
        }
        Ok(())
    }
}

/// A file being written.
struct OpenFile {
    file: File,
    /// Decodes a compressed file into `file` on the way.
    decoder: Option<StreamDecoder<File>>,
    /// The path as stored in `received`: components joined by `/`, no `.` parts.
    name: String,
    written: u64,
    /// Bytes handed to the disk so far, and of those, bytes known on disk and dropped from
    /// the page cache (see `write_behind`).
    submitted: u64,
    dropped: u64,
    crc: crc32fast::Hasher,
}

/// How much written data may wait in the page cache before it is handed to the disk.
const WRITE_BEHIND: u64 = 8 << 20;

impl OpenFile {
    /// Hands each full window of written data to the disk and drops the window before it
    /// from the page cache once it is on disk. Without this, gigabytes of dirty pages pile
    /// up and every write is throttled; a receiving host has no use for them cached.
    fn write_behind(&mut self) {
        let pending = self.written - self.submitted;
        if pending < WRITE_BEHIND {
            return;
        }
        // Only hints: the final syncfs makes everything durable.
        crate::sys::start_writeback(&self.file, self.submitted, pending);
        if self.submitted > self.dropped {
            let previous = self.submitted - self.dropped;
            crate::sys::wait_writeback(&self.file, self.dropped, previous);
            crate::sys::drop_cache(&self.file, self.dropped, previous);
        }
        self.dropped = self.submitted;
        self.submitted = self.written;
    }
}

/// Applies mode and modification time, to an open file or (for directories) a path.
/// Set-user-ID, set-group-ID and sticky bits are dropped: an archive must not be able to
/// plant a setuid file when extracted by root.
fn set_attrs(path: &Path, file: Option<&File>, attrs: Attrs) -> Result<()> {
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(attrs.mtime.max(0) as u64);
    let perms = fs::Permissions::from_mode(attrs.mode & 0o777);
    match file {
        Some(f) => f
            .set_permissions(perms)
            .and_then(|()| f.set_modified(mtime))
            .with_path("set attributes of", path),
        None => {
            let f = File::open(path).with_path("open", path)?;
            fs::set_permissions(path, perms)
                .and_then(|()| f.set_modified(mtime))
                .with_path("set attributes of", path)
        }
    }
}

/// What [`scan`] found in a stream.
pub struct Scanned {
    /// The stream ends with its manifest.
    pub complete: bool,
    pub files: usize,
    pub bytes: u64,
    pub problems: Vec<manifest::Problem>,
}

/// Reads a whole stream without writing anything, and checks it against its manifest.
/// A stream that cannot be decoded to its end is one problem: where it breaks.
pub fn scan(input: &mut dyn Read) -> Result<Scanned> {
    let mut head = vec![0u8; format::tar::BLOCK];
    let n = read_full(input, &mut head).context(|| "cannot read the input stream".into())?;
    head.truncate(n);
    let detected = Format::detect(&head)?;
    let mut stream = Cursor::new(head).chain(input);
    let mut scanner = Scanner::default();
    let read = match detected {
        Format::Tar => format::tar::read(&mut stream, &mut scanner),
        Format::Xbstream => format::xbstream::read(&mut stream, &mut scanner),
    };
    let mut problems = Vec::new();
    if let Err(e) = read {
        if !matches!(e, Error::Corrupt(_)) {
            return Err(e);
        }
        problems.push(manifest::Problem {
            path: "(stream)".into(),
            problem: "truncated",
            detail: e.to_string(),
        });
    }
    let complete = scanner.manifest.is_some();
    match &scanner.manifest {
        Some(json) => {
            let m: manifest::Manifest<serde_json::Value> = manifest::Manifest::parse(json)?;
            let found = scanner
                .received
                .iter()
                .map(|(p, &(size, crc))| (p.clone(), (size, Some(crc))))
                .collect();
            problems.extend(manifest::compare(&found, &m.files));
            // What the compressed files decode to, against their originals.
            for f in &m.files {
                let (Some(o), Some(decoded)) = (&f.original, scanner.decoded.get(&f.path)) else {
                    continue;
                };
                let detail = match decoded {
                    Ok((size, crc)) if (*size, *crc) == (o.size, o.crc32) => continue,
                    Ok((size, crc)) => format!(
                        "decodes to {size} bytes with CRC-32 {crc:08x}, the manifest says {} bytes with {:08x}",
                        o.size, o.crc32
                    ),
                    Err(e) => format!("does not decompress: {e}"),
                };
                problems.push(manifest::Problem {
                    path: f.path.clone(),
                    problem: "altered",
                    detail,
                });
            }
        }
        None if problems.is_empty() => problems.push(manifest::Problem {
            path: MANIFEST_NAME.into(),
            problem: "missing",
            detail: "the stream ends without its manifest: it is truncated, or not a backup of this tool".into(),
        }),
        None => {}
    }
    Ok(Scanned {
        complete,
        files: scanner.received.len(),
        bytes: scanner.received.values().map(|(s, _)| s).sum(),
        problems,
    })
}

/// An [`Unpack`] that only checksums, and decodes the files of a compressed stream to
/// checksum what they decode to.
#[derive(Default)]
struct Scanner {
    open: HashMap<String, (u64, crc32fast::Hasher)>,
    received: BTreeMap<String, (u64, u32)>,
    manifest: Option<Vec<u8>>,
    manifest_bytes: Vec<u8>,
    /// The marker said the `.zst` files are compressed by the backup.
    compressed: bool,
    begin: Vec<u8>,
    decoders: HashMap<String, StreamDecoder<std::io::Sink>>,
    /// Stored name → what it decoded to (size and CRC-32), or why it did not decode.
    decoded: BTreeMap<String, std::result::Result<(u64, u32), String>>,
}

impl Unpack for Scanner {
    fn write(&mut self, path: &str, _offset: u64, data: &[u8], crc32: u32) -> Result<()> {
        let name = safe_components(path)?.join("/");
        let (size, crc) = self
            .open
            .entry(name.clone())
            .or_insert_with(|| (0, crc32fast::Hasher::new()));
        *size += data.len() as u64;
        combine_crc(crc, crc32, data.len());
        match name.as_str() {
            MANIFEST_NAME => self.manifest_bytes.extend_from_slice(data),
            BEGIN_NAME => self.begin.extend_from_slice(data),
            n if self.compressed && n.ends_with(ZSTD_SUFFIX) && !self.decoded.contains_key(n) => {
                if !self.decoders.contains_key(n) {
                    let decoder = StreamDecoder::new(std::io::sink())
                        .context(|| "cannot start a zstd decoder".into())?;
                    self.decoders.insert(name.clone(), decoder);
                }
                let decoder = self.decoders.get_mut(n).expect("inserted above");
                if let Err(e) = decoder.write(data) {
                    self.decoders.remove(n);
                    self.decoded.insert(name, Err(e.to_string()));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn end_file(&mut self, path: &str, _attrs: Option<Attrs>) -> Result<()> {
        let name = safe_components(path)?.join("/");
        let (size, crc) = self
            .open
            .remove(&name)
            .unwrap_or((0, crc32fast::Hasher::new()));
        if name == MANIFEST_NAME {
            self.manifest = Some(std::mem::take(&mut self.manifest_bytes));
            return Ok(());
        }
        if name == BEGIN_NAME && self.received.is_empty() {
            self.compressed = manifest::Begin::says_compressed(&self.begin);
        }
        if let Some(decoder) = self.decoders.remove(&name) {
            let result = decoder
                .finish()
                .map(|(_, s, c)| (s, c))
                .map_err(|e| e.to_string());
            self.decoded.insert(name.clone(), result);
        }
        self.received.insert(name, (size, crc.finalize()));
        Ok(())
    }

    fn directory(&mut self, _path: &str, _attrs: Option<Attrs>) -> Result<()> {
        Ok(())
    }
}
