//! Shared test helpers: file trees, tree comparison, writing our streams, running tools.

pub mod db;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use std::sync::{Arc, Mutex};

use myrocks_hotbackup::cancel::Cancel;
use myrocks_hotbackup::format::layout::{BEGIN_NAME, MANIFEST_NAME};
use myrocks_hotbackup::format::manifest::Kind;
use myrocks_hotbackup::format::tar::TarWriter;
use myrocks_hotbackup::format::xbstream::XbstreamWriter;
use myrocks_hotbackup::format::{Encoder, Format};
use myrocks_hotbackup::pipeline::progress::Quiet;
use myrocks_hotbackup::pipeline::{Item, Options, Pipeline};
use myrocks_hotbackup::sink::stream::StreamSink;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_myrocks-hotbackup"))
}

/// Fails loudly, with the install command, when a tool the tests need is missing.
pub fn require(tool: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{tool} is not installed; run: apt-get install -y mariadb-server mariadb-plugin-rocksdb mariadb-backup \
         (scripts/test does this for you)"
    );
}

/// Runs a command, panicking with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Fills `len` bytes of deterministic, incompressible-looking data.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `path` (creating parents) with `data`, then sets mode and mtime.
pub fn put(root: &Path, path: &str, data: &[u8], mode: u32, mtime: u64) {
    let full = root.join(path);
    fs::create_dir_all(full.parent().unwrap()).unwrap();
    fs::write(&full, data).unwrap();
    fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
    File::options()
        .write(true)
        .open(&full)
        .unwrap()
        .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime))
        .unwrap();
}

/// Writes a big file in 1 MiB pieces without holding it in memory.
pub fn put_big(root: &Path, path: &str, len: usize) {
    let full = root.join(path);
    fs::create_dir_all(full.parent().unwrap()).unwrap();
    let mut f = File::create(&full).unwrap();
    let block = pseudo_random(7, 1 << 20);
    let mut left = len;
    let mut i = 0u8;
    while left > 0 {
        let n = left.min(block.len());
        let mut piece = block[..n].to_vec();
        piece[0] = i; // no two blocks alike
        f.write_all(&piece).unwrap();
        left -= n;
        i = i.wrapping_add(1);
    }
}

/// The files of a tree, relative path → (content, mode, mtime), metadata files excluded.
pub fn snapshot(root: &Path) -> BTreeMap<String, (Vec<u8>, u32, i64)> {
    let mut out = BTreeMap::new();
    for path in walk(root) {
        if path == BEGIN_NAME || path == MANIFEST_NAME {
            continue;
        }
        let full = root.join(&path);
        let md = fs::metadata(&full).unwrap();
        out.insert(
            path,
            (fs::read(&full).unwrap(), md.mode() & 0o7777, md.mtime()),
        );
    }
    out
}

/// Asserts two trees hold the same files with the same bytes (and modes and mtimes when
/// `with_attrs`).
pub fn assert_same_tree(expected: &Path, actual: &Path, with_attrs: bool) {
    let (a, b) = (snapshot(expected), snapshot(actual));
    let names = |m: &BTreeMap<String, _>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "different file lists");
    for (path, (data, mode, mtime)) in &a {
        let (data2, mode2, mtime2) = &b[path];
        assert!(
            data == data2,
            "{path}: contents differ ({} vs {} bytes)",
            data.len(),
            data2.len()
        );
        if with_attrs {
            assert_eq!(
                (mode, mtime),
                (mode2, mtime2),
                "{path}: mode or mtime differ"
            );
        }
    }
}

/// Asserts that the tree at `root` still matches a snapshot taken earlier, naming what changed.
pub fn assert_unchanged(before: &BTreeMap<String, (Vec<u8>, u32, i64)>, root: &Path) {
    let after = snapshot(root);
    let changed: Vec<&String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(
        changed.is_empty(),
        "{} changed: {changed:?}",
        root.display()
    );
}

/// Every file under `root`, relative, in "files before subdirectories" order: the order in
/// which `mbstream -x` can create every directory (it makes only a file's direct parent).
pub fn walk(root: &Path) -> Vec<String> {
    fn go(root: &Path, rel: &str, out: &mut Vec<String>) {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let mut entries: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        let join = |name: &str| {
            if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            }
        };
        for e in entries.iter().filter(|e| e.file_type().unwrap().is_file()) {
            out.push(join(e.file_name().to_str().unwrap()));
        }
        for e in entries.iter().filter(|e| e.file_type().unwrap().is_dir()) {
            go(root, &join(e.file_name().to_str().unwrap()), out);
        }
    }
    let mut out = Vec::new();
    go(root, "", &mut out);
    out
}

/// Writes the files of `root` as one of our streams (marker, files, manifest) into `out`,
/// through the library's own pipeline and stream sink.
pub fn write_stream(format: Format, root: &Path, out: impl Write + Send + 'static) {
    let encoder: Box<dyn Encoder> = match format {
        Format::Tar => Box::new(TarWriter::new(out)),
        Format::Xbstream => Box::new(XbstreamWriter::new(out)),
    };
    // One file at a time, in `walk` order: mbstream creates only a file's direct parent.
    let sink = StreamSink::new(encoder, 1);
    let pipeline = Pipeline::new(&sink, Options::serial(), &Quiet, Cancel::never());
    pipeline.begin().unwrap();
    let items = walk(root)
        .into_iter()
        .map(|path| Item::file(&path, Kind::TableData, root.join(&path)))
        .collect();
    assert!(pipeline.send(items, None).unwrap().is_empty());
    pipeline.commit(()).unwrap();
}

/// A writer into memory that can be handed to another thread.
#[derive(Clone, Default)]
pub struct SharedVec(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedVec {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The files of `root` as one of our streams, in memory.
pub fn stream_of(format: Format, root: &Path) -> Vec<u8> {
    let out = SharedVec::default();
    write_stream(format, root, out.clone());
    let bytes = out.0.lock().unwrap().clone();
    bytes
}

/// Runs our `extract` on `input` into `target`.
pub fn extract_cmd(input: &Path, target: &Path) -> Output {
    Command::new(bin())
        .arg("extract")
        .arg("-C")
        .arg(target)
        .arg(input)
        .output()
        .unwrap()
}

/// Runs our `extract` on `input` into `target`, asserting success.
pub fn extract_ok(input: &Path, target: &Path) {
    let res = extract_cmd(input, target);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// Writes `stream` beside `target` and runs our `extract` on it into `target`.
pub fn extract_bytes(stream: &[u8], target: &Path) -> Output {
    let file = target.with_extension("stream");
    fs::write(&file, stream).unwrap();
    extract_cmd(&file, target)
}

/// Fills in the checksum field of a 512-byte tar header, in the canonical form.
pub fn set_tar_checksum(h: &mut [u8]) {
    h[148..156].fill(b' ');
    let sum: u32 = h[..512].iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}
