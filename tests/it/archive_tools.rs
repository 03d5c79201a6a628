//! Round trips against the real readers and writers: our tar → GNU `tar -x`, our xbstream →
//! `mbstream -x`, and `tar -c` / `mbstream -c` → our `extract`, compared byte for byte.

use std::fs::{self, File};
use std::io::{BufWriter, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use myrocks_hotbackup::error::Result;
use myrocks_hotbackup::format::{self, Attrs, Format, Unpack};

use crate::common::*;

/// The tree the issue asks for: a 300-byte path, an empty file, a file of several hundred
/// MiB, nested directories, names starting with `#`, assorted modes and mtimes.
fn awkward_tree(root: &Path) {
    put(
        root,
        "#rocksdb/000012.sst",
        &pseudo_random(1, 70_000),
        0o640,
        1_700_000_000,
    );
    put(
        root,
        "#rocksdb/CURRENT",
        b"MANIFEST-000004\n",
        0o640,
        1_700_000_001,
    );
    put(
        root,
        "db1/#sql-alter.frm",
        &pseudo_random(2, 1046),
        0o660,
        1_600_000_000,
    );
    put(
        root,
        "db1/t1.frm",
        &pseudo_random(3, 513),
        0o600,
        1_500_000_000,
    );
    put(root, "empty", b"", 0o644, 1_400_000_000);
    put(root, "a/f1", b"one", 0o644, 1_300_000_000);
    put(root, "a/b/f2", &pseudo_random(4, 512), 0o755, 1_300_000_001);
    put(root, "a/b/c/f3", &pseudo_random(5, 1), 0o400, 1_300_000_002);
    let long_dir = format!("long/{}", "d".repeat(150));
    put(
        root,
        "long/marker",
        b"creates long/ first",
        0o644,
        1_200_000_000,
    );
    put(
        root,
        &format!("{long_dir}/keep"),
        b"creates the long directory",
        0o644,
        1_200_000_000,
    );
    let long_path = format!("{long_dir}/{}", "f".repeat(300 - long_dir.len() - 1));
    assert_eq!(long_path.len(), 300);
    put(
        root,
        &long_path,
        &pseudo_random(6, 10_000),
        0o644,
        1_200_000_001,
    );
    put_big(root, "big/data.bin", 300 << 20);
}

fn write_to_file(format: Format, root: &Path, file: &Path) {
    write_stream(format, root, BufWriter::new(File::create(file).unwrap()));
}

#[test]
fn our_tar_extracts_with_gnu_tar() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out, stream) = (
        tmp.path().join("src"),
        tmp.path().join("out"),
        tmp.path().join("s.tar"),
    );
    awkward_tree(&src);
    write_to_file(Format::Tar, &src, &stream);
    fs::create_dir(&out).unwrap();
    run_ok(
        Command::new(require("tar"))
            .arg("-xf")
            .arg(&stream)
            .arg("-C")
            .arg(&out),
    );
    assert_same_tree(&src, &out, true);
}

#[test]
fn our_xbstream_extracts_with_mbstream() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out, stream) = (
        tmp.path().join("src"),
        tmp.path().join("out"),
        tmp.path().join("s.xb"),
    );
    awkward_tree(&src);
    write_to_file(Format::Xbstream, &src, &stream);
    fs::create_dir(&out).unwrap();
    let out_status = run_ok(
        Command::new(require("mbstream"))
            .arg("-x")
            .arg("-C")
            .arg(&out)
            .stdin(File::open(&stream).unwrap()),
    );
    // mbstream exits 0 even when it skips files: the comparison is the real check.
    assert!(out_status.status.success());
    assert_same_tree(&src, &out, false);
}

#[test]
fn gnu_tar_output_extracts_with_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out, stream) = (
        tmp.path().join("src"),
        tmp.path().join("out"),
        tmp.path().join("s.tar"),
    );
    awkward_tree(&src);
    run_ok(
        Command::new(require("tar"))
            .arg("-cf")
            .arg(&stream)
            .arg("-C")
            .arg(&src)
            .arg("."),
    );
    extract_ok(&stream, &out);
    assert_same_tree(&src, &out, true);
}

#[test]
fn gnu_tar_pax_output_extracts_with_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out, stream) = (
        tmp.path().join("src"),
        tmp.path().join("out"),
        tmp.path().join("s.tar"),
    );
    put(
        &src,
        &format!("p/{}", "x".repeat(200)),
        b"pax names",
        0o640,
        1_234_567_890,
    );
    put(&src, "p/short", b"", 0o600, 1_234_567_891);
    run_ok(
        Command::new(require("tar"))
            .args(["--format=pax", "-cf"])
            .arg(&stream)
            .arg("-C")
            .arg(&src)
            .arg("p"),
    );
    extract_ok(&stream, &out);
    assert_same_tree(&src, &out, true);
}

#[test]
fn mbstream_output_extracts_with_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out, stream) = (
        tmp.path().join("src"),
        tmp.path().join("out"),
        tmp.path().join("s.xb"),
    );
    awkward_tree(&src);
    let files = walk(&src);
    run_ok(
        Command::new(require("mbstream"))
            .arg("-c")
            .args(&files)
            .current_dir(&src)
            .stdout(File::create(&stream).unwrap()),
    );
    extract_ok(&stream, &out);
    assert_same_tree(&src, &out, false);
}

/// The original tool ran `tar chf - FILE` once per file: many archives glued together.
#[test]
fn original_tools_glued_tar_archives_extract_with_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out, stream) = (
        tmp.path().join("src"),
        tmp.path().join("out"),
        tmp.path().join("s.tar"),
    );
    put(
        &src,
        "000007.sst",
        &pseudo_random(8, 5000),
        0o640,
        1_700_000_000,
    );
    put(
        &src,
        "MANIFEST-000005",
        &pseudo_random(9, 300),
        0o640,
        1_700_000_000,
    );
    put(
        &src,
        "db/t.frm",
        &pseudo_random(10, 900),
        0o660,
        1_700_000_000,
    );
    let mut glued = Vec::new();
    for f in ["000007.sst", "MANIFEST-000005", "db/t.frm"] {
        glued.extend(
            run_ok(
                Command::new(require("tar"))
                    .args(["chf", "-", f])
                    .current_dir(&src),
            )
            .stdout,
        );
    }
    fs::write(&stream, glued).unwrap();
    extract_ok(&stream, &out);
    assert_same_tree(&src, &out, true);
}

/// Counts what a reader decodes, without touching the disk.
#[derive(Default)]
struct Tally {
    bytes: u64,
    crc: crc32fast::Hasher,
}

impl Unpack for Tally {
    fn write(&mut self, path: &str, _: u64, data: &[u8], crc32: u32) -> Result<()> {
        assert_eq!(crc32, crc32fast::hash(data), "the reader's CRC of a piece");
        if path != "huge.sparse" {
            return Ok(());
        }
        self.bytes += data.len() as u64;
        self.crc.update(data);
        Ok(())
    }
    fn end_file(&mut self, _: &str, _: Option<Attrs>) -> Result<()> {
        Ok(())
    }
    fn directory(&mut self, _: &str, _: Option<Attrs>) -> Result<()> {
        Ok(())
    }
}

/// Sizes of 8 GiB and more do not fit tar's 11 octal digits: GNU base-256 must be used,
/// and GNU tar must read the archive to its end. A sparse file keeps the disk out of it.
#[test]
fn files_of_8_gib_and_more_in_tar() {
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("huge.sparse");
    let size: u64 = (8 << 30) + 12_345;
    let f = File::create(&big).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let mut tar = Command::new(require("tar"))
        .arg("-tvf")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    write_stream(Format::Tar, tmp.path(), tar.stdin.take().unwrap());
    let mut listing = String::new();
    tar.stdout
        .take()
        .unwrap()
        .read_to_string(&mut listing)
        .unwrap();
    assert!(tar.wait().unwrap().success());
    assert!(
        listing.contains(&size.to_string()) && listing.contains("huge.sparse"),
        "{listing}"
    );

    // And our own reader gets every byte back.
    let (rd, wr) = std::io::pipe().unwrap();
    let root = tmp.path().to_path_buf();
    let writer = std::thread::spawn(move || write_stream(Format::Tar, &root, wr));
    let mut tally = Tally::default();
    let files = format::tar::read(&mut std::io::BufReader::new(rd), &mut tally).unwrap();
    writer.join().unwrap();
    let mut zeros = crc32fast::Hasher::new();
    let block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        zeros.update(&block[..n]);
        left -= n as u64;
    }
    assert_eq!(
        (files, tally.bytes, tally.crc.finalize()),
        (3, size, zeros.finalize()),
        "the marker, the file and the manifest"
    );
}
